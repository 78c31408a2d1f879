"""What a person sees, in a real browser (headless Chromium driven by Playwright): the MLflow run page and
experiment, the Prefect Custom Run form. Screenshots are kept under $SHAPLINE_SCREENSHOTS (default: the
test's temporary folder) for a person to look at.

Run with `.venv/bin/pytest -m browser` once Chromium is installed (`apt-get install -y chromium`) and
`pip install playwright` (it drives that Chromium; no browser is downloaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_for
from tests.ui.conftest import start

pytestmark = [pytest.mark.browser, pytest.mark.slow]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo explained into a store an MLflow server (with its UI) serves, and a Prefect server with
    its UI holding the demo's deployment."""
    folder = tmp_path_factory.mktemp("ui")
    mlflow_port, prefect_port = free_port(), free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(folder / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "SHAPLINE_CACHE_DIR": str(folder / "cache"),
    }
    env.pop("PREFECT_API_URL", None)
    prefect = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        folder / "prefect.log",
        env,
        folder,
    )
    mlflow = serving = None
    try:
        api = f"http://127.0.0.1:{prefect_port}/api"
        wait_for(api + "/health", prefect)
        env["PREFECT_API_URL"] = api
        demo = subprocess.run(
            [str(BIN / "shapline"), "demo", "--set", "data.explain_rows=30", "--json"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert demo.returncode == 0, demo.stderr[-3000:]
        summary = json.loads(demo.stdout.strip().splitlines()[-1])
        # Pinned as the model's reference (the demo's monitor.baseline), by the start of its id.
        pinned = subprocess.run(
            [str(BIN / "shapline"), "reference", summary["mlflow_run_id"][:8]],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert pinned.returncode == 0, pinned.stderr[-3000:]
        # Next week's birds (the Dream island): the second run is compared with the first; a feature that
        # lost over 90% of its importance is drift too.
        again = subprocess.run(
            [
                str(BIN / "shapline"),
                "demo",
                "--set",
                "data.source=../demo/penguins-dream.csv",
                "--set",
                "data.explain_rows=30",
                "--set",
                "monitor.max_importance_change=0.9",
                "--json",
            ],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 0, again.stderr[-3000:]
        second = json.loads(again.stdout.strip().splitlines()[-1])
        assert second["baseline_run_id"] == summary["mlflow_run_id"]
        deployed = subprocess.run(
            [str(BIN / "shapline"), "deploy", "configs/penguins.yaml", "--pool", "ui-pool", "--json"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        [deployment] = json.loads(deployed.stdout.strip().splitlines()[-1])["deployments"].values()
        # Then `serve` of the same config, as a person would after reading both commands: the same
        # deployment, its pool now worked by this process.
        serving = start(
            [str(BIN / "shapline"), "serve", "configs/penguins.yaml", "--pool", "ui-pool"],
            folder / "serve.log",
            env,
            folder,
        )
        mlflow = start(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                env["MLFLOW_TRACKING_URI"],
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            folder / "mlflow.log",
            env,
            folder,
        )
        wait_for(f"http://127.0.0.1:{mlflow_port}/health", mlflow)
        yield {
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "prefect": f"http://127.0.0.1:{prefect_port}",
            "summary": summary,
            "second": second,
            "deployment": deployment,
            "folder": folder,
            "serve_log": folder / "serve.log",
        }
    finally:
        for process in (serving, mlflow, prefect):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def shown(page: Any, url: str, expected: str, picture: Path) -> str:
    """Open `url`, wait until `expected` is on the page (or a minute), take the screenshot, return the text."""
    page.goto(url)
    try:
        page.get_by_text(expected).first.wait_for(timeout=20_000)
    finally:
        page.wait_for_timeout(1500)
        page.screenshot(path=str(picture), full_page=True)
    return str(page.inner_text("body"))


def test_the_mlflow_run_page_says_what_was_explained(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    summary = demo_run["summary"]
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    page.goto(
        f"{demo_run['mlflow']}/#/experiments/{summary['experiment_id']}/runs/{summary['mlflow_run_id']}"
    )
    page.get_by_text("probability of Chinstrap").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "mlflow-run.png"), full_page=True)
    text = page.inner_text("body")
    assert "SHAP values in" in text and "log-odds" in text and "Top features" in text
    assert "No description" not in text
    assert "penguins.csv" in text  # the dataset input


def test_the_mlflow_run_page_links_the_baseline_and_the_report(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    """The second run's description: the drift, the baseline run (linked, what it explained) and the report,
    linked within this MLflow UI (the runs were made in a local store); following the link opens the report."""
    second, first = demo_run["second"], demo_run["summary"]
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    page.goto(f"{demo_run['mlflow']}/#/experiments/{second['experiment_id']}/runs/{second['mlflow_run_id']}")
    page.get_by_text("probability of Chinstrap").first.wait_for(timeout=60_000)
    page.get_by_text("Show more").first.click()  # the description opens folded
    page.get_by_text("Baseline:").first.wait_for(timeout=20_000)
    page.wait_for_timeout(1500)
    page.locator("text=Description").first.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "mlflow-run-baseline.png"), full_page=True)
    text = page.inner_text("body")
    assert "importance changed by more than 90%: island" in text
    assert "the model's reference, pinned with shapline reference" in text and "30 rows of" in text
    assert "open it with mlflow ui --backend-store-uri" in text
    baseline = page.get_by_role("link", name=f"run {first['mlflow_run_id']}").first
    assert f"/runs/{first['mlflow_run_id']}" in str(baseline.get_attribute("href"))
    report = page.get_by_role("link", name="report.html").first
    href = str(report.get_attribute("href"))
    assert href.endswith(
        f"#/experiments/{second['experiment_id']}/runs/{second['mlflow_run_id']}/artifacts/report.html"
    )
    with page.context.expect_page() as opened:  # MLflow opens a description's links in a new tab
        report.click()
    tab = opened.value
    frame = tab.frame_locator("iframe").first
    frame.get_by_text("The baseline:").first.wait_for(timeout=60_000)
    tab.wait_for_timeout(1500)
    tab.screenshot(path=str(shots / "mlflow-run-report-link.png"))
    assert f"/runs/{second['mlflow_run_id']}/artifacts/report.html" in tab.url


def test_the_mlflow_experiment_opens_on_its_runs(browser: Any, demo_run: dict[str, Any], shots: Path) -> None:
    summary = demo_run["summary"]
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    # The experiment link shapline writes (the report and the summary have it).

    url = f"{demo_run['mlflow']}/#/experiments/{summary['experiment_id']}?workflowType=machine_learning"
    text = shown(page, str(url), "penguins-species ·", shots / "mlflow-experiment.png")
    # The runs list, not the GenAI overview of traces (which says it has no data).
    assert "2 matching runs" in text and "penguins.csv" in text
    assert "No data available for the selected time range" not in text


def test_the_prefect_custom_run_form_has_flat_titled_fields(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 1400})
    url = f"{demo_run['prefect']}/deployments/deployment/{demo_run['deployment']}/run"
    text = shown(page, url, "Rows to explain", shots / "prefect-custom-run.png")
    for title in ("Config file", "Rows to explain", "Background rows", "Explainer", "Coalitions per row"):
        assert title in text
    assert "Empty: the config's 'all' (data.explain_rows)." in text


def test_the_report_shows_what_was_explained_and_the_drift(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    from mlflow.tracking import MlflowClient

    second = demo_run["second"]
    folder = demo_run["folder"] / "report"
    folder.mkdir(exist_ok=True)
    report = Path(
        MlflowClient(demo_run["mlflow"]).download_artifacts(
            second["mlflow_run_id"], "report.html", str(folder)
        )
    )
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    # From a file, with the network refused: the report needs neither a server nor the internet.
    page.route("http*://**", lambda route: route.abort())
    page.goto(report.as_uri())
    page.screenshot(path=str(shots / "report-top.png"))
    page.locator("#drift").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "report-drift.png"))
    text = page.inner_text("body")
    for said in (
        "probability of Chinstrap, SHAP values in log-odds",
        "Great Expectations: passed",
        "expect_column_values_to_be_unique",
        "Global importance",
        "Attribution NDCG",
        f"against run {second['baseline_run_id']}",
        "Top movers: island",
        "time: explain",
        "additivity max error",
        "penguin_id",
        "importance changed by more than 90%: island (\u2212100%)",
        f"The baseline: run {second['baseline_run_id']}",
        "the model's reference, pinned with shapline reference",
        "What each category does",
        "The rows with the highest model output",
        "The rows with the lowest model output",
        "The rows with the nearest the decision threshold",
        "3 from the config",
    ):
        assert said in text, said
    page.locator("#categories").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "report-categories.png"))
    page.locator("#examples").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "report-examples.png"))
    page.screenshot(path=str(shots / "report-full.png"), full_page=True)
    # Every image drew (inlined: nothing to fetch), every waterfall among them, named by the bird.
    broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
    assert broken == 0 and page.evaluate("document.images.length") >= 4
    waterfalls = page.evaluate("[...document.images].map(i => i.alt).filter(a => a.startsWith('waterfall_'))")
    assert len(waterfalls) == 15 and all(name.startswith("waterfall_P") for name in waterfalls)
    assert page.evaluate("[...document.images].some(i => i.alt === 'mean SHAP value per category')")


