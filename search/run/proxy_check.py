"""How good is the proxy? Rank correlation with true KL over random feasible assignments.

The proxy (:mod:`dynsearch.search.profile`) is only useful if ranking candidates by it ranks them
as true end-to-end KL would. This module draws random assignments that fit a budget (uniform
random types, repaired down to the budget, then randomly filled back up to it, so they sit near
the budget but spread their bytes arbitrarily), measures each with the true KL, and reports the
Spearman rank correlation with true KL of two proxies:

- the raw second-order proxy (what the knapsack seed optimises), and
- the *fitted* proxy: the raw one with per-group sensitivities fitted to measured KL, as the
  search's :class:`~dynsearch.search.study.Proposer` does during a study. Its figure is
  cross-validated: each assignment is predicted by a fit on the others only (leave one out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as _scipy_stats
from tqdm.auto import tqdm

from dynsearch.errors import BudgetError
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.prepare import RunModel, prepare
from dynsearch.search.space import SearchSpace
from dynsearch.search.study import SearchSettings, group_errors, refit_log_multipliers


def random_feasible(space: SearchSpace, budget: int, rng: np.random.Generator) -> np.ndarray:
    """A random choice whose size is at most ``budget``, using most of it.

    Each tensor starts at a uniformly random allowed type; while over budget a random tensor moves
    to a random cheaper type; then random tensors move to random dearer types that still fit.
    """
    n = len(space.names)
    allowed = [np.asarray(space.allowed(i), dtype=np.intp) for i in range(n)]
    if any(len(a) == 0 for a in allowed):
        raise BudgetError("a tensor has no allowed type")
    if space.min_size() > budget:
        raise BudgetError(f"budget {budget} bytes is below the smallest assignment ({space.min_size()} bytes)")
    choice = np.array([rng.choice(a) for a in allowed], dtype=np.int64)
    sizes = space.sizes
    total = space.size_of(choice)
    while total > budget:
        i = int(rng.integers(n))
        cheaper = [j for j in allowed[i] if sizes[i, j] < sizes[i, choice[i]]]
        if not cheaper:
            continue
        j = int(rng.choice(cheaper))
        total += int(sizes[i, j] - sizes[i, choice[i]])
        choice[i] = j
    for i in rng.permutation(n):
        room = budget - total
        dearer = [j for j in allowed[i] if 0 < sizes[i, j] - sizes[i, choice[i]] <= room]
        if dearer:
            j = int(rng.choice(dearer))
            total += int(sizes[i, j] - sizes[i, choice[i]])
            choice[i] = j
    return choice


@dataclass(frozen=True)
class ProxyCheck:
    proxy: np.ndarray  # (k,) raw proxy of each sampled assignment
    fitted: np.ndarray  # (k,) fitted proxy, each from a fit on the other assignments
    true_kl: np.ndarray  # (k,) measured mean KL
    sizes: np.ndarray  # (k,) bytes of tensor data

    @property
    def spearman(self) -> float:
        return float(_scipy_stats.spearmanr(self.proxy, self.true_kl).statistic)

    @property
    def spearman_fitted(self) -> float:
        return float(_scipy_stats.spearmanr(self.fitted, self.true_kl).statistic)

    @property
    def kendall(self) -> float:
        return float(_scipy_stats.kendalltau(self.proxy, self.true_kl).statistic)

    @property
    def log_pearson(self) -> float:
        return float(np.corrcoef(np.log(self.proxy), np.log(self.true_kl))[0, 1])

    def table(self) -> str:
        lines = [f"{'#':>3} {'bytes':>11} {'proxy':>10} {'fitted':>10} {'true KL':>10}"]
        for k in np.argsort(self.true_kl):
            lines.append(f"{k:>3} {self.sizes[k]:>11} {self.proxy[k]:>10.5f} {self.fitted[k]:>10.5f} "
                         f"{self.true_kl[k]:>10.5f}")
        lines.append(f"raw proxy:    Spearman {self.spearman:.3f}   Kendall {self.kendall:.3f}   "
                     f"Pearson(log) {self.log_pearson:.3f}   over {len(self.proxy)} assignments")
        lines.append(f"fitted proxy: Spearman {self.spearman_fitted:.3f}   (per-group sensitivities "
                     "fitted to measured KL, leave-one-out)")
        return "\n".join(lines)


def check_proxy(space: SearchSpace, budget: int, true_kl: Callable[[np.ndarray], float], n: int = 30,
                seed: int = 0, progress: Callable | None = None,
                bound: float = SearchSettings.max_log_multiplier,
                ridge: float = SearchSettings.refit_ridge) -> ProxyCheck:
    """Measure ``n`` distinct random feasible assignments with ``true_kl`` and compare to the proxy."""
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    choices = []
    attempts = 0
    while len(choices) < n:
        c = random_feasible(space, budget, rng)
        attempts += 1
        if c.tobytes() not in seen:
            seen.add(c.tobytes())
            choices.append(c)
        elif attempts > 100 * n:
            raise BudgetError(f"the budget leaves fewer than {n} distinct feasible assignments")
    it = progress(choices) if progress else choices
    kl = np.array([true_kl(c) for c in it], dtype=np.float64)
    return ProxyCheck(proxy=np.array([space.proxy_of(c) for c in choices]),
                      fitted=leave_one_out_fitted(space, choices, kl, bound, ridge), true_kl=kl,
                      sizes=np.array([space.size_of(c) for c in choices], dtype=np.int64))


def leave_one_out_fitted(space: SearchSpace, choices: list[np.ndarray], kl: np.ndarray,
                         bound: float, ridge: float) -> np.ndarray:
    """The fitted proxy of each choice, from the per-group fit to all the *other* measurements."""
    out = np.empty(len(choices))
    for k, c in enumerate(choices):
        others = [(choices[j], float(kl[j])) for j in range(len(choices)) if j != k]
        a = refit_log_multipliers(space, others, bound, ridge)
        out[k] = space.proxy_of(c) if a is None else float(group_errors(space, c) @ np.exp(a))
    return out


def main(cfg: RunConfig, model: RunModel, n: int = 30, min_spearman: float | None = None,
         progress: bool = True) -> int:
    """``dynsearch proxy-check``: profile as ``dynsearch run`` does (cached), then print the table."""
    prep = prepare(cfg, model, progress=progress)
    rc = 0
    for budget, tensor_budget in zip(cfg.budgets, prep.tensor_budgets):
        bar = (lambda xs, spec=budget.spec: tqdm(xs, desc=f"true KL @ {spec}", unit="assignment")) if progress else None
        res = check_proxy(prep.space, tensor_budget, prep.kl_of, n=n, seed=cfg.seed, progress=bar)
        print(f"budget {budget.spec}: {len(res.proxy)} random feasible assignments, true KL on "
              f"{prep.search_tokens.size} calibration tokens")
        print(res.table())
        if min_spearman is not None and res.spearman_fitted < min_spearman:
            print(f"fitted-proxy Spearman {res.spearman_fitted:.3f} is below the required {min_spearman}")
            rc = 1
    return rc
