"""s3:// sources read through boto3 over HTTP from a real (moto) S3 server on loopback."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

import boto3
import pandas as pd
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from shapline.tasks.common.config import DataConfig, S3Config
from shapline.tasks.common.errors import DataError
from shapline.tasks.data import s3
from shapline.tasks.data.loading import load_data
from shapline.tasks.data.s3 import S3Object, parse_s3_uri
from shapline.tasks.data.sources import parse_table

BUCKET = "shapline-data"
TABLE = pd.DataFrame({"age": [31, 47, 52], "income": [1.5, 2.25, None], "city": ["Lyon", "Oslo", "Lima"]})


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, for the whole module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Dummy credentials (moto accepts any) and no user AWS files or proxies in the way."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("NO_PROXY", ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"])))


@pytest.fixture
def bucket(endpoint: str, credentials: None) -> Any:
    """A fresh bucket holding the table as CSV and as Parquet."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="tables/people.csv", Body=TABLE.to_csv(index=False).encode())
    parquet = io.BytesIO()
    TABLE.to_parquet(parquet, index=False)
    client.put_object(Bucket=BUCKET, Key="tables/people.parquet", Body=parquet.getvalue())
    yield client
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _config(endpoint: str, source: str) -> DataConfig:
    return DataConfig(source=source, s3={"endpoint_url": endpoint})


@pytest.mark.parametrize("key", ["tables/people.csv", "tables/people.parquet"])
def test_reads_the_same_table_pandas_reads_from_the_same_bytes(endpoint: str, bucket: Any, key: str) -> None:
    uri = f"s3://{BUCKET}/{key}"
    loaded = load_data(_config(endpoint, uri))
    stored = bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    reference = (
        pd.read_csv(io.BytesIO(stored)) if key.endswith(".csv") else pd.read_parquet(io.BytesIO(stored))
    )
    pd.testing.assert_frame_equal(loaded.frame.reset_index(drop=True), reference)
    pd.testing.assert_frame_equal(loaded.frame, parse_table(stored, "." + key.rsplit(".", 1)[1], uri))
    assert loaded.uri == uri


def test_missing_key_names_the_key(endpoint: str, bucket: Any) -> None:
    uri = f"s3://{BUCKET}/tables/absent.csv"
    with pytest.raises(DataError) as error:
        load_data(_config(endpoint, uri))
    assert str(error.value) == (
        f"data.source: {uri}: no object with key 'tables/absent.csv' in bucket '{BUCKET}'"
    )


def test_missing_bucket_names_the_bucket(endpoint: str, bucket: Any) -> None:
    uri = "s3://no-such-bucket/people.csv"
    with pytest.raises(DataError) as error:
        load_data(_config(endpoint, uri))
    assert str(error.value) == (f"data.source: {uri}: bucket 'no-such-bucket' does not exist at {endpoint}")


def test_region_is_passed_to_the_client(endpoint: str, bucket: Any) -> None:
    config = DataConfig(
        source=f"s3://{BUCKET}/tables/people.csv", s3={"endpoint_url": endpoint, "region": "eu-west-3"}
    )
    client = s3.s3_client(config.s3)
    assert client.meta.region_name == "eu-west-3"
    assert client.meta.config.retries["mode"] == "standard"
    assert len(load_data(config).frame) == len(TABLE)


def test_unreachable_endpoint_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 1)
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    config = _config("http://127.0.0.1:9", f"s3://{BUCKET}/tables/people.csv")
    with pytest.raises(
        DataError, match=r"^data.source: s3://shapline-data/tables/people.csv: cannot read from S3 at"
    ):
        load_data(config)


def _client_error(code: str, status: int, **extra: Any) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "m", **extra},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDenied", 403, "access denied to 'k.csv' in bucket 'bkt'"),
        ("InvalidAccessKeyId", 403, "the AWS credentials were rejected (InvalidAccessKeyId)"),
        ("PermanentRedirect", 301, "bucket 'bkt' is in another region; set data.s3.region"),
        ("SlowDown", 503, "S3 error SlowDown: m"),
    ],
)
def test_client_errors_become_one_line(code: str, status: int, expected: str) -> None:
    source = S3Object("s3://bkt/k.csv", S3Config())
    message = str(source._client_error(_client_error(code, status)))
    assert message.startswith(f"data.source: s3://bkt/k.csv: {expected}")


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("s3://bk1/k.csv", ("bk1", "k.csv", None)),
        ("s3://my.bucket/a/b/c.parquet", ("my.bucket", "a/b/c.parquet", None)),
        ("s3://bkt/data.csv?versionId=3HL4kqtJ", ("bkt", "data.csv", "3HL4kqtJ")),
    ],
)
def test_parse_s3_uri(uri: str, parsed: tuple[str, str, str | None]) -> None:
    assert parse_s3_uri(uri) == parsed


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://", "is not a valid bucket name"),
        ("s3:///k.csv", "is not a valid bucket name"),
        ("s3://bucket", "no object key after the bucket"),
        ("s3://bucket/folder/", "no object key after the bucket"),
        ("s3://bucket/table.json", "expected a .csv or .parquet file"),
        ("s3://bad bucket/k.csv", "is not a valid bucket name"),
        ("s3://bucket/k.csv?versionId=", "empty versionId"),
    ],
)
def test_malformed_uri_is_refused_before_any_request(uri: str, expected: str) -> None:
    with pytest.raises(DataError, match="^data.source: ") as error:
        S3Object(uri, S3Config())
    assert expected in str(error.value)


def test_version_id_reads_that_version(endpoint: str, bucket: Any) -> None:
    bucket.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    first = bucket.put_object(Bucket=BUCKET, Key="tables/v.csv", Body=b"a\n1\n")["VersionId"]
    bucket.put_object(Bucket=BUCKET, Key="tables/v.csv", Body=b"a\n2\n")
    try:
        pinned = load_data(_config(endpoint, f"s3://{BUCKET}/tables/v.csv?versionId={first}"))
        latest = load_data(_config(endpoint, f"s3://{BUCKET}/tables/v.csv"))
        assert pinned.frame["a"].tolist() == [1]
        assert latest.frame["a"].tolist() == [2]
    finally:
        for version in bucket.list_object_versions(Bucket=BUCKET).get("Versions", []):
            bucket.delete_object(Bucket=BUCKET, Key=version["Key"], VersionId=version["VersionId"])


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_a_repeated_column_name_in_an_s3_object_is_named(endpoint: str, bucket: Any, suffix: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["age", "income", "age"]
    if suffix == "csv":
        body = b"age,income,age\n31,1.5,7\n47,2.25,8\n"
    else:
        buffer = io.BytesIO()
        pq.write_table(
            pa.Table.from_arrays(
                [pa.array([31, 47]), pa.array([1.5, 2.25]), pa.array([7, 8])], names=columns
            ),
            buffer,
        )
        body = buffer.getvalue()
    bucket.put_object(Bucket=BUCKET, Key=f"tables/doubled.{suffix}", Body=body)
    loaded = load_data(_config(endpoint, f"s3://{BUCKET}/tables/doubled.{suffix}"))
    assert loaded.repeated_columns == ("age",)
