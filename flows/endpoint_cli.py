"""`shapline endpoint serve`: a local SageMaker-protocol endpoint around a joblib model, for trying kind sagemaker."""

from __future__ import annotations

import argparse
from typing import Any

from shapline.tasks.models.sagemaker.wire import BYTES_PER_MB


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the `endpoint` command (with its `serve` action) to the CLI's subparsers."""
    endpoint = commands.add_parser("endpoint", help="a local SageMaker-protocol endpoint for testing")
    actions = endpoint.add_subparsers(dest="endpoint_command", required=True)
    serve = actions.add_parser("serve", help="serve a joblib model at /endpoints/NAME/invocations")
    serve.add_argument("--model", required=True, metavar="PATH", help="joblib scikit-learn or XGBoost model")
    serve.add_argument("--name", required=True, help="the endpoint name clients call")
    serve.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: %(default)s)")
    serve.add_argument(
        "--max-payload-mb", type=float, default=None, metavar="X", help="answer 413 to larger bodies"
    )
    serve.add_argument(
        "--throttle-fraction",
        type=_fraction,
        default=0.0,
        metavar="F",
        help="answer this fraction of requests with 429 ThrottlingException",
    )
    serve.add_argument("--latency-ms", type=float, default=0.0, metavar="N", help="delay every answer")
    serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return endpoint


def run(args: argparse.Namespace) -> int:
    """Run the parsed `endpoint` command; returns the exit code."""
    from shapline.testing.endpoint import serve

    max_payload = None if args.max_payload_mb is None else int(args.max_payload_mb * BYTES_PER_MB)

    def ready(url: str) -> None:
        print(f"endpoint {args.name} ({args.model}) at {url}/endpoints/{args.name}/invocations")
        print(f"use model.endpoint.endpoint_url: {url}; Ctrl-C stops", flush=True)

    serve(
        args.model,
        args.name,
        args.port,
        ready=ready,
        max_payload_bytes=max_payload,
        throttle_fraction=args.throttle_fraction,
        latency_s=args.latency_ms / 1000.0,
    )
    return 0
