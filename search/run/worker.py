"""More processes (or machines) on one study: ``dynsearch worker`` and ``run --search-workers``.

A study made by ``dynsearch run`` stores the run's configuration (:data:`RUN_CONFIG_ATTR`);
a worker reads it back, prepares the same search space from the shared cache (statistics and
profiles are cache hits, so this is quick; the space's fingerprint must match the study's) and
runs trials until the study holds its requested number. Stale trials of dead workers are failed
and re-queued once before each trial (see :mod:`.storage`).

A worker may start before the run (``--wait-for-study SECONDS``: a Slurm array or a Kubernetes
Job launched with the run): it polls the storage until the run has created the study and stored
its configuration, which the run does only once statistics and profiles are in the cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState

from dynsearch.errors import StorageError
from dynsearch.search.cluster import SCHEDULER_ENV, ProfileBackend
from dynsearch.search.run.config import RunConfig, check
from dynsearch.search.run.prepare import Prepared, RunModel, prepare
from dynsearch.search.run.storage import (
    OWNER_ATTR,
    load_study,
    open_storage,
    redact,
    sweep_stale,
    this_worker,
)
from dynsearch.search.space import SearchSpace
from dynsearch.search.study import SearchSettings, open_study, run_study

log = logging.getLogger(__name__)

STORAGE_ENV = "DYNSEARCH_STORAGE"  # storage URL for spawned workers (kept out of argv and ps)
WAIT_POLL_S = 2.0  # seconds between two looks at the storage while waiting for the study
RUN_ID_ENV = "DYNSEARCH_RUN_ID"  # helpers of `run --search-workers` wait for this run's study
RUN_ID_ATTR = "run_id"  # study user attr: the run that last opened it (set after its other attrs)
RUN_CONFIG_ATTR = "run_config"  # study user attr: the RunConfig (JSON) a worker rebuilds from
BUDGET_INDEX_ATTR = "budget_index"  # study user attr: which of the config's budgets it searches
N_TRIALS_ATTR = "n_trials"  # study user attr: the trial count last requested (all workers)


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


def wait_for_study(storage, study_name: str, seconds: float, url: str,
                   say: Callable[[str], None] = log.info, poll: float = WAIT_POLL_S,
                   run_id: str | None = None) -> optuna.Study:
    """The study ``study_name`` once ``dynsearch run`` has created it and stored what a worker
    needs (its configuration and trial count), polling ``storage`` every ``poll`` seconds for at
    most ``seconds``; a :class:`StorageError` line at the timeout. ``seconds == 0`` looks once.
    With ``run_id`` (the helpers a run starts), only that run's opening of the study counts: a
    study left by an earlier run holds an older configuration and trial count."""
    deadline = time.monotonic() + seconds
    said = False
    while True:
        try:
            study = load_study(storage, study_name)
            attrs = study.user_attrs
            if run_id is not None:
                if attrs.get(RUN_ID_ATTR) == run_id:
                    return study
                missing = f"study {study_name!r} has not been opened by run {run_id} yet"
            elif seconds <= 0 or {RUN_CONFIG_ATTR, N_TRIALS_ATTR} <= attrs.keys():
                return study
            else:
                missing = (f"study {study_name!r} has no stored run configuration (it was not "
                           "made by `dynsearch run`, or the run is still storing it)")
        except StorageError as e:
            missing = str(e)
        left = deadline - time.monotonic()
        if left <= 0:
            if seconds <= 0:
                raise StorageError(f"{missing}; start `dynsearch run` first, or give the worker "
                                   "--wait-for-study SECONDS")
            raise StorageError(f"waited {seconds:g} s for `dynsearch run` to create study "
                               f"{study_name!r} in {redact(url)}: {missing}")
        if not said:
            say(f"worker: waiting up to {seconds:g} s for `dynsearch run` to create study "
                f"{study_name!r} in {redact(url)} (it does once statistics and profiles are cached)")
            said = True
        time.sleep(min(poll, left))


def open_budget_study(prep: Prepared, storage, i: int) -> optuna.Study:
    """Create or resume the study of budget ``i`` in ``storage`` and store what a worker needs to
    join it (the run configuration, which budget, the trial count requested)."""
    study = open_study(storage, prep.study_name(i), prep.space, prep.settings(i))
    study.set_user_attr(RUN_CONFIG_ATTR, prep.cfg.to_json())
    study.set_user_attr(BUDGET_INDEX_ATTR, i)
    study.set_user_attr(N_TRIALS_ATTR, int(prep.cfg.trials))
    return study


def join(storage_url: str, study_name: str, max_trials: int | None = None,
         timeout: float | None = None, progress: bool = True, local: Local = Local(),
         wait_for: float = 0.0, say: Callable[[str], None] = log.info,
         run_id: str | None = None) -> WorkerResult:
    """``dynsearch worker``: join the study ``study_name`` made by ``dynsearch run``, waiting up
    to ``wait_for`` seconds for the run to create it (``--wait-for-study``; ``run_id``: for that
    run's opening of it, see :func:`wait_for_study`)."""
    storage = open_storage(storage_url)
    stored = wait_for_study(storage, study_name, wait_for, storage_url, say, run_id=run_id)
    text = stored.user_attrs.get(RUN_CONFIG_ATTR)
    if text is None:
        raise StorageError(f"study {study_name!r} in {redact(storage_url)} was not made by "
                           "`dynsearch run` (no stored run configuration); start it with run first")
    overrides = {"storage": storage_url, "timeout": timeout, "joblib_backend": local.joblib_backend,
                 "dask_scheduler": local.dask_scheduler}
    if local.cache:
        overrides["cache"] = str(Path(local.cache).expanduser().resolve())
    cfg = check(RunConfig.from_json(text, **overrides))
    index = int(stored.user_attrs.get(BUDGET_INDEX_ATTR, 0))
    requested = int(stored.user_attrs.get(N_TRIALS_ATTR, cfg.trials))
    cfg = replace(cfg, trials=requested)
    finished = stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(finished) >= requested:  # nothing left: leave without loading the model
        sweep_stale(stored)
        complete = sum(t.state == TrialState.COMPLETE for t in finished)
        return WorkerResult(study_name, 0, complete, requested)
    prep = prepare(cfg, RunModel.open(cfg.model), progress)
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
          timeout: float | None = None, backend: ProfileBackend = ProfileBackend(),
          wait_for: float = 0.0, run_id: str | None = None) -> list[subprocess.Popen]:
    """Start ``n`` ``dynsearch worker`` processes on a study; each logs to ``log_dir``. The URL
    goes through the environment, so no password shows in the process list; so does the Dask
    scheduler's address, when the run profiles on one (the workers use the same backend).
    ``wait_for``: the workers may start before the study exists (``--wait-for-study``), and with
    ``run_id`` they wait for that run to open it (through the environment too)."""
    env = {**os.environ, STORAGE_ENV: storage_url}
    argv = [sys.executable, "-m", "dynsearch", "worker", "--study-name", study_name, "--quiet",
            "--joblib-backend", backend.name]
    if backend.name == "dask" and backend.address():
        env[SCHEDULER_ENV] = backend.address()
    if timeout is not None:
        argv += ["--timeout", str(timeout)]
    if wait_for > 0:
        argv += ["--wait-for-study", str(wait_for)]
    if run_id is not None:
        env[RUN_ID_ENV] = run_id
    procs = []
    for k in range(n):
        logf = open(log_dir / f"worker-{study_name}-{k + 1}.log", "ab")  # noqa: SIM115 - child owns it
        procs.append(subprocess.Popen(argv, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
        logf.close()
    return procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    """End workers the run started (the run failed before it created their study)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_all(procs: list[subprocess.Popen], log_dir: Path) -> None:
    for p in procs:
        rc = p.wait()
        if rc != 0:
            log.warning("a search worker exited with status %d; see %s/worker-*.log", rc, log_dir)
