"""scripts/setup.sh: the user picks the PyTorch build (package spec and index) by environment variables."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def _dry_run(**env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFTUNE_")}
    full.update(env, PREFTUNE_SETUP_DRY_RUN="1")
    out = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_default_installs_the_pinned_torch_from_pips_own_index() -> None:
    assert _dry_run() == [
        "+ python -m pip install -q torch==2.13.0",
        "+ python -m pip install -q -e .[dev]",
    ]


def test_index_and_spec_are_the_users_choice() -> None:
    cmds = _dry_run(PREFTUNE_TORCH="torch==2.9.1", PREFTUNE_TORCH_INDEX="https://example.invalid/whl/cpu")
    assert cmds[0] == "+ python -m pip install -q torch==2.9.1 --index-url https://example.invalid/whl/cpu"
