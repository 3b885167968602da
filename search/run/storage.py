"""Where studies live: a user's ``--storage`` turned into an Optuna storage many workers share.

* ``sqlite:///path/study.db`` -- one machine, a few processes;
* ``postgresql://user:pass@host/db`` (or any SQLAlchemy URL Optuna supports) -- many machines;
* ``journal:///path/study.log``, or a path ending in ``.log`` / ``.jsonl`` -- Optuna's journal file
  on a shared disk (no database server; works on NFS).

Every storage gets a heartbeat: each running trial's worker records one every
``heartbeat_interval`` seconds from a background thread (the kernels and torch release the GIL, so
it keeps beating through long steps), and a trial whose last beat is older than ``grace_period`` is
declared stale. Stale trials are failed and re-queued once (Optuna's retry callback) by the next
worker that asks for a trial. A trial whose worker ran on this machine and is gone (its process no
longer exists) is stale at once, so re-running a killed ``dynsearch run`` resumes immediately.
Optuna's RDB storage has the heartbeat built in; for the journal it is added here, with the
beat stored as a trial system attribute (wall clocks of the machines sharing the disk must agree to
well within the grace period).

A journal whose last line was cut off by a crash mid-write is repaired on open (the partial tail
is moved to a side file); Optuna alone would skip it, then glue the next record onto it and refuse
the file from then on.

Credentials in URLs are never printed: every message goes through :func:`redact`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from dynsearch.errors import StorageError

log = logging.getLogger(__name__)

OWNER_ATTR = "dynsearch:owner"  # trial system attr: the worker running it (host, boot, pid, start)
BEAT_ATTR = "dynsearch:heartbeat"  # trial system attr (journal only): time of the last beat
# trial system attr: the trial id the owner tag (and beat) above were written for. Optuna's retry
# copies a failed trial's system attrs into the retry: the dead worker's tag and old beat, which a
# sweep must not read as the retry's own before its new worker has re-tagged it.
TAGGED_ATTR = "dynsearch:tagged"

try:  # Optuna >= 4.9 renamed the callback and the RDBStorage argument
    from optuna.storages import RetryHeartbeatStaleTrialCallback as _Retry
    _RDB_CALLBACK_ARG = "heartbeat_stale_trial_callback"
except ImportError:  # pragma: no cover - older Optuna
    from optuna.storages import RetryFailedTrialCallback as _Retry
    _RDB_CALLBACK_ARG = "failed_trial_callback"


@dataclass(frozen=True)
class StorageSettings:
    heartbeat_interval: float = 30  # seconds between a running trial's beats (whole for RDB)
    grace_period: float = 600  # seconds without a beat before a trial is stale; far above any
    # pause of a worker (beats come from a thread, so a long kernel or forward does not count)
    max_retry: int = 1  # times a stale trial is re-queued


_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/@:\s]*):(?P<pw>[^@/\s]*)@")
_QUERY_SECRET = re.compile(r"(?P<key>(?:password|passwd|pwd|secret|token)=)[^&\s]*", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with any password (``user:pass@`` or ``?password=``) replaced by ``***``."""
    url = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:***@", str(url))
    return _QUERY_SECRET.sub(lambda m: f"{m.group('key')}***", url)


def journal_path(url: str) -> Path | None:
    """The journal file a storage URL names, or None for a database URL."""
    if url.startswith("journal://"):
        path = url[len("journal://"):]
        if not path:
            raise StorageError(f"storage {redact(url)!r}: journal:// needs a file path, "
                               "e.g. journal:///shared/study.log")
        return Path(path).expanduser()
    if "://" not in url and url.endswith((".log", ".jsonl")):
        return Path(url).expanduser()
    return None


def open_storage(url: str, settings: StorageSettings = StorageSettings(), *,
                 create: bool = True) -> optuna.storages.BaseStorage:
    """The Optuna storage for ``url``, with heartbeat, stale-trial sweep and one retry.

    A file the URL names is recognised by its content before anything is written: a journal must
    hold journal records, an SQLite URL an SQLite database; any other existing file is refused.
    With ``create=False`` (the read-only commands: status, plot, ``run --estimate``) a missing
    storage is an error and nothing is created or repaired."""
    if not url or not isinstance(url, str):
        raise StorageError("an empty storage URL: use sqlite:///study.db, postgresql://..., "
                           "or journal:///path/study.log")
    with warnings.catch_warnings():  # heartbeat and retry are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _open(url, settings, create)


SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _sqlite_path(url: str) -> Path | None:
    """The database file of an ``sqlite:///`` URL, or None (in memory, or another scheme)."""
    if not url.startswith("sqlite"):
        return None
    db = url.split(":///", 1)[-1].split("?", 1)[0] if ":///" in url else ""
    return Path(db).expanduser() if db and db != ":memory:" else None


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise StorageError(f"storage {path}: cannot read it ({e.strerror or type(e).__name__})") from None


