"""The compose stack and the Dockerfiles, checked without a Docker engine: fast, no network."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"

CORE_SERVICES = {"postgres", "prefect-server", "mlflow", "minio", "worker"}
# A whole value that is one compose reference with a default, e.g. ${MINIO_ROOT_PASSWORD:-dev-only}.
ENV_REFERENCE = re.compile(r"\$\{[A-Z][A-Z0-9_]*:-[^}]*\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
# The user:password part of a URL (scheme://USERINFO@host:port/...).
URL_USERINFO = re.compile(r"://(\S+?)@[\w.-]+(?::\d+)?(?:/|$)")
AWS_ACCESS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET_LIKE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: str(value) for key, value in env.items()}


def command_of(service: dict[str, Any], key: str = "command") -> str:
    command = service.get(key) or ""
    return " ".join(str(part) for part in command) if isinstance(command, list) else str(command)


def depends_of(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in depends.items()}


def strings_in(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings_in(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings_in(value)]
    return [str(node)] if node is not None else []


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [
        (text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical
    ]


# --- topology -------------------------------------------------------------------------------------


def test_core_services_exist(services: dict[str, Any]) -> None:
    assert set(services) >= CORE_SERVICES, f"missing: {CORE_SERVICES - set(services)}"
    assert "deploy" in services and "create-buckets" in services


def test_depends_on_refers_to_existing_services(services: dict[str, Any]) -> None:
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for dependency, condition in depends_of(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert dependency != name
            assert condition in valid, f"{name} -> {dependency}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}'s health"
            if condition == "service_completed_successfully":
                assert services[dependency].get("restart") == "no", f"{dependency} must be one-shot"


def test_core_servers_have_healthchecks(services: dict[str, Any]) -> None:
    expected = {
        "postgres": "pg_isready",
        "prefect-server": "/api/health",
        "mlflow": "/health",
        "minio": "ready",
    }
    for name, probe in expected.items():
        test = command_of(services[name]["healthcheck"], "test")
        assert probe in test, f"{name} healthcheck: {test}"


def test_postgres_serves_both_databases(compose: dict[str, Any], services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert env_of(postgres)["POSTGRES_DB"] == "prefect"
    init = {c["source"]: c["target"] for c in postgres["configs"]}
    assert all(target.startswith("/docker-entrypoint-initdb.d/") for target in init.values())
    sql = " ".join(compose["configs"][source]["content"] for source in init)
    assert re.search(r"CREATE DATABASE\s+mlflow", sql, re.IGNORECASE)


def test_prefect_server(services: dict[str, Any]) -> None:
    server = services["prefect-server"]
    assert server["image"] == "prefecthq/prefect:3.8.8-python3.11"
    command = command_of(server)
    assert "prefect server start" in command and "--host 0.0.0.0" in command
    url = env_of(server)["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and url.endswith("@postgres:5432/prefect")
    assert depends_of(server).get("postgres") == "service_healthy"


def test_prefect_server_records_task_runs_as_a_runs_temporary_server_does(services: dict[str, Any]) -> None:
    """The compose server writes task run states in batches, as the temporary server `shapline run` starts."""
    from shapline.flows.cli import PREFECT_SERVER_DEFAULTS

    env = env_of(services["prefect-server"])
    assert {name: env.get(name) for name in PREFECT_SERVER_DEFAULTS} == PREFECT_SERVER_DEFAULTS


def test_mlflow_uses_postgres_and_minio(services: dict[str, Any]) -> None:
    mlflow = services["mlflow"]
    args = [str(a) for a in mlflow["command"]]
    assert args[:2] == ["mlflow", "server"]
    backend = args[args.index("--backend-store-uri") + 1]
    # +psycopg2: SQLAlchemy 2.1 made psycopg 3 (not installed in mlflow.Dockerfile) the default driver.
    assert backend.startswith("postgresql+psycopg2://") and backend.endswith("@postgres:5432/mlflow")
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://mlflow")
    assert "--serve-artifacts" in args
    assert args[args.index("--host") + 1] == "0.0.0.0"
    env = env_of(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    # MLflow rejects unknown Host headers: the worker reaches it as mlflow:5000.
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"
    assert depends_of(mlflow).get("postgres") == "service_healthy"
    assert depends_of(mlflow).get("create-buckets") == "service_completed_successfully"


def test_minio_and_its_buckets(services: dict[str, Any]) -> None:
    minio = services["minio"]
    assert "server" in command_of(minio) and "--console-address :9001" in command_of(minio)
    job = command_of(services["create-buckets"])
    assert "/mlflow" in job and "/shapline-data" in job
    assert depends_of(services["create-buckets"]).get("minio") == "service_healthy"


def test_worker(services: dict[str, Any]) -> None:
    worker = services["worker"]
    command = command_of(worker)
    assert command.startswith("prefect worker start")
    assert "--pool shapline" in command and "--type process" in command
    env = env_of(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert worker["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    depends = depends_of(worker)
    assert depends.get("prefect-server") == "service_healthy"
    assert depends.get("mlflow") == "service_healthy"


def test_deploy_job(services: dict[str, Any]) -> None:
    deploy = services["deploy"]
    command = command_of(deploy)
    assert "shapline deploy /app/configs/*.yaml" in command and "--pool shapline" in command
    assert deploy.get("restart") == "no" or deploy.get("profiles")
    assert env_of(deploy)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert deploy["image"] == services["worker"]["image"]
    assert depends_of(deploy).get("prefect-server") == "service_healthy"


def test_ui_ports_published(services: dict[str, Any]) -> None:
    def container_ports(service: dict[str, Any]) -> set[str]:
        return {str(p).rsplit(":", 1)[-1] for p in service.get("ports", [])}

    assert "4200" in container_ports(services["prefect-server"])
    assert "5000" in container_ports(services["mlflow"])
    assert "9001" in container_ports(services["minio"])


# --- credentials ----------------------------------------------------------------------------------


def test_credentials_only_via_env_references(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for key, value in env_of(service).items():
            if SECRET_KEY.search(key):
                assert ENV_REFERENCE.fullmatch(value), f"{name}.{key} must be ${{VAR:-default}}: {value!r}"
        for text in strings_in(service):
            for userinfo in URL_USERINFO.findall(text):
                assert re.fullmatch(rf"{ENV_REFERENCE.pattern}:{ENV_REFERENCE.pattern}", userinfo), (
                    f"{name}: URL credentials {userinfo!r} must be ${{USER:-dev}}:${{PASSWORD:-dev}}"
                )


def test_no_real_looking_aws_keys() -> None:
    for path in (COMPOSE_FILE, DOCKER / ".env.example", DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile"):
        text = path.read_text()
        assert not AWS_ACCESS_KEY_ID.search(text), f"{path.name} holds what looks like an AWS access key id"
        assert not AWS_SECRET_LIKE.search(text), f"{path.name} holds what looks like an AWS secret key"


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    example = (DOCKER / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", "\n".join(strings_in(compose))))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    assert "dev" in example.lower()


# --- Dockerfiles ----------------------------------------------------------------------------------


def test_dockerfile_installs_the_project() -> None:
    steps = dockerfile_instructions(DOCKER / "Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    copies = [args for op, args in steps if op == "COPY"]
    for source in ("pyproject.toml", "README.md", "shapline/", "flows/", "tasks/", "configs/"):
        assert any(args.split()[0] == source for args in copies), f"COPY {source} missing"
    runs = [args for op, args in steps if op == "RUN"]
    assert any(re.search(r"pip install[^&]*\s\.(\s|$)", run) for run in runs), "no `pip install .`"
    # Cache-friendly: dependencies are installed before the source is copied in.
    order = [(op, args) for op, args in steps if op in {"COPY", "RUN"}]
    first_source = next(i for i, (op, args) in enumerate(order) if op == "COPY" and args.startswith("flows/"))
    assert any(op == "RUN" and "pip install" in args for op, args in order[:first_source])
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


def test_mlflow_dockerfile() -> None:
    steps = dockerfile_instructions(DOCKER / "mlflow.Dockerfile")
    assert steps[0] == ("FROM", "python:3.11-slim")
    installs = " ".join(args for op, args in steps if op == "RUN" and "pip install" in args)
    for package in ("mlflow>=3.17,<4", "psycopg2-binary", "boto3"):
        assert package in installs
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}


# --- `docker compose config`, where the plugin exists (no engine needed) --------------------------


def _compose_command() -> list[str] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for command in candidates:
        try:
            version = subprocess.run(
                [*command, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        # v1 (the Python docker-compose) does not know this file's syntax; v2 says "v2.x.y".
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return command
    return None


def test_docker_compose_config_resolves() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose v2 here (`docker compose` plugin or docker-compose v2)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "dask", "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert CORE_SERVICES | {"deploy", "create-buckets", "dask-scheduler", "dask-worker"} <= set(
        resolved["services"]
    )
    worker_env = resolved["services"]["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["AWS_SECRET_ACCESS_KEY"], "the dev default must resolve"
    assert Path(resolved["services"]["worker"]["build"]["context"]) == REPO
