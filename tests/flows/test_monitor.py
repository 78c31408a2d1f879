"""Watching a model over time, end to end: runs compared with a baseline chosen on purpose, drift, the report,
compare, reference.

One model (the demo's penguin Pipeline, trained on every bird) explained on real data: a sample of every bird
and the Dream island only (Adelie and Chinstrap: every Chinstrap lives there; one island, so `island` explains
nothing there), so the attributions honestly differ. The runs share one MLflow store, in order:

0. every bird, baseline previous: the first run, no comparison; then `shapline reference` pins it;
1. Dream, baseline reference, on_drift warn: compared with run 0, NDCG drift, exit 0;
2. Dream, baseline reference, on_drift fail, NDCG threshold 0.5 but max_importance_change 0.9: island's
   importance fell by 100%, drift though NDCG holds, exit 3, a Failed flow run, a FINISHED MLflow run;
3. every bird again, baseline previous: compared with run 0 (the same settings and rows), not with the Dream
   runs made since: NDCG 1.0, no drift;
4. Dream, baseline previous: compared with run 2 (a FINISHED MLflow run, though its flow run Failed);
5. a 10-row sample of every bird (as a schedule's explain_rows), baseline previous: no earlier run explained
   those rows, so no comparison (not the 30-row runs).
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
LIMIT = 0.9


def _cli(args: list[str]) -> tuple[int, dict[str, Any], str]:
    code, out, err = _cli_text(args)
    lines = out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}, err


def _cli_text(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


class Scenario:
    def __init__(self, folder: Path, data: Path, model: Path) -> None:
        self.folder = folder
        self.store = f"sqlite:///{folder / 'mlflow.db'}"
        frame = pd.read_csv(data)
        frame.insert(0, "penguin_id", [f"P{i:03d}" for i in range(len(frame))])
        self.sources = {"All": folder / "All.csv"}
        frame.to_csv(self.sources["All"], index=False)
        for island in ("Biscoe", "Dream"):
            path = folder / f"{island}.csv"
            frame[frame["island"] == island].to_csv(path, index=False)
            self.sources[island] = path
        self.model = model
        self.results: list[tuple[int, dict[str, Any], str]] = []
        self.pinned: tuple[int, str, str] = (0, "", "")

    def config(self, source: str, on_drift: str, name: str, **monitor: Any) -> Path:
        sections = {
            "model": {
                "name": "penguins",
                "kind": "sklearn",
                "path": str(self.model),
                "task": "classification",
                "class_index": 1,
            },
            "data": {
                "source": str(self.sources[source]),
                "target": "species",
                "id_column": "penguin_id",
                "explain_rows": 30,
            },
            "background": {"method": "random", "size": 15, "seed": 0},
            "explainer": {"algorithm": "kernel", "nsamples": 126, "l1_reg": False},
            "shards": {"size": 30, "workers": 1, "cache_dir": str(self.folder / "cache")},
            "output": {"tracking_uri": self.store, "plots": ["bar", "beeswarm", "waterfall"], "top_k": 2},
            "monitor": {"baseline": "previous", "ndcg_threshold": THRESHOLD, "on_drift": on_drift, **monitor},
        }
        path = self.folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump(sections, sort_keys=False))
        return path

    def run(self, source: str, on_drift: str, name: str, *extra: str, **monitor: Any) -> None:
        config = self.config(source, on_drift, name, **monitor)
        self.results.append(_cli(["run", str(config), "--json", *extra]))


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory, penguins: tuple[Path, Path]) -> Scenario:
    data, model = penguins
    scenario = Scenario(tmp_path_factory.mktemp("monitor"), data, model)
    scenario.run("All", "warn", "first")
    first = scenario.results[0][1]["mlflow_run_id"]
    # Pinned by the start of its id, as a person copies it.
    scenario.pinned = _cli_text(["reference", first[:8], "--tracking-uri", scenario.store])
    scenario.run("Dream", "warn", "dream", baseline="reference")
    scenario.run(
        "Dream", "fail", "moved", baseline="reference", ndcg_threshold=0.5, max_importance_change=LIMIT
    )
    scenario.run("All", "fail", "again")
    scenario.run("Dream", "warn", "dream-again")
    scenario.run("All", "warn", "sample", "--set", "data.explain_rows=10")
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
    assert summary["baseline_reason"].startswith("no earlier FINISHED run of penguins in this experiment has")
    run = MlflowClient(scenario.store).get_run(summary["mlflow_run_id"])
    assert "shapline.drift" not in run.data.tags and "attribution_ndcg" not in run.data.metrics
    report = artifact(scenario.store, run.info.run_id, "report.html", tmp_path).read_text()
    assert "No comparison: no earlier FINISHED run of penguins" in report
    # shap's estimator: what it spent (every row its whole budget), and that its values carry no error.
    accuracy = report.split('<h2 id="accuracy">')[1].split("<h2")[0]
    assert "<dd>shap</dd>" in accuracy and "median 126 " in accuracy and "gives no standard error" in accuracy


def test_reference_pins_a_run_by_the_start_of_its_id_and_reference_runs_compare_with_it(
    scenario: Scenario,
) -> None:
    code, out, err = scenario.pinned
    first = scenario.results[0][1]["mlflow_run_id"]
    assert code == 0, err
    assert out.startswith(f"run {first} (penguins · ") and "is the reference of penguins now" in out
    assert "it explained 30 rows of " in out and "All.csv" in out
    assert MlflowClient(scenario.store).get_run(first).data.tags["shapline.reference"] == "true"
    for _, summary, _ in scenario.results[1:3]:  # the Dream runs with monitor.baseline: reference
        assert summary["baseline_run_id"] == first


def test_pinning_another_reference_replaces_the_first(scenario: Scenario) -> None:
    first, other = scenario.results[0][1]["mlflow_run_id"], scenario.results[3][1]["mlflow_run_id"]
    client = MlflowClient(scenario.store)
    try:
        code, out, _ = _cli_text(["reference", other, "--tracking-uri", scenario.store, "--json"])
        assert code == 0 and f"(it replaces run {first})" in out
        assert json.loads(out.strip().splitlines()[-1])["replaced"] == [first]
        assert "shapline.reference" not in client.get_run(first).data.tags
    finally:
        assert _cli_text(["reference", first, "--tracking-uri", scenario.store])[0] == 0


def test_previous_is_the_latest_run_with_the_same_settings_and_rows(scenario: Scenario) -> None:
    """Run 3 (every bird) came after two Dream runs: its baseline is run 0, the run on the same rows."""
    (_, first, _), (code, again, err) = scenario.results[0], scenario.results[3]
    assert code == 0, err  # on_drift fail, and no drift: the same birds
    assert again["baseline_run_id"] == first["mlflow_run_id"]
    assert again["attribution_ndcg"] == pytest.approx(1.0, abs=1e-12) and again["drift"] is False
    run = MlflowClient(scenario.store).get_run(again["mlflow_run_id"])
    assert run.data.tags["shapline.drift"] == "false"
    tags = MlflowClient(scenario.store).get_run(first["mlflow_run_id"]).data.tags
    assert run.data.tags["shapline.config_identity"] == tags["shapline.config_identity"]
    assert run.data.tags["shapline.row_selection"] == tags["shapline.row_selection"]


def test_a_sample_is_compared_only_with_runs_of_the_same_rows(scenario: Scenario) -> None:
    code, sample, err = scenario.results[5]
    assert code == 0, err
    assert sample["rows_explained"] == 10 and sample["baseline_run_id"] is None
    assert "has the same settings and rows" in sample["baseline_reason"]
    assert "explain_rows 10" in sample["baseline_reason"]


def test_other_birds_drift_against_the_reference_measured_independently(
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
        "relative_change",
    ]
    assert drift["change"].abs().is_monotonic_decreasing
    assert (drift["wasserstein"] >= 0).all()
    assert np.allclose(drift["relative_change"], drift["change"] / drift["baseline_mean_abs"])
    assert artifact(scenario.store, run.info.run_id, "plots/drift.png", tmp_path).stat().st_size > 10_000
    assert run.data.params["monitor.on_drift"] == "warn"


def test_the_baseline_is_named_linked_and_described_in_the_report_and_description(
    scenario: Scenario, tmp_path: Path
) -> None:
    (_, first, _), (_, second, _) = scenario.results[0], scenario.results[1]
    run = MlflowClient(scenario.store).get_run(second["mlflow_run_id"])
    note = run.data.tags["mlflow.note.content"]
    experiment = first["experiment_id"]
    # Inside the MLflow UI showing the description (a local store: whatever port `mlflow ui` has).
    assert (
        f"Baseline: [run {first['mlflow_run_id']}](#/experiments/{experiment}/runs/{first['mlflow_run_id']}?"
        in note
    )
    assert "the model's reference, pinned with shapline reference" in note
    assert "explained 30 rows of " in note and "All.csv" in note
    report_link = (
        f"[report.html](#/experiments/{experiment}/runs/{second['mlflow_run_id']}/artifacts/report.html)"
    )
    assert report_link in note
    assert f"open it with `mlflow ui --backend-store-uri {scenario.store}`" in note
    html = artifact(scenario.store, run.info.run_id, "report.html", tmp_path).read_text()
    page = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{first['mlflow_run_id']}"
    assert (
        f'<h3>The baseline: <a href="{page}?workflowType=machine_learning">run {first["mlflow_run_id"]}</a>'
        in html
    )
    assert f"the link opens once <code>mlflow ui --backend-store-uri {scenario.store}</code> runs" in html
    for said in (
        "the model&#x27;s reference",
        "All.csv",
        "<dt>rows explained</dt><dd>30</dd>",
        "<dt>started</dt>",
    ):
        assert said in html, said


def test_an_importance_that_collapses_is_drift_though_ndcg_holds_and_fail_fails(
    scenario: Scenario, tmp_path: Path
) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client

    (_, first, _), (code, summary, err) = scenario.results[0], scenario.results[2]
    assert code == 3
    assert summary["drift"] is True and summary["status"] == "FINISHED"
    assert summary["attribution_ndcg"] >= 0.5  # NDCG held
    assert summary["baseline_run_id"] == first["mlflow_run_id"]
    assert summary["importance_drift"] == [{"feature": "island", "relative_change": -1.0}]
    line = err.strip().splitlines()[-1]
    assert line.startswith("shapline: error: attribution drift: NDCG ")
    assert (
        f">= 0.50 against run {first['mlflow_run_id']}; importance changed by more than 90%: island (\u2212100%); "
        "top movers: " in line
    )
    run = MlflowClient(scenario.store).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "shapline.error" not in run.data.tags
    assert "importance changed by more than 90%: island (\u2212100%)" in run.data.tags["mlflow.note.content"]
    names = {a.path for a in MlflowClient(scenario.store).list_artifacts(run.info.run_id)}
    assert {"shap_values.parquet", "drift.csv", "report.html", "plots"} <= names
    html = artifact(scenario.store, run.info.run_id, "report.html", tmp_path).read_text()
    assert "importance changed by more than 90%: island (\u2212100%)" in html
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_of(scenario.store, summary))).state
    assert state is not None and state.is_failed()
    assert state.message is not None and "importance changed by more than 90%: island" in state.message
    assert "Traceback" not in state.message


def test_a_drifted_run_emits_a_prefect_event_naming_the_features(scenario: Scenario) -> None:
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
    payload = event["payload"]
    assert payload["baseline_run_id"] == summary["baseline_run_id"] and payload["baseline"] == "reference"
    assert payload["attribution_ndcg"] == pytest.approx(summary["attribution_ndcg"])
    assert payload["max_importance_change"] == LIMIT
    assert payload["importance_drift"] == [{"feature": "island", "relative_change": -1.0}]
    assert "island (\u2212100%)" in payload["message"]
    assert any(r["prefect.resource.role"] == "flow-run" for r in event["related"])


def test_previous_may_be_a_run_whose_flow_run_failed_on_drift(scenario: Scenario) -> None:
    (_, moved, _), (code, summary, err) = scenario.results[2], scenario.results[4]
    assert code == 0, err
    assert summary["baseline_run_id"] == moved["mlflow_run_id"]  # a FINISHED run, though its flow run Failed
    assert summary["attribution_ndcg"] == pytest.approx(1.0, abs=1e-12) and summary["drift"] is False


def test_values_carry_the_id_column_and_compare_follows_the_same_rows(
    scenario: Scenario, tmp_path: Path
) -> None:
    first, again = scenario.results[0][1], scenario.results[3][1]  # both on every bird: the same sample
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
    # Runs named by the start of their ids, as a person copies them.
    arguments = ["compare", first["mlflow_run_id"][:6], again["mlflow_run_id"][:10], "--tracking-uri"]
    code, out, err = _cli_text([*arguments, scenario.store, "--json"])
    assert code == 0, err
    compared = json.loads(out.strip().splitlines()[-1])
    assert compared["run_a"] == first["mlflow_run_id"] and compared["run_b"] == again["mlflow_run_id"]
    assert compared["attribution_ndcg"] == pytest.approx(1.0, abs=1e-12)
    same = compared["same_rows"]
    assert same["id_column"] == "penguin_id" and same["rows_in_both"] == 30
    assert max(f["max_abs_diff"] for f in same["per_feature"]) == pytest.approx(0.0, abs=1e-12)
    # Nothing moved: no "rows that moved most" with +0.00, no top movers.
    assert same["moved_rows"] == [] and "rows that moved most" not in out and "+0.00" not in out
    assert "no row moved: every row's values are the same" in out
    assert "top movers: none (every feature's importance is the same)" in out


def test_compare_prints_the_comparison_of_any_two_runs(scenario: Scenario, tmp_path: Path) -> None:
    first, dream = scenario.results[0][1], scenario.results[1][1]
    code, text, _ = _cli_text(
        ["compare", first["mlflow_run_id"], dream["mlflow_run_id"], "--tracking-uri", scenario.store]
    )
    assert code == 0
    logged = MlflowClient(scenario.store).get_run(dream["mlflow_run_id"]).data.metrics["attribution_ndcg"]
    # The verdict against the runs' threshold (monitor.ndcg_threshold), worked out here independently.
    drifted = logged < THRESHOLD
    verdict = "attribution drift" if drifted else "no attribution drift"
    relation = "<" if drifted else ">="
    expected = f"{verdict}: NDCG {logged:.3f} {relation} {THRESHOLD:.2f} against run {first['mlflow_run_id']}"
    assert expected in text.splitlines(), text
    assert "top movers:" in text and "rows that moved most: P" in text


def test_compare_and_reference_where_there_is_no_store_create_none(
    scenario: Scenario, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    first = scenario.results[0][1]["mlflow_run_id"]
    for command in (["compare", first, first], ["reference", first]):
        code, out, err = _cli_text(command)
        assert code == 2 and out == ""
        assert err == (
            f"shapline: error: {command[0]}: no MLflow store at sqlite:///{tmp_path / 'mlflow.db'} "
            f"({tmp_path / 'mlflow.db'} does not exist): run it in the folder the runs were made from, or give "
            "--tracking-uri (or MLFLOW_TRACKING_URI)\n"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("0123", "no MLflow run id starts with '0123'"),
        ("xyz", "'xyz' is not a run id (32 hex characters, or at least its first 4)"),
        ("0123456789abcdef0123456789abcdef", "no MLflow run '0123456789abcdef0123456789abcdef'"),
    ],
)
def test_an_unknown_run_is_one_line(scenario: Scenario, given: str, said: str) -> None:
    code, _, err = _cli_text(["reference", given, "--tracking-uri", scenario.store])
    assert code == 2 and err.startswith(f"shapline: error: reference: {said}") and err.count("\n") == 1


def test_an_unlike_reference_is_one_line_before_any_compute(scenario: Scenario) -> None:
    """A pinned reference that explained another output (here: another class) cannot be a baseline."""
    client = MlflowClient(scenario.store)
    # Artifacts beside the store, as shapline's own experiments keep them: MLflow's default is ./mlruns in
    # the working folder (the checkout, under pytest).
    experiment = client.create_experiment(
        "shapline/penguins-unlike", (scenario.folder / "mlartifacts").as_uri()
    )
    unlike = client.create_run(
        experiment, tags={"shapline.model": "penguins-unlike", "shapline.reference": "true"}
    )
    for key, value in {
        "model.output": "predict_proba",
        "model.class_index": "2",
        "explainer.units": "log-odds",
    }.items():
        client.log_param(unlike.info.run_id, key, value)
    client.log_param(unlike.info.run_id, "model.class_label", "Gentoo")
    client.set_terminated(unlike.info.run_id)
    config = scenario.config("Dream", "warn", "unlike", baseline="reference")
    code, summary, err = _cli(["run", str(config), "--set", "model.name=penguins-unlike", "--json"])
    assert code == 2 and summary["status"] == "FAILED"
    assert err.strip().splitlines()[-1] == (
        f"shapline: error: monitor.baseline reference: run {unlike.info.run_id}, the reference of penguins-unlike, "
        "explained predict_proba, class_index 2 (Gentoo), log-odds: not what this run explains; pin another with "
        "`shapline reference RUN_ID`"
    )
    [failed] = [r for r in client.search_runs([experiment]) if r.info.run_id != unlike.info.run_id]
    assert failed.info.status == "FAILED" and "rows_explained" not in failed.data.metrics


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
    frame = pd.read_csv(scenario.sources["Biscoe"])
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
    _, summary, _ = scenario.results[1]
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
