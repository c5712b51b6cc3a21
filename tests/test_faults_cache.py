"""Processes and files the data layer leaves behind: tokenizer workers die with their parent, temp
files of dead cache writers are removed, and one cache variable ($PREFTUNE_CACHE) places both caches."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from preftune import paths
from preftune.data import cache
from preftune.data.tokenize import Tokenized

SRC = Path(__file__).resolve().parents[1] / "src"


def _running(pid: int) -> bool:
    """A live process (a zombie that nobody reaps yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_tokenizer_workers_exit_when_the_parent_is_killed(tmp_path: Path) -> None:
    parent = textwrap.dedent(
        f"""
        import os, time
        import preftune.data.tokenize as tk

        def busy(records, formatter, trunc, kind, path):  # a worker in the middle of a long chunk
            open(os.path.join({str(tmp_path)!r}, str(os.getpid())), "w").close()
            time.sleep(120)

        tk.tokenize_serial = busy
        tk.tokenize_records(list(range(4)), None, tk.Truncation(), "pairwise", num_proc=2)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], env={**os.environ, "PYTHONPATH": str(SRC)})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name) for p in tmp_path.iterdir()]
        assert len(workers) == 2 and all(_running(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(w) for w in workers)  # before: they slept on (or blocked forever)
    finally:
        proc.kill()
        for w in workers:
            if _running(w):
                os.kill(w, signal.SIGKILL)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(folder: Path, pid: int | None, age_s: float, rand: str) -> Path:
    name = f"{'ab' * 16}{cache.SUFFIX}." + (f"{pid}." if pid is not None else "") + f"{rand}.tmp"
    path = folder / name
    path.write_bytes(b"half a cache file")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_temp_files_of_dead_writers_are_removed_and_live_ones_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = _dead_pid()
    left_over = _temp(tmp_path, dead, age_s=120, rand="k3x_9q2z")
    just_killed = _temp(tmp_path, dead, age_s=1, rand="p0q8w1ab")  # removed once a minute old
    live = _temp(tmp_path, os.getppid(), age_s=3600, rand="zz81mm_x")  # its writer still runs
    legacy_old = _temp(tmp_path, None, age_s=2 * 24 * 3600, rand="legacy12")  # no pid in the name
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    written: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:  # the name save() writes under, seen while it writes
        written.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    data = Tokenized.build("pairwise", [[1, 2], [3], [4]], [2], [1], [{}])
    target = cache.cache_file(tmp_path, "ab" * 16)
    cache.save(target, data, {"rows": 1})
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {just_killed.name, live.name, other.name, target.name}
    assert not left_over.exists() and not legacy_old.exists()
    mine = [n for n in written if n not in (just_killed.name, live.name, other.name)]
    assert len(mine) == 1 and mine[0].startswith(f"{target.name}.{os.getpid()}.")
    loaded = cache.load(target)
    assert loaded is not None and np.array_equal(loaded[0].tokens, data.tokens)


def test_one_cache_variable_places_both_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from preftune.models.reference import default_cache_dir as reference_dir

    monkeypatch.delenv("PREFTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "c"))
    assert cache.default_cache_dir() == tmp_path / "c" / "tokenized"
    assert reference_dir() == tmp_path / "c" and reference_dir(str(tmp_path / "x")) == tmp_path / "x"
    monkeypatch.delenv("PREFTUNE_CACHE")
    assert cache.default_cache_dir() == Path.home() / ".cache" / "preftune" / "tokenized"
    assert reference_dir() == Path.home() / ".cache" / "preftune"
    # The older spelling still works, with one warning; it never overrides $PREFTUNE_CACHE.
    paths._warn_old_variable.cache_clear()
    monkeypatch.setenv("PREFTUNE_CACHE_DIR", str(tmp_path / "old"))
    with caplog.at_level(logging.WARNING, logger="preftune"):
        assert cache.default_cache_dir() == tmp_path / "old" / "tokenized"
        assert reference_dir() == tmp_path / "old"
        monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "c"))
        assert cache.default_cache_dir() == tmp_path / "c" / "tokenized"
    assert [r.getMessage() for r in caplog.records] == [
        "$PREFTUNE_CACHE_DIR is deprecated; set $PREFTUNE_CACHE instead (the cache root; tokenized "
        "data goes to its tokenized/ folder)",
        "$PREFTUNE_CACHE_DIR is deprecated and ignored: $PREFTUNE_CACHE is set (the cache root; "
        "tokenized data goes to its tokenized/ folder)",
    ]


def test_help_and_docs_name_one_cache_variable(capsys: pytest.CaptureFixture[str]) -> None:
    from preftune.cli import main

    for argv in (["train", "--help"], ["data", "prepare", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "$PREFTUNE_CACHE" in text and "PREFTUNE_CACHE_DIR" not in text
    docs = Path(__file__).resolve().parents[1] / "docs"
    for page in docs.glob("*.md"):
        for line in page.read_text(encoding="utf-8").splitlines():
            if "PREFTUNE_CACHE_DIR" in line:
                assert "deprecated" in line, f"{page.name}: {line}"
