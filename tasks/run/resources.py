"""One explanation run's resources, opened with the run and closed with it, whatever the outcome.

Its MLflow run (FINISHED only if the block completes), its shard runner (pool processes or a Dask
cluster, and the endpoint request limit they share), a scratch folder for the artifacts, its claim on
the shard store, and the endpoint's lifetime (endpoint.delete_after_run).
"""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

from shapline.tasks.common.config import ExplainConfig
from shapline.tasks.common.cores import threads_per_worker
from shapline.tasks.common.errors import disk_full, out_of_space
from shapline.tasks.compute.runners import ShardRunner, open_runner
from shapline.tasks.compute.shards import ShardStore, ShardStoreClaim
from shapline.tasks.models.loading import model_fingerprint
from shapline.tasks.models.sagemaker.endpoint import endpoint_lifetime
from shapline.tasks.tracking.client import TrackedRun, artifact_folder, mlflow_run
from shapline.tasks.tracking.uris import resolve_tracking_uri


class ExplanationRun:
    """The resources of one run of one config; use as a context manager."""

    def __init__(
        self,
        config: ExplainConfig,
        run_name: str,
        tags: dict[str, str],
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.config = config
        self.run_name = run_name
        self.tags = tags
        self.logger = logger
        self.tracking_uri = resolve_tracking_uri(config.output.tracking_uri)
        self._stack = ExitStack()
        self._claim: ShardStoreClaim | None = None
        self.store: ShardStore | None = None

    def __enter__(self) -> ExplanationRun:
        stack = self._stack.__enter__()
        try:
            # Entered in this order, closed in the reverse: the endpoint is deleted last, after the run ended.
            stack.enter_context(endpoint_lifetime(self.config.model, self.logger))
            self.folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shapline-")))
            self.artifacts = self.folder / "artifacts"
            self.artifacts.mkdir()
            self.tracked: TrackedRun = stack.enter_context(
                mlflow_run(self.tracking_uri, self.config.experiment_name, self.run_name, self.tags)
            )
            # Closed before the MLflow run, so a write that found no space ends it with the full folder named.
            stack.push(self._name_a_full_disk)
            # Pool processes or a Dask cluster start now: their start-up overlaps loading and validation.
            shards = self.config.shards
            # The one decision of how many threads each shard worker (and its model) may use: the pool's
            # workers are warmed with it and every shard job carries it.
            self.threads = threads_per_worker(shards.runner, shards.workers)
            self.runner: ShardRunner = stack.enter_context(
                open_runner(shards, self.config.model, self.threads, self.tracked.run_id)
            )
            self.runner.prepare(self.config.explainer.algorithm)  # "auto": once the plan resolved it
        except BaseException:
            # What was opened closes with the error, so the MLflow run (if started) ends FAILED with it.
            if not self._stack.__exit__(*sys.exc_info()):
                raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool | None:
        return self._stack.__exit__(kind, error, trace)

    def _name_a_full_disk(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> bool:
        """Turn an out-of-space error into one line naming the full folder and the setting that moves it."""
        if error is None or not out_of_space(error):
            return False
        places = {"the run's scratch folder (TMPDIR)": self.folder}
        if self.store is not None:
            places["the shard store (shards.cache_dir, or SHAPLINE_CACHE_DIR)"] = self.store.folder
        artifacts = artifact_folder(self.tracked)
        if artifacts is not None:
            places["MLflow's artifact store (output.tracking_uri)"] = artifacts
        full = disk_full(error, places)
        if full is not None:
            raise full from error
        return False

    @functools.cached_property
    def model_fingerprint(self) -> str:
        """What identifies the model's behaviour (a model file's sha256): computed once for the run."""
        return model_fingerprint(self.config.model)

    def open_store(self, data_sha256: str) -> ShardStore:
        """The shard store of this config, data and model, claimed by this run until it ends."""
        config = self.config
        store = ShardStore.open(
            config.shards.cache_dir, config.values_sha256(), data_sha256, self.model_fingerprint
        )
        # Released on any exit; the shards are deleted by finish() only if no other live run uses them.
        self._claim = self._stack.enter_context(ShardStoreClaim(store.folder, self.tracked.run_id))
        self.store = store
        return store

    def finish(self) -> None:
        """After a successful run: delete the finished shards (unless shards.keep) if no other run uses them."""
        if self._claim is None or self.config.shards.keep:
            return
        if not self._claim.release(delete=True):
            self.logger.info(
                "kept the finished shards in %s: another run of this config is using them",
                self.store.folder if self.store else "the store",
            )
