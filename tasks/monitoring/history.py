"""A model's earlier runs in MLflow: the baseline a run is compared with, the trend, two runs for compare.

The drift maths is monitoring/drift.py's; this module only asks MLflow, through one client per call.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from shapline.tasks.common.errors import ConfigError, TrackingError, one_line
from shapline.tasks.common.schemas import (
    DATA_SHA256_TAG,
    DATA_SOURCE_TAG,
    IDENTITY_TAG,
    MAX_CHANGE_PARAM,
    MODEL_TAG,
    NDCG_THRESHOLD_PARAM,
    REFERENCE_TAG,
    SELECTION_TAG,
    importance_metrics,
)
from shapline.tasks.monitoring.drift import (
    VALUES,
    Baseline,
    Comparison,
    compare_values,
    describe_signature,
    explained_signature,
)
from shapline.tasks.tracking.client import TrackedRun
from shapline.tasks.tracking.uris import open_hint, run_page, sqlite_database

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


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "\\'") + "'"


def shapline_runs(
    client: Any,
    experiment_id: str,
    model: str,
    signature: tuple[str, ...],
    limit: int,
    exclude: str = "",
    tags: dict[str, str] | None = None,
) -> list[Any]:
    """The experiment's FINISHED runs of this model that explained the same thing (and carry `tags`), newest
    first."""
    wanted = {MODEL_TAG: model, **(tags or {})}
    found: list[Any] = []
    token = None
    while len(found) < limit:
        page = client.search_runs(
            [experiment_id],
            filter_string=" and ".join(
                ["attributes.status = 'FINISHED'", *(f"tags.`{k}` = {_quoted(v)}" for k, v in wanted.items())]
            ),
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


def comparable_tags(run: Any) -> dict[str, str]:
    """The tags that make two runs comparable (monitor.baseline previous): the settings and the rows. A run
    made before shapline recorded them has none, and matches no run."""
    tags = run.data.tags
    return {key: tags.get(key, "none recorded") for key in (IDENTITY_TAG, SELECTION_TAG)}


def resolve_baseline(run: TrackedRun, model: str, baseline: str, folder: Path) -> Baseline:
    """The run this run is compared with, its values downloaded into `folder`; or why there is none.

    `previous`: the latest FINISHED run of the same model in the experiment with the same settings and the
    same rows (shapline.config_identity, shapline.row_selection) that explained the same output, class(es)
    and units. `reference`: the run `shapline reference` pinned for the model. A run id: that run. A
    reference or a run id must be a FINISHED shapline run that explained the same (refused with one line
    otherwise: a comparison of unlike things would be silently wrong). Called before any SHAP compute, so a
    wrong baseline costs nothing.
    """
    from mlflow.exceptions import MlflowException

    if baseline == "none":
        return Baseline(None, "monitor.baseline is none: no comparison")
    client = run.client
    this = client.get_run(run.run_id)
    signature = explained_signature(this.data.params)
    if baseline == "previous":
        runs = shapline_runs(
            client, run.experiment_id, model, signature, 1, exclude=run.run_id, tags=comparable_tags(this)
        )
        if not runs:
            rows = (
                f"data.source {this.data.tags.get(DATA_SOURCE_TAG, '?')}, explain_rows "
                f"{this.data.params.get('data.explain_rows', '?')}"
            )
            return Baseline(
                None,
                f"no earlier FINISHED run of {model} in this experiment has the same settings and rows ({rows}): "
                "the next such run is compared with this one; to compare with another run, pin it with "
                "`shapline reference RUN_ID` and set monitor.baseline: reference",
            )
        chosen, how = runs[0], "previous"
    elif baseline == "reference":
        chosen = _reference(client, run.experiment_id, model)
        if chosen is None:
            return Baseline(
                None,
                f"{model} has no reference run in this experiment yet: pin one with `shapline reference "
                f"RUN_ID` (for example the run on the training data; this run is {run.run_id})",
            )
        problem = _unlike(chosen, signature)
        if problem:
            raise ConfigError(
                f"monitor.baseline reference: run {chosen.info.run_id}, the reference of {model}, {problem}; "
                "pin another with `shapline reference RUN_ID`"
            )
        how = "reference"
    else:
        try:
            chosen = client.get_run(baseline)
        except MlflowException as exc:
            raise ConfigError(f"monitor.baseline: no MLflow run {baseline!r} at {run.tracking_uri}") from exc
        problem = _unlike(chosen, signature)
        if problem:
            raise ConfigError(f"monitor.baseline: run {baseline} {problem}")
        how = "run id"
    values = _download_values(client, chosen.info.run_id, folder)
    return described_baseline(chosen, run.tracking_uri, how, values)


def described_baseline(chosen: Any, tracking_uri: str, how: str, values: str | None = None) -> Baseline:
    """A baseline run with what it explained (data, rows, when) and where to open it."""
    info, data = chosen.info, chosen.data
    rows = data.metrics.get("rows_explained")
    return Baseline(
        run_id=info.run_id,
        reason="",
        values_path=values,
        start_time_ms=info.start_time,
        chosen=how,
        run_name=info.run_name or "",
        data_source=data.tags.get(DATA_SOURCE_TAG, ""),
        data_sha256=data.tags.get(DATA_SHA256_TAG, ""),
        rows_explained=int(rows) if rows is not None else None,
        url=run_page(tracking_uri, info.experiment_id, info.run_id),
        open_hint=open_hint(tracking_uri),
    )


def _reference(client: Any, experiment_id: str, model: str) -> Any | None:
    """The run pinned as the model's reference in the experiment, or None; two pinned is one line."""
    pinned = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = {_quoted(model)} and tags.`{REFERENCE_TAG}` = 'true'",
        max_results=10,
    )
    if len(pinned) > 1:
        ids = ", ".join(r.info.run_id for r in pinned)
        raise ConfigError(
            f"monitor.baseline reference: runs {ids} are all tagged {REFERENCE_TAG} for {model}; "
            "pin one with `shapline reference RUN_ID`"
        )
    return pinned[0] if pinned else None


