"""The one error type of data preparation: bad input the user can fix (CLI exit code 2, one line)."""

from __future__ import annotations

from llama3_hyperpod.config import ConfigError


class DataError(ConfigError):
    """Bad data input: `key` names the file, option or dataset to fix; a ConfigError so the CLI treats it alike."""
