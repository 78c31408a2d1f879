"""The lasso LARS path compiled, calling the very BLAS and LAPACK routines the Python path calls.

Kernel SHAP with `l1_reg: aic` runs one LARS path per explained row: ~30 steps of a few small products and
triangular solves, ~1 ms a breast-cancer path in Python, most of it between the calls. A compiled copy
must not change a single bit: which features `aic` selects turns on near ties, and the products' bits
are those of the library numpy's `dot` calls. scipy's BLAS (the one numba's `np.dot` calls) gives other
bits for the path's matrix-vector product in 24% of random trials (measured). So this path calls numpy's
own BLAS (the `scipy_cblas_*64_` routines of the OpenBLAS numpy's wheel bundles) in exactly the way
numpy's `dot` calls it for these operands (a C-ordered copy and `dgemv`, or a strided `ddot` for a
single row), and scipy's LAPACK (its `cython_lapack`, the library behind `get_lapack_funcs`) with the
arguments scipy's wrappers pass, on the copies they make. Sums are numpy's pairwise sums, rounding is
numpy's `round`. Tested bit for bit against the Python path and scikit-learn.

The routines' addresses are arguments, not globals, so the machine code is cached on disk like the
engine's other loops (`jit.cached_njit`). Where numpy's BLAS is not found (a numpy built against
another BLAS), or the first call's check against numpy's `dot` fails, `lasso_path` returns None and
the caller takes the Python path. So does a path that drops a variable, meets a degenerate regressor or
stops early (rare branches where scikit-learn warns, kept in one place: lars.py), and one with more than
128 active features (numpy sums those in recursive halves; numba's cached code for a recursive function
does not load).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

from shapline.tasks.explainers.jit import cached_njit as _compiled

__all__ = ["lasso_path"]

_TINY32 = float(np.finfo(np.float32).tiny)
_EQUALITY_TOLERANCE = float(np.finfo(np.float32).eps)
_ROUND = 1e15  # numpy's round(x, finfo(float64).precision): rint(x * 1e15) / 1e15
_DBL_MAX = float(np.finfo(np.float64).max)
_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE
# CBLAS enumerations
_ROW_MAJOR, _NO_TRANS = 101, 111


def _call(return_type: Any) -> Any:
    """An intrinsic calling the C function at an address with a tuple of arguments (ints, doubles)."""

    @intrinsic
    def call(typingctx: Any, address: Any, arguments: Any) -> Any:
        signature = return_type(address, arguments)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            from llvmlite import ir

            values = cgutils.unpack_tuple(builder, args[1])
            kinds = [context.get_value_type(kind) for kind in sig.args[1].types]
            result = ir.VoidType() if return_type is types.void else context.get_value_type(return_type)
            function = builder.inttoptr(args[0], ir.FunctionType(result, kinds).as_pointer())
            out = builder.call(function, values)
            return context.get_dummy_value() if return_type is types.void else out

        return signature, codegen

    return call


_call_void = _call(types.void)
_call_double = _call(types.float64)


@_compiled
def _pairwise_sum(a: np.ndarray, n: int) -> float:
    """numpy's sum of a[:n] (contiguous float64, n <= 128): its pairwise summation's block of eight
    running sums. (Beyond 128 numpy splits in halves; the path is then left to Python: numba's cached
    code for a recursive function does not load.)"""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[i]
        return res
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    i = 8
    while i < n - (n % 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[i]
        i += 1
    return res


@_compiled
def _min_pos(values: np.ndarray, n: int) -> float:
    """scikit-learn's arrayfuncs.min_pos over values[:n]: the least positive value, else DBL_MAX."""
    least = _DBL_MAX
    for i in range(n):
        if 0.0 < values[i] < least:
            least = values[i]
    return least


