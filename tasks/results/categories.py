"""What each value of a text or categorical feature does: categories.csv and plots/categories.png.

The beeswarm has no High/Low colour for text (`island`, `sex` are grey there), so nobody sees which island
pushes towards a class. Here each value of such a feature gets the mean of its rows' SHAP values for that
feature, and how many rows have it, per class: the effect of a category, in the units of the explanation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from shapline.tasks.common.config import OutputConfig
from shapline.tasks.common.schemas import CLASS, FEATURE, ROW_ID
from shapline.tasks.compute.staging import StagedRows
from shapline.tasks.explainers.choice import ExplainedOutput

CATEGORIES = "categories.csv"
CATEGORY = "category"
COUNT = "count"
MEAN_SHAP = "mean_shap_value"
# A missing value is a category of its own (an imputer gives it an effect).
MISSING = "(missing)"
# Values of a feature the table keeps, the most frequent first; the rest are one row (free text, ids).
MAX_CATEGORIES = 20
# Features the plot draws (the table has every one).
PLOTTED_FEATURES = 8
# shap's colours for a push up and a push down.
POSITIVE, NEGATIVE = "#ff0051", "#008bfb"


def category_columns(several_classes: bool) -> list[str]:
    """categories.csv: feature, [class], category, count, mean_shap_value."""
    return [FEATURE, *([CLASS] if several_classes else []), CATEGORY, COUNT, MEAN_SHAP]


def categorical_features(rows: pd.DataFrame, features: list[str]) -> list[str]:
    """The features whose values are text, categories or booleans: no High/Low scale (as the beeswarm sees them)."""
    return [
        feature
        for feature in features
        if not pd.api.types.is_numeric_dtype(rows[feature]) or pd.api.types.is_bool_dtype(rows[feature])
    ]


def _named(values: pd.Series) -> pd.Series:
    """Each value as its category's name: its text, missing values as MISSING."""
    return values.astype(object).where(values.notna(), MISSING).map(str)


def _explained_rows(rows: pd.DataFrame | StagedRows, features: list[str]) -> pd.DataFrame:
    """The categorical features of every explained row (by row_id), read a staged shard at a time."""
    if isinstance(rows, pd.DataFrame):
        return rows[features]
    parts = [rows.shard_rows(shard)[features] for shard in rows.shards]
    return pd.concat(parts) if parts else pd.DataFrame(columns=features)


def category_effects(
    values_path: str | Path, rows: pd.DataFrame | StagedRows, features: list[str], labels: list[str]
) -> pd.DataFrame:
    """Per text or categorical feature, per class, per value: how many rows have it and the mean SHAP value
    of the feature over those rows (sorted by that mean, largest first). Empty without such features."""
    several = len(labels) > 1
    sample = rows if isinstance(rows, pd.DataFrame) else rows.take(rows.shards[0].row_ids[:1])
    chosen = categorical_features(sample, features)
    if not chosen:
        return pd.DataFrame(columns=category_columns(several))
    data = _explained_rows(rows, chosen)
    values = pq.read_table(values_path, columns=[ROW_ID, *([CLASS] if several else []), *chosen]).to_pandas()
    classes = values[CLASS].astype(str) if several else pd.Series("", index=values.index)
    parts = []
    for feature in chosen:
        named = _named(data[feature]).reindex(values[ROW_ID].to_numpy()).to_numpy()
        counts = pd.Series(named).value_counts(sort=True)
        kept = set(counts.index[:MAX_CATEGORIES])
        if len(counts) > MAX_CATEGORIES:
            other = f"(other: {len(counts) - MAX_CATEGORIES} values)"
            named = np.where(pd.Series(named).isin(kept), named, other)
        frame = pd.DataFrame(
            {CLASS: classes.to_numpy(), CATEGORY: named, "value": values[feature].to_numpy()}
        )
        grouped = frame.groupby([CLASS, CATEGORY], sort=False)["value"].agg(["size", "mean"]).reset_index()
        grouped = grouped.rename(columns={"size": COUNT, "mean": MEAN_SHAP})
        grouped.insert(0, FEATURE, feature)
        order = {label: position for position, label in enumerate(labels if several else [""])}
        grouped["_class"] = grouped[CLASS].map(order)
        parts.append(grouped.sort_values(["_class", MEAN_SHAP], ascending=[True, False], kind="stable"))
    table = pd.concat(parts, ignore_index=True).drop(columns="_class")
    table[COUNT] = table[COUNT].astype(int)
    return table[category_columns(several)]


