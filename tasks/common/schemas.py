"""The one definition of the columns of shap_values.parquet and global_importance.csv, and of metric names."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence

import pandas as pd

ROW_ID = "row_id"
CLASS = "class"
BASE_VALUE = "base_value"
MODEL_OUTPUT = "model_output"
FEATURE = "feature"
RANK = "rank"
# shap_standard_errors.parquet's per-row columns (estimator adaptive).
COALITIONS = "coalitions"
CONVERGED = "converged"
# global_importance.csv's column of the standard error of mean |SHAP value| (estimator adaptive).
UNCERTAINTY = "mean_abs_se"

# Tags and params a run records that later runs (and `compare`) read back: one name for writer and reader.
MODEL_TAG = "shapline.model"
# What makes runs comparable (monitor.baseline previous): the settings, and the rows explained.
IDENTITY_TAG = "shapline.config_identity"
SELECTION_TAG = "shapline.row_selection"
# The run `shapline reference RUN_ID` pinned as its model's reference (monitor.baseline reference).
REFERENCE_TAG = "shapline.reference"
DATA_SOURCE_TAG = "shapline.data_source"
DATA_SHA256_TAG = "shapline.data_sha256"


def monitor_param(key: str) -> str:
    """The MLflow param of a `monitor:` key: monitor.baseline, monitor.ndcg_threshold, monitor.on_drift."""
    return f"monitor.{key}"


NDCG_THRESHOLD_PARAM = monitor_param("ndcg_threshold")
MAX_CHANGE_PARAM = monitor_param("max_importance_change")

# background.parquet's column of k-means centres' weights.
BACKGROUND_WEIGHT = "shapline_weight"

# Names of columns shapline adds to the tables it writes: a feature of the same name would be overwritten.
# The values file's metadata names its id column (data.id_column), so a reader tells it from a feature.
ID_COLUMN_METADATA = b"shapline.id_column"

RESERVED = frozenset({ROW_ID, CLASS, BASE_VALUE, MODEL_OUTPUT, BACKGROUND_WEIGHT})


class SchemaError(ValueError):
    """A table does not have the columns its schema declares."""


def values_columns(features: list[str], several_classes: bool) -> list[str]:
    """shap_values.parquet: row_id, [class], one SHAP column per feature, base_value, model_output."""
    return [ROW_ID, *([CLASS] if several_classes else []), *features, BASE_VALUE, MODEL_OUTPUT]


def errors_columns(features: list[str], several_classes: bool) -> list[str]:
    """shap_standard_errors.parquet: row_id, [class], one standard error per feature, coalitions, converged
    (the id column, when the run has one, after row_id, as in the values table)."""
    return [ROW_ID, *([CLASS] if several_classes else []), *features, COALITIONS, CONVERGED]


def importance_columns(aggregations: Sequence[str], several_classes: bool) -> list[str]:
    """global_importance.csv: [class], feature, one column per aggregation, rank."""
    return [*([CLASS] if several_classes else []), FEATURE, *aggregations, RANK]


def rows_named(row_ids: Sequence[object]) -> str:
    """Rows as a message names them: `row_id 7`, or `row_ids 7-19` (the first and the last)."""
    if len(row_ids) == 1:
        return f"row_id {row_ids[0]}"
    return f"row_ids {row_ids[0]}-{row_ids[-1]}" if len(row_ids) else "no rows"


def check_columns(frame: pd.DataFrame, expected: list[str], table: str) -> pd.DataFrame:
    """Return the frame if its columns are exactly `expected`, in order; raise SchemaError otherwise."""
    actual = [str(c) for c in frame.columns]
    if actual != expected:
        raise SchemaError(f"{table}: expected columns {expected}, got {actual}")
    return frame


def reserved_feature_names(features: list[str]) -> list[str]:
    """Features whose names collide with the values table's own columns."""
    return [f for f in features if f in RESERVED]


# What MLflow allows in a metric key that every backend and platform also allows (MLflow adds ":" on POSIX and
# Unicode letters through \w; shapline's keys stay within ASCII so a key reads the same everywhere).
_ILLEGAL_IN_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_KEY_CHARS = 250
# An altered name that collides with another gets this many hex characters of its own name's sha256.
_DIGEST_CHARS = 8


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_CHARS]


