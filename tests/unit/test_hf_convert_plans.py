"""The NxDT converter plans of `checkpoint import` / `checkpoint export` (neuron), held to the converter's real
argument parser, and the neuron train launch that starts from an import.

The converter cannot run here (it imports NxD and torch_xla). Its flags are test data, from aws-neuron/
neuronx-distributed fbac349 src/neuronx_distributed/scripts/checkpoint_converter.py get_arg_parser (881-921):
`type=bool` flags take any string as true (argparse's bool("False") is True), `--hw_backend` and `--output_dir` are
required, and run() (926-932) asserts exactly one --convert_* flag. The plans run through the CLI (`--dry-run`) on
real files: a sparse 8B safetensors folder (headers and sizes real, no data blocks) and NxDT-named shard files.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from llama3_hyperpod.cluster import detect_accelerator
from llama3_hyperpod.config import ConfigError, load_config
from llama3_hyperpod.neuron import convert
from llama3_hyperpod.neuron.devices import instance_for
from llama3_hyperpod.plan import build_plan
from tests.conftest import CONFIG_8B, CONFIGS, run_cli

VALUE_FLAGS = {"--input_dir", "--hf_model_name", "--output_dir", "--hw_backend", "--config", "--model_key",
               "--tp_size", "--pp_size", "--ep_size", "--virtual_pp_size", "--n_layers", "--kv_size_multiplier",
               "--i_tp_round_factor", "--model_style", "--nxdt_yaml_config"}
BOOL_FLAGS = {"--coalesce_qkv", "--qkv_linear", "--fuse_qkv", "--pad_attn_heads", "--load_xser", "--save_xser"}
STORE_TRUE = {"--convert_from_xser", "--convert_to_xser", "--convert_from_full_state", "--convert_to_full_state"}
TAG = "llama3_8B--step=200-consumed_samples=204800.0.ckpt"


def parse_converter(argv: list[str]) -> dict[str, str | None]:
    """The flags of a converter command line as its parser takes them; asserts the parser's rules."""
    assert argv[1].endswith("/checkpoint_converter_scripts/checkpoint_converter.py")
    flags: dict[str, str | None] = {}
    rest = argv[2:]
    i = 0
    while i < len(rest):
        flag = rest[i]
        assert flag not in flags, f"{flag} given twice"
        if flag in STORE_TRUE:
            flags[flag] = None
            i += 1
            continue
        assert flag in VALUE_FLAGS | BOOL_FLAGS, f"{flag} is not a flag of the converter"
        value = rest[i + 1]
        if flag in BOOL_FLAGS:
            assert value == "True", f"{flag} {value}: a bool flag is passed as True or left out"
        flags[flag] = value
        i += 2
    assert len(STORE_TRUE & set(flags)) == 1, "exactly one --convert_* flag"
    assert flags.get("--hw_backend") in ("trn1", "trn2") and flags.get("--output_dir")
    return flags


