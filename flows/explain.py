"""The explanation flow: wires the steps in tasks/ together; computes nothing itself."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from flows.config import (
    ExplainConfig,
    ExplainParameters,
    MlflowModel,
    SageMakerModel,
    ShardsConfig,
    load_config,
)
from tasks.aggregate import aggregate_task
from tasks.background import draw_background_task
from tasks.cores import threads_per_worker
from tasks.data import feature_columns, load_data_task, select_explain_rows, split_features
from tasks.endpoint import check_budget, delete_endpoint, plan_inference
from tasks.errors import ShaplineError, UnexpectedError, ValidationFailed
from tasks.explain import check_kernel_samples, resolve_explainer
from tasks.models import (
    Predictor,
    link_for,
    load_predictor,
    model_fingerprint,
    probe_predictor,
    probe_rows,
)
from tasks.plots import render_plots_task
from tasks.redact import redact, redact_logs
from tasks.registry import resolve_registry_model_task
from tasks.report import publish_summary_task, summary_markdown
from tasks.runners import ShardRunner, open_runner
from tasks.shards import (
    ShardJob,
    ShardResult,
    ShardStore,
    ShardStoreClaim,
    plan_jobs,
    plan_shards,
)
from tasks.tracking import (
    TrackedRun,
    log_artifact,
    log_artifacts,
    log_values,
    mlflow_run,
    resolve_tracking_uri,
    run_url,
)
from tasks.validation import validate_frame_task


def _is_fault(exc: BaseException) -> bool:
    """A failure that may pass: a lost worker, an endpoint down or throttling, a dropped connection, a timeout."""
    if getattr(exc, "transient", False):
        return True
    if isinstance(exc, ShaplineError):
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
def explain_shard_task(job: ShardJob, runner: ShardRunner, store: ShardStore) -> ShardResult:
    """Explain one shard of rows with SHAP on the run's runner and keep its values in the store."""
    try:
        return store.write(job.index, runner.compute(job))
    except ShaplineError:
        raise
    except Exception as exc:
        # Named by shard and rows, redacted, and retried only if it was a fault (a lost worker, a timeout).
        rows = f"rows {job.row_ids[0]}-{job.row_ids[-1]}" if job.row_ids else "no rows"
        raise UnexpectedError(
            f"shard {job.index} ({rows}): {type(exc).__name__}: {exc}", transient=_is_fault(exc)
        ) from exc


@task(name="load-model", cache_policy=NO_CACHE)
def load_model_task(config: ExplainConfig) -> Predictor:
    """Load the model as a Predictor."""
    return load_predictor(config.model)


def explain_shards(
    jobs: list[ShardJob], shards: ShardsConfig, runner: ShardRunner, store: ShardStore
) -> list[ShardResult]:
    """Explain every shard as a task of this flow; finished shards stay in the store even if another fails.

    The tasks run on threads of this process (the runner decides where their compute goes), entered
    here inside the flow rather than in a subflow, which would cost a second of run bookkeeping.
    """
    logger = get_run_logger()
    with ThreadPoolTaskRunner(max_workers=shards.workers) as threads:
        futures = threads.map(
            explain_shard_task, {"job": jobs, "runner": unmapped(runner), "store": unmapped(store)}
        )
        return _collect(futures, len(jobs), logger)


def _collect(futures: Any, total: int, logger: Any) -> list[ShardResult]:
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
            "shards done %d/%d (shard %d: %d rows in %.1f s)",
            len(finished),
            total,
            result.index,
            result.rows,
            result.seconds,
        )
    if failures:
        raise failures[0]
    return sorted(finished, key=lambda r: r.index)


