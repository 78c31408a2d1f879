"""Render the SHAP plots people look at in MLflow: bar, beeswarm, waterfalls, an interactive force plot.

Importing this module leaves matplotlib's backend alone (a notebook keeps its own). Rendering picks Agg
only when nothing has chosen a backend yet (a worker's flow process, the CLI): shard threads must not
open GUI windows.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shapline.tasks.common.config import OutputConfig
from shapline.tasks.common.markup import script_json
from shapline.tasks.common.schemas import (
    BASE_VALUE,
    CLASS,
    FEATURE,
    MODEL_OUTPUT,
    ROW_ID,
    class_suffixes,
    distinct_keys,
    file_safe,
)
from shapline.tasks.compute.staging import StagedRows
from shapline.tasks.explainers.choice import ExplainedOutput
from shapline.tasks.monitoring.drift import Comparison
from shapline.tasks.results.aggregate import global_importance

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


def _as_probability(output: float, explained: ExplainedOutput | None) -> str:
    """A log-odds output also as the probability it is (what a person reads)."""
    if explained is None or explained.units != "log-odds":
        return ""
    return f" (P = {1.0 / (1.0 + np.exp(-output)):.3f})"


def _numeric_view(rows: pd.DataFrame) -> pd.DataFrame:
    """Colour values for the beeswarm: numbers as they are; text and categories have no High/Low, so they
    are missing (shap draws those grey) rather than category codes on a numeric scale."""
    view: dict[str, Any] = {}
    for column in rows.columns:
        series = rows[column]
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            view[column] = series.astype(float)
        else:
            view[column] = np.full(len(series), np.nan)
    return pd.DataFrame(view, index=rows.index)


def _explanation(
    values: pd.DataFrame, rows: pd.DataFrame, features: list[str], errors: pd.DataFrame | None = None
) -> Any:
    """shap's Explanation of these rows of the values table; with `errors` (the same rows of
    shap_standard_errors.parquet), each value's bounds are ± one standard error (waterfall error bars)."""
    import shap

    ids = values[ROW_ID].to_numpy()
    data = rows.loc[ids, features]
    shap_values = values[features].to_numpy(dtype=float)
    bounds: dict[str, Any] = {}
    if errors is not None:
        spread = errors[features].to_numpy(dtype=float)
        bounds = {"lower_bounds": shap_values - spread, "upper_bounds": shap_values + spread}
    return shap.Explanation(
        values=shap_values,
        base_values=values[BASE_VALUE].to_numpy(dtype=float),
        data=_numeric_view(data).to_numpy(),
        display_data=data.astype(object).to_numpy(),
        feature_names=features,
        **bounds,
    )


def _errors_of(errors_path: str | Path | None, drawn: pd.DataFrame) -> pd.DataFrame | None:
    """The standard errors of the drawn rows of the values table (indexed by position there): the errors
    file has the values file's rows in the same order, which is checked."""
    if errors_path is None or not len(drawn):
        return None
    errors = read_rows_at(errors_path, np.asarray(drawn.index, dtype=np.int64))
    keys = [ROW_ID, *([CLASS] if CLASS in drawn.columns else [])]
    if not errors[keys].astype(str).equals(drawn[keys].astype(str)):
        raise ValueError(f"{Path(errors_path).name}: its rows are not the values table's rows")
    return errors


# Readable on a laptop screen and in MLflow's artifact viewer: a width that fits the page, enough dots.
FIGURE_WIDTH_IN = 10.0
DPI = 144


def _save(path: Path, title: str | None = None, xlabel: str | None = None) -> Path:
    figure = plt.gcf()
    if xlabel and figure.axes:
        figure.axes[0].set_xlabel(xlabel, fontsize=12)
    width, height = figure.get_size_inches()
    if width < FIGURE_WIDTH_IN:
        figure.set_size_inches(FIGURE_WIDTH_IN, height * FIGURE_WIDTH_IN / width)
    if title:
        figure.suptitle(title, fontsize=11, x=0.02, ha="left", y=1.0)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close("all")
    return path


def _evenly(frame: pd.DataFrame, limit: int) -> pd.DataFrame:
    if len(frame) <= limit:
        return frame
    return frame.iloc[np.linspace(0, len(frame) - 1, limit).astype(int)]


@dataclass(frozen=True)
class PlottedRows:
    """The rows of the values table one class's plots draw, in the order they draw them: `waterfall` the
    top_k by highest model output, then the contrasting waterfalls (the lowest outputs, the outputs nearest
    the decision threshold), each row drawn once."""

    beeswarm: pd.DataFrame
    waterfall: pd.DataFrame
    force: pd.DataFrame
    lowest: pd.DataFrame | None = None
    nearest: pd.DataFrame | None = None

    def waterfall_groups(self) -> list[tuple[str, pd.DataFrame]]:
        """The waterfalls' rows by group, as the report shows them: (group, rows), groups with rows only."""
        groups = [(HIGHEST, self.waterfall), (LOWEST, self.lowest), (NEAREST, self.nearest)]
        return [(name, rows) for name, rows in groups if rows is not None and len(rows)]


