"""More processes (or machines) on one study: ``dynsearch worker`` and ``run --search-workers``.

A study made by ``dynsearch run`` stores the run's configuration (``pipeline.RUN_CONFIG_ATTR``);
a worker reads it back, prepares the same search space from the shared cache (statistics and
profiles are cache hits, so this is quick; the space's fingerprint must match the study's) and
runs trials until the study holds its requested number. Stale trials of dead workers are failed
and re-queued once before each trial (see :mod:`.storage`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from ..errors import StorageError
from .cluster import SCHEDULER_ENV, ProfileBackend
from .space import SearchSpace
from .storage import OWNER_ATTR, load_study, open_storage, redact, sweep_stale, this_worker
from .study import SearchSettings, open_study, run_study

log = logging.getLogger(__name__)

STORAGE_ENV = "DYNSEARCH_STORAGE"  # storage URL for spawned workers (kept out of argv and ps)


@dataclass(frozen=True)
class WorkerResult:
    study_name: str
    ran: int  # trials this process finished (complete, pruned or failed)
    complete: int  # completed trials in the study afterwards
    requested: int


def work(study: optuna.Study, space: SearchSpace, settings: SearchSettings,
         evaluate: Callable[[np.ndarray], float], max_trials: int | None = None,
         progress: bool = True) -> int:
    """Sweep stale trials, then run trials until the study holds ``settings.n_trials`` finished
    ones (or this process ran ``max_trials`` / ``settings.timeout`` passed). Returns how many
    trials this process finished.

    Should another worker declare one of ours dead while it still runs (its beats stopped for
    longer than the grace period: a suspended machine, say), Optuna refuses the result; the trial
    is already failed and re-queued, so this worker logs it and goes on with the next one."""
    me = this_worker()
    ran = 0
    while max_trials is None or ran < max_trials:
        sweep_stale(study)
        before = _owned(study, me)
        try:
            run_study(study, space, settings, evaluate, show_progress=progress,
                      max_trials=None if max_trials is None else max_trials - ran)
            lost = None
        except (AssertionError, ValueError) as e:
            lost = _lost_trial(study, me, before, e)
            if lost is None:
                raise
            log.warning("trial %d of this worker was declared dead by another worker (no heartbeat "
                        "within the grace period) and re-queued; going on", lost)
        ran += len(_owned(study, me) - before)
        if lost is None:
            break
    return ran


def _owned(study: optuna.Study, me: dict) -> set[int]:
    """Numbers of the finished trials this process ran."""
    return {t.number for t in study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.system_attrs.get(OWNER_ATTR) == me}


def _lost_trial(study: optuna.Study, me: dict, before: set[int], err: Exception) -> int | None:
    """The number of our trial another worker failed, if that is what ``err`` (Optuna's refusal
    to record a result for a finished trial) is about; None for any other error."""
    if not (str(err).startswith("Cannot tell a") or str(err) == "Should not reach."):
        return None
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.system_attrs.get(OWNER_ATTR) == me and t.number not in before]
    return max(failed) if failed else None


@dataclass(frozen=True)
class Local:
    """How this worker differs from the run that made the study: where it profiles any tensor
    the shared cache lacks, and where that cache lies on this machine."""

    joblib_backend: str = "threading"  # threading, loky or dask (--joblib-backend)
    dask_scheduler: str | None = None  # None: $DYNSEARCH_DASK_SCHEDULER
    cache: str | None = None  # the shared cache folder here; None: the run's path


def join(storage_url: str, study_name: str, max_trials: int | None = None,
         timeout: float | None = None, progress: bool = True, local: Local = Local()) -> WorkerResult:
    """``dynsearch worker``: join the study ``study_name`` made by ``dynsearch run``."""
    from .pipeline import BUDGET_INDEX_ATTR, N_TRIALS_ATTR, RUN_CONFIG_ATTR, config_from_json, prepare

    storage = open_storage(storage_url)
    stored = load_study(storage, study_name)
    text = stored.user_attrs.get(RUN_CONFIG_ATTR)
    if text is None:
        raise StorageError(f"study {study_name!r} in {redact(storage_url)} was not made by "
                           "`dynsearch run` (no stored run configuration); start it with run first")
    cfg = replace(config_from_json(text), storage=storage_url, timeout=timeout,
                  joblib_backend=local.joblib_backend, dask_scheduler=local.dask_scheduler)
    if local.cache:
        cfg = replace(cfg, cache=str(Path(local.cache).expanduser().resolve()))
    index = int(stored.user_attrs.get(BUDGET_INDEX_ATTR, 0))
    requested = int(stored.user_attrs.get(N_TRIALS_ATTR, cfg.trials))
    cfg = replace(cfg, trials=requested)
    finished = stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(finished) >= requested:  # nothing left: leave without loading the model
        sweep_stale(stored)
        complete = sum(t.state == TrialState.COMPLETE for t in finished)
        return WorkerResult(study_name, 0, complete, requested)
    prep = prepare(cfg, progress)
    if prep.study_name(index) != study_name:
        raise StorageError(f"study {study_name!r}: its stored configuration names study "
                           f"{prep.study_name(index)!r}; it was renamed or copied")
    # the sampler of each extra worker draws its own stream, or all would propose the same points
    settings = replace(prep.settings(index), seed=zlib.crc32(repr(this_worker()).encode()))
    study = open_study(storage, study_name, prep.space, settings)  # checks the space's fingerprint
    ran = work(study, prep.space, settings, prep.kl_of, max_trials, progress)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return WorkerResult(study_name, ran, complete, requested)


def spawn(storage_url: str, study_name: str, n: int, log_dir: Path,
          timeout: float | None = None, backend: ProfileBackend = ProfileBackend()) -> list[subprocess.Popen]:
    """Start ``n`` ``dynsearch worker`` processes on a study; each logs to ``log_dir``. The URL
    goes through the environment, so no password shows in the process list; so does the Dask
    scheduler's address, when the run profiles on one (the workers use the same backend)."""
    env = {**os.environ, STORAGE_ENV: storage_url}
    argv = [sys.executable, "-m", "dynsearch", "worker", "--study-name", study_name, "--quiet",
            "--joblib-backend", backend.name]
    if backend.name == "dask" and backend.address():
        env[SCHEDULER_ENV] = backend.address()
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    procs = []
    for k in range(n):
        logf = open(log_dir / f"worker-{study_name}-{k + 1}.log", "ab")  # noqa: SIM115 - child owns it
        procs.append(subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
        logf.close()
    return procs


def wait_all(procs: list[subprocess.Popen], log_dir: Path) -> None:
    for p in procs:
        rc = p.wait()
        if rc != 0:
            log.warning("a search worker exited with status %d; see %s/worker-*.log", rc, log_dir)
