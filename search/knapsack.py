"""Multiple-choice knapsack: one option (quant type) per item (tensor), total size within a budget,
minimum total cost (proxy error).

Two solvers, both returning an assignment that never exceeds the budget:

* :func:`solve_dp` -- dynamic programming over sizes rounded *up* to a grid of ``resolution``
  cells, then a greedy fill of the slack with exact sizes. With ``resolution >= budget`` (integer
  sizes) it is exact; otherwise its cost is within the rounding of the optimum.
* :func:`solve_lagrangian` -- the convex-hull relaxation (min c + lambda * s per item, bisection
  on lambda) followed by the same greedy fill; the dual bound it returns certifies how far from
  optimal any feasible solution can be.

Options an item cannot take carry ``cost = inf``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit


class Solution(NamedTuple):
    choice: np.ndarray  # (n_items,) int64 option index per item
    size: int  # total size of the chosen options
    cost: float  # total cost of the chosen options
    lower_bound: float  # a lower bound on the optimal cost (-inf where unknown)


def _check(sizes: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.asarray(sizes, dtype=np.int64)
    costs = np.asarray(costs, dtype=np.float64)
    if sizes.ndim != 2 or sizes.shape != costs.shape:
        raise ValueError(f"sizes {sizes.shape} and costs {costs.shape} must be equal 2-D shapes")
    if (sizes < 0).any():
        raise ValueError("sizes must be non-negative")
    if np.isnan(costs).any():
        raise ValueError("costs contain NaN")
    if not np.isfinite(costs).any(axis=1).all():
        raise ValueError("an item has no allowed option (every cost is inf)")
    return sizes, costs


def min_size(sizes: np.ndarray, costs: np.ndarray) -> int:
    """The smallest total size any assignment can reach."""
    sizes, costs = _check(sizes, costs)
    return int(np.where(np.isfinite(costs), sizes, np.iinfo(np.int64).max).min(axis=1).sum())


def max_size(sizes: np.ndarray, costs: np.ndarray) -> int:
    sizes, costs = _check(sizes, costs)
    return int(np.where(np.isfinite(costs), sizes, -1).max(axis=1).sum())


def _solution(choice, sizes, costs, lower_bound=-np.inf) -> Solution:
    idx = np.arange(len(choice))
    return Solution(choice.astype(np.int64), int(sizes[idx, choice].sum()),
                    float(costs[idx, choice].sum()), float(lower_bound))


@njit(cache=True, nogil=True)
def _greedy_fill(choice, sizes, costs, budget):
    """Repeatedly take the single-item change with the best cost decrease per extra byte that
    still fits (a decrease with no extra bytes first). Never increases cost or exceeds budget."""
    n, m = sizes.shape
    total = 0
    for i in range(n):
        total += sizes[i, choice[i]]
    while True:
        best_i = -1
        best_j = -1
        best_rate = 0.0
        for i in range(n):
            ci = costs[i, choice[i]]
            si = sizes[i, choice[i]]
            for j in range(m):
                dc = ci - costs[i, j]
                if not dc > 0.0:
                    continue
                ds = sizes[i, j] - si
                if total + ds > budget:
                    continue
                rate = np.inf if ds <= 0 else dc / ds
                if rate > best_rate:
                    best_rate = rate
                    best_i = i
                    best_j = j
        if best_i < 0:
            return choice
        total += sizes[best_i, best_j] - sizes[best_i, choice[best_i]]
        choice[best_i] = best_j


@njit(cache=True, nogil=True)
def _dp(cells, costs, capacity):
    """Exact MCKP over integer cell sizes. Returns the option per item (-1 if infeasible)."""
    n, m = cells.shape
    inf = np.inf
    best = np.full(capacity + 1, inf)  # best[c] = min cost using exactly <= c cells so far
    best[0] = 0.0
    back = np.full((n, capacity + 1), -1, dtype=np.int16)
    for i in range(n):
        new = np.full(capacity + 1, inf)
        for c in range(capacity + 1):
            if best[c] == inf:
                continue
            for j in range(m):
                cj = costs[i, j]
                if cj == inf:
                    continue
                c2 = c + cells[i, j]
                if c2 > capacity:
                    continue
                v = best[c] + cj
                if v < new[c2]:
                    new[c2] = v
                    back[i, c2] = j
        best = new
    choice = np.full(n, -1, dtype=np.int64)
    c_best = -1
    v_best = inf
    for c in range(capacity + 1):
        if best[c] < v_best:
            v_best = best[c]
            c_best = c
    if c_best < 0:
        return choice
    c = c_best
    for i in range(n - 1, -1, -1):
        j = back[i, c]
        choice[i] = j
        c -= cells[i, j]
    return choice


def solve_dp(sizes, costs, budget: int, resolution: int = 20_000) -> Solution:
    """Optimal up to the size grid: sizes rounded up to ``budget / resolution``, so the result
    always fits; then the slack is filled greedily with exact sizes."""
    sizes, costs = _check(sizes, costs)
    budget = int(budget)
    if min_size(sizes, costs) > budget:
        raise ValueError(f"budget {budget} is below the smallest possible size {min_size(sizes, costs)}")
    cell = max(1, -(-budget // resolution))
    cells = -(-sizes // cell)  # ceil: a solution on the grid fits the real budget
    choice = _dp(cells, costs, budget // cell)
    if (choice < 0).any():  # rounding made the grid infeasible: start from the smallest options
        choice = np.where(np.isfinite(costs), sizes, np.iinfo(np.int64).max).argmin(axis=1)
    choice = _greedy_fill(choice.astype(np.int64), sizes, costs, budget)
    return _solution(choice, sizes, costs)


def _pick(sizes, costs, lam):
    score = np.where(np.isfinite(costs), costs + lam * sizes, np.inf)
    return score.argmin(axis=1)


def solve_lagrangian(sizes, costs, budget: int, iters: int = 60) -> Solution:
    """Bisection on the size price lambda, then greedy fill. ``lower_bound`` is the Lagrangian
    dual value: no assignment within the budget has a lower cost."""
    sizes, costs = _check(sizes, costs)
    budget = int(budget)
    if min_size(sizes, costs) > budget:
        raise ValueError(f"budget {budget} is below the smallest possible size {min_size(sizes, costs)}")
    idx = np.arange(sizes.shape[0])

    def dual(lam):
        ch = _pick(sizes, costs, lam)
        return float((costs[idx, ch] + lam * sizes[idx, ch]).sum() - lam * budget), ch

    lo, hi = 0.0, 1.0
    ch = _pick(sizes, costs, lo)
    if sizes[idx, ch].sum() <= budget:
        return _solution(_greedy_fill(ch, sizes, costs, budget), sizes, costs, dual(0.0)[0])
    while sizes[idx, _pick(sizes, costs, hi)].sum() > budget:
        hi *= 4.0
    bound = -np.inf
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        d, ch = dual(mid)
        bound = max(bound, d)
        if sizes[idx, ch].sum() > budget:
            lo = mid
        else:
            hi = mid
    bound = max(bound, dual(hi)[0])
    choice = _greedy_fill(_pick(sizes, costs, hi), sizes, costs, budget)
    return _solution(choice, sizes, costs, bound)


def pareto_front(sizes, costs, budgets) -> list[Solution]:
    """One solution per budget (the family of recipes a single profiling pass yields)."""
    return [solve_dp(sizes, costs, int(b)) for b in budgets]
