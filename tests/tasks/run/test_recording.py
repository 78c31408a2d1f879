"""What a run records: metric keys, importance metrics, params that apply, what was explained in words."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

from shapline.tasks.common.config import parse_config
from shapline.tasks.common.schemas import class_suffixes, distinct_keys, importance_metrics, metric_key
from shapline.tasks.explainers.choice import explained_outputs_in_words
from shapline.tasks.models.predictors import Predictor
from shapline.tasks.run.recording import run_params
from shapline.tasks.tracking.client import TrackedRun, log_inputs


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("importance.bill_length_mm", "importance.bill_length_mm"),
        ("importance.Day Mins", "importance.Day Mins"),
        ("importance.Churn?", "importance.Churn_"),
        ("importance.bill length (mm)", "importance.bill length _mm_"),
        ("importance.größe/Zoll", "importance.gr__e/Zoll"),
    ],
)
def test_metric_keys_keep_what_mlflow_allows_and_replace_the_rest(name: str, key: str) -> None:
    assert metric_key(name) == key


def test_importance_metrics_name_the_class_when_there_are_several() -> None:
    importance = pd.DataFrame(
        {
            "class": ["Adelie", "Gentoo"],
            "feature": ["bill (mm)", "bill (mm)"],
            "mean_abs": [0.5, 0.25],
            "rank": [1, 1],
        }
    )
    assert importance_metrics(importance, "mean_abs") == {
        "importance.Adelie.bill _mm_": 0.5,
        "importance.Gentoo.bill _mm_": 0.25,
    }
    one = importance.drop(columns=["class"]).head(1)
    assert importance_metrics(one, "mean_abs") == {"importance.bill _mm_": 0.5}


def test_the_monitor_params_later_runs_read_back_keep_their_names() -> None:
    """A contract: `compare` and the next runs read monitor.ndcg_threshold back from a run's params."""
    from shapline.tasks.common.schemas import NDCG_THRESHOLD_PARAM

    config = parse_config(
        {
            "model": {"name": "m", "kind": "sklearn", "path": "m.joblib"},
            "data": {"source": "d.csv"},
            "monitor": {"baseline": "none", "ndcg_threshold": 0.8, "on_drift": "fail"},
        }
    )
    params = run_params(config)
    assert NDCG_THRESHOLD_PARAM == "monitor.ndcg_threshold"
    assert {k: v for k, v in params.items() if k.startswith("monitor.")} == {
        "monitor.baseline": "none",
        "monitor.ndcg_threshold": 0.8,
        "monitor.max_importance_change": None,
        "monitor.on_drift": "fail",
    }


def test_params_that_do_not_apply_to_the_run_are_not_logged() -> None:
    config = parse_config(
        {"model": {"name": "m", "kind": "sklearn", "path": "m.joblib"}, "data": {"source": "d.csv"}}
    )
    params = run_params(config)
    assert "shards.address" not in params and params["shards.runner"] == "thread"
    dask = config.model_copy(update={"shards": config.shards.model_copy(update={"runner": "dask"})})
    assert "shards.address" in run_params(dask)


class _Fake(Predictor):
    def __init__(self, labels: list[str] | None) -> None:
        self.name, self.method, self.class_labels = "m", "predict_proba", labels

    def predict(self, frame: pd.DataFrame) -> object:  # type: ignore[override]
        raise AssertionError("not called")


@pytest.mark.parametrize(
    ("labels", "width", "class_index", "method", "task", "link", "said"),
    [
        (
            ["Adelie", "Chinstrap", "Gentoo"],
            3,
            1,
            "predict_proba",
            "classification",
            "logit",
            [("probability of Chinstrap", "P(Chinstrap)", "log-odds")],
        ),
        (
            ["no", "yes"],
            2,
            1,
            "predict_proba",
            "classification",
            "identity",
            [("probability of yes", "P(yes)", "probability")],
        ),
        (
            ["no", "yes"],
            2,
            None,
            "decision_function",
            "classification",
            "identity",
            [
                ("decision function of no", "margin(no)", "raw margin"),
                ("decision function of yes", "margin(yes)", "raw margin"),
            ],
        ),
        (
            None,
            1,
            1,
            "predict",
            "regression",
            "identity",
            [("prediction", "prediction", "units of the target")],
        ),
    ],
)
def test_what_was_explained_in_words(
    labels: list[str] | None,
    width: int,
    class_index: int | None,
    method: str,
    task: str,
    link: str,
    said: list[tuple[str, str, str]],
) -> None:
    described = explained_outputs_in_words(_Fake(labels), width, class_index, method, task, link)
    assert [(d.output, d.short, d.units) for d in described] == said


