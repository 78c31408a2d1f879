"""Every model, wherever it lives, is a Predictor: frame in, a 2-D array of outputs out."""

from __future__ import annotations

import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.errors import ModelError
from shapline.tasks.models.limits import RequestLimit

_THREAD_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class CallCost:
    """What one call of a model costs in this process, in seconds: a part per call whatever its rows (a
    Pipeline's checks and conversions) and a part per row. The kernel engine times it on its first call;
    kept on the predictor, so the process's later shards merge their calls from their first."""

    per_call: float
    per_row: float


class Predictor(ABC):
    """A model behind one call signature; the explainer never knows where it lives."""

    name: str
    method: str
    feature_names: list[str] | None = None
    class_labels: list[str] | None = None
    # Columns predict() returns, when known without asking the model (saves a remote model a round trip).
    output_width: int | None = None
    # Each row sent costs (an endpoint bills its inference): the kernel explainer sends a distinct row once.
    pays_per_row: bool = False
    # The model reads every number as a 32-bit float (XGBoost casts its input, rounding to nearest): float64
    # columns handed to it as float32 give the same outputs bit for bit, with half the memory to write and read.
    reads_float32: bool = False
    # The model reads its input a row at a time from one array (XGBoost's predict): the kernel engine writes
    # its synthetic rows row-major, which it reads faster than the same numbers column by column.
    reads_rows: bool = False
    # The model turns text columns into Python objects on every call (scikit-learn's input checks): text held
    # as Python strings spares it that; a model of its own (pyarrow's string kernels) may not gain from it.
    converts_text: bool = False
    # What a call costs here, once the kernel engine has timed one (explainer.batch_rows auto).
    call_cost: CallCost | None = None
    # The kernel engine's call on a run's background, by what was called (the background's digest, its
    # columns and the outputs taken): a process's later shards of the run make no call of their own.
    background_outputs: dict[tuple[object, ...], tuple[np.ndarray, float]] | None = None
    # What the kernel engine decided for dedupe "auto" on that run's rows (by the same key): a process's
    # later shards of the run sample no repeats of their own.
    kernel_deduplicates: dict[tuple[object, ...], bool] | None = None

    @abstractmethod
    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """The configured output for each row, always 2-D: (rows, outputs)."""

    def predict_outputs(
        self, frame: pd.DataFrame | np.ndarray, outputs: list[int], width: int | None
    ) -> np.ndarray | None:
        """`predict(frame)[:, outputs]` as float64, where the model gives those columns for less than all
        of them (a binary classifier's probabilities, both from one number: a kernel call then writes and
        checks one column of 10^5 rows, not two); None where it does not, or where `width` (the columns
        the run's probe saw) is not what predict() returns. A column returned is finite and a probability
        exactly when the columns left out are, so checking it checks them. `frame` is an array only where
        `takes_array` said yes to its columns."""
        return None

    def takes_array(self, columns: list[str]) -> bool:
        """Whether predict_outputs() takes rows of these columns, in this order, as one int or float array
        instead of a frame: the kernel engine then hands its row-major calls over as the array it wrote,
        with no DataFrame built and checked around each (~0.5 ms a call, ~1% of an XGBoost call's time)."""
        return False

    @property
    def native(self) -> Any | None:
        """The in-process model object for tree and linear explainers, or None for a remote model."""
        return None

    def raw_output(self, frame: pd.DataFrame, space: str) -> np.ndarray:
        """The model's own output in an explainer's space ('log_odds', 'probability' or 'raw'), 2-D."""
        raise ModelError(f"model {self.name}: cannot compute {space} output for the additivity check")

    def rows_to_merge(self, nsamples: int | str, background: pd.DataFrame) -> int | None:
        """How many explained rows' kernel calls (nsamples coalitions x background rows each) to merge into
        one (explainer.batch_rows auto), or None for the kernel engine to decide from what the model's
        calls cost, timed on its first call: an in-process model's cost is measured, not known."""
        return None

    def bounded(self, limit: RequestLimit | None) -> Predictor:
        """This model under a run's limit on requests in flight; only a remote model has one to honour."""
        return self

    def traffic(self) -> dict[str, float] | None:
        """What this predictor sent to a remote model (requests, rows, bytes, ...), None for a local one."""
        return None

    def limit_threads(self, threads: int) -> None:
        """Cap the model's own threads, once: reconfiguring a model another thread predicts with is unsafe."""
        with _THREAD_LIMIT_LOCK:
            if getattr(self, "_threads", None) == threads:
                return
            self._set_threads(threads)
            self._threads = threads

    def _set_threads(self, threads: int) -> None:  # noqa: B027 - a remote model has no threads of its own
        """Set the model's thread count (overridden by in-process models)."""


