"""Comparison 3: a SageMaker-protocol endpoint, the notebook's sequential calls vs shapline's batched concurrent ones."""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.harness import ComparisonResult, Context, Measurement, Ratio, Side, alternate
from benchmarks.workloads import (
    KERNEL_TOLERANCE,
    breast_cancer,
    explain_sample,
    per_row_kernel_values,
    random_background,
    run_flow,
    values_matrix,
    write_config,
)

# payload: the classic notebook settings, every coalition batch split by the payload limit (CPU-bound here,
# where the endpoint shares the client's cores); latency: small batches, one request each (latency-bound).
FULL = {
    "workloads": {
        "payload": {"rows": 8, "background": 50, "nsamples": "auto"},
        "latency": {"rows": 96, "background": 5, "nsamples": 100},
    },
    # Shard workers are client CPU (shap's own work, CSV): 2 per core; requests in flight come from
    # max_concurrency (8) and, for small calls, from rows explained together (explainer.batch_rows).
    "workers": 4,
    "latency_ms": 20.0,
    "limit_mb": 6.0,
    "nodelay": True,
    "seed": 0,
}
QUICK = {
    "workloads": {"latency": {"rows": 4, "background": 5, "nsamples": 100}},
    "workers": 4,
    "latency_ms": 20.0,
    "limit_mb": 6.0,
    "nodelay": True,
    "seed": 0,
}

ENDPOINT = "bench-endpoint"
BYTES_PER_MB = 1_000_000


def _serve(connection: Any, model_path: str, latency_s: float, max_payload_bytes: int, nodelay: bool) -> None:
    """The endpoint in its own process (its CSV parsing must not share the client's GIL); answers stats requests."""
    from shapline.testing import endpoint as endpoint_server
    from shapline.testing.endpoint import EndpointServer

    # The server sets TCP_NODELAY (the default, nodelay=true); with Nagle on, its body write waits for the
    # client's delayed ACK (~40 ms), a hidden 40 ms on top of the 20 ms latency asked for.
    endpoint_server._Handler.disable_nagle_algorithm = nodelay

    with EndpointServer(
        model_path, ENDPOINT, latency_s=latency_s, max_payload_bytes=max_payload_bytes
    ) as server:
        connection.send(server.url)
        while True:
            message = connection.recv()
            if message == "stop":
                break
            connection.send(server.stats)


@contextmanager
def endpoint_process(
    model_path: str, latency_s: float, max_payload_bytes: int, nodelay: bool
) -> Iterator[tuple[str, Callable[[], dict[str, float]]]]:
    """Start the local endpoint in a child process; yield its URL and a function returning its counters and CPU seconds."""
    import psutil

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(
        target=_serve, args=(child, model_path, latency_s, max_payload_bytes, nodelay), daemon=True
    )
    process.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the local endpoint did not start within 120 s")
        url = parent.recv()

        server = psutil.Process(process.pid)
        client = psutil.Process()

        def stats() -> dict[str, float]:
            parent.send("stats")
            counts = dict(parent.recv())
            server_cpu, client_cpu = server.cpu_times(), client.cpu_times()
            counts["server_cpu_s"] = server_cpu.user + server_cpu.system
            counts["client_cpu_s"] = client_cpu.user + client_cpu.system
            return counts

        yield url, stats
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()


class NotebookPredictor:
    """The seed notebook's predict function: the whole batch as CSV, sent in <= limit chunks, one after another."""

    def __init__(self, url: str, limit_bytes: int) -> None:
        import boto3

        self.client = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1")
        self.limit = limit_bytes
        self.requests = 0
        self.bytes = 0
        self.max_body = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        lines = pd.DataFrame(np.atleast_2d(batch)).to_csv(header=False, index=False).splitlines(keepends=True)
        bodies, current, size = [], [], 0
        for line in lines:
            if current and size + len(line) > self.limit:
                bodies.append("".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line)
        bodies.append("".join(current))
        scores = []
        for body in bodies:
            data = body.encode()
            response = self.client.invoke_endpoint(
                EndpointName=ENDPOINT, ContentType="text/csv", Accept="text/csv", Body=data
            )
            self.requests += 1
            self.bytes += len(data)
            self.max_body = max(self.max_body, len(data))
            text = response["Body"].read().decode()
            scores += [float(line.split(",")[1]) for line in text.splitlines() if line]
        return np.asarray(scores)


