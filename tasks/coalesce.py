"""Merge the model calls of rows explained together (explainer.batch_rows) into one call of the model."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np


class CoalescedCalls:
    """One model function shared by `parties` threads: their calls are merged into one call of `function`.

    Every party calls it some number of times, then leave()s. When each party still present is
    waiting in a call, the last to arrive makes one call with all their rows concatenated and hands
    each its slice. No party waits on anything but the others' next call, so this cannot deadlock
    as long as every party eventually calls or leaves.
    """

    def __init__(self, function: Any, parties: int) -> None:
        self.function = function
        self.present = parties
        self._waiting: list[tuple[np.ndarray, dict[str, Any]]] = []
        self._condition = threading.Condition()

    def __call__(self, rows: Any) -> np.ndarray:
        slot: dict[str, Any] = {}
        with self._condition:
            self._waiting.append((np.asarray(rows), slot))
            self._dispatch_if_complete()
            while not slot:
                self._condition.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["output"]

    def leave(self) -> None:
        with self._condition:
            self.present -= 1
            self._dispatch_if_complete()

    def _dispatch_if_complete(self) -> None:
        # Called holding the condition. Everyone present is waiting, so no one can add to this batch.
        if not self._waiting or len(self._waiting) < self.present:
            return
        batch, self._waiting = self._waiting, []
        try:
            merged = self.function(np.concatenate([rows for rows, _ in batch]))
        except BaseException as exc:  # every party gets the model's error, as a direct call would
            for _, slot in batch:
                slot["error"] = exc
        else:
            start = 0
            for rows, slot in batch:
                slot["output"] = merged[start : start + len(rows)]
                start += len(rows)
        self._condition.notify_all()
