"""Handing freed memory back to the operating system.

glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MB: most tensors of a model below a few
billion parameters) in its heap. A process that builds or reads a model tensor by tensor (ZeRO-3 partitioning
at start-up, a streamed export) would otherwise keep the pages of every tensor it has freed, and its RSS
would grow towards the model's size (benchmarks/bench_startup.py, benchmarks/bench_export.py). In training the
same heap grew by 0.3-0.5 GiB per step per rank, by a different amount on every rank (docs/scale.md): training
workers serve every allocation above a fixed threshold from mmap instead (`limit_heap_retention`), so a freed
tensor's pages go back at once, and `malloc_trim` between phases is not needed (it cannot bound a phase's peak)."""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc: nothing to do
    _LIBC = None
M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_heap_retention(threshold_kb: int | None) -> bool:
    """Serve every allocation above `threshold_kb` KiB from mmap from now on (glibc's mallopt M_MMAP_THRESHOLD,
    which also turns its adaptive threshold off), as MALLOC_MMAP_THRESHOLD_ would at process start. None leaves
    glibc's default. Returns whether the threshold was set (False elsewhere than glibc, or for None)."""
    if _LIBC is None or threshold_kb is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, threshold_kb * 1024))
