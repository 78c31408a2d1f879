"""The engine's per-row passes over memory, compiled: the numpy expressions they replace, fused, bit for bit.

Every explained row draws its coalitions, writes its synthetic rows (coalitions x background: 12 MB for
breast cancer's 30 features), averages the model's outputs over the background, and scales and centres
its regression's design. In numpy each is several passes over the same memory and a Python-level call
per pass; here each is one loop doing the same operations in the same order, so every number is the same
(tested against the numpy expressions, which are shap's and scikit-learn's, and against rng.shuffle).
numba is shap's own dependency and a run imports it with shap anyway; `cache=True` keeps the machine
code on disk, so a process loads it instead of compiling it, and `nogil` lets thread workers run them at
once. A process's first compiled call starts LLVM: `warm_up` pays that before the explain phase.
"""

from __future__ import annotations

import numpy as np

from shapline.tasks.explainers.jit import cached_njit as _compiled

__all__ = [
    "FILLED_DTYPES",
    "as_bits",
    "augmented_design",
    "background_mean",
    "eliminated_design",
    "fill_rows",
    "fill_rows_by_row",
    "fill_synthetic",
    "fill_synthetic_by_row",
    "leading_sets",
    "random_coalitions",
    "scaled_centred",
    "same_as_background",
    "searchsorted_right",
    "shuffle_swaps",
    "warm_up",
]


@_compiled
def fill_synthetic(
    out: np.ndarray, palettes: np.ndarray, coalitions: np.ndarray, owners: np.ndarray, n: int
) -> None:
    """Write one model call's rows of some columns into `out` (columns, rows).

    `palettes` (columns, n + B): each column's n background values, then the call's B explained rows'.
    The call's rows are the B explained rows, then each coalition's n rows, one per background row:
    x's value where `coalitions[u, column]` is set (x the explained row `owners[u]`), the background
    row's elsewhere.
    """
    columns = palettes.shape[0]
    b = palettes.shape[1] - n
    for k in range(columns):
        row = out[k]
        palette = palettes[k]
        for i in range(b):
            row[i] = palette[n + i]
        for u in range(coalitions.shape[0]):
            start = b + u * n
            if coalitions[u, k]:
                value = palette[n + owners[u]]
                for r in range(n):
                    row[start + r] = value
            else:
                for r in range(n):
                    row[start + r] = palette[r]


@_compiled
def fill_rows(
    out: np.ndarray,
    palettes: np.ndarray,
    coalitions: np.ndarray,
    owners: np.ndarray,
    n: int,
    rows: np.ndarray,
) -> None:
    """Write only the given rows of one model call into `out` (columns, len(rows)): row t of `out` is the
    call's row rows[t] as fill_synthetic writes it (the distinct rows of a deduplicated call)."""
    columns = palettes.shape[0]
    b = palettes.shape[1] - n
    for k in range(columns):
        row = out[k]
        palette = palettes[k]
        for t in range(rows.shape[0]):
            r = rows[t]
            if r < b:
                row[t] = palette[n + r]
            else:
                u = (r - b) // n
                if coalitions[u, k]:
                    row[t] = palette[n + owners[u]]
                else:
                    row[t] = palette[r - b - u * n]


def as_bits(array: np.ndarray) -> np.ndarray:
    """The array's values as their bit patterns: a view as the unsigned integers of the dtype's width, what
    the fills by row copy (a select of bits writes every value, NaN's payload too, exactly)."""
    return array.view(np.dtype(f"u{array.dtype.itemsize}"))


