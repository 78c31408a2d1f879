"""Kernel SHAP that reproduces shap's KernelExplainer values exactly, with vectorised sampling, data and solve.

For the same background, row and per-row seed, `KernelEngine` returns what

    np.random.seed(seed)
    shap.KernelExplainer(f, background, link=link).shap_values(x, nsamples=..., l1_reg=..., silent=True)

returns (bit for bit when the model gives the same outputs on a frame as on shap's array), but builds the
synthetic rows column by column in their own dtypes, merges the model calls of several rows, can send
each distinct row once, and does scikit-learn's LassoLarsIC arithmetic without refitting an OLS.

Coalitions are drawn from a local `np.random.RandomState(seed)` making the same calls in the same order as
shap makes on numpy's global RNG, so no global-RNG lock is needed and one engine can serve many threads.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import mmap
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy.special import binom

from shapline.tasks.common.errors import ModelError
from shapline.tasks.common.schemas import rows_named
from shapline.tasks.explainers import compiled
from shapline.tasks.explainers.claims import AllRows, RowClaims
from shapline.tasks.explainers.lars import lasso_path_gram
from shapline.tasks.explainers.links import LINKS
from shapline.tasks.models.predictors import CallCost

if TYPE_CHECKING:
    from shapline.tasks.explainers.adaptive import RowState

__all__ = ["AdaptiveValues", "KernelEngine", "RowPlan"]

# The LARS path is scored the cheap way unless another point of it scores within this (relative) margin
# of the best; then scikit-learn's own scoring decides (see _information_criterion_support).
_TIE_MARGIN = 1e-8
_HASH_SEED = 0x5EED_DEDE
# dedupe="auto" (a model that does not pay per row) deduplicates an engine's calls when, in its first
# call, this share of a sample of one row's synthetic rows (up to _REPEAT_SAMPLE of its coalitions, evenly
# spaced, each with every background row) repeats. Finding repeats costs a little per row: more than a
# fast model saves on a few repeats, less than it saves where rows repeat often (text and one-hot columns).
# The threshold and the measurements behind it are in docs/performance.md.
_REPEAT_SHARE = 0.2
_REPEAT_SAMPLE = 128
# batch_rows="auto" merges the calls of as many explained rows as make the model's fixed cost per call (a
# Pipeline's checks and conversions, ~4 ms whatever the rows) at most this share of a call, timed on the
# engine's first call; a model whose cost is in its rows (XGBoost: ~0.2 ms a call, 40 ms a row's call)
# keeps one row per call. The measurements behind it are in docs/performance.md.
_FIXED_SHARE = 0.05
# Calls merge at least as many explained rows as fit this many bytes of synthetic rows (at least one), the
# first call too, before the cost is known: merging calls that small costs nothing even where a model's time
# is all per row (an XGBoost of 8 features: 7.9 ms a row at 9 rows a call, 8.5 at one), and a Pipeline's
# first shard saves the fixed cost of a call. The measurements are in docs/performance.md.
_FIRST_CALL_BYTES = 4_000_000
# What model calls are timed with (a test's fake clock stands in for it).
_clock = time.perf_counter

_Palette = np.ndarray | pd.api.extensions.ExtensionArray


def _exact_keys(palette: _Palette) -> _Palette:
    """Keys that are equal only for values no model can tell apart, for deduplicating rows.

    pandas (like ==) takes -0.0 for 0.0, True for 1 and 1.0, and None for NaN; a model may not (1 / x,
    a one-hot of an object column, an imputer of NaN only). Floats are keyed by their bits (every NaN
    one key), other objects by type and value.
    """
    if pd.api.types.is_float_dtype(palette.dtype):
        if isinstance(palette, np.ndarray):
            values = palette
        else:  # a nullable float column: NA is NaN here
            values = palette.to_numpy(dtype=np.float64, na_value=np.nan)
        as_int = np.dtype(f"i{values.dtype.itemsize}")
        return np.where(np.isnan(values), np.array(np.nan, values.dtype).view(as_int), values.view(as_int))
    if palette.dtype == object:
        keys = np.empty(len(palette), dtype=object)
        keys[:] = [(type(v), v.hex() if isinstance(v, float) else v) for v in palette]
        return keys
    return palette


@dataclasses.dataclass(frozen=True, eq=False)
class RowPlan:
    """One row's coalitions and kernel weights."""

    seed: int
    varying: np.ndarray
    """Column positions of the M features whose value differs from the background's (shap's varyingInds)."""
    masks: np.ndarray = dataclasses.field(repr=False)
    """(nsamples, M) 0/1 coalitions; rows past `filled` stay zero, as in shap when its draws run out."""
    kernel_weights: np.ndarray = dataclasses.field(repr=False)
    """(nsamples,) Shapley kernel weight of each coalition."""
    filled: int
    """Coalitions actually drawn; the synthetic data holds filled x len(background) rows, coalition-major."""
    fraction_evaluated: float
    """nsamples / number of possible coalitions, which decides shap's deprecated l1_reg='auto'."""


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptiveValues:
    """What `explain_adaptive` finds: values and their standard errors (rows, columns, outputs), f(x) (rows,
    outputs), and per row the coalitions evaluated, the model rows they took, and whether it converged."""

    values: np.ndarray
    errors: np.ndarray
    fx: np.ndarray
    coalitions: np.ndarray
    model_rows: np.ndarray
    converged: np.ndarray

    @classmethod
    def empty(cls, rows: int, columns: int, outputs: int) -> AdaptiveValues:
        return cls(
            values=np.zeros((rows, columns, outputs)),
            errors=np.zeros((rows, columns, outputs)),
            fx=np.zeros((rows, outputs)),
            coalitions=np.zeros(rows, dtype=np.int64),
            model_rows=np.zeros(rows, dtype=np.int64),
            converged=np.ones(rows, dtype=bool),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
    """The rows of one model call: the B explained rows first, then each plan's coalitions x background.

    A "unit" is an explained row (every column from its x) or a coalition (x's value where its mask is
    set, the background row's elsewhere); row r of the call is a (unit, background row) pair.
    """

    plans: list[RowPlan]
    palettes: list[_Palette]
    """Per column: the background's values followed by the batch's B x values."""
    palette_blocks: dict[np.dtype, np.ndarray]
    """The numpy-typed palettes, one (columns, n + B) C-ordered block per dtype (`palettes` are its rows)."""
    unit_mask: np.ndarray
    """(units, columns) bool: the unit takes x's value in that column."""
    unit_plan: np.ndarray
    """(units,) the plan (and x) each unit belongs to."""
    offsets: list[int]
    """First row of each plan's synthetic rows in the call."""
    n_rows: int


class _Buffers:
    """Memory reused from one model call to the next, within an `explain` call and across a thread's calls.

    A merged call's rows take tens of megabytes; glibc maps blocks that large afresh each time, and every
    fresh mapping is paged in again, row after row and on each shard's first row. A buffer is reused only
    when nothing else still refers to it (predict may
    keep the frame it was given, or a view of it), so reuse is never visible. A thread keeps its buffers
    for its next shard up to KEPT_BYTES; a larger set (an endpoint's merged calls) is let go.
    """

    KEPT_BYTES = 64_000_000
    # A new buffer this large is mapped with its pages in place (MAP_POPULATE, Linux): the kernel maps them
    # in one call where the first write would fault them in one 4 KB page at a time (a flow's first 12.6 MB
    # call of breast cancer: 24 ms of faults against 4 ms, measured in a process with the flow's imports).
    POPULATED_BYTES = 1 << 20

    def __init__(self) -> None:
        self._buffers: dict[object, np.ndarray] = {}

    @classmethod
    def of_this_thread(cls) -> _Buffers:
        """This thread's buffers (new ones the first time)."""
        buffers = getattr(_THREAD, "buffers", None)
        if buffers is None:
            buffers = _THREAD.buffers = cls()
        return buffers

    def keep_or_release(self) -> None:
        """After an `explain` call: keep small buffers for the thread's next call, let large ones go."""
        if sum(buffer.nbytes for buffer in self._buffers.values()) > self.KEPT_BYTES:
            self._buffers.clear()

    def get(self, key: object, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised array of `shape`, in last call's memory for `key` when that is free."""
        size = math.prod(shape)
        buffer = self._buffers.get(key)
        # References: the dict, `buffer` and getrefcount's argument; any more is a live view elsewhere.
        if buffer is None or buffer.dtype != dtype or buffer.size < size or sys.getrefcount(buffer) > 3:
            buffer = self._buffers[key] = self._new(size, dtype)
        return buffer[:size].reshape(shape)

    @classmethod
    def _new(cls, size: int, dtype: np.dtype) -> np.ndarray:
        """`size` values of `dtype`, in memory whose pages are in place when the buffer is large."""
        nbytes = size * dtype.itemsize
        populate = getattr(mmap, "MAP_POPULATE", None)
        if nbytes < cls.POPULATED_BYTES or populate is None or dtype.hasobject:
            return np.empty(size, dtype=dtype)
        try:
            mapped = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        except OSError:  # no memory to map now: numpy's own allocation says so, or does not need to
            return np.empty(size, dtype=dtype)
        # Freed with the array (its views keep it alive): the mapping is unmapped when the last goes.
        return np.frombuffer(mapped, dtype=dtype, count=size)


# Per thread: a thread explains one shard at a time, so its buffers are never shared.
_THREAD = threading.local()


@dataclasses.dataclass(frozen=True, eq=False)
class _Rows:
    """The rows to explain, converted once."""

    frame: pd.DataFrame
    values: np.ndarray
    """frame.to_numpy(), the array shap would be given (numeric, or object with any text column)."""
    blocks: dict[np.dtype, np.ndarray]
    """(rows, columns) values of each numpy dtype's columns."""
    extension: dict[int, pd.api.extensions.ExtensionArray]
    """Each extension-typed column: the background's values, then every row's."""


class KernelEngine:
    """shap's Kernel SHAP (KernelExplainer.shap_values) for one model and background, reproduced exactly."""

    expected_value: np.ndarray
    """(outputs,) the weighted mean of the model over the background, in link space."""
    rows_sent: int
    """Rows sent to the model by `explain` so far (after deduplication)."""
    rows_saved: int
    """Rows `explain` did not send because an identical row was already in the same call."""
    n_outputs: int
    """Columns of the model's output, each explained on its own."""
    coalitions: np.ndarray
    """Coalitions each row of the last `explain` call took (shap's, after its draws)."""

    def __init__(
        self,
        predict: Callable[[pd.DataFrame], np.ndarray],
        background: pd.DataFrame,
        weights: np.ndarray | None = None,
        link: str = "identity",
        float32: bool = False,
        call_cost: CallCost | None = None,
        background_output: tuple[np.ndarray, float] | None = None,
        deduplicates: bool | None = None,
        calls_are_cheap: bool = True,
        row_major: bool = False,
        predict_array: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`predict` maps a frame with the background's columns and dtypes to (rows, outputs) floats.

        `predict` must be thread-safe if the engine is used from several threads. `weights` weigh the background rows
        (e.g. k-means cluster sizes); they are normalised to sum to one, as shap's DenseData does. With
        `float32` (a model that reads every number as float32, as XGBoost does), the synthetic rows' float64
        columns are built as float32: the model sees the same numbers, and the call writes and reads half the
        memory. `call_cost` is what a call of `predict` costs, when an earlier engine timed it (batch_rows
        "auto" then needs no call of one row to time); `call_cost` is set once this engine has.
        `background_output` is what `predict` gave on this background, and the seconds the call took, when
        an earlier engine of the run called it (`self.background_output` once this one has): a shard's
        engine then makes no call on the background of its own. `deduplicates` is what an earlier engine
        of the run decided for dedupe "auto" (`self.deduplicates` once this one has): a shard's engine
        then samples no repeats of its own. Without `calls_are_cheap` (an endpoint, whose requests are
        billed and whose refusals are not retried), a refused call is named by all its rows rather than
        found again row by row. With `row_major` (a model that reads its input a row at a time: XGBoost),
        a call whose columns share one numpy dtype is written row by row, the layout such a model reads
        fastest (XGBoost's predict on breast cancer's 105,401 rows of 30 float32: 46.3 ms row-major against
        50.1 column by column); the values written are the same. `predict_array` is `predict` on such a
        call's rows as the one int or float array they are written in, (rows, columns): the engine then
        hands it that array with no frame around it (pandas built and checked one in ~0.5 ms a call).
        """
        if link not in LINKS:
            raise ValueError(f"link must be one of {sorted(LINKS)}, got {link!r}")
        if len(background) == 0:
            raise ValueError("the background needs at least one row")
        self.predict = predict
        self.calls_are_cheap = calls_are_cheap
        self.link = link
        self._link = LINKS[link]
        self.background = background.reset_index(drop=True)
        self.columns = list(self.background.columns)
        self.dtypes = self.background.dtypes.to_dict()
        n = len(self.background)
        raw = np.ones(n) if weights is None else np.array(weights, dtype=float).reshape(-1)
        if raw.shape != (n,):
            raise ValueError(f"weights has {raw.size} values for {n} background rows")
        self.weights = raw / np.sum(raw)
        # shap compares x with background.values: numerically (np.allclose) when that array is numeric,
        # by exact == otherwise (one text column makes the whole array object; NaN then never matches).
        self._bg_values = self.background.to_numpy()
        kind = self._bg_values.dtype
        self._bg_has_na = kind.kind == "O" and any(value is pd.NA for value in self._bg_values.flat)
        self._numeric = bool(np.issubdtype(kind, np.number) or np.issubdtype(kind, np.bool_))
        # A float background, C-ordered, for the compiled comparison of each row with it (`_varying`).
        floats = kind in (np.float32, np.float64)
        self._bg_floats = np.ascontiguousarray(self._bg_values) if floats else None
        # Numpy-typed columns are written into one block per dtype; extension types (str, category,
        # nullable ints) are gathered with their own take(), which keeps their dtype.
        self._blocks: dict[np.dtype, list[int]] = {}
        for j, column in enumerate(self.columns):
            dtype = self.dtypes[column]
            if isinstance(dtype, np.dtype):
                if float32 and dtype == np.float64:
                    dtype = np.dtype(np.float32)
                self._blocks.setdefault(dtype, []).append(j)
        self._extension = [j for j, c in enumerate(self.columns) if not isinstance(self.dtypes[c], np.dtype)]
        # Row by row only where the call is one array (one dtype, no extension column): a frame of several
        # blocks is read column by column whatever the layout of each.
        self._row_major = (
            row_major
            and len(self._blocks) == 1
            and not self._extension
            and next(iter(self._blocks)) in compiled.FILLED_DTYPES
        )
        takes_array = self._row_major and next(iter(self._blocks)).kind in "fiu"
        self._predict_array = predict_array if takes_array else None
        self._bg_blocks = {
            dtype: self.background.iloc[:, positions].to_numpy(dtype=dtype)
            for dtype, positions in self._blocks.items()
        }
        self._lock = threading.Lock()
        self.rows_sent = 0
        self.rows_saved = 0
        # Seconds inside the model's calls (every call this engine made, the background's too): wall time,
        # and the CPU time of the threads that called (all of a model's CPU where it runs on the caller's
        # thread, as an in-process model at one thread does; next to none for an endpoint).
        self.model_seconds = 0.0
        self.model_cpu_seconds = 0.0
        # The rows the last explain explained here (all of them unless it was given claims).
        self.done = np.zeros(0, dtype=bool)
        self._auto_dedupe: bool | None = deduplicates  # else decided by the first call with dedupe="auto"
        self._auto_rows: int | None = None  # decided by the first call with batch_rows="auto"
        self.call_cost = call_cost
        if background_output is None:
            try:
                started = _clock()
                out = self._predict(self.background)
                background_output = (out, _clock() - started)
            except ModelError as exc:
                if exc.transient:
                    raise
                raise ModelError(f"the call on the {n} background rows: {exc}") from exc
        out, self._background_call = background_output
        if out.shape[0] != n:
            raise ValueError(f"the background's output has {out.shape[0]} rows for {n}")
        self.background_output = background_output
        # Same expression as shap, so the expected value is bit for bit shap's.
        self._fnull = np.sum((out.T * self.weights).T, 0)
        self.n_outputs = out.shape[1]
        self.expected_value = self._link(self._fnull)

    @property
    def deduplicates(self) -> bool | None:
        """What dedupe "auto" decided (None until a call decided it)."""
        return self._auto_dedupe

    # ----------------------------------------------------------------------------------------------
    # public API

    def explain(
        self,
        rows: pd.DataFrame,
        seeds: Sequence[int],
        nsamples: int | str = "auto",
        l1_reg: str | float | bool = "num_features(10)",
        batch_rows: int | str = 1,
        dedupe: bool | str = False,
        row_ids: Sequence[object] | None = None,
        claims: RowClaims | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Values (rows, columns, outputs) and f(x) (rows, outputs), one model call per `batch_rows` rows.

        With batch_rows "auto", the first call (the rows whose calls fit _FIRST_CALL_BYTES, at least one) is
        timed with the background's call; from the two the engine tells the model's cost per call from its
        cost per row (`call_cost`), and merges as many rows' calls as make the cost per call a small share of
        a call (`_rows_to_merge`).
        Given a call_cost measured before, it merges from the first call.

        With `dedupe`, each distinct row of a call is sent once and its output fanned back out (NaN equals
        NaN); `rows_sent` and `rows_saved` count the effect. With "auto", the engine's first call decides
        for all its calls, from how often a sample of its rows repeats (`_repeat_share`): deduplicating
        costs more than a fast model's time on a few repeated rows. Values are the same either way.
        Defaults are shap's. A model call the predict function refuses (a ModelError) is named by the
        rows it explained: their `row_ids` (positions when not given).

        With `claims`, only the rows this engine claims from it are explained (the others are another
        worker's: see claims.py), a call's worth at a time; `done` says which. A row's values are the same.
        """
        frame = self._checked_rows(rows, seeds, batch_rows, dedupe)
        values = np.zeros((len(frame), len(self.columns), self.n_outputs))
        fx = np.zeros((len(frame), self.n_outputs))
        data = self._prepare(frame)
        buffers = _Buffers.of_this_thread()
        n = len(self.background)
        self.coalitions = np.zeros(len(frame), dtype=np.int64)
        claims = claims or AllRows(len(frame))
        self.done = np.zeros(len(frame), dtype=bool)
        while claimed := claims.take(1):
            start = claimed.start
            plans = [self._plan(data, start, int(seeds[start]), nsamples)]
            more = claims.take(self._rows_per_call(batch_rows, plans[0].filled * n + 1) - 1)
            at = np.array([start, *more])
            plans += [self._plan(data, i, int(seeds[i]), nsamples) for i in more]
            self.coalitions[at] = [plan.filled for plan in plans]
            batch = self._batch(plans, data, at)
            deduplicate = self._deduplicates(batch, dedupe)
            try:
                timing: list[tuple[int, float]] | None = [] if self._times_calls(batch_rows) else None
                outputs = self._evaluate(batch, deduplicate, buffers, timing)
                if timing:
                    self._time_call(*timing[0], explained=len(plans))
            except ModelError as exc:
                if exc.transient:  # an endpoint's fault: retried as it is
                    raise
                refusal = self._refusal(exc, plans, data, at.tolist(), dedupe, buffers, row_ids)
                raise refusal from exc
            for i, plan in enumerate(plans):
                fx[at[i]] = outputs[i]
                mine = outputs[batch.offsets[i] : batch.offsets[i] + plan.filled * n]
                values[at[i]] = self._solve(plan, self._background_mean(plan, mine), outputs[i], l1_reg)
            self.done[at] = True
        buffers.keep_or_release()
        return values, fx

    def explain_adaptive(
        self,
        rows: pd.DataFrame,
        seeds: Sequence[int],
        budget: int,
        tolerance: float,
        batch_rows: int | str = 1,
        dedupe: bool | str = False,
        row_ids: Sequence[object] | None = None,
        sampling: str = "leverage",
        claims: RowClaims | None = None,
    ) -> AdaptiveValues:
        """Kernel SHAP to a stated accuracy (see explainers/adaptive.py): per row, every coalition when they
        fit `budget`, else the hybrid's enumerated sizes and rounds of drawn pairs until the row's largest
        standard error is at most `tolerance` times the spread of its values, or the budget is spent.

        The rows of `batch_rows` explained rows go out together: their first call holds f(x), the
        enumerated coalitions and the first rounds; each later call, the next round of every row still
        drawing; "auto" decides as `explain` does, from the model's cost per call timed on the first.
        Deterministic from each row's seed, whatever the batching; with `claims`, as `explain`.
        """
        from shapline.tasks.explainers import adaptive

        frame = self._checked_rows(rows, seeds, batch_rows, dedupe)
        result = AdaptiveValues.empty(len(frame), len(self.columns), self.n_outputs)
        data = self._prepare(frame)
        buffers = _Buffers.of_this_thread()
        link_fnull = self._link(self._fnull)
        n = len(self.background)
        claims = claims or AllRows(len(frame))
        self.done = np.zeros(len(frame), dtype=bool)
        while claimed := claims.take(1):
            start = claimed.start
            states: dict[int, adaptive.RowState] = {}
            first: dict[int, np.ndarray] = {}
            varying: dict[int, np.ndarray] = {}

            varying[start], state, first[start] = self._plan_adaptive(data, start, seeds, budget, sampling)
            if state is not None:
                states[start] = state
            step = self._rows_per_call(batch_rows, len(first[start]) * n + 1)
            batch_at = [start, *claims.take(step - 1)]
            for i in batch_at[1:]:
                varying[i], state, first[i] = self._plan_adaptive(data, i, seeds, budget, sampling)
                if state is not None:
                    states[i] = state
            timing: list[tuple[int, float]] | None = [] if self._times_calls(batch_rows) else None
            fx = self._adaptive_call(
                data, first, varying, batch_at, seeds, dedupe, buffers, row_ids, result, timing
            )
            if timing:
                self._time_call(*timing[0], explained=len(batch_at))
            for i in batch_at:
                result.fx[i] = fx[i]
                delta = self._link(fx[i]) - link_fnull
                if i not in states:  # one feature takes all the effect, or none varies: exact, as shap
                    if len(varying[i]) == 1:
                        result.values[i, varying[i][0]] = delta
                    continue
                state = states[i]
                state.delta = delta
                targets = first.pop(i)
                adaptive.take_enumerated_targets(state, targets[: len(state.enumerated)])
                if not state.exact:
                    adaptive.take_round_targets(state, targets[len(state.enumerated) :])
                adaptive.solve_row(state, tolerance)
            while drawing := {i: state for i, state in states.items() if state.wants_more()}:
                round_masks = {i: adaptive.draw_round(state) for i, state in drawing.items()}
                self._adaptive_call(
                    data, round_masks, varying, sorted(round_masks), seeds, dedupe, buffers, row_ids, result
                )
                for i, state in drawing.items():
                    adaptive.take_round_targets(state, round_masks[i])
                    adaptive.solve_row(state, tolerance)
            for i, state in states.items():
                assert state.values is not None and state.errors is not None
                result.values[i, varying[i]] = state.values
                result.errors[i, varying[i]] = state.errors
                result.coalitions[i] = state.coalitions
                result.converged[i] = state.exact or state.converged
            self.done[batch_at] = True
        buffers.keep_or_release()
        return result

    def _checked_rows(
        self, rows: pd.DataFrame, seeds: Sequence[int], batch_rows: int | str, dedupe: bool | str
    ) -> pd.DataFrame:
        """`rows` as the engine reads them, once the arguments every explain takes are checked."""
        if dedupe not in (True, False, "auto"):
            raise ValueError(f"dedupe must be true, false or 'auto', got {dedupe!r}")
        if batch_rows != "auto" and not isinstance(batch_rows, int):
            raise ValueError(f"batch_rows must be a number of rows or 'auto', got {batch_rows!r}")
        frame = self._as_rows(rows)
        if len(seeds) != len(frame):
            raise ValueError(f"{len(seeds)} seeds for {len(frame)} rows")
        return frame

    def _plan_adaptive(
        self, data: _Rows, i: int, seeds: Sequence[int], budget: int, sampling: str
    ) -> tuple[np.ndarray, RowState | None, np.ndarray]:
        """Row i's varying features, its sampling state (None when fewer than two vary: exact, as shap) and
        the coalitions of its first call: the enumerated ones and the first round."""
        from shapline.tasks.explainers import adaptive

        varying = self._varying(data.values[i])
        m = len(varying)
        if m < 2:
            return varying, None, np.zeros((0, m))
        state = adaptive.plan_row(m, int(seeds[i]), budget, np.zeros(self.n_outputs), sampling)
        parts = [state.enumerated]
        if not state.exact:
            parts.append(adaptive.draw_round(state, first=True))
        return varying, state, np.concatenate(parts)

    def _adaptive_call(
        self,
        data: _Rows,
        masks: dict[int, np.ndarray],
        varying: dict[int, np.ndarray],
        at: list[int],
        seeds: Sequence[int],
        dedupe: bool | str,
        buffers: _Buffers,
        row_ids: Sequence[object] | None,
        result: AdaptiveValues,
        timing: list[tuple[int, float]] | None = None,
    ) -> dict[int, np.ndarray]:
        """One model call for these rows' coalitions: f(x) of each, and in place of each row's masks the
        targets v(S) - v(empty) of its coalitions, in the link's space (the call timed into `timing`)."""
        n = len(self.background)
        plans = [
            RowPlan(
                int(seeds[i]),
                varying[i],
                masks[i],
                np.zeros(len(masks[i])),
                len(masks[i]),
                0.0,
            )
            for i in at
        ]
        batch = self._batch(plans, data, at)
        try:
            outputs = self._evaluate(batch, self._deduplicates(batch, dedupe), buffers, timing)
        except ModelError as exc:
            if exc.transient:  # an endpoint's fault: retried as it is
                raise
            raise self._refusal(exc, plans, data, at, dedupe, buffers, row_ids) from exc
        link_fnull = self._link(self._fnull)
        fx: dict[int, np.ndarray] = {}
        for k, (i, plan) in enumerate(zip(at, plans, strict=True)):
            fx[i] = outputs[k]
            mine = outputs[batch.offsets[k] : batch.offsets[k] + plan.filled * n]
            masks[i] = self._link(self._background_mean(plan, mine)) - link_fnull
            result.model_rows[i] += plan.filled * n
        return fx

    # ----------------------------------------------------------------------------------------------
    # coalitions

    def _plan(self, rows: _Rows, i: int, seed: int, nsamples: int | str) -> RowPlan:
        varying = self._varying(rows.values[i])
        m = len(varying)
        if m <= 1:  # shap draws nothing: no feature matters, or the only one takes all the effect
            return RowPlan(int(seed), varying, np.zeros((0, m)), np.zeros(0), 0, 0.0)
        masks, weights, filled, fraction = _draw_coalitions(m, nsamples, _seeded(seed))
        return RowPlan(int(seed), varying, masks, weights, filled, fraction)

    def _varying(self, values: np.ndarray) -> np.ndarray:
        """shap's varying_groups (one feature per group) for x's row of frame.to_numpy(), as shap gets it."""
        same: np.ndarray
        if self._numeric:
            # np.allclose(x_j, background_j, equal_nan=True) per column, argument order kept (rtol * |bg|):
            # compiled for floats of the background's dtype (numpy's isclose costs ~0.1 ms a row).
            if self._bg_floats is not None and values.dtype == self._bg_floats.dtype:
                kind = self._bg_floats.dtype.type
                x = np.ascontiguousarray(values)
                same = compiled.same_as_background(x, self._bg_floats, kind(1e-05), kind(1e-08))
            else:
                same = np.asarray(np.isclose(values, self._bg_values, equal_nan=True).all(axis=0))
        elif self._bg_has_na or any(value is pd.NA for value in values):
            # pandas' NA (a nullable column's missing value) == anything is NA, which has no truth value
            # (shap itself stops on it): a missing value is unequal to every value, as NaN is below.
            same = np.asarray(_equal_or_na(self._bg_values, values).all(axis=0))
        else:
            # Element-wise == on object arrays, as shap's all(i == j): NaN != NaN, 1 == 1.0.
            same = np.asarray((self._bg_values == values).all(axis=0))
        return np.flatnonzero(~same)

    # ----------------------------------------------------------------------------------------------
    # synthetic data and the model call

    def _as_rows(self, rows: pd.Series | np.ndarray | pd.DataFrame) -> pd.DataFrame:
        if isinstance(rows, pd.Series):
            rows = rows.to_frame().T
        elif not isinstance(rows, pd.DataFrame):
            array = np.asarray(rows, dtype=None if self._numeric else object)
            rows = pd.DataFrame(array.reshape(-1, len(self.columns)), columns=self.columns)
        missing = [c for c in self.columns if c not in rows.columns]
        if missing:
            raise ValueError(f"rows lack background columns: {', '.join(map(str, missing))}")
        rows = rows[self.columns]
        if rows.dtypes.to_dict() != self.dtypes:
            rows = rows.astype(self.dtypes)
        return rows.reset_index(drop=True)

    def _prepare(self, frame: pd.DataFrame) -> _Rows:
        values = frame.to_numpy()
        blocks = {dtype: frame.iloc[:, cols].to_numpy(dtype=dtype) for dtype, cols in self._blocks.items()}
        extension = {
            j: pd.concat([self.background.iloc[:, j], frame.iloc[:, j]], ignore_index=True).array
            for j in self._extension
        }
        return _Rows(frame, values if self._numeric else values.astype(object, copy=False), blocks, extension)

    def _batch(self, plans: list[RowPlan], rows: _Rows, at: Sequence[int] | np.ndarray) -> _Batch:
        """The call for `plans`, which explain the rows at positions `at` (one plan each, in order)."""
        b, p, n = len(plans), len(self.columns), len(self.background)
        palettes: list[_Palette] = [np.empty(0)] * p
        palette_blocks = {}
        for dtype, positions in self._blocks.items():
            # Columns of one palette block are contiguous (Fortran order) for the fills below.
            block = np.asfortranarray(np.concatenate([self._bg_blocks[dtype], rows.blocks[dtype][at]]))
            palette_blocks[dtype] = block.T
            for k, j in enumerate(positions):
                palettes[j] = block[:, k]
        if self._extension:
            keep = np.concatenate([np.arange(n), n + np.asarray(at)])
            for j in self._extension:
                palettes[j] = rows.extension[j].take(keep)
        masks = [np.ones((b, p), dtype=bool)]
        owners = [np.arange(b)]
        offsets, row = [], b
        for i, plan in enumerate(plans):
            unit = np.zeros((plan.filled, p), dtype=bool)
            unit[:, plan.varying] = plan.masks[: plan.filled] == 1.0
            masks.append(unit)
            owners.append(np.full(plan.filled, i))
            offsets.append(row)
            row += plan.filled * n
        return _Batch(
            plans, palettes, palette_blocks, np.concatenate(masks), np.concatenate(owners), offsets, row
        )

    def _row_sources(self, batch: _Batch, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The unit and background row of each given row of the call (0 for explained rows)."""
        b, n = len(batch.plans), len(self.background)
        synthetic = np.maximum(rows - b, 0)
        units = np.where(rows < b, rows, b + synthetic // n)
        return units, np.where(rows < b, 0, synthetic % n)

    def _fill(
        self, batch: _Batch, buffers: _Buffers, rows: np.ndarray | None = None
    ) -> tuple[dict[np.dtype, np.ndarray], dict[int, _Palette]]:
        """Every row of the call, per column: the background tiled, then x written into its coalitions; with
        `rows`, only those rows of the call (a deduplicated call's distinct rows), in that order.

        Returns one (columns, rows) block per numpy dtype and the extension-typed columns; a row-major
        engine's one block is the transpose of the (rows, columns) array it wrote row by row.
        """
        n, b = len(self.background), len(batch.plans)
        coalitions, owners = batch.unit_mask[b:], batch.unit_plan[b:]
        length = batch.n_rows if rows is None else len(rows)
        blocks: dict[np.dtype, np.ndarray] = {}
        if self._row_major:
            ((dtype, positions),) = self._blocks.items()
            by_row = buffers.get(dtype, dtype, (length, len(positions)))
            # (n + B, columns), and both as bit patterns: the fills copy values bit for bit.
            palettes = compiled.as_bits(np.ascontiguousarray(batch.palette_blocks[dtype].T))
            bits, mask = compiled.as_bits(by_row), coalitions[:, positions]
            if rows is None:
                compiled.fill_synthetic_by_row(bits, palettes, mask, owners, n)
            else:
                compiled.fill_rows_by_row(bits, palettes, mask, owners, n, rows)
            return {dtype: by_row.T}, {}
        for dtype, positions in self._blocks.items():
            # One block per dtype: many separate multi-megabyte columns cost several times more.
            block = blocks[dtype] = buffers.get(dtype, dtype, (len(positions), length))
            if dtype in compiled.FILLED_DTYPES:
                palettes = batch.palette_blocks[dtype]
                if rows is None:
                    compiled.fill_synthetic(block, palettes, coalitions[:, positions], owners, n)
                else:
                    compiled.fill_rows(block, palettes, coalitions[:, positions], owners, n, rows)
            else:  # datetimes, objects: each value taken from the palette by its position
                for k, j in enumerate(positions):
                    palette = batch.palette_blocks[dtype][k]
                    np.take(palette, self._palette_positions(batch, j, buffers, rows), out=block[k])
        extension: dict[int, _Palette] = {
            j: batch.palettes[j].take(self._palette_positions(batch, j, buffers, rows))
            for j in self._extension
        }
        return blocks, extension

    def _palette_positions(
        self, batch: _Batch, j: int, buffers: _Buffers, rows: np.ndarray | None = None
    ) -> np.ndarray:
        """Where each row of the call (or each of `rows`) finds its column-j value in the palette (the n
        background values, then the B explained rows'): written as fill_synthetic writes values, into a
        buffer the next call reuses (take from it at once)."""
        n, b = len(self.background), len(batch.plans)
        length = batch.n_rows if rows is None else len(rows)
        index = buffers.get("index", np.dtype(np.intp), (1, length))
        where = np.arange(n + b)[np.newaxis]
        column = np.ascontiguousarray(batch.unit_mask[b:, j : j + 1])
        if rows is None:
            compiled.fill_synthetic(index, where, column, batch.unit_plan[b:], n)
        else:
            compiled.fill_rows(index, where, column, batch.unit_plan[b:], n, rows)
        return index[0]

    def _assemble(
        self, blocks: dict[np.dtype, np.ndarray], extension: dict[int, _Palette]
    ) -> pd.DataFrame | np.ndarray:
        """A frame over the blocks' memory (no copy), columns in the background's order; for `predict_array`,
        the row-major array itself."""
        if self._predict_array is not None:
            (block,) = blocks.values()  # (columns, rows): the transpose of the array written row by row
            return block.T
        if len(blocks) == 1 and not extension:
            # One dtype: pandas keeps the (columns, rows) block as its single internal block.
            (block,) = blocks.values()
            return pd.DataFrame(block.T, columns=self.background.columns, copy=False)
        columns: dict[int, object] = dict(extension)
        for dtype, positions in self._blocks.items():
            columns.update({j: blocks[dtype][k] for k, j in enumerate(positions)})
        frame = pd.DataFrame({j: columns[j] for j in range(len(self.columns))}, copy=False)
        frame.columns = self.background.columns  # the background's own labels (and index dtype)
        return frame

    def _evaluate(
        self, batch: _Batch, dedupe: bool, buffers: _Buffers, timing: list[tuple[int, float]] | None = None
    ) -> np.ndarray:
        """The model's outputs for every row of the call, (rows, outputs); with `timing`, the call's rows and
        the seconds of the model's call alone are appended to it (what batch_rows "auto" weighs: writing the
        rows costs the same whether calls are merged or not, and a first write can pay first-time costs)."""
        if dedupe:
            groups = self._distinct_rows(batch)
            if groups is not None:
                first, codes = groups
                # Only the distinct rows are written (their first copies), and sent.
                blocks, extension = self._fill(batch, buffers, first)
                outputs = self._timed_predict(self._assemble(blocks, extension), batch, timing)
                self._count(len(first), batch.n_rows - len(first))
                return outputs[codes]
        blocks, extension = self._fill(batch, buffers)
        outputs = self._timed_predict(self._assemble(blocks, extension), batch, timing)
        self._count(batch.n_rows, 0)
        return outputs

    def _refusal(
        self,
        exc: ModelError,
        plans: list[RowPlan],
        data: _Rows,
        at: list[int],
        dedupe: bool | str,
        buffers: _Buffers,
        row_ids: Sequence[object] | None,
    ) -> ModelError:
        """A call the model refused (`exc`), named by the rows it explained. Where several rows' calls were
        merged, each row's call is made alone until the model refuses one, which is named, as a call of one
        row would have been; if it refuses none, or calls are not cheap, the merged call's rows are."""

        def name(i: int) -> object:
            return row_ids[i] if row_ids is not None else i

        if len(plans) > 1 and self.calls_are_cheap:
            for plan, i in zip(plans, at, strict=True):
                alone = self._batch([plan], data, [i])
                try:
                    self._evaluate(alone, self._deduplicates(alone, dedupe), buffers)
                except ModelError as refused:
                    if refused.transient:
                        raise
                    return ModelError(f"explaining {rows_named([name(i)])}: {refused}")
        return ModelError(f"explaining {rows_named([name(i) for i in at])}: {exc}")

    def _timed_predict(
        self, frame: pd.DataFrame | np.ndarray, batch: _Batch, timing: list[tuple[int, float]] | None
    ) -> np.ndarray:
        if timing is None:
            return self._predict(frame)
        started = _clock()
        outputs = self._predict(frame)
        timing.append((batch.n_rows, _clock() - started))
        return outputs

    def _times_calls(self, batch_rows: int | str) -> bool:
        """Whether the next call is timed: batch_rows "auto" not yet decided."""
        return batch_rows == "auto" and self._auto_rows is None

    def _rows_per_call(self, batch_rows: int | str, rows_of_one: int) -> int:
        """Explained rows in the next call, whose first row's call has `rows_of_one` model rows: `batch_rows`,
        or with "auto" as many as the model's call cost makes worth it, once known (else one, whose call is
        then timed)."""
        if isinstance(batch_rows, int):
            return max(1, batch_rows)
        if self._auto_rows is None and self.call_cost is not None:
            self._decide_rows(self.call_cost, rows_of_one)
        if self._auto_rows is None:  # the first call, timed
            return self._rows_in_budget(rows_of_one)
        return self._auto_rows

    def _rows_in_budget(self, rows_of_one: int) -> int:
        """Explained rows whose calls of `rows_of_one` model rows each fit _FIRST_CALL_BYTES (at least one)."""
        return max(1, _FIRST_CALL_BYTES // max(1, rows_of_one * self._row_bytes))

    def _time_call(self, n_rows: int, seconds: float, explained: int) -> None:
        """Measure the model's call cost from this call (`explained` rows' calls merged, `n_rows` model rows)
        and the background's, and decide batch_rows "auto" from it."""
        n = len(self.background)
        if n_rows <= 2 * n:  # too few rows to tell a cost per row from a cost per call: wait
            return
        per_row = max(seconds - self._background_call, 0.0) / (n_rows - n)
        self.call_cost = CallCost(max(self._background_call - n * per_row, 0.0), per_row)
        self._decide_rows(self.call_cost, math.ceil(n_rows / explained))

    @property
    def _row_bytes(self) -> int:
        """The bytes of one synthetic row as the engine writes it."""
        row_bytes = sum(block.dtype.itemsize * block.shape[1] for block in self._bg_blocks.values())
        return row_bytes + 8 * len(self._extension)

    def _decide_rows(self, cost: CallCost, rows: int) -> None:
        merged = max(_rows_to_merge(cost, rows, self._row_bytes), self._rows_in_budget(rows))
        with self._lock:
            if self._auto_rows is None:
                self._auto_rows = merged

    def _deduplicates(self, batch: _Batch, dedupe: bool | str) -> bool:
        if dedupe != "auto":
            return bool(dedupe)
        if self._auto_dedupe is None and any(plan.filled for plan in batch.plans):
            share = self._repeat_share(batch)
            with self._lock:
                if self._auto_dedupe is None:
                    self._auto_dedupe = share >= _REPEAT_SHARE
        return bool(self._auto_dedupe)

    def _repeat_share(self, batch: _Batch) -> float:
        """An estimate of the share of the call's rows that repeat: that of a sample of its synthetic rows.

        The sample is the call's first row with synthetic rows: up to _REPEAT_SAMPLE of its coalitions,
        evenly spaced, each with every background row (the whole row when it has that few coalitions).
        Rows are compared by hash, enough for an estimate (a collision only lowers it); the rows the
        call deduplicates are verified value by value.
        """
        b = len(batch.plans)
        i = next(i for i, plan in enumerate(batch.plans) if plan.filled)
        first_unit = b + sum(plan.filled for plan in batch.plans[:i])
        filled = batch.plans[i].filled
        picks = np.unique(np.linspace(0, filled - 1, min(filled, _REPEAT_SAMPLE)).round().astype(np.intp))
        _, _, table_bg, table_x, _ = self._hash_tables(batch)
        units = batch.unit_mask[first_unit + picks].astype(np.uint64)
        hashes = units @ (table_x[i][:, None] - table_bg.T) + table_bg.sum(axis=1)
        return 1.0 - len(np.unique(hashes)) / hashes.size

    def _hash_tables(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
        """Codes of the background's and the x's values, per column (NaN one code), and a number per code:
        (codes_bg, codes_x, table_bg, table_x, exact), background rows and x's by columns.

        When every combination of the columns' codes fits in 62 bits (few columns, or few values in each:
        text, one-hot, small integers), a code's number is its place value, code x the product of the
        earlier columns' counts: a row's sum is then the row itself, written in mixed radix, so equal sums
        are equal rows (exact). Otherwise it is a random 64-bit number, and equal sums are only likely so.
        """
        n, b, p = len(self.background), len(batch.plans), len(self.columns)
        codes_bg = np.empty((n, p), dtype=np.intp)
        codes_x = np.empty((b, p), dtype=np.intp)
        counts = []
        for j, palette in enumerate(batch.palettes):
            codes, uniques = pd.factorize(_exact_keys(palette), use_na_sentinel=False)  # type: ignore[arg-type]
            codes_bg[:, j], codes_x[:, j] = codes[:n], codes[n:]
            counts.append(len(uniques))
        exact = math.prod(counts) < 2**62
        if exact:
            places = np.cumprod([1, *counts], dtype=np.uint64)[:-1]
            numbers = [
                np.arange(count, dtype=np.uint64) * place for count, place in zip(counts, places, strict=True)
            ]
        else:
            rng = np.random.default_rng(_HASH_SEED)
            numbers = [
                rng.integers(0, np.iinfo(np.uint64).max, size=count, dtype=np.uint64, endpoint=True)
                for count in counts
            ]
        table_bg = np.empty((n, p), dtype=np.uint64)
        table_x = np.empty((b, p), dtype=np.uint64)
        for j, number in enumerate(numbers):
            table_bg[:, j], table_x[:, j] = number[codes_bg[:, j]], number[codes_x[:, j]]
        return codes_bg, codes_x, table_bg, table_x, exact

    def _distinct_rows(self, batch: _Batch) -> tuple[np.ndarray, np.ndarray] | None:
        """(first row of each distinct row, distinct index of every row), or None on a hash collision.

        Values are coded per column (NaN one code), each row is keyed as a sum of numbers, one per (column,
        code): the row itself in mixed radix where that fits (`_hash_tables`), else a random 64-bit hash,
        and then every merge is verified on the codes themselves.
        """
        b, n = len(batch.plans), len(self.background)
        codes_bg, codes_x, table_bg, table_x, exact = self._hash_tables(batch)
        hashes = np.empty(batch.n_rows, dtype=np.uint64)
        hashes[:b] = table_x.sum(axis=1)
        base = table_bg.sum(axis=1)
        units = batch.unit_mask[b:].astype(np.uint64)
        first_unit = 0
        for i, plan in enumerate(batch.plans):
            mine = units[first_unit : first_unit + plan.filled]
            first_unit += plan.filled
            if plan.filled:
                # Coalition s, background row r: sum_j table_bg[r, j] + sum_j mask[s, j] (table_x[j] -
                # table_bg[r, j]), all modulo 2**64 (unsigned wrap-around is what a hash sum wants).
                block = mine @ (table_x[i][:, None] - table_bg.T) + base
                hashes[batch.offsets[i] : batch.offsets[i] + plan.filled * n] = block.ravel()
        codes, _ = pd.factorize(hashes)
        running = np.maximum.accumulate(codes)
        is_first = np.ones(len(codes), dtype=bool)
        is_first[1:] = codes[1:] > running[:-1]  # factorize numbers values in order of first appearance
        first = np.flatnonzero(is_first)
        repeats = np.flatnonzero(~is_first)

        def row_codes(rows: np.ndarray) -> np.ndarray:
            units_, background_rows = self._row_sources(batch, rows)
            return np.where(
                batch.unit_mask[units_], codes_x[batch.unit_plan[units_]], codes_bg[background_rows]
            )

        if exact or not len(repeats):
            return first, codes
        if not np.array_equal(row_codes(repeats), row_codes(first[codes[repeats]])):
            return None
        return first, codes

    def _predict(self, frame: pd.DataFrame | np.ndarray) -> np.ndarray:
        started, cpu = _clock(), time.thread_time()
        try:
            if isinstance(frame, pd.DataFrame):
                out = _two_d(self.predict(frame))
            elif self._predict_array is not None:
                out = _two_d(self._predict_array(frame))
            else:  # _assemble gives an array only to predict_array
                raise TypeError("an array of rows for an engine without predict_array")
        finally:
            spent, computed = _clock() - started, time.thread_time() - cpu
            with self._lock:
                self.model_seconds += spent
                self.model_cpu_seconds += computed
        if out.shape[0] != len(frame):
            raise ValueError(f"predict returned {out.shape[0]} rows for {len(frame)}")
        return out

    def _count(self, sent: int, saved: int) -> None:
        with self._lock:
            self.rows_sent += sent
            self.rows_saved += saved

    def _background_mean(self, plan: RowPlan, outputs: np.ndarray) -> np.ndarray:
        """(nsamples, outputs) weighted mean over the background of each coalition's outputs."""
        ey = np.zeros((len(plan.masks), outputs.shape[1]))
        if outputs.dtype not in (np.float32, np.float64):
            outputs = outputs.astype(float)
        outputs = np.ascontiguousarray(outputs)  # a model's column view: one compiled layout
        # Background row by background row, from zero: the order of additions of shap's compiled
        # _exp_val, so the solve sees bit-identical targets and LARS breaks exact ties the same way (a
        # BLAS dot would differ in the last bits).
        compiled.background_mean(outputs, self.weights, ey[: plan.filled])
        return ey

    # ----------------------------------------------------------------------------------------------
    # the solve

    def _solve(self, plan: RowPlan, ey: np.ndarray, fx: np.ndarray, l1_reg: str | float | bool) -> np.ndarray:
        phi = np.zeros((len(self.columns), self.n_outputs))
        m = len(plan.varying)
        if m == 0:
            return phi
        link_fnull = self._link(self._fnull)
        delta = self._link(fx) - link_fnull  # in fx's own dtype first, as shap does (float32 for XGBoost)
        if m == 1:
            phi[plan.varying[0]] = delta
            return phi
        design = _Design(plan.masks, plan.kernel_weights)
        for d in range(self.n_outputs):
            target = self._link(ey[:, d]) - link_fnull[d]
            phi[plan.varying, d] = _solve_output(design, target, delta[d], l1_reg, plan.fraction_evaluated)
        return phi


def _rows_to_merge(cost: CallCost, rows: int, row_bytes: int) -> int:
    """Explained rows whose calls to merge into one, for calls of `rows` rows (one explained row's
    coalitions x background) costing `cost`: merging k rows' calls pays the cost per call once for k, so
    k is the least that makes it at most _FIXED_SHARE of the call, and no more than keeps a call's
    synthetic rows (`row_bytes` each) within the buffers a thread keeps (_Buffers.KEPT_BYTES)."""
    largest = max(1, _Buffers.KEPT_BYTES // max(1, rows * row_bytes))
    if cost.per_call <= _FIXED_SHARE * cost.per_row * rows:
        return 1
    if cost.per_row == 0.0:
        return largest
    return min(largest, math.ceil(cost.per_call / (_FIXED_SHARE * cost.per_row * rows)))


def _equal_or_na(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Element-wise ==, broadcast, with pandas' NA unequal to every value (NA included)."""
    return np.frompyfunc(lambda a, b: a is not pd.NA and b is not pd.NA and bool(a == b), 2, 1)(
        left, right
    ).astype(bool)


def _two_d(values: object) -> np.ndarray:
    """The model's output as (rows, outputs), in its own float dtype (shap links f(x) in that dtype)."""
    array = np.asarray(values)
    if array.dtype.kind not in "fc":
        array = array.astype(float)
    return array.reshape(len(array), -1) if array.ndim != 2 else array


# --------------------------------------------------------------------------------------------------
# sampling: shap's KernelExplainer.explain, with the same RNG calls in the same order


def _draw_coalitions(
    m: int, nsamples: int | str, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """shap's coalitions for m features: (masks, kernel weights, coalitions drawn, fraction evaluated)."""
    count = 2 * m + 2**11 if nsamples == "auto" else int(nsamples)
    max_samples = 2**30
    if m <= 30:
        max_samples = 2**m - 2
        count = min(count, max_samples)
    masks = np.zeros((count, m))
    weights = np.zeros(count)
    num_subset_sizes = int(np.ceil((m - 1) / 2.0))
    num_paired = int(np.floor((m - 1) / 2.0))
    enumerated, enumerated_weights, num_full, weight_vector = _enumerated_coalitions(m, count)
    added = len(enumerated)
    masks[:added] = enumerated
    weights[:added] = enumerated_weights

    nfixed = added
    samples_left = count - added
    if num_full != num_subset_sizes and samples_left > 0:
        left = weight_vector.copy()
        left[:num_paired] /= 2  # a paired draw adds two coalitions
        left = left[num_full:]
        left /= np.sum(left)
        # rng.choice(len(left), 4 * samples_left, p=left), its own arithmetic: the cdf it builds and the
        # uniform draws it makes, searched as its searchsorted does (not its argument checks, 0.15 ms)
        cdf = left.cumsum()
        cdf /= cdf[-1]
        sizes = compiled.searchsorted_right(cdf, rng.random_sample(4 * samples_left)) + num_full + 1
        added = _random_coalitions(m, sizes, num_paired, samples_left, rng, masks, weights, nfixed)
        weight_left = np.sum(weight_vector[num_full:])
        weights[nfixed:] *= weight_left / weights[nfixed:].sum()
    return masks, weights, added, count / max_samples


@functools.lru_cache(maxsize=64)
def _enumerated_coalitions(m: int, count: int) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The coalitions shap enumerates for m features and a budget of `count` (no randomness, so the same for
    every row with as many varying features): (masks, kernel weights, sizes enumerated, weight per size)."""
    # Subset sizes 1..ceil((m-1)/2); a size below m/2 also stands for its complement's size ("paired").
    num_subset_sizes = int(np.ceil((m - 1) / 2.0))
    num_paired = int(np.floor((m - 1) / 2.0))
    weight_vector = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, num_subset_sizes + 1)])
    weight_vector[:num_paired] *= 2
    weight_vector /= np.sum(weight_vector)

    # Enumerate every subset of the sizes the budget covers, smallest first.
    num_full = 0
    budget = count
    remaining = weight_vector.copy()
    blocks, weights = [np.zeros((0, m))], [np.zeros(0)]
    for size in range(1, num_subset_sizes + 1):
        paired = size <= num_paired
        nsubsets = binom(m, size) * (2 if paired else 1)
        if budget * remaining[size - 1] / nsubsets < 1.0 - 1e-8:
            break
        num_full += 1
        budget -= nsubsets
        if remaining[size - 1] < 1.0:
            remaining /= 1 - remaining[size - 1]
        w = weight_vector[size - 1] / binom(m, size)
        if paired:
            w /= 2.0
        subsets = np.array(list(itertools.combinations(range(m), size)), dtype=np.intp)
        block = np.zeros((len(subsets), m))
        block[np.arange(len(subsets))[:, None], subsets] = 1.0
        if paired:  # each subset is followed by its complement
            block = np.stack([block, 1.0 - block], axis=1).reshape(-1, m)
        blocks.append(block)
        weights.append(np.full(len(block), w))
    cached = (np.concatenate(blocks), np.concatenate(weights), num_full, weight_vector)
    for array in (cached[0], cached[1], cached[3]):
        array.flags.writeable = False  # shared by every row's plan
    return cached


def _random_coalitions(
    m: int,
    sizes: np.ndarray,
    num_paired: int,
    samples_left: int,
    rng: np.random.RandomState,
    masks: np.ndarray,
    weights: np.ndarray,
    start: int,
) -> int:
    """shap's random phase, vectorised: fills masks/weights from row `start`; returns the rows filled.

    Draw i takes the first sizes[i] features of rng.permutation(m). A coalition not drawn before adds a
    row (and its complement's, when its size is paired and budget remains); a repeat adds 1 to the
    weight of the earlier row (and of the row after it, when paired). shap stops once the budget is
    spent: the draws it makes are a prefix of ours, and any we draw past it are never used.
    """
    if m <= 63:  # each coalition one machine word: shap's loop itself, compiled
        steps = max(m - 1, 1)
        raw = rng.randint(0, 2**32, size=(samples_left // 2 + 64) * steps * 3 // 2, dtype=np.uint32)
        while (
            end := compiled.random_coalitions(raw, sizes, num_paired, samples_left, masks, weights, start)
        ) < 0:
            # ~1.4 outputs a swap (the rejections); repeats need more draws: half as many again, from
            # the same stream, and the loop runs again from its start
            more = rng.randint(0, 2**32, size=len(raw) // 2 + 64, dtype=np.uint32)
            raw = np.concatenate([raw, more])
        return int(end)
    chunks: list[np.ndarray] = []
    shuffles = _Shuffles(rng)
    drawn, needed = 0, samples_left
    while True:
        # Enough draws for the remaining budget if each were new and paired, plus some for repeats.
        count = min(len(sizes) - drawn, needed // 2 + 64)
        chunks.append(compiled.leading_sets(shuffles.swaps(m, count), sizes[drawn : drawn + count]))
        drawn += count
        coalitions = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        _, first, inverse = np.unique(_coalition_keys(coalitions), return_index=True, return_inverse=True)
        original = first[inverse]  # the first draw of each draw's coalition
        new = original == np.arange(drawn)
        paired = sizes[:drawn] <= num_paired
        gain = np.where(new, 1 + paired, 0)
        total = np.cumsum(gain)
        done = np.flatnonzero(total >= samples_left)
        if len(done) or drawn == len(sizes):
            break
        needed = samples_left - int(total[-1])
    stop = int(done[0]) + 1 if len(done) else drawn
    gain = gain[:stop].copy()
    if len(done):
        gain[-1] -= int(total[stop - 1]) - samples_left  # the last new coalition's complement may not fit
    before = np.cumsum(gain) - gain  # rows added before each draw
    n_rows = int(gain.sum())
    source = np.repeat(np.arange(stop), gain)
    complement = np.arange(n_rows) - np.repeat(before, gain) == 1
    masks[start : start + n_rows] = coalitions[source] != complement[:, None]
    weights[start : start + n_rows] = 1.0
    repeat = ~new[:stop]
    earlier = start + before[original[:stop]]
    np.add.at(weights, earlier[repeat], 1.0)
    np.add.at(weights, earlier[repeat & paired[:stop]] + 1, 1.0)
    return start + n_rows


_RNG = threading.local()


def _seeded(seed: int) -> np.random.RandomState:
    """This thread's RandomState, seeded as `np.random.RandomState(seed)` is (legacy seeding, no Gaussian
    kept): the same stream, without a new generator's ~0.09 ms of OS entropy that the seed then replaces."""
    rng = getattr(_RNG, "rng", None)
    if rng is None:
        rng = _RNG.rng = np.random.RandomState(seed)
    else:
        rng.seed(seed)
    return rng


class _Shuffles:
    """The swaps of successive rng.shuffle calls on range(m), drawn from one RandomState in bulk.

    shuffle draws each swap partner by masked rejection on the generator's 32-bit outputs; the compiled
    `shuffle_swaps` does the same on outputs drawn ahead in one call, so the swaps are shuffle's, in the
    same order, at a fraction of randint's per-bound cost. The generator ends up past where shuffle would
    leave it (outputs drawn ahead and not needed): each row's RandomState is used for nothing after.
    """

    def __init__(self, rng: np.random.RandomState) -> None:
        self.rng = rng
        self.raw = np.empty(0, dtype=np.uint32)
        self.at = 0

    def swaps(self, m: int, count: int) -> np.ndarray:
        """(count, m - 1) int32: swap partner j of each step (position m - 1 - step) of `count` shuffles."""
        swaps = np.empty((count, max(m - 1, 0)), dtype=np.int32)
        while (at := compiled.shuffle_swaps(self.raw, self.at, swaps)) < 0:
            # About 1.4 outputs a swap are needed (the rejections); draw half again, more if that fell short.
            ahead = self.rng.randint(0, 2**32, size=swaps.size * 3 // 2 + 64, dtype=np.uint32)
            self.raw, self.at = np.concatenate([self.raw[self.at :], ahead]), 0
        self.at = at
        return swaps


def _coalition_keys(coalitions: np.ndarray) -> np.ndarray:
    """One sortable key per coalition (row of booleans)."""
    m = coalitions.shape[1]
    if m <= 63:
        return coalitions @ (np.int64(1) << np.arange(m, dtype=np.int64))
    packed = np.ascontiguousarray(np.packbits(coalitions, axis=1))
    return packed.view(np.dtype((np.void, packed.shape[1]))).ravel()


# --------------------------------------------------------------------------------------------------
# the solve: shap's KernelExplainer.solve


class _Design:
    """The output-independent parts of a row's regression, computed once and shared by every output."""

    def __init__(self, masks: np.ndarray, kernel_weights: np.ndarray) -> None:
        self.masks = masks
        self.kernel_weights = kernel_weights
        self.m = masks.shape[1]
        self._augmented: tuple[np.ndarray, np.ndarray] | None = None
        self._centred: tuple[np.ndarray, np.ndarray] | None = None

    def augmented(self) -> tuple[np.ndarray, np.ndarray]:
        """shap's (mask_aug, sqrt(w_aug)): every coalition once as itself and once as its complement."""
        if self._augmented is None:
            # The same single product per element as shap's vstack-then-scale, in the same C memory
            # order (the column sums in centred() add in memory order).
            self._augmented = compiled.augmented_design(self.masks, self.kernel_weights)
        return self._augmented

    def centred(self) -> tuple[np.ndarray, np.ndarray]:
        """mask_aug scaled as StandardScaler(with_mean=False) and centred as LassoLarsIC, and its Gram."""
        if self._centred is None:
            design, _ = self.augmented()
            scaled = compiled.scaled_centred(design)
            self._centred = scaled, np.dot(scaled.T, scaled)
        return self._centred


def _solve_output(
    design: _Design, target: np.ndarray, delta: float, l1_reg: str | float | bool, fraction: float
) -> np.ndarray:
    """phi for one output: feature selection by l1_reg, then the constrained weighted least squares."""
    masks, kernel_weights, m = design.masks, design.kernel_weights, design.m
    selected = np.arange(m)
    if l1_reg == "auto":
        warnings.warn(
            "l1_reg='auto' is deprecated and will be removed in a future version.",
            DeprecationWarning,
            stacklevel=3,
        )
    # shap's test: 0, 0.0 and False all switch selection off, and 'auto' selects only below 20%.
    if (l1_reg not in ["auto", False, 0]) or (fraction < 0.2 and l1_reg == "auto"):
        augmented, w_sqrt = design.augmented()
        target_aug = np.hstack((target, target - delta)) * w_sqrt
        if isinstance(l1_reg, str) and l1_reg.startswith("num_features("):
            from sklearn.linear_model import lars_path

            # As shap calls it (no Gram): the order of entry decides which feature is eliminated below.
            selected = lars_path(augmented, target_aug, max_iter=int(l1_reg[len("num_features(") : -1]))[1]
        elif l1_reg in ("auto", "bic", "aic"):
            selected = _information_criterion_support(
                design, target_aug, "aic" if l1_reg == "auto" else l1_reg
            )
        else:
            from sklearn.linear_model import Lasso

            selected = np.nonzero(Lasso(alpha=l1_reg).fit(augmented, target_aug).coef_)[0]
    if len(selected) == 0:
        return np.zeros(m)

    # Eliminate the last selected feature with the constraint that the values sum to delta, then solve
    # the weighted normal equations (shap's expressions, so the result matches to the last bits).
    last = selected[-1]
    target2 = target - masks[:, last] * delta
    # etmp = np.transpose(np.transpose(masks[:, selected[:-1]]) - masks[:, last]) and kernel_weights[:, None]
    # * etmp, in one pass: the same values in the same (Fortran) order, so the products below are shap's.
    etmp, weighted = compiled.eliminated_design(
        masks, np.ascontiguousarray(selected[:-1], dtype=np.intp), int(last), kernel_weights
    )
    try:
        w = np.linalg.solve(etmp.T @ weighted, weighted.T @ target2)
    except np.linalg.LinAlgError:
        warnings.warn(
            "Linear regression equation is singular, a least squares solution is used instead; "
            "use more samples, a num_features(N) l1_reg, or fewer features.",
            stacklevel=3,
        )
        sqrt_w = np.sqrt(kernel_weights)
        w = np.linalg.lstsq(sqrt_w[:, None] * etmp, sqrt_w * target2, rcond=None)[0]
    phi = np.zeros(m)
    phi[selected[:-1]] = w
    phi[last] = delta - sum(w)  # Python's left-to-right sum, as shap
    phi[np.abs(phi) < 1e-10] = 0.0
    return phi


def _information_criterion_support(design: _Design, target_aug: np.ndarray, criterion: str) -> np.ndarray:
    """The features of make_pipeline(StandardScaler(with_mean=False), LassoLarsIC(criterion)).fit(...).

    The LARS path is scikit-learn's (`lars.lasso_path_gram`: its lars_path_gram step for step, bit for
    bit) on bit-identical inputs: the same scaling, centring and Gram as the pipeline. Only scoring the
    path is cheaper: LassoLarsIC refits an OLS on the whole augmented design (an SVD) for the noise
    variance and multiplies the design by every point of the path for its residuals; here both come
    from the Gram (the OLS residual still taken directly). Both agree with scikit-learn to ~1e-14
    relative; if another point of the path scores within a margin far above that of the best,
    scikit-learn's exact scoring decides instead.
    """
    x, gram = design.centred()
    n, p = x.shape
    if n <= p + 1:
        raise ValueError(
            "LassoLarsIC needs more samples than features to estimate the noise variance; "
            f"got {n} augmented samples for {p} features: use more samples or l1_reg='num_features(k)'"
        )
    y = target_aug - np.mean(target_aug)
    xy = np.dot(x.T, y)
    _, _, path = lasso_path_gram(xy, gram, n_samples=n, max_iter=500, eps=np.finfo(float).eps)
    dof = np.sum(np.abs(path) > np.finfo(path.dtype).eps, axis=0)
    factor = 2 if criterion == "aic" else math.log(n)

    def scores(noise_variance: float, rss: np.ndarray) -> np.ndarray:
        return n * np.log(2 * np.pi * noise_variance) + rss / noise_variance + factor * dof

    yy = float(np.dot(y, y))
    noise = _noise_variance(x, gram, xy, y, yy)
    if noise is not None:
        rss = yy - 2 * (xy @ path) + np.sum(path * (gram @ path), axis=0)
        crit = scores(noise, rss)
        best = int(np.argmin(crit))
        # Error in a score: from the variance (relative ~1e-13), e * |rss_k - rss_best| / variance
        # on a gap; from these rss (absolute ~1e-14 * yy), that over the variance. Margins ~1e4 above.
        gap = crit - crit[best]
        gap[best] = np.inf
        margin = _TIE_MARGIN * (1.0 + np.abs(rss - rss[best]) / noise) + 1e-10 * yy / noise
        if np.all(gap > margin):
            return np.nonzero(path[:, best])[0]
    rss = np.sum((y[:, np.newaxis] - np.dot(x, path)) ** 2, axis=0)
    crit = scores(_sklearn_noise_variance(x, y), rss)
    return np.nonzero(path[:, int(np.argmin(crit))])[0]


def _noise_variance(
    x: np.ndarray, gram: np.ndarray, xy: np.ndarray, y: np.ndarray, yy: float
) -> float | None:
    """The OLS residual variance from the normal equations, or None when they cannot be trusted."""
    n, p = x.shape
    try:
        beta = np.linalg.solve(gram, xy)
    except np.linalg.LinAlgError:
        return None
    residual = y - x @ beta  # taken directly, its error is second order in beta's
    rss = float(np.dot(residual, residual))
    # A (near) perfect fit leaves only rounding noise, which no two computations agree on.
    if not np.isfinite(rss) or rss <= 1e-12 * yy:
        return None
    return rss / (n - p - 1)


def _sklearn_noise_variance(x: np.ndarray, y: np.ndarray) -> float:
    """LassoLarsIC._estimate_noise_variance: an OLS refit without intercept on the centred data."""
    from sklearn.linear_model import LinearRegression

    n, p = x.shape
    fitted = LinearRegression(fit_intercept=False).fit(x, y).predict(x)
    return float(np.sum((y - fitted) ** 2) / (n - p - 1))


# --------------------------------------------------------------------------------------------------
# warm-up


def warm_up() -> None:
    """Do now what a process's first explain would do on top of its work, beside a run's loading and
    validation (the thread runner's warm-up thread, a worker pool's fork server): load the compiled code
    (`compiled.warm_up`), then explain two rows of a small frame with a column of each kind the engine
    builds (floats with NaN, integers, booleans, text in pyarrow and as Python strings, categories, nullable
    integers) through a model of arithmetic, deduplicated and not: pandas' and pyarrow's own first calls for
    them (~10 ms of the penguins flow's first shard, measured)."""
    compiled.warm_up()
    frame = pd.DataFrame(
        {
            "number": [0.5, np.nan, 2.0, 1.5, -1.0, 3.0],
            "count": np.arange(6, dtype=np.int64),
            "flag": [True, False, True, False, False, True],
            "text": pd.array(["a", None, "b", "a", "c", "b"], dtype="str"),
            "words": pd.array(
                ["x", "y", None, "x", "y", "z"], dtype=pd.StringDtype("python", na_value=np.nan)
            ),
            "kind": pd.Categorical(["p", "q", "p", "r", "q", "p"]),
            "nullable": pd.array([1, 2, 3, 2, 1, 4], dtype="Int64"),
        }
    )

    def model(rows: pd.DataFrame) -> np.ndarray:
        score = (
            np.nan_to_num(rows["number"].to_numpy(float)) * (1.0 + rows["count"].to_numpy(float))
            + rows["flag"].to_numpy(float) * (rows["text"] == "a").to_numpy(float)
            - (rows["words"] == "x").to_numpy(float)
            + (rows["kind"] == "p").to_numpy(float) * rows["nullable"].to_numpy(float) ** 2
        )
        high = 1.0 / (1.0 + np.exp(-0.3 * score))
        return np.column_stack([1.0 - high, high])

    engine = KernelEngine(model, frame.iloc[:4], link="logit")
    for dedupe in (True, False):
        engine.explain(frame.iloc[4:], seeds=[0, 1], l1_reg="aic", batch_rows="auto", dedupe=dedupe)
