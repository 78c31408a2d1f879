"""The SageMaker endpoint predictor, through real boto3 against the local SageMaker-protocol server."""

from __future__ import annotations

import argparse
import re
import threading
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import HistGradientBoostingClassifier

import shapline.tasks.models.sagemaker.endpoint as endpoint_module
import shapline.tasks.models.sagemaker.inference as inference_module
from shapline.flows.endpoint_cli import add_parser
from shapline.tasks.common.config import ExplainerConfig, SageMakerModel, effective_nsamples
from shapline.tasks.common.errors import BudgetExceeded, ModelError, ShaplineError
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.explain import explain_rows
from shapline.tasks.models.predictors import LocalPredictor
from shapline.tasks.models.sagemaker.endpoint import SageMakerPredictor, delete_endpoint
from shapline.tasks.models.sagemaker.inference import (
    InferenceEstimate,
    estimate_inference,
    over_budget,
    plan_inference,
)
from shapline.tasks.models.sagemaker.wire import parse_scores, plan_requests, serialize_rows
from shapline.testing.endpoint import EndpointServer

N_FEATURES = 8


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials (not secrets) and no user AWS config, so boto3's chain finds only these."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data() -> pd.DataFrame:
    """Breast-cancer features, a few missing values, so NaN travels as an empty CSV field."""
    frame = load_breast_cancer(as_frame=True).frame
    features = frame.iloc[:, :N_FEATURES].copy()
    features.iloc[::37, 2] = np.nan
    features["target"] = frame["target"]
    return features


@pytest.fixture(scope="module")
def features(data: pd.DataFrame) -> pd.DataFrame:
    return data.drop(columns="target")


@pytest.fixture(scope="module")
def model(data: pd.DataFrame, features: pd.DataFrame) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(features, data["target"])


