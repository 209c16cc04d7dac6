"""Handing freed memory back to the operating system.

glibc keeps freed blocks below its adaptive mmap threshold (up to 32 MB: most tensors of a model below a few
billion parameters) in its heap. A process that builds or reads a model tensor by tensor (ZeRO-3 partitioning
at start-up, a streamed export) would otherwise keep the pages of every tensor it has freed, and its RSS
would grow towards the model's size (benchmarks/bench_startup.py, benchmarks/bench_export.py)."""

from __future__ import annotations

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if _LIBC is not None and not hasattr(_LIBC, "malloc_trim"):  # not glibc: nothing to do
    _LIBC = None


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
