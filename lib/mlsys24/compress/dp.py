"""L-GreCo's dynamic program: per-layer compression parameters under a global error budget.

Markov, Alimohammadi, Frantar, Alistarh, "L-GreCo: Layerwise-adaptive Gradient Compression for
Efficient Data-parallel Deep Learning", MLSys 2024 (arXiv 2210.17357), Section 3.

Problem. Layers l = 1..L each have candidates c in C_l with a transmitted size s_l(c) and a
compression error e_l(c) measured on a reference gradient. Choose one candidate per layer::

    minimise    sum_l s_l(c_l)
    subject to  sum_l e_l(c_l) <= E_max          (E_max = alpha * sum_l e_l(c0), c0 = uniform choice)

This is a multiple-choice knapsack. Discretise the error axis into D buckets of width w = E_max / D
and round each error *up*, ê = ceil(e / w) (an over-estimate, so any discretised solution also meets
the budget in real errors). Then, with DP_l[j] = the least total size of layers 1..l whose discretised
errors add up to at most j::

    DP_0[j] = 0                                   for j = 0..D
    DP_l[j] = min_c  DP_{l-1}[j - ê_l(c)] + s_l(c)   (over c with ê_l(c) <= j)

The answer is DP_L[D]; argmin pointers give the choices back. Each layer costs |C_l| shifted
vector minimums over D+1 entries: O(L·|C|·D), milliseconds in NumPy for L=100, |C|=9, D=10^4.

Inputs are ``errors`` and ``sizes`` of shape [L, C] (ragged candidate sets are padded with
``size=inf``); ``brute_force`` enumerates every combination and is the test oracle.

Differences from the authors' code (stated): ê may be 0 for an exact candidate (it is still an
over-estimate); errors above E_max or NaN are made infeasible (ê = D + 1) instead of clipped to D;
DP_0 is the empty prefix, so there is no "strict first row" special case.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DPSolution", "discretise", "solve", "brute_force", "brute_force_real"]


@dataclass
class DPSolution:
    """The DP's answer. ``choice[l]`` indexes the candidate axis of the tables given to :func:`solve`."""

    choice: list[int]            # [L] chosen candidate index per layer
    total_size: float            # sum_l s_l(c_l)
    total_error: float           # sum_l e_l(c_l), real (undiscretised) errors
    budget: float                # E_max
    discrete_used: int           # sum_l ê_l(c_l) (<= D)
    buckets: int                 # D
    feasible: bool = True        # False when no combination fits (choice is then empty)
    fell_back: bool = False      # True when the uniform fallback beat the discretised optimum
    extra: dict = field(default_factory=dict)


def discretise(errors: np.ndarray, budget: float, buckets: int) -> np.ndarray:
    """ê = ceil(e / w), w = budget / buckets; e > budget, NaN or inf -> buckets + 1 (never fits)."""
    e = np.asarray(errors, dtype=np.float64)
    if budget <= 0 or not math.isfinite(budget):
        # A zero budget admits only exact (zero-error) candidates.
        out = np.where(e == 0, 0, buckets + 1)
        return out.astype(np.int64)
    w = budget / buckets
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        q = np.ceil(e / w)
    bad = ~np.isfinite(e) | (e > budget) | ~np.isfinite(q)
    q = np.where(bad, buckets + 1, np.clip(q, 0, buckets + 1))
    return q.astype(np.int64)


def solve(errors: np.ndarray, sizes: np.ndarray, budget: float, buckets: int = 10_000,
          fallback: list[int] | None = None) -> DPSolution:
    """Minimise total size subject to sum of errors <= budget (discretised into ``buckets``).

    errors, sizes: [L, C] float arrays; an unavailable candidate has size ``inf``.
    fallback: a choice known to satisfy the budget in real errors (L-GreCo passes the uniform
      setting c0). If the discretised optimum is larger than it (rounding can make c0 look
      infeasible), the fallback is returned instead, so the result is never worse than uniform.
    """
    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if errors.shape != sizes.shape or errors.ndim != 2:
        raise ValueError(f"solve: errors {errors.shape} and sizes {sizes.shape} must both be [L, C]")
    if buckets < 1:
        raise ValueError(f"solve: buckets must be >= 1, got {buckets}")
    L, C = errors.shape
    q = discretise(errors, budget, buckets)                   # [L, C] int
    q = np.where(np.isfinite(sizes), q, buckets + 1)          # unavailable candidates never fit
    D1 = buckets + 1
    dp = np.zeros(D1, dtype=np.float64)                       # DP_0: empty prefix costs nothing
    ptr = np.full((L, D1), -1, dtype=np.int64)                # argmin candidate per (layer, j)
    for layer in range(L):
        new = np.full(D1, np.inf)
        for c in range(C):
            k = int(q[layer, c])
            if k > buckets:
                continue
            cand = dp[: D1 - k] + sizes[layer, c]             # DP_{l-1}[j - k] + s, for j = k..D
            better = cand < new[k:]
            if better.any():
                new[k:][better] = cand[better]
                ptr[layer, k:][better] = c
        dp = new
    if not np.isfinite(dp[buckets]):
        sol = DPSolution([], math.inf, math.inf, budget, 0, buckets, feasible=False)
    else:
        j = buckets
        choice = [0] * L
        for layer in range(L - 1, -1, -1):
            c = int(ptr[layer, j])
            choice[layer] = c
            j -= int(q[layer, c])
        sol = DPSolution(choice, float(sizes[np.arange(L), choice].sum()),
                         float(errors[np.arange(L), choice].sum()), budget,
                         int(q[np.arange(L), choice].sum()), buckets)
    if fallback is not None:
        fb_size = float(sizes[np.arange(L), fallback].sum())
        fb_err = float(errors[np.arange(L), fallback].sum())
        if fb_err <= budget * (1 + 1e-12) and fb_size < sol.total_size:
            sol = DPSolution(list(fallback), fb_size, fb_err, budget,
                             int(np.minimum(q[np.arange(L), fallback], buckets + 1).sum()), buckets,
                             feasible=True, fell_back=True)
    return sol


def brute_force(errors: np.ndarray, sizes: np.ndarray, budget: float, buckets: int) -> tuple[float, list[int]]:
    """Exhaustive search over the *discretised* problem: min total size with sum ê <= D.

    Returns (size, choice); (inf, []) when nothing fits. For testing the DP on small L·|C|.
    """
    q = discretise(errors, budget, buckets)
    sizes = np.asarray(sizes, dtype=np.float64)
    L, C = q.shape
    best, arg = math.inf, []
    for combo in itertools.product(range(C), repeat=L):
        idx = np.arange(L), list(combo)
        if q[idx].sum() <= buckets:
            s = sizes[idx].sum()
            if s < best:
                best, arg = float(s), list(combo)
    return best, arg


def brute_force_real(errors: np.ndarray, sizes: np.ndarray, budget: float) -> tuple[float, list[int]]:
    """Exhaustive search over the *real* problem (sum e <= budget): a lower bound for the DP."""
    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    L, C = errors.shape
    best, arg = math.inf, []
    for combo in itertools.product(range(C), repeat=L):
        idx = np.arange(L), list(combo)
        e = errors[idx].sum()
        if np.isfinite(e) and e <= budget:
            s = sizes[idx].sum()
            if s < best:
                best, arg = float(s), list(combo)
    return best, arg
