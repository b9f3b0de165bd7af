"""glibc malloc settings for CPU runs: keep freed memory for reuse instead of handing it back.

A DiT forward on a CPU allocates and frees tensors of tens of MB per op. glibc serves blocks
above its mmap threshold (32 MB at most) with fresh pages and unmaps them when they are freed,
so every such tensor pays one page fault per 4 KB the first time it is written. On a 2-core
machine that was about 40% of a bf16 sampling step of DiT-MoE-S/2 (`benchmarks/moe_bench.py
--device cpu --only sample --default-malloc` against the default run). With mmap off and no
trimming, freed blocks stay in the heap and the next op reuses them.

The price: the process keeps the heap it once needed (its resident size does not shrink after
a peak). `DITMOE_MALLOC=default` leaves glibc alone. No effect outside Linux / glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and never trim it; True if it took effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DITMOE_MALLOC", "") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


__all__ = ["keep_freed_memory"]
