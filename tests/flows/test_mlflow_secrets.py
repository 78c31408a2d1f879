"""What MLflow itself would print or keep: its "View run ... at: <url>" line with the password of an http
tracking URI, and an experiment named with a credential in it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, run_cli, wait_for

pytestmark = pytest.mark.usefixtures("prefect_server")
BIN = Path(sys.executable).parent
PASSWORD = "s3cr3tpassw0rd"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback (no auth: it ignores the credentials a client sends)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(url + "/health", server)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.mark.slow
@pytest.mark.parametrize("printing", ["default", "asked for"])
def test_a_password_in_an_http_tracking_uri_is_printed_nowhere(
    printing: str,
    mlflow_server: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
) -> None:
    """By default MLflow's line is not printed at all; a user who asks for it
    (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=false) gets it through the CLI's redacting stdout."""
    from prefect.settings import PREFECT_API_URL

    tracking = mlflow_server.replace("http://", f"http://user:{PASSWORD}@")
    config = write_config(
        model={
            "name": f"cancer-over-http-{printing.replace(' ', '-')}",
            "kind": "xgboost",
            "path": str(xgb_model),
        },
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 20},
        background={"size": 10},
        output={"tracking_uri": tracking, "plots": ["bar"]},
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    if printing == "asked for":
        env["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "false"
    done = subprocess.run(
        [str(BIN / "shapline"), "run", str(config), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert PASSWORD not in done.stdout and PASSWORD not in done.stderr
    assert "http://***@127.0.0.1" in done.stdout  # the CLI's own line names the server, redacted
    if printing == "asked for":
        [line] = [line for line in done.stdout.splitlines() if "View run" in line]
        assert "http://***@127.0.0.1" in line, line
    else:
        assert "View run" not in done.stdout


def test_a_credential_in_the_experiment_name_is_not_kept(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_config(
        model={"name": "cancer-experiment", "kind": "xgboost", "path": str(xgb_model)},
        data={"source": str(cancer_data), "target": "malignant", "explain_rows": 10},
        background={"size": 10},
        output={"plots": []},
    )
    code, summary, err = run_cli(
        ["run", str(config), "--set", "output.experiment=team?token=abcdef123456", "--json"], capsys
    )
    assert code == 0, err
    client = MlflowClient(mlflow_store)
    names = [e.name for e in client.search_experiments()]
    assert "team?token=***" in names and not any("abcdef123456" in name for name in names), names
    assert client.get_experiment(summary["experiment_id"]).name == "team?token=***"
    assert "abcdef123456" not in str(summary)