@_compiled
def _path(  # noqa: C901 - one loop, step for step the Python path's
    xy: np.ndarray,
    gram_in: np.ndarray,
    n_samples: int,
    max_iter: int,
    eps: float,
    dgemv: int,
    ddot: int,
    dtrtrs: int,
    dpotrs: int,
    coefs: np.ndarray,
    alphas: np.ndarray,
    active: np.ndarray,
) -> tuple[int, int]:
    """(steps, active count) of the path written into coefs/alphas/active, or (-1, 0) where the Python
    path must take over (a drop, a degenerate regressor, an early stop, anything not finite)."""
    n_features = xy.shape[0]
    cov = xy.copy()
    gram = gram_in.copy()
    max_features = min(max_iter, n_features)
    indices = np.arange(n_features)
    sign_active = np.zeros(max(max_features, 1), dtype=np.int8)
    lower = np.zeros((max(max_features, 1), max(max_features, 1)))
    compact = np.empty(max(max_features, 1) * max(max_features, 1))
    least_squares = np.empty(max(max_features, 1))
    signed = np.empty(max(max_features, 1))
    corr = np.empty(max(n_features, 1))
    ratios = np.empty(max(n_features, 1))
    inactive = np.empty(max(n_features, 1) * max(max_features, 1))
    # Fortran arguments: characters and 32-bit integers, by address
    chars = np.zeros(3, dtype=np.uint8)
    ints = np.zeros(6, dtype=np.int32)
    c_ptr = np.int64(chars.ctypes.data)
    i_ptr = np.int64(ints.ctypes.data)
    compact_ptr = np.int64(compact.ctypes.data)
    squares_ptr = np.int64(least_squares.ctypes.data)
    lower_ptr = np.int64(lower.ctypes.data)
    gram_ptr = np.int64(gram.ctypes.data)
    one = np.int64(1)
    n_iter, n_active, offset = 0, 0, 0

    while True:
        remaining = n_features - offset
        c_idx = 0
        c_ = 0.0
        c_max = 0.0
        if remaining > 0:
            c_max = -1.0
            for i in range(remaining):  # argmax of |cov|: the first of equal maxima
                value = abs(cov[offset + i])
                if value != value:
                    return -1, 0
                if value > c_max:
                    c_max = value
                    c_idx = i
            c_ = cov[offset + c_idx]
        alpha = c_max / n_samples
        alphas[n_iter] = alpha
        if alpha <= _EQUALITY_TOLERANCE:  # alpha_min is 0: the path is complete
            return n_iter, n_active
        if n_iter >= max_iter or n_active >= n_features:
            return n_iter, n_active

        # Add the chosen variable to the Cholesky factor of the active set's Gram.
        sign_active[n_active] = 1 if c_ > 0 else -1
        m, n = n_active, c_idx + n_active
        cov[offset + c_idx], cov[offset] = cov[offset], cov[offset + c_idx]
        indices[n], indices[m] = indices[m], indices[n]
        offset += 1
        if m != n:
            for j in range(n_features):
                gram[m, j], gram[n, j] = gram[n, j], gram[m, j]
            for j in range(n_features):
                gram[j, m], gram[j, n] = gram[j, n], gram[j, m]
        diagonal = gram[n_active, n_active]
        for j in range(n_active):
            lower[n_active, j] = gram[n_active, j]
        if n_active:
            # scipy's solve_triangular(lower[:k, :k], b, lower=True): trtrs on its copy of the factor
            k = n_active
            ints[0], ints[1], ints[2], ints[3] = k, 1, k, k  # n, nrhs, lda, ldb
            if k == 1:  # a 1 x 1 factor is Fortran-ordered as it is: solved as lower, not transposed
                chars[0], chars[1] = 76, 78  # 'L', 'N'
                compact[0] = lower[0, 0]
            else:  # the C-ordered factor's transpose, upper, solved transposed
                chars[0], chars[1] = 85, 84  # 'U', 'T'
                for i in range(k):
                    for j in range(k):
                        compact[i * k + j] = lower[i, j]
            chars[2] = 78  # 'N': no unit diagonal
            _call_void(
                dtrtrs,
                (
                    c_ptr,
                    c_ptr + 1,
                    c_ptr + 2,
                    i_ptr,
                    i_ptr + 4,
                    compact_ptr,
                    i_ptr + 8,
                    lower_ptr + 8 * n_active * lower.shape[1],
                    i_ptr + 12,
                    i_ptr + 16,
                ),
            )
            if ints[4] != 0:
                return -1, 0
        v = 0.0
        if n_active:
            row = lower_ptr + 8 * n_active * lower.shape[1]
            v = 0.0 + _call_double(ddot, (np.int64(n_active), row, one, row, one))
        diag = max(np.sqrt(abs(diagonal - v)), eps)
        lower[n_active, n_active] = diag
        if diag < 1e-7:  # degenerate regressors: scikit-learn warns and drops one
            return -1, 0
        active[n_active] = indices[n_active]
        n_active += 1

        if n_iter > 0 and alphas[n_iter - 1] < alpha:  # scikit-learn warns and stops early
            return -1, 0

        # potrs on scipy's Fortran-ordered copy of the factor, the signs as float64
        k = n_active
        for j in range(k):
            for i in range(k):
                compact[j * k + i] = lower[i, j]
            least_squares[j] = float(sign_active[j])
        chars[0] = 76  # 'L'
        ints[0], ints[1], ints[2], ints[3] = k, 1, k, k
        _call_void(
            dpotrs,
            (c_ptr, i_ptr, i_ptr + 4, compact_ptr, i_ptr + 8, squares_ptr, i_ptr + 12, i_ptr + 16),
        )
        if ints[4] != 0:
            return -1, 0
        if k == 1 and least_squares[0] == 0:
            return -1, 0
        if k > _PAIRWISE_BLOCK:
            return -1, 0
        for j in range(k):
            signed[j] = least_squares[j] * sign_active[j]
        aa = 1.0 / np.sqrt(_pairwise_sum(signed, k))
        if not np.isfinite(aa):
            return -1, 0
        for j in range(k):
            least_squares[j] *= aa

        # corr_eq_dir = np.dot(gram[:k, k:].T, least_squares), as numpy computes it
        r = n_features - k
        if r == 1:  # a 1 x k row: numpy's vector dot, strided
            strided = (np.int64(k), gram_ptr + 8 * k, np.int64(n_features), squares_ptr, one)
            corr[0] = 0.0 + _call_double(ddot, strided)
        elif r > 1:  # numpy copies the strided view to C order and calls dgemv on the copy
            for i in range(r):
                for j in range(k):
                    inactive[i * k + j] = gram[j, k + i]
            _call_void(
                dgemv,
                (
                    np.int32(_ROW_MAJOR),
                    np.int32(_NO_TRANS),
                    np.int64(r),
                    np.int64(k),
                    1.0,
                    np.int64(inactive.ctypes.data),
                    np.int64(k),
                    squares_ptr,
                    one,
                    0.0,
                    np.int64(corr.ctypes.data),
                    one,
                ),
            )
        for i in range(r):
            corr[i] = np.rint(corr[i] * _ROUND) / _ROUND
        for i in range(r):
            ratios[i] = (c_max - cov[offset + i]) / ((aa - corr[i]) + _TINY32)
        g1 = _min_pos(ratios, r)
        for i in range(r):
            ratios[i] = (c_max + cov[offset + i]) / ((aa + corr[i]) + _TINY32)
        g2 = _min_pos(ratios, r)
        gamma = min(g1, g2, c_max / aa)

        for j in range(k):
            ratios[j] = -coefs[n_iter, active[j]] / (least_squares[j] + _TINY32)
        if _min_pos(ratios, k) < gamma:  # a coefficient changes sign: the lasso drops it
            return -1, 0

        n_iter += 1
        if n_iter >= coefs.shape[0]:
            return -1, 0
        for j in range(k):
            coefs[n_iter, active[j]] = coefs[n_iter - 1, active[j]] + gamma * least_squares[j]
        for i in range(r):
            cov[offset + i] -= gamma * corr[i]


