"""Profiling on a Dask cluster and several search processes on one study (issue 8, cluster).

The end-to-end test starts a local Dask cluster (an in-process scheduler, 2 worker processes) and
``dynsearch run --search-workers 3 --joblib-backend dask`` (the run and 2 ``dynsearch worker``
processes) on a tiny random model with a journal-file study and a separate cache folder, then
checks where the profiles were computed, that each was written once and reused, and that they
equal the profiles of loky processes and of threads in this process. The other tests check the
option plumbing and the one-line errors (no cluster needed)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from dynsearch.cli import main as cli_main
from dynsearch.errors import ClusterError, StorageError
from dynsearch.objectives.stats.store import TensorStats
from dynsearch.search.cluster import SCHEDULER_ENV, ProfileBackend, check_backend, probe
from dynsearch.search.profile import (
    ProfileCache,
    ProfileJob,
    model_fingerprint,
    profile_tensor,
    profile_tensors,
    quant_error,
    read_tensor_stats,
)
from dynsearch.search.run.storage import OWNER_ATTR, open_storage
from dynsearch.search.run.worker import N_TRIALS_ATTR, RUN_CONFIG_ATTR, RUN_ID_ATTR, wait_for_study

TYPES = ("Q4_0", "Q5_0", "Q8_0")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, demo_model):
    """2 layers, n_embd 64, the demo's tokenizer (so the shipped calibration text runs on it)."""
    from dynsearch.bench.synthetic import Shape, write_synthetic_model

    shape = Shape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=49152)
    return write_synthetic_model(tmp_path_factory.mktemp("model") / "tiny.gguf", shape, seed=1,
                                 tokenizer_from=demo_model)


# ---------------------------------------------------------------------------------------------
# Options and errors