def _unlike(run: Any, signature: tuple[str, ...]) -> str | None:
    """Why a named baseline run cannot be this run's baseline, or None."""
    if run.info.status != "FINISHED":
        return f"is {run.info.status}, not FINISHED"
    if MODEL_TAG not in run.data.tags:
        return "is not a shapline run (no shapline.model tag)"
    if explained_signature(run.data.params) != signature:
        return f"explained {describe_signature(run.data.params)}: not what this run explains"
    return None


def store_client(tracking_uri: str, what: str) -> Any:
    """A client of an existing store: a local sqlite store that is not there is one line, never created
    (MLflow would make an empty one wherever the command runs)."""
    from mlflow.tracking import MlflowClient

    database = sqlite_database(tracking_uri)
    if database is not None and not database.is_file():
        raise ConfigError(
            f"{what}: no MLflow store at {tracking_uri} ({database} does not exist): run it in the folder the "
            "runs were made from, or give --tracking-uri (or MLFLOW_TRACKING_URI)"
        )
    return MlflowClient(tracking_uri=tracking_uri)


# The shortest start of a run id taken for the id (as git takes a commit's).
MIN_RUN_ID_PREFIX = 4


def find_run(client: Any, text: str, where: str, what: str) -> Any:
    """The run an id names, or the run whose id starts with `text` when exactly one does."""
    from mlflow.exceptions import MlflowException

    wanted = text.strip().lower()
    if re.fullmatch(r"[0-9a-f]{32}", wanted):
        try:
            return client.get_run(wanted)
        except MlflowException as exc:
            raise ConfigError(f"{what}: no MLflow run {text!r} at {where}") from exc
    if not re.fullmatch(rf"[0-9a-f]{{{MIN_RUN_ID_PREFIX},31}}", wanted):
        raise ConfigError(
            f"{what}: {text!r} is not a run id (32 hex characters, or at least its first {MIN_RUN_ID_PREFIX})"
        )
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = (
        client.search_runs(experiments, filter_string=f"attributes.run_id LIKE '{wanted}%'", max_results=10)
        if experiments
        else []
    )
    if not found:
        raise ConfigError(f"{what}: no MLflow run id starts with {text!r} at {where}")
    if len(found) > 1:
        ids = ", ".join(r.info.run_id for r in found)
        raise ConfigError(f"{what}: {text!r} starts several run ids ({ids}); give more of it")
    return found[0]


