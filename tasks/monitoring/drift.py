"""Attribution drift: how one run's explanation moved against a baseline run of the same model.

The headline is SageMaker Clarify's: the NDCG of the current run's feature ranking, with each feature's
baseline mean |SHAP value| as its relevance. Beyond it, per feature, the change of mean |SHAP value|, the
two ranks, and the 1-Wasserstein distance between the two runs' distributions of local SHAP values.
Both runs' values are read from their shap_values.parquet one column at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shapline.tasks.common.cores import usable_cores
from shapline.tasks.common.errors import ConfigError
from shapline.tasks.common.schemas import (
    BASE_VALUE,
    CLASS,
    ID_COLUMN_METADATA,
    MODEL_OUTPUT,
    ROW_ID,
    distinct_keys,
)

VALUES = "shap_values.parquet"
DRIFT_COLUMNS = [
    "feature",
    "baseline_mean_abs",
    "mean_abs",
    "change",
    "baseline_rank",
    "rank",
    "wasserstein",
    "relative_change",
]
# monitor.max_importance_change judges a feature only where it matters: at least this share of the largest
# importance in the baseline or in this run (a feature near 0 in both "changes" by any ratio on noise).
JUDGED_SHARE = 0.01
# Params that say what a run explained: a baseline must have explained the same (see explained_signature).
_SIGNATURE_PARAMS = ("model.output", "model.class_index", "explainer.units")


def ndcg(relevance: Mapping[str, float], scores: Mapping[str, float]) -> float:
    """Clarify's NDCG of the ranking by `scores`, each feature's gain its `relevance` (baseline mean_abs).

    Over the union of features (a feature one side lacks counts 0 there). DCG = Σ rel(fᵢ)/log₂(i+1) over
    the ranking by score; iDCG the same over the ranking by relevance. Features whose scores tie share
    their positions' discounts equally, as `sklearn.metrics.ndcg_score` does, so the value does not
    depend on the order of tied features.
    """
    features = sorted(set(relevance) | set(scores))
    gains = np.array([float(relevance.get(f, 0.0)) for f in features])
    ranked = np.array([float(scores.get(f, 0.0)) for f in features])
    discounts = 1.0 / np.log2(np.arange(len(features)) + 2.0)
    ideal = float(np.sum(np.sort(gains)[::-1] * discounts))
    if ideal == 0.0:
        return 1.0  # nothing mattered in the baseline: no ranking can be worse than another
    order = np.argsort(-ranked, kind="stable")
    dcg, position = 0.0, 0
    for _, group in pd.Series(order).groupby(ranked[order], sort=False):
        size = len(group)
        dcg += float(np.mean(gains[group.to_numpy()])) * float(np.sum(discounts[position : position + size]))
        position += size
    return dcg / ideal


def explained_signature(params: Mapping[str, str]) -> tuple[str, ...]:
    """What a run explained, from its params: the output, the class index, the units and the class labels.

    Two runs compare only when these agree: importance in log-odds does not compare with probabilities.
    """
    labels = sorted((k, v) for k, v in params.items() if k.startswith("model.class_label"))
    return (*(params.get(name, "") for name in _SIGNATURE_PARAMS), *(f"{k}={v}" for k, v in labels))


def describe_signature(params: Mapping[str, str]) -> str:
    """A run's signature as a person reads it: `predict_proba, class 2 (Chinstrap), log-odds`."""
    labels = [v for k, v in sorted(params.items()) if k.startswith("model.class_label")]
    named = f" ({', '.join(labels)})" if labels else ""
    return (
        f"{params.get('model.output', '?')}, class_index {params.get('model.class_index', '?')}{named}, "
        f"{params.get('explainer.units', '?')}"
    )


