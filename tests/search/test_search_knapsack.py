"""The multiple-choice knapsack against brute force over every configuration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tritlm.errors import ConfigError
from tritlm.search.knapsack import solve_dp, solve_greedy


def brute(costs, sizes, budget):
    """(least cost, its bytes) over every configuration that fits, independently of the DP."""
    best = None
    for picks in itertools.product(*(range(len(r)) for r in costs)):
        b = sum(sizes[i][j] for i, j in enumerate(picks))
        c = sum(costs[i][j] for i, j in enumerate(picks))
        if b <= budget and (best is None or c < best[0] - 1e-12):
            best = (c, b)
    return best


def _instance(rng, n_units, n_opt, scale=1000):
    sizes = rng.integers(1, scale, size=(n_units, n_opt)) * rng.integers(1, 5)
    costs = rng.normal(size=(n_units, n_opt))  # negative increases too: noise makes them happen
    return costs, sizes


def test_dp_is_exact_on_random_instances():
    rng = np.random.default_rng(1)
    for trial in range(60):
        costs, sizes = _instance(rng, rng.integers(1, 5), rng.integers(1, 5))
        lo, hi = sizes.min(1).sum(), sizes.max(1).sum()
        budget = int(rng.integers(lo, hi + 1))
        want = brute(costs.tolist(), sizes.tolist(), budget)
        got = solve_dp(costs, sizes, budget)
        assert got.exact
        assert got.bytes <= budget
        assert got.bytes == sum(sizes[i, j] for i, j in enumerate(got.picks))
        assert got.cost == pytest.approx(want[0], abs=1e-9), trial


def test_coarse_buckets_never_exceed_the_budget_and_stay_near_optimal():
    rng = np.random.default_rng(2)
    for _ in range(40):
        costs, sizes = _instance(rng, 4, 4, scale=10**6)
        sizes = sizes + rng.integers(0, 7, size=sizes.shape)  # no common divisor to exploit
        budget = int(rng.integers(sizes.min(1).sum(), sizes.max(1).sum() + 1))
        got = solve_dp(costs, sizes, budget, max_buckets=64)
        assert not got.exact and got.bytes <= budget
        # the bucketed pick is optimal for a budget smaller by at most one bucket per unit
        slack = 4 * -(-budget // 64)
        tighter = brute(costs.tolist(), sizes.tolist(), budget - slack)
        if tighter is not None:
            assert got.cost <= tighter[0] + 1e-9


def test_greedy_fits_and_is_never_better_than_the_dp():
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(60):
        costs, sizes = _instance(rng, 4, 4)
        costs = np.abs(costs)
        budget = int(rng.integers(sizes.min(1).sum(), sizes.max(1).sum() + 1))
        g, d = solve_greedy(costs, sizes, budget), solve_dp(costs, sizes, budget)
        assert g.bytes <= budget
        assert g.cost >= d.cost - 1e-9
        gaps.append(g.cost - d.cost)
    assert max(gaps) > 1e-6  # the instances are hard enough for the greedy to miss sometimes


def test_a_budget_below_every_configuration_is_refused():
    sizes = np.array([[10, 20], [30, 40]])
    with pytest.raises(ConfigError, match="smaller than the smallest"):
        solve_dp(np.zeros((2, 2)), sizes, 39)
    with pytest.raises(ConfigError):
        solve_greedy(np.zeros((2, 2)), sizes, 39)
    assert solve_dp(np.zeros((2, 2)), sizes, 40).picks == (0, 0)
