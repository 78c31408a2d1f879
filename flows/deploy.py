"""`shapline deploy` and `shapline serve`: one Prefect deployment per model config, scheduled from its YAML."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from flows.config import ExplainConfig, load_config

# The project root as the worker sees it: flows/explain.py is loaded from here by path.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/explain.py:explain_model"
DEFAULT_POOL = "shapline"


def schedules_for(config: ExplainConfig, config_path: str) -> list[Any]:
    """The Prefect schedule of a config (none without a `schedule:` section)."""
    from prefect.schedules import Cron, Interval

    schedule = config.schedule
    if schedule is None:
        return []
    parameters = (
        {"parameters": {"config_path": config_path, **schedule.parameters}} if schedule.parameters else None
    )
    if schedule.cron is not None:
        return [
            Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active, parameters=parameters)
        ]
    return [
        Interval(
            timedelta(seconds=schedule.interval_s),
            timezone=schedule.timezone,
            active=schedule.active,
            parameters=parameters,
        )
    ]


def _loaded(paths: list[str]) -> list[tuple[str, ExplainConfig]]:
    resolved = [str(Path(p).resolve()) for p in paths]
    configs = [(path, load_config(path)) for path in resolved]
    names = [config.model.name for _, config in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        from tasks.errors import ConfigError

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


def deploy(paths: list[str], pool: str = DEFAULT_POOL) -> list[tuple[str, UUID]]:
    """Create or update one deployment per config on `pool`; running it again changes nothing."""
    from flows.explain import explain_model

    configs = _loaded(paths)
    ensure_work_pool(pool)
    source = explain_model.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT)
    deployed = []
    for path, config in configs:
        deployment_id = source.deploy(
            name=config.model.name,
            work_pool_name=pool,
            build=False,
            push=False,
            schedules=schedules_for(config, path),
            parameters={"parameters": {"config_path": path}},
            description=_description(config),
            tags=["shapline", f"model:{config.model.name}"],
            print_next_steps=False,
        )
        deployed.append((config.model.name, deployment_id))
    return deployed


def serve(paths: list[str]) -> None:
    """Serve the configs' deployments from this process until it is stopped (no worker needed)."""
    from prefect import serve as prefect_serve

    from flows.explain import explain_model

    deployments = [
        explain_model.to_deployment(
            name=config.model.name,
            schedules=schedules_for(config, path),
            parameters={"parameters": {"config_path": path}},
            description=_description(config),
            tags=["shapline", f"model:{config.model.name}"],
        )
        for path, config in _loaded(paths)
    ]
    prefect_serve(*deployments, print_starting_message=True)
