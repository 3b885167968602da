"""The proxy check: random feasible assignments and their rank correlation with true KL."""

from __future__ import annotations

import numpy as np
import pytest

from dynsearch.errors import BudgetError
from dynsearch.search.run.proxy_check import check_proxy, random_feasible
from helpers import synthetic_space


def test_random_feasible_fits_the_budget_and_uses_it():
    space, _ = synthetic_space()
    lo, hi = space.min_size(), space.max_size()
    rng = np.random.default_rng(0)
    for frac in (0.05, 0.3, 0.7):
        budget = int(lo + frac * (hi - lo))
        choices = [random_feasible(space, budget, rng) for _ in range(20)]
        sizes = [space.size_of(c) for c in choices]
        assert max(sizes) <= budget
        # filled back up: the smallest step of any tensor bounds the unused room
        step = int(np.diff(np.sort(space.sizes, axis=1), axis=1).max())
        assert min(sizes) >= budget - step
        assert len({c.tobytes() for c in choices}) == 20  # really random
    with pytest.raises(BudgetError, match="below the smallest"):
        random_feasible(space, lo - 1, rng)


def test_check_proxy_reports_agreement_and_disagreement():
    space, weight = synthetic_space()
    budget = (space.min_size() + space.max_size()) // 2
    agree = check_proxy(space, budget, space.proxy_of, n=30, seed=0)
    assert agree.spearman == pytest.approx(1.0) and agree.kendall == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    noise = check_proxy(space, budget, lambda c: float(rng.uniform(1, 2)), n=30, seed=0)
    assert abs(noise.spearman) < 0.5
    assert agree.spearman_fitted > 0.95  # a fit to exact proxies keeps them
    assert abs(noise.spearman_fitted) < 0.5  # nothing to learn from noise
    assert "Spearman" in agree.table() and len(agree.table().splitlines()) == 33


def test_fitted_proxy_learns_what_the_raw_proxy_misjudges():
    space, weight = synthetic_space()  # the truth weighs ffn_down 4x more than the proxy
    budget = (space.min_size() + space.max_size()) // 2
    evaluate = lambda c: float((space.errors[np.arange(len(c)), c] * weight).sum())  # noqa: E731
    res = check_proxy(space, budget, evaluate, n=30, seed=2)
    assert res.spearman_fitted > res.spearman + 0.05
    assert res.spearman_fitted > 0.95


@pytest.mark.slow
@pytest.mark.usefixtures("demo_model")
def test_proxy_ranks_random_assignments_of_the_demo_model(tmp_path, capsys):
    from dynsearch.cli import main

    rc = main(["proxy-check", "smollm2-135m", "--budget", "100MB", "--n", "30", "--calib-tokens", "2048",
               "--fisher-tokens", "1024", "--search-tokens", "512", "--eval-tokens", "512",
               "--out", str(tmp_path), "--quiet", "--min-spearman", "0.75"])
    printed = capsys.readouterr().out
    print(printed)
    assert "Spearman" in printed
    assert rc == 0, printed
