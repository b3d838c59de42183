"""The save path: DCP into a temp dir (sync, or async in the background), every rank hashing and fsyncing the files it
wrote, then rank 0 renaming the dir to step_N and writing the `done` marker last (checkpoint.py says why).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from llama3_hyperpod.fsutil import create_durably, fsync_path
from llama3_hyperpod.torch_backend.checkpoint_base import CheckpointError, SaveErrors, app_state, rng_state, root_cause
from llama3_hyperpod.torch_backend.checkpoint_files import (
    DONE,
    IDENTITY,
    MODEL_CONFIG,
    TMP_PREFIX,
    complete_checkpoints,
    file_digests,
    hash_threads,
    make_marker,
    step_dir,
)
from llama3_hyperpod.torch_backend.checkpoint_retention import Retention


def _writer(tmp: Path, threads: int | None = None) -> dcp.FileSystemWriter:
    """DCP's file writer with one writer thread per core of this rank (hash_threads: its share of the node): the
    state is split by size into that many files (`__<rank>_<n>.distcp`, written in parallel) instead of one file
    written by one thread (DCP's default, about half the disk's bandwidth here; bench/checkpoint.py). DCP does not
    fsync them: _hash_own does, once each, overlapped with hashing them."""
    return dcp.FileSystemWriter(tmp, thread_count=threads or hash_threads(), sync_files=False)  # see _hash_own


# The name Python gives DCP's extra writer threads: "Thread-N (<target>)" (filesystem.py:717, no name given).
_WRITER_THREAD = "(_write_files_from_queue)"


class WriterThreadErrors:
    """What DCP's extra writer threads raised: their exception reaches only threading.excepthook, whose default
    prints a traceback; while this hook is in place it is kept for the save's own one-line error instead. Other
    threads' errors go on to the hook that was there before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._previous = threading.excepthook

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.name.endswith(_WRITER_THREAD) and args.exc_value is not None:
            with self._lock:
                self._errors.append(args.exc_value)
        else:
            self._previous(args)

    def take(self) -> list[BaseException]:
        with self._lock:
            errors, self._errors = self._errors, []
        return errors


def writer_thread_errors() -> WriterThreadErrors:
    """The hook, put in place before a save writes (again if something replaced it since: pytest does, per test),
    and emptied: what it holds afterwards belongs to this save."""
    hook = threading.excepthook
    if not isinstance(hook, WriterThreadErrors):
        hook = WriterThreadErrors()
        threading.excepthook = hook
    hook.take()
    return hook


def all_written(metadata: Metadata, thread_errors: list[BaseException]) -> Metadata:
    """Raise OSError unless DCP wrote every item its metadata lists and none of its writer threads failed.

    DCP's extra writer threads lose their own errors (torch 2.13 distributed/checkpoint/filesystem.py:375-478: an
    exception ends `_write_files_from_queue` in that thread, `_write_data` joins it at :746 and returns the other
    threads' results): a full disk or an I/O error hit by one of them leaves a save that "succeeds" with a truncated
    shard, which would be hashed and marked done. `thread_errors` (WriterThreadErrors) holds what such a thread
    raised; its items are also missing from `storage_data`, which `finish` builds from the write results
    (:758-764), and that is checked too, on the metadata every rank gets back."""
    expected: list[MetadataIndex] = []
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            expected += [MetadataIndex(fqn, chunk.offsets) for chunk in item.chunks]
        else:
            expected.append(MetadataIndex(fqn))
    missing = [index for index in expected if index not in metadata.storage_data]
    if thread_errors and isinstance(thread_errors[0], OSError):
        raise thread_errors[0]  # the thread's own error (a full disk keeps its errno)
    if thread_errors or missing:
        why = f"{type(thread_errors[0]).__name__}: {thread_errors[0]}" if thread_errors else "no error kept"
        raise OSError(f"{len(missing)} of {len(expected)} items were not written"
                      + (f" (first: {missing[0].fqn})" if missing else "")
                      + f": a checkpoint writer thread failed ({why})")
    return metadata


