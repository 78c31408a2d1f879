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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, ModelConfig
from shapline.tasks.common.cores import limit_native_threads
from shapline.tasks.common.errors import one_line
from shapline.tasks.common.liveness import pid_alive, this_host
from shapline.tasks.common.schemas import CLASS
from shapline.tasks.data.background import Background
from shapline.tasks.explainers.claims import RowClaims
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
    # Set by a shard runner where workers share the shard's rows (Kernel SHAP on threads or a pool): the job
    # then explains the rows it claims, and the runner puts the workers' parts together (claims.py).
    claims: RowClaims | None = None

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
        claims=job.claims,
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
    # Kernel only: the shard's coalitions per row and, for estimator adaptive, its standard errors.
    errors_path: str | None = None
    model_rows: int = 0
    # Kernel: seconds inside the model's calls, every worker's (0 for a shard reused from the store): wall,
    # and the calling threads' CPU.
    model_s: float = 0.0
    model_cpu_s: float = 0.0
    # Rows other workers explained for this shard once their own were done (compute/runners.py).
    helped_rows: int = 0


def _errors_path(path: Path) -> Path:
    """The standard errors beside a shard's values: `errors-…` so a `shard-*` glob finds values only."""
    return path.with_name("errors-" + path.name.removeprefix("shard-"))


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
            errors = _errors_path(path) if meta.get("errors") else None
            if errors is not None and pq.ParquetFile(errors).metadata.num_rows < rows:
                raise ValueError(f"{rows} rows promised, fewer standard errors written")
            result = ShardResult(
                index=shard.index,
                path=str(path),
                rows=rows,
                seconds=0.0,
                algorithm=str(meta["algorithm"]),
                link=str(meta["link"]),
                reused=True,
                errors_path=str(errors) if errors is not None else None,
                model_rows=int(meta.get("model_rows", 0)),
            )
        except Exception as exc:
            reason = one_line(exc, 200)
            self.discarded.append(
                f"shard {shard.index}: {path} cannot be read ({reason}); computing it again"
            )
            path.unlink(missing_ok=True)
            _errors_path(path).unlink(missing_ok=True)
            return None
        return result

    def write(self, index: int, values: ShardValues) -> ShardResult:
        """Write a shard's values atomically: a crash leaves either no file or a complete one. A kernel
        shard's coalitions and standard errors go first, to a file beside it: the values file, written last,
        is what says the shard is finished."""
        path = self.path(index, values.row_ids)
        errors = values.coalitions is not None
        if errors:
            _write_atomically(values.to_errors_table(), _errors_path(path), {})
        meta = {
            "rows": len(values.row_ids),
            "algorithm": values.algorithm,
            "link": values.link,
            "errors": errors,
            "model_rows": values.model_rows,
        }
        _write_atomically(values.to_table(), path, meta)
        return ShardResult(
            index=index,
            path=str(path),
            rows=len(values.row_ids),
            seconds=values.seconds,
            algorithm=values.algorithm,
            link=values.link,
            traffic=values.traffic,
            errors_path=str(_errors_path(path)) if errors else None,
            model_rows=values.model_rows,
            model_s=values.model_s,
            model_cpu_s=values.model_cpu_s,
            helped_rows=values.helped_rows,
        )

    def delete_finished(self) -> None:
        """Remove every finished and partial shard file."""
        for pattern in ("shard-*.parquet", "shard-*.partial", "errors-*.parquet", "errors-*.partial"):
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)


def _write_atomically(table: Any, path: Path, meta: dict[str, Any]) -> None:
    """A parquet file written under a temporary name and renamed: a crash leaves no half file."""
    import pyarrow.parquet as pq

    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META: json.dumps(meta).encode()})
    try:
        pq.write_table(table, partial, use_dictionary=[CLASS] if CLASS in table.column_names else False)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)  # a full disk keeps no half file (and gets its space back)
        raise


class ShardStoreClaim:
    """A run's claim on a shard store, so that a run finishing first never deletes shards another run
    of the same config, data and model is still using (a scheduled run and a manual one overlap).

    Claims are files in the store, taken and checked under an exclusive lock on `.lock`; a claim
    whose process is gone (same host, dead pid: a killed run) does not count. The finished shards are
    deleted only by the last live claimant to release with delete=True, and the last to leave a store with
    no shard in it removes the store (`.lock`, `.claims` and its folder): a run leaves nothing behind.
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
        """The store's exclusive lock. A lock file removed with its store while this process waited for it
        is no lock: it is taken again on the file at `.lock` now (the store made again)."""
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: claims still count, unlocked
            self.store.mkdir(parents=True, exist_ok=True)
            yield
            return
        while True:
            self.store.mkdir(parents=True, exist_ok=True)
            lock = self.store / ".lock"
            with open(lock, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    if _same_file(handle.fileno(), lock):
                        yield
                        return
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
            if self._live_others():
                return False
            if delete:
                ShardStore(self.store).delete_finished()
            self._remove_if_empty()
            return delete

    def _remove_if_empty(self) -> None:
        """Under the lock, with no other live claim: a store holding no shard goes, `.lock` last but one (a
        run waiting on it sees it gone and starts over), then the folder."""
        claims = self.store / ".claims"
        if any(p.name not in (".lock", ".claims") for p in self.store.iterdir()) or any(claims.glob("*")):
            return
        if claims.exists():
            claims.rmdir()
        (self.store / ".lock").unlink(missing_ok=True)
        # A file may arrive meanwhile only from a run on a platform without locks: then the folder stays.
        with suppress(OSError):
            self.store.rmdir()


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether an open file is still the one at `path` (not removed, or replaced by a new one)."""
    try:
        here, there = os.fstat(descriptor), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
