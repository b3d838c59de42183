"""Trainium instances the plan knows: devices per node, memory and bf16 peak per device (one rank per device).

Facts (AWS Neuron documentation):
- trn1.32xlarge: 16 Trainium chips, each 2 NeuronCore-v2 with 32 GiB HBM and 190 BF16 TFLOPS
  (about-neuron/arch/neuron-hardware/trainium.rst) -> 32 devices of 16 GiB, 95 TFLOPS.
- trn2.48xlarge: 16 Trainium2 chips, each 8 physical NeuronCore-v3 with 96 GiB HBM and 667 dense BF16 TFLOPS
  (about-neuron/arch/neuron-hardware/trainium2.rst, v2.29). Logical NeuronCore configuration (LNC) groups physical
  cores: LNC 2 (the default on trn2) gives 4 logical cores per chip, 64 ranks of about 24 GiB each
  (training/best-practices.html); LNC 1 gives 128 ranks of 12 GiB.
NxDT's own rule for `trainer.lnc` (utils/utils.py:32-39 get_lnc_size): on trn2 it defaults to 2, on trn1 it is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from llama3_hyperpod.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Instance:
    name: str
    chips: int
    cores_per_chip: int  # physical NeuronCores
    hbm_per_chip: int  # bytes
    bf16_flops_per_chip: float
    lnc: int  # physical cores per logical core (one rank each)

    @property
    def devices(self) -> int:
        return self.chips * self.cores_per_chip // self.lnc

    @property
    def memory_per_device(self) -> int:
        return self.hbm_per_chip * self.lnc // self.cores_per_chip

    @property
    def bf16_flops_per_device(self) -> float:
        return self.bf16_flops_per_chip * self.lnc / self.cores_per_chip


TRN1 = Instance("trn1.32xlarge", chips=16, cores_per_chip=2, hbm_per_chip=32 * GIB, bf16_flops_per_chip=190e12, lnc=1)


def trn2(lnc: int) -> Instance:
    return Instance("trn2.48xlarge", chips=16, cores_per_chip=8, hbm_per_chip=96 * GIB, bf16_flops_per_chip=667e12,
                    lnc=lnc)


def instance_for(devices: int, lnc: int | None) -> Instance:
    """The instance a config's `trainer.devices` / `trainer.lnc` describe; trn1 unless they can only mean trn2."""
    if lnc == 2 or (lnc is None and TRN1.devices < devices <= trn2(2).devices):
        instance = trn2(2)
    elif lnc == 1 and devices > TRN1.devices:
        instance = trn2(1)
    elif lnc is None and devices > trn2(2).devices:
        raise ConfigError("trainer.devices", f"is {devices}: a trn2.48xlarge has 64 logical NeuronCores at NxDT's "
                          "default trainer.lnc 2; set trainer.lnc: 1 for 128")
    else:
        instance = TRN1
    if devices > instance.devices:
        raise ConfigError("trainer.devices", f"is {devices}, but a {instance.name} has {instance.devices} NeuronCores"
                          + (f" at trainer.lnc {instance.lnc}" if instance.name.startswith("trn2") else ""))
    return instance


def physical_cores_per_chip(product_name: str | None) -> int:
    """Physical NeuronCores behind one /dev/neuronN here (from the EC2 instance type in DMI; trn1's when unknown)."""
    if product_name and product_name.startswith(("trn2", "trn3")):
        return 8
    return TRN1.cores_per_chip