def _resolves_elsewhere(key: str) -> bool:
    """MLflow refuses a key that, read as a path, names another one (`a/../b`, `a//b`, a trailing `/`)."""
    norm = posixpath.normpath(key)
    return norm != key or norm == "." or norm.startswith(("..", "/"))


def metric_key(name: str) -> str:
    """A name made legal for an MLflow metric key: every character but letters, digits, `_`, `-`, `.`, ` `
    and `/` becomes `_` (so `bill length (mm)` is `bill length _mm_`), and `/` too where the key would
    read as another path (`../x`); at most 250 characters. Two names can meet here: see `distinct_keys`."""
    key = _ILLEGAL_IN_KEY.sub("_", name)
    if _resolves_elsewhere(key):
        key = key.replace("/", "_")
    return key[:MAX_KEY_CHARS]


def distinct_keys(
    names: Iterable[str],
    legal: Callable[[str], str] = metric_key,
    limit: int = MAX_KEY_CHARS,
    fold: bool = False,
) -> dict[str, str]:
    """A unique legal key for each of `names`: `legal(name)`, unless another name's key is the same, when each of
    them gets `-<8 hex of its sha256>` but a name legal as it is, which keeps itself. So a key never merges two
    names, and depends only on the names that collide with it. `fold`: keys that differ only in case collide
    too (file names on a case-insensitive disk; of two such names legal as they are, the first sorted keeps
    itself)."""
    names = list(dict.fromkeys(names))
    keys = {name: legal(name) for name in names}

    def same(key: str) -> str:
        return key.lower() if fold else key

    groups: dict[str, list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(same(key), []).append(name)
    # In a group of names with one key, the first name that is its own key keeps it; the others get digests.
    keeper = {group: min((n for n in names if keys[n] == n), default=None) for group, names in groups.items()}
    result = {}
    for name, key in keys.items():
        group = same(key)
        if len(groups[group]) > 1 and name != keeper[group]:
            suffix = f"-{_digest(name)}"
            key = key[: limit - len(suffix)] + suffix
        result[name] = key
    if len({same(key) for key in result.values()}) != len(result):  # a digest meeting a name: not seen
        raise ValueError(f"cannot give {len(result)} names distinct keys")
    return result


def importance_metric_keys(importance: pd.DataFrame) -> dict[tuple[str | None, str], str]:
    """The `importance.*` metric key of each (class, feature) of a global importance table: `importance.<feature>`,
    with several classes `importance.<class>.<feature>` (see `distinct_keys`)."""
    several = CLASS in importance.columns
    pairs = [
        (str(label) if several else None, str(feature))
        for label, feature in zip(
            importance[CLASS] if several else [None] * len(importance), importance[FEATURE], strict=True
        )
    ]
    names = {
        pair: f"importance.{pair[0]}.{pair[1]}" if several else f"importance.{pair[1]}" for pair in pairs
    }
    keys = distinct_keys(names.values())
    return {pair: keys[name] for pair, name in names.items()}


def importance_metrics(importance: pd.DataFrame, ranking: str) -> dict[str, float]:
    """`importance.<feature>` (`importance.<class>.<feature>` with several classes) = the ranking aggregation,
    so MLflow's compare view and charts follow each feature across runs."""
    keys = importance_metric_keys(importance)
    several = CLASS in importance.columns
    values = importance[ranking].astype(float).to_numpy()
    labels = importance[CLASS].astype(str) if several else [None] * len(importance)
    return {
        keys[(label, str(feature))]: float(value)
        for label, feature, value in zip(labels, importance[FEATURE], values, strict=True)
    }


def file_safe(label: str) -> str:
    """A name as a file name keeps it: letters, digits, `_`, `.` and `-`, the rest `_`; at most 100 characters."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:100]


def class_suffixes(labels: list[str]) -> dict[str, str]:
    """The file name suffix of each class's plots (`_<class>`, empty for one class): unique per class, even
    for labels that make the same file name (`yes/no` and `yes_no`; `Yes` and `yes` on a case-insensitive
    disk), which get their own digest."""
    if len(labels) <= 1:
        return dict.fromkeys(labels, "")
    return {label: f"_{name}" for label, name in distinct_keys(labels, file_safe, 100, fold=True).items()}