def two_d(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    return array.reshape(len(array), -1) if array.ndim != 2 else array


def final_estimator(model: Any) -> Any:
    """The last step of a Pipeline, or the model itself."""
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def is_pipeline(model: Any) -> bool:
    """A scikit-learn Pipeline (or anything with steps): explained as a whole, model-agnostically."""
    return hasattr(model, "steps")


class LocalPredictor(Predictor):
    """A scikit-learn estimator, Pipeline or XGBoost model held in this process."""

    def __init__(self, name: str, model: Any, method: str) -> None:
        self.name = name
        self.model = model
        self.method = method
        if not callable(getattr(model, method, None)):
            raise ModelError(f"model.output: model {name} ({type(model).__name__}) has no {method}()")
        names = getattr(model, "feature_names_in_", None)
        self.feature_names = [str(n) for n in names] if names is not None else None
        classes = getattr(final_estimator(model), "classes_", None)
        self.class_labels = [str(c) for c in classes] if classes is not None else None
        # XGBoost itself (not a Pipeline ending in it): it reads numbers as float32, from one array as well.
        self.reads_float32 = is_xgboost(model)
        self.converts_text = type(model).__module__.startswith("sklearn.")
        # An array has no names: a linear booster, which builds a DMatrix, refuses one for a model with them.
        self._array_input = self.reads_float32 and getattr(model, "booster", None) != "gblinear"
        self.reads_rows = self._array_input
        self._in_place = xgboost_in_place(model, method) if self.reads_float32 else None

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        model_input = numeric_array(frame, self.feature_names) if self._array_input else None
        if model_input is not None and self._in_place is not None:
            return self._in_place(model_input)
        return two_d(getattr(self.model, self.method)(frame if model_input is None else model_input))

    def predict_outputs(
        self, frame: pd.DataFrame | np.ndarray, outputs: list[int], width: int | None
    ) -> np.ndarray | None:
        in_place = self._in_place
        if in_place is None or not (self._array_input and in_place.binary) or width not in (None, 2):
            return None
        model_input = numeric_array(frame, self.feature_names)
        if model_input is None:
            return None
        raw = in_place.raw(model_input)
        if raw.ndim != 1:  # not a binary classifier's probabilities after all: predict() says what it is
            return None
        return binary_columns(raw, outputs, float32_complement)

    def takes_array(self, columns: list[str]) -> bool:
        return self._array_input and (self.feature_names is None or self.feature_names == list(columns))

    def _set_threads(self, threads: int) -> None:
        estimator = final_estimator(self.model)
        # XGBoost and scikit-learn ensembles default to every core; W workers doing that oversubscribe.
        if "n_jobs" in getattr(estimator, "get_params", dict)():
            estimator.set_params(n_jobs=threads)

    @property
    def native(self) -> Any:
        return self.model

    def raw_output(self, frame: pd.DataFrame, space: str) -> np.ndarray:
        model = self.model
        if space == "probability":
            return two_d(model.predict_proba(frame))
        if space == "log_odds":
            if is_xgboost(model):
                return two_d(model.predict(frame, output_margin=True))
            return two_d(model.decision_function(frame))
        return two_d(model.predict(frame))


def is_xgboost(model: Any) -> bool:
    return type(model).__module__.startswith("xgboost")


def binary_columns(
    probability: np.ndarray, outputs: list[int], complement: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Columns `outputs` of a binary classifier's (1 - p, p), float64, each computed as the predictor's
    predict() computes it (`complement` gives 1 - p in its arithmetic)."""
    out = np.empty((len(probability), len(outputs)))
    for k, column in enumerate(outputs):
        out[:, k] = probability if column == 1 else complement(probability)
    return out


def float32_complement(probability: np.ndarray) -> np.ndarray:
    """XGBClassifier's class 0: 1 - p in float32, as its predict_proba computes it (written as float64)."""
    return np.float32(1.0) - probability


@dataclass(frozen=True)
class InPlace:
    """XGBoost's scikit-learn method as one `inplace_predict` of its booster (`xgboost_in_place`)."""

    raw: Callable[[np.ndarray], np.ndarray]
    """The booster's own output for an array: a binary classifier's p (1-D float32), else 2-D."""
    classifier: bool
    binary: bool
    """A binary classifier's predict_proba: p of class 1 from the booster, both classes from it."""

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """What the wrapper's method returns for `array`, 2-D float64."""
        output = self.raw(array)
        if self.classifier and output.ndim == 1:
            return binary_columns(output, [0, 1], float32_complement)
        return two_d(output)


def xgboost_in_place(model: Any, method: str) -> InPlace | None:
    """XGBoost's scikit-learn `predict_proba`/`predict` on an array, as one call of its booster: the
    `inplace_predict` the wrapper makes, with its arguments (the best iteration, the model's `missing`), and
    its outputs bit for bit, without the wrapper's work per call (a global config context, keyword checks,
    the two classes stacked in float32 and converted again), ~1% of a kernel call of breast cancer.

    Only where the wrapper does nothing else: a tree booster, and `predict_proba` of a `binary:logistic` or
    `multi:softprob` classifier or `predict` of a regressor, of classes that keep XGBoost's own
    definitions of these methods. Anything else (a subclass, a custom objective, gblinear, a ranker) is
    called through its wrapper: None.
    """
    import xgboost

    def xgboost_own(*names: str) -> bool:
        kinds = {"predict_proba": xgboost.XGBClassifier}
        return all(
            getattr(type(model), name, None) is getattr(kinds.get(name, xgboost.XGBModel), name, object())
            for name in names
        )

    if not isinstance(model, xgboost.XGBModel) or model.booster == "gblinear":
        return None
    if method == "predict_proba":
        supported = (
            isinstance(model, xgboost.XGBClassifier)
            and xgboost_own("predict_proba")
            and model.objective in ("binary:logistic", "multi:softprob")
        )
    else:
        ranks_or_labels = isinstance(model, (xgboost.XGBClassifier, xgboost.XGBRanker))
        supported = method == "predict" and not ranks_or_labels and xgboost_own("predict")
    if not (supported and xgboost_own("_get_iteration_range", "_can_use_inplace_predict")):
        return None
    try:
        booster = model.get_booster()
    except Exception:  # noqa: BLE001 - not fitted: the wrapper's own call says so, in its words
        return None
    try:  # the wrapper's _get_iteration_range: the best iteration when trained with early stopping
        iteration_range = (0, model.best_iteration + 1)
    except AttributeError:
        iteration_range = (0, 0)
    missing, classifier = model.missing, method == "predict_proba"

    def raw(array: np.ndarray) -> np.ndarray:
        return booster.inplace_predict(
            array, iteration_range=iteration_range, predict_type="value", missing=missing
        )

    return InPlace(raw, classifier, classifier and model.objective == "binary:logistic")


def numeric_array(frame: pd.DataFrame | np.ndarray, feature_names: list[str] | None) -> np.ndarray | None:
    """The frame as one float or int array when XGBoost would read the same numbers from it, else None.

    XGBoost reads a frame column by column, slower than the same numbers as one array. The array carries
    no names, so it is used only when the columns are the
    model's own in its order (or the model knows no names), and only for plain numeric columns: booleans,
    categories and nullable types keep the frame, where XGBoost has its own rules for them. An array is
    such rows already (the kernel engine's, for a predictor that `takes_array` their columns).
    """
    if isinstance(frame, np.ndarray):
        return frame
    if feature_names is not None and list(frame.columns) != feature_names:
        return None
    if not all(isinstance(t, np.dtype) and t.kind in "fiu" for t in frame.dtypes):
        return None
    return frame.to_numpy()


class BoosterPredictor(Predictor):
    """A raw xgboost.Booster: from .json or .ubj, or the MLflow xgboost flavour."""

    def __init__(self, name: str, booster: Any, method: str) -> None:
        self.name = name
        self.booster = booster
        self.method = method
        self.feature_names = list(booster.feature_names) if booster.feature_names else None
        self.reads_float32 = True
        config = json.loads(booster.save_config())["learner"]
        self.binary = config["objective"]["name"].startswith("binary:")
        n_classes = int(config["learner_model_param"].get("num_class") or 0)
        if self.binary:
            self.class_labels = ["0", "1"]
        elif n_classes > 1:
            self.class_labels = [str(i) for i in range(n_classes)]
        # gblinear cannot predict in place; trees (gbtree, dart) can, as XGBoost's own sklearn API does.
        self.in_place = config["gradient_booster"]["name"] != "gblinear"
        self.reads_rows = self.in_place

    def takes_array(self, columns: list[str]) -> bool:
        # In place only: a DMatrix is given the frame's column names.
        return self.in_place and (self.feature_names is None or self.feature_names == list(columns))

    def _predict(self, frame: pd.DataFrame, margin: bool) -> np.ndarray:
        """The booster on `frame`: in place (no DMatrix, which costs as much as a third of the predict
        on a kernel call's rows) from the array the engine wrote, or from the frame (categories, nullable
        columns) by the rules a DMatrix would apply; the same outputs, bit for bit."""
        array = numeric_array(frame, self.feature_names)
        if self.in_place:
            kind = "margin" if margin else "value"
            return two_d(self.booster.inplace_predict(frame if array is None else array, predict_type=kind))
        import xgboost

        matrix = (
            xgboost.DMatrix(frame, enable_categorical=True)
            if array is None
            else xgboost.DMatrix(array, feature_names=list(frame.columns))
        )
        return two_d(self.booster.predict(matrix, output_margin=margin))

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        if self.method == "decision_function":
            return self.raw_output(frame, "log_odds")
        output = self._predict(frame, margin=False)
        if self.binary and self.method == "predict_proba":
            return np.column_stack([1.0 - output[:, 0], output[:, 0]])
        if self.binary and self.method == "predict":
            return (output >= 0.5).astype(float)
        return output

    def predict_outputs(
        self, frame: pd.DataFrame | np.ndarray, outputs: list[int], width: int | None
    ) -> np.ndarray | None:
        if not (self.binary and self.method == "predict_proba" and self.in_place) or width not in (None, 2):
            return None
        array = numeric_array(frame, self.feature_names)
        raw = self.booster.inplace_predict(frame if array is None else array, predict_type="value")
        if raw.ndim != 1:
            return None
        # predict()'s columns: p as float64, and 1 - p taken in float64.
        return binary_columns(raw, outputs, lambda p: 1.0 - p.astype(float))

    @property
    def native(self) -> Any:
        return self.booster

    def _set_threads(self, threads: int) -> None:
        self.booster.set_param({"nthread": threads})

    def raw_output(self, frame: pd.DataFrame, space: str) -> np.ndarray:
        if space == "probability":
            return self.predict(frame)
        return self._predict(frame, margin=True)


# A probability a model computes in float32 (a softmax) can be a rounding step past 1: not a wrong output.
PROBABILITY_SLACK = 1e-6


def _cells(frame: pd.DataFrame, position: int, row_ids: bool, shown: int = 6) -> str:
    row = frame.iloc[position]
    cells = [f"{column}={value!r}" for column, value in list(row.items())[:shown]]
    named = f"row_id {frame.index[position]}: " if row_ids else ""
    return named + ", ".join(cells) + (", ..." if len(row) > shown else "")


def output_is_fine(output: np.ndarray, rows: int, width: int | None, probabilities: bool) -> bool:
    """Whether `checked_output` takes `output` as it is, settled with two reductions (NaN and infinities
    carry into min and max); only a call that is not fine is looked at cell by cell, for the message."""
    if output.ndim != 2 or output.shape[0] != rows or (width is not None and output.shape[1] != width):
        return False
    low, high = (float(output.min()), float(output.max())) if output.size else (0.0, 0.0)
    in_range = not probabilities or (low >= -PROBABILITY_SLACK and high <= 1.0 + PROBABILITY_SLACK)
    return math.isfinite(low) and math.isfinite(high) and in_range


def checked_output(
    predictor: Predictor,
    output: np.ndarray,
    frame: pd.DataFrame,
    width: int | None = None,
    probabilities: bool = False,
    where: str = "one call",
    row_ids: bool = False,
) -> np.ndarray:
    """The model's output for `frame`, refused unless it is what the explainer can use: a row per input row,
    `width` columns (as many as the run's probe saw), every value finite, and probabilities in [0, 1] when
    the logit link reads them as probabilities. A model that breaks one of these would be explained wrongly
    without a word (NaN silently left out of sums, a third column misread, an output clipped)."""
    name, method = predictor.name, predictor.method
    if output_is_fine(output, len(frame), width, probabilities):
        return output
    if output.ndim != 2 or output.shape[0] != len(frame):
        raise ModelError(
            f"model {name}: {method}() returned an array of shape {output.shape} for {len(frame):,} rows in "
            f"{where}; expected one row of outputs per input row"
        )
    if width is not None and output.shape[1] != width:
        raise ModelError(
            f"model {name}: {method}() returned {output.shape[1]} outputs per row in {where}, where it "
            f"returned {width} when the run probed it; one run explains one model with one output shape"
        )
    finite = np.isfinite(output)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ModelError(
            f"model {name}: {method}() returned {int((~finite).sum()):,} NaN or infinite outputs for "
            f"{len(bad_rows):,} of {len(frame):,} rows in {where}; the first such row: "
            f"{_cells(frame, int(bad_rows[0]), row_ids)}"
        )
    if probabilities:
        outside = (output < -PROBABILITY_SLACK) | (output > 1.0 + PROBABILITY_SLACK)
        if outside.any():
            row, column = (int(i) for i in np.argwhere(outside)[0])
            raise ModelError(
                f"model {name}: {method}() returned {float(output[row, column])!r}, not a probability in [0, 1], "
                f"for {int(outside.any(axis=1).sum()):,} of {len(frame):,} rows in {where} (the logit link "
                f"reads it as one); the first such row: {_cells(frame, row, row_ids)}; set explainer.link identity "
                "to explain the raw output"
            )
    return output


def explained_outputs(n_outputs: int, class_index: int | None, labels: list[str] | None) -> list[int]:
    """Indices of the output columns to explain: one column, the configured class, or every class."""
    if n_outputs == 1:
        return [0]
    if class_index is None:
        return list(range(n_outputs))
    if class_index >= n_outputs:
        raise ModelError(
            f"model.class_index: {class_index} is out of range; the model has {n_outputs} outputs"
        )
    return [class_index]


def output_labels(outputs: list[int], labels: list[str] | None) -> list[str]:
    """A label per explained output: the class name where the model knows it."""
    if labels is not None and len(labels) > max(outputs):
        return [labels[i] for i in outputs]
    return [str(i) for i in outputs]
