"""A SageMaker (or SageMaker-protocol) endpoint as a Predictor: batched, bounded, retried, counted."""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.config import EndpointConfig, ModelConfig, SageMakerModel
from shapline.tasks.common.errors import ModelError, TransientModelError
from shapline.tasks.models.limits import RequestLimit, ThreadLimit
from shapline.tasks.models.predictors import Predictor
from shapline.tasks.models.sagemaker.inference import endpoint_batch_rows
from shapline.tasks.models.sagemaker.wire import (
    BYTES_PER_MB,
    parse_scores,
    plan_requests,
    quote,
    serialize_rows,
)

log = logging.getLogger(__name__)

# Retries botocore makes per call after its first try (adaptive mode also slows the client down after
# throttling); our own loop wraps that with its own attempts so a burst of throttling outlasts botocore's
# quota, and the shard task retries what outlasts both.
BOTOCORE_MAX_ATTEMPTS = 3
RETRY_ATTEMPTS = 4
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
_RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalDependencyException",
        "ModelNotReadyException",
    }
)


def _client_error_parts(exc: Any) -> tuple[str, int, str]:
    error = exc.response.get("Error", {})
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return str(error.get("Code", "")), status, str(error.get("Message", ""))


def _is_retryable(exc: Any) -> bool:
    code, status, _ = _client_error_parts(exc)
    if code in _RETRYABLE_CODES or status == 429 or status >= 500:
        return True
    # SageMaker reports a container's own failure as a 424 ModelError carrying the container's status.
    original = exc.response.get("OriginalStatusCode")
    return code == "ModelError" and isinstance(original, int) and (original == 429 or original >= 500)


