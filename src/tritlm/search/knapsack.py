"""Multiple-choice knapsack: one option per unit, total bytes within the budget, least total cost.

:func:`solve_dp` is exact dynamic programming over bytes. Bytes are counted in buckets of
``resolution`` bytes: the greatest common divisor of all sizes when that keeps the table small
(then the answer is exact), else a coarser bucket with every size rounded *up*, so a pick the DP
accepts never exceeds the budget in real bytes (it may then miss picks that use the last few
buckets' worth of bytes; ``Pick.exact`` says which case applied). :func:`solve_greedy` is the
loss-per-byte baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from tritlm.errors import ConfigError

MAX_BUCKETS = 1 << 18


@dataclass(frozen=True)
class Pick:
    """One option index per unit, with the real total bytes and the summed cost."""

    picks: tuple[int, ...]
    bytes: int
    cost: float
    exact: bool = True  # the DP ran at a 1-byte-equivalent resolution (the gcd of all sizes)


def _check(costs: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(costs, dtype=np.float64)
    w = np.asarray(sizes, dtype=np.int64)
    if c.shape != w.shape or c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"costs {c.shape} and sizes {w.shape} must be the same non-empty [units, options]")
    if (w < 0).any() or not np.isfinite(c).all():
        raise ValueError("sizes must be non-negative and costs finite")
    return c, w


def min_bytes(sizes: np.ndarray) -> int:
    """Bytes of the smallest configuration (each unit in its smallest option)."""
    return int(np.asarray(sizes).min(axis=1).sum())


def _total(c: np.ndarray, w: np.ndarray, picks: Sequence[int]) -> tuple[int, float]:
    idx = np.arange(len(picks))
    return int(w[idx, list(picks)].sum()), float(c[idx, list(picks)].sum())


def solve_dp(costs: np.ndarray, sizes: np.ndarray, budget: int, max_buckets: int = MAX_BUCKETS) -> Pick:
    """The configuration of least total cost whose real bytes fit ``budget`` (see the module doc)."""
    c, w = _check(costs, sizes)
    if min_bytes(w) > budget:
        raise ConfigError(f"the budget ({budget:,} bytes) is smaller than the smallest configuration "
                          f"({min_bytes(w):,} bytes)")
    g = reduce(math.gcd, (int(x) for x in w.ravel()), 0) or 1
    res, exact = g, True
    if budget // res > max_buckets:
        res, exact = -(-budget // max_buckets), False
    wb = -(-w // res)  # rounded up: bucketed totals bound the real ones from above
    cap = budget // res
    n_units, n_opt = c.shape
    inf = np.inf
    # best[b]: least cost of the units so far with bucketed bytes exactly b
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    choice = np.zeros((n_units, cap + 1), dtype=np.int16)
    for i in range(n_units):
        nxt = np.full(cap + 1, inf)
        for j in range(n_opt):
            s = int(wb[i, j])
            if s > cap:
                continue
            cand = best[: cap + 1 - s] + c[i, j]
            better = cand < nxt[s:]
            nxt[s:][better] = cand[better]
            choice[i, s:][better] = j
        best = nxt
    b = int(np.argmin(best))  # ties: the fewest bytes
    if not np.isfinite(best[b]):  # unreachable once rounded up: no pick that is sure to fit
        raise ConfigError(f"no configuration fits {budget:,} bytes at a {res}-byte resolution")
    picks = [0] * n_units
    for i in range(n_units - 1, -1, -1):
        j = int(choice[i, b])
        picks[i] = j
        b -= int(wb[i, j])
    nbytes, cost = _total(c, w, picks)
    assert nbytes <= budget, "bucketing must never exceed the budget"
    return Pick(tuple(picks), nbytes, cost, exact)


def solve_greedy(costs: np.ndarray, sizes: np.ndarray, budget: int) -> Pick:
    """Start from each unit's smallest option; repeatedly take the upgrade that removes the most cost
    per added byte and still fits, until none helps. A baseline, not optimal."""
    c, w = _check(costs, sizes)
    if min_bytes(w) > budget:
        raise ConfigError(f"the budget ({budget:,} bytes) is smaller than the smallest configuration "
                          f"({min_bytes(w):,} bytes)")
    # the cheapest-cost option among the smallest ones
    picks = [int(min(np.flatnonzero(w[i] == w[i].min()), key=lambda j, i=i: c[i, j])) for i in range(len(c))]
    used = _total(c, w, picks)[0]
    while True:
        best, move = 0.0, None
        for i, j0 in enumerate(picks):
            for j in range(c.shape[1]):
                dw, dc = int(w[i, j] - w[i, j0]), float(c[i, j0] - c[i, j])
                if dc <= 0 or used + dw > budget:
                    continue
                ratio = dc / dw if dw > 0 else math.inf  # free or smaller and better: always take
                if ratio > best:
                    best, move = ratio, (i, j, dw)
        if move is None:
            break
        i, j, dw = move
        picks[i] = j
        used += dw
    nbytes, cost = _total(c, w, picks)
    return Pick(tuple(picks), nbytes, cost)
