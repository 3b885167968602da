"""`dynsearch run` killed with -9 during its search and run again; `run --search-workers 2`
(a `dynsearch worker` joining from the stored configuration); the same recipe twice; `status`.
On the demo model with few tokens and three candidate types; one shared output folder, so the
statistics and profiles computed by the first test are cache hits for the others."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from dynsearch.cli import main as cli_main
from dynsearch.recipes import schema
from dynsearch.search.run.storage import OWNER_ATTR, open_storage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("demo_model")]

optuna.logging.set_verbosity(optuna.logging.WARNING)

ARGS = ["run", "smollm2-135m", "--budget", "100MB", "--types", "Q4_K,Q6_K,Q8_0",
        "--calib-tokens", "1024", "--fisher-tokens", "512", "--search-tokens", "512",
        "--eval-tokens", "512", "--quiet", "--no-gguf"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


def _db(out):
    return next(out.rglob("study.db"), None)


def _trials(out, name):
    db = _db(out)
    if db is None:
        return []
    try:
        return optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{db}")).get_trials()
    except Exception:  # noqa: BLE001 - not created yet
        return []


def test_kill_and_resume_reuses_finished_trials(out):
    argv = [*ARGS, "--trials", "5", "--study-name", "kr", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "dynsearch", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 1800  # statistics and profiling come first
        while proc.poll() is None and time.time() < deadline:
            trials = _trials(out, "kr")
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and any(
                    t.state == TrialState.RUNNING and "choice" in t.user_attrs for t in trials):
                proc.send_signal(signal.SIGKILL)  # in the middle of scoring a trial
                break
            time.sleep(0.2)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    before = _trials(out, "kr")
    done = {t.number: (t.value, t.datetime_complete) for t in before if t.state == TrialState.COMPLETE}
    (killed,) = [t.number for t in before if t.state == TrialState.RUNNING]
    stats = {p: p.stat().st_mtime_ns for p in out.rglob("stats-*.npz")}
    profiles = {p: p.stat().st_mtime_ns for p in out.rglob("profile/**/*") if p.is_file()}
    assert stats and profiles

    t0 = time.time()
    assert cli_main(argv) == 0  # the same command again
    resumed_s = time.time() - t0
    after = _trials(out, "kr")
    for n, (value, completed) in done.items():  # finished trials reused, not recomputed
        assert (after[n].value, after[n].datetime_complete) == (value, completed)
    assert after[killed].state == TrialState.FAIL
    retry = [t for t in after if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after) == 5
    assert all(t.state != TrialState.RUNNING for t in after)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stats-*.npz")} == stats  # cache hits
    assert {p: p.stat().st_mtime_ns for p in out.rglob("profile/**/*") if p.is_file()} == profiles
    (recipe,) = out.rglob("*.yaml")
    assert schema.load(recipe).search["study"] == "kr"
    print(f"\nkilled after {len(done)} finished trials; the rerun took {resumed_s:.0f} s for "
          f"{5 - len(done)} more (trial {killed} failed and retried as {retry[0].number})")


def test_search_workers_share_a_study_and_status_shows_it(out, capsys):
    argv = [*ARGS, "--trials", "6", "--study-name", "sw", "--search-workers", "2", "--out", str(out)]
    assert cli_main(argv) == 0
    trials = _trials(out, "sw")
    owners = {t.system_attrs[OWNER_ATTR]["pid"] for t in trials if t.state == TrialState.COMPLETE}
    assert len(owners) == 2, "both processes scored trials"
    assert 6 <= sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) <= 7
    (log,) = out.rglob("worker-sw-1.log")
    assert "ran" in log.read_text()
    url = f"sqlite:///{_db(out)}"
    capsys.readouterr()
    assert cli_main(["status", "--storage", url]) == 0
    table = capsys.readouterr().out
    assert "kr " in table and "sw " in table and "100MB" in table
    # a late worker finds the requested count reached and leaves
    assert cli_main(["worker", "--storage", url, "--study-name", "sw", "--quiet"]) == 0
    assert "ran 0 trials" in capsys.readouterr().out


def test_same_inputs_and_seed_give_the_same_recipe_twice(out):
    tensors = []
    for name in ("det-a", "det-b"):
        assert cli_main([*ARGS, "--trials", "2", "--study-name", name, "--out", str(out)]) == 0
        (recipe,) = [p for p in out.rglob("*.yaml") if schema.load(p).search["study"] == name]
        tensors.append(schema.load(recipe).tensors)
    assert tensors[0] == tensors[1]
    a, b = _trials(out, "det-a"), _trials(out, "det-b")
    assert [t.user_attrs.get("choice") for t in a] == [t.user_attrs.get("choice") for t in b]
