from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest

from shapline.tasks.common.config import SklearnModel, XGBoostModel
from shapline.tasks.common.errors import ModelError
from shapline.tasks.models.loading import link_for, load_predictor
from shapline.tasks.models.predictors import LocalPredictor, numeric_array
from shapline.tasks.models.probe import probe_output


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
    # And rows, from one array: the engine writes their calls row-major, as they read them fastest.
    assert booster.reads_rows and wrapper.reads_rows
    pipeline = make_pipeline(StandardScaler(), joblib.load(xgb_model)).fit(x, y)
    for other in (pipeline, LogisticRegression(max_iter=1000).fit(x, y)):
        predictor = LocalPredictor("o", other, "predict_proba")
        assert not predictor.reads_float32 and not predictor.reads_rows


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
        probe_output(predictor, pd.DataFrame({"x": [1.0, 2.0]}), 1)


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


def test_a_model_file_is_pinned_by_its_bytes_and_a_replaced_one_refused(
    xgb_model: Path, mlp_model: Path, tmp_path: Path
) -> None:
    """The run pins the file's sha256 when it starts; a retrain that writes the same path mid-run is refused
    by every later load (the flow's, each worker's), never explained under the old model's tags."""
    import shutil

    from shapline.tasks.models.loading import model_fingerprint, pin_model_file

    path = tmp_path / "model.joblib"
    shutil.copy(xgb_model, path)
    pinned = pin_model_file(SklearnModel(name="m", kind="sklearn", path=str(path)))
    assert pinned.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == model_fingerprint(pinned)
    assert isinstance(load_predictor(pinned), LocalPredictor)
    shutil.copy(mlp_model, path)  # the retrain lands
    with pytest.raises(
        ModelError, match=r"model\.path: .*model\.joblib changed: its sha256 is .*one run explains one model"
    ):
        load_predictor(pinned)
    with pytest.raises(ModelError, match="changed"):
        pin_model_file(pinned)
    # A run that starts now pins the new bytes and explains the new model.
    assert (
        "Pipeline"
        in type(load_predictor(pin_model_file(pinned.model_copy(update={"sha256": None}))).model).__name__
    )


def test_pickles_are_trusted_code_and_xgboost_files_are_not(xgb_model: Path) -> None:
    from shapline.tasks.models.loading import trusted_code_warning

    pickled = trusted_code_warning(SklearnModel(name="m", kind="sklearn", path=str(xgb_model)))
    assert pickled is not None and "is a pickle: loading it runs any code" in pickled
    native = xgb_model.with_suffix(".json")
    assert trusted_code_warning(XGBoostModel(name="m", kind="xgboost", path=str(native))) is None


class _Outputs:
    """A 'model' returning whatever a test hands it."""

    def __init__(self, output: np.ndarray) -> None:
        self.output = output
        self.classes_ = np.array([0, 1])

    def fit(self, *_: object) -> _Outputs:
        return self

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return self.output[: len(frame)]


@pytest.mark.parametrize(
    ("output", "width", "logit", "message"),
    [
        (
            np.array([[0.2, 0.8], [np.nan, 0.5]]),
            2,
            True,
            r"1 NaN or infinite outputs for 1 of 2 rows in one call; the first such row: x=2\.0",
        ),
        (np.array([[0.2, 0.8], [np.inf, 0.5]]), 2, False, r"NaN or infinite"),
        (
            np.array([[-0.5, 1.5], [0.5, 0.5]]),
            2,
            True,
            r"returned -0\.5, not a probability in \[0, 1\], for 1 of 2 rows",
        ),
        (
            np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]),
            2,
            True,
            r"returned 3 outputs per row in one call, where it returned 2",
        ),
        (np.array([[0.2, 0.8]]), 2, True, r"returned an array of shape \(1, 2\) for 2 rows"),
    ],
)
def test_every_model_call_is_checked(output: np.ndarray, width: int, logit: bool, message: str) -> None:
    from shapline.tasks.explainers.explain import ModelFunction

    predictor = LocalPredictor("m", _Outputs(output), "predict_proba")
    frame = pd.DataFrame({"x": [1.0, 2.0]})
    function = ModelFunction(predictor, frame, [1], "logit" if logit else "identity", width)
    with pytest.raises(ModelError, match=message):
        function(frame)


def test_a_call_of_the_explained_class_alone_is_checked_as_the_full_one() -> None:
    """A model that gives the explained class alone (predict_outputs) and returns NaN: the call is made
    again in full and refused with checked_output's message; a fine one is used as it came."""
    from shapline.tasks.explainers.explain import ModelFunction

    class Alone(LocalPredictor):
        def predict_outputs(self, frame: pd.DataFrame, outputs: list[int], width: int | None) -> np.ndarray:
            self.alone += 1
            return self.predict(frame)[:, outputs]

    frame = pd.DataFrame({"x": [1.0, 2.0]})
    for output, fails in (
        (np.array([[0.2, 0.8], [np.nan, np.nan]]), True),
        (np.array([[0.3, 0.7]] * 2), False),
    ):
        predictor = Alone("m", _Outputs(output), "predict_proba")
        predictor.alone = 0
        function = ModelFunction(predictor, frame, [1], "logit", 2)
        if fails:
            with pytest.raises(ModelError, match=r"returned 2 NaN or infinite outputs for 1 of 2 rows"):
                function(frame)
        else:
            np.testing.assert_array_equal(function(frame), [[0.7], [0.7]])
        assert predictor.alone == 1