# The waterfalls' groups, as plot titles and the report name them.
HIGHEST = "highest model output"
LOWEST = "lowest model output"
NEAREST = "nearest the decision threshold"


def decision_threshold(explained: ExplainedOutput | None) -> float | None:
    """Where the model's decision flips, in the units its SHAP values are in: P = 0.5, that is log-odds 0; a
    decision function's margin 0. None where there is no decision (a regression, an unknown output)."""
    if explained is None:
        return None
    return {"log-odds": 0.0, "probability": 0.5, "raw margin": 0.0}.get(explained.units)


def choose_waterfalls(outputs: pd.Series, top_k: int, threshold: float | None) -> list[pd.Index]:
    """The positions of the rows the waterfalls draw: the top_k highest outputs, then the top_k lowest of
    the rest, then (with a decision threshold) the top_k of the rest nearest it. Ties keep row order."""
    highest = outputs.sort_values(ascending=False, kind="stable").head(top_k).index
    rest = outputs.drop(highest)
    lowest = rest.sort_values(ascending=True, kind="stable").head(top_k).index
    rest = rest.drop(lowest)
    nearest = (
        (rest - threshold).abs().sort_values(kind="stable").head(top_k).index
        if threshold is not None
        else rest.index[:0]
    )
    return [highest, lowest, nearest]


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
    values_path: str | Path,
    labels: list[str],
    config: OutputConfig,
    thresholds: dict[str, float | None] | None = None,
) -> dict[str, PlottedRows]:
    """Per class, the rows its beeswarm, waterfalls and force plot draw: model_output (and class) is read
    whole, then only those rows, so memory is a batch of the table, not the table. `thresholds`: each
    class's decision threshold (its waterfalls nearest it), if it has one."""
    several = len(labels) > 1
    outputs = pq.read_table(values_path, columns=[MODEL_OUTPUT, *([CLASS] if several else [])]).to_pandas()
    nothing = np.empty(0, dtype=np.int64)
    chosen: dict[str, tuple[np.ndarray, ...]] = {}
    for label in labels:
        part = outputs[outputs[CLASS] == label] if several else outputs
        beeswarm = _evenly(part, MAX_PLOTTED_ROWS).index if "beeswarm" in config.plots else nothing
        waterfalls = (
            choose_waterfalls(part[MODEL_OUTPUT], config.top_k, (thresholds or {}).get(label))
            if "waterfall" in config.plots and config.top_k > 0
            else [nothing, nothing, nothing]
        )
        force = _evenly(part, MAX_FORCE_ROWS).index if "force" in config.plots else nothing
        top, lowest, nearest = (np.asarray(picked) for picked in waterfalls)
        chosen[label] = (np.asarray(beeswarm), top, np.asarray(force), lowest, nearest)
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


def waterfall_names(rows: pd.DataFrame, id_column: str | None) -> list[str]:
    """The file name stem of each row's waterfall (before its class suffix), in the rows' order: the row's
    id (data.id_column) made file-safe, else its row_id; ids that clean up alike each get a digest."""
    if id_column and id_column in rows.columns:
        ids = [str(value) for value in rows[id_column]]
        keys = distinct_keys(ids, file_safe, 100, fold=True)
        return [keys[name] for name in ids]
    return [str(int(row_id)) for row_id in rows[ROW_ID]]


def _named_groups(
    groups: list[tuple[str, pd.DataFrame]], id_column: str | None
) -> list[tuple[str, pd.DataFrame, list[str]]]:
    """Each waterfall group with its rows' file name stems (unique over the class's groups)."""
    if not groups:
        return []
    names = iter(waterfall_names(pd.concat([rows for _, rows in groups]), id_column))
    return [(group, rows, [next(names) for _ in range(len(rows))]) for group, rows in groups]


def _waterfall_file(name: str, suffix: str) -> str:
    return f"waterfall_{name}{suffix}.png"


