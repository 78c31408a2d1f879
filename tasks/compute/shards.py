"""Shards: the rows to explain in slices, each one self-contained work, and the store that keeps finished ones.

A shard's rows and the background travel with its job, and its values come back to the flow's
process, which writes them into the store. So a worker (a thread, a pool process, a Dask worker on
another machine) needs nothing from the flow's machine but the model, and only the flow touches the
store, which is on the flow's machine and serves resume after a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, ModelConfig
from shapline.tasks.common.cores import limit_native_threads
from shapline.tasks.common.errors import one_line
from shapline.tasks.common.liveness import pid_alive, this_host
from shapline.tasks.common.schemas import CLASS
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.explain import ShardValues, explain_rows, load_shap
from shapline.tasks.models.limits import RequestLimit
from shapline.tasks.models.loading import load_predictor

# The key of shapline's own metadata in a shard file's Parquet schema.
_META = b"shapline"


@dataclass(frozen=True, eq=False)
class Shard:
    """A contiguous slice of the rows to explain: its index, row ids and position among the rows."""

    index: int
    # One int64 array, not a tuple of Python ints: a million rows' ids are 8 MB rather than 45.
    row_ids: np.ndarray
    start: int = 0


def shard_label(index: int, row_ids: Sequence[int] | np.ndarray) -> str:
    """A shard as a message names it: its index and the row ids it starts and ends with."""
    rows = f"rows {row_ids[0]}-{row_ids[-1]}" if len(row_ids) else "no rows"
    return f"shard {index} ({rows})"


def plan_shards(row_ids: Sequence[int] | np.ndarray, size: int) -> list[Shard]:
    """Split the rows to explain, in row order, into shards of at most `size` rows."""
    ids = np.asarray(row_ids, dtype=np.int64)
    ids.flags.writeable = False
    return [
        Shard(index=n, row_ids=ids[start : start + size], start=start)
        for n, start in enumerate(range(0, len(ids), size))
    ]


@dataclass(frozen=True)
class ShardJob:
    """One shard's work, self-contained: its rows and the background travel with it, so a worker needs
    only the model; the explainer and the space it explains in were resolved once for the run."""

    index: int
    rows: pd.DataFrame
    background: Background
    model: ModelConfig
    explainer: ExplainerConfig
    algorithm: str
    link: str
    threads: int | None = None
    # Outputs per row the run's probe saw: every model call of the shard must give as many.
    outputs: int | None = None

    @property
    def row_ids(self) -> np.ndarray:
        return np.asarray(self.rows.index, dtype=np.int64)


def explain_shard(job: ShardJob, limit: RequestLimit | None = None) -> ShardValues:
    """Explain one shard's rows: compute only (no files, no Prefect), wherever the shard runner runs it."""
    started = time.perf_counter()
    if job.algorithm != "kernel":  # shapline's kernel engine needs no shap
        load_shap()  # in a fresh worker, before its first import could keep this job's frames
    shared = load_predictor(job.model)
    if job.threads is not None:
        shared.limit_threads(job.threads)
        limit_native_threads(job.threads)
    predictor = shared.bounded(limit)
    values = explain_rows(
        job.rows,
        job.background,
        predictor,
        job.explainer,
        job.link,
        job.model.class_index,
        algorithm=job.algorithm,
        width=job.outputs,
    )
    traffic = predictor.traffic()
    if traffic is not None or values.rows_saved:  # a local model has no traffic, but may be spared rows
        traffic = {**(traffic or {}), "rows_saved": float(values.rows_saved)}
    values.traffic = traffic
    values.seconds = time.perf_counter() - started
    return values


@dataclass(frozen=True)
class ShardResult:
    """Where a finished shard's values are, and what it cost."""

    index: int
    path: str
    rows: int
    seconds: float
    algorithm: str
    link: str
    reused: bool = False
    traffic: dict[str, float] | None = None


