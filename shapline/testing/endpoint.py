"""A local endpoint speaking the SageMaker runtime protocol around a joblib model, with injectable faults."""

from __future__ import annotations

import io
import json
import logging
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from shapline.tasks.common.errors import ModelError

log = logging.getLogger(__name__)

_INVOCATIONS = re.compile(r"^/endpoints/([^/]+)/invocations$")
_ACCOUNT = "000000000000"


class _RequestFailed(Exception):
    """An error answer: HTTP status, SageMaker error type and the JSON body."""

    def __init__(self, status: int, error_type: str, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.error_type = error_type
        self.body = body


def _container_error(status: int, message: str) -> _RequestFailed:
    """A failure inside the model container, as SageMaker reports it: 424 ModelError."""
    return _RequestFailed(
        424,
        "ModelError",
        {
            "Message": f'Received client error ({status}) from primary with message "{message}"',
            "OriginalStatusCode": status,
            "OriginalMessage": message,
        },
    )


class EndpointModel:
    """The wrapped model: parses request bodies into frames and renders its outputs."""

    def __init__(self, model_path: str | Path, dtypes: dict[str, str] | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"endpoint model: file not found: {path}")
        try:
            self.model = joblib.load(path)
        except Exception as exc:
            raise ModelError(f"endpoint model: {path}: not a joblib model ({type(exc).__name__})") from exc
        names = getattr(self.model, "feature_names_in_", None)
        self.features = [str(n) for n in names] if names is not None else None
        self.n_features = (
            len(self.features) if self.features else int(getattr(self.model, "n_features_in_", 0))
        )
        classes = getattr(self.model, "classes_", None)
        self.classes = list(classes) if classes is not None else None
        self.dtypes = dtypes

    def _frame(self, table: pd.DataFrame) -> pd.DataFrame | np.ndarray:
        if self.n_features and table.shape[1] != self.n_features:
            raise _container_error(400, f"expected {self.n_features} features per row, got {table.shape[1]}")
        if self.features is None:
            return table.to_numpy(dtype=float)
        table.columns = self.features
        if self.dtypes:
            table = table.astype(self.dtypes)
        return table

    def parse(self, body: bytes, content_type: str) -> pd.DataFrame | np.ndarray:
        """The request body as the model's input, columns named and typed as the model was fit."""
        if not body.strip():
            raise _container_error(400, "empty request body")
        if content_type.startswith("text/csv"):
            try:
                table = pd.read_csv(
                    io.BytesIO(body),
                    header=None,
                    keep_default_na=False,
                    na_values=[""],
                    float_precision="round_trip",
                )
            except (pd.errors.ParserError, ValueError) as exc:
                raise _container_error(400, f"unreadable CSV: {exc}") from exc
            return self._frame(table)
        if content_type.startswith(("application/jsonlines", "application/json")):
            rows = []
            for line in body.decode("utf-8", "replace").splitlines():
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _container_error(400, f"not a JSON line: {line[:80]}") from exc
                if isinstance(item, dict) and "features" in item:
                    item = item["features"]
                if isinstance(item, dict) and self.features:
                    item = [item.get(name) for name in self.features]
                rows.append(item)
            table = pd.DataFrame(rows).fillna(np.nan).infer_objects()
            return self._frame(table)
        raise _container_error(415, f"unsupported content type {content_type!r}")

    def respond(self, inputs: pd.DataFrame | np.ndarray, accept: str, malformed: bool) -> tuple[bytes, str]:
        """The model's answer for `inputs` in the `accept` format."""
        if self.classes is not None:
            proba = np.asarray(self.model.predict_proba(inputs), dtype=float)
            labels = [_plain(self.classes[i]) for i in proba.argmax(axis=1)]
            scores = proba[:, 1].tolist()
        else:
            labels = None
            scores = np.asarray(self.model.predict(inputs), dtype=float).ravel().tolist()
        if malformed:
            scores = scores[:-1]
        if accept in ("", "*/*") or accept.startswith("text/csv"):
            # repr gives the shortest string that reads back as the same float.
            if labels is not None:
                lines = [f"{label},{score!r}\n" for label, score in zip(labels, scores, strict=False)]
            else:
                lines = [f"{score!r}\n" for score in scores]
            return "".join(lines).encode(), "text/csv"
        if labels is not None:
            records = [
                {"predicted_label": label, "probability": score}
                for label, score in zip(labels, scores, strict=False)
            ]
        else:
            records = [{"score": score} for score in scores]
        if accept.startswith("application/jsonlines"):
            text = "".join(json.dumps(r) + "\n" for r in records)
            return text.encode(), "application/jsonlines"
        if accept.startswith("application/json"):
            return json.dumps({"predictions": records}).encode(), "application/json"
        raise _container_error(406, f"unsupported accept type {accept!r}")


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


class EndpointServer:
    """A SageMaker-protocol endpoint on 127.0.0.1 serving one model; a context manager in tests."""

    def __init__(
        self,
        model_path: str | Path,
        name: str,
        port: int = 0,
        *,
        max_payload_bytes: int | None = None,
        throttle_fraction: float = 0.0,
        latency_s: float = 0.0,
        malformed: bool = False,
        reset_requests: tuple[int, int] | None = None,
        seed: int = 0,
        dtypes: dict[str, str] | None = None,
    ) -> None:
        self.model = EndpointModel(model_path, dtypes)
        self.name = name
        self.port = port
        # Options are plain attributes so a test can change them while the server runs.
        self.max_payload_bytes = max_payload_bytes
        self.throttle_fraction = throttle_fraction
        self.latency_s = latency_s
        self.malformed = malformed
        # (first, count): invocations number first .. first + count - 1 (from 1) get their connection
        # dropped instead of an answer, as an endpoint that restarts or a load balancer that resets does.
        self.reset_requests = reset_requests
        self.deleted = False
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._counts = dict.fromkeys(
            (
                "requests",
                "ok",
                "throttled",
                "too_large",
                "rejected",
                "rows",
                "bytes",
                "max_body_bytes",
                "max_in_flight",
                "reset",
            ),
            0,
        )
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint_url to give boto3."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats(self) -> dict[str, int]:
        """Counts of requests received, answered, throttled and rejected; rows, bytes and peaks."""
        with self._lock:
            return dict(self._counts)

    def _bind(self) -> ThreadingHTTPServer:
        handler = type("Handler", (_Handler,), {"endpoint": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        return httpd

    def start(self) -> EndpointServer:
        """Listen and serve from a background thread."""
        httpd = self._bind()
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.05,), name=f"endpoint-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> EndpointServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def serve_forever(self, ready: Callable[[str], None] | None = None) -> None:
        """Listen and serve in this thread until interrupted."""
        httpd = self._bind()
        if ready is not None:
            ready(self.url)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
            self._httpd = None

    def _count(self, **increments: int) -> None:
        with self._lock:
            for key, value in increments.items():
                self._counts[key] += value

    def _entered(self, size: int) -> None:
        with self._lock:
            self._counts["requests"] += 1
            self._counts["bytes"] += size
            self._counts["max_body_bytes"] = max(self._counts["max_body_bytes"], size)
            self._in_flight += 1
            self._counts["max_in_flight"] = max(self._counts["max_in_flight"], self._in_flight)

    def _left(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _reset_now(self) -> bool:
        with self._lock:
            if self.reset_requests is None:
                return False
            first, count = self.reset_requests
            if first <= self._counts["requests"] < first + count:
                self._counts["reset"] += 1
                return True
            return False

    def _throttle_now(self) -> bool:
        with self._lock:
            return self._random.random() < self.throttle_fraction

    def invoke(self, name: str, body: bytes, content_type: str, accept: str) -> tuple[bytes, str]:
        """Answer one invocation, or raise _RequestFailed as SageMaker would."""
        if name != self.name or self.deleted:
            self._count(rejected=1)
            raise _RequestFailed(
                400, "ValidationError", {"message": f"Endpoint {name} of account {_ACCOUNT} not found."}
            )
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.throttle_fraction and self._throttle_now():
            self._count(throttled=1)
            raise _RequestFailed(429, "ThrottlingException", {"message": "Rate exceeded"})
        if self.max_payload_bytes is not None and len(body) > self.max_payload_bytes:
            self._count(too_large=1)
            raise _RequestFailed(
                413,
                "ValidationError",
                {
                    "message": f"Request body of {len(body)} bytes exceeds the maximum of "
                    f"{self.max_payload_bytes} bytes for endpoint {name}."
                },
            )
        try:
            inputs = self.model.parse(body, content_type)
            answer = self.model.respond(inputs, accept, self.malformed)
        except _RequestFailed:
            self._count(rejected=1)
            raise
        except Exception as exc:
            self._count(rejected=1)
            raise _container_error(500, f"{type(exc).__name__}: {exc}") from exc
        self._count(ok=1, rows=len(inputs))
        return answer

    def delete(self, name: str) -> None:
        """DeleteEndpoint: the endpoint stops answering; an unknown or deleted one is an error."""
        if name != self.name or self.deleted:
            arn = f"arn:aws:sagemaker:local:{_ACCOUNT}:endpoint/{name}"
            raise _RequestFailed(400, "ValidationException", {"message": f'Could not find endpoint "{arn}".'})
        self.deleted = True


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as botocore's connection pool expects."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm on, the body would wait for the
    # client's delayed ACK (~40 ms on Linux), a hidden latency no real endpoint has.
    disable_nagle_algorithm = True
    endpoint: EndpointServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("x-amzn-RequestId", f"local-{time.monotonic_ns()}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, failure: _RequestFailed, json_protocol: bool = False) -> None:
        if json_protocol:
            body = {"__type": failure.error_type, **failure.body}
            self._reply(
                failure.status, json.dumps(body).encode(), {"Content-Type": "application/x-amz-json-1.1"}
            )
            return
        headers = {"Content-Type": "application/json", "x-amzn-ErrorType": failure.error_type}
        self._reply(failure.status, json.dumps(failure.body).encode(), headers)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = self.headers.get("X-Amz-Target", "")
        if self.path == "/" and target == "SageMaker.DeleteEndpoint":
            try:
                self.endpoint.delete(str(json.loads(body or b"{}").get("EndpointName", "")))
            except _RequestFailed as failure:
                self._fail(failure, json_protocol=True)
                return
            self._reply(200, b"{}", {"Content-Type": "application/x-amz-json-1.1"})
            return
        match = _INVOCATIONS.match(self.path.split("?", 1)[0])
        if match is None:
            self._fail(_RequestFailed(404, "UnknownOperationException", {"message": f"no route {self.path}"}))
            return
        self.endpoint._entered(len(body))
        if self.endpoint._reset_now():
            self.endpoint._left()
            # No answer, and a TCP reset rather than a clean close: the client sees a dropped connection.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        try:
            answer, content_type = self.endpoint.invoke(
                match.group(1),
                body,
                self.headers.get("Content-Type", "text/csv"),
                self.headers.get("Accept", "text/csv"),
            )
        except _RequestFailed as failure:
            self._fail(failure)
            return
        finally:
            self.endpoint._left()
        self._reply(
            200, answer, {"Content-Type": content_type, "x-Amzn-Invoked-Production-Variant": "AllTraffic"}
        )


def serve(
    model_path: str | Path,
    name: str,
    port: int = 8080,
    ready: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Serve `model_path` as endpoint `name` on 127.0.0.1:`port` until interrupted."""
    EndpointServer(model_path, name, port, **options).serve_forever(ready)
