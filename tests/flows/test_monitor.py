"""Watching a model over time, end to end: runs compared with their baseline, drift, the report, compare.

One model (the demo's penguin Pipeline, trained on every bird) explained on real data split by island:
Biscoe (Adelie and Gentoo) and Dream (Adelie and Chinstrap: every Chinstrap lives there), so the
attributions honestly differ. The runs share one MLflow store, in order:

1. Biscoe, baseline previous: the first run, no comparison;
2. Dream, on_drift warn: compared with run 1, drift, exit 0;
3. Biscoe, on_drift fail: compared with run 2, drift, exit 3, a Failed flow run, a FINISHED MLflow run;
4. Biscoe again, on_drift fail: compared with run 3, the same data: NDCG 1.0, no drift, exit 0.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from sklearn.metrics import ndcg_score

from shapline.flows.cli import main
from tests.helpers import artifact, flow_run_of

pytestmark = pytest.mark.usefixtures("prefect_server")

THRESHOLD = 0.99


def _cli(args: list[str]) -> tuple[int, dict[str, Any], str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if lines else {}, err.getvalue()


class Scenario:
    def __init__(self, folder: Path, data: Path, model: Path) -> None:
        self.folder = folder
        self.store = f"sqlite:///{folder / 'mlflow.db'}"
        frame = pd.read_csv(data)
        frame.insert(0, "penguin_id", [f"P{i:03d}" for i in range(len(frame))])
        self.islands = {}
        for island in ("Biscoe", "Dream"):
            path = folder / f"{island}.csv"
            frame[frame["island"] == island].to_csv(path, index=False)
            self.islands[island] = path
        self.model = model
        self.results: list[tuple[int, dict[str, Any], str]] = []

    def config(self, island: str, on_drift: str, name: str) -> Path:
        sections = {
            "model": {
                "name": "penguins",
                "kind": "sklearn",
                "path": str(self.model),
                "task": "classification",
                "class_index": 1,
            },
            "data": {
                "source": str(self.islands[island]),
                "target": "species",
                "id_column": "penguin_id",
                "explain_rows": 30,
            },
            "background": {"method": "random", "size": 15, "seed": 0},
            "explainer": {"algorithm": "kernel", "nsamples": 126, "l1_reg": False},
            "shards": {"size": 30, "workers": 1, "cache_dir": str(self.folder / "cache")},
            "output": {"tracking_uri": self.store, "plots": ["bar", "beeswarm", "waterfall"], "top_k": 2},
            "monitor": {"baseline": "previous", "ndcg_threshold": THRESHOLD, "on_drift": on_drift},
        }
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    def run(self, island: str, on_drift: str, name: str) -> tuple[int, dict[str, Any], str]:
        result = _cli(["run", str(self.config(island, on_drift, name)), "--json"])
        self.results.append(result)
        return result


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, penguins: tuple[Path, Path]) -> Scenario:
    data, model = penguins
    scenario = Scenario(tmp_path_factory.mktemp("monitor"), data, model)
    scenario.run("Biscoe", "warn", "first")
    scenario.run("Dream", "warn", "dream")
    scenario.run("Biscoe", "fail", "back")
    scenario.run("Biscoe", "fail", "again")
    return scenario


def _importance(store: str, run_id: str, folder: Path) -> pd.Series:
    table = pd.read_csv(artifact(store, run_id, "global_importance.csv", folder / run_id))
    return table.set_index("feature")["mean_abs"]


def _independent_ndcg(baseline: pd.Series, current: pd.Series) -> float:
    features = sorted(set(baseline.index) | set(current.index))
    return float(
        ndcg_score(
            [baseline.reindex(features, fill_value=0).to_numpy()],
            [current.reindex(features, fill_value=0).to_numpy()],
        )
    )


def test_the_first_run_has_no_baseline_and_says_why(scenario: Scenario, tmp_path: Path) -> None:
    code, summary, _ = scenario.results[0]
    assert code == 0 and summary["drift"] is None and summary["baseline_run_id"] is None
    run = MlflowClient(scenario.store).get_run(summary["mlflow_run_id"])
    assert "shapline.drift" not in run.data.tags and "attribution_ndcg" not in run.data.metrics
    report = artifact(scenario.store, run.info.run_id, "report.html", tmp_path).read_text()
    assert "No comparison: no earlier FINISHED run of penguins" in report


def test_other_birds_drift_against_the_previous_run_measured_independently(
    scenario: Scenario, tmp_path: Path
) -> None:
    (_, first, _), (code, second, err) = scenario.results[0], scenario.results[1]
    assert code == 0, err  # on_drift: warn
    client = MlflowClient(scenario.store)
    run = client.get_run(second["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["shapline.baseline_run_id"] == first["mlflow_run_id"]
    expected = _independent_ndcg(
        _importance(scenario.store, first["mlflow_run_id"], tmp_path),
        _importance(scenario.store, second["mlflow_run_id"], tmp_path),
    )
    assert run.data.metrics["attribution_ndcg"] == pytest.approx(expected, abs=1e-9)
    assert expected < THRESHOLD
    assert second["drift"] is True and run.data.tags["shapline.drift"] == "true"
    assert second["attribution_ndcg"] == pytest.approx(expected, abs=1e-9)
    drift = pd.read_csv(artifact(scenario.store, run.info.run_id, "drift.csv", tmp_path))
    assert list(drift.columns) == [
        "feature",
        "baseline_mean_abs",
        "mean_abs",
        "change",
        "baseline_rank",
        "rank",
        "wasserstein",
    ]
    assert drift["change"].abs().is_monotonic_decreasing
    assert (drift["wasserstein"] >= 0).all()
    assert artifact(scenario.store, run.info.run_id, "plots/drift.png", tmp_path).stat().st_size > 10_000
    assert run.data.params["monitor.on_drift"] == "warn"


def test_fail_ends_the_flow_run_failed_with_one_line_and_the_mlflow_run_finished(
    scenario: Scenario, tmp_path: Path
) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    (_, dream, _), (code, summary, err) = scenario.results[1], scenario.results[2]
    assert code == 3
    assert summary["drift"] is True and summary["status"] == "FINISHED"
    assert summary["baseline_run_id"] == dream["mlflow_run_id"]
    line = err.strip().splitlines()[-1]
    assert line.startswith("shapline: error: attribution drift: NDCG ")
    assert f"< {THRESHOLD:.2f} against run {dream['mlflow_run_id']}; top movers: " in line
    run = MlflowClient(scenario.store).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "shapline.error" not in run.data.tags
    names = {a.path for a in MlflowClient(scenario.store).list_artifacts(run.info.run_id)}
    assert {"shap_values.parquet", "drift.csv", "report.html", "plots"} <= names
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_of(scenario.store, summary))).state
    assert state is not None and state.is_failed()
    assert state.message is not None and "attribution drift: NDCG" in state.message
    assert "Traceback" not in state.message


def test_a_drifted_run_emits_a_prefect_event(scenario: Scenario) -> None:
    from prefect.settings import PREFECT_API_URL

    _, summary, _ = scenario.results[2]
    found: list[dict[str, Any]] = []
    for _ in range(60):
        answer = httpx.post(
            f"{PREFECT_API_URL.value()}/events/filter",
            json={"filter": {"event": {"name": ["shapline.attribution.drift"]}}, "limit": 50},
        )
        found = [
            e for e in answer.json()["events"] if e["payload"]["mlflow_run_id"] == summary["mlflow_run_id"]
        ]
        if found:
            break
        time.sleep(1)
    assert found, "no shapline.attribution.drift event for the failed run"
    event = found[0]
    assert event["resource"]["prefect.resource.id"] == "shapline.model.penguins"
    assert event["payload"]["baseline_run_id"] == summary["baseline_run_id"]
    assert event["payload"]["attribution_ndcg"] == pytest.approx(summary["attribution_ndcg"])
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])


def test_the_same_data_twice_is_ndcg_one_and_no_drift(scenario: Scenario) -> None:
    (_, back, _), (code, summary, err) = scenario.results[2], scenario.results[3]
    assert code == 0, err
    assert summary["baseline_run_id"] == back["mlflow_run_id"]  # a FINISHED run, though its flow run Failed
    assert summary["attribution_ndcg"] == pytest.approx(1.0, abs=1e-12)
    assert summary["drift"] is False
    run = MlflowClient(scenario.store).get_run(summary["mlflow_run_id"])
    assert run.data.tags["shapline.drift"] == "false"


def test_values_carry_the_id_column_and_compare_follows_the_same_rows(
    scenario: Scenario, tmp_path: Path
) -> None:
    first, second = scenario.results[0][1], scenario.results[2][1]  # both on Biscoe: the same birds
    values = pd.read_parquet(
        artifact(scenario.store, first["mlflow_run_id"], "shap_values.parquet", tmp_path)
    )
    assert list(values.columns[:2]) == ["row_id", "penguin_id"]
    assert (
        "penguin_id"
        not in pd.read_csv(
            artifact(scenario.store, first["mlflow_run_id"], "global_importance.csv", tmp_path)
        )["feature"].tolist()
    )
    code, compared, err = _cli(
        [
            "compare",
            first["mlflow_run_id"],
            second["mlflow_run_id"],
            "--tracking-uri",
            scenario.store,
            "--json",
        ]
    )
    assert code == 0, err
    assert compared["attribution_ndcg"] == pytest.approx(1.0, abs=1e-12)
    same = compared["same_rows"]
    assert same["id_column"] == "penguin_id" and same["rows_in_both"] == 30
    assert max(f["max_abs_diff"] for f in same["per_feature"]) == pytest.approx(0.0, abs=1e-12)


def test_compare_prints_the_comparison_of_any_two_runs(scenario: Scenario, tmp_path: Path) -> None:
    first, dream = scenario.results[0][1], scenario.results[1][1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["compare", first["mlflow_run_id"], dream["mlflow_run_id"], "--tracking-uri", scenario.store]
        )
    assert code == 0
    text = out.getvalue()
    logged = MlflowClient(scenario.store).get_run(dream["mlflow_run_id"]).data.metrics["attribution_ndcg"]
    # The verdict against the runs' threshold (monitor.ndcg_threshold), worked out here independently.
    drifted = logged < THRESHOLD
    verdict = "attribution drift" if drifted else "no attribution drift"
    relation = "<" if drifted else ">="
    expected = f"{verdict}: NDCG {logged:.3f} {relation} {THRESHOLD:.2f} against run {first['mlflow_run_id']}"
    assert expected in text.splitlines(), text
    assert "top movers:" in text


def test_a_baseline_that_is_not_a_run_is_one_line_before_any_compute(scenario: Scenario) -> None:
    config = scenario.config("Biscoe", "warn", "bad-baseline")
    code, summary, err = _cli(
        ["run", str(config), "--set", "monitor.baseline=0123456789abcdef0123456789abcdef", "--json"]
    )
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("shapline: error: monitor.baseline: no MLflow run '0123456789abcdef0123456789abcdef'")
    )
    assert summary["status"] == "FAILED"


def test_duplicate_ids_fail_validation_naming_the_key_and_column(scenario: Scenario) -> None:
    frame = pd.read_csv(scenario.islands["Biscoe"])
    frame.loc[frame.index[:2], "penguin_id"] = "P999"
    path = scenario.folder / "duplicate-ids.csv"
    frame.to_csv(path, index=False)
    config = scenario.config("Biscoe", "warn", "duplicate-ids")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", str(config), "--set", f"data.source={path}"])
    assert code == 1
    assert (
        "FAIL: data.id_column: expect_column_values_to_be_unique(column='penguin_id'): 2 unexpected values"
        in out.getvalue()
    )


def test_the_report_is_self_contained(scenario: Scenario, tmp_path: Path) -> None:
    _, summary, _ = scenario.results[2]
    assert summary["report"] == "report.html"
    html = artifact(scenario.store, summary["mlflow_run_id"], "report.html", tmp_path).read_text()
    assert "<script" not in html and 'src="http' not in html and "<link" not in html
    assert html.count("data:image/png;base64,") >= 4
    for said in (
        "probability of Chinstrap, SHAP values in log-odds",
        "Validation",
        "Attribution NDCG",
        "attribution drift: NDCG",
        "penguin_id",
    ):
        assert said in html
    assert np.isfinite(summary["attribution_ndcg"])


def test_the_documented_automation_is_one_prefect_accepts() -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    path = Path(__file__).resolve().parents[2] / "configs" / "automations" / "attribution-drift.yaml"
    automation = AutomationCore.model_validate(yaml.safe_load(path.read_text()))
    assert automation.trigger.expect == {"shapline.attribution.drift"}
    with get_client(sync_client=True) as client:
        created = client.read_automation(client.create_automation(automation))
    assert created is not None and created.name == "shapline attribution drift"
    page = (path.parents[2] / "docs" / "drift-and-report.md").read_text()
    assert "prefect automation create --from-file configs/automations/attribution-drift.yaml" in page
