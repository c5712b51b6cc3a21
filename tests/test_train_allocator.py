"""`malloc_mmap_threshold_mib`: glibc's mmap threshold set through mallopt (preftune.train.allocator).

The setting is process-wide and permanent, so each check runs in a fresh Python process and reads
glibc's own accounting (`mallinfo2().hblks`: blocks mapped from the system, not in the heap) while a
block is alive."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from preftune.config import TrainConfig, validate
from preftune.errors import ConfigError
from preftune.train import allocator

PROBE = r"""
import ctypes, json, sys
from preftune.train import allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = allocator.glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
MiB = 2**20

def mapped(size):
    # whether a live block of `size` bytes is mapped from the system (+1 in hblks) or in the heap
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    after = libc.mallinfo2().hblks
    libc.free(p)
    return after - before

libc.free(libc.malloc(8 * MiB))  # a freed mapped block: glibc's dynamic threshold rises to 8 MiB
out = {"default_2mib": mapped(2 * MiB)}  # from the heap, which keeps ~2 MiB free at its top
out["applied"] = allocator.apply_mmap_threshold(float(sys.argv[1]))
out["then_4mib"] = mapped(4 * MiB)  # more than the heap's free top: mapped, or the heap grows
out["then_6mib"] = mapped(6 * MiB)
out["then_512kib"] = mapped(MiB // 2)
print(json.dumps(out))
"""


def _probe(mib: float, **env: str) -> dict[str, int]:
    import json

    environ = {k: v for k, v in os.environ.items() if k != allocator.ENV_SETTING}
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(mib)],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(run.stdout)  # type: ignore[no-any-return]


needs_glibc = pytest.mark.skipif(allocator.glibc() is None, reason="glibc's malloc only")


@needs_glibc
def test_threshold_maps_blocks_above_it_and_stops_the_dynamic_rise() -> None:
    out, off = _probe(1.0), _probe(0.0)
    # before: a 2 MiB block comes from the heap, since an 8 MiB block was freed (dynamic threshold)
    assert out["default_2mib"] == off["default_2mib"] == 0
    assert out["applied"] is True and off["applied"] is False
    # a block of ≥ 1 MiB the heap cannot hold is mapped (and unmapped when freed) instead of growing
    # the heap; a freed mapped block no longer raises the threshold (6 MiB after the 4 MiB one)
    assert (out["then_4mib"], out["then_6mib"]) == (1, 1)
    assert (off["then_4mib"], off["then_6mib"]) == (0, 0)  # glibc's default: the heap grows
    assert out["then_512kib"] == off["then_512kib"] == 0  # below the threshold: the heap, as before


@needs_glibc
def test_the_environment_setting_wins() -> None:
    # the user's MALLOC_MMAP_THRESHOLD_ wins: glibc read 16 MiB at start, preftune's 1 MiB is not applied
    env = _probe(1.0, MALLOC_MMAP_THRESHOLD_=str(16 * 2**20))
    assert env["applied"] is False
    assert (env["then_4mib"], env["then_6mib"]) == (0, 0)


TRIM_PROBE = r"""
import json, re, torch
from preftune.train import allocator

def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

# 64 MiB in 32 KiB blocks (heap blocks: below glibc's smallest mmap threshold), all written, then all
# but the last freed: the last one pins the heap's top, so glibc cannot shrink the heap by itself
blocks = [torch.ones(8192) for _ in range(2048)]
last = blocks[-1]
del blocks
freed = rss()
out = {"released": allocator.release_free_heap(), "drop_mib": freed - rss(), "last": float(last[0])}
print(json.dumps(out))
"""


@needs_glibc
def test_release_free_heap_returns_freed_blocks_to_the_system() -> None:
    """64 MiB of freed heap blocks stay resident until `release_free_heap`, which drops the resident
    set by most of them (page-aligned parts of each free chunk; ≥ 48 of the 64 MiB)."""
    import json

    run = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    assert out["released"] is True and out["last"] == 1.0
    assert 48 <= out["drop_mib"] <= 70, out


def test_no_op_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.glibc() is None
    assert allocator.apply_mmap_threshold(1.0) is False
    assert allocator.release_free_heap() is False


def test_option_range() -> None:
    assert TrainConfig().malloc_mmap_threshold_mib == 0.0  # off unless asked for
    with pytest.raises(ConfigError, match="malloc_mmap_threshold_mib"):
        validate(TrainConfig(model="m", data="d", out="o", malloc_mmap_threshold_mib=64.0))
