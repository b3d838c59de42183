"""bench/measure.py steady_heap: glibc reuses a freed large block instead of mapping and page-faulting it afresh.

Each case runs in a fresh interpreter (the setting is process-wide and cannot be undone): a 64 MB tensor is
allocated, touched and freed ten times while small allocations interleave, as a training step's do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = 64 * 2**20 // 4096


def _faults_per_round(steady: bool) -> tuple[bool, list[int]]:
    code = f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from bench.measure import steady_heap
        kept = steady_heap() if {steady} else False
        import torch
        faults = []
        for _ in range(10):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            big = torch.zeros(16 * 2**20)  # 64 MB, every page written
            small = [torch.ones(1000) for _ in range(8)]
            del big
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(json.dumps([kept, faults]))
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept, faults = json.loads(proc.stdout.strip().splitlines()[-1])
    return kept, faults


def test_steady_heap_reuses_a_freed_block_where_glibc_maps_it_again() -> None:
    kept, steady = _faults_per_round(True)
    _, default = _faults_per_round(False)
    assert kept, "steady_heap changed nothing on this (glibc, Linux) machine"
    # The heap settles within a few rounds; from then on the block is reused: (almost) no page is faulted in again.
    assert max(steady[-4:]) <= 0.05 * PAGES, steady
    # glibc's default maps the block afresh every round (4 KiB faults, or 2 MiB ones where THP is always on).
    assert min(default[-4:]) >= 10 * max(1, *steady[-4:]), (default, steady)