@dataclass(frozen=True)
class Baseline:
    """The run a run is compared with (its values downloaded) and what it explained, or why there is none."""

    run_id: str | None
    reason: str
    values_path: str | None = None
    start_time_ms: int | None = None
    # How monitor.baseline chose it: previous, reference or run id.
    chosen: str = ""
    run_name: str = ""
    data_source: str = ""
    data_sha256: str = ""
    rows_explained: int | None = None
    # Its page: an MLflow server's URL, or for a local store the page `mlflow ui` serves (see open_hint).
    url: str = ""
    open_hint: str = ""

    @property
    def found(self) -> bool:
        return self.run_id is not None

    @property
    def when(self) -> str:
        """When the baseline run started, in UTC."""
        if not self.start_time_ms:
            return "?"
        from datetime import UTC, datetime

        return datetime.fromtimestamp(self.start_time_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")

    @property
    def how_chosen(self) -> str:
        return {
            "previous": "the latest earlier run with the same settings and rows (monitor.baseline: previous)",
            "reference": "the model's reference, pinned with shapline reference (monitor.baseline: reference)",
            "run id": "named by monitor.baseline",
        }.get(self.chosen, self.chosen)

    def explained(self) -> str:
        """What the baseline run explained: `344 rows of /x/penguins.csv (sha256 3f2a9c1e0b7d…) on 2025-12-05 00:03 UTC`."""
        rows = f"{self.rows_explained:,} rows" if self.rows_explained is not None else "rows"
        digest = f" (sha256 {self.data_sha256[:12]}…)" if self.data_sha256 else ""
        return f"{rows} of {self.data_source or '?'}{digest} on {self.when}"


@dataclass(frozen=True)
class Comparison:
    """One run against its baseline: NDCG (the minimum over classes), per class, and the per-feature table."""

    baseline_run_id: str
    ndcg: float
    ndcg_by_class: dict[str, float]
    table: pd.DataFrame = field(repr=False)
    threshold: float | None = None
    # monitor.max_importance_change: a feature whose importance changed by more than this fraction is drift.
    max_importance_change: float | None = None

    @property
    def drifted(self) -> bool:
        ndcg_drift = self.threshold is not None and self.ndcg < self.threshold
        return ndcg_drift or bool(self.importance_drift)

    @property
    def importance_drift(self) -> list[tuple[str, float]]:
        """The features (`feature [class]` with several classes) whose importance changed by more than
        max_importance_change of their baseline importance, largest change first; judged only where the
        feature matters (JUDGED_SHARE of its class's largest importance, in either run)."""
        limit = self.max_importance_change
        if limit is None or self.table.empty:
            return []
        table = self.table
        groups = table[CLASS] if CLASS in table.columns else pd.Series("", index=table.index)
        largest_then = table.groupby(groups)["baseline_mean_abs"].transform("max")
        largest_now = table.groupby(groups)["mean_abs"].transform("max")
        judged = (table["baseline_mean_abs"] >= JUDGED_SHARE * largest_then) | (
            table["mean_abs"] >= JUDGED_SHARE * largest_now
        )
        over = table[judged & (table["relative_change"].abs() > limit)]
        over = over.reindex(over["relative_change"].abs().sort_values(ascending=False, kind="stable").index)
        return list(zip(_names(over), over["relative_change"].astype(float).tolist(), strict=True))

    def top_movers(self, count: int = 2) -> list[tuple[str, float]]:
        """The features whose mean |SHAP value| changed most (the table is sorted by the change's size)."""
        rows = self.table.head(count)
        return list(zip(_names(rows), rows["change"].astype(float).tolist(), strict=True))

    def movers_text(self, count: int = 2) -> str:
        """The top movers as a person reads them; features whose importance did not change are no movers."""
        moved = [(name, change) for name, change in self.top_movers(count) if change != 0.0]
        if not moved:
            return "none (every feature's importance is the same)"
        return ", ".join(f"{name} ({signed(change)})" for name, change in moved)

    def sentence(self) -> str:
        """What the comparison found, as every place says it (`drift_sentence`)."""
        return drift_sentence(
            self.ndcg, self.threshold, self.baseline_run_id, self.importance_drift, self.max_importance_change
        )

    def line(self) -> str:
        """The one line a person reads: `attribution drift: NDCG 0.710 < 0.90 against run <id>; top movers: ...`."""
        return f"{self.sentence()}; top movers: {self.movers_text()}"

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline_run_id": self.baseline_run_id,
            "attribution_ndcg": self.ndcg,
            "attribution_ndcg_by_class": self.ndcg_by_class,
            "ndcg_threshold": self.threshold,
            "drift": self.drifted if self.threshold is not None else None,
            "top_movers": [{"feature": f, "change": c} for f, c in self.top_movers(5)],
            "max_importance_change": self.max_importance_change,
            "importance_drift": importance_drift_json(self.importance_drift),
        }


