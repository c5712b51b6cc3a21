"""The C allocator's setting for CPU training: glibc's `mallopt(M_MMAP_THRESHOLD, ...)` through ctypes.

Tensors on the CPU live in blocks from the C library's `malloc`. glibc serves a block below its
*mmap threshold* from its heap, and keeps it there when freed for the next allocation to reuse; a
block at or above it is mapped from the system on its own and unmapped when freed. By default the
threshold is dynamic: each freed mapped block raises it to that block's size (up to 32 MiB on 64-bit).
After the first training step has freed its activations, the next steps' buffers of up to 32 MiB
therefore come from the heap — and a step's differently sized chunks do not fit the holes the last
one left, so the heap keeps growing: the process's resident high-water mark rose through the first
steps of a DPO run although every step holds the same tensors (docs/performance.md).

`apply_mmap_threshold(mib)` fixes the threshold (which also ends the dynamic adjustment): blocks of
`mib` MiB or more go back to the system when freed. It is a process-wide setting that stays for the
rest of the process (glibc has no call to read it back). It does nothing off Linux/glibc, with
`mib` 0, or where the environment already sets `MALLOC_MMAP_THRESHOLD_` (the user's setting wins).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

M_MMAP_THRESHOLD = -3  # glibc malloc.h
ENV_SETTING = "MALLOC_MMAP_THRESHOLD_"


def glibc() -> Any | None:
    """The process's C library when it is glibc (it has `gnu_get_libc_version` and `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: their malloc has neither the threshold nor its dynamic rise
    return libc


def apply_mmap_threshold(mib: float) -> bool:
    """Set glibc's mmap threshold to `mib` MiB (see the module docstring). Returns whether it was set."""
    if mib <= 0 or os.environ.get(ENV_SETTING):
        return False
    libc = glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mib * 2**20)))


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim(0)`): the memory a run's
    freed tensors left in the heap, which glibc keeps resident for reuse. Returns whether any was
    released; False off glibc.

    Called once after training, before the report: its imports and plots (matplotlib, ~26 MiB) then
    reuse released memory instead of raising the run's resident high-water mark above training's.
    """
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return bool(libc.malloc_trim(0))
