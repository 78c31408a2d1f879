from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import shap

from shapline.tasks.common.config import ExplainerConfig
from shapline.tasks.common.errors import ExplainError, ModelError
from shapline.tasks.common.schemas import values_columns
from shapline.tasks.compute.shards import plan_shards
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.choice import resolve_explainer
from shapline.tasks.explainers.explain import (
    ModelFunction,
    ShardValues,
    explain_rows,
    row_seed,
)
from shapline.tasks.models.predictors import LocalPredictor, Predictor
from tests.helpers import exact_shapley


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


@pytest.fixture(scope="module")
def cancer(cancer_data: Path) -> pd.DataFrame:
    return pd.read_csv(cancer_data)


@pytest.fixture(scope="module")
def features(cancer: pd.DataFrame) -> pd.DataFrame:
    return cancer.drop(columns=["malignant"])


def test_shards_split_rows_in_order() -> None:
    shards = plan_shards([3, 5, 8, 9, 10], 2)
    assert [s.row_ids.tolist() for s in shards] == [[3, 5], [8, 9], [10]]
    assert [s.index for s in shards] == [0, 1, 2]


def test_row_seed_depends_only_on_seed_and_row() -> None:
    # The same in another process with another hash seed: resume and the shard store depend on it.
    import subprocess
    import sys

    elsewhere = subprocess.run(
        [
            sys.executable,
            "-c",
            "from shapline.tasks.explainers.explain import row_seed; print(row_seed(0, 7))",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )
    assert int(elsewhere.stdout) == row_seed(0, 7)
    assert len({row_seed(0, 7), row_seed(1, 7), row_seed(0, 8)}) == 3


def test_kernel_with_every_coalition_equals_exact_shapley(mlp_model: Path, features: pd.DataFrame) -> None:
    """M = 8 features, nsamples >= 2^M: the kernel estimate must be the exact Shapley value in logit space."""
    model = joblib.load(mlp_model)
    predictor = LocalPredictor("mlp", model, "predict_proba")
    background = features.iloc[:6]
    rows = features.iloc[100:103]
    config = ExplainerConfig(algorithm="kernel", nsamples=2**8, l1_reg=False)
    result = explain_rows(rows, Background(frame=background), predictor, config, "logit", 1)
    function = ModelFunction(predictor, rows, [1], "logit")
    for position in range(len(rows)):
        expected = exact_shapley(
            lambda x: function(x)[:, 0], rows.to_numpy()[position], background.to_numpy(), logit
        )
        np.testing.assert_allclose(result.values[position, :, 0], expected, atol=1e-6)
    additivity = result.base_values + result.values.sum(axis=1) - result.model_output
    assert np.abs(additivity).max() < 1e-9


def test_exact_explainer_equals_enumeration(mlp_model: Path, features: pd.DataFrame) -> None:
    model = joblib.load(mlp_model)
    predictor = LocalPredictor("mlp", model, "predict_proba")
    background, rows = features.iloc[:5], features.iloc[200:202]
    result = explain_rows(
        rows, Background(frame=background), predictor, ExplainerConfig(algorithm="exact"), "identity", 1
    )
    function = ModelFunction(predictor, rows, [1], "identity")
    for position in range(len(rows)):
        expected = exact_shapley(
            lambda x: function(x)[:, 0], rows.to_numpy()[position], background.to_numpy()
        )
        np.testing.assert_allclose(result.values[position, :, 0], expected, atol=1e-6)


def test_tree_equals_shap_tree_explainer_in_log_odds(xgb_model: Path, features: pd.DataFrame) -> None:
    model = joblib.load(xgb_model)
    predictor = LocalPredictor("xgb", model, "predict_proba")
    rows = features.iloc[:40]
    result = explain_rows(
        rows, Background(frame=features.iloc[:10]), predictor, ExplainerConfig(), "logit", 1
    )
    reference = shap.TreeExplainer(model)
    assert result.algorithm == "tree" and result.link == "logit"
    np.testing.assert_allclose(result.values[:, :, 0], reference.shap_values(rows), atol=1e-6)
    np.testing.assert_allclose(result.model_output[:, 0], model.predict(rows, output_margin=True), atol=1e-6)
    assert np.abs(result.base_values + result.values.sum(axis=1) - result.model_output).max() < 1e-4


def test_tree_class_zero_of_a_binary_model_is_the_negative(xgb_model: Path, features: pd.DataFrame) -> None:
    predictor = LocalPredictor("xgb", joblib.load(xgb_model), "predict_proba")
    rows = features.iloc[:5]
    one = explain_rows(rows, Background(frame=rows), predictor, ExplainerConfig(), "logit", 1)
    both = explain_rows(rows, Background(frame=rows), predictor, ExplainerConfig(), "logit", None)
    assert both.labels == ["0", "1"]
    np.testing.assert_allclose(both.values[:, :, 0], -one.values[:, :, 0])
    np.testing.assert_allclose(both.values[:, :, 1], one.values[:, :, 0])


def test_linear_model_uses_linear_explainer(features: pd.DataFrame, cancer: pd.DataFrame) -> None:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=5000).fit(features, cancer["malignant"])
    predictor = LocalPredictor("lr", model, "predict_proba")
    rows, background = features.iloc[:20], features.iloc[20:120]
    result = explain_rows(rows, Background(frame=background), predictor, ExplainerConfig(), "logit", 1)
    reference = shap.LinearExplainer(model, background).shap_values(rows)
    assert result.algorithm == "linear"
    np.testing.assert_allclose(result.values[:, :, 0], reference, atol=1e-9)
    np.testing.assert_allclose(result.model_output[:, 0], model.decision_function(rows))