@pytest.mark.parametrize("backend, message", [
    (ProfileBackend("spark"), "expected one of threading, loky, dask"),
    (ProfileBackend("loky", scheduler="tcp://h:8786"), "add --joblib-backend dask"),
    (ProfileBackend("dask"), "needs a scheduler"),
    (ProfileBackend("dask", scheduler="head:87x6"), "not a Dask scheduler address"),
    (ProfileBackend("dask", scheduler="http://head:8786"), "unknown scheme 'http'"),
    (ProfileBackend("dask", scheduler="tcp://head:99999"), "port out of range"),
])
def test_bad_backend_options_are_one_line(backend, message, monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    with pytest.raises(ClusterError, match=message) as e:
        check_backend(backend)
    assert "\n" not in str(e.value)


def test_scheduler_from_the_environment(monkeypatch):
    monkeypatch.setenv(SCHEDULER_ENV, "tcp://head:8786")
    check_backend(ProfileBackend("dask"))
    assert ProfileBackend("dask").address() == "tcp://head:8786"
    assert ProfileBackend("dask", scheduler="tcp://other:1").address() == "tcp://other:1"


def test_missing_distributed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(ClusterError, match=r"pip install 'dynsearch\[cluster\]'"):
        check_backend(ProfileBackend("dask", scheduler="tcp://head:8786"))


def test_unreachable_scheduler_is_one_line_and_quick():
    t0 = time.time()
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler") as e:
        probe(ProfileBackend("dask", scheduler="tcp://127.0.0.1:1", connect_timeout=1))
    assert "\n" not in str(e.value) and time.time() - t0 < 15


def test_cli_refuses_dask_without_a_scheduler_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV, raising=False)
    rc = cli_main(["run", str(tmp_path / "absent.gguf"), "--budget", "1MB", "--joblib-backend", "dask",
                   "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a scheduler" in err and err.count("\n") == 1


def _stats_file(path: Path, stats: dict[str, TensorStats]) -> Path:
    """The statistics .npz in the run's layout (``name|field`` members), written here directly."""
    arrays = {f"{n}|{k}": (v.numpy() if isinstance(v, torch.Tensor) else v)
              for n, st in stats.items() for k, v in vars(st).items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_profile_job_is_small_and_equals_in_memory_profiling(tiny_model, tmp_path):
    from dynsearch.objectives.io.resolve import open_model
    src = open_model(tiny_model)
    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"]
    stats = {}
    for n in names:
        rows, cols = src.shape(n)
        x = rng.standard_normal((64, cols)).astype(np.float32)
        stats[n] = TensorStats(xtx=torch.from_numpy(x.T @ x / 64), fisher_out=rng.random(rows),
                               importance=rng.random(cols).astype(np.float32))
    stats["token_embd.weight"].row_weight = rng.random(src.shape("token_embd.weight")[0])
    path = _stats_file(tmp_path / "stats-k.npz", stats)
    job = ProfileJob(str(tiny_model), model_fingerprint(tiny_model), str(path), str(tmp_path / "p"),
                     "k", TYPES)
    assert len(pickle.dumps((job, names[2]))) < 1024  # what a Dask task carries: no arrays
    for n in names:
        back = read_tensor_stats(path, n)
        assert torch.equal(back.xtx, stats[n].xtx) and np.array_equal(back.importance, stats[n].importance)
        got, want = job(n), profile_tensor(src.load(n), list(TYPES), stats[n])
        assert got[0] == want[0] and np.array_equal(got[1], want[1])
        np.testing.assert_allclose(got[2], want[2], rtol=1e-12)
        origin = job.cache().origin(n, list(TYPES))
        assert origin["pid"] == os.getpid()
    assert read_tensor_stats(path, "no.such.weight") == TensorStats()


def test_damaged_statistics_file_is_one_line(tmp_path):
    bad = _stats_file(tmp_path / "nan.npz", {"w": TensorStats(importance=np.array([1.0, np.nan]))})
    with pytest.raises(ClusterError, match=r"nan.npz: w\|importance is not finite; delete it"):
        read_tensor_stats(bad, "w")
    np.savez(tmp_path / "odd.npz", stray=np.zeros(2))
    with pytest.raises(ClusterError, match=r"odd.npz is damaged \(unexpected member 'stray'\)"):
        read_tensor_stats(tmp_path / "odd.npz", "w")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ClusterError, match="text.npz is damaged"):
        read_tensor_stats(tmp_path / "text.npz", "w")


def test_profile_job_refuses_a_model_it_cannot_see_or_a_different_one(tiny_model, tmp_path):
    from dynsearch.bench.synthetic import Shape, write_synthetic_model
    path = _stats_file(tmp_path / "stats-k.npz", {})
    key = model_fingerprint(tiny_model)
    gone = ProfileJob(str(tmp_path / "elsewhere.gguf"), key, str(path), str(tmp_path / "p"), "k", TYPES)
    with pytest.raises(ClusterError, match="cannot see the model"):
        gone("blk.0.attn_q.weight")
    other = write_synthetic_model(tmp_path / "other.gguf", Shape(n_layer=1, n_embd=64, n_ff=128, n_head=4,
                                                                 n_head_kv=2, n_vocab=100), seed=5)
    wrong = ProfileJob(str(other), key, str(path), str(tmp_path / "p"), "k", TYPES)
    with pytest.raises(ClusterError, match="not the run's"):
        wrong("blk.0.attn_q.weight")
    lost = ProfileJob(str(tiny_model), key, str(tmp_path / "no-stats.npz"), str(tmp_path / "p"), "k", TYPES)
    with pytest.raises(ClusterError, match="cannot read the statistics file"):
        lost("blk.0.attn_q.weight")


# ---------------------------------------------------------------------------------------------
# Profiles are the same bits in every process (the space's fingerprint hashes them)


def _error_cases():
    rng = np.random.default_rng(3)

    def case(rows, cols, *, h=False, fisher=False, rw=False, fcol=False):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        dq = (w + 0.01 * rng.standard_normal((rows, cols))).astype(np.float32)
        x = rng.standard_normal((32, cols)).astype(np.float32)
        st = TensorStats(xtx=torch.from_numpy(x.T @ x / 32) if h else None,
                         fisher_out=rng.random(rows) if fisher else None,
                         row_weight=rng.random(rows) if rw else None,
                         fisher_col=rng.random(cols) if fcol else None)
        return w, dq, st

    return {"X^T X + Fisher, many rows": case(40_001, 64, h=True, fisher=True),
            "X^T X, one long row": case(1, 4096, h=True),
            "row weights + column Fisher": case(40_000, 96, rw=True, fcol=True),
            "both, odd shape": case(1_003, 72, h=True, fisher=True, rw=True),
            "weight MSE, few long rows": case(3, 200_000),
            "no rows": case(0, 64, h=True, fisher=True)}


def _reference_error(w, dq, st) -> float:
    """quant_error in float64 numpy, written out from the formula (module docstring of profile)."""
    d = (dq.astype(np.float64) - w.astype(np.float64))
    if st.xtx is None and st.row_weight is None:
        return float((d ** 2).mean()) if d.size else 0.0
    total = 0.0
    if st.xtx is not None:
        per_row = ((d @ st.xtx.numpy().astype(np.float64)) * d).sum(axis=1)
        total += 0.5 * float(np.sum(per_row * (1 if st.fisher_out is None else st.fisher_out)))
    if st.row_weight is not None:
        colw = np.ones(d.shape[1]) if st.fisher_col is None else st.fisher_col
        total += 0.5 * float(st.row_weight @ ((d ** 2) @ colw))
    return total


def test_quant_error_is_the_same_bits_whatever_the_thread_count():
    """Processes on a cluster profile with different thread counts; a whole-tensor reduction
    split differently would change the last bits and the study would refuse the space."""
    cases = _error_cases()
    before = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            got[n] = {k: quant_error(*c) for k, c in cases.items()}
    finally:
        torch.set_num_threads(before)
    for k, c in cases.items():
        bits = {n: np.float64(got[n][k]).tobytes() for n in got}
        assert len(set(bits.values())) == 1, (k, {n: got[n][k] for n in got})
        assert got[1][k] == pytest.approx(_reference_error(*c), rel=1e-5, abs=1e-300), k
    assert got[1]["no rows"] == 0.0


def test_quant_error_does_not_depend_on_the_chunking(monkeypatch):
    from dynsearch.search import profile

    rng = np.random.default_rng(4)
    w = rng.standard_normal((1_003, 72)).astype(np.float32)
    dq = (w + 0.01 * rng.standard_normal(w.shape)).astype(np.float32)
    x = rng.standard_normal((32, 72)).astype(np.float32)
    st = TensorStats(xtx=torch.from_numpy(x.T @ x), fisher_out=rng.random(1_003),
                     row_weight=rng.random(1_003), fisher_col=rng.random(72))
    whole = quant_error(w, dq, st)
    monkeypatch.setattr(profile, "ERROR_CHUNK_BYTES", 8 * 72 * 10)  # chunks of 10 rows
    assert quant_error(w, dq, st) == whole  # exactly: per-row terms, one exactly rounded sum


# ---------------------------------------------------------------------------------------------
# Workers started before the run: --wait-for-study


def _journal(tmp_path: Path) -> tuple[str, optuna.storages.BaseStorage]:
    url = f"journal://{tmp_path / 'study.log'}"
    return url, open_storage(url)


def _create_later(storage, name: str, delay: float, attrs: dict) -> threading.Thread:
    def make():
        time.sleep(delay)
        study = optuna.create_study(storage=storage, study_name=name)
        for k, v in attrs.items():  # in open_budget_study's order: n_trials (or run_id) last
            study.set_user_attr(k, v)

    t = threading.Thread(target=make)
    t.start()
    return t


def test_wait_for_study_times_out_with_one_line(tmp_path):
    url, storage = _journal(tmp_path)
    said = []
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"waited 0.3 s for `dynsearch run` to create study 'c' "
                                           r"in journal://.*no study 'c'") as e:
        wait_for_study(storage, "c", 0.3, url, said.append, poll=0.05)
    assert "\n" not in str(e.value) and 0.3 <= time.monotonic() - t0 < 5
    assert len(said) == 1 and "waiting up to 0.3 s" in said[0]
    with pytest.raises(StorageError, match=r"no study 'c'.*give the worker --wait-for-study SECONDS"):
        wait_for_study(storage, "c", 0, url, said.append)  # no wait: one look, no message
    assert len(said) == 1


def test_wait_for_study_returns_once_the_run_stored_its_configuration(tmp_path):
    url, storage = _journal(tmp_path)
    # the study appears first without, then with the attributes a worker needs
    maker = _create_later(storage, "c", 0.2, {RUN_CONFIG_ATTR: "{}", "other": 1})
    with pytest.raises(StorageError, match="has no stored run configuration"):
        wait_for_study(storage, "c", 0.6, url, poll=0.05)
    maker.join()
    optuna.load_study(study_name="c", storage=storage).set_user_attr(N_TRIALS_ATTR, 5)
    study = wait_for_study(storage, "c", 5, url, poll=0.05)
    assert study.user_attrs[N_TRIALS_ATTR] == 5
    maker = _create_later(storage, "d", 0.3, {RUN_CONFIG_ATTR: "{}", N_TRIALS_ATTR: 3})
    t0 = time.monotonic()
    assert wait_for_study(storage, "d", 20, url, poll=0.05).user_attrs[N_TRIALS_ATTR] == 3
    assert time.monotonic() - t0 < 10
    maker.join()


def test_helpers_of_a_run_wait_for_that_run_not_an_earlier_one(tmp_path):
    """A study left by an earlier run holds its older configuration and trial count: the helpers
    a run starts wait until this run has opened it (its run id, set last)."""
    url, storage = _journal(tmp_path)
    old = optuna.create_study(storage=storage, study_name="c")
    for k, v in {RUN_CONFIG_ATTR: "{}", N_TRIALS_ATTR: 4, RUN_ID_ATTR: "earlier"}.items():
        old.set_user_attr(k, v)
    assert wait_for_study(storage, "c", 0, url).user_attrs[RUN_ID_ATTR] == "earlier"  # a plain worker
    with pytest.raises(StorageError, match="not been opened by run now yet"):
        wait_for_study(storage, "c", 0.2, url, poll=0.05, run_id="now")
    timer = threading.Timer(0.3, lambda: old.set_user_attr(RUN_ID_ATTR, "now"))
    timer.start()
    assert wait_for_study(storage, "c", 20, url, poll=0.05, run_id="now").user_attrs[RUN_ID_ATTR] == "now"
    timer.join()


def test_worker_cli_waits_then_fails_with_one_line(tmp_path, capsys):
    url, _ = _journal(tmp_path)
    rc = cli_main(["worker", "--storage", url, "--study-name", "c", "--wait-for-study", "0.5", "--quiet"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 2
    assert err[0].startswith("worker: waiting up to 0.5 s for `dynsearch run` to create study 'c'")
    assert err[1].startswith("dynsearch: error: waited 0.5 s")
    with pytest.raises(SystemExit):
        cli_main(["worker", "--storage", url, "--study-name", "c", "--wait-for-study", "-1"])
    assert "expected a number of seconds >= 0" in capsys.readouterr().err


def test_a_failed_run_stops_the_helpers_it_started(tiny_model, tmp_path, monkeypatch):
    """``run --search-workers 3`` starts its helpers before preparing; should preparing fail (here:
    a budget below the smallest reachable size), they are ended, not left waiting."""
    from dynsearch.errors import DynsearchError
    from dynsearch.search.run import pipeline, worker
    from dynsearch.search.run.config import RunConfig
    from dynsearch.search.run.prepare import RunModel

    started = []
    spawn = worker.spawn
    monkeypatch.setattr(worker, "spawn", lambda *a, **k: started.extend(spawn(*a, **k)) or started)
    cfg = RunConfig.parse(str(tiny_model), ["0.5bpw"], TYPES, search_workers=3,
                          storage=f"journal://{tmp_path / 'study.log'}", out=str(tmp_path / "runs"))
    with pytest.raises(DynsearchError):
        pipeline.run(cfg, RunModel.open(cfg.model), progress=False)
    assert len(started) == 2 and all(p.poll() is not None for p in started)


# ---------------------------------------------------------------------------------------------
# A local Dask cluster, the run and two workers on one study


@pytest.fixture(scope="module")
def dask_cluster():
    distributed = pytest.importorskip("distributed")  # in the dev extra: CI has it
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield cluster, set(client.run(os.getpid).values())
    finally:
        client.close()
        cluster.close()


@pytest.mark.slow  # one to two minutes on 2 busy cores: a cluster, three search processes
def test_run_and_two_workers_profile_on_dask(tiny_model, dask_cluster, tmp_path):
    cluster, dask_pids = dask_cluster
    assert len(dask_pids) == 2
    # trials of about a second (2048 search tokens over a 49152-token vocabulary) and enough of
    # them that the two helpers -- started with the run, waiting for its study -- take a share
    n_trials, cache, log = 30, tmp_path / "cache", tmp_path / "study.log"
    argv = [sys.executable, "-m", "dynsearch", "run", str(tiny_model), "--budget", "4.8bpw",
            "--types", ",".join(TYPES), "--calib-tokens", "1024", "--fisher-tokens", "512",
            "--search-tokens", "2048", "--eval-tokens", "512", "--trials", str(n_trials),
            "--storage", f"journal://{log}", "--study-name", "c", "--cache", str(cache),
            "--out", str(tmp_path / "runs"), "--search-workers", "3", "--joblib-backend", "dask",
            "--dask-scheduler", cluster.scheduler_address, "--no-gguf", "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    run_s = time.monotonic() - t0
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    worker_logs = sorted((tmp_path / "runs" / "tiny").glob("worker-c-*.log"))
    assert len(worker_logs) == 2
    for p in worker_logs:
        assert "worker: ran" in p.read_text(), p.read_text()[-2000:]

    # the study: the requested trials finished (the bound is n + workers - 1), none left running
    trials = optuna.load_study(study_name="c", storage=open_storage(f"journal://{log}")).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert n_trials <= len(finished) <= n_trials + 2
    assert all(t.state != TrialState.RUNNING for t in trials)
    # the work was shared: the helpers started with the run and waited for its study, so at
    # least one of them (on an idle machine both) scored trials beside the run
    scorers = {t.system_attrs[OWNER_ATTR]["pid"] for t in finished}
    assert 2 <= len(scorers) <= 3, f"trials scored by {len(scorers)} process(es) only"
    assert scorers - {proc.pid}, "only the run scored trials"
    study_start = min(t.datetime_start.timestamp() for t in trials)

    # the profiles: one entry per searched tensor, every one computed on a Dask worker (never by
    # the run or a search worker), before the study existed, and not rewritten after (reused)
    entries = sorted((cache / "profile").rglob("*.npz"))
    origins = []
    for e in entries:
        with np.load(e) as z:
            origins.append(json.loads(str(z["origin"])))
    from dynsearch.objectives.io.resolve import open_model

    searched = [n for n in open_model(tiny_model).names() if len(open_model(tiny_model).shape(n)) == 2]
    assert len(entries) == len(searched) == 15
    assert {o["pid"] for o in origins} <= dask_pids and not {o["pid"] for o in origins} & scorers
    assert all(e.stat().st_mtime < study_start for e in entries)

    # the same profiles from loky processes and from threads here, on the run's statistics
    (stats_path,) = cache.glob("stats-*.npz")
    stats_key = stats_path.stem.split("-", 1)[1]
    key = model_fingerprint(tiny_model)
    dask_cache = ProfileCache(cache / "profile", key, stats_key)
    dask_rows = [dask_cache.get(n, list(TYPES)) for n in searched]
    assert all(r is not None for r in dask_rows), "the run's cache keys are the ones computed here"
    for backend in (ProfileBackend("loky", n_jobs=2), ProfileBackend("threading", n_jobs=2)):
        folder = tmp_path / f"profile-{backend.name}"
        job = ProfileJob(str(tiny_model), key, str(stats_path), str(folder), stats_key, TYPES)
        rows = profile_tensors(searched, list(TYPES), job.cache(), job, job, backend)
        for n, a, b in zip(searched, dask_rows, rows):
            assert a[0] == b[0] and np.array_equal(a[1], b[1]), n
            np.testing.assert_allclose(a[2], b[2], rtol=1e-12, err_msg=n)  # see quant_error
        pids = {job.cache().origin(n, list(TYPES))["pid"] for n in searched}
        assert (os.getpid() in pids) == (backend.name == "threading")
    print(f"\n{len(entries)} profiles on Dask workers {sorted({o['pid'] for o in origins})}; "
          f"{len(finished)} trials finished by {len(scorers)} of 3 processes "
          f"({sorted(Counter(t.system_attrs[OWNER_ATTR]['pid'] for t in finished).values())}); "
          f"the run took {run_s:.0f} s")