def without_torch_crc32() -> None:
    """torch.save without its per-record CRC-32 of tensor data, in every thread of this process from its first
    checkpoint save on.

    The checkpoint's own digests (checkpoint_files.DIGEST) cover every byte of every file and are checked before
    anything is loaded, and torch.load does not check the CRC (torch/serialization.py set_crc32_options): the CRC is
    a second, slower checksum of the same bytes (0.77 vs 0.34 s of CPU to save 700 MB here, bench figures in README),
    taken from the training's cores while an async save overlaps it. torch 2.13 keeps set_crc32_options per thread
    (torch/utils/_config_module.py:53, a ContextVar at :351), so it would reach neither DCP's extra writer threads nor
    the async save's thread: the setting's default is changed too, which every thread reads; where torch has no such
    entry, only this thread's saves skip the CRC (slower, never wrong). Left off afterwards: an async write goes on
    after save returns. Tools that unzip the records themselves will report CRC errors."""
    torch.serialization.set_crc32_options(False)
    from torch.utils.serialization import config

    entry = getattr(config, "_config", {}).get("save.compute_crc32")
    if entry is not None and hasattr(entry, "default"):
        entry.default = False


def write_state(state: dict[str, Any], tmp: Path, *, no_dist: bool, threads: int | None = None) -> Metadata:
    """A synchronous DCP save of `state` into `tmp`, held to all_written."""
    errors = writer_thread_errors()
    return all_written(dcp.save(state, storage_writer=_writer(tmp, threads), no_dist=no_dist), errors.take())


def _fsync_each(paths: list[Path]) -> None:
    for path in paths:
        fsync_path(path)


