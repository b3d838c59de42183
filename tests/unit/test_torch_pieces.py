"""Data sharding, config errors and FLOP accounting of the torch backend (single process, no mocks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from llama3_hyperpod.config import ConfigError, load_config
from llama3_hyperpod.torch_backend import metrics
from llama3_hyperpod.torch_backend.data import IGNORE_INDEX, Batches, load_train_dataset, write_token_dataset
from llama3_hyperpod.torch_backend.metrics import flops_per_token
from llama3_hyperpod.torch_backend.model import Llama, LlamaArgs, num_params
from llama3_hyperpod.torch_backend.parallel import check_layout
from llama3_hyperpod.torch_backend.train import main, train
from tests.token_data import write_byte_text_dataset

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml"


@pytest.fixture
def numbered(tmp_path: Path) -> Path:
    """Row i holds tokens i*8 .. i*8+7, so a batch tells which rows it came from."""
    write_token_dataset(tmp_path / "ds", np.arange(40 * 8), seq_len=8)
    return tmp_path / "ds"


def test_dp_ranks_take_contiguous_slices_of_the_same_global_batch(numbered: Path) -> None:
    ds = load_train_dataset(str(numbered), seq_len=8)
    single = Batches(ds, 8, micro_batch_size=2, dp=1, dp_rank=0, grad_accum_steps=4)
    rows_single = [int(t[0]) // 8 for m in range(4) for t in single.get(step=1, micro=m)[0]]
    rows_dp = []
    for m in range(2):
        for r in range(2):
            tokens, _ = Batches(ds, 8, micro_batch_size=2, dp=2, dp_rank=r, grad_accum_steps=2).get(step=1, micro=m)
            rows_dp += [int(t[0]) // 8 for t in tokens]
    assert rows_single == rows_dp == list(range(8, 16))


def test_shuffled_passes_visit_every_row_once_and_split_like_the_ordered_ones(numbered: Path) -> None:
    ds = load_train_dataset(str(numbered), seq_len=8)

    def rows(dp: int, accum: int, steps: range, seed: int | None = 7) -> list[int]:
        out = []
        for step in steps:
            for m in range(accum):
                for r in range(dp):
                    b = Batches(ds, 8, micro_batch_size=2, dp=dp, dp_rank=r, grad_accum_steps=accum,
                                shuffle_seed=seed)
                    out += [int(t[0]) // 8 for t in b.get(step=step, micro=m)[0]]
        return out

    first_pass, second_pass = rows(2, 2, range(5)), rows(2, 2, range(5, 10))  # 40 rows, 8 per step
    assert sorted(first_pass) == sorted(second_pass) == list(range(40))  # a permutation per pass
    assert first_pass != list(range(40)) and first_pass != second_pass  # shuffled, differently each pass
    assert rows(1, 4, range(5)) == first_pass == rows(4, 1, range(5))  # same rows whatever the split
    assert rows(2, 2, range(5), seed=8) != first_pass and rows(2, 2, range(5), seed=None) == list(range(40))


def test_targets_are_labels_shifted_with_last_ignored_and_wraparound(numbered: Path) -> None:
    ds = load_train_dataset(str(numbered), seq_len=8)
    tokens, targets = Batches(ds, 8, micro_batch_size=1, dp=1, dp_rank=0, grad_accum_steps=1).get(step=41, micro=0)
    assert tokens[0].tolist() == list(range(8, 16))  # row 41 wraps to row 1
    assert targets[0].tolist() == [*range(9, 16), IGNORE_INDEX]


def test_missing_train_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_dataset(None, 8)
    assert err.value.key == "data.train_dir"
    with pytest.raises(ConfigError, match="is not a directory"):
        load_train_dataset(str(tmp_path / "nope"), 8)


def test_short_rows_name_the_sequence_length(numbered: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_dataset(str(numbered), seq_len=16)
    assert err.value.key == "model.encoder_seq_length"


def test_pipeline_parallel_is_refused_with_the_key() -> None:
    rc = load_config(TINY, ["trainer.devices=2", "distributed_strategy.pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError) as err:
        check_layout(rc.layout, rc.model.num_key_value_heads)
    assert err.value.key == "distributed_strategy.pipeline_model_parallel_size"
    assert "no pipeline parallelism" in err.value.message


def test_train_cli_exits_2_with_one_line_when_data_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(TINY), "--run-dir", "/tmp/unused-run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: data.train_dir: is not set: point it at a dataset made by `data prepare`"]


def test_flops_per_token_palm_convention_on_llama3_8b() -> None:
    rc = load_config(TINY.parent / "llama3_8b_trn1.yaml")
    m = rc.model
    with torch.device("meta"):
        model = Llama(LlamaArgs.from_hf(m.hf_config))
    assert num_params(model) == m.parameter_count() == 8_030_261_248
    non_embedding = num_params(model, exclude_embedding=True)
    assert non_embedding == 8_030_261_248 - 128_256 * 4096  # the output layer counts, the embedding does not
    fpt = flops_per_token(non_embedding_params=non_embedding, num_layers=32, hidden_size=4096, seq_len=8192)
    assert fpt == 6 * non_embedding + 12 * 32 * 4096 * 8192
    assert 57e9 < fpt < 59e9


@pytest.mark.parametrize("fixed", [True, False])
def test_the_arrow_reader_reads_what_datasets_reads(tmp_path: Path, fixed: bool) -> None:
    """pyarrow alone (no `datasets` import at the trainer's start) gives the rows datasets.load_from_disk gives:
    fixed-size lists (the embedded default) and ragged lists, a DatasetDict's train split, several data files."""
    import datasets

    rng = np.random.default_rng(0)
    lengths = [12] * 30 if fixed else rng.integers(10, 16, 30).tolist()
    rows = [rng.integers(0, 1000, n).tolist() for n in lengths]
    feature = datasets.Sequence(datasets.Value("int32"), length=12 if fixed else -1)
    ds = datasets.Dataset.from_dict({"input_ids": rows}, features=datasets.Features({"input_ids": feature}))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"), num_shards={
        "train": 3, "test": 1})
    ours = load_train_dataset(str(tmp_path / "dd"), seq_len=10)
    theirs = datasets.load_from_disk(str(tmp_path / "dd"))["train"]
    assert len(ours) == len(theirs) == 30 and len(list((tmp_path / "dd" / "train").glob("*.arrow"))) == 3
    pick = [29, 0, 17, 17, 5]
    expected = np.array([theirs[i]["input_ids"][:10] for i in pick])
    assert (ours.take(pick, "input_ids", 10) == expected).all()
    tokens, targets = Batches(ours, 10, micro_batch_size=2, dp=1, dp_rank=0, grad_accum_steps=1).get(step=3, micro=0)
    assert tokens.tolist() == [theirs[i]["input_ids"][:10] for i in (6, 7)]
    assert targets[:, :-1].tolist() == [theirs[i]["input_ids"][1:10] for i in (6, 7)]


