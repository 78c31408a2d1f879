"""What a hostile or broken input does to a run, through the real CLI: it never lies, never runs script.

Names that are markup, that clean up alike or that read as paths; class labels that make one file name; a
model that returns NaN, a third column or probabilities past 1; a model file replaced mid-run; ids with
leading zeros; reserved names and impossible settings; a full disk. Each either runs FINISHED with every
name kept apart and inert, or fails with one line naming the key, column, model or folder, and no
FINISHED run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from shapline.flows.cli import main
from tests.helpers import all_runs, artifact, flow_run_logs, run_cli
from tests.misbehaving import Misbehaving

pytestmark = pytest.mark.usefixtures("prefect_server")

XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>']
ALIKE = ["bill (mm)", "bill [mm]", "bill {mm}", "rate%", "rate#"]
PATHS = ["../../etc/passwd"]
CJK = ["体重公斤", "身高厘米", "年龄岁数", "收入千元", "距离公里"]  # same length: all clean up to "____"
NUMERIC = [*XSS, *ALIKE, *PATHS, *CJK]
TEXT = "tag"
LABELS = ["yes/no", "yes_no"]  # clean up to the same file name


def hostile_frame(rows: int = 120) -> pd.DataFrame:
    """Breast-cancer numbers under hostile names, a text column of markup, a target of alike labels."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.iloc[:rows, : len(NUMERIC)].copy()
    frame.columns = NUMERIC
    values = [*XSS, "plain"]
    frame[TEXT] = [values[i % 3] for i in range(rows)]
    frame["customer"] = [f"{i:06d}" for i in range(rows)]
    frame["target"] = [LABELS[int(t)] for t in bunch.target[:rows]]
    return frame


def hostile_model(frame: pd.DataFrame) -> Any:
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    encode = make_column_transformer(
        (StandardScaler(), NUMERIC), (OneHotEncoder(handle_unknown="ignore"), [TEXT])
    )
    features = frame[[*NUMERIC, TEXT]]
    return make_pipeline(encode, LogisticRegression(max_iter=1000)).fit(features, frame["target"])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("hostile")
    frame = hostile_frame()
    data, model = folder / "hostile.csv", folder / "hostile.joblib"
    frame.to_csv(data, index=False)
    joblib.dump(hostile_model(frame), model)
    return data, model, frame


