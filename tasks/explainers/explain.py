"""Explain rows with a shap explainer: the SHAP math, whatever runs it (a thread, a process, a Dask worker)."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, effective_nsamples
from shapline.tasks.common.errors import ExplainError, ModelError
from shapline.tasks.common.schemas import (
    BASE_VALUE,
    CLASS,
    COALITIONS,
    CONVERGED,
    MODEL_OUTPUT,
    ROW_ID,
    errors_columns,
    rows_named,
    values_columns,
)
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.choice import resolve_explainer
from shapline.tasks.explainers.claims import RowClaims
from shapline.tasks.explainers.links import LINKS, PROBABILITY_EPS
from shapline.tasks.models.predictors import (
    Predictor,
    checked_output,
    explained_outputs,
    is_xgboost,
    output_is_fine,
    output_labels,
)

# shap's kernel and permutation explainers draw from numpy's global RNG. Holding this lock while
# a row's coalitions are drawn (not while the model runs) keeps every row's draw seeded by its
# own seed even when shards share one process as threads.
_GLOBAL_RNG = threading.Lock()


def load_shap() -> ModuleType:
    """shap, imported with the tracebacks of its failed optional imports dropped (the messages stay).

    shap records why cv2, pyspark or its GPU extension did not import, exception and all, and a traceback
    holds every frame that was on the stack at shap's first import, so whatever those frames held stayed
    in memory for good: in a run, the whole data table the plan was made from.
    """
    import shap
    from shap.utils import _general

    for _, error in getattr(_general, "import_errors", {}).values():
        while error is not None:
            error.__traceback__ = None
            error = error.__cause__ or error.__context__
    return shap


def row_seed(seed: int, row_id: int) -> int:
    """A row's own seed: the same whatever shard, worker or order explains it."""
    return int(np.random.SeedSequence([seed, row_id]).generate_state(1)[0])


@dataclass
class ShardValues:
    """SHAP values of some rows for each explained output: values (rows, features, outputs)."""

    row_ids: np.ndarray
    features: list[str]
    labels: list[str]
    values: np.ndarray
    base_values: np.ndarray
    model_output: np.ndarray
    algorithm: str
    link: str
    # Requests, rows and bytes this shard sent to an endpoint (None for in-process models).
    traffic: dict[str, float] | None = field(default=None)
    seconds: float = 0.0
    # Model rows not sent because an identical row was in the same call (kernel, endpoints).
    rows_saved: int = 0
    # Kernel only: coalitions each row took, and with estimator adaptive each value's standard error
    # (rows, features, outputs) and whether the row's tolerance held.
    coalitions: np.ndarray | None = None
    standard_errors: np.ndarray | None = None
    converged: np.ndarray | None = None
    # Kernel only: synthetic rows (coalitions x background rows) the estimator asked the model for, and the
    # seconds its calls took (wall, and the calling threads' CPU).
    model_rows: int = 0
    model_s: float = 0.0
    model_cpu_s: float = 0.0
    # The rows explained here when the shard's rows were shared with other workers (claims.py); None: all.
    computed: np.ndarray | None = None
    # Of the shard's rows, how many workers that helped it explained (put together by its runner).
    helped_rows: int = 0

    def take_rows(self, part: ShardValues) -> None:
        """Fill in the rows another worker explained of this shard (`part`, from the same job) and add what it
        cost; `computed` then covers both."""
        if part.computed is None or self.computed is None:
            raise ValueError("only the parts of a shard whose rows were shared can be put together")
        mine = part.computed & ~self.computed
        self.values[mine] = part.values[mine]
        self.model_output[mine] = part.model_output[mine]
        for name in ("coalitions", "standard_errors", "converged"):
            ours, theirs = getattr(self, name), getattr(part, name)
            if ours is not None and theirs is not None:
                ours[mine] = theirs[mine]
        self.model_rows += part.model_rows
        self.model_s += part.model_s
        self.model_cpu_s += part.model_cpu_s
        self.rows_saved += part.rows_saved
        if part.traffic:
            self.traffic = {
                key: (self.traffic or {}).get(key, 0.0) + part.traffic.get(key, 0.0)
                for key in {*(self.traffic or {}), *part.traffic}
            }
        self.computed = self.computed | part.computed

    def to_table(self) -> Any:
        """The shard's rows of shap_values.parquet in row order (then class), as Arrow columns built one at a
        time: no second copy of the values.

        A pandas frame of a shard is a full copy of its values (and Arrow's table of it a third); a shard of
        125,000 rows x 30 features holds 30 MB less at its peak this way.
        """
        import pyarrow as pa

        n, m, c = self.values.shape
        several = c > 1
        columns: dict[str, Any] = {ROW_ID: pa.array(np.repeat(self.row_ids.astype("int64"), c))}
        if several:
            columns[CLASS] = pa.array(
                np.tile(np.asarray(self.labels, dtype=object), n), type=pa.large_string()
            )
        for j, feature in enumerate(self.features):
            columns[feature] = pa.array(np.ascontiguousarray(self.values[:, j, :]).reshape(n * c))
        columns[BASE_VALUE] = pa.array(np.asarray(self.base_values, dtype=float).reshape(n * c))
        columns[MODEL_OUTPUT] = pa.array(np.asarray(self.model_output, dtype=float).reshape(n * c))
        names = values_columns(self.features, several)
        return pa.Table.from_arrays([columns[name] for name in names], names=names)

    def to_errors_table(self) -> Any:
        """The shard's rows of shap_standard_errors.parquet (estimator adaptive) or, for shap's estimator,
        of its coalitions alone: row_id, [class], one standard error per feature, coalitions, converged."""
        import pyarrow as pa

        n, _, c = self.values.shape
        columns: dict[str, Any] = {ROW_ID: pa.array(np.repeat(self.row_ids.astype("int64"), c))}
        if c > 1:
            columns[CLASS] = pa.array(
                np.tile(np.asarray(self.labels, dtype=object), n), type=pa.large_string()
            )
        features = self.features if self.standard_errors is not None else []
        if self.standard_errors is not None:
            for j, feature in enumerate(self.features):
                columns[feature] = pa.array(
                    np.ascontiguousarray(self.standard_errors[:, j, :]).reshape(n * c)
                )
        coalitions = self.coalitions if self.coalitions is not None else np.zeros(n, dtype=np.int64)
        columns[COALITIONS] = pa.array(np.repeat(np.asarray(coalitions, dtype="int64"), c))
        converged = self.converged if self.converged is not None else np.ones(n, dtype=bool)
        columns[CONVERGED] = pa.array(np.repeat(np.asarray(converged, dtype=bool), c))
        names = errors_columns(features, c > 1)
        return pa.Table.from_arrays([columns[name] for name in names], names=names)


