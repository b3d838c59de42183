"""The pinned Neuron stack, read from versions/neuron.json (the one source of truth), as Dockerfile build args."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "versions" / "neuron.json"

FLAVORS = ("neuron", "cpu", "cuda")
# Dockerfile ARG that names each flavor's base image.
BASE_IMAGE_ARG = {"neuron": "NEURON_BASE_IMAGE", "cpu": "CPU_BASE_IMAGE", "cuda": "CUDA_BASE_IMAGE"}

# Dockerfile ARG name -> path of its value in neuron.json.
NEURON_ARGS: dict[str, tuple[str, ...]] = {
    "NEURON_SDK_VERSION": ("neuron_sdk",),
    "NEURON_APT_REPO": ("repos", "apt"),
    "NEURON_PIP_INDEX": ("repos", "pip"),
    "TORCH_CPU_INDEX": ("repos", "torch_cpu_index"),
    "NEURON_RUNTIME_LIB_VERSION": ("apt", "aws-neuronx-runtime-lib"),
    "NEURON_COLLECTIVES_VERSION": ("apt", "aws-neuronx-collectives"),
    "NEURON_TOOLS_VERSION": ("apt", "aws-neuronx-tools"),
    "EFA_INSTALLER_VERSION": ("efa_installer",),
    "TORCH_VERSION": ("pip", "torch"),
    "TORCH_NEURONX_VERSION": ("pip", "torch-neuronx"),
    "NEURONX_CC_VERSION": ("pip", "neuronx-cc"),
    "NEURONX_DISTRIBUTED_VERSION": ("pip", "neuronx-distributed"),
    "NEURONX_DISTRIBUTED_TRAINING_VERSION": ("pip", "neuronx-distributed-training"),
    "TRANSFORMERS_VERSION": ("pip", "transformers"),
    "NXDT_GIT_URL": ("repos", "nxdt_git"),
    "NXDT_GIT_TAG": ("nxdt_git_tag",),
    "NEURON_BASE_IMAGE": ("base_images", "neuron"),
    "CPU_BASE_IMAGE": ("base_images", "cpu"),
    "CUDA_BASE_IMAGE": ("base_images", "cuda"),
}


@dataclass(frozen=True)
class NeuronVersions:
    """The parsed versions file; `raw` keeps every field for labels and reports."""

    raw: dict[str, Any]

    def get(self, *path: str) -> str:
        node: Any = self.raw
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise KeyError(f"{VERSIONS_FILE.name}: missing {'.'.join(path)}")
            node = node[key]
        return str(node)

    def build_args(self) -> dict[str, str]:
        """Every Dockerfile ARG the versions file defines."""
        return {arg: self.get(*path) for arg, path in NEURON_ARGS.items()}

    def base_image(self, flavor: str) -> str:
        return self.get("base_images", flavor)


def load_versions(path: Path = VERSIONS_FILE) -> NeuronVersions:
    return NeuronVersions(json.loads(path.read_text()))


def build_args_for(flavor: str, versions: NeuronVersions) -> dict[str, str]:
    """Build args for one flavor: the Neuron pins only where they are used, the flavor's base image always."""
    args = {BASE_IMAGE_ARG[flavor]: versions.base_image(flavor), "FLAVOR": flavor,
            "TORCH_CPU_INDEX": versions.get("repos", "torch_cpu_index")}
    if flavor == "neuron":
        args.update(versions.build_args())
    return args
