"""Combine finished shards, in row order, into the values table, global importance and checks."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shapline.tasks.common.cores import usable_cores
from shapline.tasks.common.errors import ExplainError
from shapline.tasks.common.schemas import (
    BASE_VALUE,
    CLASS,
    COALITIONS,
    CONVERGED,
    FEATURE,
    ID_COLUMN_METADATA,
    MODEL_OUTPUT,
    RANK,
    ROW_ID,
    UNCERTAINTY,
    check_columns,
    importance_columns,
    values_columns,
)


@dataclass(frozen=True)
class Aggregate:
    """The combined values file and what was computed from it."""

    values_path: str
    importance: pd.DataFrame
    rows_explained: int
    additivity_max_error: float
    labels: list[str]
    # Kernel runs: what the estimator spent per row and, for estimator adaptive, how sure it is.
    accuracy: Accuracy | None = None

    @property
    def several_classes(self) -> bool:
        return len(self.labels) > 1


# Unconverged rows the accuracy report names (the rest are counted).
NAMED_ROWS = 20


@dataclass(frozen=True)
class Accuracy:
    """What a kernel run's estimator spent and how sure its values are (explainer.estimator).

    `coalitions` and `converged` are per explained row, in row order; `errors_path` is
    shap_standard_errors.parquet (estimator adaptive only).
    """

    coalitions: np.ndarray
    converged: np.ndarray
    model_rows: int
    errors_path: str | None = None
    max_standard_error: float | None = None
    unconverged: list[str] = field(default_factory=list)

    @property
    def rows_unconverged(self) -> int:
        return int((~self.converged).sum())

    def coalitions_per_row(self) -> float:
        """The median of the coalitions a row took."""
        return float(np.median(self.coalitions)) if len(self.coalitions) else 0.0


def _with_ids(table: pa.Table, ids: pd.Series, id_column: str) -> pa.Table:
    """The shard's table with the id of each row (by row_id) after row_id, and the metadata naming it."""
    named = ids.loc[table.column(ROW_ID).to_numpy()].to_numpy()
    table = table.add_column(1, id_column, pa.array(named))
    return table.replace_schema_metadata(
        {**(table.schema.metadata or {}), ID_COLUMN_METADATA: id_column.encode()}
    )


# explainer.additivity_tolerance's default, for callers that check without a config.
ADDITIVITY_TOLERANCE = 0.01


def check_additivity(table: pa.Table, features: list[str], tolerance: float, shard: str) -> float:
    """The shard's largest additivity gap; an ExplainError if a value is not finite or a row's gap is above
    `tolerance` x max(1, |model output|): such values do not explain the model's output."""
    gap = _additivity_gap(table, features)
    if not len(gap):
        return 0.0
    output = table.column(MODEL_OUTPUT).to_numpy()
    broken = ~np.isfinite(gap)
    if broken.any():
        row = int(np.flatnonzero(broken)[0])
        raise ExplainError(
            f"{shard}: row_id {table.column(ROW_ID)[row].as_py()} has a SHAP value, base value or model "
            "output that is NaN or infinite; the explanation cannot be trusted"
        )
    allowed = tolerance * np.maximum(1.0, np.abs(output))
    above = np.abs(gap) > allowed
    if above.any():
        row = int(np.argmax(np.abs(gap) / allowed))
        raise ExplainError(
            f"additivity: row_id {table.column(ROW_ID)[row].as_py()}: base_value + the sum of its SHAP values "
            f"misses its model output {output[row]:.6g} by {abs(gap[row]):.3g}, above "
            f"explainer.additivity_tolerance {tolerance:g} x max(1, |output|) ({int(above.sum()):,} rows in "
            f"{shard}); the values do not explain the output"
        )
    return float(np.max(np.abs(gap)))


