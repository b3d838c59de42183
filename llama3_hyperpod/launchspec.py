"""A process to launch, as data: what `plan` prints, `--dry-run` shows and `launch.run` executes."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Launch:
    """One process to start on this node: argv, the env we add, and what we kept or replaced of the caller's."""

    argv: list[str]
    env: dict[str, str]  # set for the process: names the caller left unset, plus the forced ones
    env_kept: dict[str, str]  # names we would set but the caller already had: their values stay
    cwd: str
    env_replaced: dict[str, str] = field(default_factory=dict)  # caller's values a forced name replaces
    # True when argv is the worker itself (one process on one node: no torchrun agent in between), so the launcher
    # delivers signals to it rather than to its children.
    direct: bool = False

    def shell(self) -> str:
        """The launch as one shell line (for dry runs and docs)."""
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"cd {shlex.quote(self.cwd)} && {assignments} {shlex.join(self.argv)}".replace("&&  ", "&& ")


def split_env(wanted: Mapping[str, str], env: Mapping[str, str],
              forced: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(env to set, caller's values kept, caller's values replaced): `wanted` only where unset, `forced` always."""
    added = {k: v for k, v in wanted.items() if k not in env}
    kept = {k: env[k] for k in wanted if k in env}
    forced = dict(forced or {})
    replaced = {k: env[k] for k, v in forced.items() if k in env and env[k] != v}
    return {**added, **forced}, kept, replaced
