"""Nothing secret leaves shapline: a recognisable secret planted everywhere a user can put one is found in no
artifact, tag, param, run name, CLI line, Prefect log, flow-run parameter or the Prefect database itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from shapline.testing.endpoint import EndpointServer
from tests.helpers import all_runs, free_port, run_cli

pytestmark = pytest.mark.usefixtures("prefect_server")


def prefect_database_files() -> list[Path]:
    """The test server's sqlite database and its journal files."""
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    database = Path(url.split(":///", 1)[1])
    return sorted(database.parent.glob(database.name + "*"))


def everything_written(store: str, folder: Path) -> dict[str, str]:
    """Every text shapline (or Prefect on its behalf) wrote: MLflow runs and artifacts, Prefect logs, flow
    runs and their parameters, and the raw bytes of the Prefect database."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    client = MlflowClient(store)
    written: dict[str, str] = {}
    for run in all_runs(store):
        run_id = run.info.run_id
        written[f"mlflow {run_id} meta"] = json.dumps(
            {"name": run.info.run_name, "tags": run.data.tags, "params": run.data.params}
        )
        local = Path(client.download_artifacts(run_id, "", str(folder / run_id)))
        for path in local.rglob("*"):
            if path.is_file():
                written[f"artifact {path.relative_to(folder)}"] = path.read_bytes().decode("latin-1")
    with get_client(sync_client=True) as prefect:
        written["prefect flow runs"] = json.dumps(
            [
                {"name": r.name, "parameters": r.parameters, "state": r.state.message if r.state else None}
                for r in prefect.read_flow_runs()
            ],
            default=str,
        )
        written["prefect logs"] = "\n".join(log.message for log in prefect.read_logs())
    for path in prefect_database_files():
        written[f"database {path.name}"] = path.read_bytes().decode("latin-1")
    return written


def test_secrets_are_redacted_in_everything_shapline_writes(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = f"SeCrEt{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"{secret}-aws")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    common = {
        "data": {
            "source": str(cancer_data),
            "target": "malignant",
            "explain_rows": 2,
            # Not used by a local file, but it is in the config and so in config.yaml.
            "s3": {"endpoint_url": f"http://minio:9000/?X-Amz-Signature={secret}-query"},
        },
        "background": {"size": 5},
        "explainer": {"nsamples": 30},
        "shards": {"size": 2},
        "output": {"plots": ["bar"]},
    }
    with EndpointServer(str(mlp_model), "guarded") as server:
        working = write_config(
            model={
                "name": "cancer-secret",
                "kind": "sagemaker",
                "endpoint": {
                    "name": "guarded",
                    "endpoint_url": server.url.replace("http://", f"http://admin:{secret}-yaml@"),
                },
            },
            **common,
        )
        override = server.url.replace("http://", f"http://admin:{secret}-set@")
        code_ok, summary_ok, err_ok = run_cli(
            ["run", str(working), "--json", "--set", f"model.endpoint.endpoint_url={override}"], capsys
        )
    assert code_ok == 0, err_ok
    assert "shapline.overrides" in all_runs(mlflow_store)[0].data.tags
    dead = f"http://admin:{secret}-dead@127.0.0.1:{free_port()}"
    failing = write_config(
        model={
            "name": "cancer-secret",
            "kind": "sagemaker",
            "endpoint": {"name": "guarded", "endpoint_url": dead},
        },
        **common,
    )
    code_dead, summary_dead, err_dead = run_cli(["run", str(failing), "--json"], capsys)
    assert code_dead == 1 and "EndpointConnectionError" in summary_dead["error"]

    outputs = {
        "cli (finished)": json.dumps(summary_ok) + err_ok,
        "cli (endpoint down)": json.dumps(summary_dead) + err_dead,
    }
    written = everything_written(mlflow_store, tmp_path / "downloaded")
    statuses = sorted(r.info.status for r in all_runs(mlflow_store))
    assert statuses == ["FAILED", "FINISHED"], statuses
    assert any(name.endswith("config.yaml") for name in written)
    leaks = [where for where, text in {**outputs, **written}.items() if secret in text]
    assert not leaks, leaks
    # Redacted, not dropped: the places still say where things were.
    assert "http://***@127.0.0.1" in summary_dead["error"]
    config_yaml = next(text for name, text in written.items() if name.endswith("config.yaml"))
    assert "http://***@127.0.0.1" in config_yaml and "X-Amz-Signature=***" in config_yaml