def _names(rows: pd.DataFrame) -> list[str]:
    """Features as a line names them: `island`, or `island [Chinstrap]` with several classes."""
    if CLASS in rows.columns:
        # Not itertuples: `class` is a keyword, which a namedtuple renames.
        return [f"{feature} [{label}]" for feature, label in zip(rows["feature"], rows[CLASS], strict=True)]
    return rows["feature"].astype(str).tolist()


def importance_drift_json(moved: list[tuple[str, float]]) -> list[dict[str, Any]]:
    """The features over monitor.max_importance_change as the --json object, the event and compare give them
    (an infinite change, from an importance of 0, as null)."""
    return [{"feature": f, "relative_change": c if np.isfinite(c) else None} for f, c in moved]


def ndcg_said(ndcg: float, threshold: float | None) -> str:
    """`NDCG 0.953 >= 0.90` (or `NDCG 0.953` without a threshold): the number against the threshold."""
    if threshold is None:
        return f"NDCG {ndcg:.3f}"
    return f"NDCG {ndcg:.3f} {'<' if ndcg < threshold else '>='} {threshold:.2f}"


def drift_sentence(
    ndcg: float,
    threshold: float | None,
    baseline_run_id: str | None,
    moved: Sequence[tuple[str, float | None]] = (),
    max_importance_change: float | None = None,
) -> str:
    """The one sentence every place (the log, the CLI, the report, the description, the Prefect artifact,
    `compare`) says a comparison in: `no attribution drift: NDCG 0.953 >= 0.90 against run <id>`, and with
    monitor.max_importance_change the features whose importance moved more (`moved`, relative changes)."""
    against = f" against run {baseline_run_id}" if baseline_run_id else ""
    if threshold is None:
        return f"{ndcg_said(ndcg, None)}{against}"
    head = "attribution drift" if ndcg < threshold or moved else "no attribution drift"
    said = f"{head}: {ndcg_said(ndcg, threshold)}{against}"
    if max_importance_change is None:
        return said
    limit = f"{max_importance_change:.0%}"
    if not moved:
        return f"{said}; no feature's importance changed by more than {limit}"
    features = ", ".join(f"{name} ({signed_percent(change)})" for name, change in moved)
    return f"{said}; importance changed by more than {limit}: {features}"


def signed(change: float) -> str:
    """+0.31 or −0.12 (a true minus sign, as a person writes it); a change under 0.01 keeps two digits
    (+0.0041), so only no change reads as 0."""
    text = f"{change:+.2f}" if abs(change) >= 0.01 or change == 0.0 else f"{change:+.2g}"
    return text.replace("-", "\u2212")


def signed_percent(change: float | None) -> str:
    """−100% or +45% (a relative change); from an importance of 0, `new`."""
    if change is None or not np.isfinite(change):
        return "new: from 0"
    return f"{change:+.0%}".replace("-", "\u2212")


def _value_columns(path: str | Path) -> tuple[list[str], list[str] | None, str | None]:
    """The feature columns of a values file, its classes (None for one), and its id column (if any)."""
    schema = pq.read_schema(path)
    names = schema.names
    fixed = {ROW_ID, CLASS, BASE_VALUE, MODEL_OUTPUT}
    named_id = (schema.metadata or {}).get(ID_COLUMN_METADATA)
    id_name = named_id.decode() if named_id else None
    features = [n for n in names if n not in fixed and n != id_name]
    classes = None
    if CLASS in names:
        column = pq.read_table(path, columns=[CLASS]).column(CLASS)
        classes = [str(v) for v in pc.unique(column).to_pylist()]
    return features, classes, id_name


def _columns_by_class(path: str | Path, feature: str, classes: list[str] | None) -> dict[str, np.ndarray]:
    """One feature's local values, split by class ("" for a run of one class), one column in memory."""
    column = pq.read_table(path, columns=[feature]).column(feature).to_numpy()
    if classes is None:
        return {"": column}
    labels = pq.read_table(path, columns=[CLASS]).column(CLASS).to_numpy(zero_copy_only=False).astype(str)
    return {label: column[labels == label] for label in classes}


