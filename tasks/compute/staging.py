"""The rows to explain, staged on disk a shard at a time, so the flow lets go of the data before any shard starts.

Validation, the background and the plan need the whole table in memory; the shards do not. Once the plan is
made, each shard's rows are written to a file of the run's scratch folder and the table is released: a
shard task reads its own rows back when it starts, so the flow holds the rows of the shards running now,
not the data (for 10^6 x 30 floats, 240 MB less through the whole explain phase and after it).

A shard's rows are pickled as the DataFrame they were (protocol 5): every dtype, text, category and missing
value comes back exactly as it was validated, and the files live only in the run's private scratch folder.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from shapline.tasks.common.config import ExplainerConfig, ModelConfig
from shapline.tasks.compute.shards import Shard, ShardJob, ShardResult, ShardStore
from shapline.tasks.data.background import Background


@dataclass(frozen=True)
class StagedRows:
    """The rows to explain, one file per shard in `folder`; read back a shard (or some rows) at a time."""

    folder: Path
    shards: tuple[Shard, ...]

    def _path(self, shard: Shard) -> Path:
        return self.folder / f"rows-{shard.index:06d}.pickle"

    def shard_rows(self, shard: Shard) -> pd.DataFrame:
        """One shard's rows, as they were staged (row_id index, the data's dtypes)."""
        with self._path(shard).open("rb") as handle:
            rows: pd.DataFrame = pickle.load(handle)
        return rows

    def take(self, row_ids: np.ndarray | list[int]) -> pd.DataFrame:
        """The staged rows with these row ids, in the order given; only the shards holding them are read."""
        wanted = np.asarray(row_ids, dtype=np.int64)
        holding = [shard for shard in self.shards if np.isin(wanted, shard.row_ids).any()]
        if not holding:
            if len(wanted) or not self.shards:
                raise KeyError(f"rows {wanted[:5].tolist()} were not staged")
            return self.shard_rows(self.shards[0]).iloc[:0]
        parts = []
        for shard in holding:
            rows = self.shard_rows(shard)
            parts.append(rows.loc[rows.index.intersection(pd.Index(wanted))])
        found = pd.concat(parts) if len(parts) > 1 else parts[0]
        missing = np.setdiff1d(wanted, found.index.to_numpy())
        if len(missing):
            raise KeyError(f"rows {missing[:5].tolist()} were not staged")
        return found.loc[wanted]


def stage_rows(rows: pd.DataFrame, shards: list[Shard], folder: str | Path) -> StagedRows:
    """Write each shard's rows (shards are contiguous slices of `rows`) to its own file under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = StagedRows(folder, tuple(shards))
    for shard in shards:
        part = rows.iloc[shard.start : shard.start + len(shard.row_ids)]
        with staged._path(shard).open("wb") as handle:
            pickle.dump(part, handle, protocol=5)
    return staged


@dataclass(frozen=True)
class StagedJob:
    """A shard's work before its rows are read: the flow's shard task calls `job()` when it starts, so only
    running shards hold rows. `settings` is the run's job with no rows: everything else is resolved once."""

    shard: Shard
    staged: StagedRows
    settings: ShardJob

    @property
    def index(self) -> int:
        return self.shard.index

    @property
    def row_ids(self) -> np.ndarray:
        return self.shard.row_ids

    def job(self) -> ShardJob:
        """The self-contained job (its rows read back now) that a thread, pool process or Dask worker runs."""
        return replace(self.settings, index=self.shard.index, rows=self.staged.shard_rows(self.shard))


def plan_jobs(
    staged: StagedRows,
    background: Background,
    store: ShardStore,
    model: ModelConfig,
    explainer: ExplainerConfig,
    algorithm: str,
    link: str,
    threads: int | None = None,
    outputs: int | None = None,
) -> tuple[list[StagedJob], list[ShardResult]]:
    """Jobs for the shards the store lacks, and the finished ones found there (their rows never read)."""
    settings = ShardJob(-1, pd.DataFrame(), background, model, explainer, algorithm, link, threads, outputs)
    _ = background.digest  # hashed once here and carried by every job, pickled or not
    jobs, finished = [], []
    for shard in staged.shards:
        found = store.finished(shard)
        if found is not None:
            finished.append(found)
            continue
        jobs.append(StagedJob(shard, staged, settings))
    return jobs, finished
