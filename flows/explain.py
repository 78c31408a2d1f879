"""The explanation flow: one line per step, each step a plain function of shapline.tasks.

Each step's Prefect task is declared here, once, where the flow is wired: the functions in tasks/
stay plain and typed, and tests call them without Prefect. The deployment entrypoint is
`flows/explain.py:explain_model` (or the module path `shapline.flows.explain:explain_model`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote, unmapped
from pydantic.json_schema import SkipJsonSchema

from shapline.flows.parameters import Algorithm, ExplainParameters, form_field
from shapline.tasks.common.config import ExplainConfig, MlflowModel, SageMakerModel, load_config
from shapline.tasks.common.errors import AttributionDrift, ShaplineError, UnexpectedError, out_of_space
from shapline.tasks.common.redact import redact, redact_logs, redact_value
from shapline.tasks.compute.memory import collections_see_only_this_run, return_freed_memory
from shapline.tasks.compute.plan import DataCheck, RunPlan, check_data, plan_run
from shapline.tasks.compute.runners import ShardRunner
from shapline.tasks.compute.shards import ShardResult, ShardStore, shard_label
from shapline.tasks.compute.staging import StagedJob, StagedRows, plan_jobs, stage_rows
from shapline.tasks.data.loading import explain_rows_said
from shapline.tasks.models.loading import pin_model_file, trusted_code_warning
from shapline.tasks.models.registry import resolve_registry_model
from shapline.tasks.monitoring.drift import Baseline, importance_drift_json
from shapline.tasks.monitoring.history import resolve_baseline
from shapline.tasks.results.aggregate import Aggregate, aggregate
from shapline.tasks.results.categories import write_categories
from shapline.tasks.results.plots import render_plots
from shapline.tasks.results.report import REPORT, ReportFacts, write_report
from shapline.tasks.results.summary import Phases, RunSummary
from shapline.tasks.run.monitor import Monitoring, drift_event, monitor
from shapline.tasks.run.recording import (
    PrefectContext,
    model_tags,
    record_config,
    record_data,
    record_plan,
    record_results,
    record_validation,
    record_values,
    run_name,
    run_tags,
    traffic_sent,
)
from shapline.tasks.run.resources import ExplanationRun
from shapline.tasks.tracking.client import run_url
from shapline.tasks.tracking.uris import resolve_tracking_uri

check_data_task = task(name="check-data", cache_policy=NO_CACHE)(check_data)
plan_run_task = task(name="plan-run", cache_policy=NO_CACHE)(plan_run)
aggregate_task = task(name="aggregate", cache_policy=NO_CACHE)(aggregate)
render_plots_task = task(name="render-plots", cache_policy=NO_CACHE)(render_plots)
resolve_model_task = task(name="resolve-model", cache_policy=NO_CACHE)(resolve_registry_model)
resolve_baseline_task = task(name="resolve-baseline", cache_policy=NO_CACHE)(resolve_baseline)
categories_task = task(name="categories", cache_policy=NO_CACHE)(write_categories)
monitor_task = task(name="monitor", cache_policy=NO_CACHE)(monitor)
stage_rows_task = task(name="stage-rows", cache_policy=NO_CACHE)(stage_rows)


@flow(name="shapline-explain")
def explain_model(
    config_path: str = form_field("config_path", ...),
    explain_rows: int | Literal["all"] | None = form_field("explain_rows"),
    background_size: int | None = form_field("background_size"),
    algorithm: Algorithm | None = form_field("algorithm"),
    nsamples: int | Literal["auto"] | None = form_field("nsamples"),
    shard_size: int | None = form_field("shard_size"),
    workers: int | None = form_field("workers"),
    overrides: list[str] | None = form_field("overrides"),
    parameters: SkipJsonSchema[ExplainParameters | None] = None,
) -> RunSummary:
    """Explain one model with SHAP as its YAML config says and log everything to MLflow.

    `parameters` is the same set as one object, not in the form: what the CLI passes (Prefect stores it
    with the overrides redacted) and what deployments made before the form was flat hold. It wins.
    """
    redact_logs()
    one_line_failures()
    logger = get_run_logger()
    started, when, phases = time.perf_counter(), datetime.now(UTC), Phases()
    with _redacted_failures():
        given = parameters or ExplainParameters.from_form(
            config_path=config_path,
            explain_rows=explain_rows,
            background_size=background_size,
            algorithm=algorithm,
            nsamples=nsamples,
            shard_size=shard_size,
            workers=workers,
            overrides=overrides,
        )
        overridden = given.to_overrides()
        config, identity = _pinned(load_config(given.config_path, overridden))
        if (warning := trusted_code_warning(config.model)) is not None:
            logger.warning(warning)
        prefect = _prefect_context()
        tags = run_tags(config, given.config_path, overridden, prefect) | identity
        with (
            collections_see_only_this_run(),
            ExplanationRun(config, run_name(config, when), tags, logger) as run,
        ):
            logger.info("MLflow run %s in %s", run.tracked.run_id, run.tracking_uri)
            record_config(run.tracked, config, run.artifacts)
            check = check_data_task(config)
            record_data(run.tracked, config, check.data, run.model_fingerprint, identity)
            record_validation(run.tracked, check, run.folder)
            _say_validation(check)
            phases.lap("load and validate")
            plan = plan_run_task(config, check)
            run.runner.prepare(plan.algorithm)
            record_plan(run.tracked, config, plan, run.artifacts)
            _say_plan(config, plan)
            if (more := explain_rows_said(config.data.explain_rows, check.data.rows)) is not None:
                logger.warning(more)
            plan.enforce_budget()
            baseline = resolve_baseline_task(
                run.tracked, config.model.name, config.monitor.baseline, run.folder
            )
            _say_baseline(baseline)
            row_names = _row_names(config, check)
            staged = stage_rows_task(plan.rows, plan.shards, str(run.folder / "rows"))
            # The data's rows are staged for the shards: from here the flow holds none of them.
            check, plan = check.without_frame(), plan.without_rows()
            return_freed_memory()
            phases.lap("plan")
            results, computed, explain_s = explain_shards(run, config, check, plan, staged)
            phases.lap("explain")
            combined = aggregate_task(
                [r.path for r in results],
                str(run.artifacts / "shap_values.parquet"),
                check.features,
                config.output.aggregations,
                row_names,
                config.data.id_column,
                config.explainer.additivity_tolerance,
                [r.errors_path for r in results] if plan.algorithm == "kernel" else [],
                sum(r.model_rows for r in results),
            )
            phases.lap("aggregate")
            plots = _plots(run, config, check, plan, combined, staged)
            record_values(run.tracked, combined, run.artifacts)
            drawn = plots.result()
            categories = categories_task(
                combined.values_path,
                staged,
                check.features,
                combined.labels or ["0"],
                config.output,
                str(run.artifacts),
                plan.explained,
                config.model.name,
            )
            return_freed_memory()  # the plots' figures and the upload's buffers, before drift reads columns
            phases.lap("plots and upload")
            monitoring = monitor_task(run.tracked, config, baseline, combined, plan.explained, run.artifacts)
            phases.lap("drift")
            traffic = traffic_sent([check.predictor.traffic(), *(r.traffic for r in computed)])
            summary = _summary(
                run, config, check, plan, results, combined, started, explain_s, monitoring, phases
            )
            facts = _report_facts(run, config, check, plan, summary, identity, traffic, monitoring, prefect)
            write_report(
                replace(
                    facts,
                    waterfalls=drawn.waterfalls,
                    categories=categories,
                    accuracy=combined.accuracy,
                ),
                run.artifacts,
            )
            record_results(
                run.tracked, config, check, plan, summary, traffic, monitoring, prefect, run.artifacts
            )
            publish_summary(summary)
            if summary.rows_unconverged:
                logger.warning(summary.accuracy_said())
            _say_drift(config, monitoring, run.tracked, summary.run_url)
            run.finish()
    logger.info("MLflow run %s FINISHED: %s", summary.mlflow_run_id, summary.run_url)
    if monitoring.drift and config.monitor.on_drift == "fail" and monitoring.comparison is not None:
        # The MLflow run is FINISHED with every artifact; the flow run fails with the one line.
        raise AttributionDrift(monitoring.comparison.line(), summary=summary.to_json())
    return summary


def _row_names(config: ExplainConfig, check: DataCheck) -> Any:
    """data.id_column's values by row_id (the values table carries them beside row_id), or None.

    A copy: a column of a consolidated frame is a view that would keep every column alive.
    """
    if config.data.id_column is None:
        return None
    return check.data.frame[config.data.id_column].copy()


def _say_baseline(baseline: Baseline) -> None:
    if baseline.found:
        get_run_logger().info(
            "baseline: run %s (%s), %s: explained %s",
            baseline.run_id,
            baseline.run_name,
            baseline.how_chosen,
            baseline.explained(),
        )
    else:
        get_run_logger().info("no baseline: %s", baseline.reason)


def _say_drift(config: ExplainConfig, monitoring: Monitoring, tracked: Any, url: str) -> None:
    """The drift line in the run's log (a warning when the explanation moved) and the Prefect event."""
    comparison = monitoring.comparison
    if comparison is None:
        return
    logger = get_run_logger()
    if not comparison.drifted:
        logger.info(comparison.line())
        return
    if config.monitor.on_drift == "warn":
        logger.warning("%s (monitor.on_drift: warn)", comparison.line())
    event = drift_event(config, monitoring, tracked, url)
    if event is not None:
        emit_event(event=event["event"], resource=event["resource"], payload=redact_value(event["payload"]))