def test_the_report_opens_in_mlflows_artifact_viewer(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    second = demo_run["second"]
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.goto(
        f"{demo_run['mlflow']}/#/experiments/{second['experiment_id']}/runs/{second['mlflow_run_id']}"
        "/artifacts/report.html"
    )
    frame = page.frame_locator("iframe").first
    frame.get_by_text("Attribution NDCG").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(shots / "mlflow-report.png"))
    assert "probability of Chinstrap" in frame.locator("body").inner_text()


def test_after_deploy_then_serve_the_deployment_page_shows_its_work_queue_ready(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    """`deploy`, then `serve` of the same config: one deployment on one pool, worked by serve's worker,
    so its work queue is Ready, not the red warning of a queue nobody polls."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = f"{demo_run['prefect']}/api"
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while (
            queue := client.read_work_queue_by_name("default", work_pool_name="ui-pool")
        ).status != "READY":
            assert time.monotonic() < deadline, demo_run["serve_log"].read_text()[-3000:]
            time.sleep(1)
        deployment = client.read_deployment(demo_run["deployment"])
    assert deployment.work_pool_name == "ui-pool" and deployment.work_queue_name == queue.name
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    url = f"{demo_run['prefect']}/deployments/deployment/{demo_run['deployment']}"
    text = shown(page, url, "ui-pool", shots / "prefect-deployment.png")
    assert "ui-pool" in text and "default" in text
    assert "Not Ready" not in text and "not ready" not in text.lower()
    pool = f"{demo_run['prefect']}/work-pools/work-pool/ui-pool"
    text = shown(page, pool, "default", shots / "prefect-work-pool.png")
    assert "Ready" in text and "Not Ready" not in text


def test_the_prefect_summary_artifact_says_what_was_explained_and_links_the_run(
    browser: Any, demo_run: dict[str, Any], shots: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    second = demo_run["second"]
    flow_run = (
        MlflowClient(demo_run["mlflow"]).get_run(second["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    )
    with (
        temporary_settings({PREFECT_API_URL: f"{demo_run['prefect']}/api"}),
        get_client(sync_client=True) as client,
    ):
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run]))
        )
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    url = f"{demo_run['prefect']}/artifacts/artifact/{artifact.id}"
    text = shown(page, url, "Explained:", shots / "prefect-artifact.png")
    assert "probability of Chinstrap, SHAP values in log-odds" in text
    link = page.get_by_role("link", name="the run").first
    href = str(link.get_attribute("href"))
    assert href.endswith(
        f"#/experiments/{second['experiment_id']}/runs/{second['mlflow_run_id']}?workflowType=machine_learning"
    )