@pytest.fixture(scope="module")
def model_path(model: HistGradientBoostingClassifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("endpoint") / "model.joblib"
    joblib.dump(model, path)
    return path


@pytest.fixture
def server(model_path: Path) -> Any:
    with EndpointServer(model_path, "churn-local") as running:
        yield running


def sagemaker_config(server: EndpointServer, name: str | None = None, **endpoint: Any) -> SageMakerModel:
    return SageMakerModel.model_validate(
        {
            "kind": "sagemaker",
            "name": "cancer",
            "endpoint": {"name": name or server.name, "endpoint_url": server.url, **endpoint},
        }
    )


def many_rows(features: pd.DataFrame, n: int) -> pd.DataFrame:
    return features.sample(n, replace=True, random_state=1).reset_index(drop=True)


# Pure functions


def test_serialize_rows_csv_keeps_full_precision_and_writes_nan_as_empty() -> None:
    frame = pd.DataFrame({"a": [0.1 + 0.2, np.nan], "b": [1, 2], "c": ["x,y", None]})
    body, ends = serialize_rows(frame, "text/csv")
    assert body == b'0.30000000000000004,1,"x,y"\n,2,\n'
    assert ends.tolist() == [len(b'0.30000000000000004,1,"x,y"\n'), len(body)]


def test_serialize_rows_jsonlines_one_array_per_line() -> None:
    frame = pd.DataFrame({"a": [1 / 3, np.nan], "b": ["é", "z"]})
    body, ends = serialize_rows(frame, "application/jsonlines")
    assert body.decode().splitlines() == ['[0.3333333333333333,"\\u00e9"]', '[null,"z"]']
    assert ends[-1] == len(body)


@pytest.mark.parametrize(
    ("max_bytes", "max_rows", "spans"),
    [(25, None, [(0, 2), (2, 4), (4, 5)]), (100, 2, [(0, 2), (2, 4), (4, 5)]), (100, None, [(0, 5)])],
)
def test_plan_requests_respects_both_caps(max_bytes: int, max_rows: int | None, spans: list) -> None:
    ends = np.cumsum([10, 10, 10, 10, 10])
    assert plan_requests(ends, max_bytes, max_rows) == spans


def test_plan_requests_refuses_a_row_over_the_cap() -> None:
    with pytest.raises(ValueError, match="row 1 alone is 30 bytes"):
        plan_requests(np.cumsum([10, 30]), 20, None)


@pytest.mark.parametrize(
    ("body", "accept", "column", "expected"),
    [
        (b"1,0.25\n0,0.5\n", "text/csv", 1, [0.25, 0.5]),
        (b"0.25\n0.5\n", "text/csv", 1, [0.25, 0.5]),
        (
            b'{"probability": 0.25}\n{"probability": 0.5}\n',
            "application/jsonlines",
            "probability",
            [0.25, 0.5],
        ),
        (b'{"predictions": [{"score": 0.25}, {"score": 0.5}]}', "application/json", "score", [0.25, 0.5]),
        (b"[0.25, 0.5]", "application/json", 1, [0.25, 0.5]),
    ],
)
def test_parse_scores_formats(body: bytes, accept: str, column: int | str, expected: list[float]) -> None:
    assert parse_scores(body, accept, column, 2, "ep").tolist() == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"1,0.25\n", r"endpoint ep: response has 1 lines for 2 rows sent: '1,0.25'"),
        (b"1,0.25\n0,high\n", r"endpoint ep: no numeric score .* in response line 2: '0,high'"),
        (b"\xff\xfe", r"endpoint ep: response is not UTF-8"),
    ],
)
def test_parse_scores_rejects_what_does_not_fit(body: bytes, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        parse_scores(body, "text/csv", 1, 2, "ep")


def _offline_config(**endpoint: Any) -> SageMakerModel:
    return SageMakerModel.model_validate(
        {
            "kind": "sagemaker",
            "name": "m",
            "endpoint": {"name": "ep", **endpoint},
            "budget": {"max_inference_rows": 10_000},
        }
    )


@pytest.mark.parametrize(
    ("nsamples", "n_features", "expected"),
    [("auto", 4, 14), ("auto", 12, 2 * 12 + 2048), ("auto", 40, 2 * 40 + 2048), (100, 5, 30), (100, 8, 100)],
)
def test_effective_nsamples_follows_shap(nsamples: int | str, n_features: int, expected: int) -> None:
    assert effective_nsamples(nsamples, n_features) == expected


def test_estimate_inference_simple_case() -> None:
    estimate = estimate_inference(_offline_config(max_payload_mb=1.0), 10, 4, 20, "auto", "kernel", 1000.0)
    # Per row one call: f(x) (also its model output) + 14 coalitions x 20 background rows; once: the background.
    assert estimate.nsamples_effective == 14
    assert estimate.inference_rows == 20 + 10 * (1 + 14 * 20)
    # 1000 rows fit under 1 MB at 1000 bytes a row: every call is one request.
    assert estimate.rows_per_request == 1000
    assert estimate.inference_requests == 1 + 10


def test_estimate_inference_splits_calls_by_payload() -> None:
    estimate = estimate_inference(
        _offline_config(max_payload_mb=0.1), 2, 8, 50, 200, "kernel", 500.0, shards=2
    )
    assert estimate.rows_per_request == 200
    assert estimate.inference_rows == 2 * 50 + 2 * (1 + 200 * 50)
    assert estimate.inference_requests == 2 * (1 + 51)  # per shard: the background; one call of 10,001 rows


def test_the_budget_refuses_over_and_passes_under() -> None:
    def estimate(rows: int, requests: int) -> InferenceEstimate:
        return InferenceEstimate(rows, requests, 0.0, 0, 1, 1)

    config = _offline_config()
    assert over_budget(config, estimate(10_000, 3)) is None
    problem = over_budget(config, estimate(10_001, 3))
    assert problem is not None and re.search(
        r"model m: .*~10,001 rows .* endpoint ep, over model.budget.max_inference_rows 10,000", problem
    )
    assert issubclass(BudgetExceeded, ShaplineError)
    unlimited = SageMakerModel.model_validate({"kind": "sagemaker", "name": "m", "endpoint": {"name": "ep"}})
    assert over_budget(unlimited, estimate(10**12, 10**9)) is None


def test_cli_parses_endpoint_serve() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "endpoint",
            "serve",
            "--model",
            "m.joblib",
            "--name",
            "ep",
            "--port",
            "0",
            "--throttle-fraction",
            "0.3",
        ]
    )
    assert (args.command, args.endpoint_command, args.name, args.throttle_fraction) == (
        "endpoint",
        "serve",
        "ep",
        0.3,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["endpoint", "serve", "--model", "m", "--name", "ep", "--throttle-fraction", "2"])


# Through boto3 and the local endpoint


