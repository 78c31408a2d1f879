"""Render the SHAP plots people look at in MLflow: bar, beeswarm, waterfalls, an interactive force plot.

Importing this module leaves matplotlib's backend alone (a notebook keeps its own). Rendering picks Agg
only when nothing has chosen a backend yet (a worker's flow process, the CLI): shard threads must not
open GUI windows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shapline.tasks.aggregate import global_importance
from shapline.tasks.config import OutputConfig
from shapline.tasks.schemas import BASE_VALUE, CLASS, FEATURE, MODEL_OUTPUT, ROW_ID

# Beeswarm and force plots of more rows than this show an evenly spaced subset: the picture is
# the same and a browser can still open the force plot.
MAX_PLOTTED_ROWS = 2000
MAX_FORCE_ROWS = 500
# The values file is scanned this many rows at a time for the plotted rows: memory stays this
# small whatever the run's size.
READ_BATCH_ROWS = 65_536
# The bar chart shows this aggregation of global_importance.csv.
BAR_AGGREGATION = "mean_abs"


def _headless_unless_chosen() -> None:
    """Agg, unless a backend was chosen already (MPLBACKEND, a notebook, an earlier plot): left as it is."""
    import matplotlib

    # matplotlib's own test (pyplot uses it): None while the backend is still "auto", unchosen.
    chosen = getattr(matplotlib.rcParams, "_get_backend_or_none", lambda: "unknown")()
    if chosen is None:
        matplotlib.use("Agg")


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _numeric_view(rows: pd.DataFrame) -> pd.DataFrame:
    """Colour values for plots: numbers as they are, other columns as category codes."""
    view: dict[str, Any] = {}
    for column in rows.columns:
        series = rows[column]
        if pd.api.types.is_numeric_dtype(series):
            view[column] = series.astype(float)
        else:
            codes = pd.Categorical(series).codes.astype(float)
            view[column] = np.where(codes < 0, np.nan, codes)
    return pd.DataFrame(view, index=rows.index)


def _explanation(values: pd.DataFrame, rows: pd.DataFrame, features: list[str]) -> Any:
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


@dataclass(frozen=True)
class PlottedRows:
    """The rows of the values table one class's plots draw, in the order they draw them."""

    beeswarm: pd.DataFrame
    waterfall: pd.DataFrame
    force: pd.DataFrame


def read_rows_at(values_path: str | Path, positions: np.ndarray) -> pd.DataFrame:
    """The rows of a parquet file at sorted, unique positions, indexed by position; read a batch at a time."""
    # Page by page rather than whole column chunks first: less of the file in memory at once.
    file = pq.ParquetFile(values_path, pre_buffer=False, buffer_size=1 << 20)
    taken, start = [], 0
    last = int(positions[-1]) if len(positions) else -1
    for batch in file.iter_batches(batch_size=READ_BATCH_ROWS):
        if start > last:
            break
        stop = start + batch.num_rows
        low, high = np.searchsorted(positions, [start, stop])
        if high > low:
            taken.append(batch.take(pa.array(positions[low:high] - start)))
        start = stop
    frame = pa.Table.from_batches(taken, schema=file.schema_arrow).to_pandas()
    frame.index = pd.Index(positions)
    # Arrow's allocator keeps the scanned batches' pages; return them.
    pa.default_memory_pool().release_unused()
    return frame


def read_plotted_rows(
    values_path: str | Path, labels: list[str], config: OutputConfig
) -> dict[str, PlottedRows]:
    """Per class, the rows its beeswarm, waterfalls and force plot draw: model_output (and class) is read
    whole, then only those rows, so memory is a batch of the table, not the table."""
    several = len(labels) > 1
    outputs = pq.read_table(values_path, columns=[MODEL_OUTPUT, *([CLASS] if several else [])]).to_pandas()
    nothing = np.empty(0, dtype=np.int64)
    chosen: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for label in labels:
        part = outputs[outputs[CLASS] == label] if several else outputs
        beeswarm = _evenly(part, MAX_PLOTTED_ROWS).index if "beeswarm" in config.plots else nothing
        top = (
            part.sort_values(MODEL_OUTPUT, ascending=False, kind="stable").head(config.top_k).index
            if "waterfall" in config.plots and config.top_k > 0
            else nothing
        )
        force = _evenly(part, MAX_FORCE_ROWS).index if "force" in config.plots else nothing
        chosen[label] = (np.asarray(beeswarm), np.asarray(top), np.asarray(force))
    del outputs
    positions = np.unique(np.concatenate([p for picks in chosen.values() for p in picks])).astype(np.int64)
    table = read_rows_at(values_path, positions)
    return {label: PlottedRows(*(table.loc[p] for p in picks)) for label, picks in chosen.items()}


def bar_values(
    values_path: str | Path, features: list[str], labels: list[str], importance: pd.DataFrame | None
) -> dict[str, np.ndarray]:
    """Mean |SHAP| per feature (in `features` order) for each class: from the importance table when it has
    them, else from the values file a column at a time."""
    if importance is None or BAR_AGGREGATION not in importance.columns:
        importance = global_importance(values_path, features, [BAR_AGGREGATION], labels)
    several = len(labels) > 1
    bars = {}
    for label in labels:
        part = importance[importance[CLASS] == label] if several else importance
        bars[label] = part.set_index(FEATURE).loc[features, BAR_AGGREGATION].to_numpy(dtype=float)
    return bars


def render_plots(
    values_path: str | Path,
    rows: pd.DataFrame,
    features: list[str],
    labels: list[str],
    config: OutputConfig,
    folder: str | Path,
    importance: pd.DataFrame | None = None,
) -> list[Path]:
    """Write the configured plots under `folder`; several classes get one file per class (suffix _<class>)."""
    import shap

    _headless_unless_chosen()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    several = len(labels) > 1
    written: list[Path] = []
    max_display = max(config.top_k, 10)
    if "bar" in config.plots:
        # One row of mean |SHAP| per class: the bar chart averages |rows|, so it draws the same bars
        # as from every row, and a million-row run never holds its values matrix for it.
        bars = bar_values(values_path, features, labels, importance)
        if several:
            shap.summary_plot(
                [bars[label].reshape(1, -1) for label in labels],
                feature_names=features,
                class_names=labels,
                plot_type="bar",
                max_display=max_display,
                show=False,
            )
        else:
            only_values = shap.Explanation(values=bars[labels[0]].reshape(1, -1), feature_names=features)
            shap.plots.bar(only_values, max_display=max_display, show=False)
        written.append(_save(folder / "bar.png"))
    if not {"beeswarm", "waterfall", "force"} & set(config.plots):
        return written
    plotted = read_plotted_rows(values_path, labels, config)
    for label in labels:
        part = plotted[label]
        suffix = f"_{_safe(label)}" if several else ""
        if "beeswarm" in config.plots:
            shap.plots.beeswarm(
                _explanation(part.beeswarm, rows, features),
                max_display=max_display,
                show=False,
            )
            written.append(_save(folder / f"beeswarm{suffix}.png"))
        if "waterfall" in config.plots and config.top_k > 0:
            top = part.waterfall
            explanation = _explanation(top, rows, features)
            for position, row_id in enumerate(top[ROW_ID].to_numpy()):
                shap.plots.waterfall(explanation[position], max_display=max_display, show=False)
                written.append(_save(folder / f"waterfall_{int(row_id)}{suffix}.png"))
        if "force" in config.plots:
            shown = part.force
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
