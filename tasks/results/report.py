"""report.html: the one page a person opens first, self-contained (images inlined, no network, no script).

It renders from a file and inside MLflow's artifact viewer. Everything in it comes from what the run
already computed; the text is escaped and redacted like every other thing shapline writes.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from shapline.tasks.common.config import (
    ExplainConfig,
    MlflowModel,
    SageMakerModel,
    SklearnModel,
    XGBoostModel,
    effective_nsamples,
)
from shapline.tasks.common.markup import html_text
from shapline.tasks.common.schemas import CLASS, FEATURE, RANK
from shapline.tasks.compute.plan import DataCheck, RunPlan
from shapline.tasks.explainers.choice import ExplainedOutput
from shapline.tasks.monitoring.drift import Baseline, Comparison
from shapline.tasks.results.aggregate import Accuracy
from shapline.tasks.results.summary import RunSummary
from shapline.tasks.tracking.uris import is_http, open_hint, run_page

REPORT = "report.html"
# Rows of categories.csv the report shows (the artifact has every one).
REPORT_CATEGORIES = 40
# Drift table rows the report shows (drift.csv has every feature).
REPORT_MOVERS = 10


@dataclass(frozen=True)
class ReportFacts:
    """What the report says, gathered by the flow from the run's steps."""

    config: ExplainConfig
    check: DataCheck
    plan: RunPlan
    summary: RunSummary
    model_identity: dict[str, str]
    phases: dict[str, float]
    traffic: dict[str, float]
    baseline: Baseline | None
    comparison: Comparison | None
    plots: Path
    mlflow_url: str
    prefect_url: str | None = None
    id_column: str | None = None
    notes: list[str] = field(default_factory=list)
    # Per class, its waterfalls' files under plots/ by group (render_plots(...).waterfalls); the categories table.
    waterfalls: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    categories: pd.DataFrame | None = None
    # A kernel run's coalitions, model rows and standard errors (aggregate.Accuracy); None otherwise.
    accuracy: Accuracy | None = None


_e = html_text  # text as the page shows it: redacted, then escaped (images are inlined apart, untouched)