@pytest.mark.parametrize(
    ("content_type", "accept", "score_column"),
    [
        ("text/csv", "text/csv", 1),
        ("application/jsonlines", "application/jsonlines", "probability"),
        ("text/csv", "application/json", "probability"),
    ],
)
def test_predictions_equal_the_local_model(
    server: EndpointServer,
    model: Any,
    features: pd.DataFrame,
    content_type: str,
    accept: str,
    score_column: Any,
) -> None:
    config = sagemaker_config(server, content_type=content_type, accept=accept, score_column=score_column)
    predictor = SageMakerPredictor(config)
    rows = features.iloc[:60]
    assert rows.isna().any().any()
    output = predictor.predict(rows)
    np.testing.assert_allclose(output, model.predict_proba(rows), rtol=0, atol=1e-9)
    assert predictor.class_labels == ["0", "1"]
    assert predictor.stats()["requests"] == 1 and predictor.stats()["rows"] == 60


def test_big_batch_is_split_under_the_payload_cap(
    model_path: Path, model: Any, features: pd.DataFrame
) -> None:
    rows = many_rows(features, 3000)
    with EndpointServer(model_path, "cap", max_payload_bytes=20_000) as server:
        predictor = SageMakerPredictor(sagemaker_config(server, max_payload_mb=0.02, max_concurrency=4))
        output = predictor.predict(rows)
        stats = server.stats
    np.testing.assert_allclose(output, model.predict_proba(rows), rtol=0, atol=1e-9)
    assert stats["too_large"] == 0 and stats["max_body_bytes"] <= 20_000
    assert stats["requests"] == predictor.stats()["requests"] >= 6
    assert stats["rows"] == predictor.stats()["rows"] == 3000
    assert predictor.stats()["max_request_bytes"] == stats["max_body_bytes"]


def test_max_rows_per_request_caps_each_request(server: EndpointServer, features: pd.DataFrame) -> None:
    predictor = SageMakerPredictor(sagemaker_config(server, max_rows_per_request=100))
    predictor.predict(many_rows(features, 1050))
    assert server.stats["requests"] == predictor.stats()["requests"] == 11


def test_throttling_is_retried_to_the_same_values(
    model_path: Path, model: Any, features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint_module, "BACKOFF_BASE_S", 0.01)
    rows = many_rows(features, 3000)
    with EndpointServer(model_path, "busy", max_payload_bytes=20_000, throttle_fraction=0.3) as server:
        predictor = SageMakerPredictor(sagemaker_config(server, max_payload_mb=0.02))
        output = predictor.predict(rows)
        stats = server.stats
    np.testing.assert_allclose(output, model.predict_proba(rows), rtol=0, atol=1e-9)
    assert stats["throttled"] > 0
    assert predictor.stats()["retries"] == stats["throttled"]
    assert stats["ok"] == predictor.stats()["requests"]


def test_malformed_response_names_the_endpoint(model_path: Path, features: pd.DataFrame) -> None:
    with EndpointServer(model_path, "broken", malformed=True) as server:
        predictor = SageMakerPredictor(sagemaker_config(server))
        with pytest.raises(ModelError, match=r"^endpoint broken: response has 9 lines for 10 rows sent: '0,"):
            predictor.predict(features.iloc[:10])


def test_unknown_endpoint_is_one_clear_error(server: EndpointServer, features: pd.DataFrame) -> None:
    predictor = SageMakerPredictor(sagemaker_config(server, name="no-such-endpoint"))
    with pytest.raises(ModelError) as caught:
        predictor.predict(features.iloc[:3])
    message = str(caught.value)
    assert message.startswith("endpoint no-such-endpoint: ValidationError (HTTP 400)")
    assert "Endpoint no-such-endpoint of account" in message and "\n" not in message
    assert server.stats["requests"] == 1


def test_payload_too_large_is_a_clear_error(model_path: Path, features: pd.DataFrame) -> None:
    with EndpointServer(model_path, "small", max_payload_bytes=1_000) as server:
        predictor = SageMakerPredictor(sagemaker_config(server))
        with pytest.raises(
            ModelError, match=r"^endpoint small: ValidationError \(HTTP 413\) for a request of 50 rows"
        ):
            predictor.predict(features.iloc[:50])
        assert server.stats["requests"] == 1


