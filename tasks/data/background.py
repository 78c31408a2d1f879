"""Draw the background sample the explainer integrates features out over."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from shapline.tasks.common.config import BackgroundConfig
from shapline.tasks.common.errors import DataError
from shapline.tasks.common.schemas import BACKGROUND_WEIGHT

WEIGHT_COLUMN = BACKGROUND_WEIGHT


@dataclass(frozen=True)
class Background:
    """Background rows (feature columns only) and, for k-means centres, their weights."""

    frame: pd.DataFrame
    weights: np.ndarray | None = None

    @cached_property
    def digest(self) -> str:
        """The rows, columns, dtypes and weights, hashed: equal for the same background wherever a shard's job
        was unpickled. Computed once per object; the flow computes it before jobs are pickled."""
        parts = [
            pd.util.hash_pandas_object(self.frame, index=False).to_numpy().tobytes(),
            repr([(str(c), str(t)) for c, t in self.frame.dtypes.items()]).encode(),
            b"" if self.weights is None else np.asarray(self.weights, dtype=float).tobytes(),
        ]
        return hashlib.sha256(b"\0".join(parts)).hexdigest()

    def to_frame(self) -> pd.DataFrame:
        """As logged to background.parquet: the rows, plus shapline_weight for k-means centres."""
        if self.weights is None:
            return self.frame
        return self.frame.assign(**{WEIGHT_COLUMN: self.weights})


def random_background(features: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """A seeded sample without replacement (shap.sample)."""
    import shap

    if size >= len(features):
        return features
    return shap.sample(features, size, random_state=seed).sort_index()


def kmeans_background(features: pd.DataFrame, size: int, seed: int) -> Background:
    """k-means centres, each snapped to the nearest observed value per feature, weighted by cluster size."""
    from sklearn.cluster import KMeans

    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise DataError(
            "background.method kmeans needs numeric features; non-numeric columns: " + ", ".join(non_numeric)
        )
    empty = [str(c) for c in features.columns if features[c].isna().all()]
    if empty:
        raise DataError(
            f"background.method kmeans: column {', '.join(map(repr, empty))} has no values (all missing); "
            "drop it (data.drop) or use background.method random"
        )
    values = features.to_numpy(dtype=float)
    column_means = np.nanmean(values, axis=0)
    values = np.where(np.isnan(values), column_means, values)
    k = min(size, len(np.unique(values, axis=0)))
    model = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(values)
    centres = model.cluster_centers_.copy()
    for j in range(values.shape[1]):
        observed = np.unique(values[:, j])
        nearest = np.abs(observed[None, :] - centres[:, j][:, None]).argmin(axis=1)
        centres[:, j] = observed[nearest]
    counts = np.bincount(model.labels_, minlength=k).astype(float)
    frame = pd.DataFrame(centres, columns=features.columns).astype(features.dtypes.to_dict())
    return Background(frame=frame, weights=counts / counts.sum())


def stratified_background(features: pd.DataFrame, target: pd.Series, size: int, seed: int) -> pd.DataFrame:
    """A seeded sample whose class shares match the target's (largest remainder, at least one per class)."""
    if size >= len(features):
        return features
    rng = np.random.default_rng(seed)
    groups = {label: index for label, index in features.groupby(target.astype(str), sort=True).groups.items()}
    if len(groups) > size:
        raise DataError(
            f"background.method stratified: data.target {str(target.name)!r} has {len(groups):,} distinct values, "
            f"more than background.size {size}: each class needs a row (is it a class column?); raise "
            "background.size, or use background.method random"
        )
    shares = {label: size * len(index) / len(features) for label, index in groups.items()}
    quota = {label: max(1, int(np.floor(share))) for label, share in shares.items()}
    leftovers = sorted(shares, key=lambda label: shares[label] - np.floor(shares[label]), reverse=True)
    for label in leftovers:
        if sum(quota.values()) >= size:
            break
        quota[label] += 1
    while sum(quota.values()) > size:
        # Rare classes got a row they were not owed: take it back from the class furthest above its share.
        label = max((lb for lb in quota if quota[lb] > 1), key=lambda lb: quota[lb] - shares[lb])
        quota[label] -= 1
    chosen = [
        rng.choice(np.asarray(groups[label]), size=min(quota[label], len(groups[label])), replace=False)
        for label in groups
    ]
    return features.loc[np.sort(np.concatenate(chosen))]


def draw_background(features: pd.DataFrame, target: pd.Series | None, config: BackgroundConfig) -> Background:
    """The background sample the configured method draws from all rows of the data."""
    if len(features) == 0:
        raise DataError("background: the data has no rows to draw a background from")
    if config.method == "all":
        return Background(frame=features)
    if config.method == "random":
        return Background(frame=random_background(features, config.size, config.seed))
    if config.method == "kmeans":
        return kmeans_background(features, config.size, config.seed)
    if target is None:
        raise DataError("background.method stratified needs data.target, the column to stratify by")
    return Background(frame=stratified_background(features, target, config.size, config.seed))