_ROUTINES: tuple[int, int, int, int] | None = None
_CHECKED: bool | None = None
_LOCK = threading.Lock()


def _numpy_blas() -> ctypes.CDLL | None:
    """The OpenBLAS numpy's wheel bundles (numpy.libs/libscipy_openblas64_*), the library its dot calls."""
    folder = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    found = sorted(glob.glob(os.path.join(folder, "libscipy_openblas64_*.so*")))
    if len(found) != 1:
        return None
    try:
        return ctypes.CDLL(found[0])
    except OSError:
        return None


def _routines() -> tuple[int, int, int, int] | None:
    """The addresses of numpy's dgemv and ddot and scipy's dtrtrs and dpotrs, or None if not all found."""
    library = _numpy_blas()
    if library is None:
        return None
    try:
        dgemv = ctypes.cast(library.scipy_cblas_dgemv64_, ctypes.c_void_p).value
        ddot = ctypes.cast(library.scipy_cblas_ddot64_, ctypes.c_void_p).value
        dtrtrs = get_cython_function_address("scipy.linalg.cython_lapack", "dtrtrs")
        dpotrs = get_cython_function_address("scipy.linalg.cython_lapack", "dpotrs")
    except (AttributeError, ValueError, ImportError):
        return None
    if not all((dgemv, ddot, dtrtrs, dpotrs)):
        return None
    return int(dgemv), int(ddot), int(dtrtrs), int(dpotrs)  # type: ignore[arg-type]