def _check_existing(path: Path, kind: str, create: bool) -> None:
    """Refuse, before anything is written, a storage file that is not what its URL says; with
    ``create=False`` also a missing one."""
    if not path.exists():
        if not create:
            raise StorageError(f"storage {path}: no such file (nothing has been stored there yet)")
        return
    if not path.is_file():
        raise StorageError(f"storage {path}: not a regular file")
    if path.stat().st_size == 0:
        if not create:
            raise StorageError(f"storage {path}: an empty file, not a study {kind}")
        return
    head = _head(path, 1 << 16)
    if kind == "database":
        if not head.startswith(SQLITE_MAGIC):
            raise StorageError(f"storage {path}: not an SQLite database; refusing to touch it "
                               "(name a new file, or journal:// for an Optuna journal)")
        return
    if head.startswith(SQLITE_MAGIC):
        raise StorageError(f"storage {path}: an SQLite database, not a journal; "
                           f"use sqlite:///{path}")
    line = head.split(b"\n", 1)[0]
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise StorageError(f"storage {path}: not an Optuna journal (its first line is not a "
                           "journal record); refusing to touch it")


def _open(url: str, settings: StorageSettings, create: bool) -> optuna.storages.BaseStorage:
    retry = _Retry(max_retry=settings.max_retry)
    path = journal_path(url)
    if path is not None:
        return _open_journal(path, settings, retry, create)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme:
        raise StorageError(f"storage {redact(url)!r}: not a URL; use sqlite:///study.db, "
                           "postgresql://user@host/db, or a journal file ending in .log")
    engine_kwargs: dict = {"pool_pre_ping": True}
    if scheme.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 120}}  # wait for other workers' writes
        db = _sqlite_path(url)
        if db is not None:
            _check_existing(db, "database", create)
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"storage {redact(url)!r}: cannot create its folder "
                                   f"({e.strerror or type(e).__name__})") from None
    try:
        return _RDB(url, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_interval,
                    grace_period=settings.grace_period, **{_RDB_CALLBACK_ARG: retry})
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or e.name or "a driver module"
        raise StorageError(f"storage {redact(url)!r}: its database driver {missing!r} is not "
                           "installed (for postgresql:// pip install 'psycopg[binary]')") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's many errors: one line, no secrets
        raise StorageError(f"storage {redact(url)!r}: cannot open it ({type(e).__name__}: "
                           f"{redact(_first_line(e))})") from None


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# Which worker runs a trial, and whether it still exists


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_start(pid: int) -> str | None:
    """A token that tells a process from a later one with the same pid (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    return ""  # alive; no start time on this platform


def this_worker() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid,
            "start": _process_start(pid) or ""}


def owner_is_gone(owner: dict) -> bool:
    """True when ``owner`` ran on this machine (same boot) and its process no longer exists."""
    me = this_worker()
    if not isinstance(owner, dict) or owner.get("host") != me["host"] or owner.get("boot") != me["boot"]:
        return False
    start = _process_start(int(owner.get("pid", -1)))
    return start is None or (bool(start) and bool(owner.get("start")) and start != owner["start"])


def own_tag(t: FrozenTrial) -> dict | None:
    """The owner tag written for ``t`` itself; None for an untagged trial or a retry that still
    carries its failed trial's copy (tags written before TAGGED_ATTR existed count as its own)."""
    owner = t.system_attrs.get(OWNER_ATTR)
    if owner is not None and t.system_attrs.get(TAGGED_ATTR, t._trial_id) != t._trial_id:
        return None
    return owner