@dataclass(frozen=True)
class KernelAccuracy:
    """What a kernel estimator spent on each row and, for estimator adaptive, how sure it is of each value."""

    coalitions: np.ndarray
    errors: np.ndarray | None
    converged: np.ndarray | None
    model_rows: int
    # Seconds inside the model's calls: wall time, and the calling threads' CPU time.
    model_s: float = 0.0
    model_cpu_s: float = 0.0


class ModelFunction:
    """The function shap sees: an array of rows in, the explained outputs out (probabilities clipped for logit).

    Every call's output is checked (`checked_output`) before any of it is used: one row per row, `width`
    columns (the probe's), finite, and in [0, 1] under the logit link.
    """

    def __init__(
        self,
        predictor: Predictor,
        template: pd.DataFrame,
        outputs: list[int],
        link: str,
        width: int | None = None,
    ) -> None:
        self.predictor = predictor
        self.columns = list(template.columns)
        self.dtypes = template.dtypes.to_dict()
        self.numeric = all(pd.api.types.is_numeric_dtype(t) for t in self.dtypes.values())
        self.outputs = outputs
        self.width = width
        self.clip = link == "logit"
        # The kernel engine hands over its row-major calls as the one array it wrote (`call_array`), where
        # the model reads these columns from an array: no frame is built around each call.
        self.takes_array = self.numeric and predictor.takes_array(self.columns)

    def frame(self, rows: Any) -> pd.DataFrame:
        if isinstance(rows, pd.DataFrame):
            # Selecting columns copies a kernel call's rows even when nothing changes.
            return rows if list(rows.columns) == self.columns else rows[self.columns]
        array = np.asarray(rows)
        if array.ndim == 1:
            array = array.reshape(1, -1)
        if self.numeric:
            array = array.astype(float, copy=False)
        return pd.DataFrame(array, columns=self.columns).astype(self.dtypes)

    def __call__(self, rows: Any) -> np.ndarray:
        frame = self.frame(rows)
        return self._checked(frame, self.predictor.predict_outputs(frame, self.outputs, self.width))

    def call_array(self, array: np.ndarray) -> np.ndarray:
        """The function on rows of the template's columns given as one int or float array, in their order:
        only where `takes_array`."""
        return self._checked(array, self.predictor.predict_outputs(array, self.outputs, self.width))

    def _checked(self, rows: pd.DataFrame | np.ndarray, output: np.ndarray | None) -> np.ndarray:
        """The explained columns alone where the model gave them for less (`output`: a binary classifier's
        class); a call whose columns are not fine is made again in full, for checked_output's own message."""
        if output is None or not output_is_fine(output, len(rows), len(self.outputs), self.clip):
            frame = (
                rows
                if isinstance(rows, pd.DataFrame)
                else pd.DataFrame(rows, columns=self.columns, copy=False)
            )
            output = checked_output(
                self.predictor, self.predictor.predict(frame), frame, self.width, self.clip
            )
            output = output[:, self.outputs]  # a copy (a list of columns): clipped in place
        if self.clip:
            np.clip(output, PROBABILITY_EPS, 1.0 - PROBABILITY_EPS, out=output)
        return output


