"""How the engine's loops are compiled: numba, cached on disk, without the GIL (one decorator for the
modules that compile: compiled.py and native.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

_F = TypeVar("_F", bound=Callable[..., Any])


def cached_njit(function: _F) -> _F:
    """numba.njit, its machine code cached on disk, or compiled in each process where no cache can be
    written (a read-only install without a writable home or NUMBA_CACHE_DIR: numba refuses to cache)."""
    try:
        return cast(_F, numba.njit(cache=True, nogil=True)(function))
    except RuntimeError:
        return cast(_F, numba.njit(nogil=True)(function))