def test_multiclass_kernel_gives_values_per_class(penguins: tuple[Path, Path]) -> None:
    data_path, model_path = penguins
    data = pd.read_csv(data_path).drop(columns=["species"])
    predictor = LocalPredictor("penguins", joblib.load(model_path), "predict_proba")
    result = explain_rows(
        data.iloc[[0, 3, 200]],
        Background(frame=data.iloc[:20]),
        predictor,
        ExplainerConfig(algorithm="auto"),
        "logit",
        None,
    )
    assert result.algorithm == "kernel"
    assert result.labels == ["Adelie", "Chinstrap", "Gentoo"]
    assert result.values.shape == (3, 7, 3)
    frame = result.to_table().to_pandas()
    assert list(frame["class"][:3]) == ["Adelie", "Chinstrap", "Gentoo"] and list(frame["row_id"][:3]) == [
        0,
        0,
        0,
    ]
    assert np.abs(result.base_values + result.values.sum(axis=1) - result.model_output).max() < 1e-9


def test_sampled_kernel_is_deterministic_under_concurrent_threads(
    mlp_model: Path, features: pd.DataFrame
) -> None:
    """nsamples << 2^M, so rows draw random coalitions: threads must not change anyone's draw."""
    predictor = LocalPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    background = Background(frame=features.iloc[:10])
    config = ExplainerConfig(algorithm="kernel", nsamples=60, seed=4)
    parts = [features.iloc[i : i + 3] for i in range(0, 12, 3)]
    alone = [explain_rows(p, background, predictor, config, "logit", 1).values for p in parts]
    together: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        together[i] = explain_rows(parts[i], background, predictor, config, "logit", 1).values

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, values in enumerate(alone):
        np.testing.assert_array_equal(together[i], values)
    whole = explain_rows(features.iloc[:12], background, predictor, config, "logit", 1).values
    np.testing.assert_array_equal(whole, np.concatenate(alone))


def _stored_xgboost(xgb_model: Path, tmp_path: Path, stored: str, name: str) -> tuple[Predictor, Any]:
    """The test's XGBoost model loaded as a config that stores it so would load it (pickled, or XGBoost's
    own .json), and the booster its calls reach. The predictor is the process's cached one."""
    from shapline.tasks.common.config import XGBoostModel
    from shapline.tasks.models.loading import load_predictor

    path = xgb_model
    if stored == "json":
        path = tmp_path / "model.json"
        joblib.load(xgb_model).get_booster().save_model(str(path))
    predictor = load_predictor(XGBoostModel(name=f"{name}-{stored}", kind="xgboost", path=str(path)))
    return predictor, predictor.native if stored == "json" else predictor.native.get_booster()