def _image(path: Path, alt: str) -> str:
    """A PNG inlined as a data URI (the report needs no file beside it and no network)."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"><figcaption>{_e(alt)}</figcaption></figure>'


def _table(frame: pd.DataFrame, numbers: str = "{:.4g}", cls: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float):
                cells.append(f'<td class="n">{_e(numbers.format(value))}</td>')
            elif isinstance(value, int) and not isinstance(value, bool):
                cells.append(f'<td class="n">{value}</td>')
            else:
                cells.append(f"<td>{_e(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _where(config: ExplainConfig, identity: dict[str, str]) -> list[tuple[str, str]]:
    model = config.model
    match model:
        case SklearnModel() | XGBoostModel():
            return [("file", model.path), ("sha256", identity.get("shapline.model_sha256", "?"))]
        case MlflowModel():
            rows = [("registry URI", model.uri)]
            if "shapline.model_name" in identity:
                rows.append(("registered model", identity["shapline.model_name"]))
            if "shapline.model_version" in identity:
                rows.append(("version", identity["shapline.model_version"]))
            return rows
        case SageMakerModel():
            rows = [("endpoint", model.endpoint.name)]
            if model.endpoint.region:
                rows.append(("region", model.endpoint.region))
            return rows
    return []


def _pairs(rows: list[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _what(facts: ReportFacts) -> str:
    config, check, plan, summary = facts.config, facts.check, facts.plan, facts.summary
    explained: list[ExplainedOutput] = plan.explained
    said = "; ".join(f"{e.output}, SHAP values in {e.units}" for e in explained)
    explainer = config.explainer
    settings: list[tuple[str, object]] = [
        ("explainer", f"{plan.algorithm} (configured: {explainer.algorithm})")
    ]
    if plan.algorithm in ("kernel", "permutation"):
        settings += [("nsamples", explainer.nsamples), ("seed", explainer.seed)]
    if plan.algorithm == "kernel":
        settings.append(("estimator", explainer.estimator))
        if explainer.estimator == "adaptive":
            settings.append(("tolerance", explainer.tolerance))
        else:
            settings.append(("l1_reg", explainer.l1_reg))
        settings.append(("link", plan.link))
    settings += [
        (
            "background",
            f"{len(plan.background.frame)} rows, {config.background.method}, seed {config.background.seed}",
        ),
    ]
    data: list[tuple[str, object]] = [
        ("source", check.data.uri),
        ("sha256", check.data.sha256),
        ("rows in the data", f"{check.data.rows:,}"),
        ("rows explained", f"{summary.rows_explained:,}"),
        ("features", f"{len(check.features)}"),
    ]
    if facts.id_column:
        data.append(("rows named by", facts.id_column))
    model: list[tuple[str, object]] = [("name", config.model.name), ("kind", config.model.kind)]
    model += _where(config, facts.model_identity)
    return (
        f'<p class="lead">Explained: <b>{_e(said)}</b>.</p>'
        '<div class="cols">'
        f"<section><h3>Model</h3>{_pairs(model)}</section>"
        f"<section><h3>Data</h3>{_pairs(data)}</section>"
        f"<section><h3>Explainer</h3>{_pairs(settings)}</section>"
        "</div>"
    )


def _validation(check: DataCheck) -> str:
    report = check.report
    verdict = "passed" if report.success else "FAILED (on_failure: warn, the run went on)"
    rows = []
    for item in report.result.get("results", []):
        expectation = item.get("expectation_config") or {}
        kwargs = {k: v for k, v in (expectation.get("kwargs") or {}).items() if k != "batch_id"}
        arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        automatic = (expectation.get("meta") or {}).get("shapline") == "automatic"
        observed = (item.get("result") or {}).get("observed_value", "")
        unexpected = (item.get("result") or {}).get("unexpected_count")
        found = f"{unexpected} unexpected" if unexpected else (observed if observed != "" else "")
        rows.append(
            {
                "expectation": expectation.get("type", "?"),
                "arguments": arguments,
                "from": "shapline" if automatic else "config",
                "result": "pass" if item.get("success") else "FAIL",
                "observed": str(found),
            }
        )
    table = _table(pd.DataFrame(rows), cls="validation") if rows else ""
    failures = "".join(f"<li>{_e(line)}</li>" for line in report.failures)
    return (
        f"<p>Great Expectations: <b>{_e(verdict)}</b>, {_e(report.counted())}.</p>"
        + (f"<ul class='bad'>{failures}</ul>" if failures else "")
        + table
    )


def _importance(facts: ReportFacts) -> str:
    importance = facts.summary.importance
    plots = facts.plots
    parts = []
    bar = plots / "bar.png"
    if bar.exists():
        parts.append(_image(bar, "mean |SHAP value| per feature"))
    groups = importance.groupby(CLASS, sort=False) if CLASS in importance.columns else [(None, importance)]
    for label, part in groups:
        heading = f"<h3>Class {_e(label)}</h3>" if label is not None else ""
        columns = [RANK, FEATURE, *[c for c in part.columns if c not in (RANK, FEATURE, CLASS)]]
        parts.append(heading + _table(part.sort_values(RANK)[columns].head(20), cls="importance"))
    for beeswarm in sorted(plots.glob("beeswarm*.png")):
        parts.append(_image(beeswarm, f"every explained row's SHAP values ({beeswarm.stem})"))
    return "".join(parts)


def _examples(facts: ReportFacts) -> str:
    """Every waterfall, by class and group: the highest model outputs, the lowest, the nearest the decision
    threshold; each named by its row (the id column, else row_id)."""
    parts = []
    several = len(facts.waterfalls) > 1
    for label, groups in facts.waterfalls.items():
        if several and groups:
            parts.append(f"<h3>Class {_e(label)}</h3>")
        for group, files in groups:
            shown = [facts.plots / name for name in files if (facts.plots / name).exists()]
            if shown:
                parts.append(f"<h3>The rows with the {_e(group)}</h3>")
                parts += [_image(path, path.stem) for path in shown]
    if not parts:
        return "<p>No waterfalls (output.plots has no waterfall, or output.top_k is 0).</p>"
    parts.append("<p class='note'>Each waterfall is an artifact under <code>plots/</code>.</p>")
    return "".join(parts)


def _categories(facts: ReportFacts) -> str:
    """What each value of a text or categorical feature does: the plot and the categories.csv table."""
    table = facts.categories
    if table is None or table.empty:
        return "<p>No text or categorical features.</p>"
    parts = [
        "<p>The mean SHAP value of a text or categorical feature over the rows with each of its values, and "
        "how many rows have it: which value pushes the output up, and which down.</p>"
    ]
    plot = facts.plots / "categories.png"
    if plot.exists():
        parts.append(_image(plot, "mean SHAP value per category"))
    parts.append(_table(table.head(REPORT_CATEGORIES), cls="categories"))
    parts.append("<p class='note'>Every category is in the <code>categories.csv</code> artifact.</p>")
    return "".join(parts)


def _drift(facts: ReportFacts) -> str:
    monitor = facts.config.monitor
    if facts.comparison is None:
        reason = facts.baseline.reason if facts.baseline is not None else "no comparison"
        return f"<p>No comparison: {_e(reason)}.</p>"
    comparison = facts.comparison
    css = "bad" if comparison.drifted else "good"
    per_class = ""
    if comparison.ndcg_by_class:
        per_class = (
            " (per class: " + ", ".join(f"{_e(k)} {v:.3f}" for k, v in comparison.ndcg_by_class.items()) + ")"
        )
    parts = [
        f'<p class="lead {css}">Attribution NDCG: <b>{_e(comparison.sentence())}</b>{per_class} '
        f"(monitor.baseline: {_e(monitor.baseline)}, on_drift: {_e(monitor.on_drift)}).</p>",
        _baseline(facts),
        f"<p>Top movers: {_e(comparison.movers_text(5))}.</p>",
    ]
    trend = facts.plots / "drift.png"
    if trend.exists():
        parts.append(
            _image(trend, "mean |SHAP value| of the top features across runs, and against the baseline")
        )
    parts.append(_table(comparison.table.head(REPORT_MOVERS), cls="drift"))
    parts.append("<p class='note'>Every feature is in the <code>drift.csv</code> artifact.</p>")
    return "".join(parts)


def _baseline(facts: ReportFacts) -> str:
    """Which run the baseline is, how monitor.baseline chose it, what it explained, and a link to it."""
    baseline = facts.baseline
    if baseline is None or not baseline.found:
        return ""
    link = f'<a href="{_e(baseline.url)}">run {_e(baseline.run_id)}</a>'
    rows: list[tuple[str, object]] = [
        ("chosen", baseline.how_chosen),
        ("run name", baseline.run_name),
        ("data", baseline.data_source or "?"),
        ("data sha256", baseline.data_sha256 or "?"),
        ("rows explained", f"{baseline.rows_explained:,}" if baseline.rows_explained is not None else "?"),
        ("started", baseline.when),
    ]
    opened = (
        f"<p class='note'>A local store: the link opens once <code>{_e(baseline.open_hint)}</code> runs.</p>"
        if baseline.open_hint
        else ""
    )
    return f"<h3>The baseline: {link}</h3>{_pairs(rows)}{opened}"


def _checks(facts: ReportFacts) -> str:
    summary, plan = facts.summary, facts.plan
    rows: list[tuple[str, object]] = [
        ("additivity max error", f"{summary.additivity_max_error:.3g}"),
        ("rows explained", f"{summary.rows_explained:,}"),
        ("shards", f"{summary.shards} ({summary.shards_computed} computed, {summary.shards_reused} reused)"),
        ("workers", f"{facts.config.shards.workers} {facts.config.shards.runner}"),
        ("rows per second (explain phase)", f"{summary.rows_per_s:.3g}"),
    ]
    rows += [(f"time: {name}", f"{seconds:.1f} s") for name, seconds in facts.phases.items()]
    if plan.estimate is not None:
        sent_rows = facts.traffic.get("inference_rows_sent")
        sent_requests = facts.traffic.get("inference_requests_sent")
        rows.append(
            (
                "endpoint inference rows",
                f"{sent_rows:,.0f} sent, {plan.estimate.inference_rows:,} estimated"
                if sent_rows is not None
                else f"{plan.estimate.inference_rows:,} estimated",
            )
        )
        rows.append(
            (
                "endpoint requests",
                f"{sent_requests:,.0f} sent, {plan.estimate.inference_requests:,} estimated"
                if sent_requests is not None
                else f"{plan.estimate.inference_requests:,} estimated",
            )
        )
    return _pairs(rows)


def _accuracy(facts: ReportFacts) -> str:
    """What the estimator spent and how sure its values are: the estimator and tolerance, coalitions per row
    as a distribution, the rows that did not converge by name, model rows against shap's estimator."""
    accuracy, explainer = facts.accuracy, facts.config.explainer
    if accuracy is None or not len(accuracy.coalitions):
        return (
            f"<p>The {_e(facts.plan.algorithm)} explainer samples no coalitions: its values carry no "
            "sampling error to report (standard errors are a kernel run's).</p>"
        )
    adaptive = explainer.estimator == "adaptive"
    rows = len(accuracy.coalitions)
    low, quarter, median, high, top = (
        float(q) for q in pd.Series(accuracy.coalitions).quantile([0, 0.25, 0.5, 0.9, 1.0])
    )
    pairs: list[tuple[str, object]] = [
        ("estimator", explainer.estimator),
        (
            "coalitions per row",
            f"median {median:,.0f} · min {low:,.0f} · 25% {quarter:,.0f} · 90% {high:,.0f} · max {top:,.0f}"
            f" (budget: nsamples {explainer.nsamples} = "
            f"{effective_nsamples(explainer.nsamples, len(facts.check.features)):,})",
        ),
    ]
    background = len(facts.plan.background.frame)
    shap_would = rows * effective_nsamples(explainer.nsamples, len(facts.check.features)) * background
    spent = f"{accuracy.model_rows:,}"
    if adaptive and shap_would:
        spent += (
            f" ({accuracy.model_rows / shap_would:.2f}× shap's estimator at nsamples {explainer.nsamples}:"
            f" {shap_would:,} if every feature varies)"
        )
    pairs.append(("model rows (coalitions × background rows)", spent))
    estimate = facts.plan.estimate
    if estimate is not None:
        sent = facts.traffic.get("inference_rows_sent")
        said = f"{estimate.inference_rows:,} estimated before the run (the whole budget of every row: an upper bound)"
        pairs.append(("endpoint inference rows", f"{sent:,.0f} sent; {said}" if sent is not None else said))
    if not adaptive:
        note = (
            '<p class="note">shap\'s estimator spends the whole budget on every row and gives no standard '
            "error: set <code>explainer.estimator: adaptive</code> for one on every value.</p>"
        )
        return _pairs(pairs) + note
    converged = rows - accuracy.rows_unconverged
    pairs[1:1] = [
        ("tolerance", f"{explainer.tolerance:g} × the spread of a row's values (its largest standard error)"),
        ("rows converged", f"{converged:,} of {rows:,}"),
        ("largest standard error", f"{accuracy.max_standard_error or 0.0:.3g}"),
    ]
    unconverged = ""
    if accuracy.rows_unconverged:
        more = accuracy.rows_unconverged - len(accuracy.unconverged)
        named = ", ".join(accuracy.unconverged) + (f" and {more:,} more" if more > 0 else "")
        unconverged = (
            f'<p class="bad">{accuracy.rows_unconverged:,} rows spent the budget without meeting the '
            f"tolerance (their values and standard errors are kept; raise <code>explainer.nsamples</code> or "
            f"<code>explainer.tolerance</code> for them to converge): {_e(named)}.</p>"
        )
    return (
        _pairs(pairs)
        + unconverged
        + '<p class="note">Each value\'s standard error is in <code>shap_standard_errors.parquet</code>; the '
        "waterfalls draw ± one of it, and global importance carries <code>mean_abs_se</code>.</p>"
    )


