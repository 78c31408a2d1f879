"""A model's earlier runs in MLflow: the baseline a run is compared with, the trend, two runs for compare.

The drift maths is monitoring/drift.py's; this module only asks MLflow, through one client per call.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from shapline.tasks.common.errors import ConfigError, TrackingError, one_line
from shapline.tasks.common.schemas import MODEL_TAG, NDCG_THRESHOLD_PARAM, importance_metrics
from shapline.tasks.monitoring.drift import (
    VALUES,
    Baseline,
    Comparison,
    compare_values,
    describe_signature,
    explained_signature,
)
from shapline.tasks.tracking.client import TrackedRun

# How many runs the trend plot follows (oldest to newest, the current one last).
TREND_RUNS = 20


def _download_values(client: Any, run_id: str, folder: Path) -> str:
    from mlflow.exceptions import MlflowException

    target = folder / f"baseline-{run_id}"
    target.mkdir(parents=True, exist_ok=True)
    try:
        return str(client.download_artifacts(run_id, VALUES, str(target)))
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"monitor.baseline: cannot read {VALUES} of run {run_id}: {one_line(exc, 200)}"
        ) from exc


def shapline_runs(
    client: Any, experiment_id: str, model: str, signature: tuple[str, ...], limit: int, exclude: str = ""
) -> list[Any]:
    """The experiment's FINISHED runs of this model that explained the same thing, newest first."""
    escaped = model.replace("'", "\\'")
    found: list[Any] = []
    token = None
    while len(found) < limit:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"attributes.status = 'FINISHED' and tags.`{MODEL_TAG}` = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=100,
            page_token=token,
        )
        found += [
            r for r in page if r.info.run_id != exclude and explained_signature(r.data.params) == signature
        ]
        token = page.token
        if not token:
            break
    return found[:limit]


def resolve_baseline(run: TrackedRun, model: str, baseline: str, folder: Path) -> Baseline:
    """The run this run is compared with, its values downloaded into `folder`; or why there is none.

    `previous`: the latest FINISHED run of the same model in the experiment that explained the same output,
    class(es) and units. A run id: that run, which must be a FINISHED shapline run that explained the
    same (refused with one line otherwise: a comparison of unlike things would be silently wrong).
    Called before any SHAP compute, so a wrong baseline costs nothing.
    """
    from mlflow.exceptions import MlflowException

    if baseline == "none":
        return Baseline(None, "monitor.baseline is none: no comparison")
    client = run.client
    signature = explained_signature(client.get_run(run.run_id).data.params)
    if baseline == "previous":
        runs = shapline_runs(client, run.experiment_id, model, signature, limit=1, exclude=run.run_id)
        if not runs:
            return Baseline(
                None,
                f"no earlier FINISHED run of {model} in this experiment explained the same output: "
                "this is the first, and the next run is compared with it",
            )
        chosen = runs[0]
    else:
        try:
            chosen = client.get_run(baseline)
        except MlflowException as exc:
            raise ConfigError(f"monitor.baseline: no MLflow run {baseline!r} at {run.tracking_uri}") from exc
        problem = _unlike(chosen, signature)
        if problem:
            raise ConfigError(f"monitor.baseline: run {baseline} {problem}")
    values = _download_values(client, chosen.info.run_id, folder)
    return Baseline(chosen.info.run_id, "", values, chosen.info.start_time)


def _unlike(run: Any, signature: tuple[str, ...]) -> str | None:
    """Why a named baseline run cannot be this run's baseline, or None."""
    if run.info.status != "FINISHED":
        return f"is {run.info.status}, not FINISHED"
    if MODEL_TAG not in run.data.tags:
        return "is not a shapline run (no shapline.model tag)"
    if explained_signature(run.data.params) != signature:
        return f"explained {describe_signature(run.data.params)}: not what this run explains"
    return None


def load_comparison(tracking_uri: str, run_a: str, run_b: str, folder: Path) -> tuple[Comparison, Any, Any]:
    """`shapline compare`: RUN_B against RUN_A (the baseline), both values downloaded; and both runs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = []
    for run_id in (run_a, run_b):
        try:
            runs.append(client.get_run(run_id))
        except MlflowException as exc:
            raise ConfigError(f"compare: no MLflow run {run_id!r} at {tracking_uri}") from exc
    a, b = runs
    if explained_signature(a.data.params) != explained_signature(b.data.params):
        raise ConfigError(
            f"compare: run {run_a} explained {describe_signature(a.data.params)}, run {run_b} "
            f"{describe_signature(b.data.params)}; they cannot be compared"
        )
    threshold = a.data.params.get(NDCG_THRESHOLD_PARAM) or b.data.params.get(NDCG_THRESHOLD_PARAM)
    paths = [_download_values(client, run_id, folder) for run_id in (run_a, run_b)]
    comparison = compare_values(paths[0], paths[1], run_a, float(threshold) if threshold else None)
    return comparison, (a, paths[0]), (b, paths[1])


def trend(
    run: TrackedRun, model: str, current: pd.DataFrame, ranking: str, limit: int = TREND_RUNS
) -> pd.DataFrame:
    """The ranking aggregation (`importance.*` metrics) of each feature across the last runs of this model
    that explained the same output, oldest to newest, the current run (its `current` importance) last.

    One row per run (index: the run's start, as text), one column per feature (`class / feature` with
    several classes); a run that lacks a feature has NaN there.
    """
    client = run.client
    this = client.get_run(run.run_id)
    signature = explained_signature(this.data.params)
    runs = shapline_runs(client, run.experiment_id, model, signature, limit=limit - 1, exclude=run.run_id)
    now_metrics = importance_metrics(current, ranking)
    names = {key: key.removeprefix("importance.") for key in now_metrics}
    rows = []
    for earlier in reversed(runs):
        metrics = earlier.data.metrics
        rows.append(
            {"run": _when(earlier.info.start_time), **{n: metrics.get(k, math.nan) for k, n in names.items()}}
        )
    rows.append({"run": _when(this.info.start_time), **{names[k]: v for k, v in now_metrics.items()}})
    return pd.DataFrame.from_records(rows).set_index("run")


def _when(start_ms: int | None) -> str:
    from datetime import UTC, datetime

    if not start_ms:
        return "?"
    return datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%m-%d %H:%M")
