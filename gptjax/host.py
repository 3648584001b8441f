"""The host process's memory allocator, set for XLA:CPU's per-step buffers.

glibc's malloc serves each allocation of 128 KiB or more with its own mmap and returns it
to the kernel when freed, and trims the heap's free top. XLA:CPU allocates a step's
temporaries afresh on every call (a 278 MB buffer per gpt2_4l train step), so each step
page-faults all of it again: ~68k page faults and ~160 ms of kernel time per step
(BUILD.md, Performance on CPU). `keep_freed_memory` makes malloc keep what is freed for
the next step: the same arithmetic on the same values, only the page faults go. It is
opt-in (`bench --keep_freed_memory`): one heap for all threads also serialises XLA's
concurrent allocations, and a PPO iteration got slower with it (BUILD.md).
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (
    (_M_MMAP_MAX, 0),  # large blocks from the heap, not a fresh mmap each
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the heap's free top back to the kernel
    (_M_TOP_PAD, 256 << 20),  # grow the heap 256 MiB at a time
    (_M_ARENA_MAX, 1),  # one heap for all threads, so a freed buffer is found again
)


def keep_freed_memory() -> bool:
    """Sets glibc malloc to keep freed memory (call first thing in a process, before JAX
    starts its threads). Returns False, changing nothing, where libc is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