def run_params(config: ExplainConfig) -> dict[str, Any]:
    """The explainer, background and shard settings as MLflow params."""
    params: dict[str, Any] = {
        "model.kind": config.model.kind,
        "model.output": config.model.effective_output,
        "model.class_index": config.model.class_index,
        "explainer.link": config.link,
    }
    for section in ("explainer", "background", "shards"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            params[f"{section}.{key}"] = value
    params["data.explain_rows"] = config.data.explain_rows
    return params


def _record_validation(run: TrackedRun, report: Any, folder: Path) -> None:
    path = folder / "validation.json"
    path.write_text(report.to_json())
    log_artifact(run, path)
    log_values(
        run,
        metrics={
            "validation_success": float(report.success),
            "validation_failures": float(len(report.failures)),
        },
    )


@contextmanager
def endpoint_lifetime(model: Any, logger: Any) -> Iterator[None]:
    """Delete a SageMaker endpoint when the run ends if endpoint.delete_after_run says so."""
    try:
        yield
    finally:
        if isinstance(model, SageMakerModel) and model.endpoint.delete_after_run:
            try:
                delete_endpoint(model)
                logger.info("deleted endpoint %s (endpoint.delete_after_run)", model.endpoint.name)
            except Exception as exc:
                logger.warning("endpoint %s was not deleted: %s", model.endpoint.name, exc)


@flow(name="shapline-explain")
def explain_model(parameters: ExplainParameters) -> dict[str, Any]:
    """Explain one model with SHAP as its YAML config says and log everything to MLflow."""
    redact_logs()
    try:
        return _explain(parameters)
    except ShaplineError:
        raise
    except Exception as exc:
        # Its message may quote what the user typed (an MLflow error quotes the tracking URI): Prefect
        # keeps the message as the run's state, so it is redacted; the cause keeps the traceback.
        raise UnexpectedError(f"{type(exc).__name__}: {exc}") from exc


def _explain(parameters: ExplainParameters) -> dict[str, Any]:
    logger = get_run_logger()
    started = time.perf_counter()
    config_path, overrides = parameters.config_path, parameters.to_overrides()
    config = load_config(config_path, overrides)
    tracking_uri = resolve_tracking_uri(config.output.tracking_uri)
    tags = {
        "shapline.model": config.model.name,
        "shapline.config_sha256": config.sha256(),
        "shapline.config_path": str(Path(config_path).resolve()),
        "shapline.overrides": " ".join(overrides)[:4000],
        "prefect.flow_run_id": str(flow_run.id or ""),
    }
    if isinstance(config.model, MlflowModel):
        model = config.model.model_copy(update={"tracking_uri": config.model.tracking_uri or tracking_uri})
        resolved = resolve_registry_model_task(model)
        tags |= resolved.tags
        # Pin an alias once, so every shard (thread, process or Dask worker) loads the same version.
        config = config.model_copy(update={"model": model.model_copy(update={"uri": resolved.pinned_uri})})
    run_name = f"{config.model.name}-{flow_run.name or time.strftime('%Y%m%d-%H%M%S')}"
    with (
        endpoint_lifetime(config.model, logger),
        tempfile.TemporaryDirectory(prefix="shapline-") as workdir,
        mlflow_run(tracking_uri, config.experiment_name, run_name, tags) as run,
        # Pool processes or a Dask cluster start now: their start-up overlaps loading and validation.
        open_runner(
            config.shards,
            config.model,
            threads_per_worker(config.shards.runner, config.shards.workers),
            run.run_id,
        ) as runner,
        ExitStack() as later,
    ):
        logger.info("MLflow run %s in %s", run.run_id, tracking_uri)
        artifacts = Path(workdir, "artifacts")
        artifacts.mkdir()
        (artifacts / "config.yaml").write_text(redact(config.to_yaml()))
        log_artifact(run, artifacts / "config.yaml")
        log_values(run, params=run_params(config))

        loaded = load_data_task(config.data)
        log_values(run, tags={"shapline.data_sha256": loaded.sha256, "shapline.data_source": loaded.uri})
        predictor = load_model_task(config)
        features = feature_columns(loaded.frame, config.data, predictor.feature_names)
        report = validate_frame_task(loaded.frame, features, config.validation, loaded.repeated_columns)
        _record_validation(run, report, Path(workdir))
        if report.blocking:
            raise ValidationFailed(f"validation of {loaded.uri} failed: " + "; ".join(report.blocking))
        for line in report.failures:
            logger.warning("validation (on_failure: warn): %s", line)

        frame, target = split_features(loaded.frame, config.data, features)
        rows = select_explain_rows(frame, config.data.explain_rows, config.data.seed)
        background = draw_background_task(frame, target, config.background)
        probe = probe_rows(rows, background.frame)
        probe_predictor(predictor, probe, config.model.class_index)
        background.to_frame().to_parquet(artifacts / "background.parquet")
        shards = plan_shards(rows.index, config.shards.size)
        kernel_link = link_for(predictor, config.explainer.link, config.link, config.model.effective_output)
        algorithm, link = resolve_explainer(config.explainer.algorithm, predictor, kernel_link)
        if algorithm == "kernel":
            check_kernel_samples(config.explainer, len(features))
        store = ShardStore.open(
            config.shards.cache_dir, config.values_sha256(), loaded.sha256, model_fingerprint(config.model)
        )
        # Released on any exit; the shards are deleted below only by the last live run using them.
        claim = later.enter_context(ShardStoreClaim(store.folder, run.run_id))
        jobs, reused = plan_jobs(
            rows,
            background,
            shards,
            store,
            config.model,
            config.explainer,
            algorithm,
            link,
            threads_per_worker(config.shards.runner, min(config.shards.workers, len(shards))),
        )
        for line in store.discarded:
            logger.warning(line)
        logger.info(
            "explaining %d rows in %d shards on %d %s workers (%d shards already finished: reused)",
            len(rows),
            len(shards),
            config.shards.workers,
            config.shards.runner,
            len(reused),
        )
        if isinstance(config.model, SageMakerModel):
            estimate = plan_inference(
                config.model,
                rows,
                background.frame,
                config.explainer,
                algorithm,
                len(shards),
                probe_rows=len(probe),
            )
            log_values(run, metrics={k: estimate[k] for k in ("inference_rows", "inference_requests")})
            logger.info(
                "endpoint %s: ~%d inference rows in ~%d requests",
                config.model.endpoint.name,
                estimate["inference_rows"],
                estimate["inference_requests"],
            )
            check_budget(config.model, estimate)

        explain_started = time.perf_counter()
        computed = explain_shards(jobs, config.shards, runner, store) if jobs else []
        explain_s = time.perf_counter() - explain_started
        results = sorted([*reused, *computed], key=lambda r: r.index)

        values_path = str(artifacts / "shap_values.parquet")
        combined = aggregate_task(
            [r.path for r in results], values_path, features, config.output.aggregations
        )
        combined.importance.to_csv(artifacts / "global_importance.csv", index=False)
        plots = render_plots_task.submit(
            values_path,
            rows,
            features,
            combined.labels or ["0"],
            config.output,
            str(artifacts / "plots"),
            combined.importance,
        )
        # The values table is the largest artifact by far: it uploads while the plots render.
        uploaded = ["shap_values.parquet", "global_importance.csv"]
        for name in uploaded:
            log_artifact(run, artifacts / name)
        plots.result()

        # The flow's own calls (the probe), then what each shard counted wherever it was computed.
        traffic = [t for t in (predictor.traffic(), *(r.traffic for r in computed)) if t]
        if traffic:
            sent = {key: sum(t[key] for t in traffic) for key in traffic[0]}
            sent["max_request_bytes"] = max(t["max_request_bytes"] for t in traffic)
            log_values(run, metrics={f"inference_{k}_sent": v for k, v in sent.items()})
        duration_s = time.perf_counter() - started
        metrics = {
            "rows_explained": combined.rows_explained,
            "shards": len(shards),
            "additivity_max_error": combined.additivity_max_error,
            "duration_s": duration_s,
            "explain_s": explain_s,
            "rows_per_s": combined.rows_explained / max(explain_s, 1e-9),
            "background_rows": len(background.frame),
            "shards_reused": len(reused),
            "shards_computed": len(computed),
        }
        log_values(
            run,
            metrics=metrics,
            params={
                "explainer.algorithm_effective": algorithm,
                "explainer.link_effective": link,
            },
        )
        log_artifacts(run, artifacts, skip=uploaded)
        if not config.shards.keep and not claim.release(delete=True):
            logger.info("kept the finished shards in %s: another run of this config is using them", store)
        publish_summary_task(
            config.model.name,
            summary_markdown(
                config.model.name, combined.importance, config.output.aggregations[0], run_url(run), metrics
            ),
        )

    logger.info("MLflow run %s FINISHED: %s", run.run_id, run_url(run))
    return {
        "status": "FINISHED",
        "mlflow_run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "experiment": config.experiment_name,
        "tracking_uri": tracking_uri,
        "run_url": run_url(run),
        "rows_explained": combined.rows_explained,
        "shards": len(shards),
        "shards_reused": len(reused),
        "shards_computed": len(computed),
        "additivity_max_error": combined.additivity_max_error,
        "duration_s": round(time.perf_counter() - started, 3),
        "rows_per_s": metrics["rows_per_s"],
        "algorithm": algorithm,
        "link": link,
        "validation_success": report.success,
        "top_features": combined.importance.sort_values("rank")["feature"].drop_duplicates().head(5).tolist(),
    }