def combine_shards(
    shard_paths: list[str],
    destination: str | Path,
    features: list[str],
    row_names: pd.Series | None = None,
    id_column: str | None = None,
    additivity_tolerance: float = ADDITIVITY_TOLERANCE,
) -> tuple[int, float, list[str]]:
    """Stream the shard files, in order, into one parquet file; return rows, max additivity error, classes.

    One shard is in memory at a time, as Arrow columns: the checks read them without a pandas copy.
    With `row_names` (data.id_column's values by row_id), each row carries its id beside row_id. A shard
    whose values do not add up to the model's output (`check_additivity`) stops the run.
    """
    writer = None
    rows = 0
    worst = 0.0
    labels: list[str] = []
    last_row_id = -1
    try:
        for path in shard_paths:
            table = pq.read_table(path)
            several = CLASS in table.column_names
            check_columns(
                pd.DataFrame(columns=table.column_names),
                values_columns(features, several),
                f"shard {Path(path).name}",
            )
            ids = table.column(ROW_ID).to_numpy()
            steps = np.diff(ids)
            if len(ids) and (ids[0] <= last_row_id or np.any(steps < 0)):
                raise ValueError(f"shard {Path(path).name}: rows are out of order")
            last_row_id = int(ids[-1]) if len(ids) else last_row_id
            if several and not labels:
                labels = list(dict.fromkeys(table.select([CLASS]).to_pandas()[CLASS].astype(str)))
            worst = max(
                worst, check_additivity(table, features, additivity_tolerance, f"shard {Path(path).name}")
            )
            # Sorted ids (checked above): each new id starts where the id steps up.
            rows += int(len(ids) > 0) + int(np.count_nonzero(steps))
            if row_names is not None and id_column is not None:
                table = _with_ids(table, row_names, id_column)
            if writer is None:
                writer = pq.ParquetWriter(str(destination), table.schema, use_dictionary=[CLASS])
            writer.write_table(table)
            del table, ids, steps
    finally:
        if writer is not None:
            writer.close()
        # Arrow's allocator keeps freed pages; return them so the plots and MLflow upload start lean.
        pa.default_memory_pool().release_unused()
    if writer is None:
        raise ValueError("no shard produced values")
    return rows, worst, labels


def _additivity_gap(table: pa.Table, features: list[str]) -> np.ndarray:
    """base_value + sum of SHAP values - model_output, per row.

    The features are added one column at a time, in order: the same additions, so the same rounding,
    as a row sum over the values matrix, without building that matrix.
    """
    total = table.column(features[0]).to_numpy().astype(float, copy=True)
    for feature in features[1:]:
        total += table.column(feature).to_numpy()
    return table.column(BASE_VALUE).to_numpy() + total - table.column(MODEL_OUTPUT).to_numpy()


_AGGREGATIONS = {
    "mean_abs": lambda v: float(np.mean(np.abs(v))),
    "mean": lambda v: float(np.mean(v)),
    "median": lambda v: float(np.median(v)),
    "mean_sq": lambda v: float(np.mean(np.square(v))),
    "std": lambda v: float(np.std(v)),
    "max_abs": lambda v: float(np.max(np.abs(v))),
}


def global_importance(
    values_path: str | Path, features: list[str], aggregations: Sequence[str], labels: list[str]
) -> pd.DataFrame:
    """One row per feature (and class): each aggregation of its SHAP values, ranked by the first one."""
    several = len(labels) > 1
    classes = (
        pq.read_table(values_path, columns=[CLASS]).column(CLASS).to_numpy(zero_copy_only=False)
        if several
        else None
    )
    groups = labels if several else [None]

    def feature_records(feature: str) -> list[dict[str, object]]:
        column = pq.read_table(values_path, columns=[feature]).column(feature).to_numpy()
        records: list[dict[str, object]] = []
        for label in groups:
            values = column if label is None else column[classes == label]
            record: dict[str, object] = {FEATURE: feature}
            if label is not None:
                record[CLASS] = label
            for name in aggregations:
                record[name] = _AGGREGATIONS[name](values) if len(values) else float("nan")
            records.append(record)
        return records

    # One column per thread (numpy and Arrow release the GIL): memory stays a column per core.
    workers = max(1, min(len(features), usable_cores()))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shapline-importance") as pool:
        records = [record for part in pool.map(feature_records, features) for record in part]
    table = pd.DataFrame.from_records(records)
    key = table[aggregations[0]].abs()
    by = [CLASS] if several else None
    table[RANK] = (key.groupby(table[CLASS]) if by else key).rank(method="first", ascending=False).astype(int)
    table = table.sort_values([*(by or []), RANK]).reset_index(drop=True)
    return check_columns(
        table[importance_columns(aggregations, several)],
        importance_columns(aggregations, several),
        "global_importance.csv",
    )


