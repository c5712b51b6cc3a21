"""The data package imports in one direction: each module only from the modules before it in
`preftune.data.MODULES` (readers → records → validation → formatting → tokens), lazy imports included."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import preftune.data
from preftune.data import MODULES

HERE = Path(preftune.data.__file__).parent


def data_imports(name: str) -> set[str]:
    """The `preftune.data` modules that module `name` imports anywhere in its source."""
    tree = ast.parse((HERE / f"{name}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "preftune.data":
                found.update(a.name for a in node.names if a.name in MODULES)
            elif node.module.startswith("preftune.data."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("preftune.data."))
    return found


def test_every_module_is_placed_in_the_order():
    on_disk = {p.stem for p in HERE.glob("*.py")} - {"__init__"}
    assert set(MODULES) == on_disk and len(MODULES) == len(set(MODULES))


def test_no_module_imports_a_later_one():
    later = {
        name: sorted(m for m in data_imports(name) if MODULES.index(m) >= MODULES.index(name))
        for name in MODULES
    }
    assert {k: v for k, v in later.items() if v} == {}


def test_the_checker_sees_imports():
    # The ast reader finds both top-level and lazy imports (a checker that sees nothing passes anything).
    assert {"rows", "tabular"} <= data_imports("sources")
    assert "validate" in data_imports("pipeline") and "rows" in data_imports("checks")


def test_modules_import_in_order_in_a_fresh_interpreter():
    code = "; ".join(f"import preftune.data.{m}" for m in MODULES)
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(HERE.parents[1])})
    for m in MODULES:
        importlib.import_module(f"preftune.data.{m}")