def test_unreachable_endpoint_is_retried_then_reported(
    features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint_module, "BOTOCORE_MAX_ATTEMPTS", 1)
    monkeypatch.setattr(endpoint_module, "BACKOFF_BASE_S", 0.01)
    config = SageMakerModel.model_validate(
        {"kind": "sagemaker", "name": "m", "endpoint": {"name": "gone", "endpoint_url": "http://127.0.0.1:9"}}
    )
    predictor = SageMakerPredictor(config)
    with pytest.raises(ModelError, match=r"^endpoint gone: EndpointConnectionError after 4 attempts"):
        predictor.predict(features.iloc[:2])
    assert predictor.stats()["retries"] == endpoint_module.RETRY_ATTEMPTS - 1


def test_missing_credentials_are_named_not_shown(
    server: EndpointServer, features: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    predictor = SageMakerPredictor(sagemaker_config(server))
    with pytest.raises(ModelError, match=r"^endpoint churn-local: boto3 found no AWS credentials"):
        predictor.predict(features.iloc[:2])


def test_a_runs_request_limit_holds_across_threads_and_predictors(
    model_path: Path, features: pd.DataFrame
) -> None:
    from shapline.tasks.models.limits import ThreadLimit

    with EndpointServer(model_path, "shared", latency_s=0.03) as server:
        config = sagemaker_config(server, max_rows_per_request=10, max_concurrency=2)
        run_limit = ThreadLimit(2)
        predictors = [SageMakerPredictor(config).bounded(run_limit) for _ in range(2)]
        errors: list[BaseException] = []

        def shard(index: int) -> None:
            try:
                predictors[index % 2].predict(features.iloc[:40])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = server.stats
    assert not errors
    assert stats["ok"] == 16 and stats["max_in_flight"] <= 2


def test_kernel_explainer_through_the_endpoint_equals_local(
    server: EndpointServer, model: Any, features: pd.DataFrame
) -> None:
    background = Background(frame=features.iloc[100:110])
    rows = features.iloc[[3, 250]]
    config = ExplainerConfig(algorithm="kernel", nsamples=200, seed=0)
    remote = explain_rows(rows, background, SageMakerPredictor(sagemaker_config(server)), config, "logit", 1)
    local = explain_rows(rows, background, LocalPredictor("m", model, "predict_proba"), config, "logit", 1)
    np.testing.assert_allclose(remote.values, local.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(remote.base_values, local.base_values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(remote.model_output, local.model_output, rtol=0, atol=1e-6)
    assert remote.labels == local.labels == ["1"]
    assert np.abs(remote.values).sum() > 0


@pytest.mark.parametrize(
    ("batch_rows", "requests"),
    [
        # background; per row one call of f(x) and 2540 coalition rows: 3 requests of <= 1000
        (1, 1 + 2 * 3),
        # auto (16 for an endpoint): both rows' f(x) and their 5080 coalition rows in one call: 6
        ("auto", 1 + 6),
    ],
)
def test_estimate_matches_what_the_kernel_explainer_sends(
    server: EndpointServer, features: pd.DataFrame, batch_rows: int | str, requests: int
) -> None:
    # With 8 features, nsamples auto enumerates all 2**8 - 2 coalitions, so the upper bound is exact.
    config = sagemaker_config(server, max_rows_per_request=1000)
    predictor = SageMakerPredictor(config)
    background = Background(frame=features.iloc[100:110])
    rows = features.iloc[[3, 250]]
    explainer = ExplainerConfig(algorithm="kernel", seed=0, batch_rows=batch_rows)
    before = dict(server.stats)
    explain_rows(rows, background, predictor, explainer, "logit", 1)
    estimate = plan_inference(config, rows, background.frame, explainer, "kernel", shards=1)
    assert estimate.nsamples_effective == 254
    sent = {key: server.stats[key] - before.get(key, 0) for key in ("rows", "requests")}
    assert sent["rows"] == predictor.stats()["rows"] == estimate.inference_rows == 10 + 2 * 2541
    assert sent["requests"] == predictor.stats()["requests"] == estimate.inference_requests == requests


def test_delete_endpoint_then_gone(server: EndpointServer, features: pd.DataFrame) -> None:
    config = sagemaker_config(server)
    delete_endpoint(config)
    assert server.deleted
    delete_endpoint(config)  # already gone: fine
    with pytest.raises(ModelError, match="endpoint churn-local: ValidationError"):
        SageMakerPredictor(config).predict(features.iloc[:2])


def test_numeric_rows_serialize_fast_and_read_back_exactly() -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(size=(500, 4)) * [1, 1e-9, 1e9, 1], columns=list("abcd"))
    frame["n"] = rng.integers(-5, 5, size=500)
    frame.iloc[7, 1] = np.nan
    frame.iloc[8, 0] = -0.0
    body, ends = serialize_rows(frame, "text/csv")
    assert len(ends) == len(frame) and ends[-1] == len(body)
    back = pd.read_csv(pd.io.common.BytesIO(body), header=None, names=frame.columns)
    np.testing.assert_array_equal(back.to_numpy(), frame.to_numpy())  # NaN in place, every float exact
    # each row is its own line, so a request split at any row boundary is whole rows
    assert body[: ends[0]].count(b"\n") == 1 and body[ends[9] : ends[10]].count(b"\n") == 1


@pytest.mark.parametrize(
    ("body", "column", "rows", "expected"),
    [
        (b"1,0.25\n0,0.5\n", 1, 2, [0.25, 0.5]),
        (b"0.25\n0.5\n", 1, 2, [0.25, 0.5]),  # one column: the score itself
        (b"1,0.25\n0,0.5", 0, 2, [1.0, 0.0]),  # no final newline
        (b"1,0.25,3\n0,0.5\n", 1, 2, [0.25, 0.5]),  # ragged: the careful path reads it
        (b"1, 0.25\n0,1e-3\n", 1, 2, [0.25, 0.001]),
    ],
)
def test_csv_scores_fast_and_careful_paths_agree(
    body: bytes, column: int, rows: int, expected: list[float]
) -> None:
    np.testing.assert_array_equal(parse_scores(body, "text/csv", column, rows, "e"), expected)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"1,0.25\n0,\n", "line 2: '0,'"),
        (b"1,0.25\n0,abc\n", "line 2: '0,abc'"),
        (b"1,0.25\n", "1 lines for 2 rows"),
    ],
)
def test_bad_csv_scores_still_name_the_line(body: bytes, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        parse_scores(body, "text/csv", 1, 2, "e")


def test_auto_batch_rows_fills_one_request() -> None:
    assert inference_module.auto_batch_rows(5_000_000, 200, 500) == 16  # 100 kB per row's call: capped
    assert inference_module.auto_batch_rows(5_000_000, 200, 5_000) == 5  # 1 MB per call
    assert inference_module.auto_batch_rows(5_000_000, 200, 105_400) == 1  # one call already spans requests


@pytest.mark.parametrize(("kind", "some_saved"), [("penguins", True), ("cancer", False)])
def test_an_endpoint_is_sent_each_distinct_row_once(
    kind: str,
    some_saved: bool,
    penguins: tuple[Path, Path],
    model_path: Path,
    features: pd.DataFrame,
) -> None:
    """Kernel SHAP's synthetic rows repeat when background rows agree on the features left out (text and
    one-hot columns): an endpoint, which costs per row, gets each distinct row of a call once, and the
    values are those of the model in process."""
    if kind == "penguins":
        data_path, path = penguins
        frame = pd.read_csv(data_path).drop(columns=["species"])
        background, rows = Background(frame=frame.iloc[::7].head(20)), frame.iloc[[3, 150, 300]]
    else:
        path, frame = model_path, features
        background, rows = Background(frame=frame.iloc[100:120]), frame.iloc[[3, 250, 400]]
    config = ExplainerConfig(algorithm="kernel", nsamples=300, seed=0, l1_reg="aic", batch_rows=1)
    with EndpointServer(path, f"dedupe-{kind}") as server:
        remote = explain_rows(
            rows, background, SageMakerPredictor(sagemaker_config(server)), config, "logit", 1
        )
        sent = server.stats["rows"]
    local = explain_rows(
        rows, background, LocalPredictor("m", joblib.load(path), "predict_proba"), config, "logit", 1
    )
    np.testing.assert_allclose(remote.values, local.values, rtol=0, atol=1e-6)
    coalitions = effective_nsamples(300, rows.shape[1])  # capped at 2**M - 2
    every = len(background.frame) + len(rows) * (1 + coalitions * len(background.frame))
    assert sent + remote.rows_saved == every
    assert (remote.rows_saved > 0.2 * every) if some_saved else (remote.rows_saved < 0.01 * every)
    # An in-process model is spared repeated rows only where they are common enough to pay for finding
    # them (values equal to no deduplication: test_kernel_engine's dedupe tests).
    assert local.rows_saved == (remote.rows_saved if some_saved else 0)
