"""The repository carries its own documentation: no file points at design notes kept outside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = [name + ".md" for name in ("ALGORITHMS", "DESIGN", "ONLINE", "DIFFUSION", "STYLE")] + [
    "../" + "shared",
    "shared" + "/",
]


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file outside hidden folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [ROOT / line for line in out.splitlines() if line and (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".bench-venv", "__pycache__", "runs"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_cites_notes_outside_the_repository():
    hits = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            hits += [f"{path.relative_to(ROOT)}:{lineno}: {name}" for name in OUTSIDE if name in line]
    assert not hits, "cite docs/algorithms.md or a paper instead:\n" + "\n".join(hits)


def test_the_algorithms_page_exists_and_is_linked():
    page = ROOT / "docs" / "algorithms.md"
    assert page.is_file() and "## 6. Reduction and invariants" in page.read_text(encoding="utf-8")
    assert "docs/algorithms.md" in (ROOT / "README.md").read_text(encoding="utf-8")
