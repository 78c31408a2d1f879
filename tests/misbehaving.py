"""Models that misbehave the way production models do, for the end-to-end tests (pickled, so importable).

Each wraps a real classifier and behaves on the probe (a few rows) and differently on the explainer's calls
(thousands of synthetic rows), which is where a model that changed, broke or was replaced shows.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

# A call of more rows than this is one of the explainer's (the probe sends a handful).
EXPLAINER_CALL_ROWS = 200


class Misbehaving:
    """`mode` on the explainer's calls: `nan` (some outputs NaN), `wide` (a third output column), `outside`
    (probabilities past 1), `retrain` (the model file at `path` replaced by the file at `replacement`, once)."""

    def __init__(self, model: Any, mode: str, path: str = "", replacement: str = "") -> None:
        self.model = model
        self.mode = mode
        self.path = path
        self.replacement = replacement
        self.classes_ = model.classes_

    def fit(self, rows: Any, target: Any) -> Misbehaving:
        self.model.fit(rows, target)
        return self

    def predict_proba(self, rows: Any) -> np.ndarray:
        output = np.asarray(self.model.predict_proba(rows), dtype=float)
        if len(output) <= EXPLAINER_CALL_ROWS:
            return output
        if self.mode == "nan":
            output[::7, 1] = np.nan
        elif self.mode == "wide":
            output = np.column_stack([output, np.zeros(len(output))])
        elif self.mode == "outside":
            output = output * 1.5
        elif self.mode == "retrain":
            marker = Path(f"{self.path}.replaced")
            if not marker.exists():
                marker.touch()
                shutil.copyfile(self.replacement, f"{self.path}.new")
                Path(f"{self.path}.new").replace(self.path)  # as a training job publishes its model
        return output


# Libraries a process that only computes shards has no use for.
NEEDLESS = ("matplotlib", "mlflow", "great_expectations", "prefect", "boto3")


class ModulesWitness:
    """A classifier that writes, at its first call in a process, which of NEEDLESS that process has imported
    (`modules-<pid>.json` in `folder`) and how many compiled fills it had loaded (`compiled-<pid>.json`):
    to see what a worker loads to explain a shard."""

    def __init__(self, model: Any, folder: str) -> None:
        self.model = model
        self.folder = folder
        self.classes_ = model.classes_

    def fit(self, rows: Any, target: Any) -> ModulesWitness:
        self.model.fit(rows, target)
        return self

    def predict_proba(self, rows: Any) -> np.ndarray:
        import json
        import os
        import sys

        path = Path(self.folder, f"modules-{os.getpid()}.json")
        if not path.exists():
            path.write_text(json.dumps([m for m in NEEDLESS if sys.modules.get(m) is not None]))
            # And how much of the kernel engine's compiled code the process had loaded before any shard.
            compiled = sys.modules.get("shapline.tasks.explainers.compiled")
            loaded = len(compiled.fill_synthetic.signatures) if compiled is not None else 0
            Path(self.folder, f"compiled-{os.getpid()}.json").write_text(json.dumps(loaded))
        return np.asarray(self.model.predict_proba(rows))
