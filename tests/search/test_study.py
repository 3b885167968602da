"""The Optuna stage on a synthetic space whose 'true KL' the proxy misjudges."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from dynsearch.errors import DynsearchError
from dynsearch.search.study import SearchSettings, best_result, open_study, run_study
from helpers import synthetic_space, true_kl

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_study_improves_on_seed_and_respects_budget(tmp_path):
    space, weight = synthetic_space()
    budget = (space.min_size() + space.max_size()) // 2
    settings = SearchSettings(budget=budget, n_trials=60, seed=1, proxy_slack=1.0)
    study = open_study(None, "t", space, settings)  # in memory; storage is covered below
    run_study(study, space, settings, true_kl(space, weight), show_progress=False)
    res = best_result(study)
    assert res.seed_value is not None and res.value < 0.97 * res.seed_value
    for t in study.trials:
        if "size" in t.user_attrs:
            assert t.user_attrs["size"] <= budget


def test_resume_reuses_finished_trials(tmp_path):
    space, weight = synthetic_space()
    budget = (space.min_size() + space.max_size()) // 2
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    calls = []

    def counting(choice):
        calls.append(1)
        return true_kl(space, weight)(choice)

    s1 = SearchSettings(budget=budget, n_trials=10, seed=0)
    run_study(open_study(storage, "t", space, s1), space, s1, counting, show_progress=False)
    first = len(calls)
    # same command again: nothing left to do, nothing recomputed
    run_study(open_study(storage, "t", space, s1), space, s1, counting, show_progress=False)
    assert len(calls) == first
    s2 = SearchSettings(budget=budget, n_trials=15, seed=0)
    study = run_study(open_study(storage, "t", space, s2), space, s2, counting, show_progress=False)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 15
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_study_refuses_other_space(tmp_path):
    space, _ = synthetic_space(0)
    other, _ = synthetic_space(1)
    budget = (space.min_size() + space.max_size()) // 2
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(storage, "t", space, SearchSettings(budget=budget))
    with pytest.raises(DynsearchError, match="made for another model"):
        open_study(storage, "t", other, SearchSettings(budget=budget))


def test_non_finite_objective_is_a_failed_trial(tmp_path):
    space, weight = synthetic_space()
    budget = (space.min_size() + space.max_size()) // 2
    settings = SearchSettings(budget=budget, n_trials=4, seed=0)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "t", space, settings)
    run_study(study, space, settings, lambda c: float("nan"), show_progress=False)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("returned nan" in t.user_attrs["fail_reason"] for t in failed)
    with pytest.raises(DynsearchError, match="no completed trial"):
        best_result(study)


def test_refit_recovers_the_multipliers_behind_measured_kl():
    from dynsearch.search.run.proxy_check import random_feasible
    from dynsearch.search.study import group_errors, refit_log_multipliers

    space, _ = synthetic_space(seed=4)
    rng = np.random.default_rng(0)
    a_true = rng.uniform(-1, 1, len(space.group_names))
    budget = (space.min_size() + space.max_size()) // 2
    choices = [random_feasible(space, budget, rng) for _ in range(40)]
    measured = [(c, 0.7 * float(group_errors(space, c) @ np.exp(a_true))) for c in choices]
    a = refit_log_multipliers(space, measured, bound=1.5, ridge=1e-6)
    np.testing.assert_allclose(a - a.mean(), a_true - a_true.mean(), atol=0.05)
    assert refit_log_multipliers(space, measured[:2], 1.5, 0.03) is None


def test_refit_proposals_reach_the_true_optimum():
    from dynsearch.search import knapsack

    space, weight = synthetic_space(seed=1)
    budget = (space.min_size() + space.max_size()) // 2
    evaluate = true_kl(space, weight)
    oracle = evaluate(knapsack.solve_dp(space.sizes, space.errors * weight[:, None], budget).choice)
    best = {}
    for refit in (False, True):
        settings = SearchSettings(budget=budget, n_trials=24, seed=1, refit=refit, moves=False)
        study = open_study(None, f"refit-{refit}", space, settings)
        run_study(study, space, settings, evaluate, show_progress=False)
        best[refit] = best_result(study).value
        if refit:
            assert any(t.user_attrs.get("refit") for t in study.trials)
    assert best[True] <= 1.01 * oracle < best[False]


def _big_embedding_space():
    """The synthetic space with its embedding 12x larger (a tied embedding's share of a small model)."""
    from dynsearch.search.space import SearchSpace

    space, _ = synthetic_space(seed=2)
    sizes, errors = space.sizes.copy(), space.errors.copy()
    sizes[0] *= 12
    errors[0] *= 12
    return SearchSpace(space.names, space.types, space.written, sizes, errors, space.groups, space.group_names,
                       space.n_weights)


def test_the_largest_tensors_are_pinned():
    from dynsearch.search.study import PIN_SHARE, pinned_tensors

    space = _big_embedding_space()
    pins = pinned_tensors(space)
    big = space.sizes.max(axis=1) / space.sizes.max(axis=1).sum()
    assert pins[0] == 0 and 1 <= len(pins) <= 4  # the embedding, and at most 3 more
    assert all(big[i] >= PIN_SHARE for i in pins)
    assert all(big[i] <= min(big[j] for j in pins) for i in range(len(big)) if i not in pins)


def test_moves_find_the_split_a_proxy_misjudges_where_multipliers_do_not():
    """A truth that weighs the (pinned) embedding 4x more than the proxy does: within 12 trials the
    moves (the embedding one type up, the knapsack re-solving the rest) reach the true optimum,
    while group multipliers and refits alone stay at the seed."""
    from dynsearch.search import knapsack
    from dynsearch.search.study import MOVE_TRIAL_ATTR

    space = _big_embedding_space()
    weight = np.ones(len(space.names))
    weight[0] = 4.0
    evaluate = true_kl(space, weight)
    budget = (space.min_size() + space.max_size()) // 2
    oracle = evaluate(knapsack.solve_dp(space.sizes, space.errors * weight[:, None], budget).choice)
    seed = evaluate(space.solve(budget))
    assert seed > 1.3 * oracle
    best = {}
    for moves in (False, True):
        settings = SearchSettings(budget=budget, n_trials=12, seed=1, moves=moves)
        study = open_study(None, f"moves-{moves}", space, settings)
        run_study(study, space, settings, evaluate, show_progress=False)
        best[moves] = best_result(study).value
        for t in study.trials:
            size = t.user_attrs.get("size")
            assert size is None or size <= budget
        moved = [t for t in study.trials if MOVE_TRIAL_ATTR in t.user_attrs]
        assert bool(moved) == moves
    assert best[True] <= 1.001 * oracle and best[False] > 1.3 * oracle