def test_probabilities_a_rounding_step_past_one_are_still_probabilities() -> None:
    from shapline.tasks.explainers.explain import ModelFunction

    output = np.array([[-1e-8, 1.0 + 1e-8], [0.5, 0.5]])
    function = ModelFunction(
        LocalPredictor("m", _Outputs(output), "predict_proba"),
        pd.DataFrame({"x": [1.0, 2.0]}),
        [1],
        "logit",
        2,
    )
    assert function(pd.DataFrame({"x": [1.0, 2.0]})).shape == (2, 1)


@pytest.mark.parametrize("suffix", [".joblib", ".json", ".ubj"])
def test_every_xgboost_file_predicts_in_place_with_todays_outputs(
    xgb_model: Path, cancer_data: Path, tmp_path: Path, suffix: str, dmatrices: list[int]
) -> None:
    """XGBoost's own files (kind xgboost) and a pickled XGBClassifier reach the booster the same way: in
    place, no DMatrix per call, with the outputs a DMatrix gave, bit for bit."""
    import xgboost

    rows = pd.read_csv(cancer_data).drop(columns=["malignant"]).head(300)
    booster = joblib.load(xgb_model).get_booster()
    path = xgb_model if suffix == ".joblib" else tmp_path / f"model{suffix}"
    if suffix != ".joblib":
        booster.save_model(str(path))
    probability = booster.predict(xgboost.DMatrix(rows))
    margin = booster.predict(xgboost.DMatrix(rows), output_margin=True)
    # Class 0 as each kind computed it before: XGBClassifier in float32, the booster's predictor in float64.
    negative = (1 - probability) if suffix == ".joblib" else 1.0 - probability.astype(float)
    predictor = load_predictor(XGBoostModel(name="x", kind="xgboost", path=str(path)))
    dmatrices.clear()
    outputs = predictor.predict(rows)
    assert np.array_equal(outputs[:, 1], probability) and np.array_equal(outputs[:, 0], negative)
    assert np.array_equal(predictor.raw_output(rows, "log_odds")[:, 0], margin)
    # The engine's rows: one float32 block, row-major (reads_rows) or column-major, read in place as well.
    assert predictor.reads_rows
    for block in (np.ascontiguousarray(rows, np.float32), np.asfortranarray(rows, np.float32)):
        assert np.array_equal(
            predictor.predict(pd.DataFrame(block, columns=rows.columns, copy=False))[:, 1],
            booster.predict(xgboost.DMatrix(block, feature_names=list(rows.columns))),
        )
    assert dmatrices == [len(rows)] * 2  # only the references', after the predictor's calls
    for columns in ([1], [0], [0, 1]):  # the explained class alone, as predict() computes it
        assert np.array_equal(predictor.predict_outputs(rows, columns, 2), outputs[:, columns])
    assert predictor.predict_outputs(rows, [1], 3) is None
    # The engine hands a row-major call over as its array where the columns are the model's, in its order.
    assert predictor.takes_array(list(rows.columns)) and not predictor.takes_array(list(rows.columns[::-1]))
    by_row = np.ascontiguousarray(rows, np.float32)
    assert np.array_equal(predictor.predict_outputs(by_row, [0, 1], 2), outputs)
    dmatrices.clear()
    predictor.predict(rows.astype({"mean_radius": "Float64"}))  # a nullable column: the frame, in place
    assert dmatrices == []


def test_a_linear_booster_which_cannot_predict_in_place_still_predicts(
    cancer_data: Path, tmp_path: Path, dmatrices: list[int]
) -> None:
    import xgboost

    frame = pd.read_csv(cancer_data)
    rows, target = frame.drop(columns=["malignant"]), frame["malignant"]
    booster = xgboost.train(
        {"booster": "gblinear", "objective": "binary:logistic", "nthread": 1},
        xgboost.DMatrix(rows, target),
        5,
    )
    booster.save_model(str(tmp_path / "linear.json"))
    predictor = load_predictor(XGBoostModel(name="l", kind="xgboost", path=str(tmp_path / "linear.json")))
    assert np.array_equal(predictor.predict(rows)[:, 1], booster.predict(xgboost.DMatrix(rows)))