def _numeric_or_fail(frame: pd.DataFrame, algorithm: str) -> None:
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ExplainError(
            f"explainer.algorithm {algorithm} needs numeric features; non-numeric: {', '.join(non_numeric)}; "
            "use kernel, which passes mixed types to the model untouched"
        )


def _kernel_values(
    rows: pd.DataFrame,
    background: Background,
    function: ModelFunction,
    config: ExplainerConfig,
    link: str,
    batch_rows: int | str = 1,
    dedupe: bool | str = False,
    claims: RowClaims | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, KernelAccuracy, np.ndarray]:
    """Values, base values, each row's model output f(x), the model rows deduplication saved, what the
    estimator (explainer.estimator) spent and how sure it is, and which rows were explained (with `claims`,
    those claimed from it; else all).

    shap's KernelExplainer reproduced by `KernelEngine` (the same coalitions from the same per-row seeds,
    the same solve; equal to shap's values to rounding), with the synthetic rows built column by column,
    the model calls of `batch_rows` rows merged into one ("auto": as many as the model's fixed cost per
    call makes worth it, timed by the engine), and with `dedupe` (an endpoint, which costs per
    row; "auto": where rows repeat often enough to pay for finding them) each distinct synthetic row of
    a call sent once.
    """
    from shapline.tasks.explainers.kernel_engine import KernelEngine

    columns = list(rows.columns)
    weights = None if background.weights is None else np.asarray(background.weights, dtype=float)
    predictor = function.predictor
    key = (background.digest, tuple(columns), tuple(function.outputs), function.width, function.clip)
    known = predictor.background_outputs or {}
    engine = KernelEngine(
        function,
        background.frame[columns],
        weights=weights,
        link=link,
        float32=predictor.reads_float32,
        call_cost=predictor.call_cost,
        background_output=known.get(key),
        deduplicates=(predictor.kernel_deduplicates or {}).get(key),
        calls_are_cheap=not predictor.pays_per_row,
        row_major=predictor.reads_rows,
        predict_array=function.call_array if function.takes_array else None,
    )
    # Kept with the model, one run's background at a time: the process's next shards make no call on it.
    predictor.background_outputs = {key: engine.background_output}
    seeds = [row_seed(config.seed, int(row_id)) for row_id in rows.index]
    base = np.broadcast_to(engine.expected_value.reshape(1, -1), (len(rows), len(function.outputs)))
    if config.estimator == "adaptive":
        found = engine.explain_adaptive(
            rows,
            seeds,
            budget=effective_nsamples(config.nsamples, len(columns)),
            tolerance=config.tolerance,
            batch_rows=batch_rows,
            dedupe=dedupe,
            row_ids=list(rows.index),
            claims=claims,
        )
        values, fx = found.values, found.fx
        accuracy = KernelAccuracy(
            found.coalitions,
            found.errors,
            found.converged,
            int(found.model_rows.sum()),
            engine.model_seconds,
            engine.model_cpu_seconds,
        )
    else:
        values, fx = engine.explain(
            rows,
            seeds,
            nsamples=config.nsamples,
            l1_reg=config.l1_reg,
            batch_rows=batch_rows,
            dedupe=dedupe,
            row_ids=list(rows.index),
            claims=claims,
        )
        model_rows = int(engine.coalitions.sum()) * len(background.frame)
        accuracy = KernelAccuracy(
            engine.coalitions.copy(), None, None, model_rows, engine.model_seconds, engine.model_cpu_seconds
        )
    # Timed on this shard's first call (batch_rows auto): the process's next shards merge from their first.
    predictor.call_cost = engine.call_cost
    if engine.deduplicates is not None:  # dedupe auto, decided on this shard's rows: so for the run's next
        predictor.kernel_deduplicates = {key: engine.deduplicates}
    return values, base, fx, engine.rows_saved, accuracy, engine.done


