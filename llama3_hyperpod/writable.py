"""Where commands write when the user named no place: the one rule for a read-only container.

Under pyxis/enroot the image's root filesystem is read-only (or writable but thrown away) and the working directory
is an image path such as /opt/app, so a relative default like `runs/` cannot be made there. Training and compiling
must not silently write checkpoints or caches into a tmpfs that vanishes with the step: they stop with one line
naming the option. `smoke`'s output is throw-away evidence, so it falls back to the temporary dir and says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llama3_hyperpod.config import ConfigError


def _problem(path: Path) -> str | None:
    """Why PATH cannot be used as an output dir (made if missing), or None when it can."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {path.absolute()} ({exc.strerror or exc})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path.absolute()} is not writable"
    return None


def require_writable_dir(path: Path, option: str) -> Path:
    """PATH, made if missing; else ConfigError naming the option to set (one line, exit 2 through the CLI)."""
    problem = _problem(path)
    if problem:
        raise ConfigError(option, f"{problem}: set {option} to a writable directory (in a container: one on a "
                          "mounted filesystem)")
    return path


def writable_or_temporary(path: Path, option: str, *, explicit: bool, purpose: str) -> tuple[Path, str | None]:
    """PATH when usable; for a default that is not, a dir under the temporary dir and a note saying so.

    A PATH the user chose is never replaced: that stays an error naming the option."""
    if explicit or _problem(path) is None:
        return require_writable_dir(path, option), None
    fallback = require_writable_dir(Path(tempfile.gettempdir()) / "llama3-hyperpod" / purpose, option)
    return fallback, (f"{path.absolute()} is not writable here (a read-only container?); writing to {fallback} "
                      f"instead (set {option} to keep the output)")


def quiet_matplotlib() -> None:
    """Point matplotlib's config/cache dir at the temporary dir when $HOME cannot hold it (enroot's empty, read-only
    home): it would make one there anyway, after two lines of warning that bury the command's own output."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "matplotlib"
    if _problem(home) is not None:
        os.environ["MPLCONFIGDIR"] = str(require_writable_dir(Path(tempfile.gettempdir()) / "llama3-hyperpod" /
                                                              "matplotlib", "MPLCONFIGDIR"))
