"""Keep freed memory for reuse: the CPU allocator setting that makes large-activation loops ~1.5x faster.

On CPU every torch tensor comes from the C library's malloc. glibc serves blocks above its mmap
threshold (at most 32 MB when adapting by itself) with a fresh mmap and returns them to the OS
when freed, so every new large tensor pays a page fault per 4 KiB page and the kernel's zeroing
of it. MTT's width-128 ConvNet on a batch of 256 makes 134 MB activations: measured on the
2-core box, a plain multiply of such a tensor took 60-75 ms by default and 13-17 ms with freed
blocks reused; a training step ran in 0.56-0.66x the time, a width-128 matching iteration in
0.6x (benchmarks/matching_speed.py --part allocator has the interleaved numbers).

`keep_freed_memory()` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB, so
freed blocks stay in the process heap and are reused. Process-wide and idempotent; the cost is
that the process's resident memory no longer shrinks after a large run (its peak is unchanged).
The heavy loops (training, experts, matching) call it; DISTILLERY_MALLOC=default opts out.
A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB still get their own mapping
_TRIM_THRESHOLD = 2**31 - 1  # return heap top to the OS only beyond ~2 GiB free
_applied = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        _ = libc.gnu_get_libc_version  # only glibc has it (and mallopt with these meanings)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make this process reuse freed large blocks instead of unmapping them; True if in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("DISTILLERY_MALLOC", "").lower() == "default":
        return False
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    return _applied


def restore_default_malloc() -> None:
    """glibc's defaults again (static 128 KiB thresholds) and the free heap top released; for benchmarks."""
    global _applied
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    _applied = False
