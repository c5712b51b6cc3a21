"""The reference log-prob cache on disk: a folder per reference fingerprint, append-only checksummed shards.

    CACHE/reference/<fingerprint>/<time>-<host>-<pid>-<n>.pref   a shard: entries written in one go
    CACHE/reference/<fingerprint>/damaged/                       shards that failed a check, set aside
    CACHE/reference/<fingerprint>/.lock                          shared by readers, exclusive to compaction

A shard is MAGIC (8 bytes) | header length (8 bytes, little endian) | header JSON | body, the body
being keys uint8 [n, 16] | logps float32 [n] | lengths int64 [n] | has_tok uint8 [n] |
tok_offsets int64 [n + 1] | tok_values float32 [m]; the header holds the fingerprint, n, the part
sizes and a BLAKE2b checksum of the body. A shard is written under a temporary name in the same
folder and renamed into place, and never changed afterwards, so runs that share a cache only ever
add shards: none overwrites another's entries. A shard that fails a check is named, moved to
`damaged/` and its entries are recomputed by whoever needs them. Temporary files whose writer process
is dead (on this host) are removed. Past COMPACT_AT shards, the writing process merges them into one.

Reading several shards: the first shard in name (= time) order that holds a key gives its log-prob
and length, the first that holds per-token values gives those; adding shards never changes a value
already read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import count
from pathlib import Path

import numpy as np
import torch

from preftune.data.cache import _alive  # the tokenized cache's check: is a writer's process running

MAGIC = b"PFTREF01"
SUFFIX = ".pref"

Entry = tuple[float, int, "torch.Tensor | None"]  # (summed log-prob, length, per-token log-probs | None)

_counter = count()
COMPACT_AT = 256  # shards of one fingerprint beyond which the writing process merges them on reading


@contextmanager
def _lock(folder: Path, *, exclusive: bool) -> Iterator[bool]:
    """`flock` on FOLDER/.lock: shared for readers (waits), exclusive for compaction (gives up at once).
    Writers create the file, readers never (reading never changes the cache). Yields whether it is
    held; a reader goes on unlocked where there is no lock file."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY, 0o644)
    except OSError:
        yield not exclusive
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class ShardDamaged(Exception):
    """A shard exists but cannot be trusted (truncated, edited, flipped bytes, wrong fingerprint)."""


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def encode(fingerprint: str, entries: list[tuple[bytes, Entry]]) -> bytes:
    """The bytes of one shard holding `entries` (key, (logp, length, tok | None))."""
    toks = [
        e[2].detach().float().cpu().numpy() if e[2] is not None else np.zeros(0, "<f4") for _, e in entries
    ]
    offsets = np.cumsum([0] + [len(t) for t in toks]).astype("<i8")
    parts = [
        b"".join(k for k, _ in entries),
        np.asarray([e[0] for _, e in entries], dtype="<f4").tobytes(),
        np.asarray([e[1] for _, e in entries], dtype="<i8").tobytes(),
        np.asarray([e[2] is not None for _, e in entries], dtype="u1").tobytes(),
        offsets.tobytes(),
        (np.concatenate(toks).astype("<f4") if toks else np.zeros(0, "<f4")).tobytes(),
    ]
    body = b"".join(parts)
    header = json.dumps(
        {
            "fingerprint": fingerprint,
            "count": len(entries),
            "sizes": [len(p) for p in parts],
            "checksum": hashlib.blake2b(body, digest_size=20).hexdigest(),
        }
    ).encode()
    return MAGIC + len(header).to_bytes(8, "little") + header + body


