"""Where a table is read from (a local file; remote storages subclass DataSource) and how it is parsed."""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from shapline.tasks.common.errors import DataError, one_line
from shapline.tasks.common.schemas import ROW_ID

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

    def read_table(self, text_columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
        """The parsed table, the sha256 of the file's bytes and the column names the file repeats; a CSV's
        `text_columns` are read as the text the file has (an id `000002` stays `000002`, not 2)."""
        content = self.read_bytes()
        frame = parse_table(content, self.suffix, self.uri, text_columns)
        return frame, hashlib.sha256(content).hexdigest(), repeated_columns(frame, content, self.suffix)


class LocalFile(DataSource):
    """A file on this machine."""

    def __init__(self, path: str) -> None:
        self.uri = path

    def _path(self) -> Path:
        path = Path(self.uri)
        if not path.is_file():
            raise DataError(f"data.source: file not found: {path}")
        return path

    def read_bytes(self) -> bytes:
        return self._path().read_bytes()

    def read_table(self, text_columns: tuple[str, ...] = ()) -> tuple[pd.DataFrame, str, tuple[str, ...]]:
        """Parse from the path while a thread hashes the file in chunks: the bytes are never held whole."""
        path = self._path()
        before = path.stat()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shapline-hash") as pool:
            digest = pool.submit(file_sha256, path)
            frame = parse_table(path, self.suffix, self.uri, text_columns)
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


def parse_table(
    content: bytes | Path, suffix: str, uri: str, text_columns: tuple[str, ...] = ()
) -> pd.DataFrame:
    """Parse CSV or Parquet (bytes, or a local file) into a DataFrame indexed by row position; a CSV's
    `text_columns` as text (Parquet keeps its own types)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = io.BytesIO(content) if isinstance(content, bytes) else content
    try:
        if suffix == ".csv":
            frame = pd.read_csv(source, dtype=dict.fromkeys(text_columns, str) or None)
        elif suffix in (".parquet", ".pq"):
            # From a file, read page by page rather than whole column chunks first: the same table,
            # without a second copy of the file's bytes at the peak.
            options: dict[str, Any] = (
                {} if isinstance(content, bytes) else {"pre_buffer": False, "buffer_size": 1 << 20}
            )
            repeated = repeated_names(list(pq.read_schema(source).names))
            if isinstance(source, io.BytesIO):
                source.seek(0)
            if repeated:
                # pandas' reader refuses a repeated name; this one keeps both columns for validation to name.
                frame = pq.ParquetFile(source, **options).read().to_pandas()
            else:
                # Column by column, each Arrow buffer released once converted (a float column without
                # nulls is not even copied): the file's table is in memory once, not twice (Arrow's table
                # and pandas' consolidated block), and a large file reads faster.
                frame = pd.read_parquet(
                    source, **options, to_pandas_kwargs={"split_blocks": True, "self_destruct": True}
                )
            # Arrow's allocator keeps freed pages; hand them back before the SHAP phase needs the memory.
            pa.default_memory_pool().release_unused()
        else:
            raise DataError(f"data.source: {uri}: expected a .csv or .parquet file")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data.source: {uri}: cannot parse as {suffix[1:]}: {one_line(exc)}") from exc
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