def _report_facts(
    run: ExplanationRun,
    config: ExplainConfig,
    check: DataCheck,
    plan: RunPlan,
    summary: RunSummary,
    identity: dict[str, str],
    traffic: dict[str, float],
    monitoring: Monitoring,
    prefect: PrefectContext,
) -> ReportFacts:
    return ReportFacts(
        config=config,
        check=check,
        plan=plan,
        summary=summary,
        model_identity={**identity, **model_tags(config, run.model_fingerprint)},
        phases=summary.phases,
        traffic=traffic,
        baseline=monitoring.baseline,
        comparison=monitoring.comparison,
        plots=run.artifacts / "plots",
        mlflow_url=summary.run_url,
        prefect_url=prefect.flow_run_url,
        id_column=config.data.id_column,
    )


@contextmanager
def _redacted_failures() -> Iterator[None]:
    """A failure shapline did not foresee leaves with its message redacted (Prefect keeps it as the run's
    state message, and an MLflow error quotes the tracking URI); the cause keeps the traceback."""
    try:
        yield
    except ShaplineError:
        raise
    except Exception as exc:
        raise UnexpectedError(f"{type(exc).__name__}: {exc}") from exc


def _pinned(config: ExplainConfig) -> tuple[ExplainConfig, dict[str, str]]:
    """The model pinned for the whole run, so every shard (thread, process or Dask worker) explains the same
    one: a model file by its sha256 now (model.sha256), a registry alias resolved once; and the tags that
    name a registry model (shapline.model_uri, _name, _version, _run_id)."""
    if not isinstance(config.model, MlflowModel):
        return config.model_copy(update={"model": pin_model_file(config.model)}), {}
    tracking = config.model.tracking_uri or resolve_tracking_uri(config.output.tracking_uri)
    model = config.model.model_copy(update={"tracking_uri": tracking})
    resolved = resolve_model_task(model)
    pinned = config.model_copy(update={"model": model.model_copy(update={"uri": resolved.pinned_uri})})
    return pinned, resolved.tags