class SageMakerPredictor(Predictor):
    """A model behind a SageMaker runtime endpoint: each predict() is split, sent in parallel and reassembled."""

    pays_per_row = True

    def __init__(self, config: SageMakerModel, limit: RequestLimit | None = None) -> None:
        self.config = config
        # Requests in flight, among every sender of this run: the shard runner hands its run's limit to
        # each shard through bounded(); a predictor used on its own holds its own.
        self.limit = limit or ThreadLimit(config.endpoint.max_concurrency)
        self.endpoint = config.endpoint
        self.name = config.name
        self.method = config.effective_output
        self.probabilities = config.task == "classification" and self.method == "predict_proba"
        self.class_labels = ["0", "1"] if self.probabilities else None
        self.output_width = 2 if self.probabilities else 1
        self.feature_names = None
        if self.endpoint.accept == "text/csv" and isinstance(self.endpoint.score_column, str):
            raise ModelError(
                f"endpoint {self.endpoint.name}: endpoint.score_column must be a column number "
                f"for accept text/csv, got {self.endpoint.score_column!r}"
            )
        self.max_request_bytes = int(self.endpoint.max_payload_mb * BYTES_PER_MB)
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._shared: SageMakerPredictor | None = None
        self._counts = dict.fromkeys(
            ("requests", "rows", "bytes", "max_request_bytes", "retries", "request_seconds"), 0.0
        )

    def __getstate__(self) -> dict[str, Any]:
        # The boto3 client, the thread pool, the lock and a process-local limit cannot cross a process boundary.
        state = self.__dict__.copy()
        state.update(_lock=None, _client=None, _pool=None, _shared=None, limit=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self.limit = ThreadLimit(self.endpoint.max_concurrency)

    def bounded(self, limit: RequestLimit | None) -> SageMakerPredictor:
        """This endpoint under the run's request limit, with counters of its own (one shard's traffic).

        The boto3 client and the request threads are shared with this predictor: they are the costly part.
        """
        if limit is None:
            return self
        view = copy.copy(self)
        view.limit = limit
        view._counts = dict.fromkeys(self._counts, 0.0)
        view._lock = threading.Lock()
        view._shared = self
        return view

    def _runtime(self) -> Any:
        owner = self._shared or self
        with owner._lock:
            if owner._client is None:
                owner._client = runtime_client(self.endpoint)
            return owner._client

    def _executor(self) -> ThreadPoolExecutor:
        owner = self._shared or self
        with owner._lock:
            if owner._pool is None:
                owner._pool = ThreadPoolExecutor(
                    max_workers=self.endpoint.max_concurrency,
                    thread_name_prefix=f"endpoint-{self.endpoint.name}",
                )
            return owner._pool

    def stats(self) -> dict[str, float]:
        """Requests, rows, bytes, largest request, retries and time in requests so far."""
        with self._lock:
            return dict(self._counts)

    def traffic(self) -> dict[str, float]:
        return self.stats()

    def _count(self, rows: int, size: int, retries: int, seconds: float) -> None:
        with self._lock:
            self._counts["requests"] += 1
            self._counts["rows"] += rows
            self._counts["bytes"] += size
            self._counts["max_request_bytes"] = max(self._counts["max_request_bytes"], float(size))
            self._counts["retries"] += retries
            self._counts["request_seconds"] += seconds

    def _backoff(self, attempt: int, reason: str) -> None:
        delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
        log.debug("endpoint %s: %s; retrying in %.2f s", self.endpoint.name, reason, delay)
        with self._lock:
            self._counts["retries"] += 1
        time.sleep(delay)

    def _invoke(self, body: bytes, rows: int) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            NoCredentialsError,
            NoRegionError,
        )

        name = self.endpoint.name
        try:
            client = self._runtime()
        except NoRegionError as exc:
            raise ModelError(
                f"endpoint {name}: no AWS region; set model.endpoint.region or AWS_DEFAULT_REGION"
            ) from exc
        for attempt in range(RETRY_ATTEMPTS):
            last_try = attempt == RETRY_ATTEMPTS - 1
            started = time.perf_counter()
            try:
                with self.limit.slot():
                    response = client.invoke_endpoint(
                        EndpointName=name,
                        Body=body,
                        ContentType=self.endpoint.content_type,
                        Accept=self.endpoint.accept,
                    )
                    payload = response["Body"].read()
            except ClientError as exc:
                code, status, message = _client_error_parts(exc)
                botocore_retries = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
                with self._lock:
                    self._counts["retries"] += botocore_retries
                retryable = _is_retryable(exc)
                if retryable and not last_try:
                    self._backoff(attempt, f"{code} (HTTP {status})")
                    continue
                after = f" after {attempt + 1} tries" if attempt else ""
                # Throttling and 5xx that outlast our attempts may pass: the shard task retries them later.
                error = TransientModelError if retryable else ModelError
                raise error(
                    f"endpoint {name}: {code or 'error'} (HTTP {status}){after} for a request of "
                    f"{rows} rows, {len(body)} bytes: {quote(message)}"
                ) from exc
            except NoCredentialsError as exc:
                raise ModelError(
                    f"endpoint {name}: boto3 found no AWS credentials (environment, shared config, SSO or role)"
                ) from exc
            except NoRegionError as exc:
                raise ModelError(
                    f"endpoint {name}: no AWS region; set model.endpoint.region or AWS_DEFAULT_REGION"
                ) from exc
            except (ConnectionError, HTTPClientError, IncompleteReadError) as exc:
                if not last_try:
                    self._backoff(attempt, type(exc).__name__)
                    continue
                raise TransientModelError(
                    f"endpoint {name}: {type(exc).__name__} after {RETRY_ATTEMPTS} attempts: {quote(str(exc))}"
                ) from exc
            except BotoCoreError as exc:
                raise ModelError(f"endpoint {name}: {type(exc).__name__}: {quote(str(exc))}") from exc
            retries = int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
            self._count(rows, len(body), retries, time.perf_counter() - started)
            return payload
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _request(self, body: bytes, rows: int) -> np.ndarray:
        payload = self._invoke(body, rows)
        scores = parse_scores(
            payload, self.endpoint.accept, self.endpoint.score_column, rows, self.endpoint.name
        )
        if self.probabilities and not np.all((scores >= 0.0) & (scores <= 1.0)):
            bad = float(scores[~((scores >= 0.0) & (scores <= 1.0))][0])
            raise ModelError(
                f"endpoint {self.endpoint.name}: score {bad!r} is not a probability; "
                "check endpoint.score_column or set model.output to predict"
            )
        return scores

    def rows_to_merge(self, nsamples: int | str, background: pd.DataFrame) -> int:
        return endpoint_batch_rows(self.config, nsamples, background)

    def requests_for(self, frame: pd.DataFrame) -> list[tuple[bytes, int]]:
        """The request bodies (and their row counts) one predict() of `frame` sends."""
        data, ends = serialize_rows(frame, self.endpoint.content_type)
        try:
            spans = plan_requests(ends, self.max_request_bytes, self.endpoint.max_rows_per_request)
        except ValueError as exc:
            raise ModelError(
                f"endpoint {self.endpoint.name}: {exc} (endpoint.max_payload_mb {self.endpoint.max_payload_mb})"
            ) from exc
        return [
            (data[(int(ends[start - 1]) if start else 0) : int(ends[stop - 1])], stop - start)
            for start, stop in spans
        ]

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        width = 2 if self.probabilities else 1
        if len(frame) == 0:
            return np.empty((0, width))
        requests = self.requests_for(frame)
        if len(requests) == 1:
            parts = [self._request(*requests[0])]
        else:
            futures: list[Future[np.ndarray]] = [
                self._executor().submit(self._request, body, rows) for body, rows in requests
            ]
            try:
                parts = [future.result() for future in futures]
            finally:
                for future in futures:
                    future.cancel()
        scores = np.concatenate(parts)
        if self.probabilities:
            return np.column_stack([1.0 - scores, scores])
        return scores.reshape(-1, 1)