def _masker_values(
    rows: pd.DataFrame,
    background: Background,
    function: ModelFunction,
    config: ExplainerConfig,
    link: str,
    algorithm: str,
) -> tuple[np.ndarray, np.ndarray]:
    import shap

    _numeric_or_fail(rows, algorithm)
    if background.weights is not None:
        raise ExplainError(
            f"explainer.algorithm {algorithm} cannot use weighted k-means centres; use background.method random"
        )
    masker = shap.maskers.Independent(
        background.frame.to_numpy(dtype=float), max_samples=len(background.frame)
    )
    shap_link = shap.links.logit if link == "logit" else shap.links.identity
    data = rows.to_numpy(dtype=float)
    if algorithm == "exact":
        explainer = shap.explainers.ExactExplainer(function, masker, link=shap_link)
        explanation = explainer(data, silent=True)
        values, base = explanation.values, explanation.base_values
    else:
        explainer = shap.PermutationExplainer(function, masker, link=shap_link)
        max_evals = config.nsamples if config.nsamples != "auto" else max(500, 2 * data.shape[1] + 1)
        parts, bases = [], []
        for row_id, row in zip(rows.index, data, strict=True):
            # Permutations are drawn between model calls, so the whole row holds the RNG lock.
            with _GLOBAL_RNG:
                np.random.seed(row_seed(config.seed, int(row_id)))
                explanation = explainer(row.reshape(1, -1), max_evals=max_evals, silent=True)
            parts.append(explanation.values)
            bases.append(explanation.base_values)
        values, base = np.concatenate(parts), np.concatenate(bases)
    values = np.asarray(values, dtype=float).reshape(len(rows), data.shape[1], -1)
    base = np.asarray(base, dtype=float).reshape(len(rows), -1)
    return values, base


def _as_outputs(values: Any, base: Any, n_rows: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=float).reshape(n_rows, n_features, -1)
    base = np.asarray(base, dtype=float).reshape(-1)
    return values, np.broadcast_to(base, (n_rows, base.size)).copy()


