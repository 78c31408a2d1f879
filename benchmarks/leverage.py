"""Leverage SHAP (Musco & Witter, ICLR 2025), as published, for the accuracy comparison only.

shapiq 1.4.1 (the newest that installs here) does not ship it, so this is the paper's Algorithm 1 written
from its text: coalitions kept by independent (Bernoulli) draws, without replacement, each with a chance
proportional to its leverage score (1 / C(n, |S|), so every size carries the same expected count) scaled
so the expected count is the budget, capped at 1; paired (a coalition with its complement); each kept
coalition weighted by its Shapley-kernel weight over its chance; the efficiency constraint handled
exactly by projecting onto the values that sum to v(N) - v(empty). It answers issue 23's question of
whether the published estimator reaches the goal that shapline's adaptive estimator misses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from scipy.special import comb


def leverage_shap(
    game: Callable[[np.ndarray], np.ndarray], n: int, budget: int, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """(values, coalitions evaluated) for `game` (masks (k, n) of 0/1 -> v(S), (k,)), within ~`budget`
    coalitions other than the empty and full ones, which the game is asked for too."""
    counts = np.array([comb(n, s, exact=True) for s in range(n + 1)], dtype=float)
    sizes = np.arange(1, n)
    scale = _expected_count_scale(counts[1:n], min(budget, 2**n - 2))
    chance = np.minimum(1.0, scale / counts[1:n])  # per coalition of each size 1..n-1
    masks: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for s in sizes[: n // 2]:
        # Pairs are drawn by their smaller side; with n even, the middle size pairs with itself.
        middle = 2 * s == n
        population = counts[s] / 2 if middle else counts[s]
        kept = int(rng.binomial(int(population), chance[s - 1])) if chance[s - 1] < 1 else int(population)
        if kept == 0:
            continue
        drawn = _distinct_subsets(n, int(s), kept, rng, anchored=middle)
        pairs = np.concatenate([drawn, 1.0 - drawn])
        kernel = 1.0 / (counts[s] * s * (n - s))
        masks.append(pairs)
        weights.append(np.full(len(pairs), kernel / chance[s - 1]))
    z = np.concatenate(masks)
    w = np.concatenate(weights)
    ends = game(np.vstack([np.zeros(n), np.ones(n)]))
    v0, v1 = float(ends[0]), float(ends[1])
    target = game(z) - v0 - z.sum(axis=1) * (v1 - v0) / n
    projection = np.eye(n) - np.full((n, n), 1.0 / n)
    left = projection @ (z.T * w) @ z @ projection
    right = projection @ (z.T * w) @ target
    values = np.linalg.lstsq(left, right, rcond=None)[0] + (v1 - v0) / n
    return values, len(z)


def _expected_count_scale(counts: np.ndarray, budget: int) -> float:
    """c with sum over sizes of min(C(n, s), c) = budget: each size's expected count, where it is not
    kept whole."""
    low, high = 0.0, float(counts.max())
    for _ in range(200):
        middle = (low + high) / 2
        if np.minimum(counts, middle).sum() < budget:
            low = middle
        else:
            high = middle
    return high


def _distinct_subsets(n: int, size: int, k: int, rng: np.random.Generator, anchored: bool) -> np.ndarray:
    """k distinct subsets of `size` features, uniformly without replacement (`anchored`: each contains
    the last feature, one of every complementary pair of the middle size), as (k, n) 0/1."""
    free = n - 1 if anchored else n
    pick = size - 1 if anchored else size
    total = comb(free, pick, exact=True)
    if k >= total:
        chosen = [list(c) for c in itertools.combinations(range(free), pick)]
    else:
        seen: set[tuple[int, ...]] = set()
        chosen = []
        while len(chosen) < k:
            subset = tuple(sorted(rng.choice(free, pick, replace=False).tolist()))
            if subset not in seen:
                seen.add(subset)
                chosen.append(list(subset))
    out = np.zeros((len(chosen), n))
    for row, subset in enumerate(chosen):
        out[row, subset] = 1.0
        if anchored:
            out[row, n - 1] = 1.0
    return out