@pytest.mark.parametrize("kind", ["fixed", "list", "large_list"])
def test_rows_come_from_the_buffers_of_sliced_chunks(kind: str) -> None:
    """Rows read straight from the Arrow buffers honour chunk and array offsets (a sliced table), for fixed-size,
    ragged and large ragged lists, and a column of non-integers or with nulls is one config error."""
    import pyarrow as pa

    from llama3_hyperpod.torch_backend.data import ArrowRows

    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 1000, 6 if kind == "fixed" else int(rng.integers(6, 9))).tolist() for _ in range(40)]
    item = pa.int32()
    arrow_type = {"fixed": pa.list_(item, 6), "list": pa.list_(item), "large_list": pa.large_list(item)}[kind]
    chunks = [pa.array(rows[:25], arrow_type), pa.array([], arrow_type), pa.array(rows[25:], arrow_type)]
    table = pa.Table.from_batches([pa.record_batch([c], names=["input_ids"]) for c in chunks]).slice(7, 30)
    ours = ArrowRows(table)
    expected = table.column("input_ids").to_pylist()
    assert len(ours) == 30 and table.column("input_ids").num_chunks == 3
    pick = [0, 17, 18, 29, 3]
    assert ours.take(pick, "input_ids", 5).tolist() == [expected[i][:5] for i in pick]
    assert [ours.row_length(i) for i in pick] == [len(expected[i]) for i in pick]
    bad = ArrowRows(pa.table({"input_ids": pa.array([[1.5, 2.0]]), "holes": pa.array([[1, None]])}))
    for column in ("input_ids", "holes"):
        with pytest.raises(ConfigError, match=f"column {column} holds"):
            bad.take([0], column, 1)


