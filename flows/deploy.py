"""`shapline deploy` and `shapline serve`: one Prefect deployment per model config, scheduled from its YAML."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from shapline.tasks.common.config import ExplainConfig, load_config
from shapline.tasks.common.errors import ConfigError, ShaplineError

DEFAULT_POOL = "shapline"


def schedules_for(config: ExplainConfig, config_path: str) -> list[Any]:
    """The Prefect schedule of a config (none without a `schedule:` section)."""
    from prefect.schedules import Cron, Interval

    schedule = config.schedule
    if schedule is None:
        return []
    parameters = {"config_path": config_path, **schedule.parameters} if schedule.parameters else None
    if schedule.cron is not None:
        return [
            Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active, parameters=parameters)
        ]
    return [
        Interval(
            timedelta(seconds=schedule.interval_s or 0),
            timezone=schedule.timezone,
            active=schedule.active,
            parameters=parameters,
        )
    ]


def check_schedule(config: ExplainConfig, source: str) -> None:
    """Refuse a schedule Prefect would refuse at deploy time (a bad cron string or timezone), now.

    Prefect's own schedule models judge it, so `validate` and `deploy` cannot disagree.
    """
    from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
    from pydantic import ValidationError

    schedule = config.schedule
    if schedule is None:
        return
    try:
        if schedule.cron is not None:
            CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        else:
            IntervalSchedule(interval=timedelta(seconds=schedule.interval_s or 1), timezone=schedule.timezone)
    except ValidationError as exc:
        reasons = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
        raise ConfigError(f"{source}: schedule: {reasons}") from exc


def _loaded(paths: list[str]) -> list[tuple[str, ExplainConfig]]:
    resolved = [str(Path(p).resolve()) for p in paths]
    configs = [(path, load_config(path)) for path in resolved]
    for path, config in configs:
        check_schedule(config, path)
    names = [config.model.name for _, config in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"model.name must differ between configs deployed together: {', '.join(duplicates)}"
        )
    return configs


def _description(config: ExplainConfig) -> str:
    return f"SHAP explanation of {config.model.name} ({config.model.kind}), logged to MLflow {config.experiment_name}"


def ensure_work_pool(name: str, pool_type: str = "process") -> None:
    """Create the work pool if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))


def _config_values(config: ExplainConfig) -> dict[str, Any]:
    """The values the form's fields fall back on, by config key."""
    return {
        "data.explain_rows": config.data.explain_rows,
        "background.size": config.background.size,
        "explainer.algorithm": config.explainer.algorithm,
        "explainer.nsamples": config.explainer.nsamples,
        "shards.size": config.shards.size,
        "shards.workers": config.shards.workers,
    }


def _deployment(path: str, config: ExplainConfig) -> Any:
    """A config's deployment: the installed module as entrypoint (a worker needs shapline installed and the
    config at `config_path`, not this machine's checkout or site-packages), a form that says what the
    config uses for each field left empty."""
    from prefect.deployments.runner import EntrypointType
    from prefect.utilities.callables import ParameterSchema

    from shapline.flows.explain import explain_model
    from shapline.flows.parameters import form_for_config

    # Called from sync code, to_deployment returns the deployment itself (its type says "or a coroutine").
    deployment: Any = explain_model.to_deployment(
        name=config.model.name,
        entrypoint_type=EntrypointType.MODULE_PATH,
        schedules=schedules_for(config, path),
        parameters={"config_path": path},
        description=_description(config),
        tags=["shapline", f"model:{config.model.name}"],
    )
    schema = form_for_config(deployment._parameter_openapi_schema.model_dump(), _config_values(config))
    deployment._parameter_openapi_schema = ParameterSchema(**schema)
    return deployment


def _deployments(configs: list[tuple[str, ExplainConfig]]) -> list[Any]:
    return [_deployment(path, config) for path, config in configs]


def deploy(paths: list[str], pool: str = DEFAULT_POOL) -> list[tuple[str, UUID]]:
    """Create or update one deployment per config on `pool`; running it again changes nothing."""
    from prefect import deploy as prefect_deploy

    configs = _loaded(paths)
    ensure_work_pool(pool)
    deployments = _deployments(configs)
    # Called outside an event loop, Prefect's sync-compatible deploy returns the list, not a coroutine.
    ids = cast(
        "list[UUID]",
        prefect_deploy(
            *deployments,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps_message=False,
            ignore_warnings=True,
        ),
    )
    if len(ids) != len(deployments):
        raise ShaplineError(
            f"{len(deployments) - len(ids)} of {len(deployments)} deployments failed (see above)"
        )
    return [
        (config.model.name, deployment_id) for (_, config), deployment_id in zip(configs, ids, strict=True)
    ]


def serve(paths: list[str]) -> None:
    """Serve the configs' deployments from this process until it is stopped (no worker needed)."""
    from prefect import serve as prefect_serve

    prefect_serve(*_deployments(_loaded(paths)), print_starting_message=True)