def pin_reference(tracking_uri: str, text: str) -> tuple[Baseline, str, list[str]]:
    """`shapline reference RUN_ID`: tag the run as its model's reference (shapline.reference), untagging the
    model's earlier reference in that experiment. Returns the run as a baseline, its model, and the runs
    it replaces."""
    client = store_client(tracking_uri, "reference")
    run = find_run(client, text, tracking_uri, "reference")
    model = run.data.tags.get(MODEL_TAG)
    if model is None:
        raise ConfigError(f"reference: run {run.info.run_id} is not a shapline run (no {MODEL_TAG} tag)")
    if run.info.status != "FINISHED":
        raise ConfigError(f"reference: run {run.info.run_id} is {run.info.status}, not FINISHED")
    experiment = run.info.experiment_id
    earlier = client.search_runs(
        [experiment],
        filter_string=f"tags.`{MODEL_TAG}` = {_quoted(model)} and tags.`{REFERENCE_TAG}` = 'true'",
    )
    replaced = [r.info.run_id for r in earlier if r.info.run_id != run.info.run_id]
    for run_id in replaced:
        client.delete_tag(run_id, REFERENCE_TAG)
    client.set_tag(run.info.run_id, REFERENCE_TAG, "true")
    return described_baseline(run, tracking_uri, "reference"), model, replaced


def load_comparison(tracking_uri: str, run_a: str, run_b: str, folder: Path) -> tuple[Comparison, Any, Any]:
    """`shapline compare`: RUN_B against RUN_A (the baseline), both values downloaded; and both runs."""
    client = store_client(tracking_uri, "compare")
    a, b = (find_run(client, run_id, tracking_uri, "compare") for run_id in (run_a, run_b))
    run_a, run_b = a.info.run_id, b.info.run_id
    if explained_signature(a.data.params) != explained_signature(b.data.params):
        raise ConfigError(
            f"compare: run {run_a} explained {describe_signature(a.data.params)}, run {run_b} "
            f"{describe_signature(b.data.params)}; they cannot be compared"
        )
    threshold = a.data.params.get(NDCG_THRESHOLD_PARAM) or b.data.params.get(NDCG_THRESHOLD_PARAM)
    limit = b.data.params.get(MAX_CHANGE_PARAM) or a.data.params.get(MAX_CHANGE_PARAM)
    paths = [_download_values(client, run_id, folder) for run_id in (run_a, run_b)]
    comparison = compare_values(
        paths[0],
        paths[1],
        run_a,
        float(threshold) if threshold else None,
        float(limit) if limit not in (None, "", "None") else None,
    )
    return comparison, (a, paths[0]), (b, paths[1])


def trend(
    run: TrackedRun,
    model: str,
    current: pd.DataFrame,
    ranking: str,
    limit: int = TREND_RUNS,
    baseline: str | None = None,
) -> pd.DataFrame:
    """The ranking aggregation (`importance.*` metrics) of each feature across the last runs of this model
    with the same settings and rows that explained the same output (the runs `previous` chooses from),
    oldest to newest, the current run (its `current` importance) last.

    The `baseline` run, when it is not one of them (a reference on other data), comes first, its start
    labelled "baseline". One row per run (index: the run's start, as text), one column per feature
    (`class / feature` with several classes); a run that lacks a feature has NaN there.
    """
    client = run.client
    this = client.get_run(run.run_id)
    signature = explained_signature(this.data.params)
    runs = shapline_runs(
        client, run.experiment_id, model, signature, limit - 1, exclude=run.run_id, tags=comparable_tags(this)
    )
    if baseline is not None and baseline not in {r.info.run_id for r in runs}:
        runs = [*runs[: max(limit - 2, 0)], client.get_run(baseline)]  # oldest: drawn first
    now_metrics = importance_metrics(current, ranking)
    names = {key: key.removeprefix("importance.") for key in now_metrics}
    rows = []
    for earlier in reversed(runs):
        metrics = earlier.data.metrics
        label = _when(earlier.info.start_time) + (" baseline" if earlier.info.run_id == baseline else "")
        rows.append({"run": label, **{n: metrics.get(k, math.nan) for k, n in names.items()}})
    rows.append({"run": _when(this.info.start_time), **{names[k]: v for k, v in now_metrics.items()}})
    return pd.DataFrame.from_records(rows).set_index("run")


def _when(start_ms: int | None) -> str:
    from datetime import UTC, datetime

    if not start_ms:
        return "?"
    return datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%m-%d %H:%M")