def hostile_config(
    write_config: Callable[..., Path], data_path: Path, model_path: Path, **overrides: Any
) -> Path:
    sections: dict[str, Any] = {
        "model": {"name": "hostile", "kind": "sklearn", "path": str(model_path), "class_index": None},
        "data": {
            "source": str(data_path),
            "target": "target",
            "id_column": "customer",
            "explain_rows": 12,
            "features": [*NUMERIC, TEXT],
        },
        "background": {"method": "random", "size": 8, "seed": 0},
        "explainer": {"algorithm": "kernel", "nsamples": 60, "l1_reg": False},
        "shards": {"size": 6, "workers": 2},
        "output": {"top_k": 2},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return write_config(**sections)


def _one_error(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("shapline: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def _no_finished_run(store: str) -> None:
    runs = all_runs(store)
    assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]
    assert all("shapline.error" in r.data.tags for r in runs)


def test_hostile_names_stay_apart_and_inert_in_every_table_metric_and_file(
    write_config: Callable[..., Path],
    hostile: tuple[Path, Path, pd.DataFrame],
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, model, frame = hostile
    config = hostile_config(write_config, data, model)
    code, first, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and first["status"] == "FINISHED", err
    client = MlflowClient(mlflow_store)
    run = client.get_run(first["mlflow_run_id"])

    # One importance metric per (class, feature): names that clean up alike are never merged.
    importance = pd.read_csv(artifact(mlflow_store, run.info.run_id, "global_importance.csv", tmp_path))
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("importance.")}
    assert len(metrics) == len(importance) == 2 * len(NUMERIC + [TEXT])
    assert sorted(metrics.values()) == pytest.approx(sorted(importance["mean_abs"]))
    assert set(importance["feature"]) == {*NUMERIC, TEXT}  # the true names in the table

    # One file per class, though both labels make the file name yes_no.
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert len([f for f in files if f.startswith("plots/beeswarm_")]) == 2
    assert len([f for f in files if f.startswith("plots/force_")]) == 2
    assert (
        len([f for f in files if f.startswith("plots/waterfall_")]) == 12
    )  # 2 x (2 highest, lowest, nearest)

    # The values keep every name, and the ids exactly as the file writes them.
    values = pd.read_parquet(artifact(mlflow_store, run.info.run_id, "shap_values.parquet", tmp_path))
    assert {*NUMERIC, TEXT} <= set(values.columns)
    assert values["customer"].str.fullmatch(r"\d{6}").all()
    assert set(values["customer"]) <= set(frame["customer"])

    # Markup names and values are data in the force plots' script and text in the report.
    for name in [f for f in files if f.endswith(".html")] + ["report.html"]:
        page = artifact(mlflow_store, run.info.run_id, name, tmp_path / "pages").read_text()
        scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
        assert len(scripts) == (2 if name.startswith("plots/force") else 0), name
        for markup in ("<script>alert", "<img src=x"):
            assert markup not in page.replace(scripts[0] if scripts else "", ""), name
        assert "Content-Security-Policy" in page

    # The run's description (markdown MLflow renders) says the names as text.
    note = run.data.tags["mlflow.note.content"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in note and "<script" not in note and "<img" not in note

    # A second run is compared with the first, class by class.
    code, second, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0 and second["baseline_run_id"] == first["mlflow_run_id"], err
    ndcg = {
        k for k in client.get_run(second["mlflow_run_id"]).data.metrics if k.startswith("attribution_ndcg.")
    }
    assert len(ndcg) == 2


def test_the_pickle_is_said_to_be_trusted_code(
    write_config: Callable[..., Path],
    hostile: tuple[Path, Path, pd.DataFrame],
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, model, _ = hostile
    config = hostile_config(write_config, data, model)
    code = main(["validate", str(config)])
    out = capsys.readouterr().out
    assert code == 0 and "warning: model.path" in out and "is a pickle" in out
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    said = [line for line in flow_run_logs(mlflow_store, summary) if "is a pickle" in line]
    assert len(said) == 1 and "load only files you trust" in said[0]


@pytest.fixture
def cancer_pipeline(cancer_data: Path) -> Iterator[Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.read_csv(cancer_data)
    yield make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        frame.drop(columns=["malignant"]), frame["malignant"]
    )


def cancer_config(write_config: Callable[..., Path], data: Path, model_path: Path, **overrides: Any) -> Path:
    sections: dict[str, Any] = {
        "model": {"name": "cancer", "kind": "sklearn", "path": str(model_path)},
        "data": {"source": str(data), "target": "malignant", "explain_rows": 20},
        "background": {"method": "random", "size": 10, "seed": 0},
        "explainer": {"algorithm": "kernel", "nsamples": 40, "l1_reg": False},
        "shards": {"size": 10, "workers": 1},
        "output": {"plots": ["bar"]},
    }
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return write_config(**sections)


@pytest.mark.parametrize(
    ("mode", "runner", "message"),
    [
        (
            "nan",
            "thread",
            r"explaining row_id \d+: model cancer: predict_proba\(\) returned \d+ NaN or infinite outputs for \d+ of",
        ),
        (
            "nan",
            "process",
            r"explaining row_id \d+: model cancer: predict_proba\(\) returned \d+ NaN or infinite",
        ),
        (
            "wide",
            "thread",
            r"predict_proba\(\) returned 3 outputs per row in one call, where it returned 2 when the run probed",
        ),
        (
            "outside",
            "thread",
            r"predict_proba\(\) returned [\d.]+, not a probability in \[0, 1\].*set explainer\.link identity",
        ),
    ],
)
def test_a_model_that_returns_what_it_must_not_fails_the_run_in_one_line(
    mode: str,
    message: str,
    runner: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    cancer_pipeline: Any,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "model.joblib"
    joblib.dump(Misbehaving(cancer_pipeline, mode), path)
    config = cancer_config(write_config, cancer_data, path, shards={"runner": runner})
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1 and summary["status"] == "FAILED"
    assert re.search(message, _one_error(err)), _one_error(err)
    _no_finished_run(mlflow_store)


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_a_model_file_replaced_mid_run_is_refused_not_explained(
    runner: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    cancer_pipeline: Any,
    mlp_model: Path,
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A retrain writes the model's path while the run explains it: the shards after it must not explain
    the new model under the old one's sha256 (40 of 60 rows did, before)."""
    path = tmp_path / "model.joblib"
    joblib.dump(Misbehaving(cancer_pipeline, "retrain", str(path), str(mlp_model)), path)
    config = cancer_config(write_config, cancer_data, path, shards={"runner": runner, "workers": 1})
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert Path(f"{path}.replaced").exists(), "the retrain happened during the run"
    assert code == 1 and summary["status"] == "FAILED"
    assert re.search(
        r"model\.path: .*model\.joblib changed: its sha256 is \w+\.\.\., not the \w+\.\.\.", _one_error(err)
    )
    _no_finished_run(mlflow_store)


def test_values_that_do_not_add_up_fail_the_run(
    write_config: Callable[..., Path],
    cancer_data: Path,
    xgb_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # TreeSHAP on a float32 XGBoost model adds up to ~1e-7: a tolerance below that must stop the run.
    config = cancer_config(
        write_config,
        cancer_data,
        xgb_model,
        model={"kind": "xgboost"},
        explainer={"algorithm": "tree", "additivity_tolerance": 1e-12},
    )
    code, _, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1
    assert re.search(
        r"additivity: row_id \d+: .* above explainer\.additivity_tolerance 1e-12", _one_error(err)
    )
    _no_finished_run(mlflow_store)


@pytest.mark.parametrize(
    ("overrides", "code", "message"),
    [
        (
            ["explainer.l1_reg=num_features(0)"],
            2,
            r"explainer\.l1_reg: num_features\(k\) selects k >= 1 features",
        ),
        (["data.seed=-1"], 2, r"data\.seed: Input should be greater than or equal to 0, got -1"),
        (
            ["background.seed=4294967296"],
            2,
            r"background\.seed: Input should be less than or equal to 4294967295",
        ),
        (
            ["data.target=mean_radius", "background.method=stratified"],
            1,
            r"background\.method stratified: data\.target 'mean_radius' has \d+ distinct values, more than background\.size 10",
        ),
    ],
)
def test_impossible_settings_are_refused_by_key(
    overrides: list[str],
    code: int,
    message: str,
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = cancer_config(write_config, cancer_data, mlp_model)
    sets = [arg for override in overrides for arg in ("--set", override)]
    for command in ("validate", "run"):
        got, _, err = run_cli([command, str(config), *sets, "--json"], capsys)
        assert got == code, err
        assert re.search(message, _one_error(err)), _one_error(err)
    _no_finished_run(mlflow_store)


def test_a_feature_named_like_a_column_shapline_adds_is_refused(
    write_config: Callable[..., Path],
    cancer_data: Path,
    tmp_path: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from sklearn.linear_model import LogisticRegression

    frame = pd.read_csv(cancer_data).rename(columns={"mean_area": "shapline_weight"})
    data, model = tmp_path / "weights.csv", tmp_path / "weights.joblib"
    frame.to_csv(data, index=False)
    joblib.dump(
        LogisticRegression(max_iter=1000).fit(frame.drop(columns=["malignant"]), frame["malignant"]), model
    )
    config = cancer_config(write_config, data, model, background={"method": "kmeans", "size": 5})
    code, _, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1
    assert re.search(r"data\.features: 'shapline_weight': a name shapline gives a column", _one_error(err))
    _no_finished_run(mlflow_store)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 KB file system (tmpfs), for a disk that fills up; needs root, as this project's CI has."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_shard_store_is_named_with_its_setting(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tiny_disk: Path,
    mlflow_store: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = cancer_config(write_config, cancer_data, mlp_model, shards={"cache_dir": str(tiny_disk)})
    code, _, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1
    line = _one_error(err)
    assert re.search(
        rf"no space left on device: the shard store \(shards\.cache_dir.*\): {tiny_disk}/\w+", line
    ), line
    _no_finished_run(mlflow_store)


def test_a_full_scratch_folder_is_named_with_tmpdir(
    write_config: Callable[..., Path],
    cancer_data: Path,
    mlp_model: Path,
    tiny_disk: Path,
    mlflow_store: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import tempfile

    # What TMPDIR sets for a new process (this one read TMPDIR when it started).
    monkeypatch.setattr(tempfile, "tempdir", str(tiny_disk))
    config = cancer_config(write_config, cancer_data, mlp_model)
    code, _, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 1
    line = _one_error(err)
    assert re.search(
        rf"no space left on device: the run's scratch folder \(TMPDIR\): {tiny_disk}/shapline-", line
    ), line
    _no_finished_run(mlflow_store)


def test_ids_with_leading_zeros_are_kept_as_the_file_writes_them(
    write_config: Callable[..., Path],
    hostile: tuple[Path, Path, pd.DataFrame],
    mlflow_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, model, frame = hostile
    config = hostile_config(
        write_config, data, model, data={"explain_rows": "all"}, output={"plots": ["bar"]}
    )
    code, summary, err = run_cli(["run", str(config), "--json"], capsys)
    assert code == 0, err
    values = pd.read_parquet(
        artifact(mlflow_store, summary["mlflow_run_id"], "shap_values.parquet", tmp_path)
    )
    assert values["customer"].iloc[0] == "000000"
    assert values.drop_duplicates("customer")["customer"].tolist() == frame["customer"].tolist()
    assert json.loads(json.dumps(values["customer"].iloc[:3].tolist())) == ["000000", "000000", "000001"]


def test_hostile_fixture_is_hostile() -> None:
    """The fixture's names do collide and do read as markup, so the tests above can fail."""
    from shapline.tasks.common.schemas import metric_key

    assert len({metric_key(name) for name in ALIKE}) < len(ALIKE)
    assert len({metric_key(name) for name in CJK}) == 1
    assert np.all([("<" in name) for name in XSS])
    assert shutil.which("mount") is not None
