"""A SageMaker (or SageMaker-protocol) endpoint as a Predictor: batched, bounded, retried, counted."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from flows.config import EndpointConfig, ExplainerConfig, SageMakerModel
from tasks.errors import BudgetExceeded, ModelError, TransientModelError
from tasks.explain import effective_nsamples
from tasks.limits import RequestLimit, ThreadLimit
from tasks.models import Predictor

log = logging.getLogger(__name__)

# A megabyte here is 10**6 bytes: below SageMaker's 6 MB limit however that limit is counted.
BYTES_PER_MB = 1_000_000
# Retries botocore makes per call after its first try (adaptive mode also slows the client down after
# throttling); our own loop wraps that with its own attempts so a burst of throttling outlasts botocore's
# quota, and the shard task retries what outlasts both.
BOTOCORE_MAX_ATTEMPTS = 3
RETRY_ATTEMPTS = 4
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
# How much of an unexpected response a message quotes.
QUOTE_CHARS = 200

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


def _quote(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    flat = " ".join(text.split())
    return repr(flat[:QUOTE_CHARS] + ("..." if len(flat) > QUOTE_CHARS else ""))


def _python_rows(frame: pd.DataFrame) -> list[list[Any]]:
    """Rows as lists of plain Python values, None where a value is missing."""
    values = frame.astype(object).where(frame.notna(), None)
    return [[v.item() if isinstance(v, np.generic) else v for v in row] for row in values.to_numpy().tolist()]


def _csv_lines(frame: pd.DataFrame) -> list[str]:
    # pandas writes floats at full (round-trip) precision and NaN as an empty field.
    text = frame.to_csv(header=False, index=False, lineterminator="\n")
    lines = text.split("\n")[:-1]
    if len(lines) == len(frame):
        return [line + "\n" for line in lines]
    # A quoted field holds a newline: render row by row so each row stays one unit.
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    rendered = []
    for row in _python_rows(frame):
        buffer.seek(0)
        buffer.truncate()
        writer.writerow(["" if v is None else v for v in row])
        rendered.append(buffer.getvalue())
    return rendered


def _all_numbers(frame: pd.DataFrame) -> bool:
    return all(
        (pd.api.types.is_float_dtype(dtype) or pd.api.types.is_integer_dtype(dtype))
        and not pd.api.types.is_bool_dtype(dtype)
        for dtype in frame.dtypes
    )


def _arrow_csv(frame: pd.DataFrame) -> tuple[bytes, np.ndarray]:
    """Numbers-only rows through Arrow's CSV writer: ~5x faster than DataFrame.to_csv, same values.

    Arrow writes the shortest text that reads back as the same float (1040 where pandas writes
    1040.0) and a missing value (NaN) as an empty field, as pandas does.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    if all(isinstance(dtype, np.dtype) for dtype in frame.dtypes):
        # Plain numpy columns: from_pandas' per-call bookkeeping (~1 ms) dwarfs a small batch's conversion.
        columns = [pa.array(frame.iloc[:, j].to_numpy(), from_pandas=True) for j in range(frame.shape[1])]
        table = pa.Table.from_arrays(columns, names=[str(c) for c in frame.columns])
    else:
        table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink, pa_csv.WriteOptions(include_header=False, quoting_style="none"))
    data = sink.getvalue().to_pybytes()
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    return data, ends


def serialize_rows(frame: pd.DataFrame, content_type: str) -> tuple[bytes, np.ndarray]:
    """All rows as one request body in `content_type`, and the byte offset where each row ends."""
    if content_type == "text/csv" and len(frame.columns) and _all_numbers(frame):
        data, ends = _arrow_csv(frame)
        if len(ends) == len(frame):
            return data, ends
    if content_type == "text/csv":
        lines = _csv_lines(frame)
    else:
        lines = [json.dumps(row, separators=(",", ":")) + "\n" for row in _python_rows(frame)]
    text = "".join(lines)
    if text.isascii():
        sizes = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
    else:
        sizes = np.fromiter((len(line.encode()) for line in lines), dtype=np.int64, count=len(lines))
    return text.encode(), np.cumsum(sizes)