def _links(facts: ReportFacts) -> str:
    links = []
    if is_http(facts.mlflow_url):
        links.append(f'<a href="{_e(facts.mlflow_url)}">the MLflow run</a>')
    else:
        summary = facts.summary
        page = run_page(summary.tracking_uri, summary.experiment_id, summary.mlflow_run_id)
        hint = open_hint(summary.tracking_uri)
        links.append(
            f'<a href="{_e(page)}">the MLflow run</a> (a local store: start <code>{_e(hint)}</code> first)'
        )
    if facts.prefect_url:
        links.append(f'<a href="{_e(facts.prefect_url)}">the Prefect flow run</a>')
    return " · ".join(links)


# The page has no script and needs nothing from the network: a policy that forbids both, so even markup that
# got past the escaping could not run or load anything.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1100px;padding:0 24px 48px;color:#1d232b}
h1{font-size:24px;margin:24px 0 4px}h2{font-size:19px;border-bottom:1px solid #d9dee4;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:16px 0 6px}.sub{color:#5b6571;margin:0 0 8px}.lead{font-size:16px}
.cols{display:flex;gap:28px;flex-wrap:wrap}.cols section{flex:1 1 300px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}dt{color:#5b6571}dd{margin:0;word-break:break-all}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border-bottom:1px solid #e6e9ed;padding:3px 10px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f5f7}
img{max-width:100%;height:auto;border:1px solid #e6e9ed}figure{margin:12px 0}figcaption{color:#5b6571;font-size:12px}
.good{color:#1a7f37}.bad{color:#b42318}.note{color:#5b6571;font-size:13px}code{font-size:13px;background:#f3f5f7;padding:0 3px}
nav a{margin-right:14px}
"""


def render_report(facts: ReportFacts) -> str:
    """The report as one HTML document."""
    summary = facts.summary
    title = f"{facts.config.model.name}: SHAP explanation"
    drift_said = ""
    if facts.comparison is not None:
        drift_said = " · drift" if facts.comparison.drifted else " · no drift"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<title>{_e(title)}</title><style>{STYLE}</style></head><body>
<h1>{_e(title)}</h1>
<p class="sub">MLflow run <code>{_e(summary.mlflow_run_id)}</code> · experiment {_e(summary.experiment)} ·
{summary.rows_explained:,} rows · {"validation passed" if summary.validation_success else "validation failed"}{_e(drift_said)}</p>
<nav><a href="#what">What</a><a href="#validation">Validation</a><a href="#importance">Importance</a><a href="#categories">Categories</a><a href="#examples">Examples</a><a href="#drift">Drift</a><a href="#accuracy">Accuracy</a><a href="#checks">Checks</a></nav>
<h2 id="what">What was explained</h2>{_what(facts)}
<h2 id="validation">Validation</h2>{_validation(facts.check)}
<h2 id="importance">Global importance</h2>{_importance(facts)}
<h2 id="categories">What each category does</h2>{_categories(facts)}
<h2 id="examples">Examples: rows on both sides</h2>{_examples(facts)}
<h2 id="drift">Drift against the baseline</h2>{_drift(facts)}
<h2 id="accuracy">Accuracy</h2>{_accuracy(facts)}
<h2 id="checks">Checks</h2>{_checks(facts)}
<h2 id="links">Links</h2><p>{_links(facts)}</p>
</body></html>
"""
    return body


def write_report(facts: ReportFacts, folder: Path) -> Path:
    """Write report.html into the run's artifact folder."""
    path = folder / REPORT
    path.write_text(render_report(facts), encoding="utf-8")
    return path