def decode(raw: bytes, fingerprint: str) -> list[tuple[bytes, Entry]]:
    """The entries of a shard's bytes; ShardDamaged when any check fails."""
    if len(raw) < 16 or raw[:8] != MAGIC:
        raise ShardDamaged("not a reference-cache shard (bad magic)")
    hlen = int.from_bytes(raw[8:16], "little")
    try:
        header = json.loads(raw[16 : 16 + hlen])
        n, sizes = int(header["count"]), [int(s) for s in header["sizes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ShardDamaged(f"bad header ({err})") from err
    if header.get("fingerprint") != fingerprint:
        raise ShardDamaged(f"written for another reference model ({header.get('fingerprint')})")
    body = memoryview(raw)[16 + hlen :]
    expected = [16 * n, 4 * n, 8 * n, n, 8 * (n + 1)]
    if len(sizes) != 6 or sizes[:5] != expected or sizes[5] % 4 or len(body) != sum(sizes):
        raise ShardDamaged("truncated or wrong sizes")
    if hashlib.blake2b(body, digest_size=20).hexdigest() != header.get("checksum"):
        raise ShardDamaged("checksum mismatch")
    bounds = np.cumsum([0] + sizes)
    part = [body[bounds[i] : bounds[i + 1]] for i in range(6)]
    keys = bytes(part[0])
    logps = np.frombuffer(part[1], dtype="<f4")
    lengths = np.frombuffer(part[2], dtype="<i8")
    has_tok = np.frombuffer(part[3], dtype="u1")
    offsets = np.frombuffer(part[4], dtype="<i8")
    values = np.frombuffer(part[5], dtype="<f4")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != len(values):
        raise ShardDamaged("inconsistent per-token offsets")
    out: list[tuple[bytes, Entry]] = []
    for i in range(n):
        tok = torch.from_numpy(values[offsets[i] : offsets[i + 1]].copy()) if has_tok[i] else None
        out.append((keys[16 * i : 16 * (i + 1)], (float(logps[i]), int(lengths[i]), tok)))
    return out


def merge(table: dict[bytes, Entry], key: bytes, entry: Entry) -> bool:
    """Add `entry` under the module's rule (first log-prob wins, first per-token values win); True if
    the table changed."""
    have = table.get(key)
    if have is None:
        table[key] = entry
        return True
    if have[2] is None and entry[2] is not None:
        table[key] = (have[0], have[1], entry[2])
        return True
    return False


class ReferenceStore:
    """The shards of one reference fingerprint: read (verified), append, set aside, clean up."""

    def __init__(self, root: Path, fingerprint: str, log: Callable[[str], None] = print) -> None:
        self.root, self.fingerprint, self.log = root, fingerprint, log
        self.folder = root / fingerprint
        self.writable = True

    def shards(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file())

    def load(self, wanted: set[bytes] | None = None, *, compact: bool = False) -> dict[bytes, Entry]:
        """Every verified entry (only the keys in `wanted`, when given); damaged shards are set aside.
        Read under a shared lock, so that no compaction removes a shard while it is read; `compact`:
        then merge the shards when there are more than COMPACT_AT."""
        self.remove_stale_temp_files()
        table: dict[bytes, Entry] = {}
        with _lock(self.folder, exclusive=False):
            paths = self.shards()
            for _, entries in self._read(paths):
                for key, entry in entries:
                    if wanted is None or key in wanted:
                        merge(table, key, entry)
        if compact and len(paths) > COMPACT_AT:
            self.compact()
        return table

    def _read(self, paths: list[Path]) -> Iterator[tuple[Path, list[tuple[bytes, Entry]]]]:
        for path in paths:
            try:
                yield path, decode(path.read_bytes(), self.fingerprint)
            except FileNotFoundError:
                continue
            except (ShardDamaged, OSError) as err:
                self._set_aside(path, str(err))

    def compact(self) -> None:
        """Merge every shard into one (a run that computes per batch writes a shard per batch), under
        the exclusive lock — skipped when a reader holds the folder. The merged shard takes the first
        one's place in name order and holds the values the merge rule picked, so readers see the same
        values before and after; shards written meanwhile are left alone."""
        with _lock(self.folder, exclusive=True) as held:
            if not held or not self.writable:
                return
            merged: dict[bytes, Entry] = {}
            done = []
            for path, entries in self._read(self.shards()):
                done.append(path)
                for key, entry in entries:
                    merge(merged, key, entry)
            if len(done) < 2 or self.append(merged.items(), name=f"{done[0].stem}-m{SUFFIX}") is None:
                return
            for path in done:
                try:
                    path.unlink()
                except OSError:
                    pass

    def _set_aside(self, path: Path, reason: str) -> None:
        target = self.folder / "damaged" / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
            where = f"moved to {target}"
        except OSError:
            where = "left in place (cannot move it), ignored"
        self.log(f"reference cache: {path} is damaged ({reason}); {where}; its entries are recomputed")

    def append(self, entries: Iterable[tuple[bytes, Entry]], name: str | None = None) -> Path | None:
        """Write `entries` as a new shard (temp file + rename). A read-only or full disk is said once and
        training goes on: the values are in memory."""
        items = list(entries)
        if not items or not self.writable:
            return None
        name = name or f"{time.time_ns():020d}-{_host()}-{os.getpid()}-{next(_counter):06d}{SUFFIX}"
        path, tmp = self.folder / name, self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not (self.folder / ".lock").exists():  # made by the first writer: readers lock from then on
                (self.folder / ".lock").touch()
            with open(tmp, "wb") as fh:
                fh.write(encode(self.fingerprint, items))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as err:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self.writable = False
            self.log(
                f"reference: could not write to the cache {self.folder} ({err.strerror or err}); "
                "continuing without it"
            )
            return None
        return path

    def remove_stale_temp_files(self) -> None:
        """Remove temporary files left by writers (on this host) that are no longer running, in this
        fingerprint's folder and in the folder above (the single-file layout's `.FP.safetensors.PID.tmp`)."""
        host = _host()
        candidates = [*self.folder.glob(".*.tmp"), *self.root.glob(".*.tmp")] if self.root.is_dir() else []
        for tmp in candidates:
            parts = tmp.name[1:].rsplit(
                ".", 2
            )  # NAME.pref.tmp → [stem, 'pref', 'tmp'] / FP.safetensors.PID.tmp
            fields = parts[0].split("-") if parts[-2] == SUFFIX[1:] else None
            if fields is not None and len(fields) >= 4 and fields[2].isdigit():
                owner_host, pid = fields[1], int(fields[2])
            elif parts[-2].isdigit():
                owner_host, pid = host, int(parts[-2])
            else:
                continue
            if owner_host == host and not _alive(pid):
                try:
                    tmp.unlink()
                except OSError:
                    pass