class PlotFiles(list[Path]):
    """The files render_plots wrote and, per class, its waterfalls' file names under plots/ by group
    (highest, lowest, nearest the decision threshold): what the report shows, as drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.waterfalls: dict[str, list[tuple[str, list[str]]]] = {}


def _row_name(values: pd.DataFrame, position: int, row_id: int, id_column: str | None) -> str:
    """How a plot names a row: by data.id_column when the run has one (with its row_id), else by row_id."""
    if id_column and id_column in values.columns:
        return f"{id_column} {values[id_column].iloc[position]} (row_id {row_id})"
    return f"row_id {row_id}"


def render_plots(
    values_path: str | Path,
    rows: pd.DataFrame | StagedRows,
    features: list[str],
    labels: list[str],
    config: OutputConfig,
    folder: str | Path,
    importance: pd.DataFrame | None = None,
    explained: list[ExplainedOutput] | None = None,
    model: str = "model",
    id_column: str | None = None,
    errors_path: str | None = None,
) -> PlotFiles:
    """Write the configured plots under `folder`; several classes get one file per class (suffix _<class>).

    Every plot is titled with the model, what was explained and the units (`explained`, one per label).
    With `errors_path` (shap_standard_errors.parquet), each waterfall bar carries ± one standard error.
    """
    import shap

    named = dict(zip(labels, explained or [], strict=False))
    thresholds = {label: decision_threshold(named.get(label)) for label in labels}

    def title(label: str, what: str = "") -> str:
        output = named.get(label)
        said = f"{output.short} · SHAP values in {output.units}" if output else f"output {label}"
        return " · ".join(part for part in (model, said, what) if part)

    _headless_unless_chosen()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    several = len(labels) > 1
    written = PlotFiles()
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
        heading = (
            f"{model} · mean |SHAP value| per class" if several else title(labels[0], "mean |SHAP value|")
        )
        units = named[labels[0]].units if labels[0] in named else None
        axis = f"mean |SHAP value| ({units})" if units else None
        written.append(_save(folder / "bar.png", heading, axis))
    if not {"beeswarm", "waterfall", "force"} & set(config.plots):
        return written
    plotted = read_plotted_rows(values_path, labels, config, thresholds)
    # The data of only the rows drawn, from the staged shards when the flow no longer holds the data.
    drawn = np.unique(
        np.concatenate(
            [
                frame[ROW_ID].to_numpy()
                for part in plotted.values()
                for frame in (part.beeswarm, part.force, *(rows for _, rows in part.waterfall_groups()))
            ]
        )
    )
    rows = rows.loc[drawn] if isinstance(rows, pd.DataFrame) else rows.take(drawn)
    suffixes = class_suffixes(labels)
    for label in labels:
        part = plotted[label]
        suffix = suffixes[label]
        if "beeswarm" in config.plots:
            with warnings.catch_warnings():
                # Text columns have no colour value (NaN by design): numpy warns of an all-NaN slice.
                warnings.filterwarnings("ignore", "All-NaN slice encountered", RuntimeWarning)
                shap.plots.beeswarm(
                    _explanation(part.beeswarm, rows, features),
                    max_display=max_display,
                    show=False,
                )
            shown = f"{len(part.beeswarm):,} rows; text columns grey"
            output = named.get(label)
            axis = f"SHAP value ({output.units} of {output.short})" if output else None
            written.append(_save(folder / f"beeswarm{suffix}.png", title(label, shown), axis))
        if "waterfall" in config.plots and config.top_k > 0:
            named_groups = _named_groups(part.waterfall_groups(), id_column)
            written.waterfalls[label] = [
                (group, [_waterfall_file(name, suffix) for name in names]) for group, _, names in named_groups
            ]
            written += _waterfalls(
                named_groups,
                rows,
                features,
                folder,
                suffix,
                id_column,
                max_display,
                named.get(label),
                functools.partial(title, label),
                errors_path,
            )
        if "force" in config.plots:
            forced = part.force
            data = rows.loc[forced[ROW_ID].to_numpy(), features].astype(object)
            plot = shap.plots.force(
                float(forced[BASE_VALUE].iloc[0]),
                forced[features].to_numpy(dtype=float),
                data if len(forced) > 1 else data.iloc[0],
                feature_names=features,
            )
            path = folder / f"force{suffix}.html"
            write_force_html(path, plot, title(label, f"{len(forced):,} rows"))
            written.append(path)
    return written


def _waterfalls(
    named_groups: list[tuple[str, pd.DataFrame, list[str]]],
    rows: pd.DataFrame,
    features: list[str],
    folder: Path,
    suffix: str,
    id_column: str | None,
    max_display: int,
    explained: ExplainedOutput | None,
    title: Callable[[str], str],
    errors_path: str | None = None,
) -> list[Path]:
    """One class's waterfalls, group by group (highest, lowest, nearest the decision threshold), each file
    named by the row's id (waterfall_names) and titled with its row, its output and its group; with
    `errors_path`, each bar's ± one standard error as an error bar, and the title says so."""
    import shap

    threshold = decision_threshold(explained)
    written = []
    for group, drawn, names in named_groups:
        errors = _errors_of(errors_path, drawn)
        explanation = _explanation(drawn, rows, features, errors)
        for position, (row_id, name) in enumerate(zip(drawn[ROW_ID].to_numpy(), names, strict=True)):
            shap.plots.waterfall(explanation[position], max_display=max_display, show=False)
            value = float(drawn[MODEL_OUTPUT].iloc[position])
            said = f"model output {value:.4g}{_as_probability(value, explained)}"
            which = f"{group} ({threshold:g})" if group == NEAREST else group
            if errors is not None:
                which += (
                    f" · bars ± 1 standard error (largest {float(errors[features].iloc[position].max()):.2g})"
                )
            row = f"{_row_name(drawn, position, int(row_id), id_column)}: {said} · {which}"
            written.append(_save(folder / _waterfall_file(name, suffix), title(row)))
    return written


