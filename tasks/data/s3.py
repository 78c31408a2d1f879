"""Read the data to explain from S3 (or an S3-compatible store such as MinIO) through boto3."""

from __future__ import annotations

import re
from typing import Any

from shapline.tasks.common.config import S3Config
from shapline.tasks.common.errors import DataError, one_line
from shapline.tasks.data.sources import DataSource

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")

# botocore's standard mode retries throttling, 5xx and connection errors with jittered backoff;
# five attempts ride out a brief outage without hiding a dead endpoint for minutes.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0

_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_EXPECTED = "expected s3://<bucket>/<key>.csv or .parquet, optionally ?versionId=<id>"

_MISSING_BUCKET = {"NoSuchBucket"}
_MISSING_OBJECT = {"NoSuchKey", "NoSuchVersion", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_WRONG_REGION = {
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "301",
    "IllegalLocationConstraintException",
}


def parse_s3_uri(uri: str) -> tuple[str, str, str | None]:
    """Bucket, key and optional version id of s3://bucket/key[?versionId=...]."""
    scheme, sep, rest = uri.partition("://")
    if scheme != "s3" or not sep:
        raise DataError(f"data.source: {uri!r} is not an s3:// URI ({_EXPECTED})")
    bucket, _, key = rest.partition("/")
    # Split on the last '?' only when it starts a query we understand, so keys may contain '?'.
    version = None
    head, qmark, query = key.rpartition("?")
    if qmark and query.startswith("versionId="):
        key, version = head, query.removeprefix("versionId=")
        if not version:
            raise DataError(f"data.source: {uri}: empty versionId ({_EXPECTED})")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise DataError(f"data.source: {uri}: {bucket!r} is not a valid bucket name ({_EXPECTED})")
    if not key or key.endswith("/"):
        raise DataError(f"data.source: {uri}: no object key after the bucket ({_EXPECTED})")
    if not key.lower().endswith(TABLE_SUFFIXES):
        raise DataError(f"data.source: {uri}: expected a .csv or .parquet file")
    return bucket, key, version


def s3_client(config: S3Config) -> Any:
    """A boto3 S3 client for data.s3; credentials come only from boto3's standard chain."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
    }
    if config.endpoint_url:
        # S3-compatible stores (MinIO, Ceph, moto) rarely resolve bucket.host names; path style always works.
        options["s3"] = {"addressing_style": "path"}
    # A session per client: boto3's shared default session is not safe to create clients from in threads.
    session = boto3.session.Session()
    return session.client(
        "s3", endpoint_url=config.endpoint_url, region_name=config.region, config=Config(**options)
    )


class S3Object(DataSource):
    """A CSV or Parquet object in S3 or an S3-compatible store."""

    def __init__(self, uri: str, config: S3Config) -> None:
        self.uri = uri
        self.bucket, self.key, self.version = parse_s3_uri(uri)
        self.config = config

    @property
    def suffix(self) -> str:
        return "." + self.key.rsplit(".", 1)[-1].lower()

    def read_bytes(self) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        request = {"Bucket": self.bucket, "Key": self.key}
        if self.version:
            request["VersionId"] = self.version
        try:
            return self._get(s3_client(self.config), request)
        except ClientError as exc:
            raise self._client_error(exc) from exc
        except BotoCoreError as exc:
            raise self._transport_error(exc) from exc

    def _get(self, client: Any, request: dict[str, str]) -> bytes:
        from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        # botocore retries the request, not the body download; a connection dropped mid-body
        # (large Parquet files) is retried here, with a fresh GET.
        for _ in range(MAX_ATTEMPTS - 1):
            body = client.get_object(**request)["Body"]
            try:
                return body.read()
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
                continue
        return client.get_object(**request)["Body"].read()

    def _where(self) -> str:
        return f" at {self.config.endpoint_url}" if self.config.endpoint_url else ""

    def _client_error(self, exc: Any) -> DataError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        prefix = f"data.source: {self.uri}"
        if code in _MISSING_BUCKET:
            return DataError(f"{prefix}: bucket {self.bucket!r} does not exist{self._where()}")
        if code in _MISSING_OBJECT or status == "404":
            what = f"version {self.version!r} of key" if self.version else "key"
            return DataError(f"{prefix}: no object with {what} {self.key!r} in bucket {self.bucket!r}")
        if code in _BAD_CREDENTIALS:
            return DataError(
                f"{prefix}: the AWS credentials were rejected ({code}); check boto3's credential chain"
            )
        if code in _WRONG_REGION or status == "301":
            region = error.get("Region") or exc.response.get("ResponseMetadata", {}).get(
                "HTTPHeaders", {}
            ).get("x-amz-bucket-region")
            hint = f"; set data.s3.region: {region}" if region else "; set data.s3.region"
            return DataError(f"{prefix}: bucket {self.bucket!r} is in another region{hint}")
        if code in _DENIED or status == "403":
            return DataError(
                f"{prefix}: access denied to {self.key!r} in bucket {self.bucket!r} "
                "(s3:GetObject needed; without s3:ListBucket S3 also says this for a missing key)"
            )
        message = one_line(error.get("Message", ""))
        return DataError(f"{prefix}: S3 error {code or status}: {message}")

    def _transport_error(self, exc: Exception) -> DataError:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        prefix = f"data.source: {self.uri}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return DataError(
                f"{prefix}: no usable AWS credentials "
                "(boto3 looks in the environment, ~/.aws and the instance role)"
            )
        message = one_line(exc)
        return DataError(
            f"{prefix}: cannot read from S3{self._where()} after {MAX_ATTEMPTS} attempts: {message}"
        )
