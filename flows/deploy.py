"""`shapline deploy` and `shapline serve`: one Prefect deployment per model config, scheduled from its YAML.

Both make the same deployments, on a work pool: `deploy` leaves their runs to a worker started apart
(`prefect worker start --pool shapline`), `serve` runs that worker in its own process. So the deployment
page always names a pool whose queue has a worker when one is working it, whichever command made it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from shapline.tasks.common.config import ExplainConfig, load_config
from shapline.tasks.common.errors import ConfigError, ShaplineError
from shapline.tasks.common.redact import redact

DEFAULT_POOL = "shapline"


def deployment_parameters(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The parameters every run of a deployment gets: its config and the `--set` overrides it was made with."""
    return {"config_path": config_path, **({"overrides": list(overrides)} if overrides else {})}


def schedules_for(config: ExplainConfig, config_path: str, overrides: list[str] | None = None) -> list[Any]:
    """The Prefect schedule of a config (none without a `schedule:` section): scheduled runs get the
    deployment's parameters and `schedule.parameters` (its overrides after the deployment's)."""
    from prefect.schedules import Cron, Interval

    schedule = config.schedule
    if schedule is None:
        return []
    parameters = None
    if schedule.parameters:
        parameters = {**deployment_parameters(config_path, overrides), **schedule.parameters}
        if overrides and "overrides" in schedule.parameters:
            parameters["overrides"] = [*overrides, *schedule.parameters["overrides"]]
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


def _loaded(paths: list[str], overrides: list[str] | None = None) -> list[tuple[str, ExplainConfig]]:
    secret = [item for item in overrides or [] if redact(item) != item]
    if secret:
        raise ConfigError(
            f"--set {redact(secret[0])}: looks like a credential, and a deployment keeps its parameters in "
            "Prefect's database: give it to the worker's environment instead"
        )
    resolved = [str(Path(p).resolve()) for p in paths]
    configs = [(path, load_config(path, overrides)) for path in resolved]
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


def _deployment(path: str, config: ExplainConfig, overrides: list[str] | None = None) -> Any:
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
        schedules=schedules_for(config, path, overrides),
        parameters=deployment_parameters(path, overrides),
        description=_description(config),
        tags=["shapline", f"model:{config.model.name}"],
    )
    schema = form_for_config(deployment._parameter_openapi_schema.model_dump(), _config_values(config))
    deployment._parameter_openapi_schema = ParameterSchema(**schema)
    return deployment


def _deployments(configs: list[tuple[str, ExplainConfig]], overrides: list[str] | None = None) -> list[Any]:
    return [_deployment(path, config, overrides) for path, config in configs]


def deploy(
    paths: list[str], pool: str = DEFAULT_POOL, overrides: list[str] | None = None
) -> list[tuple[str, UUID]]:
    """Create or update one deployment per config on `pool` (its runs get `overrides`, as `run --set`);
    running it again changes nothing."""
    from prefect import deploy as prefect_deploy

    configs = _loaded(paths, overrides)
    ensure_work_pool(pool)
    deployments = _deployments(configs, overrides)
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


def serve(
    paths: list[str],
    pool: str = DEFAULT_POOL,
    overrides: list[str] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Deploy the configs as `deploy` does, then work their pool from this process until it is stopped
    (Ctrl-C): a process worker, each flow run in a process of its own, as `prefect worker start` runs them."""
    import anyio
    from prefect.workers.process import ProcessWorker

    for name, deployment_id in deploy(paths, pool, overrides):
        say(
            f"deployment shapline-explain/{name} ({deployment_id}) on work pool {pool}, worked by this process"
        )
    say("Ctrl-C stops")
    worker = ProcessWorker(work_pool_name=pool, create_pool_if_not_found=False)
    try:
        anyio.run(worker.start, False, False, say)
    except KeyboardInterrupt:
        say(f"stopped working pool {pool}")
