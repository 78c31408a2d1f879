"""What a run will cost an endpoint before it starts: inference rows and requests, the budget, batch_rows auto."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, SageMakerModel, effective_nsamples
from shapline.tasks.common.errors import ModelError
from shapline.tasks.models.sagemaker.wire import BYTES_PER_MB, serialize_rows


@dataclass(frozen=True)
class InferenceEstimate:
    """Rows, requests and bytes a run will send an endpoint (an upper bound for kernel), before it starts."""

    inference_rows: int
    inference_requests: int
    inference_bytes: float
    nsamples_effective: int
    rows_per_request: int
    shards: int


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
) -> InferenceEstimate:
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
        # once for the base value; per batch of explained rows one call: their f(x) (also the rows' model
        # outputs) and every coalition over every background row. Distinct rows only are sent (an upper
        # bound: categorical data repeats synthetic rows, which are sent once).
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
    # The permutation and exact explainers split a row's masks over several calls, so for them
    # the request count is a lower bound.
    batch = batch_rows if kernel else 1
    sizes = [min(shard_rows, rows_to_explain - start) for start in range(0, rows_to_explain, shard_rows)]
    inference_requests = requests(probe_rows) + sum(
        requests(background_rows)
        + outputs_again * requests(size)
        + sum(
            # kernel: one call per batch, its rows' f(x) and all their coalitions together
            requests(min(batch, size - first) * (1 + synthetic))
            if kernel
            else requests(min(batch, size - first)) + requests(min(batch, size - first) * synthetic)
            for first in range(0, size, batch)
        )
        for size in sizes
    )
    return InferenceEstimate(
        inference_rows=int(inference_rows),
        inference_requests=int(inference_requests),
        inference_bytes=float(inference_rows * bytes_per_row),
        nsamples_effective=int(per_row_samples),
        rows_per_request=int(rows_per_request),
        shards=int(shards),
    )


def plan_inference(
    model: SageMakerModel,
    rows: pd.DataFrame,
    background: pd.DataFrame,
    explainer: ExplainerConfig,
    algorithm: str,
    shards: int,
    probe_rows: int = 0,
) -> InferenceEstimate:
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


def over_budget(model: SageMakerModel, estimate: InferenceEstimate) -> str | None:
    """Why the run must not start (the estimate is above model.budget.max_inference_rows), or None: the one
    budget rule, which `run` raises and `validate` reports."""
    limit = model.budget.max_inference_rows
    if limit is None or estimate.inference_rows <= limit:
        return None
    return (
        f"model {model.name}: the explainer would send ~{estimate.inference_rows:,} rows "
        f"in ~{estimate.inference_requests:,} requests to endpoint {model.endpoint.name}, over "
        f"model.budget.max_inference_rows {limit:,}; lower data.explain_rows, background.size or explainer.nsamples"
    )