class SavePath(Retention):
    """save, and the async save's completion (pending, wait); each save is finalised, then pruned."""

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, consumed: int
    ) -> None:
        """Checkpoint the state after `step` steps: blocks until durable, or (async) until staged in memory."""
        started = time.perf_counter()
        self.wait()  # one save at a time: the previous one is finalised (or has failed) before the next starts
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        try:
            if self.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.is_symlink():  # not ours: removed as a link, never written through
                    tmp.unlink()
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "rng").mkdir(parents=True)
                if self.hf_config is not None:
                    create_durably(tmp / MODEL_CONFIG, json.dumps(self.hf_config, indent=1).encode())
                create_durably(tmp / IDENTITY, json.dumps(self.identity, indent=1).encode())
        except OSError as exc:
            error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._barrier()
        state = app_state(model, optimizer, scheduler, step, consumed)
        try:
            without_torch_crc32()
            buf = _torch_bytes(rng_state())
            create_durably(tmp / "rng" / f"rank_{self.rank:05d}.pt", buf)
            if self.async_save:
                if self._stager is None:  # kept: the next save copies into the same host buffers (no page faults)
                    self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                                use_async_staging=False, use_non_blocking_copy=False))
                errors = writer_thread_errors()
                written = _as_future(dcp.async_save(
                    state, storage_writer=_writer(tmp), process_group=self._pg,
                    async_stager=self._stager, no_dist=self.world_size == 1))
                if self._hasher is None:
                    self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-digests")
                self._pending = (step, self._hasher.submit(self._hash_when_written, written, tmp, errors))
            else:
                write_state(state, tmp, no_dist=self.world_size == 1)
        except SaveErrors as exc:  # OSError, or DCP's CheckpointException wrapping one
            error = exc
        if not self._all_ok(error is None):
            self._pending = None
            self._fail(step, tmp, error)
        if not self.async_save:
            self._finalize(step)
        self.last_stall_s = time.perf_counter() - started

    @property
    def pending(self) -> Future[Any] | None:
        """The running async save's future (None when none runs)."""
        return None if self._pending is None else self._pending[1]

    def pending_not_done(self) -> int:
        """1 when this rank's async save is still writing (for the step-boundary all_reduce), else 0."""
        return int(self._pending is not None and not self._pending[1].done())

    def finish_pending(self) -> None:
        """Finalise an async save that every rank reported done (call on all ranks)."""
        if self._pending is not None:
            self.wait()

    def wait(self) -> None:
        """Block until the pending async save (if any) is written, then finalise it; raises CheckpointError."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        error: BaseException | None = None
        own: dict[str, dict[str, Any]] | None = None
        try:
            own = future.result()
        except SaveErrors as exc:
            error = exc
        tmp = self.root / f"{TMP_PREFIX}{step_dir(self.root, step).name}"
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self._finalize(step, own)

    def _hash_when_written(self, written: Future[Any], tmp: Path,
                           errors: WriterThreadErrors) -> dict[str, dict[str, Any]]:
        """Background thread of an async save: wait for DCP's write, then hash this rank's files."""
        all_written(written.result(), errors.take())
        return self._hash_own(tmp)

    def _own_files(self, tmp: Path) -> list[Path]:
        """The files this rank wrote: its DCP shards (`__<rank>_<n>.distcp`: FileSystemWriter's naming, torch 2.13
        distributed/checkpoint/filesystem.py:666 and :690) and RNG state; rank 0 also the metadata and config files.
        Rank 0 hashes whatever else it finds, so another naming costs time, never coverage."""
        own = [tmp / "rng" / f"rank_{self.rank:05d}.pt", *sorted(tmp.glob(f"__{self.rank}_*.distcp"))]
        if self.is_main:
            own += [tmp / name for name in (".metadata", MODEL_CONFIG, IDENTITY)]
        return [p for p in own if p.is_file()]

    def _hash_own(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Digests of this rank's files, while another thread fsyncs them: the hashing (CPU, from the page cache)
        overlaps the flush to disk (waiting on the device), each file fsynced once, by the rank that wrote it."""
        t0 = time.perf_counter()
        own = self._own_files(tmp)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-fsync") as flusher:
            flushed = flusher.submit(_fsync_each, own)
            digests = file_digests(own)
            flushed.result()
        self.last_hash_s = time.perf_counter() - t0
        return {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "digest": h} for p, h in digests.items()}

    def _finalize(self, step: int, own: dict[str, dict[str, Any]] | None = None) -> None:
        """After every rank's data is written and hashed (`own`: this rank's digests; None: hash them now), rank 0
        fsyncs, renames and writes the marker."""
        final = step_dir(self.root, step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        error: BaseException | None = None
        if own is None:
            try:
                own = self._hash_own(tmp)
            except OSError as exc:
                error, own = exc, {}
        listings = self._gather(own)
        if self.is_main and error is None:
            try:
                files: dict[str, dict[str, Any]] = {}
                for listing in listings:
                    files.update(listing)
                on_disk = sorted(p for p in tmp.rglob("*") if p.is_file())
                rest = [p for p in on_disk if str(p.relative_to(tmp)) not in files]
                files |= {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "digest": h}
                          for p, h in file_digests(rest).items()}
                for p in rest:  # the listed files were fsynced by the ranks that wrote them (_hash_own)
                    fsync_path(p)
                for d in {tmp, *(p.parent for p in on_disk)}:
                    fsync_path(d, directory=True)
                self._clear_slot(final)
                os.rename(tmp, final)
                fsync_path(self.root, directory=True)
                marker = make_marker(step, files, world_size=self.world_size, layout=self.layout)
                create_durably(final / DONE, json.dumps(marker, indent=1).encode())
                fsync_path(final, directory=True)
                self._intact[final] = (final / DONE).stat().st_mtime_ns
            except OSError as exc:
                error = exc
        if not self._all_ok(error is None):
            self._fail(step, tmp, error)
        self.saved_step = step
        if self.is_main:
            size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
            self.log(f"checkpoint: saved {final} ({size / 2**20:.1f} MiB)")
            self.prune()

    def _fail(self, step: int, tmp: Path, error: BaseException | None) -> None:
        """Remove the partial save (frees the space it took) and raise one clear error on every rank."""
        full = _disk_full(self.root)
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(self.root)
        kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier checkpoint"
        reason = root_cause(error) if error is not None else "another rank failed"
        if full and "No space left" not in reason:
            reason = f"{full} ({reason})"
        raise CheckpointError(
            f"saving the checkpoint of step {step} in {self.root} failed: {reason}; {kept}. "
            "Free space there (or point exp_manager.explicit_log_dir at a larger filesystem) and restart: the run "
            "resumes from the newest complete checkpoint"
        )


def _as_future(response: Any) -> Future[Any]:
    """dcp.async_save returns a Future, or an AsyncSaveResponse holding one (upload_completion)."""
    return response if isinstance(response, Future) else response.upload_completion


def _disk_full(path: Path) -> str:
    """'No space left on device: ...' when the filesystem of `path` is (nearly) full, else ''.

    torch.save into a full disk reports a zip-writer position error rather than ENOSPC, so say it ourselves.
    """
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return ""
    if usage.free < max(16 * 2**20, usage.total // 1000):
        return f"No space left on device: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} MiB"
    return ""


def _torch_bytes(obj: Any) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
