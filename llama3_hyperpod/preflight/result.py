"""One check's verdict as one line, and a node's report: what `preflight` prints, writes and exits with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llama3_hyperpod.errors import EXIT_BAD_INPUT

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
STATUSES = (PASS, WARN, FAIL)


@dataclass(frozen=True)
class Check:
    """`name`: what was checked; `measured`: the figure seen here; `fix`: what to do (empty when nothing to do)."""

    name: str
    status: str
    measured: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check status {self.status!r} is not one of {STATUSES}")

    def line(self) -> str:
        text = f"{self.status}  {self.name}: {self.measured}"
        return f"{text} — {self.fix}" if self.fix else text


def passed(name: str, measured: str) -> Check:
    return Check(name, PASS, measured)


def warned(name: str, measured: str, fix: str = "") -> Check:
    return Check(name, WARN, measured, fix)


def failed(name: str, measured: str, fix: str = "") -> Check:
    return Check(name, FAIL, measured, fix)


@dataclass
class Report:
    """Every check of one node for one plan, in the order they ran."""

    node: str
    node_rank: int
    num_nodes: int
    backend: str
    device: str
    mode: str
    run_dir: str
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if c.status == FAIL), None)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else EXIT_BAD_INPUT

    def failure_line(self) -> str:
        """The one stderr line a job log shows for a failed node: which node, which check, what to do."""
        first = self.first_failure
        assert first is not None
        others = sum(c.status == FAIL for c in self.checks) - 1
        more = f" (+{others} more failed check{'s' if others > 1 else ''})" if others else ""
        return f"preflight: FAIL on {self.node} (node {self.node_rank}): {first.line()[len(FAIL) + 2:]}{more}"

    def summary_line(self) -> str:
        counts = {s: sum(c.status == s for c in self.checks) for s in STATUSES}
        verdict = "PASS" if self.ok else "FAIL"
        return (f"preflight: {verdict} on {self.node} (node {self.node_rank} of {self.num_nodes}, {self.backend}/"
                f"{self.device}, {self.mode}): {counts[PASS]} passed, {counts[WARN]} warned, {counts[FAIL]} failed "
                f"in {self.seconds:.2f} s")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        data["lines"] = [c.line() for c in self.checks]
        return data