def _select_binary_or_classes(
    values: np.ndarray, base: np.ndarray, output: np.ndarray, predictor: Predictor, class_index: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Pick the explained classes; a binary model with one log-odds output explains class 0 as its negative."""
    labels = predictor.class_labels or []
    if values.shape[2] == 1 and len(labels) == 2:
        wanted = [0, 1] if class_index is None else [class_index]
        if max(wanted) > 1:
            raise ExplainError(f"model.class_index: {class_index} is out of range; the model has 2 classes")
        if wanted == [1]:
            return values, base, output, wanted  # the model's own output: no sign to apply, no copy
        sign = np.array([-1.0 if k == 0 else 1.0 for k in wanted])
        return values * sign, base * sign, output * sign, wanted
    outputs = explained_outputs(values.shape[2], class_index, labels)
    return values[:, :, outputs], base[:, outputs], output[:, outputs], outputs


def _tree_input(native: Any, rows: pd.DataFrame) -> Any:
    """The rows as TreeExplainer reads them for this model: a raw XGBoost Booster (a .json/.ubj file, the
    MLflow xgboost flavour) with category columns as a DMatrix that keeps them categories; shap builds one
    without (an XGBClassifier tells shap its own setting), which XGBoost refuses."""
    booster = is_xgboost(native) and type(native).__name__ == "Booster"
    if booster and any(isinstance(dtype, pd.CategoricalDtype) for dtype in rows.dtypes):
        import xgboost

        return xgboost.DMatrix(rows, enable_categorical=True)
    return rows


def _model_values(
    rows: pd.DataFrame,
    background: Background,
    predictor: Predictor,
    config: ExplainerConfig,
    algorithm: str,
    class_index: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int], str]:
    import shap

    native = predictor.native
    if algorithm == "tree":
        interventional = config.feature_perturbation == "interventional"
        data = background.frame if interventional else None
        explainer = shap.TreeExplainer(native, data=data, feature_perturbation=config.feature_perturbation)
        raw = explainer.shap_values(_tree_input(native, rows), check_additivity=False)
        if isinstance(raw, list):
            raw = np.stack(raw, axis=-1)
        values, base = _as_outputs(raw, explainer.expected_value, len(rows), rows.shape[1])
        space = {"log_odds": "log_odds", "probability": "probability"}.get(explainer.model.tree_output, "raw")
        output = predictor.raw_output(rows, space)
        link = "logit" if space == "log_odds" else "identity"
    else:
        _numeric_or_fail(rows, algorithm)
        explainer = shap.LinearExplainer(native, background.frame)
        values, base = _as_outputs(
            explainer.shap_values(rows), explainer.expected_value, len(rows), rows.shape[1]
        )
        classifier = predictor.class_labels is not None
        output = predictor.raw_output(rows, "log_odds" if classifier else "raw")
        link = "logit" if classifier else "identity"
    values, base, output, outputs = _select_binary_or_classes(values, base, output, predictor, class_index)
    return values, base, output, outputs, link


def explain_rows(
    rows: pd.DataFrame,
    background: Background,
    predictor: Predictor,
    config: ExplainerConfig,
    link: str,
    class_index: int | None,
    algorithm: str | None = None,
    width: int | None = None,
    claims: RowClaims | None = None,
) -> ShardValues:
    """SHAP values of `rows` (indexed by row_id) against `background` with the configured explainer.

    `algorithm` is the one the run resolved (resolved here from config.algorithm when not given); `width` the
    outputs per row the run's probe saw, which every model call must give too. With `claims` (Kernel SHAP
    only), the rows claimed from it, the others left at zero (`computed` says which).
    """
    algorithm = algorithm or resolve_explainer(config.algorithm, predictor, link)[0]
    if claims is not None and algorithm != "kernel":
        raise ValueError(f"only Kernel SHAP shares a shard's rows between workers, not {algorithm}")
    try:
        return _explain_rows(rows, background, predictor, config, link, class_index, algorithm, width, claims)
    except ModelError as exc:
        # An endpoint's fault is retried as it is; the kernel engine names the rows of the call itself.
        if exc.transient or algorithm == "kernel":
            raise
        raise ModelError(f"explaining {rows_named(list(rows.index))}: {exc}") from exc


def _explain_rows(
    rows: pd.DataFrame,
    background: Background,
    predictor: Predictor,
    config: ExplainerConfig,
    link: str,
    class_index: int | None,
    algorithm: str,
    width: int | None,
    claims: RowClaims | None = None,
) -> ShardValues:
    saved = 0
    accuracy: KernelAccuracy | None = None
    computed: np.ndarray | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if algorithm in ("tree", "linear"):
            values, base, output, outputs, link = _model_values(
                rows, background, predictor, config, algorithm, class_index
            )
        else:
            width = width or predictor.output_width or predictor.predict(rows.iloc[:1]).shape[1]
            outputs = explained_outputs(width, class_index, predictor.class_labels)
            function = ModelFunction(predictor, rows, outputs, link, width)
            if algorithm == "kernel":
                batch: int | str = config.batch_rows
                if batch == "auto":
                    # None: the engine decides, from what the model's calls cost on its first one.
                    batch = (
                        predictor.rows_to_merge(config.nsamples, background.frame[list(rows.columns)])
                        or "auto"
                    )
                # An endpoint is paid per row: never send a row twice. A local model's time per row decides.
                dedupe = True if predictor.pays_per_row else "auto"
                values, base, fx, saved, accuracy, done = _kernel_values(
                    rows, background, function, config, link, batch, dedupe=dedupe, claims=claims
                )
                computed = done if claims is not None else None
                output = LINKS[link](fx)
            else:
                values, base = _masker_values(rows, background, function, config, link, algorithm)
                output = LINKS[link](function(rows))
    return ShardValues(
        row_ids=np.asarray(rows.index, dtype="int64"),
        features=list(rows.columns),
        labels=output_labels(outputs, predictor.class_labels),
        values=values,
        base_values=np.asarray(base, dtype=float),
        model_output=np.asarray(output, dtype=float),
        algorithm=algorithm,
        link=link,
        rows_saved=saved,
        coalitions=accuracy.coalitions if accuracy else None,
        standard_errors=accuracy.errors if accuracy else None,
        converged=accuracy.converged if accuracy else None,
        model_rows=accuracy.model_rows if accuracy else 0,
        model_s=accuracy.model_s if accuracy else 0.0,
        model_cpu_s=accuracy.model_cpu_s if accuracy else 0.0,
        computed=computed,
    )