def _say_plan(config: ExplainConfig, plan: RunPlan) -> None:
    """Why auto chose its explainer, when the data decided it, and what an endpoint will be sent, in the run's
    log, before it is sent."""
    if plan.algorithm_said is not None:
        get_run_logger().info(plan.algorithm_said)
    if plan.python_text:
        get_run_logger().info(
            "text columns %s reach the model as Python strings, not pyarrow's (the same outputs on the probe rows)",
            ", ".join(plan.python_text),
        )
    if plan.estimate is not None and isinstance(config.model, SageMakerModel):
        get_run_logger().info(
            "endpoint %s: ~%d inference rows in ~%d requests",
            config.model.endpoint.name,
            plan.estimate.inference_rows,
            plan.estimate.inference_requests,
        )


def _say_validation(check: DataCheck) -> None:
    """Failed expectations that did not stop the run (validation.on_failure: warn), in the run's log."""
    for line in check.report.failures:
        get_run_logger().warning("validation (on_failure: warn): %s", line)


def _prefect_context() -> PrefectContext:
    """This flow run, its UI page (when Prefect knows its UI's URL) and its deployment (when it has one)."""
    from prefect.runtime import deployment
    from prefect.utilities.urls import url_for

    run_id = str(flow_run.id or "")
    # The "View at" link Prefect logs; None when Prefect does not know its UI's URL (a temporary server).
    url = url_for("flow-run", obj_id=run_id) if run_id else None
    return PrefectContext(flow_run_id=run_id, flow_run_url=url or None, deployment=deployment.name or None)


def _is_fault(exc: BaseException) -> bool:
    """A failure that may pass: a lost worker, an endpoint down or throttling, a dropped connection, a timeout."""
    if getattr(exc, "transient", False):
        return True
    if isinstance(exc, ShaplineError) or out_of_space(exc):  # a full disk stays full for the next try
        return False
    return isinstance(exc, (OSError, TimeoutError, EOFError))


