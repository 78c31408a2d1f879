"""The one definition of the columns of shap_values.parquet and global_importance.csv, and of metric names."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

ROW_ID = "row_id"
CLASS = "class"
BASE_VALUE = "base_value"
MODEL_OUTPUT = "model_output"
FEATURE = "feature"
RANK = "rank"

RESERVED = frozenset({ROW_ID, CLASS, BASE_VALUE, MODEL_OUTPUT})


class SchemaError(ValueError):
    """A table does not have the columns its schema declares."""


def values_columns(features: list[str], several_classes: bool) -> list[str]:
    """shap_values.parquet: row_id, [class], one SHAP column per feature, base_value, model_output."""
    return [ROW_ID, *([CLASS] if several_classes else []), *features, BASE_VALUE, MODEL_OUTPUT]


def importance_columns(aggregations: Sequence[str], several_classes: bool) -> list[str]:
    """global_importance.csv: [class], feature, one column per aggregation, rank."""
    return [*([CLASS] if several_classes else []), FEATURE, *aggregations, RANK]


def check_columns(frame: pd.DataFrame, expected: list[str], table: str) -> pd.DataFrame:
    """Return the frame if its columns are exactly `expected`, in order; raise SchemaError otherwise."""
    actual = [str(c) for c in frame.columns]
    if actual != expected:
        raise SchemaError(f"{table}: expected columns {expected}, got {actual}")
    return frame


def reserved_feature_names(features: list[str]) -> list[str]:
    """Features whose names collide with the values table's own columns."""
    return [f for f in features if f in RESERVED]


def metric_key(name: str) -> str:
    """A name made legal for an MLflow metric key: every character but letters, digits, `_`, `-`, `.`, ` `
    and `/` becomes `_` (so `bill length (mm)` is `bill length _mm_`); the tables keep the true names."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:250]


def importance_metrics(importance: pd.DataFrame, ranking: str) -> dict[str, float]:
    """`importance.<feature>` (`importance.<class>.<feature>` with several classes) = the ranking aggregation,
    so MLflow's compare view and charts follow each feature across runs."""
    several = CLASS in importance.columns
    metrics = {}
    for _, row in importance.iterrows():
        name = f"{row[CLASS]}.{row[FEATURE]}" if several else str(row[FEATURE])
        metrics[metric_key(f"importance.{name}")] = float(row[ranking])
    return metrics
