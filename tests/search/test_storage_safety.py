"""A storage URL never creates, truncates or "repairs" a file that is not what its scheme says
(issue: `status --storage journal:///study.db` emptied a valid SQLite study)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from dynsearch.errors import StorageError
from dynsearch.search.run.storage import open_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def sqlite_study(tmp_path) -> Path:
    db = tmp_path / "study.db"
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    del study
    return db


@pytest.fixture
def journal_study(tmp_path) -> Path:
    log = tmp_path / "study.log"
    study = optuna.create_study(study_name="s", storage=open_storage(f"journal://{log}"))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return log


def test_a_journal_url_on_an_sqlite_study_is_refused_and_leaves_it(sqlite_study):
    before = _digest(sqlite_study)
    with pytest.raises(StorageError, match="SQLite database, not a journal"):
        open_storage(f"journal://{sqlite_study}")
    assert _digest(sqlite_study) == before
    assert not list(sqlite_study.parent.glob("*.damaged-*"))


@pytest.mark.parametrize("scheme", ["journal://", "sqlite:///"])
@pytest.mark.parametrize("content", [b"# README\n\nSome text a user wrote.\n", b"x",
                                     bytes(range(256)) * 64])
def test_any_other_file_is_refused_and_left_as_it_was(tmp_path, scheme, content):
    f = tmp_path / "README.md"
    f.write_bytes(content)
    with pytest.raises(StorageError, match="refusing to touch it"):
        open_storage(f"{scheme}{f}")
    assert f.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


@pytest.mark.parametrize("scheme", ["journal://", "sqlite:///"])
def test_read_only_open_of_a_missing_storage_creates_nothing(tmp_path, scheme):
    target = tmp_path / "no" / "such" / "study.db"
    with pytest.raises(StorageError, match="no such file"):
        open_storage(f"{scheme}{target}", create=False)
    assert list(tmp_path.iterdir()) == []


def test_read_only_open_of_valid_storages(sqlite_study, journal_study):
    for url, path in ((f"sqlite:///{sqlite_study}", sqlite_study), (f"journal://{journal_study}", journal_study)):
        before = _digest(path)
        study = optuna.load_study(study_name="s", storage=open_storage(url, create=False))
        assert len(study.trials) == 2
        assert _digest(path) == before


def test_a_cut_journal_is_repaired_by_a_writer_and_refused_by_a_reader(journal_study):
    whole = journal_study.read_bytes()
    with open(journal_study, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_')  # a crash mid-record
    cut = journal_study.read_bytes()
    with pytest.raises(StorageError, match="cut off by a crash"):
        open_storage(f"journal://{journal_study}", create=False)
    assert journal_study.read_bytes() == cut  # a reader repairs nothing
    open_storage(f"journal://{journal_study}")
    assert journal_study.read_bytes() == whole
    kept = list(journal_study.parent.glob("study.log.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == cut[len(whole):]


def test_status_on_an_sqlite_study_named_as_a_journal_is_one_line(sqlite_study):
    before = _digest(sqlite_study)
    r = subprocess.run([sys.executable, "-m", "dynsearch", "status", "--storage", f"journal://{sqlite_study}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynsearch: error:") and "not a journal" in lines[0]
    assert _digest(sqlite_study) == before


@pytest.mark.parametrize("command", ["status", "plot"])
@pytest.mark.parametrize("scheme", ["sqlite:///", "journal://"])
def test_read_only_commands_create_no_storage(tmp_path, command, scheme):
    target = tmp_path / "new" / "study.db"
    argv = [sys.executable, "-m", "dynsearch", command, "--storage", f"{scheme}{target}"]
    if command == "plot":
        argv += ["-o", str(tmp_path / "plots")]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynsearch: error:") and "no such file" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
