"""Memory a run has let go, handed back to the system rather than kept by the allocators that held it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading
from collections.abc import Iterator


def return_freed_memory(cycles: bool = True) -> None:
    """Give the memory a released table (or a finished shard) held back to the system, not just to the heap.

    A Parquet table's columns live in Arrow's memory pool, which keeps freed pages; numpy's live in glibc's
    heaps, one per thread, which keep theirs too. Without this the process's memory stays at its high-water
    mark after the data is let go, and the next phase's peak lands on top of it. `cycles` also collects
    garbage in reference cycles first.
    """
    import pyarrow as pa

    if cycles:  # a walk over every object of the imports, unless inside collections_see_only_this_run()
        gc.collect()
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def collections_see_only_this_run() -> Iterator[None]:
    """Within the block, a garbage collection walks only the objects created inside it.

    A full collection in a flow process walks every object the imports made (hundreds of thousands from
    Prefect, MLflow, Great Expectations, pandas...), twice a run. gc.freeze() sets the objects
    that exist when the block starts aside (they stay alive and are freed by reference counting as
    ever; only cyclic garbage among them waits), and gc.unfreeze() hands them back when the last block
    in the process ends. A process that froze objects itself (a pre-fork server) is left as it is.
    """
    global _BLOCKS, _OWNED
    with _FREEZE_LOCK:
        if _BLOCKS == 0:
            _OWNED = gc.get_freeze_count() == 0
        _BLOCKS += 1
        if _OWNED:
            gc.freeze()
    try:
        yield
    finally:
        with _FREEZE_LOCK:
            _BLOCKS -= 1
            if _BLOCKS == 0 and _OWNED:
                gc.unfreeze()


_FREEZE_LOCK = threading.Lock()
_BLOCKS = 0  # blocks open in this process (runs in threads, subflows)
_OWNED = False  # whether the open blocks froze the heap (and so unfreeze it)


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()  # glibc (malloc_trim); None elsewhere (musl, macOS), where nothing is done
