"""The Optuna stage: search beyond the proxy's knapsack optimum, scored by true KL.

Each trial proposes one log-multiplier per tensor group; the group's proxy errors are scaled by it
and the budgeted knapsack is re-solved, so every candidate fits the budget by construction and
the search moves in a few dozen dimensions instead of hundreds of tensor types. The largest
tensors (a tied embedding, an output head: each at least :data:`PIN_SHARE` of the searched
bytes) also get a categorical parameter of their own, their type or ``auto`` (the knapsack's
pick): how the budget is split between them and the rest is measured, not left to the proxy.
The first trial is the unscaled knapsack optimum (the seed). A candidate whose proxy is far above
the seed's is pruned before any costly evaluation; a candidate already measured reuses its
stored value.

Besides the sampler's proposals, :class:`Proposer` enqueues trials after each finished one:
the optimum of the proxy refitted to every measurement, budget-neutral moves around the best
candidate so far (a large tensor one type up or down, the knapsack re-solving the rest in the
bytes left), and one group's multiplier moved up or down from the best's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy.optimize import minimize

from dynsearch.errors import DynsearchError
from dynsearch.search.space import SearchSpace, choice_key, parse_choice_key

log = logging.getLogger(__name__)

SEED_TRIAL_ATTR = "seed"
REFIT_TRIAL_ATTR = "refit"
MOVE_TRIAL_ATTR = "move"
AUTO = "auto"  # a pinned tensor's parameter value: the knapsack picks its type
PIN_SHARE = 0.02  # a tensor whose largest candidate is this share of the searched bytes is pinned
MAX_PINNED = 4
GROUP_STEP = 0.7  # a group move changes one log-multiplier by this (about a factor 2)


@dataclass(frozen=True)
class SearchSettings:
    budget: int  # bytes of tensor data every candidate must fit
    n_trials: int = 40  # completed + pruned trials the study should reach (all workers together)
    timeout: float | None = None  # seconds for this worker; None: no limit
    seed: int = 0  # sampler seed
    sampler: str = "tpe"  # "tpe", "cmaes", "gp" or "random"
    max_log_multiplier: float = 1.5  # multipliers range over exp(+-this)
    proxy_slack: float = 0.25  # prune candidates whose proxy exceeds the seed's by more than this
    refit: bool = True  # propose the knapsack optimum of the proxy refitted to measured KL
    refit_ridge: float = 0.03  # pull of the refitted log-multipliers towards 0 (the plain proxy)
    moves: bool = True  # pinned largest tensors and the moves around the best (False: multipliers only)


SAMPLERS = ("tpe", "cmaes", "gp", "random")  # make_sampler's names (--sampler)


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, multivariate=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise DynsearchError(f"unknown sampler {name!r} ({', '.join(SAMPLERS)})")


def _param_names(space: SearchSpace) -> list[str]:
    return [f"m{i:02d}_{g}" for i, g in enumerate(space.group_names)]


def pinned_tensors(space: SearchSpace) -> tuple[int, ...]:
    """Rows of the tensors that get a type parameter of their own: the largest (at most
    :data:`MAX_PINNED`), each at least :data:`PIN_SHARE` of the searched bytes at its largest type."""
    big = np.where(np.isfinite(space.errors), space.sizes, 0).max(axis=1).astype(np.float64)
    share = big / max(big.sum(), 1.0)
    order = np.argsort(-big, kind="stable")[:MAX_PINNED]
    return tuple(sorted(int(i) for i in order if share[i] >= PIN_SHARE))


def _pin_name(space: SearchSpace, i: int) -> str:
    return f"pin_{space.names[i]}"


def _pin_choices(space: SearchSpace, i: int) -> tuple[str, ...]:
    return (AUTO, *(space.types[j] for j in space.allowed(i)))


def _pins(space: SearchSpace, settings: SearchSettings) -> tuple[int, ...]:
    return pinned_tensors(space) if settings.moves else ()


def decode(space: SearchSpace, settings: SearchSettings, params: dict) -> np.ndarray:
    """The candidate a trial's parameters stand for (a ValueError where its pins leave no room)."""
    logm = np.array([params[n] for n in _param_names(space)], dtype=np.float64)
    fixed = {i: space.types.index(params[_pin_name(space, i)]) for i in _pins(space, settings)
             if params.get(_pin_name(space, i), AUTO) != AUTO}
    return space.solve(settings.budget, logm, fixed)