def test_reading_rows_imports_no_pandas(tmp_path: Path) -> None:
    """pyarrow's compute functions and to_numpy import pandas (0.6 s of a warm start); the trainer's reader uses
    neither."""
    import subprocess
    import sys

    write_token_dataset(tmp_path / "ds", np.arange(4000) % 500, seq_len=16)
    code = ("import sys; from llama3_hyperpod.torch_backend.data import load_train_dataset as f; "
            f"d = f({str(tmp_path / 'ds')!r}, 16); d.take([3, 1], 'input_ids', 16); "
            "print(sorted(m for m in ('pandas', 'pyarrow.compute', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_folder_that_is_no_saved_dataset_is_one_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"neither state\.json nor dataset_dict\.json") as err:
        load_train_dataset(str(tmp_path / "empty"), 8)
    assert err.value.key == "data.train_dir"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (broken / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(ConfigError, match="not a readable save_to_disk dataset"):
        load_train_dataset(str(broken), 8)


def test_a_step_that_outruns_the_cached_gemm_peak_drops_that_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GEMM peak cached while the machine was busy (1 GFLOP/s here) gives MFU far above 100%: the run warns once,
    names the file, and drops only this CPU's entry, so the next start measures again; the seeded copy it
    replaced (a hard link to the baked cache) keeps its bytes."""
    baked, cache = tmp_path / "baked.json", tmp_path / "cache" / "gemm-peak.json"
    cache.parent.mkdir()
    baked.write_text(json.dumps({metrics._cpu_key(): 1e9, "other cpu | 8 cpus | 8 threads | torch x": 5e11}))
    os.link(baked, cache)
    before = baked.read_bytes()
    monkeypatch.setenv(metrics.PEAK_CACHE_ENV, str(cache))
    write_byte_text_dataset(tmp_path / "ds", seq_len=64, max_bytes=64 * 8 * 2)
    rc = load_config(TINY, [f"data.train_dir={tmp_path / 'ds'}", "trainer.max_steps=2", "model.encoder_seq_length=64",
                            "torch_backend.compile=false", "exp_manager.create_checkpoint_callback=false"])
    result = train(rc, tmp_path / "run", echo=False)
    assert "cached in gemm-peak.json" in result.peak_source and min(m.mfu for m in result.history) > 1.0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "GEMM peak" in line]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "dropped" in warnings[0], warnings
    assert json.loads(cache.read_text()) == {"other cpu | 8 cpus | 8 threads | torch x": 5e11}
    assert baked.read_bytes() == before
    # The next start measures again (a real GEMM: far above 1 GFLOP/s) and keeps the result.
    value, source = metrics.peak_flops("cpu", None)
    assert value > 1e9 and "cached" not in source and json.loads(cache.read_text())[metrics._cpu_key()] == value


def test_a_run_within_the_cached_gemm_peak_leaves_the_file_alone(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "gemm-peak.json"
    cache.write_text(json.dumps({metrics._cpu_key(): 1e12}))
    monkeypatch.setenv(metrics.PEAK_CACHE_ENV, str(cache))
    _, source = metrics.peak_flops("cpu", None)
    before = cache.read_bytes()
    assert metrics.forget_outrun_peak(0.8, source) is None
    assert metrics.forget_outrun_peak(1.5, "torch_backend.peak_tflops") is None  # the user's figure is theirs
    assert cache.read_bytes() == before
