"""The user-error type and the exit codes every command shares (the bottom of the import graph: imports nothing)."""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # bad config, override or environment: one line on stderr names the key


class ConfigError(Exception):
    """Bad user input: `key` is the dotted config key (or file, option, variable) to fix, `message` what is wrong."""

    def __init__(self, key: str, message: str) -> None:
        key, message = _one_line(key), _one_line(message)  # a user error is one line, whatever input it quotes
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# Every character str.splitlines() breaks at (\n, \r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028, \u2029).
_LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode()
                              for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)
