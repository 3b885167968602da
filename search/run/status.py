"""``dynsearch status``: the progress and best-so-far of the studies in a storage, as a table."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from dynsearch.search.budget import format_bytes
from dynsearch.search.run.config import RunConfig
from dynsearch.search.run.storage import load_study
from dynsearch.search.run.worker import BUDGET_INDEX_ATTR, N_TRIALS_ATTR, RUN_CONFIG_ATTR
from dynsearch.search.study import SEED_TRIAL_ATTR


@dataclass(frozen=True)
class StudyStatus:
    name: str
    complete: int
    pruned: int
    failed: int
    running: int
    waiting: int  # queued: the seed, or a retry of a failed trial
    requested: int | None  # the trial count last asked for (all workers)
    best_kl: float | None  # true KL of the best completed trial
    seed_kl: float | None  # true KL of the knapsack seed
    budget: str | None  # as the user typed it, e.g. "100MB"
    budget_bytes: int | None  # bytes of tensor data every candidate fits
    best_bytes: int | None  # bytes of tensor data of the best candidate

    @property
    def improvement(self) -> float | None:
        """Percent by which the best beats the seed (true KL)."""
        if self.best_kl is None or not self.seed_kl:
            return None
        return 100.0 * (self.seed_kl - self.best_kl) / self.seed_kl


def study_status(study: optuna.Study) -> StudyStatus:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(done, key=lambda t: (t.value, t.number)) if done else None
    seeds = [t for t in done if t.user_attrs.get(SEED_TRIAL_ATTR)]
    attrs = study.user_attrs
    spec = None
    if RUN_CONFIG_ATTR in attrs:
        budgets = RunConfig.from_json(attrs[RUN_CONFIG_ATTR]).budgets
        index = int(attrs.get(BUDGET_INDEX_ATTR, 0))
        spec = budgets[index].spec if index < len(budgets) else None
    return StudyStatus(
        name=study.study_name, complete=count[TrialState.COMPLETE], pruned=count[TrialState.PRUNED],
        failed=count[TrialState.FAIL], running=count[TrialState.RUNNING],
        waiting=count[TrialState.WAITING], requested=attrs.get(N_TRIALS_ATTR),
        best_kl=float(best.value) if best else None,
        seed_kl=float(seeds[0].value) if seeds else None, budget=spec,
        budget_bytes=attrs.get("budget"),
        best_bytes=best.user_attrs.get("size") if best else None)


def storage_status(storage, study_name: str | None = None) -> list[StudyStatus]:
    """One row per study in ``storage`` (or only ``study_name``)."""
    if study_name is not None:
        return [study_status(load_study(storage, study_name))]
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    return [study_status(optuna.load_study(study_name=n, storage=storage)) for n in names]


def format_table(rows: list[StudyStatus]) -> str:
    head = (f"{'study':<28} {'done':>9} {'pruned':>6} {'failed':>6} {'running':>7} {'queued':>6} "
            f"{'best KL':>9} {'seed KL':>9} {'gain':>7} {'budget':>10} {'best size':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        done = f"{r.complete + r.pruned}/{r.requested}" if r.requested else str(r.complete + r.pruned)
        budget = r.budget or (format_bytes(r.budget_bytes) if r.budget_bytes else "-")
        lines.append(
            f"{r.name:<28} {done:>9} {r.pruned:>6} {r.failed:>6} {r.running:>7} {r.waiting:>6} "
            f"{_num(r.best_kl):>9} {_num(r.seed_kl):>9} "
            f"{'-' if r.improvement is None else f'{r.improvement:.1f}%':>7} {budget:>10} "
            f"{format_bytes(r.best_bytes) if r.best_bytes else '-':>10}")
    if not rows:
        lines.append("(no studies)")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.5f}"
