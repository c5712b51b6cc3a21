"""The tokenized-data cache: one file per fingerprint, checksummed, written atomically.

File layout: MAGIC (8 bytes) | header length (8 bytes, little endian) | header JSON | body.
The body is tokens int32 | offsets int64 | branches int32 | rows int64 | extras JSON; the header
holds their sizes, the summary of the run that wrote it and a BLAKE2b checksum of the body. A file
that fails any check is reported as corrupt (the caller rebuilds it); a file is written to a
temporary name in the same folder (`FINGERPRINT.ptok.PID.RANDOM.tmp`, PID the writer's process id)
and renamed into place, so no reader sees half a file. Each write first removes the temporary files
of writers that died (see `remove_stale_temps`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.tokenize import Tokenized

MAGIC = b"PFTCACH1"
SUFFIX = ".ptok"
# A temp file untouched this long whose writer is gone is left over (a live writer keeps writing it).
STALE_AFTER_S = 60.0
LEGACY_STALE_AFTER_S = 24 * 3600.0  # temps named before the writer's pid was in the name
_TEMP = re.compile(re.escape(SUFFIX) + r"\.(?:(?P<pid>\d+)\.)?[^.]+\.tmp$")


class CacheCorrupt(Exception):
    """A cache file exists but cannot be trusted (truncated, edited, wrong format)."""


def default_cache_dir() -> Path:
    """`tokenized/` in the cache root: $PREFTUNE_CACHE/tokenized, else ~/.cache/preftune/tokenized."""
    from preftune.paths import cache_root

    return cache_root() / "tokenized"


def cache_file(cache_dir: str | Path, fingerprint: str) -> Path:
    return Path(cache_dir) / f"{fingerprint}{SUFFIX}"


def _arrays(data: Tokenized) -> list[bytes]:
    return [
        np.ascontiguousarray(data.tokens, dtype="<i4").tobytes(),
        np.ascontiguousarray(data.offsets, dtype="<i8").tobytes(),
        np.ascontiguousarray(data.branches, dtype="<i4").tobytes(),
        np.ascontiguousarray(data.rows, dtype="<i8").tobytes(),
        json.dumps(data.extras, separators=(",", ":")).encode(),
    ]


def save(path: Path, data: Tokenized, summary: dict[str, Any]) -> None:
    """Write `data` and `summary` to `path` atomically (temp file + rename)."""
    parts = _arrays(data)
    digest = hashlib.blake2b(digest_size=20)
    for p in parts:
        digest.update(p)
    header = json.dumps(
        {
            "kind": data.kind,
            "sizes": [len(p) for p in parts],
            "checksum": digest.hexdigest(),
            "summary": summary,
        }
    ).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    except (OverflowError, OSError):  # not a process id at all
        return False
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files of cache writers that died mid-write (killed, out of memory, power cut):
    those whose writer's process id is not running and that nobody has written to for STALE_AFTER_S
    (so a live writer in another process namespace sharing the folder keeps its file). A live
    writer's temp is kept. Returns the files removed."""
    removed: list[Path] = []
    now = time.time()
    try:
        candidates = [p for p in folder.iterdir() if _TEMP.search(p.name)]
    except OSError:  # no folder yet, or unreadable: nothing to clean
        return removed
    for tmp in candidates:
        pid = _TEMP.search(tmp.name).group("pid")  # type: ignore[union-attr]
        try:
            age = now - tmp.stat().st_mtime
        except OSError:  # renamed into place or removed meanwhile
            continue
        stale = age > LEGACY_STALE_AFTER_S if pid is None else age > STALE_AFTER_S and not _alive(int(pid))
        if stale:
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def load(path: Path) -> tuple[Tokenized, dict[str, Any]] | None:
    """Read a cache file: None when absent or unreadable, CacheCorrupt when it fails a check."""
    try:
        raw = path.read_bytes()
    except OSError:  # absent, or a folder we cannot read: same as no cache
        return None
    if raw[:8] != MAGIC or len(raw) < 16:
        raise CacheCorrupt("bad magic")
    hlen = int.from_bytes(raw[8:16], "little")
    try:
        header = json.loads(raw[16 : 16 + hlen])
        sizes = [int(s) for s in header["sizes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise CacheCorrupt(f"bad header ({err})") from err
    body = memoryview(raw)[16 + hlen :]
    if len(body) != sum(sizes) or len(sizes) != 5:
        raise CacheCorrupt("size mismatch")
    if hashlib.blake2b(body, digest_size=20).hexdigest() != header.get("checksum"):
        raise CacheCorrupt("checksum mismatch")
    views = []
    pos = 0
    for s in sizes:
        views.append(body[pos : pos + s])
        pos += s
    try:
        data = Tokenized(
            header["kind"],
            np.frombuffer(views[0], dtype="<i4"),
            np.frombuffer(views[1], dtype="<i8"),
            np.frombuffer(views[2], dtype="<i4"),
            np.frombuffer(views[3], dtype="<i8"),
            json.loads(bytes(views[4])),
        )
    except (ValueError, KeyError) as err:
        raise CacheCorrupt(f"bad body ({err})") from err
    if len(data.offsets) != 1 + len(data.rows) + int(data.branches.sum()) or len(data.extras) != len(
        data.rows
    ):
        raise CacheCorrupt("inconsistent arrays")
    return data, dict(header.get("summary", {}))
