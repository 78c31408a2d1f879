"""Markup in a column name or a text value, opened as a person opens a run's pages: from a file and inside
MLflow's artifact viewer, in headless Chromium. No dialog opens, no page error, and the string is text.

Run with `.venv/bin/pytest -m browser` (see tests/ui/test_browser.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import pytest
from mlflow.tracking import MlflowClient

from tests.flows.test_hostile import XSS, hostile_config, hostile_frame, hostile_model
from tests.helpers import free_port, run_cli, wait_for
from tests.ui.conftest import start

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]
BIN = Path(sys.executable).parent


@pytest.fixture
def hostile_run(
    write_config: Callable[..., Path], tmp_path: Path, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[dict[str, Any]]:
    frame = hostile_frame()
    data, model = tmp_path / "hostile.csv", tmp_path / "hostile.joblib"
    frame.to_csv(data, index=False)
    joblib.dump(hostile_model(frame), model)
    code, summary, err = run_cli(["run", str(hostile_config(write_config, data, model)), "--json"], capsys)
    assert code == 0, err
    port = free_port()
    server = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            mlflow_store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        tmp_path / "mlflow.log",
        dict(os.environ),
        tmp_path,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server)
        yield {"summary": summary, "mlflow": f"http://127.0.0.1:{port}", "store": mlflow_store}
    finally:
        server.terminate()
        server.wait(timeout=30)


def _watch(page: Any) -> tuple[list[str], list[str]]:
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    return dialogs, errors


def test_markup_in_names_and_values_is_text_in_every_page(
    browser: Any, hostile_run: dict[str, Any], tmp_path: Path, shots: Path
) -> None:
    summary = hostile_run["summary"]
    client = MlflowClient(hostile_run["store"])
    run_id = summary["mlflow_run_id"]
    pages = [
        "report.html",
        *(a.path for a in client.list_artifacts(run_id, "plots") if a.path.endswith(".html")),
    ]
    assert len(pages) == 3  # the report and one force plot per class
    for name in pages:
        local = Path(client.download_artifacts(run_id, name, str(tmp_path / "pages")))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs, errors = _watch(page)
        page.goto(local.as_uri())
        page.wait_for_timeout(1500)
        page.mouse.move(400, 250)  # the force plot draws its labels on hover
        page.wait_for_timeout(500)
        page.screenshot(path=str(shots / f"hostile-{Path(name).stem}.png"), full_page=True)
        text = page.inner_text("body")
        assert dialogs == [] and errors == [], (name, dialogs, errors)
        for markup in XSS:
            assert markup in text, (name, markup)
        if name != "report.html":
            assert page.locator("svg").count() > 0, f"{name}: the force plot did not draw"
        page.close()


def test_the_pages_are_inert_inside_mlflows_artifact_viewer(
    browser: Any, hostile_run: dict[str, Any], shots: Path
) -> None:
    summary = hostile_run["summary"]
    client = MlflowClient(hostile_run["store"])
    run_id = summary["mlflow_run_id"]
    force = next(a.path for a in client.list_artifacts(run_id, "plots") if a.path.endswith(".html"))
    overview = browser.new_page(viewport={"width": 1440, "height": 1100})
    dialogs, errors = _watch(overview)
    # The run's description (markdown MLflow renders) names the top features.
    overview.goto(f"{hostile_run['mlflow']}/#/experiments/{summary['experiment_id']}/runs/{run_id}")
    overview.get_by_text("Top features").first.wait_for(timeout=60_000)
    overview.wait_for_timeout(1500)
    overview.screenshot(path=str(shots / "hostile-mlflow-overview.png"), full_page=True)
    assert dialogs == [], dialogs
    assert any(markup in overview.inner_text("body") for markup in XSS)
    overview.close()
    for name in ("report.html", force):
        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        dialogs, errors = _watch(page)
        page.goto(
            f"{hostile_run['mlflow']}/#/experiments/{summary['experiment_id']}/runs/{run_id}/artifacts/{name}"
        )
        frame = page.frame_locator("iframe").first
        frame.locator("body").wait_for(timeout=60_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(shots / f"hostile-mlflow-{Path(name).stem}.png"))
        assert dialogs == [], (name, dialogs)
        assert XSS[0] in frame.locator("body").inner_text(), name
        page.close()