def wasserstein(u: np.ndarray, v: np.ndarray) -> float:
    """The 1-Wasserstein distance of two samples (float64 or integers), equal bit for bit to scipy's own.

    scipy argsorts both samples, sorts their union, and binary-searches each sorted sample for every
    point of the union: a sort and two searches too many. Here the two sorted
    samples are merged by a stable sort (a linear merge of two runs) and each CDF is a running count of
    its sample's points: the same CDF values wherever the union steps (inside a run of ties the step is
    0, so the count there never matters), the same steps, the same dot product. Four arrays the size of
    the union are allocated, each used twice: fresh memory is paged in at a cost near the arithmetic's.
    """
    n, m = len(u), len(v)
    if not n or not m:
        return float("nan")
    merged = np.empty(n + m, dtype=np.result_type(u, v))
    merged[:n], merged[n:] = u, v
    merged[:n].sort()
    merged[n:].sort()
    order = np.argsort(merged, kind="stable")
    ordered = merged.take(order)
    from_u = order[:-1] < n
    steps = np.subtract(ordered[1:], ordered[:-1], out=merged[:-1])
    # Points of u among the first k + 1 of the union; those of v are the rest, counted exactly (integers
    # below 2**53 are exact as floats, so v's count divided by m is the same float as from integers).
    u_count = np.cumsum(from_u, out=order[:-1])
    cdf_gap = u_count / n if ordered.dtype != np.float64 else np.divide(u_count, n, out=ordered[:-1])
    v_part = np.arange(1.0, n + m)
    v_part -= u_count
    v_part /= m
    cdf_gap -= v_part
    return float(np.vecdot(np.abs(cdf_gap, out=cdf_gap), steps))


def compare_values(
    baseline_path: str | Path,
    current_path: str | Path,
    baseline_run_id: str,
    threshold: float | None,
    max_importance_change: float | None = None,
) -> Comparison:
    """Compare two runs' shap_values.parquet: NDCG per class, and the per-feature drift table.

    Reads one feature column of each file at a time per core (numpy's sorts release the GIL): memory is
    two columns per core, not two tables.
    """
    base_features, base_classes, _ = _value_columns(baseline_path)
    features, classes, _ = _value_columns(current_path)
    if (base_classes is None) != (classes is None) or set(base_classes or []) != set(classes or []):
        raise ConfigError(
            f"monitor.baseline: run {baseline_run_id} explained classes {base_classes or 'one output'}, "
            f"this run {classes or 'one output'}; they cannot be compared"
        )
    groups = classes or [""]

    def feature_records(feature: str) -> list[dict[str, Any]]:
        current = _columns_by_class(current_path, feature, classes) if feature in features else {}
        before = _columns_by_class(baseline_path, feature, base_classes) if feature in base_features else {}
        records: list[dict[str, Any]] = []
        for label in groups:
            now, then = current.get(label), before.get(label)
            record: dict[str, Any] = {"feature": feature}
            if classes is not None:
                record[CLASS] = label
            record["baseline_mean_abs"] = (
                float(np.mean(np.abs(then))) if then is not None and len(then) else 0.0
            )
            record["mean_abs"] = float(np.mean(np.abs(now))) if now is not None and len(now) else 0.0
            record["wasserstein"] = (
                wasserstein(now, then) if now is not None and then is not None else float("nan")
            )
            records.append(record)
        return records

    union = list(dict.fromkeys([*features, *base_features]))
    with ThreadPoolExecutor(max_workers=max(1, min(len(union), usable_cores()))) as pool:
        records = [record for part in pool.map(feature_records, union) for record in part]
    table = pd.DataFrame.from_records(records)
    by_class: dict[str, float] = {}
    parts: Any = table.groupby(CLASS, sort=False) if classes is not None else [("", table)]
    ranked = []
    for label, part in parts:
        part = part.copy()
        part["baseline_rank"] = part["baseline_mean_abs"].rank(method="min", ascending=False).astype(int)
        part["rank"] = part["mean_abs"].rank(method="min", ascending=False).astype(int)
        ranked.append(part)
        by_class[str(label)] = ndcg(
            dict(zip(part["feature"], part["baseline_mean_abs"], strict=True)),
            dict(zip(part["feature"], part["mean_abs"], strict=True)),
        )
    table = pd.concat(ranked)
    table["change"] = table["mean_abs"] - table["baseline_mean_abs"]
    with np.errstate(divide="ignore", invalid="ignore"):  # from 0: infinite (or, 0 to 0, no change)
        relative = table["change"].to_numpy(float) / table["baseline_mean_abs"].to_numpy(float)
    table["relative_change"] = np.where(table["change"].to_numpy(float) == 0.0, 0.0, relative)
    columns = [DRIFT_COLUMNS[0], *([CLASS] if classes is not None else []), *DRIFT_COLUMNS[1:]]
    table = table.reindex(table["change"].abs().sort_values(ascending=False, kind="stable").index)
    table = table[columns].reset_index(drop=True)
    overall = min(by_class.values())
    return Comparison(
        baseline_run_id=baseline_run_id,
        ndcg=overall,
        ndcg_by_class=by_class if classes is not None else {},
        table=table,
        threshold=threshold,
        max_importance_change=max_importance_change,
    )


