"""Render the SHAP plots people look at in MLflow: bar, beeswarm, waterfalls, an interactive force plot."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config import OutputConfig  # noqa: E402
from tasks.schemas import BASE_VALUE, CLASS, MODEL_OUTPUT, ROW_ID  # noqa: E402

# Beeswarm and force plots of more rows than this show an evenly spaced subset: the picture is
# the same and a browser can still open the force plot.
MAX_PLOTTED_ROWS = 2000
MAX_FORCE_ROWS = 500


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _numeric_view(rows: pd.DataFrame) -> pd.DataFrame:
    """Colour values for plots: numbers as they are, other columns as category codes."""
    view = {}
    for column in rows.columns:
        series = rows[column]
        if pd.api.types.is_numeric_dtype(series):
            view[column] = series.astype(float)
        else:
            codes = pd.Categorical(series).codes.astype(float)
            view[column] = np.where(codes < 0, np.nan, codes)
    return pd.DataFrame(view, index=rows.index)


def _explanation(values: pd.DataFrame, rows: pd.DataFrame, features: list[str]):
    import shap

    ids = values[ROW_ID].to_numpy()
    data = rows.loc[ids, features]
    return shap.Explanation(
        values=values[features].to_numpy(dtype=float),
        base_values=values[BASE_VALUE].to_numpy(dtype=float),
        data=_numeric_view(data).to_numpy(),
        display_data=data.astype(object).to_numpy(),
        feature_names=features,
    )


def _save(path: Path) -> Path:
    figure = plt.gcf()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close("all")
    return path


def _evenly(frame: pd.DataFrame, limit: int) -> pd.DataFrame:
    if len(frame) <= limit:
        return frame
    return frame.iloc[np.linspace(0, len(frame) - 1, limit).astype(int)]


def render_plots(
    values: pd.DataFrame,
    rows: pd.DataFrame,
    features: list[str],
    labels: list[str],
    config: OutputConfig,
    folder: str | Path,
) -> list[Path]:
    """Write the configured plots under `folder`; several classes get one file per class (suffix _<class>)."""
    import shap

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    several = len(labels) > 1
    written: list[Path] = []
    max_display = max(config.top_k, 10)
    if "bar" in config.plots:
        if several:
            per_class = [
                values.loc[values[CLASS] == label, features].to_numpy(dtype=float) for label in labels
            ]
            shap.summary_plot(
                per_class,
                feature_names=features,
                class_names=labels,
                plot_type="bar",
                max_display=max_display,
                show=False,
            )
        else:
            # The bar chart needs only mean |SHAP|: no feature data, so it stays cheap at a million rows.
            only_values = shap.Explanation(values=values[features].to_numpy(dtype=float), feature_names=features)
            shap.plots.bar(only_values, max_display=max_display, show=False)
        written.append(_save(folder / "bar.png"))
    for label in labels:
        part = values[values[CLASS] == label] if several else values
        suffix = f"_{_safe(label)}" if several else ""
        if "beeswarm" in config.plots:
            shap.plots.beeswarm(
                _explanation(_evenly(part, MAX_PLOTTED_ROWS), rows, features),
                max_display=max_display,
                show=False,
            )
            written.append(_save(folder / f"beeswarm{suffix}.png"))
        if "waterfall" in config.plots and config.top_k > 0:
            top = part.sort_values(MODEL_OUTPUT, ascending=False, kind="stable").head(config.top_k)
            explanation = _explanation(top, rows, features)
            for position, row_id in enumerate(top[ROW_ID].to_numpy()):
                shap.plots.waterfall(explanation[position], max_display=max_display, show=False)
                written.append(_save(folder / f"waterfall_{int(row_id)}{suffix}.png"))
        if "force" in config.plots:
            shown = _evenly(part, MAX_FORCE_ROWS)
            data = rows.loc[shown[ROW_ID].to_numpy(), features].astype(object)
            plot = shap.plots.force(
                float(shown[BASE_VALUE].iloc[0]),
                shown[features].to_numpy(dtype=float),
                data if len(shown) > 1 else data.iloc[0],
                feature_names=features,
            )
            path = folder / f"force{suffix}.html"
            shap.save_html(str(path), plot)
            written.append(path)
    return written


@task(name="render-plots", cache_policy=NO_CACHE)
def render_plots_task(
    values_path: str,
    rows: pd.DataFrame,
    features: list[str],
    labels: list[str],
    config: OutputConfig,
    folder: str,
) -> list[str]:
    """Render the SHAP plots."""
    values = pd.read_parquet(values_path)
    return [str(p) for p in render_plots(values, rows, features, labels, config, folder)]
