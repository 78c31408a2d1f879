from __future__ import annotations

import threading
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from shapline.tasks.config import SklearnModel, XGBoostModel
from shapline.tasks.errors import ModelError
from shapline.tasks.models import link_for, load_predictor
from shapline.tasks.predictors import LocalPredictor, numeric_array, probe_predictor


def test_limiting_threads_while_other_shards_predict_is_safe(xgb_model: Path, cancer_data: Path) -> None:
    """Reconfiguring an XGBoost model mid-predict crashes it ('need_configuration_'): the limit is set once."""
    rows = pd.read_csv(cancer_data).drop(columns=["malignant"])
    predictor = LocalPredictor("xgb", joblib.load(xgb_model), "predict_proba")
    errors: list[Exception] = []

    def shard() -> None:
        try:
            for _ in range(15):
                predictor.limit_threads(1)
                predictor.predict(rows)
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=shard) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert predictor.model.get_params()["n_jobs"] == 1


def test_booster_files_and_pickles_load_as_predictors(xgb_model: Path, cancer_data: Path) -> None:
    rows = pd.read_csv(cancer_data).drop(columns=["malignant"]).head(5)
    booster = load_predictor(XGBoostModel(name="b", kind="xgboost", path=str(xgb_model.with_suffix(".json"))))
    wrapper = load_predictor(XGBoostModel(name="w", kind="xgboost", path=str(xgb_model)))
    pd.testing.assert_frame_equal(
        pd.DataFrame(booster.predict(rows)), pd.DataFrame(wrapper.predict(rows)), atol=1e-6
    )
    assert booster.class_labels == ["0", "1"] and booster.predict(rows).shape == (5, 2)


@pytest.mark.parametrize("suffix", [".joblib", ".json"])
def test_xgboost_gets_numeric_frames_as_one_array_with_the_same_outputs(
    xgb_model: Path, cancer_data: Path, suffix: str
) -> None:
    """The array path (~10% of a kernel row) must not change a single output bit."""
    import xgboost

    rows = pd.read_csv(cancer_data).drop(columns=["malignant"]).head(200)
    predictor = load_predictor(
        XGBoostModel(name="x", kind="xgboost", path=str(xgb_model.with_suffix(suffix)))
    )
    assert predictor.feature_names == list(rows.columns)
    assert numeric_array(rows, predictor.feature_names) is not None
    booster = joblib.load(xgb_model).get_booster()
    # XGBoost's own frame path, as the model would be called without shapline.
    reference = booster.predict(xgboost.DMatrix(rows))
    assert np.array_equal(predictor.predict(rows)[:, 1], reference)


def test_only_models_that_cast_to_float32_say_they_read_float32(
    xgb_model: Path, cancer_data: Path, tmp_path: Path
) -> None:
    """The kernel engine builds float32 rows only for these: a Pipeline ending in XGBoost reads its
    steps' float64 first, and a scikit-learn model computes in float64."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = pd.read_csv(cancer_data)
    x, y = frame.drop(columns=["malignant"]), frame["malignant"]
    booster = load_predictor(XGBoostModel(name="b", kind="xgboost", path=str(xgb_model.with_suffix(".json"))))
    wrapper = load_predictor(XGBoostModel(name="w", kind="xgboost", path=str(xgb_model)))
    assert booster.reads_float32 and wrapper.reads_float32
    pipeline = make_pipeline(StandardScaler(), joblib.load(xgb_model)).fit(x, y)
    assert not LocalPredictor("p", pipeline, "predict_proba").reads_float32
    assert not LocalPredictor("l", LogisticRegression(max_iter=1000).fit(x, y), "predict_proba").reads_float32


def test_numeric_array_keeps_the_frame_when_an_array_could_mean_other_numbers() -> None:
    numbers = pd.DataFrame({"a": [1.0, 2.0], "b": [3, 4]})
    assert np.array_equal(numeric_array(numbers, ["a", "b"]), [[1.0, 3.0], [2.0, 4.0]])
    assert numeric_array(numbers, None) is not None  # a model without names reads columns by position
    assert numeric_array(numbers, ["b", "a"]) is None  # the model's order differs: names must decide
    assert numeric_array(numbers.assign(c=[True, False]), ["a", "b", "c"]) is None
    assert numeric_array(numbers.assign(c=pd.Categorical(["x", "y"])), ["a", "b", "c"]) is None
    assert numeric_array(numbers.astype({"b": "Int64"}), ["a", "b"]) is None


def test_missing_and_wrong_model_files_name_the_key(tmp_path: Path, xgb_model: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.path: file not found"):
        load_predictor(SklearnModel(name="m", kind="sklearn", path=str(tmp_path / "none.joblib")))
    (tmp_path / "junk.joblib").write_text("not a model")
    with pytest.raises(ModelError, match=r"model\.path: .*junk\.joblib: not a joblib/pickle model file"):
        load_predictor(SklearnModel(name="m", kind="sklearn", path=str(tmp_path / "junk.joblib")))
    with pytest.raises(ModelError, match="model.output: .* has no decision_function"):
        LocalPredictor("m", joblib.load(xgb_model), "decision_function")


def test_probe_reports_a_model_that_cannot_read_the_data(xgb_model: Path) -> None:
    predictor = LocalPredictor("xgb", joblib.load(xgb_model), "predict_proba")
    with pytest.raises(ModelError, match=r"model xgb: predict_proba\(\) failed on the data"):
        probe_predictor(predictor, pd.DataFrame({"x": [1.0, 2.0]}), 1)


@pytest.mark.parametrize(
    ("configured", "method", "expected"),
    [
        (None, "predict_proba", "logit"),
        ("identity", "predict_proba", "identity"),
        (None, "predict", "identity"),
    ],
)
def test_link_follows_what_the_model_can_give(
    xgb_model: Path, configured: str | None, method: str, expected: str
) -> None:
    predictor = LocalPredictor("xgb", joblib.load(xgb_model), method)
    assert link_for(predictor, configured, "logit", "predict_proba") == expected
