"""The package's size rules: a function over 60 lines or a module over 400 lines says why in its docstring.

A long function or file is sometimes the most readable shape (a flat list of rules, a model read in one sitting);
then its docstring carries a line "Over 60 lines: ..." / "Over 400 lines: ...". Without one, split it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "llama3_hyperpod"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _has_reason(doc: str | None, limit: int) -> bool:
    return doc is not None and f"Over {limit} lines:" in doc


def test_long_modules_say_why() -> None:
    unexplained = []
    for path in _modules():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES and not _has_reason(ast.get_docstring(ast.parse(source)), MAX_MODULE_LINES):
            unexplained.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not unexplained, unexplained


def test_long_functions_say_why() -> None:
    unexplained = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _has_reason(ast.get_docstring(node), MAX_FUNCTION_LINES):
                    unexplained.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not unexplained, unexplained


def test_the_rule_sees_a_long_function(tmp_path: Path) -> None:
    """The walk counts decorated and nested functions too (a rule that never fires is not a rule)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    tree = ast.parse(f"def outer():\n    def inner():\n{body.replace('    ', '        ')}\n    return inner\n")
    lengths = {n.name: (n.end_lineno or 0) - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert lengths["inner"] > MAX_FUNCTION_LINES and lengths["outer"] > MAX_FUNCTION_LINES