def open_study(storage, study_name: str, space: SearchSpace, settings: SearchSettings) -> optuna.Study:
    """Create the study, or load it to resume; refuses a study made for another search space."""
    study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize",
                                sampler=make_sampler(settings.sampler, settings.seed),
                                load_if_exists=True)
    n_existing = len(study.get_trials(deepcopy=False))
    if n_existing:  # resumed: a fresh stream, or the sampler would replay the points it proposed
        study.sampler = make_sampler(settings.sampler, settings.seed + n_existing)
    fp = space.fingerprint()
    stored = study.user_attrs.get("space_fingerprint")
    if stored is None:
        study.set_user_attr("space_fingerprint", fp)
        study.set_user_attr("budget", int(settings.budget))
        study.set_user_attr("types", list(space.types))
        study.set_user_attr("tensors", list(space.names))
        study.enqueue_trial({**{p: 0.0 for p in _param_names(space)},
                             **{_pin_name(space, i): AUTO for i in _pins(space, settings)}},
                            user_attrs={SEED_TRIAL_ATTR: True}, skip_if_exists=True)
    elif stored != fp or study.user_attrs.get("budget") != int(settings.budget):
        raise DynsearchError(
            f"study {study_name!r} was made for another model, calibration, type set or budget; "
            "use a new --study-name or another storage")
    return study


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def seed_proxy(space: SearchSpace, budget: int) -> float:
    return space.proxy_of(space.solve(budget))


def make_objective(space: SearchSpace, settings: SearchSettings,
                   evaluate: Callable[[np.ndarray], float]) -> Callable[[optuna.Trial], float]:
    names = _param_names(space)
    pins = _pins(space, settings)
    limit = seed_proxy(space, settings.budget) * (1.0 + settings.proxy_slack)
    m = settings.max_log_multiplier

    def objective(trial: optuna.Trial) -> float:
        params = {n: trial.suggest_float(n, -m, m) for n in names}
        params.update({_pin_name(space, i): trial.suggest_categorical(_pin_name(space, i), _pin_choices(space, i))
                       for i in pins})
        try:
            choice = decode(space, settings, params)
        except ValueError as e:  # pinned types too large for the budget
            raise optuna.TrialPruned(f"pinned types leave no room: {e}") from None
        size, proxy = space.size_of(choice), space.proxy_of(choice)
        if size > settings.budget:  # cannot happen: the knapsack never exceeds it
            raise AssertionError(f"candidate of {size} bytes exceeds the budget {settings.budget}")
        key = choice_key(choice)
        trial.set_user_attr("choice", key)
        trial.set_user_attr("size", size)
        trial.set_user_attr("proxy", proxy)
        for t in _finished(trial.study):
            if t.user_attrs.get("choice") == key and t.value is not None:
                trial.set_user_attr("duplicate_of", t.number)
                return t.value
        planned = trial.user_attrs.get(REFIT_TRIAL_ATTR) or trial.user_attrs.get(MOVE_TRIAL_ATTR)
        if proxy > limit and not planned:  # the proposer's trials are measured whatever their proxy
            raise optuna.TrialPruned(f"proxy {proxy:.4g} above the seed's by more than "
                                     f"{settings.proxy_slack:.0%}")
        value = float(evaluate(choice))
        if not math.isfinite(value):
            trial.set_user_attr("fail_reason", f"objective returned {value}")
            raise DynsearchError(f"trial {trial.number}: objective returned {value}")
        return value

    return objective


def group_errors(space: SearchSpace, choice: np.ndarray) -> np.ndarray:
    """(n_groups,) the proxy's error of ``choice`` summed per tensor group."""
    e = space.errors[np.arange(len(choice)), choice]
    return np.bincount(space.groups, weights=e, minlength=len(space.group_names))


def refit_log_multipliers(space: SearchSpace, measured: list[tuple[np.ndarray, float]],
                          bound: float, ridge: float) -> np.ndarray | None:
    """Per-group log-multipliers ``a`` that make the proxy agree with the measured true KL.

    Fits ``log KL_k ~ c + log(sum_g exp(a_g) E_kg)`` over the measured candidates (``E_kg``: the
    proxy's error of candidate k in group g) by least squares, with a ridge pull of ``a``
    towards 0 (the unscaled proxy) and ``|a_g| <= bound``; ``c`` absorbs the overall scale,
    which the knapsack does not need. None with fewer than 3 measurements.
    """
    if len(measured) < 3:
        return None
    E = np.stack([group_errors(space, c) for c, _ in measured])
    y = np.log(np.array([v for _, v in measured], dtype=np.float64))
    if not np.isfinite(y).all():
        return None
    scale = E.sum(axis=1).mean()
    E = E / scale
    G = E.shape[1]

    def loss(x):
        a, c = x[:G], x[G]
        w = np.exp(a)
        pred = E @ w
        r = c + np.log(pred) - y
        ga = (r / pred)[:, None] * E * w[None, :]
        return float(r @ r + ridge * a @ a), np.concatenate([2 * ga.sum(0) + 2 * ridge * a, [2 * r.sum()]])

    x0 = np.concatenate([np.zeros(G), [float(np.mean(y - np.log(E.sum(axis=1))))]])
    res = minimize(loss, x0, jac=True, method="L-BFGS-B",
                   bounds=[(-bound, bound)] * G + [(None, None)])
    a = res.x[:G]
    return a if np.isfinite(a).all() else None