def run(context: Context, params: dict[str, Any]) -> ComparisonResult:
    """The notebook's KernelExplainer over sequential endpoint calls vs the flow with kind sagemaker, per workload."""
    dataset = breast_cancer(context.cache)
    frame = dataset.frame()[dataset.features]
    limit = int(params["limit_mb"] * BYTES_PER_MB)
    workers = params["workers"]
    result = ComparisonResult(
        name="endpoint",
        title="SageMaker-protocol endpoint: notebook's sequential requests vs shapline's batched concurrent requests",
        workload={
            "data": f"breast_cancer {len(frame)}x{len(dataset.features)}, XGBoost behind a local endpoint process",
            "workloads": params["workloads"],
            "latency_ms": params["latency_ms"],
            "tcp_nodelay": params["nodelay"],
            "payload_limit_bytes": limit,
            "shapline": f"thread x{workers}, one shard per worker, max_payload_mb 5, max_concurrency 8",
        },
    )
    sides: list[Side] = []
    with endpoint_process(
        str(dataset.model_path), params["latency_ms"] / 1000.0, limit, params["nodelay"]
    ) as (url, stats):

        def counted(work: Callable[[], Measurement]) -> Callable[[], Measurement]:
            def run_side() -> Measurement:
                before = stats()
                measured = work()
                after = stats()
                sent = {
                    key: after[key] - before[key]
                    for key in ("requests", "bytes", "too_large", "rows", "server_cpu_s", "client_cpu_s")
                }
                measured.extra.update(
                    server_cpu_s=sent["server_cpu_s"],
                    client_cpu_s=sent["client_cpu_s"],
                    requests=sent["requests"],
                    bytes_per_request=sent["bytes"] / max(sent["requests"], 1),
                    rows_per_request=sent["rows"] / max(sent["requests"], 1),
                    too_large=sent["too_large"],
                    server_max_body_bytes=after["max_body_bytes"],
                )
                return measured

            return run_side

        for label, workload in params["workloads"].items():
            rows = explain_sample(frame, workload["rows"], params["seed"])
            background = random_background(frame, workload["background"], params["seed"]).to_numpy()
            config = write_config(
                context.folder("endpoint"),
                f"endpoint-{label}",
                model={
                    "name": "bench-endpoint",
                    "kind": "sagemaker",
                    "endpoint": {"name": ENDPOINT, "endpoint_url": url, "region": "us-east-1"},
                },
                data={
                    "source": str(dataset.data_path),
                    "target": "target",
                    "explain_rows": len(rows),
                    "seed": params["seed"],
                },
                background={"method": "random", "size": workload["background"], "seed": params["seed"]},
                explainer={
                    "algorithm": "kernel",
                    "link": "logit",
                    "nsamples": workload["nsamples"],
                    "l1_reg": "aic",
                    "seed": params["seed"],
                },
                shards={"size": math.ceil(len(rows) / workers), "runner": "thread", "workers": workers},
            )
            sides.append(
                Side(
                    f"{label}: notebook",
                    counted(_notebook(url, limit, background, rows, workload, params["seed"])),
                    "",
                )
            )
            sides.append(
                Side(f"{label}: shapline x{workers}", counted(_shapline(config, rows, dataset.features)), "")
            )
        result.descriptions = {
            s.name: (
                "shap.KernelExplainer(f_notebook): CSV, <= 6 MB chunks, one request at a time"
                if s.name.endswith("notebook")
                else f"the flow, kind sagemaker, thread x{workers}: <= 5 MB requests, up to 8 in flight"
            )
            for s in sides
        }
        result.sides = alternate(sides, context.reps, False, context.log)
    for notebook, shapline in zip(sides[::2], sides[1::2], strict=True):
        result.check(notebook.name, shapline.name, KERNEL_TOLERANCE)
    for notebook, shapline in zip(sides[::2], sides[1::2], strict=True):
        result.ratio(
            Ratio(
                f"{notebook.name} / shapline, explain phase", notebook.name, shapline.name, "explain_s", 5.0
            )
        )
        result.ratio(Ratio(f"{notebook.name} / shapline, whole flow", notebook.name, shapline.name))
    over = max(max(m.extra["server_max_body_bytes"] for m in samples) for samples in result.sides.values())
    too_large = sum(m.extra["too_large"] for samples in result.sides.values() for m in samples)
    result.record_ratio(
        "largest request / limit", over / limit, 1.0, True, f"{too_large:.0f} requests answered 413"
    )
    result.notes.append(
        "Both sides seed numpy per row as shapline does (np.random.seed(row_seed(seed, row_id)) before each row), "
        "so they draw the same coalitions and send the same rows. The endpoint runs in its own process on the "
        "same 2 cores: its CSV parsing and prediction compete with the client, unlike a real SageMaker endpoint."
    )
    return result


def _notebook(
    url: str, limit: int, background: np.ndarray, rows: pd.DataFrame, workload: dict[str, Any], seed: int
) -> Callable[[], Measurement]:
    def run_side() -> Measurement:
        predict = NotebookPredictor(url, limit)
        started = time.perf_counter()
        values = per_row_kernel_values(predict, background, rows, workload["nsamples"], "aic", seed)
        seconds = time.perf_counter() - started
        return Measurement(seconds, values, {"explain_s": seconds, "client_max_body_bytes": predict.max_body})

    return run_side


def _shapline(config: Any, rows: pd.DataFrame, features: list[str]) -> Callable[[], Measurement]:
    def run_side() -> Measurement:
        flow = run_flow(config)
        assert flow.values is not None
        return Measurement(
            flow.seconds,
            values_matrix(flow.values, features, rows.index.to_numpy()),
            {
                "explain_s": flow.summary["explain_s"],
                "client_max_body_bytes": flow.metrics.get("inference_max_request_bytes_sent", float("nan")),
            },
        )

    return run_side
