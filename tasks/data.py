"""Load the data to explain from a local file (or, through the same interface, remote storage)."""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import DataConfig
from tasks.errors import DataError

ROW_ID = "row_id"
# Hashing reads the file in pieces of this size, so the fingerprint never holds the file's bytes.
HASH_CHUNK_BYTES = 1 << 20


class DataSource(ABC):
    """Somewhere a CSV or Parquet file can be read from."""

    uri: str

    @abstractmethod
    def read_bytes(self) -> bytes:
        """The file's content."""

    @property
    def suffix(self) -> str:
        return Path(self.uri.split("?", 1)[0]).suffix.lower()

    def read_table(self) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
        """The parsed table, the sha256 of the file's bytes and the column names the file repeats."""
        content = self.read_bytes()
        frame = parse_table(content, self.suffix, self.uri)
        return frame, hashlib.sha256(content).hexdigest(), repeated_columns(frame, content, self.suffix)


class LocalFile(DataSource):
    """A file on this machine."""

    def __init__(self, path: str, config: DataConfig | None = None) -> None:
        self.uri = path

    def _path(self) -> Path:
        path = Path(self.uri)
        if not path.is_file():
            raise DataError(f"data.source: file not found: {path}")
        return path

    def read_bytes(self) -> bytes:
        return self._path().read_bytes()

    def read_table(self) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
        """Parse from the path while a thread hashes the file in chunks: the bytes are never held whole."""
        path = self._path()
        before = path.stat()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shapline-hash") as pool:
            digest = pool.submit(file_sha256, path)
            frame = parse_table(path, self.suffix, self.uri)
            sha256 = digest.result()
        after = path.stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise DataError(f"data.source: {path} changed while it was read; run again")
        return frame, sha256, repeated_columns(frame, path, self.suffix)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in chunks of HASH_CHUNK_BYTES."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# Remote storages, by URI scheme: the module that defines a DataSource subclass taking (uri, config).
_SCHEMES: dict[str, tuple[str, str]] = {"s3": ("tasks.s3", "S3Object")}


def open_source(config: DataConfig) -> DataSource:
    """The DataSource for data.source: a local path, or a URI whose scheme has a registered storage."""
    import importlib

    uri = config.source
    scheme, sep, _ = uri.partition("://")
    if not sep:
        return LocalFile(uri, config)
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise DataError(
            f"data.source: unsupported scheme {scheme!r} in {uri} (expected a local path or {known})"
        )
    module, name = _SCHEMES[scheme]
    return getattr(importlib.import_module(module), name)(uri, config)


@dataclass(frozen=True)
class LoadedData:
    """The whole table (row_id = position in the file), a fingerprint of the file's bytes, and any column
    name the file repeats (pandas renames a repeated CSV column `x` to `x.1`: validation refuses it)."""

    frame: pd.DataFrame
    sha256: str
    uri: str
    repeated_columns: tuple[str, ...] = ()


def parse_table(content: bytes | Path, suffix: str, uri: str) -> pd.DataFrame:
    """Parse CSV or Parquet (bytes, or a local file) into a DataFrame indexed by row position."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = io.BytesIO(content) if isinstance(content, bytes) else content
    try:
        if suffix == ".csv":
            frame = pd.read_csv(source)
        elif suffix in (".parquet", ".pq"):
            # From a file, read page by page rather than whole column chunks first: the same table,
            # without a second copy of the file's bytes at the peak.
            options = {} if isinstance(content, bytes) else {"pre_buffer": False, "buffer_size": 1 << 20}
            repeated = repeated_names(list(pq.read_schema(source).names))
            if isinstance(source, io.BytesIO):
                source.seek(0)
            if repeated:
                # pandas' reader refuses a repeated name; this one keeps both columns for validation to name.
                frame = pq.ParquetFile(source, **options).read().to_pandas()
            else:
                frame = pd.read_parquet(source, **options)
            # Arrow's allocator keeps freed pages; hand them back before the SHAP phase needs the memory.
            pa.default_memory_pool().release_unused()
        else:
            raise DataError(f"data.source: {uri}: expected a .csv or .parquet file")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"data.source: {uri}: cannot parse as {suffix[1:]}: {' '.join(str(exc).split())}"
        ) from None
    frame = frame.reset_index(drop=True)
    frame.index.name = ROW_ID
    return frame


def repeated_names(names: list[object]) -> tuple[str, ...]:
    """Column names that appear more than once, in the order they first appear."""
    seen: dict[str, int] = {}
    for name in names:
        seen[str(name)] = seen.get(str(name), 0) + 1
    return tuple(name for name, count in seen.items() if count > 1)


def repeated_columns(frame: pd.DataFrame, content: bytes | Path, suffix: str) -> tuple[str, ...]:
    """Column names the file has more than once. Parquet keeps them (the frame has both); pandas renames a
    CSV's repeated `x` to `x.1`, so a CSV whose names have a dot gets its header row read again as it is."""
    repeated = repeated_names(list(frame.columns))
    if repeated or suffix != ".csv" or not any("." in str(c) for c in frame.columns):
        return repeated
    source = io.BytesIO(content) if isinstance(content, bytes) else content
    header = pd.read_csv(source, header=None, nrows=1, dtype=str, keep_default_na=False)
    return repeated_names(header.iloc[0].tolist()) if len(header) else ()


def load_data(config: DataConfig) -> LoadedData:
    """Read the configured source and fingerprint it."""
    source = open_source(config)
    frame, sha256, repeated = source.read_table()
    return LoadedData(frame=frame, sha256=sha256, uri=source.uri, repeated_columns=repeated)


def feature_columns(frame: pd.DataFrame, config: DataConfig, model_features: list[str] | None) -> list[str]:
    """The features to explain, in model order: configured, else the model's own, else all but target/drop."""
    if config.features is not None:
        return list(config.features)
    if model_features is not None:
        return list(model_features)
    excluded = set(config.drop) | ({config.target} if config.target else set())
    return [column for column in frame.columns if column not in excluded]


def select_explain_rows(frame: pd.DataFrame, explain_rows: int | str, seed: int) -> pd.DataFrame:
    """The rows to explain, in row order: all of them, or a seeded sample without replacement."""
    if explain_rows == "all" or int(explain_rows) >= len(frame):
        return frame
    sampled = frame.sample(n=int(explain_rows), random_state=seed)
    return sampled.sort_index()


@task(name="load-data", cache_policy=NO_CACHE)
def load_data_task(config: DataConfig) -> LoadedData:
    """Load the data to explain."""
    return load_data(config)


def split_features(
    frame: pd.DataFrame, config: DataConfig, features: list[str]
) -> tuple[pd.DataFrame, pd.Series | None]:
    """The feature columns (in model order) and the target column, if any."""
    from tasks.schemas import reserved_feature_names

    clash = reserved_feature_names(features)
    if clash:
        raise DataError(
            f"data.features: {', '.join(clash)} collide with columns of shap_values.parquet; rename them"
        )
    missing = [column for column in config.drop if column not in frame.columns]
    if missing:
        raise DataError(
            f"data.drop: {', '.join(repr(c) for c in missing)} not in {config.source} "
            f"(its columns: {_some(frame.columns)})"
        )
    target = None
    if config.target is not None:
        if config.target not in frame.columns:
            raise DataError(f"data.target: column {config.target!r} is not in {config.source}")
        target = frame[config.target]
    return frame[features], target


def _some(columns: Any, shown: int = 12) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
