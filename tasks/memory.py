"""Memory a run has let go, handed back to the system rather than kept by the allocators that held it."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def return_freed_memory(cycles: bool = True) -> None:
    """Give the memory a released table (or a finished shard) held back to the system, not just to the heap.

    A Parquet table's columns live in Arrow's memory pool, which keeps freed pages; numpy's live in glibc's
    heaps, one per thread, which keep theirs too. Without this the process's memory stays at its high-water
    mark after the data is let go, and the next phase's peak lands on top of it. `cycles` also collects
    garbage in reference cycles first.
    """
    import pyarrow as pa

    if cycles:  # a full collection costs ~0.2 s in a flow process: worth it once, not per shard
        gc.collect()
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()  # glibc (malloc_trim); None elsewhere (musl, macOS), where nothing is done