def render_category_plot(
    table: pd.DataFrame, labels: list[str], path: Path, title: str, units: str | None
) -> Path:
    """plots/categories.png: per feature, a bar per category of its mean SHAP value (positive red, negative
    blue, as shap colours them), with how many rows have it; several classes side by side."""
    import matplotlib.pyplot as plt

    from shapline.tasks.results.plots import FIGURE_WIDTH_IN, _headless_unless_chosen, _save

    _headless_unless_chosen()
    features = list(dict.fromkeys(table[FEATURE]))[:PLOTTED_FEATURES]
    several = CLASS in table.columns
    heights = [max(1, table.loc[table[FEATURE] == f, CATEGORY].nunique()) for f in features]
    figure, axes = plt.subplots(
        len(features),
        1,
        figsize=(FIGURE_WIDTH_IN, 1.0 + 0.45 * sum(heights) * (len(labels) if several else 1) ** 0.5),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axis, feature in zip(axes[:, 0], features, strict=True):
        part = table[table[FEATURE] == feature]
        categories = list(dict.fromkeys(part[CATEGORY]))
        y = np.arange(len(categories))[::-1]
        groups = [(label, part[part[CLASS] == label]) for label in labels] if several else [(None, part)]
        width = 0.8 / len(groups)
        for number, (label, rows) in enumerate(groups):
            by_category = rows.set_index(CATEGORY).reindex(categories)
            means = by_category[MEAN_SHAP].to_numpy(dtype=float)
            offset = (number - (len(groups) - 1) / 2) * width
            # One class: coloured by the sign of the effect, as shap does; several: a colour per class.
            signs = [POSITIVE if m >= 0 else NEGATIVE for m in np.nan_to_num(means)]
            bars = axis.barh(
                y - offset, means, height=width, color=signs if label is None else None, label=label
            )
            counts = by_category[COUNT].fillna(0).astype(int).to_numpy()
            axis.bar_label(bars, labels=[f" n={c}" for c in counts], fontsize=8, padding=2)
        axis.axvline(0.0, color="#5b6571", linewidth=0.8)
        axis.set_yticks(y, categories, fontsize=9)
        axis.set_title(feature, fontsize=10, loc="left")
        axis.margins(x=0.2)
        if several:
            axis.legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel(f"mean SHAP value ({units})" if units else "mean SHAP value")
    figure.tight_layout()
    return _save(path, title)


def write_categories(
    values_path: str | Path,
    rows: pd.DataFrame | StagedRows,
    features: list[str],
    labels: list[str],
    config: OutputConfig,
    folder: str | Path,
    explained: list[ExplainedOutput] | None = None,
    model: str = "model",
) -> pd.DataFrame:
    """categories.csv into `folder` (top level) and, when output.plots has categories, plots/categories.png;
    nothing for a run without text or categorical features. Returns the table."""
    table = category_effects(values_path, rows, features, labels)
    if table.empty:
        return table
    folder = Path(folder)
    table.to_csv(folder / CATEGORIES, index=False)
    if "categories" in config.plots:
        (folder / "plots").mkdir(exist_ok=True)
        first = explained[0] if explained else None
        what = f"{first.short} · SHAP values in {first.units} · " if first and len(labels) == 1 else ""
        title = f"{model} · {what}mean SHAP value per category (n: rows)"
        render_category_plot(
            table, labels, folder / "plots" / "categories.png", title, first.units if first else None
        )
    return table