class _Sweep:
    """Shared by both storages: tag a trial with its worker as soon as the worker takes it, and
    count as stale the trials of local workers that are gone, and untagged trials older than the
    grace period (a worker killed between taking a trial and tagging it)."""

    grace_period: float

    def _init_sweep(self) -> None:
        self._tagged: set[int] = set()

    def _tag(self, trial_id: int) -> None:
        if trial_id not in self._tagged:
            self._tagged.add(trial_id)
            # in this order: until TAGGED_ATTR names this trial, a sweep treats it as untagged
            self.set_trial_system_attr(trial_id, OWNER_ATTR, this_worker())
            self.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())
            self.set_trial_system_attr(trial_id, TAGGED_ATTR, trial_id)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        trial_id = super().create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            self._tag(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        taken = super().set_trial_state_values(trial_id, state, values)
        if taken and state == TrialState.RUNNING:  # a queued trial (the seed, a retry) taken
            self._tag(trial_id)
        return taken

    def _more_stale(self, study_id: int) -> list[int]:
        out = []
        now = time.time()
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            owner = own_tag(t)
            if owner is not None and owner_is_gone(owner):
                out.append(t._trial_id)
            elif owner is None and t.datetime_start is not None \
                    and now - t.datetime_start.timestamp() > self.grace_period:
                out.append(t._trial_id)  # killed between taking the trial and its first beat
        return out


class _RDB(_Sweep, RDBStorage):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_sweep()
        if self.engine.dialect.name == "sqlite":
            _serialize_sqlite(self.engine)

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        # Optuna's _CachedStorage (how a Study holds an RDB storage) creates trials through this
        # private method, not create_new_trial: tag here, before the objective starts
        trial = super()._create_new_trial(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            self._tag(trial._trial_id)
        return trial

    def record_heartbeat(self, trial_id: int) -> None:
        self._tag(trial_id)  # already done when this process took the trial; kept for safety
        super().record_heartbeat(trial_id)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return sorted(set(super()._get_stale_trial_ids(study_id)) | set(self._more_stale(study_id)))


def _serialize_sqlite(engine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE``. Python's sqlite3 starts a transaction
    only at the first write, so two workers can both read a queued trial as WAITING and both take
    it, or both fail one stale trial and queue two retries; Optuna's ``SELECT ... FOR UPDATE``
    guards that on PostgreSQL but is a no-op on SQLite. (SQLAlchemy's documented pysqlite recipe.)"""
    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are replaced


class _Journal(_Sweep, JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeat its RDB storage has."""

    def __init__(self, backend, settings: StorageSettings, retry) -> None:
        super().__init__(backend)
        self._init_sweep()
        self.heartbeat_interval = settings.heartbeat_interval
        self.grace_period = settings.grace_period
        self._stale_callback = retry

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self._tag(trial_id)
            self.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial just ended (or another worker failed it): nothing to keep alive

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = {t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                 if own_tag(t) is not None and now - float(t.system_attrs.get(BEAT_ATTR, now)) > self.grace_period}
        return sorted(stale | set(self._more_stale(study_id)))

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self._stale_callback

    def get_failed_trial_callback(self):  # the name before Optuna 4.9
        return self._stale_callback


# ---------------------------------------------------------------------------------------------
# Journal files


def _open_journal(path: Path, settings: StorageSettings, retry, create: bool = True) -> _Journal:
    _check_existing(path, "journal", create)
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"storage {path}: cannot create its folder "
                               f"({e.strerror or type(e).__name__})") from None
        repair_journal(path)
    elif _valid_prefix(path.read_bytes()) != path.stat().st_size:
        raise StorageError(f"journal {path}: its last record was cut off by a crash; a command "
                           "that writes to it (run, worker) repairs it, keeping the cut bytes")
    try:
        return _Journal(JournalFileBackend(str(path)), settings, retry)
    except (ValueError, OSError) as e:
        raise StorageError(f"journal {path}: unreadable ({e}); a line before the end is damaged, "
                           "which a crash cannot cause: restore it from a backup") from None


def repair_journal(path: Path) -> int:
    """Cut a journal's damaged tail (a last record a crash left without its newline, or complete
    lines that are not JSON at the very end), under the journal's own lock. The removed bytes are
    kept beside it in ``<path>.damaged-<time>``. Returns how many bytes were removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            data = f.read()
            keep = _valid_prefix(data)
            if keep == len(data):
                return 0
            tail = data[keep:]
            side = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            side.write_bytes(tail)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    log.warning("journal %s: removed a damaged tail of %d bytes left by a crash (kept in %s)",
                path, len(tail), side.name)
    return len(tail)


def _valid_prefix(data: bytes) -> int:
    """Length of ``data`` up to the end of its last complete line that parses as JSON, after which
    only damaged lines follow (Optuna replays the whole file on open anyway, so reading it is cheap
    by comparison)."""
    end = len(data)
    while end > 0:
        if data[end - 1:end] != b"\n":  # a record without its newline: cut back to the last one
            end = data.rfind(b"\n", 0, end) + 1
            continue
        start = data.rfind(b"\n", 0, end - 1) + 1
        try:
            json.loads(data[start:end - 1])
            return end
        except ValueError:  # a complete line that is not JSON (e.g. zeros after a power cut)
            end = start
    return 0


# ---------------------------------------------------------------------------------------------
# Reading a study's state (for `dynsearch status` and workers)


def load_study(storage, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        raise StorageError(f"no study {study_name!r} in this storage (it holds: "
                           f"{', '.join(names) or 'none'})") from None


def sweep_stale(study: optuna.Study) -> None:
    """Fail (and re-queue once) the study's stale trials now, as a worker does before each trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