def _run(
    routines: tuple[int, int, int, int],
    xy: np.ndarray,
    gram: np.ndarray,
    n_samples: int,
    max_iter: int,
    eps: float,
) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    n_features = xy.shape[0]
    max_features = min(max_iter, n_features)
    coefs = np.zeros((max_features + 1, n_features))
    alphas = np.zeros(max_features + 1)
    active = np.zeros(max(max_features, 1), dtype=np.int64)
    steps, n_active = _path(
        np.ascontiguousarray(xy, dtype=np.float64),
        np.ascontiguousarray(gram, dtype=np.float64),
        int(n_samples),
        int(max_iter),
        float(eps),
        *routines,
        coefs,
        alphas,
        active,
    )
    if steps < 0:
        return None
    return alphas[: steps + 1], [int(i) for i in active[:n_active]], coefs[: steps + 1].T


LarsPath = tuple[np.ndarray, list[int], np.ndarray]
Reference = Callable[[np.ndarray, np.ndarray, int, int, float], LarsPath]


def _self_check(routines: tuple[int, int, int, int], reference: Reference) -> bool:
    """Whether the routines found give numpy's dot products: the compiled path against `reference` (the
    Python path) on designs whose paths take every product shape (one row left, several, one active
    column); False unless at least one path was compared."""
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(4):
        x = rng.normal(size=(60, 12))
        x -= x.mean(axis=0)
        y = x @ rng.normal(size=12) + rng.normal(size=60)
        y -= y.mean()
        gram, xy = x.T @ x, x.T @ y
        eps = float(np.finfo(float).eps)
        got = _run(routines, xy, gram, 60, 500, eps)
        if got is None:
            continue
        expected = reference(xy, gram, 60, 500, eps)
        if not (
            np.array_equal(got[0], expected[0])
            and got[1] == expected[1]
            and np.array_equal(got[2], expected[2])
        ):
            return False
        compared += 1
    return compared > 0


def available(reference: Reference) -> bool:
    """Whether the compiled path is used: the routines found, and checked once per process against
    `reference`."""
    global _ROUTINES, _CHECKED
    if _CHECKED is None:
        with _LOCK:
            if _CHECKED is None:
                routines = _routines()
                _ROUTINES = routines
                _CHECKED = routines is not None and _self_check(routines, reference)
    return bool(_CHECKED)


def lasso_path(
    xy: np.ndarray, gram: np.ndarray, n_samples: int, max_iter: int, eps: float, reference: Reference
) -> LarsPath | None:
    """lars.lasso_path_gram's (alphas, active, coefs) compiled, or None where `reference` (the Python
    path) must give it."""
    if not available(reference) or _ROUTINES is None:
        return None
    return _run(_ROUTINES, xy, gram, n_samples, max_iter, eps)