def _botocore_config(endpoint: EndpointConfig) -> Any:
    from botocore.config import Config

    return Config(
        retries={"mode": "adaptive", "max_attempts": BOTOCORE_MAX_ATTEMPTS},
        read_timeout=endpoint.timeout_s,
        connect_timeout=min(10.0, endpoint.timeout_s),
        max_pool_connections=max(10, endpoint.max_concurrency),
    )


def runtime_client(endpoint: EndpointConfig) -> Any:
    """A sagemaker-runtime client; credentials come only from boto3's standard chain."""
    import boto3

    return boto3.session.Session().client(
        "sagemaker-runtime",
        region_name=endpoint.region,
        endpoint_url=endpoint.endpoint_url,
        config=_botocore_config(endpoint),
    )


def delete_endpoint(model: SageMakerModel) -> None:
    """Delete the endpoint (for endpoint.delete_after_run); one that is already gone is fine."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    endpoint = model.endpoint
    client = boto3.session.Session().client(
        "sagemaker",
        region_name=endpoint.region,
        endpoint_url=endpoint.endpoint_url,
        config=_botocore_config(endpoint),
    )
    try:
        client.delete_endpoint(EndpointName=endpoint.name)
    except ClientError as exc:
        code, status, message = _client_error_parts(exc)
        if code in ("ValidationException", "ResourceNotFound") and "not find" in message.lower():
            log.info("endpoint %s was already deleted", endpoint.name)
            return
        raise ModelError(
            f"endpoint {endpoint.name}: delete failed: {code} (HTTP {status}): {quote(message)}"
        ) from exc
    except BotoCoreError as exc:
        raise ModelError(
            f"endpoint {endpoint.name}: delete failed: {type(exc).__name__}: {quote(str(exc))}"
        ) from exc
    log.info("deleted endpoint %s", endpoint.name)


@contextmanager
def endpoint_lifetime(
    model: ModelConfig, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> Iterator[None]:
    """Delete a SageMaker endpoint when the run ends, whatever the outcome, if endpoint.delete_after_run says so."""
    try:
        yield
    finally:
        if isinstance(model, SageMakerModel) and model.endpoint.delete_after_run:
            try:
                delete_endpoint(model)
                logger.info("deleted endpoint %s (endpoint.delete_after_run)", model.endpoint.name)
            except Exception as exc:
                logger.warning("endpoint %s was not deleted: %s", model.endpoint.name, exc)