@_compiled
def fill_synthetic_by_row(
    out: np.ndarray, palettes: np.ndarray, coalitions: np.ndarray, owners: np.ndarray, n: int
) -> None:
    """fill_synthetic's values written row by row into `out` (rows, columns), for a model that reads its
    input a row at a time (XGBoost reads a row-major array faster, measured). `palettes` here is
    (n + B, columns): the n background rows, then the call's B explained rows. Both are bit patterns
    (`as_bits`): a coalition's rows are x's bits where its mask is set, each background row's elsewhere, by
    and/or (1.0 ms for breast cancer's 105,401 x 30 float32 against 1.9 for a select of floats)."""
    columns = palettes.shape[1]
    b = palettes.shape[0] - n
    for i in range(b):
        line, source = out[i], palettes[n + i]
        for k in range(columns):
            line[k] = source[k]
    taken = np.empty(columns, dtype=out.dtype)
    kept = np.empty(columns, dtype=out.dtype)
    for u in range(coalitions.shape[0]):
        start = b + u * n
        x, mask = palettes[n + owners[u]], coalitions[u]
        for k in range(columns):
            # Statements, not conditional expressions: numba would unify uint64 and an int literal as float64.
            if mask[k]:
                taken[k] = x[k]
                kept[k] = 0
            else:
                taken[k] = 0
                kept[k] = ~taken[k]
        for r in range(n):
            line, background = out[start + r], palettes[r]
            for k in range(columns):
                line[k] = taken[k] | (background[k] & kept[k])


@_compiled
def fill_rows_by_row(
    out: np.ndarray,
    palettes: np.ndarray,
    coalitions: np.ndarray,
    owners: np.ndarray,
    n: int,
    rows: np.ndarray,
) -> None:
    """fill_rows' values written row by row into `out` (len(rows), columns), `palettes` (n + B, columns)
    as fill_synthetic_by_row takes them (bit patterns)."""
    columns = palettes.shape[1]
    b = palettes.shape[0] - n
    for t in range(rows.shape[0]):
        r = rows[t]
        line = out[t]
        if r < b:
            source = palettes[n + r]
            for k in range(columns):
                line[k] = source[k]
        else:
            u = (r - b) // n
            x, mask, background = palettes[n + owners[u]], coalitions[u], palettes[r - b - u * n]
            for k in range(columns):
                line[k] = x[k] if mask[k] else background[k]


@_compiled
def background_mean(outputs: np.ndarray, weights: np.ndarray, ey: np.ndarray) -> None:
    """ey[u] = the weighted sum over the background of coalition u's outputs (`outputs` coalition-major,
    n = len(weights) rows each), added background row by background row from zero: the order of shap's
    compiled `_exp_val`, so the targets of the solve are bit for bit shap's."""
    n = weights.shape[0]
    for u in range(ey.shape[0]):
        for d in range(ey.shape[1]):
            total = 0.0
            for r in range(n):
                total += np.float64(outputs[u * n + r, d]) * weights[r]
            ey[u, d] = total


@_compiled
def same_as_background(
    x: np.ndarray, background: np.ndarray, rtol: float | np.floating, atol: float | np.floating
) -> np.ndarray:
    """Per column j, whether every background row's value is close to x[j]: `np.isclose(x, background,
    rtol, atol, equal_nan=True).all(axis=0)` for float x and background of one dtype, with `rtol` and `atol`
    of that dtype (numpy's weak Python floats take the array's dtype): |x - y| <= atol + rtol * |y| where
    y is finite, or x == y (infinities), or both NaN; the same operations in the same precision."""
    n, m = background.shape
    same = np.ones(m, dtype=np.bool_)
    for j in range(m):
        value = x[j]
        for r in range(n):
            other = background[r, j]
            if value == other:
                continue
            if np.isnan(value) and np.isnan(other):
                continue
            if np.isfinite(other) and abs(value - other) <= atol + rtol * abs(other):
                continue
            same[j] = False
            break
    return same


