"""The monitor step of a run: compare it with its baseline, write drift.csv and plots/drift.png, tell Prefect.

The numbers are tasks/drift.py's; this module decides what a run does with them (config `monitor:`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapline.tasks.common.config import ExplainConfig
from shapline.tasks.common.schemas import importance_metric_keys
from shapline.tasks.explainers.choice import ExplainedOutput
from shapline.tasks.monitoring.drift import (
    Baseline,
    Comparison,
    compare_values,
    importance_drift_json,
    ndcg_said,
)
from shapline.tasks.monitoring.history import trend
from shapline.tasks.results.aggregate import Aggregate
from shapline.tasks.tracking.client import TrackedRun

DRIFT_EVENT = "shapline.attribution.drift"


@dataclass(frozen=True)
class Monitoring:
    """What the monitor step found: the baseline (or why none) and, with one, the comparison."""

    baseline: Baseline
    comparison: Comparison | None

    @property
    def drift(self) -> bool | None:
        """True or False against a baseline; None when there was none."""
        return None if self.comparison is None else self.comparison.drifted

    def tags(self) -> dict[str, str]:
        if self.comparison is None:
            return {}
        return {
            "shapline.baseline_run_id": self.comparison.baseline_run_id,
            "shapline.drift": "true" if self.comparison.drifted else "false",
        }


def monitor(
    run: TrackedRun,
    config: ExplainConfig,
    baseline: Baseline,
    combined: Aggregate,
    explained: list[ExplainedOutput],
    folder: Path,
) -> Monitoring:
    """Compare this run's values with the baseline's; drift.csv and plots/drift.png into `folder`."""
    from shapline.tasks.results.plots import render_drift_plot

    if not baseline.found or baseline.values_path is None or baseline.run_id is None:
        return Monitoring(baseline, None)
    comparison = compare_values(
        baseline.values_path,
        combined.values_path,
        baseline.run_id,
        config.monitor.ndcg_threshold,
        config.monitor.max_importance_change,
    )
    comparison.table.to_csv(folder / "drift.csv", index=False)
    ranking = config.output.aggregations[0]
    history = trend(run, config.model.name, combined.importance, ranking, baseline=baseline.run_id)
    worst = (
        min(comparison.ndcg_by_class, key=lambda k: comparison.ndcg_by_class[k])
        if comparison.ndcg_by_class
        else None
    )
    said = next((e for e in explained if e.label == worst), explained[0] if explained else None)
    what = f"{said.short} · " if said else ""
    title = (
        f"{config.model.name} · {what}attribution {ndcg_said(comparison.ndcg, comparison.threshold)}"
        f"{' · DRIFT' if comparison.drifted else ''}"
    )
    (folder / "plots").mkdir(exist_ok=True)
    columns = {
        pair: key.removeprefix("importance.")
        for pair, key in importance_metric_keys(combined.importance).items()
    }
    render_drift_plot(history, comparison, folder / "plots" / "drift.png", title, ranking, worst, columns)
    return Monitoring(baseline, comparison)


def drift_event(
    config: ExplainConfig, monitoring: Monitoring, run: TrackedRun, run_url: str
) -> dict[str, Any] | None:
    """The Prefect event a drifted run emits (for an Automation to act on), or None without drift."""
    comparison = monitoring.comparison
    if comparison is None or not comparison.drifted:
        return None
    return {
        "event": DRIFT_EVENT,
        "resource": {
            "prefect.resource.id": f"shapline.model.{config.model.name}",
            "prefect.resource.name": config.model.name,
            "shapline.experiment": config.experiment_name,
        },
        "payload": {
            "attribution_ndcg": comparison.ndcg,
            "attribution_ndcg_by_class": comparison.ndcg_by_class,
            "ndcg_threshold": comparison.threshold,
            "baseline_run_id": comparison.baseline_run_id,
            "baseline": monitoring.baseline.chosen,
            "max_importance_change": comparison.max_importance_change,
            "importance_drift": importance_drift_json(comparison.importance_drift),
            "mlflow_run_id": run.run_id,
            "mlflow_run_url": run_url,
            "on_drift": config.monitor.on_drift,
            "top_movers": [{"feature": f, "change": c} for f, c in comparison.top_movers(5)],
            "message": comparison.line(),
        },
    }