def plan_requests(ends: np.ndarray, max_bytes: int, max_rows: int | None) -> list[tuple[int, int]]:
    """Split rows (given each row's end offset) into [start, stop) ranges under both caps."""
    spans = []
    start, n = 0, len(ends)
    while start < n:
        before = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, before + max_bytes, side="right"))
        if max_rows is not None:
            stop = min(stop, start + max_rows)
        if stop == start:
            raise ValueError(f"row {start} alone is {int(ends[start]) - before} bytes, over {max_bytes}")
        spans.append((start, stop))
        start = stop
    return spans


def _score(item: Any, key: int | str) -> Any:
    if isinstance(item, dict):
        return item[key]
    if isinstance(item, list):
        return item[0] if len(item) == 1 else item[key]
    return item


def _csv_column(body: bytes, column: int, rows: int) -> np.ndarray | None:
    """Column `column` of a plain CSV body with `rows` lines of equal width, parsed without a Python object
    per line (a list per line of a million-line answer keeps the garbage collector busy for seconds);
    None when the body is anything else, so the careful path can say what is wrong with it."""
    if rows == 0 or column < 0 or b'"' in body or b"\r" in body:
        return None
    raw = np.frombuffer(body.rstrip(b"\n"), dtype=np.uint8)
    newlines = np.flatnonzero(raw == ord("\n"))
    if len(newlines) != rows - 1:
        return None
    starts = np.concatenate(([0], newlines + 1))
    per_line = np.add.reduceat((raw == ord(",")).view(np.uint8), starts, dtype=np.int64)
    width = int(per_line[0]) + 1
    if np.any(per_line != width - 1):
        return None
    if column >= width and width > 1:
        return None
    import pyarrow as pa

    tokens = body.decode("ascii", "replace").replace(",", "\n").split("\n")[: rows * width]
    try:
        return pa.array(tokens[column if width > 1 else 0 :: width]).cast(pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def parse_scores(body: bytes, accept: str, score_column: int | str, rows: int, endpoint: str) -> np.ndarray:
    """One float score per row from a response body; a ModelError quoting the body when it does not fit."""
    if accept == "text/csv" and isinstance(score_column, int):
        scores = _csv_column(body, score_column, rows)
        if scores is not None and len(scores) == rows:
            return scores
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelError(f"endpoint {endpoint}: response is not UTF-8 text: {_quote(body)}") from None
    if accept == "application/json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            raise ModelError(f"endpoint {endpoint}: response is not JSON: {_quote(text)}") from None
        items = document.get("predictions") if isinstance(document, dict) else document
        if not isinstance(items, list):
            raise ModelError(
                f"endpoint {endpoint}: JSON response is neither a list nor has 'predictions': {_quote(text)}"
            )
    else:
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if accept == "text/csv":
            items = list(csv.reader(lines)) if '"' in text else [line.split(",") for line in lines]
        else:
            try:
                items = [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                raise ModelError(f"endpoint {endpoint}: response is not JSON lines: {_quote(text)}") from None
    if len(items) != rows:
        raise ModelError(
            f"endpoint {endpoint}: response has {len(items)} lines for {rows} rows sent: {_quote(text)}"
        )
    scores = np.empty(rows)
    for position, item in enumerate(items):
        try:
            value = _score(item, score_column)
            if isinstance(value, bool):
                raise ValueError
            scores[position] = float(value)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ModelError(
                f"endpoint {endpoint}: no numeric score (endpoint.score_column {score_column!r}) "
                f"in response line {position + 1}: {_quote(json.dumps(item) if accept != 'text/csv' else ','.join(item))}"
            ) from None
    return scores


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


# explainer.batch_rows auto for an endpoint: merge rows until their calls fill one request, at most this many.
MAX_AUTO_BATCH_ROWS = 16


def auto_batch_rows(max_request_bytes: float, bytes_per_row: float, call_rows: int) -> int:
    """Explained rows whose model calls (of `call_rows` rows each) together fit one request: a network
    round trip per call is what merging saves; once one call fills a request there is nothing to save."""
    per_call = bytes_per_row * max(call_rows, 1)
    if per_call <= 0:
        return MAX_AUTO_BATCH_ROWS
    return int(max(1, min(MAX_AUTO_BATCH_ROWS, max_request_bytes // per_call)))


def endpoint_batch_rows(
    model: SageMakerModel, nsamples: int | str, background: pd.DataFrame, bytes_per_row: float | None = None
) -> int:
    """explainer.batch_rows auto for this endpoint: each row's coalitions call is nsamples x background rows."""
    call_rows = effective_nsamples(nsamples, background.shape[1]) * len(background)
    if bytes_per_row is None:
        bytes_per_row = measure_bytes_per_row(model, background)
    return auto_batch_rows(model.endpoint.max_payload_mb * BYTES_PER_MB, bytes_per_row, call_rows)


class SageMakerPredictor(Predictor):
    """A model behind a SageMaker runtime endpoint: each predict() is split, sent in parallel and reassembled."""

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
        except NoRegionError:
            raise ModelError(
                f"endpoint {name}: no AWS region; set model.endpoint.region or AWS_DEFAULT_REGION"
            ) from None
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
                    f"{rows} rows, {len(body)} bytes: {_quote(message)}"
                ) from None
            except NoCredentialsError:
                raise ModelError(
                    f"endpoint {name}: boto3 found no AWS credentials (environment, shared config, SSO or role)"
                ) from None
            except NoRegionError:
                raise ModelError(
                    f"endpoint {name}: no AWS region; set model.endpoint.region or AWS_DEFAULT_REGION"
                ) from None
            except (ConnectionError, HTTPClientError, IncompleteReadError) as exc:
                if not last_try:
                    self._backoff(attempt, type(exc).__name__)
                    continue
                raise TransientModelError(
                    f"endpoint {name}: {type(exc).__name__} after {RETRY_ATTEMPTS} attempts: {_quote(str(exc))}"
                ) from None
            except BotoCoreError as exc:
                raise ModelError(f"endpoint {name}: {type(exc).__name__}: {_quote(str(exc))}") from None
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
            ) from None
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


def load_endpoint_predictor(config: SageMakerModel) -> SageMakerPredictor:
    """The configured endpoint as a Predictor."""
    return SageMakerPredictor(config)


def measure_bytes_per_row(model: SageMakerModel, frame: pd.DataFrame) -> float:
    """Mean serialized bytes per row of `frame` in the endpoint's content type."""
    if len(frame) == 0:
        return 0.0
    data, _ = serialize_rows(frame, model.endpoint.content_type)
    return len(data) / len(frame)


def estimate_inference(
    model: SageMakerModel,
    rows_to_explain: int,
    n_features: int,
    background_rows: int,
    nsamples: int | str,
    algorithm: str,
    bytes_per_row: float,
    shards: int = 1,
    batch_rows: int = 1,
    probe_rows: int = 0,
) -> dict[str, float]:
    """Rows and requests a run will send the endpoint (an upper bound for kernel): the flow's probe of the
    model, then the explainer's calls."""
    endpoint = model.endpoint
    max_bytes = endpoint.max_payload_mb * BYTES_PER_MB
    if bytes_per_row > max_bytes:
        raise ModelError(
            f"endpoint {endpoint.name}: one row is ~{bytes_per_row:.0f} bytes, over endpoint.max_payload_mb"
        )
    rows_per_request = int(max_bytes // bytes_per_row) if bytes_per_row > 0 else rows_to_explain + 1
    if endpoint.max_rows_per_request is not None:
        rows_per_request = min(rows_per_request, endpoint.max_rows_per_request)
    rows_per_request = max(rows_per_request, 1)

    def requests(call_rows: int) -> int:
        return math.ceil(call_rows / rows_per_request)

    shards = max(1, min(shards, rows_to_explain))
    shard_rows = math.ceil(rows_to_explain / shards)
    if algorithm in ("auto", "kernel"):
        # Remote models always resolve auto to kernel. Per shard (one explainer each): the background
        # once for the base value; per explained row: f(x) once (also the row's model output), then
        # every coalition over every background row in one call.
        per_row_samples = effective_nsamples(nsamples, n_features)
    elif algorithm == "permutation":
        per_row_samples = int(nsamples) if nsamples != "auto" else max(500, 2 * n_features + 1)
    elif algorithm == "exact":
        per_row_samples = 2**n_features
    else:
        raise ModelError(f"explainer.algorithm {algorithm} needs the model object itself; use kernel")
    synthetic = per_row_samples * background_rows
    # The kernel explainer's f(x) calls are the rows' model outputs; the others ask for them once more.
    kernel = algorithm in ("auto", "kernel")
    outputs_again = 0 if kernel else 1
    inference_rows = probe_rows + shards * background_rows + rows_to_explain * (outputs_again + 1 + synthetic)
    # Kernel rows explained together (batch_rows) send f(x) and their coalitions as one call each.
    # The permutation and exact explainers split a row's masks over several calls, so for them
    # the request count is a lower bound.
    batch = batch_rows if kernel else 1
    sizes = [min(shard_rows, rows_to_explain - start) for start in range(0, rows_to_explain, shard_rows)]
    inference_requests = requests(probe_rows) + sum(
        requests(background_rows)
        + outputs_again * requests(size)
        + sum(
            requests(min(batch, size - first)) + requests(min(batch, size - first) * synthetic)
            for first in range(0, size, batch)
        )
        for size in sizes
    )
    return {
        "inference_rows": inference_rows,
        "inference_requests": inference_requests,
        "inference_bytes": inference_rows * bytes_per_row,
        "nsamples_effective": per_row_samples,
        "rows_per_request": rows_per_request,
        "shards": shards,
    }


def plan_inference(
    model: SageMakerModel,
    rows: pd.DataFrame,
    background: pd.DataFrame,
    explainer: ExplainerConfig,
    algorithm: str,
    shards: int,
    probe_rows: int = 0,
) -> dict[str, float]:
    """estimate_inference for this run's rows and background, bytes per row measured on the background."""
    bytes_per_row = measure_bytes_per_row(model, background)
    batch_rows = explainer.batch_rows
    if batch_rows == "auto":
        batch_rows = endpoint_batch_rows(model, explainer.nsamples, background, bytes_per_row)
    return estimate_inference(
        model,
        len(rows),
        rows.shape[1],
        len(background),
        explainer.nsamples,
        algorithm,
        bytes_per_row,
        shards=shards,
        batch_rows=batch_rows,
        probe_rows=probe_rows,
    )


def check_budget(model: SageMakerModel, estimate: dict[str, float]) -> None:
    """Refuse to start when the estimated inference rows exceed model.budget.max_inference_rows."""
    limit = model.budget.max_inference_rows
    if limit is None or estimate["inference_rows"] <= limit:
        return
    raise BudgetExceeded(
        f"model {model.name}: the explainer would send ~{int(estimate['inference_rows']):,} rows "
        f"in ~{int(estimate['inference_requests']):,} requests to endpoint {model.endpoint.name}, over "
        f"model.budget.max_inference_rows {limit:,}; lower data.explain_rows, background.size or explainer.nsamples"
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
            f"endpoint {endpoint.name}: delete failed: {code} (HTTP {status}): {_quote(message)}"
        ) from None
    except BotoCoreError as exc:
        raise ModelError(
            f"endpoint {endpoint.name}: delete failed: {type(exc).__name__}: {_quote(str(exc))}"
        ) from None
    log.info("deleted endpoint %s", endpoint.name)