def _worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a shard on a fault, never on a bad input."""
    try:
        state.result()
    except Exception as exc:
        return _is_fault(exc)
    return False


@task(
    name="explain-shard",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[1, 5, 15],
    retry_jitter_factor=0.5,
    retry_condition_fn=_worth_retrying,
    task_run_name="explain-shard-{job.index}",
)
def explain_shard_task(job: StagedJob, runner: ShardRunner, store: ShardStore) -> ShardResult:
    """Explain one shard of rows with SHAP on the run's runner and keep its values in the store."""
    try:
        result = store.write(job.index, runner.run(job))
        # The next shard starts now on the worker this one freed, not after Prefect's end of this task run
        # and start of the next (that task finds it running).
        runner.start_next()
        return_freed_memory(cycles=False)  # the shard's rows and values (freed as their references went)
        return result
    except ShaplineError:
        raise
    except Exception as exc:
        # Named by shard and rows, redacted, and retried only if it was a fault (a lost worker, a timeout).
        raise UnexpectedError(
            f"{shard_label(job.index, job.row_ids)}: {type(exc).__name__}: {exc}", transient=_is_fault(exc)
        ) from exc


def explain_shards(
    run: ExplanationRun, config: ExplainConfig, check: DataCheck, plan: RunPlan, staged: StagedRows
) -> tuple[list[ShardResult], list[ShardResult], float]:
    """Explain the shards the store lacks, each a task of this flow; finished ones stay even if another fails.

    The tasks run on threads of this process (the runner decides where their compute goes), entered
    here inside the flow rather than in a subflow, whose own run bookkeeping would add to every run.
    Returns every shard in order, the ones computed now, and the seconds the explain phase took (from
    the workers being ready to the last shard's values).
    """
    logger = get_run_logger()
    store = run.open_store(check.data.sha256)
    jobs, reused = plan_jobs(
        staged,
        plan.background,
        store,
        config.model,
        config.explainer,
        plan.algorithm,
        plan.link,
        run.threads,
        plan.outputs,
    )
    for line in store.discarded:
        logger.warning(line)
    shard_word = "shard" if len(plan.shards) == 1 else "shards"
    logger.info(
        "explaining %d rows in %d %s on %d %s workers (%d already finished: reused)",
        plan.explain_rows,
        len(plan.shards),
        shard_word,
        config.shards.workers,
        config.shards.runner,
        len(reused),
    )
    if jobs:
        # A process pool starts with the run, beside loading and validation; what remains of its
        # start-up is not explaining (explain_s counts from here).
        waiting = time.perf_counter()
        run.runner.wait_ready()
        if (waited := time.perf_counter() - waiting) >= 0.1:
            logger.info("the %s workers were ready %.1f s later", config.shards.runner, waited)
    started = time.perf_counter()
    computed: list[ShardResult] = []
    if jobs:
        # Prefect types map() for async tasks only; the shard task is a plain (sync) one.
        threads_runner: Any
        # In the order the map starts their tasks; one per worker starts now, before Prefect starts its task.
        run.runner.expect(jobs, start=config.shards.workers)
        with ThreadPoolTaskRunner(max_workers=config.shards.workers) as threads_runner:
            try:
                # Quoted: each shard task gets its job, the runner and the store as they are. Prefect would walk
                # every field of each (the configs, the background's frame) for futures to resolve, twice per
                # task, a few ms a shard on the core the workers compute on.
                futures = threads_runner.map(
                    explain_shard_task,
                    {
                        "job": [quote(job) for job in jobs],
                        "runner": unmapped(quote(run.runner)),
                        "store": unmapped(quote(store)),
                    },
                )
                computed = _collect(futures, len(jobs))
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # A signal (SIGTERM, Ctrl-C) while shards run: leaving this block joins the shard tasks'
                    # threads, which must not first wait out a model call (up to shards.timeout_s).
                    run.runner.stop()
                raise
    return sorted([*reused, *computed], key=lambda r: r.index), computed, time.perf_counter() - started


def _collect(futures: Any, total: int) -> list[ShardResult]:
    logger = get_run_logger()
    finished: list[ShardResult] = []
    failures: list[BaseException] = []
    for future in as_completed(futures):
        try:
            result = future.result()
        except Exception as exc:
            failures.append(exc)
            logger.error("shard failed (%d/%d settled): %s", len(finished) + len(failures), total, exc)
            continue
        finished.append(result)
        logger.info(
            "shards done %d/%d (shard %d: %d rows in %.1f s%s)",
            len(finished),
            total,
            result.index,
            result.rows,
            result.seconds,
            f", {result.helped_rows} of them by workers that had finished their own"
            if result.helped_rows
            else "",
        )
    if failures:
        raise failures[0]
    return sorted(finished, key=lambda r: r.index)


