"""Combine finished shards, in row order, into the values table, global importance and checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.schemas import (
    BASE_VALUE,
    CLASS,
    FEATURE,
    MODEL_OUTPUT,
    RANK,
    ROW_ID,
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

    @property
    def several_classes(self) -> bool:
        return len(self.labels) > 1


def combine_shards(
    shard_paths: list[str], destination: str | Path, features: list[str]
) -> tuple[int, float, list[str]]:
    """Stream the shard files, in order, into one parquet file; return rows, max additivity error, classes."""
    writer = None
    rows = 0
    worst = 0.0
    labels: list[str] = []
    last_row_id = -1
    try:
        for path in shard_paths:
            table = pq.read_table(path)
            frame = table.to_pandas()
            several = CLASS in frame.columns
            check_columns(frame, values_columns(features, several), f"shard {Path(path).name}")
            ids = frame[ROW_ID].to_numpy()
            if len(ids) and (ids[0] <= last_row_id or np.any(np.diff(ids) < 0)):
                raise ValueError(f"shard {Path(path).name}: rows are out of order")
            last_row_id = int(ids[-1]) if len(ids) else last_row_id
            if several and not labels:
                labels = list(dict.fromkeys(frame[CLASS].astype(str)))
            gap = (
                frame[BASE_VALUE].to_numpy()
                + frame[features].to_numpy().sum(axis=1)
                - frame[MODEL_OUTPUT].to_numpy()
            )
            if len(gap):
                worst = max(worst, float(np.nanmax(np.abs(gap))))
            rows += len(np.unique(ids))
            if writer is None:
                writer = pq.ParquetWriter(str(destination), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError("no shard produced values")
    return rows, worst, labels


_AGGREGATIONS = {
    "mean_abs": lambda v: float(np.mean(np.abs(v))),
    "mean": lambda v: float(np.mean(v)),
    "median": lambda v: float(np.median(v)),
    "mean_sq": lambda v: float(np.mean(np.square(v))),
    "std": lambda v: float(np.std(v)),
    "max_abs": lambda v: float(np.max(np.abs(v))),
}


def global_importance(
    values_path: str | Path, features: list[str], aggregations: list[str], labels: list[str]
) -> pd.DataFrame:
    """One row per feature (and class): each aggregation of its SHAP values, ranked by the first one."""
    several = len(labels) > 1
    classes = (
        pq.read_table(values_path, columns=[CLASS]).column(CLASS).to_numpy(zero_copy_only=False)
        if several
        else None
    )
    groups = labels if several else [None]
    records: list[dict[str, object]] = []
    for feature in features:
        column = pq.read_table(values_path, columns=[feature]).column(feature).to_numpy()
        for label in groups:
            values = column if label is None else column[classes == label]
            record: dict[str, object] = {FEATURE: feature}
            if label is not None:
                record[CLASS] = label
            for name in aggregations:
                record[name] = _AGGREGATIONS[name](values) if len(values) else float("nan")
            records.append(record)
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
    shard_paths: list[str], destination: str | Path, features: list[str], aggregations: list[str]
) -> Aggregate:
    """Combine the shards into shap_values.parquet and compute global importance and additivity."""
    rows, worst, labels = combine_shards(shard_paths, destination, features)
    importance = global_importance(destination, features, aggregations, labels)
    return Aggregate(str(destination), importance, rows, worst, labels)


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate_task(
    shard_paths: list[str], destination: str, features: list[str], aggregations: list[str]
) -> Aggregate:
    """Combine shards into the values table, global importance and the additivity check."""
    return aggregate(shard_paths, destination, features, aggregations)