class ShardStore:
    """The folder of one config's, data's and model's finished shards, so a re-run finds them.

    Root: shards.cache_dir, else $SHAPLINE_CACHE_DIR, else ~/.cache/shapline/shards. Only the flow's
    process reads and writes it.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # Shard files found unreadable and removed, each with why: the flow says so in the run's log.
        self.discarded: list[str] = []

    @classmethod
    def open(cls, configured: str | None, config_sha: str, data_sha: str, model_sha: str) -> ShardStore:
        """The store keyed by what determines the values (created if missing)."""
        root = configured or os.environ.get("SHAPLINE_CACHE_DIR") or "~/.cache/shapline/shards"
        key = hashlib.sha256(f"{config_sha}:{data_sha}:{model_sha}".encode()).hexdigest()[:32]
        folder = Path(root).expanduser() / key
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder)

    def path(self, index: int, row_ids: Sequence[int] | np.ndarray) -> Path:
        """A shard's file, named by its index and a hash of its row ids."""
        rows_hash = hashlib.sha256(np.asarray(row_ids, dtype="int64").tobytes()).hexdigest()[:16]
        return self.folder / f"shard-{index:06d}-{rows_hash}.parquet"

    def finished(self, shard: Shard) -> ShardResult | None:
        """The shard as a previous run left it, or None; a file that cannot be read is removed, never trusted."""
        import pyarrow.parquet as pq

        path = self.path(shard.index, shard.row_ids)
        if not path.exists():
            return None
        try:
            meta = json.loads(pq.read_schema(path).metadata[_META])
            rows = int(meta["rows"])
            if pq.ParquetFile(path).metadata.num_rows < rows:
                raise ValueError(f"{rows} rows promised, fewer written")
            result = ShardResult(
                index=shard.index,
                path=str(path),
                rows=rows,
                seconds=0.0,
                algorithm=str(meta["algorithm"]),
                link=str(meta["link"]),
                reused=True,
            )
        except Exception as exc:
            reason = one_line(exc, 200)
            self.discarded.append(
                f"shard {shard.index}: {path} cannot be read ({reason}); computing it again"
            )
            path.unlink(missing_ok=True)
            return None
        return result

    def write(self, index: int, values: ShardValues) -> ShardResult:
        """Write a shard's values atomically: a crash leaves either no file or a complete one."""
        import pyarrow.parquet as pq

        path = self.path(index, values.row_ids)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        table = values.to_table()
        meta = {"rows": len(values.row_ids), "algorithm": values.algorithm, "link": values.link}
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _META: json.dumps(meta).encode()}
        )
        try:
            pq.write_table(table, partial, use_dictionary=[CLASS] if CLASS in table.column_names else False)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk keeps no half file (and gets its space back)
            raise
        return ShardResult(
            index=index,
            path=str(path),
            rows=len(values.row_ids),
            seconds=values.seconds,
            algorithm=values.algorithm,
            link=values.link,
            traffic=values.traffic,
        )

    def delete_finished(self) -> None:
        """Remove every finished and partial shard file."""
        for path in [*self.folder.glob("shard-*.parquet"), *self.folder.glob("shard-*.partial")]:
            path.unlink(missing_ok=True)


class ShardStoreClaim:
    """A run's claim on a shard store, so that a run finishing first never deletes shards another run
    of the same config, data and model is still using (a scheduled run and a manual one overlap).

    Claims are files in the store, taken and checked under an exclusive lock on `.lock`; a claim
    whose process is gone (same host, dead pid: a killed run) does not count. The finished shards are
    deleted only by the last live claimant to release with delete=True.
    """

    def __init__(self, store: Path, owner: str) -> None:
        self.store = store
        self.path = store / ".claims" / owner
        self.released = False
        with self._locked():
            self.path.parent.mkdir(exist_ok=True)
            self.path.write_text(json.dumps({"pid": os.getpid(), "host": this_host()}))

    def __enter__(self) -> ShardStoreClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release(delete=False)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.store / ".lock", "a+") as handle:
            try:
                import fcntl
            except ImportError:  # no advisory locks on this platform: claims still count, unlocked
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _live_others(self) -> list[Path]:
        live = []
        for claim in self.path.parent.glob("*"):
            if claim == self.path:
                continue
            try:
                owner = json.loads(claim.read_text())
            except (OSError, ValueError):
                continue
            if owner.get("host") == this_host() and not pid_alive(int(owner.get("pid", 0))):
                claim.unlink(missing_ok=True)  # a run that was killed: its claim is stale
                continue
            live.append(claim)
        return live

    def release(self, delete: bool) -> bool:
        """Drop this run's claim; with delete, remove the finished shards if no live run claims them."""
        if self.released:
            return False
        self.released = True
        with self._locked():
            self.path.unlink(missing_ok=True)
            if not delete or self._live_others():
                return False
            ShardStore(self.store).delete_finished()
            return True