@pytest.mark.parametrize(
    "features",
    [
        ["bill (mm)", "bill [mm]", "bill {mm}"],
        ["rate%", "rate#", "rate_"],
        ["体重(公斤)", "身高(厘米)", "年龄(岁数)", "收入(千元)", "距离(公里)"],
        ["../../etc/passwd", "a//b", "x/", "./y", ".."],
        ["n" * 300, "n" * 299 + "m"],
    ],
)
def test_every_feature_gets_its_own_legal_importance_metric(features: list[str]) -> None:
    """Names that clean up alike never merge into one metric, and MLflow accepts every key."""
    from mlflow.utils.validation import _validate_metric_name

    for several in (False, True):
        table = pd.DataFrame({"feature": features, "mean_abs": np.arange(len(features), dtype=float)})
        if several:
            table = pd.concat([table.assign(**{"class": "yes/no"}), table.assign(**{"class": "yes_no"})])
        metrics = importance_metrics(table, "mean_abs")
        assert len(metrics) == len(table)
        assert sorted(metrics.values()) == sorted(table["mean_abs"])
        for key in metrics:
            _validate_metric_name(key)  # raises on an illegal key
            assert len(key) <= 250


def test_a_legal_name_keeps_its_key_and_only_colliding_names_get_a_digest() -> None:
    keys = distinct_keys(["importance.a_b", "importance.a?b", "importance.c(d)"])
    assert keys["importance.a_b"] == "importance.a_b"
    assert keys["importance.a?b"].startswith("importance.a_b-") and len(keys["importance.a?b"]) == 23
    assert keys["importance.c(d)"] == "importance.c_d_"  # altered but alone: the documented key


def test_class_file_suffixes_are_unique_even_when_labels_clean_up_alike() -> None:
    suffixes = class_suffixes(["yes/no", "yes_no", "Yes_No", "maybe"])
    assert len(set(map(str.lower, suffixes.values()))) == 4
    assert suffixes["Yes_No"] == "_Yes_No" and suffixes["maybe"] == "_maybe"  # first sorted keeps itself
    assert class_suffixes(["only"]) == {"only": ""}


def test_runs_that_log_the_same_data_at_once_all_have_it_as_their_input(
    tmp_path: Path, mlflow_store: str
) -> None:
    """MLflow inserts a dataset it did not find without a lock: runs of the same data in one experiment that
    log it together collide on its unique key (18 of 60 calls failed here before log_inputs tried again)."""
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("together", (tmp_path / "artifacts").as_uri())
    runs = [TrackedRun(mlflow_store, experiment, client.create_run(experiment).info.run_id) for _ in range(4)]
    failures: list[BaseException] = []

    def log(run: TrackedRun, digest: str, barrier: threading.Barrier) -> None:
        dataset = Dataset(name="cancer.csv", digest=digest, source_type="local", source="/data/cancer.csv")
        barrier.wait()
        try:
            log_inputs(run, [DatasetInput(dataset, [InputTag("mlflow.data.context", "explain")])])
        except BaseException as exc:
            failures.append(exc)

    digests = [f"{n:016x}" for n in range(15)]
    for digest in digests:  # fifteen rounds: each a new dataset that the four runs log at once
        barrier = threading.Barrier(len(runs))
        threads = [threading.Thread(target=log, args=(run, digest, barrier)) for run in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    for run in runs:
        logged = [entry.dataset.digest for entry in client.get_run(run.run_id).inputs.dataset_inputs]
        assert sorted(logged) == digests