def step_argv(output: str, number: int) -> list[str]:
    """The command of step `number` in a dry run's output."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"step {number}/"))
    argv = shlex.split(lines[at + 1].strip().split(" && ", 1)[1])
    while re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # the env the launch sets
        argv.pop(0)
    return argv


@pytest.fixture(scope="module")
def hf_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3 8B as a safetensors folder (bf16, two shards + index): real headers, sparse data."""
    from llama3_hyperpod.hf.tensors import expected_hf

    out = tmp_path_factory.mktemp("hf") / "Meta-Llama-3-8B"
    out.mkdir()
    config = json.loads((CONFIGS / "models" / "llama3_8b.json").read_text())
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_text("{}")
    expected = expected_hf(config)
    names = list(expected)
    weight_map = {}
    for i, group in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        header, offset = {}, 0
        for name in group:
            nbytes = math.prod(expected[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(expected[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-(8 + len(raw)) % 8)
        with (out / file).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def import_dry_run(hf: Path, out: Path, *overrides: str, config: Path = CONFIG_8B) -> str:
    done = run_cli("checkpoint", "import", str(hf), str(config), *overrides, "--backend", "neuron",
                   "--output-dir", str(out), "--run-name", "r", "--nxdt-examples", "/nxdt/examples", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not out.exists()  # a dry run writes nothing
    return done.stdout


def test_import_plan_8b_tp8(hf_8b: Path, tmp_path: Path) -> None:
    output = import_dry_run(hf_8b, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "r"
    consolidate = step_argv(output, 2)
    assert consolidate[1:4] == ["-m", "llama3_hyperpod.hf.steps", "consolidate"]
    assert consolidate[consolidate.index("--hf-dir") + 1] == str(hf_8b.resolve())
    flags = parse_converter(step_argv(output, 3))
    assert flags["--input_dir"] == consolidate[consolidate.index("--out") + 1]
    assert flags["--input_dir"].endswith("/pytorch_model.bin")
    assert flags["--output_dir"] == f"{run_dir}/.import-tmp/nxdt"
    assert "--convert_from_full_state" in flags
    assert {k: flags.get(k) for k in ("--model_style", "--hw_backend", "--tp_size", "--pp_size", "--n_layers",
                                      "--kv_size_multiplier", "--qkv_linear", "--fuse_qkv", "--save_xser")} == {
        "--model_style": "hf", "--hw_backend": "trn1", "--tp_size": "8", "--pp_size": "1", "--n_layers": "32",
        "--kv_size_multiplier": "1", "--qkv_linear": "True", "--fuse_qkv": "True", "--save_xser": "True"}
    assert "--coalesce_qkv" not in flags and "--load_xser" not in flags
    assert (f"exp_manager.resume_from_checkpoint='{run_dir}/import/nxdt' ++model.weight_init_only=true"
            in output)


def test_import_plan_8b_tp32_kv_replicator_4(hf_8b: Path, tmp_path: Path) -> None:
    output = import_dry_run(hf_8b, tmp_path / "runs", "distributed_strategy.tensor_model_parallel_size=32",
                            "distributed_strategy.kv_replicator=4", "exp_manager.save_xser=false")
    flags = parse_converter(step_argv(output, 3))
    assert (flags["--tp_size"], flags["--kv_size_multiplier"], flags["--fuse_qkv"]) == ("32", "4", "True")
    assert "--save_xser" not in flags  # exp_manager.save_xser false: plain torch.save shards


def test_import_plan_trn2_and_the_trn1_kv_rule(hf_8b: Path, tmp_path: Path) -> None:
    trn2 = import_dry_run(hf_8b, tmp_path / "a", "trainer.devices=64", "+trainer.lnc=2")
    assert parse_converter(step_argv(trn2, 3))["--hw_backend"] == "trn2"
    # trn1 puts one KV head per rank: 8 KV heads cannot be laid out on tensor parallel 4 by the converter
    bad = run_cli("checkpoint", "import", str(hf_8b), str(CONFIG_8B),
                  "distributed_strategy.tensor_model_parallel_size=4", "--backend", "neuron", "--output-dir",
                  str(tmp_path / "b"), "--dry-run")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "distributed_strategy.kv_replicator" in bad.stderr and "checkpoint_converter.py:626-637" in bad.stderr


def make_tag(root: Path, tp: int, *, xser: bool, done: bool = True, skip: int | None = None) -> Path:
    tag = root / "checkpoints" / TAG
    (tag / "model").mkdir(parents=True)
    if done:
        (tag / "done").write_text("")
    for rank in range(tp):
        if rank == skip:
            continue
        shard = tag / "model" / f"dp_rank_00_tp_rank_{rank:02d}_pp_rank_00.pt"
        shard.write_bytes(b"")
        if xser:
            (tag / "model" / f"{shard.name}.tensors").mkdir()
    return tag


def export_run(tag: Path, *args: str) -> tuple[int, str, str]:
    done = run_cli("checkpoint", "export", str(tag), "--config", str(CONFIG_8B), "--nxdt-examples", "/nxdt/examples",
                   "--dry-run", *args)
    return done.returncode, done.stdout, done.stderr


def test_export_plan_8b_tp32_reads_the_layout_from_the_shards(tmp_path: Path) -> None:
    tag = make_tag(tmp_path, 32, xser=True)
    code, out, err = export_run(tag, "--override", "distributed_strategy.tensor_model_parallel_size=32",
                                "--override", "distributed_strategy.kv_replicator=4")
    assert code == 0, err
    flags = parse_converter(step_argv(out, 2))
    assert "--convert_to_full_state" in flags and flags["--input_dir"] == f"{tag}/model"
    assert (flags["--tp_size"], flags["--pp_size"], flags["--kv_size_multiplier"]) == ("32", "1", "4")
    assert (flags["--qkv_linear"], flags["--fuse_qkv"], flags["--load_xser"]) == ("True", "True", "True")
    assert "--save_xser" not in flags and "--virtual_pp_size" not in flags
    to_hf = step_argv(out, 3)
    assert to_hf[1:4] == ["-m", "llama3_hyperpod.hf.steps", "to-hf"]
    assert to_hf[to_hf.index("--full-state") + 1] == f"{flags['--output_dir']}/checkpoint.pt"  # save_full's name
    assert f"-> {tag.with_name(TAG.removesuffix('.ckpt') + '.hf')}" in out
    assert list(tag.parent.iterdir()) == [tag]  # a dry run writes nothing


def test_export_plan_tp8_fused_is_refused_and_unfused_planned(tmp_path: Path) -> None:
    tag = make_tag(tmp_path, 8, xser=False)
    code, _, err = export_run(tag)  # llama3_8b_trn1.yaml: fuse_qkv true, 32 heads / 8 KV heads at tp 8
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.fuse_qkv" in err and "checkpoint_converter.py:268-290" in err
    code, out, err = export_run(tag, "--override", "model.fuse_qkv=false")
    assert code == 0, err
    flags = parse_converter(step_argv(out, 2))
    assert flags["--tp_size"] == "8" and "--fuse_qkv" not in flags and "--load_xser" not in flags  # no .tensors
    assert "exp_manager.save_xser is True but the shards are not xser" in err


@pytest.mark.parametrize(("case", "message"), [("no_done", "has no 'done' marker"),
                                              ("missing", "dp_rank_00_tp_rank_03_pp_rank_00.pt is missing"),
                                              ("layout", "has tp 4 x pp 1 shards but the config says tp 8")])
def test_export_refuses_incomplete_or_foreign_checkpoints(case: str, message: str, tmp_path: Path) -> None:
    tag = make_tag(tmp_path, 4 if case == "layout" else 8, xser=True, done=case != "no_done",
                   skip=3 if case == "missing" else None)
    code, _, err = export_run(tag, "--override", "model.fuse_qkv=false")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_converter_flags_follow_the_model_nxdt_builds() -> None:
    """qkv_linear defaults to False and fuse_qkv to True in NxDT (llama_model.py:31-32); MHA + fuse_qkv without
    qkv_linear is one stride-3 projection (modeling_llama.py:297): --coalesce_qkv on import."""
    llama2 = CONFIGS / "models" / "llama2_7b.json"
    rc = load_config(CONFIGS / "tiny_neuron.yaml", ["~model.qkv_linear", f"model.model_config={llama2}",
                                                  "distributed_strategy.tensor_model_parallel_size=8",
                                                  "trainer.devices=8", "model.encoder_seq_length=256"])
    lay = convert.layout_for(rc, instance_for(8, None))
    assert (lay.qkv_linear, lay.fuse_qkv, lay.coalesce_qkv) == (False, False, True)
    argv = convert.converter_argv("py", "/ex", lay, to_full_state=False, input_path="in.bin", output_dir="out",
                                  config_json="c.json", xser=False)
    flags = parse_converter(argv)
    assert flags["--coalesce_qkv"] == "True" and "--qkv_linear" not in flags and "--fuse_qkv" not in flags
    back = parse_converter(convert.converter_argv("py", "/ex", lay, to_full_state=True, input_path="m",
                                                  output_dir="o", config_json="c.json", xser=True))
    assert "--coalesce_qkv" not in back and back["--load_xser"] == "True"


def write_import(run_dir: Path, layout: dict[str, object]) -> Path:
    """What a neuron import leaves (import/manifest.json + import/nxdt/model/...), for the launch to find."""
    nxdt = run_dir / "import" / "nxdt" / "model"
    nxdt.mkdir(parents=True)
    (nxdt / "dp_rank_00_tp_rank_00_pp_rank_00.pt").write_bytes(b"")
    (run_dir / "import" / "manifest.json").write_text(json.dumps({"backend": "neuron", "layout": layout}))
    return run_dir / "import" / "nxdt"


def test_neuron_train_starts_from_the_import_until_the_run_has_its_own_checkpoint(tmp_path: Path) -> None:
    neuron = detect_accelerator("neuron")
    rc = load_config(CONFIG_8B, [])
    nxdt = write_import(tmp_path / "runs" / "r", convert.layout_for(rc, instance_for(32, None)).to_dict())
    plan = build_plan(CONFIG_8B, [], neuron, env={}, run_name="r", output_dir=tmp_path / "runs")
    argv = plan.commands["train"].argv
    assert f"exp_manager.resume_from_checkpoint='{nxdt}'" in argv and "++model.weight_init_only=true" in argv
    assert "imported weights" in plan.checkpoints["resume"]
    assert not any("resume_from_checkpoint" in a or "weight_init_only" in a for a in plan.commands["compile"].argv)

    own = tmp_path / "runs" / "r" / "checkpoints" / "llama3_8B--step=200-consumed_samples=204800.0.ckpt"
    own.mkdir(parents=True)
    (own / "done").write_text("")
    plan = build_plan(CONFIG_8B, [], neuron, env={}, run_name="r", output_dir=tmp_path / "runs")
    argv = plan.commands["train"].argv
    assert f"exp_manager.resume_from_checkpoint='{own}'" in argv  # its own newest complete one, with optimizer
    assert not any("weight_init_only" in a for a in argv)

    write_import(tmp_path / "runs2" / "r2", convert.layout_for(rc, instance_for(32, None)).to_dict())  # tp 8
    with pytest.raises(ConfigError, match=r"converted for another layout \(tp 8 there, 32 now\)"):
        build_plan(CONFIG_8B, ["distributed_strategy.tensor_model_parallel_size=32",
                               "distributed_strategy.kv_replicator=4"], neuron, env={}, run_name="r2",
                   output_dir=tmp_path / "runs2")
