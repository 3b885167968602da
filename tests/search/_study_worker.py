"""A worker process for tests/search/test_workers.py, and the tiny search it works on.

``python tests/_study_worker.py --take-queued URL STUDY START`` only takes queued trials (racing
other processes from the time START on) and prints their ids.

``python tests/_study_worker.py URL STUDY N_TRIALS SLEEP`` joins the study through
:func:`dynsearch.search.run.worker.work` exactly as ``dynsearch worker`` does, over a synthetic search
space whose "true KL" is cheap and deterministic; each evaluation sleeps ``SLEEP`` seconds, with
the file ``$STUDY_WORKER_MARKERS/<pid>.scoring`` present meanwhile, so a test can kill the process
in the middle of a trial.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from dynsearch.search.space import SearchSpace, layer_groups
from dynsearch.search.study import SearchSettings

TYPES = ("Q3_K", "Q4_K", "Q6_K", "Q8_0")
BITS = np.array([3.44, 4.5, 6.56, 8.5])


def tiny_space(n_layer: int = 4) -> SearchSpace:
    rng = np.random.default_rng(7)
    names = ["token_embd.weight"] + [f"blk.{i}.{k}.weight" for i in range(n_layer)
                                     for k in ("attn_q", "attn_v", "ffn_down")]
    n_w = rng.integers(20_000, 80_000, len(names))
    sizes = (n_w[:, None] * BITS[None, :] / 8).astype(np.int64)
    errors = n_w[:, None] * 4.0 ** (-BITS[None, :]) * rng.uniform(0.5, 2, (len(names), 1))
    groups, gnames = layer_groups(names, n_layer, 2)
    return SearchSpace(tuple(names), TYPES, tuple((TYPES,) * len(names)), sizes, errors, groups,
                       tuple(gnames), int(n_w.sum()))


def true_kl(space: SearchSpace, choice: np.ndarray) -> float:
    """The 'true KL' of the tiny search: the proxy with ffn_down weighted 3x."""
    weight = np.array([3.0 if ".ffn_down" in n else 1.0 for n in space.names])
    return float((space.errors[np.arange(len(choice)), choice] * weight).sum())


def settings(space: SearchSpace, n_trials: int, seed: int = 0) -> SearchSettings:
    budget = (space.min_size() + space.max_size()) // 2
    return SearchSettings(budget=budget, n_trials=n_trials, seed=seed, proxy_slack=100.0)


def main(url: str, study_name: str, n_trials: int, sleep: float) -> None:
    import optuna

    from dynsearch.search.run.storage import StorageSettings, open_storage
    from dynsearch.search.run.worker import work
    from dynsearch.search.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = tiny_space()
    storage = open_storage(url, StorageSettings(heartbeat_interval=1, grace_period=600))
    s = settings(space, n_trials, seed=os.getpid())  # each worker its own sampler stream
    study = open_study(storage, study_name, space, s)

    marker = Path(os.environ.get("STUDY_WORKER_MARKERS", ".")) / f"{os.getpid()}.scoring"

    def evaluate(choice):  # the marker tells the test, without a query, that we are mid-trial
        marker.touch()
        time.sleep(sleep)
        marker.unlink()
        return true_kl(space, choice)

    work(study, space, s, evaluate, progress=False)


def take_queued(url: str, study_name: str, start_at: float) -> None:
    """From ``start_at`` on, take queued trials as fast as possible; print their ids."""
    import optuna

    from dynsearch.search.run.storage import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(url))
    while time.time() < start_at:
        pass
    taken = []
    while (tid := study._pop_waiting_trial_id()) is not None:  # what Study.ask does first
        taken.append(tid)
    print(" ".join(map(str, taken)))


if __name__ == "__main__":
    if sys.argv[1] == "--take-queued":
        take_queued(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