class Proposer:
    """Study callback: after each finished trial, unless a proposal is still waiting or the study
    has its trials, enqueue the first of these whose candidate was not measured yet (every
    worker's trials count):

    1. the knapsack optimum of the proxy refitted to all measured trials (``refit``), with the
       best's pins: the search learns which groups the proxy misjudges from every measurement;
    2. budget-neutral moves around the best candidate so far (``moves``): each pinned tensor one
       type up or down from its type there, the knapsack re-solving the rest in the bytes left;
    3. one group's multiplier moved by :data:`GROUP_STEP` up or down from the best's (``moves``),
       the groups with the largest share of the best's proxy error first.

    When none is new, the sampler proposes the next trial."""

    def __init__(self, space: SearchSpace, settings: SearchSettings):
        self.space, self.settings = space, settings
        self.names = _param_names(space)
        self.pins = _pins(space, settings)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        if sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) >= self.settings.n_trials:
            return  # the study is done: a proposal now would wait for a trial that never comes
        measured, keys = [], set()
        for t in trials:
            key = t.user_attrs.get("choice")
            if key is not None:
                keys.add(key)
            if t.state == TrialState.COMPLETE and key is not None and "duplicate_of" not in t.user_attrs:
                measured.append((parse_choice_key(key), float(t.value)))
        done = [t for t in trials if t.state == TrialState.COMPLETE and "choice" in t.user_attrs]
        if not done:
            return
        best = min(done, key=lambda t: (t.value, t.number))
        for params, attrs in self._proposals(best, measured):
            try:
                choice = decode(self.space, self.settings, params)
            except ValueError:
                continue
            key = choice_key(choice)
            if key not in keys:
                study.enqueue_trial(params, user_attrs=attrs)
                return
            keys.add(key)

    def _proposals(self, best: optuna.trial.FrozenTrial, measured: list[tuple[np.ndarray, float]]):
        space, settings = self.space, self.settings
        base = {**{n: float(best.params.get(n, 0.0)) for n in self.names},
                **{_pin_name(space, i): best.params.get(_pin_name(space, i), AUTO) for i in self.pins}}
        choice = parse_choice_key(best.user_attrs["choice"])
        if settings.refit:
            a = refit_log_multipliers(space, measured, settings.max_log_multiplier, settings.refit_ridge)
            if a is not None:
                yield {**base, **{n: float(v) for n, v in zip(self.names, a)}}, {REFIT_TRIAL_ATTR: True}
        for i in self.pins:
            allowed = space.allowed(i)
            sizes = sorted({int(space.sizes[i, j]) for j in allowed})
            k = sizes.index(int(space.sizes[i, choice[i]]))
            for size in sizes[k + 1: k + 2] + sizes[max(k - 1, 0): k]:  # one up, one down
                j = min((j for j in allowed if space.sizes[i, j] == size), key=lambda j: space.errors[i, j])
                yield ({**base, _pin_name(space, i): space.types[j]},
                       {MOVE_TRIAL_ATTR: f"{space.names[i]} {space.written[i][choice[i]]} -> {space.written[i][j]}"})
        if settings.moves:
            m = settings.max_log_multiplier
            for g in np.argsort(-group_errors(space, choice), kind="stable"):
                name = self.names[g]
                for step in (GROUP_STEP, -GROUP_STEP):
                    v = float(np.clip(base[name] + step, -m, m))
                    if v != base[name]:
                        yield {**base, name: v}, {MOVE_TRIAL_ATTR: f"{space.group_names[g]} x{math.exp(v - base[name]):.2f}"}


def run_study(study: optuna.Study, space: SearchSpace, settings: SearchSettings,
              evaluate: Callable[[np.ndarray], float], show_progress: bool = True,
              max_trials: int | None = None) -> optuna.Study:
    """Run trials until the study holds ``settings.n_trials`` finished ones (all workers), or
    this process ran ``max_trials``."""
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    remaining = settings.n_trials - done
    if max_trials is not None:
        remaining = min(remaining, max_trials)
    if remaining <= 0:
        return study
    callback = optuna.study.MaxTrialsCallback(settings.n_trials,
                                              states=(TrialState.COMPLETE, TrialState.PRUNED))
    proposing = settings.refit or settings.moves
    callbacks = [callback] + ([Proposer(space, settings)] if proposing else [])
    study.optimize(make_objective(space, settings, evaluate), n_trials=remaining,
                   timeout=settings.timeout, callbacks=callbacks, catch=(DynsearchError,),
                   show_progress_bar=show_progress, gc_after_trial=False)
    return study


@dataclass(frozen=True)
class StudyResult:
    choice: np.ndarray
    value: float  # true KL of the best candidate
    seed_value: float | None  # true KL of the knapsack seed
    n_complete: int
    n_pruned: int
    n_failed: int


def best_result(study: optuna.Study) -> StudyResult:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise DynsearchError(f"study {study.study_name!r} has no completed trial yet")
    best = min(done, key=lambda t: (t.value, t.number))
    seeds = [t for t in done if t.user_attrs.get(SEED_TRIAL_ATTR)]
    return StudyResult(
        choice=parse_choice_key(best.user_attrs["choice"]), value=float(best.value),
        seed_value=float(seeds[0].value) if seeds else None, n_complete=len(done),
        n_pruned=sum(t.state == TrialState.PRUNED for t in trials),
        n_failed=sum(t.state == TrialState.FAIL for t in trials))