def _xgboost_models(rows: pd.DataFrame, target: pd.Series) -> dict[str, tuple[object, str]]:
    """Small XGBoost models of every kind the scikit-learn API gives, each with the method explained."""
    import xgboost

    common = {"n_estimators": 12, "max_depth": 3, "n_jobs": 1}
    three = (rows["mean_radius"].rank(pct=True) * 2.999).astype(int)  # three classes
    early = xgboost.XGBClassifier(
        n_estimators=80, max_depth=6, learning_rate=1.0, n_jobs=1, early_stopping_rounds=2, missing=-1.0
    )
    early.fit(rows[:400], target[:400], eval_set=[(rows[400:], target[400:])], verbose=False)
    fitted = {
        "binary": (xgboost.XGBClassifier(**common).fit(rows, target), "predict_proba"),
        "early stopped, missing -1": (early, "predict_proba"),
        "three classes": (xgboost.XGBClassifier(**common).fit(rows, three), "predict_proba"),
        "regressor": (xgboost.XGBRegressor(**common).fit(rows, rows["mean_area"]), "predict"),
        "random forest": (
            xgboost.XGBRFClassifier(n_estimators=4, max_depth=3, n_jobs=1).fit(rows, target),
            "predict_proba",
        ),
    }
    assert early.best_iteration + 1 < early.n_estimators  # the best iteration is a real argument
    return fitted


def _count_wrapper_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The class of each model whose scikit-learn wrapper predicts from here on: every wrapper method
    (predict_proba, a classifier's predict, a subclass's) reaches XGBModel.predict."""
    import xgboost

    calls: list[str] = []
    wrapped = xgboost.XGBModel.predict

    def counted(self: xgboost.XGBModel, *args: object, **kwargs: object) -> object:
        calls.append(type(self).__name__)
        return wrapped(self, *args, **kwargs)

    monkeypatch.setattr(xgboost.XGBModel, "predict", counted)
    return calls


def test_xgboosts_scikit_learn_api_is_called_on_its_booster_with_the_wrappers_outputs(
    cancer_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XGBClassifier/XGBRegressor on the engine's array: the booster's inplace_predict with the wrapper's
    arguments, every output bit equal to predict_proba/predict, and the wrapper not called at all."""

    frame = pd.read_csv(cancer_data)
    rows, target = frame.drop(columns=["malignant"]), frame["malignant"]
    block = np.asfortranarray(rows.to_numpy(dtype=np.float32))
    block[::7, 3] = -1.0  # the early-stopped model's missing value
    block[::11, 5] = np.nan
    engine_rows = pd.DataFrame(block, columns=rows.columns)
    models = _xgboost_models(rows, target)
    expected = {
        kind: getattr(model, method)(block).reshape(len(block), -1)
        for kind, (model, method) in models.items()
    }
    wrapper_calls = _count_wrapper_calls(monkeypatch)
    for kind, (model, method) in models.items():
        predictor = LocalPredictor(kind, model, method)
        outputs = predictor.predict(engine_rows)
        assert outputs.dtype == np.float64 and np.array_equal(outputs, expected[kind].astype(float)), kind
        # A binary classifier gives the explained class alone (what a kernel call takes), bit for bit.
        width = outputs.shape[1]
        for columns in ([1], [0], [1, 0]) if width == 2 else ([0],):
            alone = predictor.predict_outputs(engine_rows, columns, width)
            if kind in ("binary", "early stopped, missing -1", "random forest"):
                assert alone is not None and alone.dtype == np.float64, kind
                assert np.array_equal(alone, outputs[:, columns]), (kind, columns)
            else:
                assert alone is None, kind
        if width == 2:  # a probe that saw other columns: predict() is called, and says so
            assert predictor.predict_outputs(engine_rows, [1], 3) is None
    assert wrapper_calls == []


def test_xgboost_models_the_wrapper_does_more_for_keep_their_wrapper(
    cancer_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Class labels, a softmax computed by the wrapper, a linear booster, a subclass: called as before."""
    import xgboost

    frame = pd.read_csv(cancer_data)
    rows, target = frame.drop(columns=["malignant"]), frame["malignant"]

    class Calibrated(xgboost.XGBClassifier):
        def predict_proba(self, X: object, **kwargs: object) -> np.ndarray:  # noqa: N803 - scikit-learn's name
            return super().predict_proba(X, **kwargs) * 0.5 + 0.25

    common = {"n_estimators": 5, "max_depth": 2, "n_jobs": 1}
    kept = [
        (xgboost.XGBClassifier(**common).fit(rows, target), "predict"),
        (
            xgboost.XGBClassifier(**common, objective="multi:softmax", num_class=2).fit(rows, target),
            "predict_proba",
        ),
        (
            xgboost.XGBClassifier(n_estimators=5, n_jobs=1, booster="gblinear").fit(rows, target),
            "predict_proba",
        ),
        (Calibrated(**common).fit(rows, target), "predict_proba"),
    ]
    engine_rows = rows.astype(np.float32)
    for model, method in kept:
        expected = np.asarray(getattr(model, method)(engine_rows), dtype=float).reshape(len(rows), -1)
        wrapper_calls = _count_wrapper_calls(monkeypatch)
        outputs = LocalPredictor("kept", model, method).predict(engine_rows)
        assert wrapper_calls == [type(model).__name__], (type(model).__name__, model.objective, method)
        assert np.array_equal(outputs, expected)
        monkeypatch.undo()