def _script_hash(code: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"


def write_force_html(path: Path, plot: Any, title: str) -> Path:
    """shap's interactive force plot as a page where the data cannot run code.

    shap's own save_html writes feature names and values into a script with json.dumps, so a column named
    `</script><script>...` ends shap's script and runs its own (and its JavaScript draws some labels as
    HTML). Here the data is script-safe JSON, and a Content-Security-Policy lets only the page's two
    scripts (shap's bundle and the call that draws the plot, by their sha256) run: no inline handler,
    no injected script, nothing fetched from the network.
    """
    from shap.plots._force import getjs

    bundle = getjs()
    bundle_code = bundle[bundle.index(">") + 1 : bundle.rindex("</script>")]
    component = type(plot).__name__  # AdditiveForceVisualizer or AdditiveForceArrayVisualizer
    draw = (
        f"if (window.SHAP) SHAP.ReactDom.render(SHAP.React.createElement(SHAP.{component}, "
        f"{script_json(plot.data)}), document.getElementById('shapline-force'));"
    )
    policy = (
        f"default-src 'none'; script-src {_script_hash(bundle_code)} {_script_hash(draw)}; "
        "style-src 'unsafe-inline'; img-src data:; font-src data:"
    )
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(policy)}">'
        f"<title>{html.escape(title)}</title><script charset='utf-8'>{bundle_code}</script></head><body>"
        f'<h1 style="font:15px system-ui,sans-serif">{html.escape(title)}</h1>'
        f"<div id='shapline-force'></div><script>{draw}</script></body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


# How many features the drift plot follows.
DRIFT_FEATURES = 8


def render_drift_plot(
    trend: pd.DataFrame,
    comparison: Comparison,
    path: str | Path,
    title: str,
    ranking: str,
    label: str | None,
    trend_columns: dict[tuple[str | None, str], str],
) -> Path:
    """plots/drift.png: left, the top features' importance across the last runs (oldest to newest, this run
    last); right, mean |SHAP value| of each top feature in the baseline and in this run.

    With several classes, the class whose NDCG is lowest (`label`) is drawn.
    """
    _headless_unless_chosen()
    table = comparison.table
    if label is not None and CLASS in table.columns:
        table = table[table[CLASS] == label]
    # The features that matter in either run: one that stopped mattering is the news.
    larger = np.maximum(table["mean_abs"].to_numpy(float), table["baseline_mean_abs"].to_numpy(float))
    top = table.iloc[np.argsort(-larger, kind="stable")[:DRIFT_FEATURES]]
    features = top["feature"].astype(str).tolist()
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(FIGURE_WIDTH_IN * 1.4, 5.0), gridspec_kw={"width_ratios": [3, 2]}
    )
    # The trend's columns are the importance.* metric keys (without the prefix) of this run's features.
    columns = [trend_columns.get((label, f), "") for f in features]
    x = np.arange(len(trend))
    for feature, column in zip(features, columns, strict=True):
        if column in trend.columns:
            left.plot(x, trend[column].to_numpy(dtype=float), marker="o", markersize=4, label=feature)
    left.set_xticks(x, trend.index.tolist(), rotation=45, ha="right", fontsize=8)
    left.set_ylabel(f"{ranking} (importance.* metric)")
    left.set_title(f"the last {len(trend)} runs, oldest to newest (UTC)", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.22), ncol=4, frameon=False)
    y = np.arange(len(features))[::-1]
    right.barh(
        y + 0.2, top["baseline_mean_abs"].to_numpy(dtype=float), height=0.4, label="baseline", color="#9aa5b1"
    )
    right.barh(y - 0.2, top["mean_abs"].to_numpy(dtype=float), height=0.4, label="this run", color="#d1495b")
    right.set_yticks(y, features, fontsize=9)
    right.set_xlabel("mean |SHAP value|")
    right.set_title(f"against run {comparison.baseline_run_id[:8]}", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _save(Path(path), title)