def ndcg_metrics(comparison: Comparison) -> dict[str, float]:
    """attribution_ndcg (the minimum over classes) and, with several classes, attribution_ndcg.<class>."""
    metrics = {"attribution_ndcg": comparison.ndcg}
    keys = distinct_keys(f"attribution_ndcg.{label}" for label in comparison.ndcg_by_class)
    for label, value in comparison.ndcg_by_class.items():
        metrics[keys[f"attribution_ndcg.{label}"]] = value
    return metrics


# --- the same rows in two runs -----------------------------------------------------------------------


@dataclass(frozen=True)
class SameRows:
    """Two runs' local values for the rows both explained, matched by the id column."""

    id_column: str
    rows_in_both: int
    rows_only_a: int
    rows_only_b: int
    per_feature: pd.DataFrame = field(repr=False)  # feature, (class,) mean_abs_diff, max_abs_diff
    moved_rows: pd.DataFrame = field(repr=False)  # rows that moved: id, (class,) total_abs_diff, feature

    def to_json(self) -> dict[str, Any]:
        return {
            "id_column": self.id_column,
            "rows_in_both": self.rows_in_both,
            "rows_only_a": self.rows_only_a,
            "rows_only_b": self.rows_only_b,
            "per_feature": self.per_feature.to_dict(orient="records"),
            "moved_rows": self.moved_rows.to_dict(orient="records"),
        }


def same_rows(path_a: str, path_b: str, top: int = 5) -> SameRows | None:
    """The rows both runs explained (by data.id_column, when both runs had it), and how their values moved."""
    features_a, classes_a, id_a = _value_columns(path_a)
    features_b, classes_b, id_b = _value_columns(path_b)
    if id_a is None or id_a != id_b:
        return None
    features = [f for f in features_a if f in features_b]
    keys = [id_a, *([CLASS] if classes_a is not None and classes_b is not None else [])]
    a = pq.read_table(path_a, columns=[*keys, *features]).to_pandas().set_index(keys)
    b = pq.read_table(path_b, columns=[*keys, *features]).to_pandas().set_index(keys)
    common = a.index.intersection(b.index)
    diff = (b.loc[common, features] - a.loc[common, features]).abs()
    ids_a, ids_b = set(a.index.get_level_values(0)), set(b.index.get_level_values(0))
    by_feature = pd.DataFrame(
        {"feature": features, "mean_abs_diff": diff.mean().to_numpy(), "max_abs_diff": diff.max().to_numpy()}
    ).sort_values("mean_abs_diff", ascending=False, kind="stable")
    total = diff.sum(axis=1)
    moved = total[total > 0].sort_values(ascending=False, kind="stable").head(top)  # rows that did move
    moved_rows = moved.rename("total_abs_diff").reset_index()
    moved_rows["most_moved_feature"] = [str(diff.loc[k].idxmax()) for k in moved.index] if len(moved) else []
    return SameRows(
        id_column=id_a,
        rows_in_both=len({k[0] if isinstance(k, tuple) else k for k in common}),
        rows_only_a=len(ids_a - ids_b),
        rows_only_b=len(ids_b - ids_a),
        per_feature=by_feature.reset_index(drop=True),
        moved_rows=moved_rows,
    )
