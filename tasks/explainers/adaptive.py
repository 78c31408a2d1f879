"""Kernel SHAP to a stated accuracy (explainer.estimator: adaptive): exact where every coalition fits the
budget, otherwise a hybrid of exactly enumerated small and large coalitions and paired sampling of the rest,
in rounds, until each value's standard error is small against the spread of the row's values.

The design follows Covert & Lee 2021 ("Improving KernelSHAP": paired sampling, a variance estimate, stopping
on convergence) and the R package kernelshap (the hybrid: coalitions of size 1 and M - 1, and 2 and M - 2
for 4 to 16 features, enumerated with their exact kernel weights; the tolerance as the largest standard error
over the spread of the row's values). Coalitions of the other sizes are drawn in pairs (a coalition and its
complement), without replacement, each size equally likely and each subset of a size equally likely: the
leverage scores of the Shapley-kernel regression (Musco & Witter 2025), measured against sizes drawn by
kernel weight in benchmarks/accuracy.py. Each drawn pair carries its size's kernel mass over its chance.

The values solve the kernel-weighted least squares with the efficiency constraint exact (they sum to
f(x) - E[f] in the link's space). The standard error of each value is the regression's sandwich estimate
over the drawn pairs (each pair an independent draw), scaled by Student's t for the pairs drawn, so that
value +- 1.96 standard errors covers the exact value as often as it says.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from scipy.special import comb
from scipy.stats import t as student_t

# Rounds drawn before the first check: a variance estimate needs a few pairs.
MIN_ROUNDS = 4


def size_mass(m: int) -> np.ndarray:
    """The Shapley kernel's mass of each coalition size 1..m-1 (index size - 1), summing to one."""
    sizes = np.arange(1, m)
    mass = 1.0 / (sizes * (m - sizes))
    return mass / mass.sum()


def hybrid_degree(m: int, budget: int) -> int:
    """How many smallest (and largest) sizes to enumerate: kernelshap's 2 for 4-16 features, else 1, fewer
    when their coalitions would take more than half the budget (0: every coalition is drawn)."""
    degree = 2 if 4 <= m <= 16 else 1
    while degree > 0 and enumerated_count(m, degree) > budget // 2:
        degree -= 1
    return degree


def enumerated_count(m: int, degree: int) -> int:
    """Coalitions of sizes 1..degree and m-degree..m-1."""
    return int(sum(comb(m, k, exact=True) * (1 if 2 * k == m else 2) for k in range(1, degree + 1)))


def constrained_solve(a: np.ndarray, b: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(features, outputs) minimising the weighted least squares whose normal equations are a, b, with the
    values of each output summing to its delta exactly (kernelshap's solver, with a pseudo-inverse)."""
    inverse = np.linalg.pinv(a)
    shift = ((inverse @ b).sum(axis=0) - delta) / inverse.sum()
    return inverse @ (b - shift[None, :])


def _projection(a: np.ndarray) -> np.ndarray:
    """The linear map from a change of b to the change of the constrained solution (a fixed)."""
    inverse = np.linalg.pinv(a)
    through_one = inverse.sum(axis=1)
    return inverse - np.outer(through_one, through_one) / through_one.sum()


@dataclasses.dataclass
class RowState:
    """One row's design so far: its enumerated part, its drawn pairs and their values, and where it stands."""

    m: int
    rng: np.random.Generator
    budget: int
    delta: np.ndarray
    exact: bool
    enumerated: np.ndarray  # (e, m) 0/1
    enumerated_weight: np.ndarray  # (e,)
    sizes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=int))
    size_factor: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    size_chance: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    available: int = 0  # pairs of the drawn sizes that exist
    seen: set[bytes] = dataclasses.field(default_factory=set)
    # What the enumerated part and the pairs add to the normal equations (a, b); per pair, for the variance.
    a_enumerated: np.ndarray | None = None
    b_enumerated: np.ndarray | None = None
    a_pairs: np.ndarray | None = None  # sum over pairs of factor x (z z' + z^c z^c')
    b_pairs: np.ndarray | None = None  # sum over pairs of factor x (z v(z) + z^c v(z^c))
    pairs: np.ndarray | None = None  # (n, 2, m)
    factors: np.ndarray | None = None  # (n,)
    targets: np.ndarray | None = None  # (n, 2, outputs): v(S) - v(empty)
    pending: np.ndarray | None = None  # the round drawn, waiting for its targets: (k, 2, m) and factors
    pending_factors: np.ndarray | None = None
    rounds: int = 0
    next_pairs: int = 0
    exhausted: bool = False
    converged: bool = False
    values: np.ndarray | None = None
    errors: np.ndarray | None = None

    @property
    def drawn(self) -> int:
        return 0 if self.pairs is None else len(self.pairs)

    @property
    def coalitions(self) -> int:
        return len(self.enumerated) + 2 * self.drawn

    def round_pairs(self) -> int:
        """Pairs one round draws at first: kernelshap's m = 2 x features coalitions, fewer when the budget
        would not hold the first rounds."""
        room = (self.budget - len(self.enumerated)) // (2 * MIN_ROUNDS)
        return max(1, min(self.m, room))

    def wants_more(self) -> bool:
        """Whether this row draws another round: not exact, not converged, pairs and budget left."""
        if self.exact or self.converged or self.exhausted:
            return False
        return self.coalitions + 2 < self.budget or not self.drawn