def aggregate(
    shard_paths: list[str],
    destination: str | Path,
    features: list[str],
    aggregations: Sequence[str],
    row_names: pd.Series | None = None,
    id_column: str | None = None,
    additivity_tolerance: float = ADDITIVITY_TOLERANCE,
    errors_paths: Sequence[str | None] = (),
    model_rows: int = 0,
) -> Aggregate:
    """Combine the shards into shap_values.parquet and compute global importance and additivity; a kernel
    run's coalitions and standard errors (`errors_paths`, one per shard) into its Accuracy, and the standard
    errors of estimator adaptive into shap_standard_errors.parquet beside the values."""
    rows, worst, labels = combine_shards(
        shard_paths, destination, features, row_names, id_column, additivity_tolerance
    )
    importance = global_importance(destination, features, aggregations, labels)
    accuracy = None
    if errors_paths and all(path is not None for path in errors_paths):
        errors_destination = Path(destination).with_name(ERRORS_FILE)
        accuracy = combine_errors(
            [str(p) for p in errors_paths], errors_destination, features, model_rows, row_names, id_column
        )
        if accuracy.errors_path is not None:
            importance = with_uncertainty(importance, accuracy.errors_path, features, labels, rows)
    return Aggregate(str(destination), importance, rows, worst, labels, accuracy)


ERRORS_FILE = "shap_standard_errors.parquet"


def combine_errors(
    paths: list[str],
    destination: Path,
    features: list[str],
    model_rows: int,
    row_names: pd.Series | None = None,
    id_column: str | None = None,
) -> Accuracy:
    """The shards' coalitions per row (every kernel run) and standard errors (estimator adaptive, written
    to `destination` in the values table's order, with the id column as there)."""
    tables = [pq.read_table(path) for path in paths]
    has_errors = bool(tables) and all(f in tables[0].column_names for f in features)
    coalitions, converged, ids, worst = [], [], [], 0.0
    writer = None
    try:
        for table in tables:
            first = _first_of_each_row(table.column(ROW_ID).to_numpy())
            coalitions.append(table.column(COALITIONS).to_numpy()[first])
            converged.append(table.column(CONVERGED).to_numpy(zero_copy_only=False)[first])
            ids.append(table.column(ROW_ID).to_numpy()[first])
            if not has_errors:
                continue
            worst = max([worst, *(float(np.max(table.column(f).to_numpy(), initial=0.0)) for f in features)])
            if row_names is not None and id_column is not None:
                table = _with_ids(table, row_names, id_column)
            if writer is None:
                writer = pq.ParquetWriter(str(destination), table.schema, use_dictionary=[CLASS])
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    done = np.concatenate(converged) if converged else np.ones(0, dtype=bool)
    row_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    named = (
        [str(row_names.loc[i]) for i in row_ids[~done][:NAMED_ROWS]]
        if row_names is not None
        else [str(i) for i in row_ids[~done][:NAMED_ROWS]]
    )
    return Accuracy(
        coalitions=np.concatenate(coalitions) if coalitions else np.zeros(0, dtype=np.int64),
        converged=done,
        model_rows=model_rows,
        errors_path=str(destination) if has_errors else None,
        max_standard_error=worst if has_errors else None,
        unconverged=named,
    )


def _first_of_each_row(row_ids: np.ndarray) -> np.ndarray:
    """Positions of the first line of each row (a row has a line per class), in order."""
    if not len(row_ids):
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(len(row_ids), dtype=bool)
    starts[1:] = row_ids[1:] != row_ids[:-1]
    return np.flatnonzero(starts)


def with_uncertainty(
    importance: pd.DataFrame, errors_path: str, features: list[str], labels: list[str], rows: int
) -> pd.DataFrame:
    """The importance table with `mean_abs_se`: the standard error of mean |SHAP value| that the values'
    own standard errors give (sqrt of the sum of their squares over the rows, over the rows)."""
    several = len(labels) > 1
    classes = (
        pq.read_table(errors_path, columns=[CLASS]).column(CLASS).to_numpy(zero_copy_only=False)
        if several
        else None
    )
    records = []
    for feature in features:
        errors = pq.read_table(errors_path, columns=[feature]).column(feature).to_numpy()
        for label in labels if several else [None]:
            part = errors if label is None else errors[classes == label]
            record: dict[str, object] = {
                FEATURE: feature,
                UNCERTAINTY: float(np.sqrt(np.sum(part**2)) / max(len(part), 1)),
            }
            if label is not None:
                record[CLASS] = label
            records.append(record)
    keys = [CLASS, FEATURE] if several else [FEATURE]
    merged = importance.merge(pd.DataFrame.from_records(records), on=keys, how="left", validate="one_to_one")
    columns = [c for c in importance.columns if c != RANK] + [UNCERTAINTY, RANK]
    return merged[columns]