@pytest.mark.parametrize("stored", ["joblib", "json"])
def test_kernel_shap_hands_xgboost_its_calls_row_major_with_the_same_values(
    xgb_model: Path, features: pd.DataFrame, tmp_path: Path, stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel run on an XGBoost model, as a shard makes it (explain_rows), reaches the booster with each
    synthetic call as one row-major array; the values are the column-major run's, bit for bit. (The
    predictor is the process's cached one: what is changed on it is put back.)"""
    predictor, booster = _stored_xgboost(xgb_model, tmp_path, stored, "x")
    background = Background(frame=features.iloc[:10])
    config = ExplainerConfig(algorithm="kernel", nsamples=80, seed=3)
    predict, layouts = booster.inplace_predict, []

    def recorded(data: Any, *args: Any, **kwargs: Any) -> Any:
        if len(data) > len(background.frame):  # a synthetic call, not the background's or a probe's
            layouts.append(data.flags.c_contiguous)
        return predict(data, *args, **kwargs)

    monkeypatch.setattr(booster, "inplace_predict", recorded)
    # What the predictor is handed per synthetic call: the array the engine wrote, or a frame.
    predict_outputs, handed = predictor.predict_outputs, []

    def recorded_outputs(rows: Any, *args: Any) -> Any:
        if len(rows) > len(background.frame):
            handed.append(type(rows))
        return predict_outputs(rows, *args)

    monkeypatch.setattr(predictor, "predict_outputs", recorded_outputs)
    rows = features.iloc[20:24]
    by_row = explain_rows(rows, background, predictor, config, "logit", 1, algorithm="kernel")
    assert layouts and all(layouts)
    assert handed and set(handed) == {np.ndarray}  # no DataFrame built around a call
    layouts.clear()
    handed.clear()
    monkeypatch.setattr(predictor, "reads_rows", False)
    by_column = explain_rows(rows, background, predictor, config, "logit", 1, algorithm="kernel")
    assert layouts and not any(layouts)
    assert handed and set(handed) == {pd.DataFrame}
    np.testing.assert_array_equal(by_row.values, by_column.values)
    np.testing.assert_array_equal(by_row.model_output, by_column.model_output)


@pytest.mark.parametrize("stored", ["joblib", "json"])
def test_an_xgboost_call_handed_over_as_an_array_is_refused_as_a_frame_is(
    xgb_model: Path, features: pd.DataFrame, tmp_path: Path, stored: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN from the model in a call the engine handed over as its array is refused in the words the same
    call through a frame gets: the row and its cells (the frame is built for the message only)."""
    predictor, booster = _stored_xgboost(xgb_model, tmp_path, stored, "nan")
    background = Background(frame=features.iloc[:10])
    config = ExplainerConfig(algorithm="kernel", nsamples=80, seed=3)
    predict = booster.inplace_predict

    def broken(data: Any, *args: Any, **kwargs: Any) -> Any:
        out = predict(data, *args, **kwargs)
        if len(data) > len(background.frame):
            out[7] = np.nan  # one synthetic row's probability
        return out

    monkeypatch.setattr(booster, "inplace_predict", broken)
    rows = features.iloc[20:21]
    messages = []
    for reads_rows in (True, False):
        monkeypatch.setattr(predictor, "reads_rows", reads_rows)
        with pytest.raises(ModelError) as refused:
            explain_rows(rows, background, predictor, config, "logit", 1, algorithm="kernel")
        messages.append(str(refused.value))
    assert messages[0] == messages[1]
    assert "NaN or infinite outputs for 1 of" in messages[0]
    assert f"the first such row: {features.columns[0]}=" in messages[0]


def test_permutation_is_additive_and_seeded(mlp_model: Path, features: pd.DataFrame) -> None:
    predictor = LocalPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    background, rows = Background(frame=features.iloc[:10]), features.iloc[:4]
    config = ExplainerConfig(algorithm="permutation", seed=1)
    first = explain_rows(rows, background, predictor, config, "logit", 1)
    again = explain_rows(rows, background, predictor, config, "logit", 1)
    np.testing.assert_array_equal(first.values, again.values)
    assert np.abs(first.base_values + first.values.sum(axis=1) - first.model_output).max() < 1e-6


def test_non_numeric_data_with_permutation_names_the_columns(penguins: tuple[Path, Path]) -> None:
    data_path, model_path = penguins
    data = pd.read_csv(data_path).drop(columns=["species"])
    predictor = LocalPredictor("penguins", joblib.load(model_path), "predict_proba")
    with pytest.raises(ExplainError, match="needs numeric features; non-numeric: island, sex"):
        explain_rows(
            data.iloc[:2],
            Background(frame=data.iloc[:5]),
            predictor,
            ExplainerConfig(algorithm="permutation"),
            "logit",
            1,
        )


def test_tree_on_a_pipeline_is_refused(penguins: tuple[Path, Path]) -> None:
    predictor = LocalPredictor("penguins", joblib.load(penguins[1]), "predict_proba")
    with pytest.raises(
        ExplainError, match="explainer.algorithm tree needs the model object itself, got Pipeline"
    ):
        resolve_explainer("tree", predictor, "identity")
    assert resolve_explainer("auto", predictor, "identity")[0] == "kernel"


class CountingPredictor(LocalPredictor):
    """A local model that counts predict() calls and the rows in each."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []
        self._calls_lock = threading.Lock()

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        with self._calls_lock:
            self.calls.append(len(frame))
        return super().predict(frame)


@pytest.mark.parametrize("batch_rows", [2, 5, 16])
def test_batched_kernel_rows_give_the_same_values_in_fewer_calls(
    mlp_model, features: pd.DataFrame, batch_rows: int
) -> None:
    """Rows explained together merge their model calls; each row's values stay exactly those of a lone row."""
    background = Background(frame=features.iloc[:10])
    rows = features.iloc[20:31]
    one = CountingPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    config = ExplainerConfig(algorithm="kernel", nsamples=60, seed=4, batch_rows=1)
    alone = explain_rows(rows, background, one, config, "logit", 1)
    merged = CountingPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    together = explain_rows(
        rows, background, merged, config.model_copy(update={"batch_rows": batch_rows}), "logit", 1
    )
    # Equal up to the model's own rounding: BLAS may round a row differently inside a larger batch.
    np.testing.assert_allclose(together.values, alone.values, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(together.base_values, alone.base_values)
    np.testing.assert_allclose(together.model_output, alone.model_output, rtol=0, atol=1e-12)
    assert sum(merged.calls) == sum(one.calls)  # the same rows reach the model
    batches = -(-len(rows) // batch_rows)
    # the output width, the background; then one call per batch holding its rows (f(x)) and all their
    # coalitions (the rows' model outputs are that f(x), not another call)
    assert len(one.calls) == 2 + len(rows)
    assert len(merged.calls) == 2 + batches


def test_batched_kernel_with_rows_that_need_no_coalitions(mlp_model: Path, features: pd.DataFrame) -> None:
    """A row equal to the background varies no feature and calls the model once: the others must not wait for it."""
    background = Background(frame=features.iloc[:1])
    rows = pd.concat([features.iloc[[0]], features.iloc[[5, 6]]])
    rows.index = [0, 5, 6]
    predictor = LocalPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    config = ExplainerConfig(algorithm="kernel", nsamples=50, seed=1, batch_rows=1)
    alone = explain_rows(rows, background, predictor, config, "logit", 1).values
    together = explain_rows(
        rows, background, predictor, config.model_copy(update={"batch_rows": 3}), "logit", 1
    ).values
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-12)
    assert np.all(together[0] == 0)


def test_a_model_error_in_a_batch_reaches_every_row_and_frees_the_rng(
    mlp_model, features: pd.DataFrame
) -> None:
    class Failing(LocalPredictor):
        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            if len(frame) > 100:
                raise RuntimeError("endpoint fell over")
            return super().predict(frame)

    predictor = Failing("mlp", joblib.load(mlp_model), "predict_proba")
    config = ExplainerConfig(algorithm="kernel", nsamples=60, seed=4, batch_rows=4)
    with pytest.raises(RuntimeError, match="endpoint fell over"):
        explain_rows(
            features.iloc[20:28], Background(frame=features.iloc[:10]), predictor, config, "logit", 1
        )
    # The global RNG lock was released: a following run completes.
    ok = LocalPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    explain_rows(features.iloc[20:22], Background(frame=features.iloc[:10]), ok, config, "logit", 1)


def _shards_in(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("shard-*"))


def test_the_last_run_using_a_shard_store_deletes_it(tmp_path: Path) -> None:
    """A scheduled and a manual run of one config share a store: the first to finish must not delete it."""
    from shapline.tasks.compute.shards import ShardStoreClaim

    store = tmp_path / "store"
    store.mkdir()
    first, second = ShardStoreClaim(store, "run-a"), ShardStoreClaim(store, "run-b")
    (store / "shard-000000-abc.parquet").write_bytes(b"finished")
    assert not first.release(delete=True)
    assert _shards_in(store) == ["shard-000000-abc.parquet"]
    assert second.release(delete=True)
    assert _shards_in(store) == []


def test_a_killed_runs_claim_does_not_keep_the_store(tmp_path: Path) -> None:
    import json
    import socket
    import subprocess
    import sys

    from shapline.tasks.compute.shards import ShardStoreClaim

    store = tmp_path / "store"
    store.mkdir()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (store / ".claims").mkdir()
    (store / ".claims" / "killed").write_text(
        json.dumps({"pid": int(gone.stdout), "host": socket.gethostname()})
    )
    (store / "shard-000001-def.parquet").write_bytes(b"finished")
    with ShardStoreClaim(store, "run-c") as claim:
        assert claim.release(delete=True)
    assert _shards_in(store) == [] and not (store / ".claims" / "killed").exists()


def test_a_failed_run_releases_its_claim_without_deleting(tmp_path: Path) -> None:
    from shapline.tasks.compute.shards import ShardStoreClaim

    store = tmp_path / "store"
    store.mkdir()
    (store / "shard-000000-abc.parquet").write_bytes(b"finished")
    with pytest.raises(RuntimeError), ShardStoreClaim(store, "run-d"):
        raise RuntimeError("the run failed")
    assert _shards_in(store) == ["shard-000000-abc.parquet"]  # kept for the re-run to reuse
    assert not list((store / ".claims").iterdir())


def test_a_shard_leaves_its_native_thread_limit_for_the_workers_other_shards(
    mlp_model, features: pd.DataFrame, tmp_path
) -> None:
    """Shards share a worker: one ending must not restore the process-wide BLAS limit under the others."""
    from threadpoolctl import threadpool_info, threadpool_limits

    import shapline.tasks.common.cores as cores_module
    from shapline.tasks.common.config import SklearnModel
    from shapline.tasks.compute.shards import ShardJob, explain_shard

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    original = threadpool_info()
    try:
        threadpool_limits(limits=2)
        cores_module._native_limit = None
        model = SklearnModel(name="mlp", kind="sklearn", path=str(mlp_model))
        job = ShardJob(
            index=0,
            rows=features.iloc[:2],
            background=Background(frame=features.iloc[:5]),
            model=model,
            explainer=ExplainerConfig(algorithm="kernel", nsamples=20),
            algorithm="kernel",
            link="logit",
            threads=1,
        )
        explain_shard(job)
        assert blas_threads() == {1}
    finally:
        threadpool_limits(limits=original)
        cores_module._native_limit = None


@pytest.mark.parametrize("classes", [["1"], ["Adelie", "Chinstrap", "Gentoo"]])
def test_a_shard_table_is_the_values_layout_row_by_row_then_class(classes: list[str]) -> None:
    """`to_table` (what the store writes) is shap_values.parquet's layout: row_id, [class], the features,
    base_value, model_output; a row per (row, class), rows in order, classes in order within a row."""
    rng = np.random.default_rng(0)
    n, m, c = 7, 4, len(classes)
    values = ShardValues(
        row_ids=np.arange(n) * 3 + 5,
        features=["a", "b", "c", "d"],
        labels=classes,
        values=rng.normal(size=(n, m, c)),
        base_values=rng.normal(size=(n, c)),
        model_output=rng.normal(size=(n, c)),
        algorithm="kernel",
        link="identity",
    )
    table = values.to_table().to_pandas()
    assert list(table.columns) == values_columns(["a", "b", "c", "d"], c > 1)
    for i in range(n):
        for k in range(c):
            row = table.iloc[i * c + k]
            assert row["row_id"] == values.row_ids[i] and (c == 1 or row["class"] == classes[k])
            assert row[["a", "b", "c", "d"]].to_numpy(float).tolist() == values.values[i, :, k].tolist()
            assert (
                row["base_value"] == values.base_values[i, k]
                and row["model_output"] == values.model_output[i, k]
            )


def test_the_first_shap_import_keeps_nothing_that_was_on_the_stack() -> None:
    """shap keeps its failed optional imports' exceptions; their tracebacks held every frame on the stack at
    its first import (in a run, the plan's, with the data). In a fresh interpreter, as a run first meets it."""
    import subprocess
    import sys

    code = (
        "import gc, weakref\n"
        "from shapline.tasks.explainers.explain import load_shap\n"
        "class Data: pass\n"
        "def plan():\n"
        "    data = Data()\n"
        "    load_shap()\n"
        "    return weakref.ref(data)\n"
        "ref = plan()\n"
        "gc.collect()\n"
        "print('released' if ref() is None else 'kept')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "released"


class _Timed(CountingPredictor):
    """The penguins Pipeline on a fake clock that moves ~4 ms a call and 0.6 us a row, as the demo's costs."""

    now = [0.0]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        self.now[0] += 4e-3 + 6e-7 * len(frame)
        return super().predict(frame)


def _timed_pipeline(
    penguins: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, config: ExplainerConfig
) -> tuple[pd.DataFrame, Background, ShardValues, _Timed]:
    """Six penguins, a 10-row background, their values at one row a call (untimed), and the Pipeline on a
    fake clock the kernel engine times its calls with."""
    from shapline.tasks.explainers import kernel_engine

    data_path, model_path = penguins
    data = pd.read_csv(data_path).drop(columns=["species"])
    background, rows = Background(frame=data.iloc[:10]), data.iloc[[0, 3, 40, 100, 200, 300]]
    alone = explain_rows(
        rows,
        background,
        LocalPredictor("p", joblib.load(model_path), "predict_proba"),
        config.model_copy(update={"batch_rows": 1}),
        "logit",
        1,
        width=3,
    )
    predictor = _Timed("p", joblib.load(model_path), "predict_proba")
    predictor.now = [0.0]
    monkeypatch.setattr(kernel_engine, "_clock", lambda: predictor.now[0])
    # The first call one row, as a model's whose rows' calls are large (the default merges small ones).
    monkeypatch.setattr(kernel_engine, "_FIRST_CALL_BYTES", 1)
    return rows, background, alone, predictor


def test_auto_merges_a_pipelines_calls_with_the_same_values(
    penguins: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch_rows auto, an in-process Pipeline: the first shard times the model's calls (here a clock that
    moves ~4 ms a call and 0.6 us a row, as the demo's Pipeline costs), then merges its other rows' calls;
    the next shard, with the cost known, merges from its first call and reuses the background's output and
    the first shard's dedupe decision. The values are one row per call's."""
    config = ExplainerConfig(algorithm="kernel", nsamples=80, seed=3, l1_reg="aic")
    rows, background, alone, predictor = _timed_pipeline(penguins, monkeypatch, config)
    first = explain_rows(rows.iloc[:3], background, predictor, config, "logit", 1, width=3)
    # The background; the first row's call, timed; the other two rows' in one (each distinct row once).
    assert len(predictor.calls) == 3 and predictor.calls[0] == 10
    assert predictor.call_cost is not None
    # dedupe auto decided on this shard's rows (a Pipeline's text columns repeat): kept for the run's next
    assert list((predictor.kernel_deduplicates or {}).values()) == [True]
    predictor.calls.clear()

    from shapline.tasks.explainers.kernel_engine import KernelEngine

    def sampled_again(*_: object) -> float:
        raise AssertionError("the second shard sampled its rows' repeats again")

    monkeypatch.setattr(KernelEngine, "_repeat_share", sampled_again)
    second = explain_rows(rows.iloc[3:], background, predictor, config, "logit", 1, width=3)
    # Its three rows in one call; the background's output is the first shard's, not called again.
    assert len(predictor.calls) == 1 and predictor.calls[0] != 10
    merged = np.concatenate([first.values, second.values])
    np.testing.assert_allclose(merged, alone.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        np.concatenate([first.model_output, second.model_output]), alone.model_output, rtol=0, atol=1e-12
    )


def test_a_process_calls_the_model_on_a_runs_background_once(mlp_model: Path, features: pd.DataFrame) -> None:
    """A shard's engine takes the background's output an earlier shard of the run got from the same model (a
    job unpickled in a pool worker carries an equal background, not the same object); another background,
    or other outputs of the model, are called afresh. The values are those of shards that each call it."""
    import pickle

    config = ExplainerConfig(algorithm="kernel", nsamples=60, seed=4, batch_rows=1)
    background = Background(frame=features.iloc[:10])
    shards = [features.iloc[20:23], features.iloc[23:26]]
    alone = [
        explain_rows(
            s,
            background,
            CountingPredictor("mlp", joblib.load(mlp_model), "predict_proba"),
            config,
            "logit",
            1,
        )
        for s in shards
    ]
    shared = CountingPredictor("mlp", joblib.load(mlp_model), "predict_proba")
    first = explain_rows(shards[0], background, shared, config, "logit", 1)
    assert 10 in shared.calls
    shared.calls.clear()
    second = explain_rows(shards[1], pickle.loads(pickle.dumps(background)), shared, config, "logit", 1)
    assert 10 not in shared.calls  # the background's output was kept
    for found, expected in zip([first, second], alone, strict=True):
        np.testing.assert_array_equal(found.values, expected.values)
        np.testing.assert_array_equal(found.base_values, expected.base_values)

    shared.calls.clear()
    another = explain_rows(shards[1], Background(frame=features.iloc[10:20]), shared, config, "logit", 1)
    assert 10 in shared.calls  # another run's background is called
    shared.calls.clear()
    other_class = explain_rows(shards[1], Background(frame=features.iloc[10:20]), shared, config, "logit", 0)
    assert 10 in shared.calls  # the same background, another output
    np.testing.assert_allclose(other_class.base_values[0] + another.base_values[0], 0.0, atol=1e-9)


def test_auto_merges_a_pipelines_calls_with_the_adaptive_estimator_too(
    penguins: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """estimator adaptive, batch_rows auto, an in-process Pipeline: the first row's call is timed, the other
    rows' first calls go out together, and every value is the one-row-a-call value (here exact: 7 features,
    every coalition within nsamples auto)."""
    config = ExplainerConfig(algorithm="kernel", estimator="adaptive", l1_reg=False, seed=3)
    rows, background, alone, predictor = _timed_pipeline(penguins, monkeypatch, config)
    merged = explain_rows(rows, background, predictor, config, "logit", 1, width=3)
    # The background; the first row's call, timed; the other five rows' in one.
    assert len(predictor.calls) == 3 and predictor.calls[0] == 10
    assert predictor.call_cost is not None
    np.testing.assert_allclose(merged.values, alone.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged.model_output, alone.model_output, rtol=0, atol=1e-12)
