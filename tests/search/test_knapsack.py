"""Knapsack solvers against brute force on small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynsearch.search import knapsack as ks


def brute_force(sizes, costs, budget):
    n, m = sizes.shape
    best = (np.inf, None)
    for combo in itertools.product(range(m), repeat=n):
        s = sum(sizes[i, j] for i, j in enumerate(combo))
        c = sum(costs[i, j] for i, j in enumerate(combo))
        if s <= budget and c < best[0]:
            best = (c, combo)
    return best


def instance(seed, n, m, with_inf=True):
    """Quantization-like items: bigger options cost less, with noise and some forbidden options."""
    rng = np.random.default_rng(seed)
    base = rng.integers(1, 20, (n, 1))
    sizes = base * np.sort(rng.integers(1, 9, (n, m)), axis=1)
    costs = np.sort(rng.exponential(1.0, (n, m)), axis=1)[:, ::-1] * rng.uniform(0.1, 3, (n, 1))
    costs += rng.uniform(0, 0.3, (n, m))  # not perfectly monotone, as real errors are not
    if with_inf:
        mask = rng.random((n, m)) < 0.15
        mask[:, 0] = False
        costs[mask] = np.inf
    return sizes.astype(np.int64), costs


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), m=st.integers(1, 4), frac=st.floats(0, 1))
def test_dp_is_optimal_with_integer_sizes(seed, n, m, frac):
    sizes, costs = instance(seed, n, m)
    lo, hi = ks.min_size(sizes, costs), ks.max_size(sizes, costs)
    budget = int(lo + frac * (hi - lo))
    best_cost, _ = brute_force(sizes, costs, budget)
    sol = ks.solve_dp(sizes, costs, budget, resolution=budget)  # one cell per byte: exact
    assert sol.size <= budget
    assert sol.cost == pytest.approx(best_cost, rel=1e-12, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), m=st.integers(1, 4), frac=st.floats(0, 1))
def test_lagrangian_is_feasible_and_bounded(seed, n, m, frac):
    sizes, costs = instance(seed, n, m)
    lo, hi = ks.min_size(sizes, costs), ks.max_size(sizes, costs)
    budget = int(lo + frac * (hi - lo))
    best_cost, _ = brute_force(sizes, costs, budget)
    sol = ks.solve_lagrangian(sizes, costs, budget)
    assert sol.size <= budget
    assert sol.cost >= best_cost - 1e-9
    assert sol.lower_bound <= best_cost + 1e-9  # the dual certifies optimality gaps


def test_coarse_grid_never_exceeds_budget_and_stays_close():
    sizes, costs = instance(7, 200, 8, with_inf=True)
    sizes = sizes * 1_000_003  # byte-like magnitudes
    lo, hi = ks.min_size(sizes, costs), ks.max_size(sizes, costs)
    for frac in (0.0, 0.05, 0.3, 0.6, 0.99, 1.0):
        budget = int(lo + frac * (hi - lo))
        dp = ks.solve_dp(sizes, costs, budget, resolution=5000)
        lg = ks.solve_lagrangian(sizes, costs, budget)
        assert dp.size <= budget and lg.size <= budget
        # both near the dual bound: the relaxation gap of 200 items is small
        assert dp.cost <= lg.lower_bound * 1.02 + 1e-6
        assert lg.cost <= lg.lower_bound * 1.05 + 1e-6


def test_impossible_budget_and_bad_input():
    sizes, costs = instance(1, 4, 3, with_inf=False)
    with pytest.raises(ValueError, match="below the smallest possible size"):
        ks.solve_dp(sizes, costs, ks.min_size(sizes, costs) - 1)
    with pytest.raises(ValueError, match="below the smallest possible size"):
        ks.solve_lagrangian(sizes, costs, ks.min_size(sizes, costs) - 1)
    bad = costs.copy()
    bad[2, :] = np.inf
    with pytest.raises(ValueError, match="no allowed option"):
        ks.solve_dp(sizes, bad, 10**9)
    with pytest.raises(ValueError, match="NaN"):
        ks.solve_dp(sizes, np.full_like(costs, np.nan), 10**9)


def test_pareto_front_is_monotone():
    sizes, costs = instance(3, 40, 6)
    lo, hi = ks.min_size(sizes, costs), ks.max_size(sizes, costs)
    front = ks.pareto_front(sizes, costs, np.linspace(lo, hi, 8).astype(int))
    assert all(a.cost >= b.cost - 1e-9 for a, b in zip(front, front[1:]))
