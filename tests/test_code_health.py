"""A guard on the size of the code: no function in src/preftune over 100 lines, no file over 600.

The house rule is ~80 lines a function and ~400 a file; these limits are looser so that the guard only
stops the slow creep past them. A function is measured from its `def` line to its last line (its
decorators not counted), a file by its lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "preftune"
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 600

# "path relative to src/preftune[:function]" → (the most lines it may have, why it is over the limit).
EXCEPTIONS: dict[str, tuple[int, str]] = {}


def function_lengths(source: str) -> dict[str, int]:
    """Lines from `def` to the end of every function and method in `source`, by dotted name
    (a nested function or a method is named after what holds it: `Class.method`, `outer.inner`)."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    assert child.end_lineno is not None
                    lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def oversized() -> dict[str, int]:
    """Every file over `MAX_FILE_LINES` lines and function over `MAX_FUNCTION_LINES` in src/preftune."""
    found: dict[str, int] = {}
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(SRC).as_posix()
        if len(source.splitlines()) > MAX_FILE_LINES:
            found[where] = len(source.splitlines())
        for name, lines in function_lengths(source).items():
            if lines > MAX_FUNCTION_LINES:
                found[f"{where}:{name}"] = lines
    return found


def test_function_lengths_count_from_def_to_the_last_line() -> None:
    source = (
        "@decorator\n"  # 1: not counted
        "def f(x):\n"  # 2
        "    def inner():\n"  # 3
        "        return 1\n"  # 4
        "    return inner()\n"  # 5
        "class C:\n"  # 6
        "    async def m(self):\n"  # 7
        "        pass\n"  # 8
    )
    assert function_lengths(source) == {"f": 4, "f.inner": 2, "C.m": 2}


def test_no_function_or_file_creeps_past_the_limits() -> None:
    over = {k: n for k, n in oversized().items() if n > EXCEPTIONS.get(k, (0, ""))[0]}
    assert not over, (
        f"over {MAX_FUNCTION_LINES} lines a function / {MAX_FILE_LINES} a file (split it into named "
        f"parts, or list it in EXCEPTIONS with the reason): {over}"
    )


def test_every_exception_names_a_file_or_function_that_exists() -> None:
    for key in EXCEPTIONS:
        where, _, name = key.partition(":")
        path = SRC / where
        assert path.is_file(), f"EXCEPTIONS: no file src/preftune/{where}"
        assert not name or name in function_lengths(path.read_text(encoding="utf-8")), f"EXCEPTIONS: no {key}"
