"""Checkpoint integrity: a `checksums.json` written last, verified before anything is loaded.

`write_checksums(folder)` records the size and SHA-256 of every file of a checkpoint folder;
`verify(folder)` checks the folder against it and raises `DamagedCheckpoint` naming the first file
that is missing, has another size (truncated, empty, overwritten) or other bytes (a flipped bit, a
damaged header, garbage). A folder holding a file of the old pickle layout (`optimizer.pt`,
`scheduler.pt`, `rng.pt`) is refused with `OldCheckpointLayout` before any file is opened: unpickling
can run code, so preftune never does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from preftune.errors import TrainingError

CHECKSUMS = "checksums.json"
PICKLED = ("optimizer.pt", "scheduler.pt", "rng.pt")
# Every checkpoint has these (plus model.safetensors or adapter_model.safetensors).
REQUIRED = ("trainer_state.json", "optimizer.json", "scheduler.json", "rng.json", "loss_state.safetensors")
_CHUNK = 1 << 22


class DamagedCheckpoint(TrainingError):
    """A checkpoint file is missing or differs from what was written; `file` names it."""

    def __init__(self, folder: Path, file: str, reason: str) -> None:
        self.folder, self.file, self.reason = folder, file, reason
        super().__init__(f"checkpoint {folder / file}: {reason}")


class OldCheckpointLayout(TrainingError):
    """The checkpoint was written in the old layout whose optimizer/scheduler/RNG files are pickles."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """Write `folder/checksums.json`: size and SHA-256 of every other file in `folder`."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != CHECKSUMS
    }
    doc = {"algorithm": "sha256", "files": files}
    (folder / CHECKSUMS).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def refuse_pickles(folder: Path) -> None:
    """Raise `OldCheckpointLayout` when `folder` holds a pickled state file (never opening it)."""
    found = [name for name in PICKLED if (folder / name).exists()]
    if found:
        raise OldCheckpointLayout(
            f"checkpoint {folder} holds {', '.join(found)}: the old checkpoint layout, whose state files "
            "are pickles, which preftune does not load (unpickling can run code). Resume from a "
            "checkpoint written by this version, or start the run again"
        )


def verify(folder: Path) -> None:
    """Check every file of checkpoint `folder` against its checksums.json (see the module docstring)."""
    refuse_pickles(folder)
    if not folder.is_dir():
        raise DamagedCheckpoint(folder, "", "not a folder")
    files = _manifest(folder)
    weights = {"model.safetensors", "adapter_model.safetensors"} & files.keys()
    for name in (*REQUIRED, *(weights or {"model.safetensors"})):
        if name not in files:
            raise DamagedCheckpoint(folder, name, f"missing (not listed in {CHECKSUMS})")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(folder, name, "missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise DamagedCheckpoint(
                folder, name, f"{size} bytes, {entry['size']} were written (truncated or overwritten)"
            )
        if sha256(path) != entry["sha256"]:
            raise DamagedCheckpoint(folder, name, "checksum mismatch: its bytes changed after it was written")


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / CHECKSUMS
    if not path.is_file():
        raise DamagedCheckpoint(folder, CHECKSUMS, "missing")
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        for name, entry in files.items():
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"'{name}' is not a file name")
            if not isinstance(entry["size"], int) or not isinstance(entry["sha256"], str):
                raise ValueError(f"bad entry for '{name}'")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedCheckpoint(folder, CHECKSUMS, f"unreadable ({err})") from None
    return files  # type: ignore[no-any-return]
