"""The data a run explains: read from its source, the features chosen, the rows to explain sampled."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from shapline.tasks.common.config import DataConfig
from shapline.tasks.common.errors import DataError
from shapline.tasks.common.schemas import RESERVED, reserved_feature_names
from shapline.tasks.data.s3 import S3Object
from shapline.tasks.data.sources import DataSource, LocalFile


def open_source(config: DataConfig) -> DataSource:
    """The DataSource for data.source: a local path, or an s3:// URI (the one place a scheme meets its storage)."""
    uri = config.source
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return LocalFile(uri)
    if scheme == "s3":
        return S3Object(uri, config.s3)
    raise DataError(f"data.source: unsupported scheme {scheme!r} in {uri} (expected a local path or s3://)")


@dataclass(frozen=True)
class LoadedData:
    """The whole table (row_id = position in the file), a fingerprint of the file's bytes, and any column
    name the file repeats (pandas renames a repeated CSV column `x` to `x.1`: validation refuses it)."""

    frame: pd.DataFrame
    sha256: str
    uri: str
    repeated_columns: tuple[str, ...] = ()
    # The rows the data had, once `without_frame` let them go (else the frame's length).
    row_count: int | None = None

    @property
    def rows(self) -> int:
        """Rows in the data."""
        return self.row_count if self.row_count is not None else len(self.frame)

    def without_frame(self) -> LoadedData:
        """The same facts about the data with an empty frame of its columns and dtypes (the rows let go)."""
        return replace(self, frame=self.frame.iloc[:0].copy(), row_count=self.rows)


def load_data(config: DataConfig) -> LoadedData:
    """Read the configured source and fingerprint it."""
    source = open_source(config)
    # An id is text as the file writes it: read as a number, `000002` would become 2 and name another row.
    frame, sha256, repeated = source.read_table(() if config.id_column is None else (config.id_column,))
    return LoadedData(frame=frame, sha256=sha256, uri=source.uri, repeated_columns=repeated)


def feature_columns(frame: pd.DataFrame, config: DataConfig, model_features: list[str] | None) -> list[str]:
    """The features to explain, in model order: configured, else the model's own, else all but target/drop.

    Configured features that leave out one the model names (feature_names_in_, a registry model's signature)
    or name one it does not take are one line naming the columns, before the model is ever called: the
    model would refuse the first, and the second would be explained as if it mattered. The order is the
    model's to judge (a registry model takes any); a configured column the data lacks is validation's to
    name (an automatic expectation).
    """
    if config.features is not None:
        in_data = set(config.features) <= {str(c) for c in frame.columns}
        if model_features is not None and in_data and set(config.features) != set(model_features):
            raise DataError(_features_unlike(list(config.features), list(model_features)))
        return list(config.features)
    if model_features is not None:
        if config.id_column is not None and config.id_column in model_features:
            raise DataError(
                f"data.id_column: {config.id_column!r} is one of the model's features; an id is not a feature"
            )
        return list(model_features)
    excluded = set(config.drop) | {c for c in (config.target, config.id_column) if c is not None}
    return [column for column in frame.columns if column not in excluded]


def _features_unlike(configured: list[str], needed: list[str]) -> str:
    missing = [f for f in needed if f not in configured]
    unknown = [f for f in configured if f not in needed]
    said = [f"leaves out {_some(missing)}, which the model needs"] if missing else []
    said += [f"lists {_some(unknown)}, which the model does not take"] if unknown else []
    return (
        f"data.features {' and '.join(said)}; the model's features, in order: {_some(needed, 30)} "
        "(or leave data.features out)"
    )


def explain_rows_said(explain_rows: int | str, rows: int) -> str | None:
    """When data.explain_rows asks for more rows than the data has: the line saying the run explains all."""
    if explain_rows == "all" or int(explain_rows) <= rows:
        return None
    return f"data.explain_rows {explain_rows} is more than the {rows:,} rows of the data: the run explains all {rows:,}"


def select_explain_rows(frame: pd.DataFrame, explain_rows: int | str, seed: int) -> pd.DataFrame:
    """The rows to explain, in row order: all of them, or a seeded sample without replacement."""
    if explain_rows == "all" or int(explain_rows) >= len(frame):
        return frame
    sampled = frame.sample(n=int(explain_rows), random_state=seed)
    return sampled.sort_index()


def split_features(
    frame: pd.DataFrame, config: DataConfig, features: list[str]
) -> tuple[pd.DataFrame, pd.Series | None]:
    """The feature columns (in model order) and the target column, if any."""
    clash = reserved_feature_names(features)
    if clash:
        raise DataError(
            f"data.features: {', '.join(map(repr, clash))}: a name shapline gives a column of its own tables "
            f"(shap_values.parquet, background.parquet: {', '.join(sorted(RESERVED))}); rename the feature"
        )
    missing = [column for column in config.drop if column not in frame.columns]
    if missing:
        raise DataError(
            f"data.drop: {', '.join(repr(c) for c in missing)} not in {config.source} "
            f"(its columns: {_some(frame.columns)})"
        )
    target = None
    if config.target is not None:
        if config.target not in frame.columns:
            raise DataError(f"data.target: column {config.target!r} is not in {config.source}")
        target = frame[config.target]
    return frame[features], target


def _some(columns: Any, shown: int = 12) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
