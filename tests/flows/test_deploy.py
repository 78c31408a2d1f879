"""Production topology without docker: a real `prefect server` and `mlflow server` on loopback, deployments
made by `shapline deploy`, a run triggered through the API with parameter overrides (as the UI does), executed
by a real process worker, and its results read back from MLflow over HTTP; scheduled runs made by the
server's own scheduler and served by `shapline serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, wait_for

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("servers")
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        # The scheduler service makes scheduled flow runs; a one-second loop instead of a minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
    }
    env.pop("PREFECT_API_URL", None)
    logs = [open(folder / name, "w") for name in ("prefect.log", "mlflow.log")]  # noqa: SIM115
    prefect = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env=env,
        stdout=logs[0],
        stderr=subprocess.STDOUT,
    )
    mlflow = subprocess.Popen(
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
            str(mlflow_port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env=env,
        stdout=logs[1],
        stderr=subprocess.STDOUT,
    )
    try:
        urls = {
            "prefect": f"http://127.0.0.1:{prefect_port}/api",
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
        }
        wait_for(urls["prefect"] + "/health", prefect)
        wait_for(urls["mlflow"] + "/health", mlflow)
        yield {**urls, "home": str(folder / "prefect-home")}
    finally:
        for process in (prefect, mlflow):
            process.terminate()
        for process in (prefect, mlflow):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()


def wait_for_runs(client: Any, runs: list[Any], env: dict[str, str], seconds: float = 300) -> dict[Any, Any]:
    """Run a real process worker until every flow run reached a final state; their final states."""
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "it-pool", "--type", "process", "--run-once"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + seconds
    states: dict[Any, Any] = {}
    try:
        while len(states) < len(runs):
            assert time.monotonic() < deadline, "the triggered runs did not finish"
            for run in runs:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    states[run.id] = state
            time.sleep(1)
    finally:
        worker.terminate()
        output = worker.communicate(timeout=60)[0]
    states["worker output"] = output
    return states


def test_deploy_trigger_with_overrides_and_read_results_over_http(
    servers: dict[str, str],
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    xgb_model: Path,
    tmp_path: Path,
) -> None:
    common = {"data": {"source": str(cancer_data), "target": "malignant"}, "output": {"plots": ["bar"]}}
    kernel = write_config(
        model={
            "name": "cancer-kernel",
            "kind": "sklearn",
            "path": str(mlp_model),
            "class_labels": ["benign", "malignant"],
        },
        background={"size": 8},
        schedule={"cron": "0 6 * * 1", "timezone": "Europe/Paris", "parameters": {"explain_rows": 100}},
        **common,
    )
    tree = write_config(
        model={"name": "cancer-tree", "kind": "xgboost", "path": str(xgb_model)},
        schedule={"interval_s": 3600, "active": False},
        **common,
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": servers["prefect"],
        "PREFECT_HOME": servers["home"],
        "MLFLOW_TRACKING_URI": servers["mlflow"],
        "SHAPLINE_CACHE_DIR": str(tmp_path / "cache"),
    }

    def deploy() -> dict[str, str]:
        done = subprocess.run(
            [str(BIN / "shapline"), "deploy", str(kernel), str(tree), "--pool", "it-pool", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "ignore_warnings" not in done.stdout + done.stderr  # nothing printed a user cannot act on
        return json.loads(done.stdout.strip().splitlines()[-1])["deployments"]

    first, second = deploy(), deploy()
    assert first == second and set(first) == {"cancer-kernel", "cancer-tree"}

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: servers["prefect"]}), get_client(sync_client=True) as client:
        kernel_deployment = client.read_deployment(first["cancer-kernel"])
        tree_deployment = client.read_deployment(first["cancer-tree"])
        assert kernel_deployment.work_pool_name == "it-pool"
        assert client.read_work_pool("it-pool").type == "process"
        assert kernel_deployment.parameters == {"config_path": str(kernel.resolve())}
        assert kernel_deployment.entrypoint == "shapline.flows.explain.explain_model"
        [cron] = kernel_deployment.schedules
        assert cron.schedule.cron == "0 6 * * 1" and cron.schedule.timezone == "Europe/Paris" and cron.active
        assert cron.parameters == {"config_path": str(kernel.resolve()), "explain_rows": 100}
        [interval] = tree_deployment.schedules
        assert interval.schedule.interval.total_seconds() == 3600 and not interval.active
        # The Custom Run form: flat fields, each titled, described, typed, saying what the config uses.
        form = kernel_deployment.parameter_openapi_schema["properties"]
        assert list(form) == [
            "config_path",
            "explain_rows",
            "background_size",
            "algorithm",
            "nsamples",
            "shard_size",
            "workers",
            "overrides",
        ]
        assert form["explain_rows"]["title"] == "Rows to explain"
        assert "Empty: the config's 'all' (data.explain_rows)." in form["explain_rows"]["description"]
        assert "Empty: the config's 8 (background.size)." in form["background_size"]["description"]
        # Typed without a None toggle: the explainers as a list to pick from (empty: the config's).
        assert form["algorithm"]["enum"] == ["auto", "tree", "kernel", "permutation", "exact", "linear"]
        assert form["algorithm"]["type"] == "string" and "anyOf" not in form["algorithm"]

        # As the UI's form sends it (the API), and as `prefect deployment run --param` does.
        from_form = client.create_flow_run_from_deployment(
            kernel_deployment.id,
            parameters={
                "config_path": str(kernel.resolve()),
                "explain_rows": 6,
                "nsamples": 64,
                "shard_size": 3,
                "overrides": ["output.top_k=1"],
            },
        )
        started = subprocess.run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                "shapline-explain/cancer-kernel",
                "--param",
                "explain_rows=5",
                "--param",
                "nsamples=40",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        from_cli = next(run for run in client.read_flow_runs() if run.parameters.get("explain_rows") == 5)
        # A deployment made before the form was flat holds the nested form: it keeps working.
        old_style = client.create_flow_run_from_deployment(
            kernel_deployment.id,
            parameters={
                "parameters": {"config_path": str(kernel.resolve()), "explain_rows": 4, "nsamples": 40}
            },
        )
        failing = client.create_flow_run_from_deployment(
            kernel_deployment.id,
            parameters={"config_path": str(kernel.resolve()), "overrides": ["data.features=[nope]"]},
        )
        states = wait_for_runs(client, [from_form, from_cli, old_style, failing], env)
        for run in (from_form, from_cli, old_style):
            assert states[run.id].is_completed(), states["worker output"][-3000:]
        # A run that fails on bad input reads like the CLI: one line, no traceback, in the state and the log.
        failed = states[failing.id]
        assert failed.is_failed() and "column 'nope' is missing" in failed.message
        assert "\n" not in failed.message.strip() and "Traceback" not in failed.message
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[failing.id])))
        assert any("column 'nope' is missing" in log.message for log in logs)
        assert not any("Traceback" in log.message for log in logs if log.level >= 20)
        # The markdown artifact belongs to the flow run and leads to the MLflow run.
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[from_form.id]))
        )
        assert artifact.type == "markdown" and artifact.task_run_id is None
        assert f"{servers['mlflow']}/#/experiments/" in artifact.data

    mlflow = MlflowClient(servers["mlflow"])
    experiment = mlflow.get_experiment_by_name("shapline/cancer-kernel")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    def logged(flow_run: Any) -> Any:
        [run] = mlflow.search_runs(
            [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'"
        )
        return run

    run = logged(from_form)
    assert run.info.status == "FINISHED"
    assert logged(from_cli).data.metrics["rows_explained"] == 5
    assert logged(old_style).data.metrics["rows_explained"] == 4
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert metrics["rows_explained"] == 6 and metrics["shards"] == 2
    assert metrics["duration_s"] == round(metrics["duration_s"], 1)
    assert params["explainer.nsamples"] == "64"
    # What was explained, in words; only what applies to this run's explainer and runner.
    assert params["model.class_label"] == "malignant" and params["explainer.units"] == "log-odds"
    assert "explainer.feature_perturbation" not in params and "shards.address" not in params
    features = list(pd.read_csv(cancer_data).columns[:-1])
    assert {f"importance.{feature}" for feature in features} <= set(metrics)
    note = tags["mlflow.note.content"]
    assert "probability of malignant" in note and "SHAP values in **log-odds**" in note
    assert "Top features (mean_abs):" in note and "additivity max error" in note
    assert run.info.run_name.startswith("cancer-kernel · 20") and run.info.run_name.endswith(" UTC")
    assert tags["mlflow.source.name"] == str(kernel.resolve()) and tags["mlflow.source.type"] == "JOB"
    assert tags["prefect.deployment"] == "cancer-kernel"
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{from_form.id}")
    assert f"[Prefect flow run]({tags['prefect.flow_run_url']})" in note
    assert tags["shapline.model_file"] == str(mlp_model) and len(tags["shapline.model_sha256"]) == 64
    contexts = {
        d.tags[0].value: d.dataset
        for d in run.inputs.dataset_inputs
        if d.tags and d.tags[0].key == "mlflow.data.context"
    }
    assert contexts["explain"].digest == tags["shapline.data_sha256"][:36]
    assert json.loads(contexts["explain"].profile)["num_rows"] == 569
    assert json.loads(contexts["background"].profile)["num_rows"] == 8
    effective = mlflow.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "nsamples: 64" in Path(effective).read_text() and "top_k: 1" in Path(effective).read_text()
    values = pd.read_parquet(mlflow.download_artifacts(run.info.run_id, "shap_values.parquet", str(tmp_path)))
    assert len(values) == 6
    # The configured plots, and the drift plot when the run was compared with an earlier run of the model.
    compared = "shapline.baseline_run_id" in run.data.tags
    expected = {"bar.png", "drift.png"} if compared else {"bar.png"}
    assert expected == {Path(f.path).name for f in mlflow.list_artifacts(run.info.run_id, "plots")}


def test_scheduled_runs_are_made_by_the_server_and_complete_with_the_schedules_parameters(
    servers: dict[str, str],
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    tmp_path: Path,
) -> None:
    """The third way shapline is used: nobody triggers anything; the schedule in the YAML must fire."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    store = f"sqlite:///{tmp_path / 'scheduled.db'}"
    MlflowClient(store).search_experiments()  # the store exists before two runs could race to create it
    config = write_config(
        model={"name": "cancer-scheduled", "kind": "xgboost", "path": str(xgb_model)},
        data={"source": str(cancer_data), "target": "malignant"},
        output={"plots": ["bar"]},
        schedule={"interval_s": 15, "parameters": {"explain_rows": 7}},
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": servers["prefect"],
        "PREFECT_HOME": servers["home"],
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "MLFLOW_TRACKING_URI": store,
        "SHAPLINE_CACHE_DIR": str(tmp_path / "cache"),
    }
    # As a person reading both commands might: deploy first, then serve the same config (with --set, as run).
    overrides = ["--set", "output.plots=[]"]
    deployed = subprocess.run(
        [str(BIN / "shapline"), "deploy", str(config), "--pool", "serve-pool", *overrides, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    [deployment_id] = json.loads(deployed.stdout.strip().splitlines()[-1])["deployments"].values()
    log = tmp_path / "serve.log"
    with open(log, "w") as output:
        serve = subprocess.Popen(
            [str(BIN / "shapline"), "serve", str(config), "--pool", "serve-pool", *overrides],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    completed: list = []
    try:
        with (
            temporary_settings({PREFECT_API_URL: servers["prefect"]}),
            get_client(sync_client=True) as client,
        ):
            only_ours = DeploymentFilter(name=DeploymentFilterName(any_=["cancer-scheduled"]))
            deadline = time.monotonic() + 300
            while len(completed) < 2:
                assert serve.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    "no two scheduled runs completed:\n" + log.read_text()[-3000:]
                )
                runs = client.read_flow_runs(deployment_filter=only_ours)
                ended = [r for r in runs if r.state is not None and r.state.is_final()]
                assert all(r.state.is_completed() for r in ended), [r.state for r in ended]
                completed = [r for r in ended if r.auto_scheduled]
                time.sleep(1)
            # One deployment, on the pool deploy made, its queue Ready: serve's worker polls it.
            deployment = client.read_deployment(deployment_id)
            assert deployment.work_pool_name == "serve-pool"
            queue = client.read_work_queue_by_name(deployment.work_queue_name, work_pool_name="serve-pool")
            assert queue.status == "READY"
            assert [d.id for d in client.read_deployments(deployment_filter=only_ours)] == [deployment.id]
            assert deployment.parameters == {
                "config_path": str(config.resolve()),
                "overrides": ["output.plots=[]"],
            }
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
    mlflow = MlflowClient(store)
    experiment = mlflow.get_experiment_by_name("shapline/cancer-scheduled")
    for flow_run in completed:
        assert flow_run.parameters == {
            "config_path": str(config.resolve()),
            "overrides": ["output.plots=[]"],
            "explain_rows": 7,
        }
        [run] = mlflow.search_runs(
            [experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'"
        )
        assert run.info.status == "FINISHED" and run.data.metrics["rows_explained"] == 7
        assert run.data.tags["shapline.overrides"] == "data.explain_rows=7 output.plots=[]"
        plots = {Path(a.path).name for a in mlflow.list_artifacts(run.info.run_id, "plots")}
        assert "bar.png" not in plots  # the config's plots: [bar], the --set's []: applied
