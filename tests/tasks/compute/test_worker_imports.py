"""A worker that explains a shard loads what computing needs, not plotting, MLflow or Great Expectations."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shapline.tasks.common.config import ExplainerConfig, ShardsConfig, SklearnModel
from shapline.tasks.compute.runners import ShardRunner, open_runner
from shapline.tasks.compute.shards import ShardJob
from shapline.tasks.data.background import Background
from tests.misbehaving import ModulesWitness


@pytest.fixture(scope="module")
def witnessed(tmp_path_factory: pytest.TempPathFactory) -> tuple[SklearnModel, pd.DataFrame, Path]:
    folder = tmp_path_factory.mktemp("witness")
    bunch = load_breast_cancer(as_frame=True)
    rows = bunch.data.iloc[:, :6]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(rows, bunch.target)
    path = folder / "model.joblib"
    joblib.dump(ModulesWitness(model, str(folder)), path)
    return SklearnModel(name="witness", kind="sklearn", path=str(path)), rows, folder


@pytest.fixture(params=["process", "dask"])
def runner(
    request: pytest.FixtureRequest, witnessed: tuple[SklearnModel, pd.DataFrame, Path]
) -> Iterator[ShardRunner]:
    model, _, _ = witnessed
    with open_runner(ShardsConfig(runner=request.param, workers=1), model, 1, "witness") as opened:
        opened.wait_ready()
        yield opened


def test_a_worker_explaining_a_shard_never_imports_plotting_mlflow_or_gx(
    runner: ShardRunner, witnessed: tuple[SklearnModel, pd.DataFrame, Path]
) -> None:
    model, rows, folder = witnessed
    before = set(folder.glob("modules-*.json"))
    job = ShardJob(
        index=0,
        rows=rows.iloc[:3],
        background=Background(frame=rows.iloc[100:110]),
        model=model,
        explainer=ExplainerConfig(nsamples=40, l1_reg=False),
        algorithm="kernel",
        link="logit",
        threads=1,
        outputs=2,
    )
    values = runner.compute(job)
    assert values.values.shape == (3, 6, 1)
    [written] = set(folder.glob("modules-*.json")) - before  # the worker's, not this process's
    assert int(written.stem.split("-")[1]) != os.getpid()
    assert json.loads(written.read_text()) == [], f"{type(runner).__name__} worker imported them"
    if type(runner).__name__ == "ProcessRunner":
        # A pool's workers are forks of a fork server that loaded the engine's compiled code: no worker
        # starts LLVM (~0.2 s) in its first shard.
        loaded = json.loads((folder / f"compiled-{written.stem.split('-')[1]}.json").read_text())
        assert loaded >= 4  # float32, float64, int64 (the extension columns' positions too), bool


def test_the_witness_sees_what_this_process_has(witnessed: tuple[SklearnModel, pd.DataFrame, Any]) -> None:
    """The same model called here, where the flow's libraries are loaded, does report them: the test above
    can fail."""
    model, rows, folder = witnessed
    import mlflow  # noqa: F401 - as a flow process has it

    joblib.load(model.path).predict_proba(rows.iloc[:2])
    mine = json.loads((folder / f"modules-{os.getpid()}.json").read_text())
    assert "mlflow" in mine