def plan_row(m: int, seed: int, budget: int, delta: np.ndarray, sampling: str = "leverage") -> RowState:
    """A row's design before any round: every coalition when they fit the budget, else the hybrid's
    enumerated sizes (and the size distribution the rest is drawn from: each size alike, "leverage", or
    by the kernel's mass, "kernel", which benchmarks/accuracy.py measures against it)."""
    rng = np.random.default_rng(seed)
    mass = size_mass(m)
    if 2**m - 2 <= budget:
        masks = _subsets(m, range(1, m))
        weights = mass[masks.sum(axis=1).astype(int) - 1] / comb(m, masks.sum(axis=1))
        return RowState(m, rng, budget, delta, True, masks, weights, converged=True)
    degree = hybrid_degree(m, budget)
    parts, weights = [], []
    for k in range(1, degree + 1):
        block = _subsets(m, [k] if 2 * k == m else [k, m - k])
        parts.append(block)
        weights.append(np.full(len(block), (mass[k - 1] * (1 if 2 * k == m else 2)) / len(block)))
    enumerated = np.concatenate(parts) if parts else np.zeros((0, m))
    state = RowState(
        m, rng, budget, delta, False, enumerated, np.concatenate(weights) if weights else np.zeros(0)
    )
    state.seen = set(_keys(enumerated))
    # Pairs are drawn by their smaller size s (with its complement, of size m - s).
    state.sizes = np.arange(degree + 1, m // 2 + 1)
    pair_mass = np.array([mass[s - 1] * (1 if 2 * s == m else 2) for s in state.sizes])
    if sampling == "kernel":
        state.size_chance = pair_mass / pair_mass.sum()
    else:
        state.size_chance = np.full(len(state.sizes), 1.0 / len(state.sizes))
    state.size_factor = pair_mass / state.size_chance
    state.available = int(sum(comb(m, int(s), exact=True) // (2 if 2 * s == m else 1) for s in state.sizes))
    state.next_pairs = state.round_pairs()
    return state


def draw_round(state: RowState, first: bool = False) -> np.ndarray:
    """The next round's coalitions (2 per pair, a coalition then its complement), none drawn before; as
    many pairs as the last check said the tolerance needs (at most doubling the pairs), within the budget.
    The `first` draw holds the MIN_ROUNDS rounds before the first check, in one model call."""
    m = state.m
    asked = state.next_pairs * (MIN_ROUNDS if first else 1)
    wanted = min(asked, (state.budget - state.coalitions) // 2, state.available - state.drawn)
    wanted = max(wanted, 1 if not state.drawn else 0)
    masks: list[np.ndarray] = []
    factors: list[np.ndarray] = []
    got, attempts = 0, 0
    while got < wanted and attempts < 20:
        attempts += 1
        count = 2 * (wanted - got) + 8  # some draws repeat earlier ones
        which = state.rng.choice(len(state.sizes), size=count, p=state.size_chance)
        # A uniform subset of each size: the first `size` of a random permutation.
        ranks = state.rng.random((count, m)).argsort(axis=1).argsort(axis=1)
        drawn = ranks < state.sizes[which][:, None]
        keys = _keys(drawn)
        complements = _keys(~drawn)
        keep: list[int] = []
        for position, (key, other) in enumerate(zip(keys, complements, strict=True)):
            if key in state.seen or got + len(keep) >= wanted:
                continue
            state.seen.add(key)
            state.seen.add(other)
            keep.append(position)
        if keep:
            masks.append(drawn[keep].astype(float))
            factors.append(state.size_factor[which[keep]])
            got += len(keep)
    if state.drawn + got >= state.available or got < wanted:
        state.exhausted = True
    state.rounds += MIN_ROUNDS if first else 1
    if not got:
        state.pending, state.pending_factors = np.zeros((0, 2, m)), np.zeros(0)
        return np.zeros((0, m))
    chosen = np.concatenate(masks)
    state.pending = np.stack([chosen, 1.0 - chosen], axis=1)  # (k, 2, m)
    state.pending_factors = np.concatenate(factors)
    return state.pending.reshape(-1, m)


def take_enumerated_targets(state: RowState, targets: np.ndarray) -> None:
    """Record v(S) - v(empty) of the enumerated coalitions: their part of the normal equations."""
    weighted = state.enumerated * state.enumerated_weight[:, None]
    state.a_enumerated = weighted.T @ state.enumerated
    state.b_enumerated = weighted.T @ targets


def take_round_targets(state: RowState, targets: np.ndarray) -> None:
    """Record v(S) - v(empty) of the round's coalitions (in draw order, 2 per pair)."""
    assert state.pending is not None and state.pending_factors is not None
    pairs, factors = state.pending, state.pending_factors
    outputs = targets.reshape(len(pairs), 2, -1)
    flat = pairs.reshape(-1, state.m) * np.repeat(factors, 2)[:, None]
    a = flat.T @ pairs.reshape(-1, state.m)
    b = flat.T @ outputs.reshape(-1, outputs.shape[2])
    state.a_pairs = a if state.a_pairs is None else state.a_pairs + a
    state.b_pairs = b if state.b_pairs is None else state.b_pairs + b
    state.pairs = pairs if state.pairs is None else np.concatenate([state.pairs, pairs])
    state.factors = factors if state.factors is None else np.concatenate([state.factors, factors])
    state.targets = outputs if state.targets is None else np.concatenate([state.targets, outputs])
    state.pending = state.pending_factors = None


def solve_row(state: RowState, tolerance: float) -> None:
    """Values and standard errors from everything drawn so far; convergence against the tolerance, and how
    many pairs the next round draws (what the tolerance needs, as the error shrinks with the square root of
    the pairs)."""
    assert state.a_enumerated is not None and state.b_enumerated is not None
    a, b = state.a_enumerated, state.b_enumerated
    n = state.drawn
    if n:
        assert state.a_pairs is not None and state.b_pairs is not None
        a = a + state.a_pairs / (2.0 * n)
        b = b + state.b_pairs / (2.0 * n)
    values = constrained_solve(a, b, state.delta)
    state.values = values
    if state.exact or n < 2:
        state.errors = np.zeros_like(values)
        return
    assert state.pairs is not None and state.targets is not None and state.factors is not None
    # The influence of each pair on the values: the constrained solve's map applied to its weighted residuals.
    residual = state.targets - state.pairs @ values  # (n, 2, outputs)
    pushed = np.einsum("nam,nak->nmk", state.pairs, residual) * (state.factors / (2.0 * n))[:, None, None]
    influence = np.einsum("pm,nmk->npk", _projection(a), pushed)
    centred = influence - influence.mean(axis=0, keepdims=True)
    errors = np.sqrt((centred**2).sum(axis=0) * n / (n - 1))
    # Few pairs estimate the variance loosely: widen as Student's t does, so +-1.96 errors hold their 95%.
    state.errors = errors * float(student_t.ppf(0.975, n - 1)) / 1.96
    if state.rounds < MIN_ROUNDS:
        return
    spread = values.max(axis=0) - values.min(axis=0)
    worst = state.errors.max(axis=0)
    state.converged = bool(np.all(worst <= tolerance * spread))
    if not state.converged:
        ratio = float(np.max(worst / np.maximum(tolerance * spread, 1e-300)))
        needed = int(np.ceil(n * min(ratio**2, 1e6))) - n
        state.next_pairs = int(min(max(needed, state.round_pairs()), n))


def _subsets(m: int, sizes: object) -> np.ndarray:
    rows = [
        np.isin(np.arange(m), chosen).astype(float)
        for k in sizes  # type: ignore[attr-defined]
        for chosen in itertools.combinations(range(m), k)
    ]
    return np.array(rows) if rows else np.zeros((0, m))


def _keys(masks: np.ndarray) -> list[bytes]:
    """One key per coalition (row of 0/1), for drawing without replacement."""
    packed = np.packbits(np.asarray(masks, dtype=bool), axis=1)
    return [row.tobytes() for row in packed]