@_compiled
def eliminated_design(
    masks: np.ndarray, selected: np.ndarray, last: int, kernel_weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """shap's constrained design and its weighted copy, (rows, k) Fortran-ordered as shap's expressions
    leave them: `etmp = np.transpose(np.transpose(masks[:, selected]) - masks[:, last])` and
    `kernel_weights[:, None] * etmp` (one subtraction, one product per element). The layout decides how
    BLAS multiplies them next, so it is shap's too."""
    rows, k = masks.shape[0], selected.shape[0]
    design = np.empty((k, rows))
    weighted = np.empty((k, rows))
    for c in range(k):
        column = selected[c]
        for u in range(rows):
            value = masks[u, column] - masks[u, last]
            design[c, u] = value
            weighted[c, u] = kernel_weights[u] * value
    return design.T, weighted.T


@_compiled
def augmented_design(masks: np.ndarray, kernel_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """shap's (mask_aug, sqrt(w_aug)) of a row's regression with l1 selection: every coalition once as
    itself and once as its complement (`np.vstack((masks, masks - 1))`), each row times the root of its
    weight, C-ordered."""
    rows, m = masks.shape
    w_sqrt = np.empty(2 * rows)
    design = np.empty((2 * rows, m))
    for u in range(rows):
        size = 0.0
        for j in range(m):
            size += masks[u, j]
        w_sqrt[u] = np.sqrt(kernel_weights[u] * (m - size))
        w_sqrt[rows + u] = np.sqrt(kernel_weights[u] * size)
        for j in range(m):
            design[u, j] = w_sqrt[u] * masks[u, j]
            design[rows + u, j] = w_sqrt[rows + u] * (masks[u, j] - 1.0)
    return design, w_sqrt


@_compiled
def scaled_centred(design: np.ndarray) -> np.ndarray:
    """`design` scaled as StandardScaler(with_mean=False) scales it (its corrected two-pass variance, Chan,
    Golub & LeVeque) and centred as LassoLarsIC centres it. Column sums add rows in order, as numpy's
    axis-0 sums of a C-ordered array do."""
    total, m = design.shape
    n = float(total)
    column_sum = np.zeros(m)
    for u in range(total):
        for j in range(m):
            column_sum[j] += design[u, j]
    mean = column_sum / n
    correction = np.zeros(m)
    squares = np.zeros(m)
    for u in range(total):
        for j in range(m):
            deviation = design[u, j] - mean[j]
            correction[j] += deviation
            squares[j] += deviation * deviation
    eps = np.finfo(np.float64).eps
    scale = np.empty(m)
    for j in range(m):
        variance = (squares[j] - correction[j] * correction[j] / n) / n
        scale[j] = np.sqrt(variance)
        drift = n * mean[j] * eps
        if variance <= n * eps * variance + drift * drift:  # a constant column
            scale[j] = 1.0
    scaled = np.empty((total, m))
    column_sum[:] = 0.0
    for u in range(total):
        for j in range(m):
            value = design[u, j] / scale[j]
            scaled[u, j] = value
            column_sum[j] += value
    for j in range(m):
        mean[j] = column_sum[j] / n
    for u in range(total):
        for j in range(m):
            scaled[u, j] -= mean[j]
    return scaled


@_compiled
def _bound_masks(steps: int) -> np.ndarray:
    """For each Fisher-Yates step (bound i = steps - step), the mask legacy `randint` puts on a 32-bit
    output for a draw in [0, i]: i with every bit below its highest set."""
    masks = np.empty(max(steps, 1), dtype=np.uint32)
    for step in range(steps):
        mask = np.uint32(steps - step)
        mask |= mask >> 1
        mask |= mask >> 2
        mask |= mask >> 4
        mask |= mask >> 8
        mask |= mask >> 16
        masks[step] = mask
    return masks


@_compiled
def _bounded(raw: np.ndarray, at: int, mask: np.uint32, bound: np.uint32) -> tuple[np.uint32, int]:
    """Legacy `randint`'s masked rejection on the outputs raw[at:]: (the draw in [0, bound], where the
    next starts), or (0, -1) when the outputs ran out first."""
    while at < raw.shape[0]:
        value = raw[at] & mask
        at += 1
        if value <= bound:
            return value, at
    return np.uint32(0), -1


@_compiled
def shuffle_swaps(raw: np.ndarray, at: int, swaps: np.ndarray) -> int:
    """Fill `swaps` (draws, m - 1) with the swap partners RandomState.shuffle draws for `draws` shuffles of
    range(m), from the generator's 32-bit outputs `raw[at:]`; return where the next draw starts, or -1
    when `raw` ran out first (then nothing returned is usable).

    shuffle is a Fisher-Yates pass from the last position: position i swaps with j uniform in [0, i],
    drawn as legacy `randint` draws a bounded integer: the output masked to the bits i needs, rejected
    while above i (numpy's `buffered_bounded_masked_uint32`, frozen by its legacy stream guarantee).
    """
    draws, steps = swaps.shape
    masks = _bound_masks(steps)
    for d in range(draws):
        for step in range(steps):  # position i = m - 1 - step, bound i
            value, at = _bounded(raw, at, masks[step], np.uint32(steps - step))
            if at < 0:
                return -1
            swaps[d, step] = value
    return at


@_compiled
def leading_sets(swaps: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(draws, m) bool: the first sizes[draw] entries of each shuffle of range(m) `swaps` describes (a
    Fisher-Yates pass from the last position, position m - 1 - step swapping with swaps[draw, step])."""
    draws, m = swaps.shape[0], swaps.shape[1] + 1
    sets = np.zeros((draws, m), dtype=np.bool_)
    permutation = np.empty(m, dtype=np.intp)
    for d in range(draws):
        for i in range(m):
            permutation[i] = i
        for step in range(m - 1):
            i, j = m - 1 - step, swaps[d, step]
            permutation[i], permutation[j] = permutation[j], permutation[i]
        for k in range(sizes[d]):
            sets[d, permutation[k]] = True
    return sets


@_compiled
def searchsorted_right(cdf: np.ndarray, values: np.ndarray) -> np.ndarray:
    """cdf.searchsorted(values, side="right") for an ascending cdf without NaN: for each value, the number
    of cdf entries <= it (the comparisons numpy makes, so the same indices)."""
    out = np.empty(values.shape[0], dtype=np.intp)
    n = cdf.shape[0]
    for i in range(values.shape[0]):
        value = values[i]
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) >> 1
            if value < cdf[mid]:
                hi = mid
            else:
                lo = mid + 1
        out[i] = lo
    return out


@_compiled
def random_coalitions(
    raw: np.ndarray,
    sizes: np.ndarray,
    num_paired: int,
    samples_left: int,
    masks: np.ndarray,
    weights: np.ndarray,
    start: int,
) -> int:
    """shap's random phase (m = masks.shape[1] <= 63), draw by draw as its loop makes them: the rows it
    fills in masks/weights from row `start`; returns the row after the last, or -1 when the generator's
    32-bit outputs `raw` ran out first (nothing written is then usable: call again with more).

    Draw d takes the first sizes[d] features of a shuffle of range(m) (swap partners drawn from `raw`
    as `shuffle_swaps` draws them). A coalition not drawn before adds a row, and its complement's row
    when its size is paired and budget remains; a repeat adds 1 to the weight of the earlier row (and
    of the row after it, when paired). Coalitions are one machine word each (bit j: feature j), found
    again through an open-addressing table; complements are never looked up, as shap's `used_masks`.
    """
    m = masks.shape[1]
    steps = m - 1
    bits = _bound_masks(steps)
    capacity = 16
    while capacity < 4 * samples_left:
        capacity *= 2
    keys = np.full(capacity, -1, dtype=np.int64)
    first_rows = np.empty(capacity, dtype=np.int64)
    permutation = np.empty(m, dtype=np.intp)
    at, row = 0, start
    for d in range(sizes.shape[0]):
        if samples_left <= 0:
            break
        for i in range(m):
            permutation[i] = i
        for step in range(steps):  # shuffle_swaps' draws, swapped in as they come
            value, at = _bounded(raw, at, bits[step], np.uint32(steps - step))
            if at < 0:
                return -1
            i = m - 1 - step
            permutation[i], permutation[value] = permutation[value], permutation[i]
        size = sizes[d]
        key = np.int64(0)
        for k in range(size):
            key |= np.int64(1) << permutation[k]
        slot = np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & (capacity - 1)
        while keys[slot] != -1 and keys[slot] != key:
            slot = (slot + 1) & (capacity - 1)
        paired = size <= num_paired
        if keys[slot] == -1:
            keys[slot] = key
            first_rows[slot] = row
            for j in range(m):  # rows an earlier call wrote before its outputs ran out
                masks[row, j] = 0.0
            for k in range(size):
                masks[row, permutation[k]] = 1.0
            weights[row] = 1.0
            row += 1
            samples_left -= 1
            if samples_left > 0 and paired:
                for j in range(m):
                    masks[row, j] = 1.0 - masks[row - 1, j]
                weights[row] = 1.0
                row += 1
                samples_left -= 1
        else:
            earlier = first_rows[slot]
            weights[earlier] += 1.0
            if samples_left > 0 and paired:
                weights[earlier + 1] += 1.0
    return row


# The dtypes a model call's columns are written in by fill_synthetic; any other (datetimes, float16,
# objects) is written by numpy.
FILLED_DTYPES = frozenset(
    np.dtype(kind)
    for kind in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float32,
        np.float64,
    )
)


def warm_up() -> None:
    """Load (or compile, the first time) the machine code of every function for the common inputs, now.

    A process's first call of compiled code starts LLVM (~0.2 s, measured); the shard threads' runner and a
    worker pool's fork server call this before the explain phase, beside loading and validation, so no
    shard pays it (a pool's workers are forks of a server that has).
    """
    n = 2
    owners = np.zeros(2, dtype=np.intp)
    # The engine passes a call's coalitions C-ordered (one column's positions) and F-ordered (a dtype's
    # columns picked from the call's mask): each layout is its own machine code.
    for order in ("C", "F"):
        coalitions = np.ones((2, 2), dtype=np.bool_, order=order)
        # int16: the one width (2 bytes) the fills by row copy that the others leave out.
        for dtype in (np.float32, np.float64, np.int64, np.bool_, np.intp, np.int16):
            palettes = np.zeros((2, n + 1), dtype=dtype)
            fill_synthetic(np.empty((2, 1 + 2 * n), dtype=dtype), palettes, coalitions, owners, n)
            fill_rows(np.empty((2, 2), dtype=dtype), palettes, coalitions, owners, n, owners)
            by_row = as_bits(np.ascontiguousarray(palettes.T))
            fill_synthetic_by_row(
                as_bits(np.empty((1 + 2 * n, 2), dtype=dtype)), by_row, coalitions, owners, n
            )
            fill_rows_by_row(as_bits(np.empty((2, 2), dtype=dtype)), by_row, coalitions, owners, n, owners)
    for dtype in (np.float32, np.float64):
        background_mean(np.zeros((n, 1), dtype=dtype), np.full(n, 0.5), np.zeros((1, 1)))
    swaps = np.zeros((1, 1), dtype=np.int32)
    shuffle_swaps(np.zeros(2, dtype=np.uint32), 0, swaps)
    leading_sets(swaps, np.ones(1, dtype=np.int64))
    sizes = searchsorted_right(np.array([0.5, 1.0]), np.array([0.25])) + 1
    random_coalitions(np.zeros(4, dtype=np.uint32), sizes, 1, 2, np.zeros((2, 2)), np.zeros(2), 0)
    masks = np.array([[1.0, 0.0], [0.0, 1.0]])
    design, _ = augmented_design(masks, np.ones(2))
    eliminated_design(masks, np.zeros(1, dtype=np.intp), 1, np.ones(2))
    for dtype in (np.float32, np.float64):
        row = np.zeros(2, dtype=dtype)
        same_as_background(row, masks.astype(dtype), dtype(1e-05), dtype(1e-08))
    scaled_centred(design)
    from shapline.tasks.explainers import lars

    lars.warm_up()  # the compiled LARS path's code, and its one check against numpy's products