def _plots(
    run: ExplanationRun,
    config: ExplainConfig,
    check: DataCheck,
    plan: RunPlan,
    combined: Aggregate,
    staged: StagedRows,
) -> Any:
    """The plots render (a task of their own) while the values table uploads."""
    return render_plots_task.submit(
        combined.values_path,
        staged,
        check.features,
        combined.labels or ["0"],
        config.output,
        str(run.artifacts / "plots"),
        combined.importance,
        plan.explained,
        config.model.name,
        config.data.id_column,
        combined.accuracy.errors_path if combined.accuracy else None,
    )


def _summary(
    run: ExplanationRun,
    config: ExplainConfig,
    check: DataCheck,
    plan: RunPlan,
    results: list[ShardResult],
    combined: Aggregate,
    started: float,
    explain_s: float,
    monitoring: Monitoring,
    phases: Phases,
) -> RunSummary:
    comparison = monitoring.comparison
    return RunSummary(
        mlflow_run_id=run.tracked.run_id,
        experiment_id=run.tracked.experiment_id,
        experiment=config.experiment_name,
        tracking_uri=run.tracking_uri,
        run_url=run_url(run.tracked),
        model=config.model.name,
        rows_explained=combined.rows_explained,
        shards=len(plan.shards),
        shards_reused=sum(r.reused for r in results),
        shards_computed=sum(not r.reused for r in results),
        background_rows=len(plan.background.frame),
        additivity_max_error=combined.additivity_max_error,
        duration_s=time.perf_counter() - started,
        explain_s=explain_s,
        # Reused shards spent nothing this run (their model_s is 0).
        model_s=sum(r.model_s for r in results) if plan.algorithm == "kernel" else None,
        model_cpu_s=sum(r.model_cpu_s for r in results) if plan.algorithm == "kernel" else None,
        algorithm=plan.algorithm,
        link=plan.link,
        validation_success=check.report.success,
        importance=combined.importance,
        ranking=config.output.aggregations[0],
        report=REPORT,
        drift=monitoring.drift,
        attribution_ndcg=comparison.ndcg if comparison is not None else None,
        baseline_run_id=comparison.baseline_run_id if comparison is not None else None,
        ndcg_threshold=comparison.threshold if comparison is not None else None,
        explained="; ".join(f"{e.output}, SHAP values in {e.units}" for e in plan.explained),
        baseline_reason=monitoring.baseline.reason if comparison is None else None,
        max_importance_change=config.monitor.max_importance_change,
        importance_drift=importance_drift_json(comparison.importance_drift) if comparison is not None else [],
        phases=dict(phases.seconds),
        **_accuracy_said(combined, config),
    )


def _accuracy_said(combined: Aggregate, config: ExplainConfig) -> dict[str, Any]:
    """The summary's accuracy fields from the aggregate (a kernel run), or nothing."""
    accuracy = combined.accuracy
    if accuracy is None:
        return {}
    adaptive = accuracy.errors_path is not None
    return {
        "model_rows": accuracy.model_rows,
        "coalitions_per_row": accuracy.coalitions_per_row(),
        "rows_unconverged": accuracy.rows_unconverged if adaptive else None,
        "max_standard_error": accuracy.max_standard_error,
        "tolerance": config.explainer.tolerance if adaptive else None,
    }


def artifact_key(model: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes."""
    return "shapline-" + (re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-") or "model")


def publish_summary(summary: RunSummary) -> None:
    """The run's summary as a Prefect markdown artifact of the flow run itself (made in the flow, not a
    task, so the flow run's Artifacts tab holds it): what was explained, and a link to the MLflow run."""
    create_markdown_artifact(
        key=artifact_key(summary.model),
        markdown=redact(summary.markdown()),
        description=redact(f"SHAP summary of {summary.model}"),
    )


class _OneLine(logging.Filter):
    """Prefect logs a failed task or flow with its traceback. For shapline's own errors (a bad config, data
    that failed validation) the message is the whole story: the record keeps one line, and the traceback
    goes to the same logger at DEBUG, where `PREFECT_LOGGING_LEVEL=DEBUG` shows it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ShaplineError) and not isinstance(error, UnexpectedError):
            exc_info, record.exc_info, record.exc_text = record.exc_info, None, None
            logging.getLogger(record.name).debug("traceback of: %s", error, exc_info=exc_info)
        return True


_ONE_LINE = _OneLine()


def one_line_failures() -> None:
    """Put the one-line filter on Prefect's flow and task run loggers (idempotent)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)
