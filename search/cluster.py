"""Where profiling tasks run: joblib's threading or loky backend on this machine, or a Dask
cluster through joblib's dask backend (``--joblib-backend dask --dask-scheduler tcp://host:8786``).

A task shipped to another process is a :class:`~dynsearch.search.profile.ProfileJob` and a tensor
name: paths and keys, never arrays. The process reads the model, the statistics file and the
profile cache from those paths, so on a cluster they must lie on a disk every machine mounts at
the same path (the model is checked by its fingerprint on each worker; a different file is an
error, not a silent mismatch).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

from dynsearch.errors import ClusterError

BACKENDS = ("threading", "loky", "dask")
SCHEDULER_ENV = "DYNSEARCH_DASK_SCHEDULER"  # the Dask scheduler address when --dask-scheduler is not given
INSTALL_HINT = "pip install 'dynsearch[cluster]'"


@dataclass(frozen=True)
class ProfileBackend:
    name: str = "threading"  # joblib backend: threading (in this process), loky (processes), dask
    n_jobs: int = 1  # threads (threading) or processes (loky); dask uses every worker thread
    scheduler: str | None = None  # Dask scheduler address; None: $DYNSEARCH_DASK_SCHEDULER
    connect_timeout: float = 10.0  # seconds to reach the scheduler
    workers_timeout: float = 60.0  # seconds to wait for a first Dask worker to join
    device: str = "cpu"  # torch device of the error term's matrix product, in threads of this process

    @property
    def remote(self) -> bool:
        """Whether tasks run in other processes (and must carry paths, not arrays)."""
        return self.name != "threading"

    def address(self) -> str | None:
        return self.scheduler or os.environ.get(SCHEDULER_ENV) or None


def check_backend(backend: ProfileBackend) -> None:
    """The backend's options, checked before any work (no connection is made here)."""
    if backend.name not in BACKENDS:
        raise ClusterError(f"--joblib-backend {backend.name!r}: expected one of {', '.join(BACKENDS)}")
    if backend.name != "dask":
        if backend.scheduler:
            raise ClusterError(f"--dask-scheduler is given but --joblib-backend is {backend.name}; "
                               "add --joblib-backend dask")
        return
    _import_distributed()
    address = backend.address()
    if not address:
        raise ClusterError(f"--joblib-backend dask needs a scheduler: give --dask-scheduler "
                           f"tcp://HOST:8786 or set {SCHEDULER_ENV} (on one machine, use "
                           "--joblib-backend loky)")
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    try:
        scheme, location = parse_address(address)
        if scheme not in backends:
            raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(sorted(backends))}")
        if scheme in ("tcp", "tls", "ws", "wss") and not 0 < parse_host_port(location)[1] < 65536:
            raise ValueError("port out of range")
    except (ValueError, TypeError) as e:
        raise ClusterError(f"--dask-scheduler {address!r}: not a Dask scheduler address, expected "
                           f"tcp://HOST:PORT ({e})") from None


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise ClusterError(f"--joblib-backend dask needs the 'distributed' package: {INSTALL_HINT}") from None
    return distributed


@contextlib.contextmanager
def joblib_backend(backend: ProfileBackend) -> Iterator[dict]:
    """Within the block, joblib's ``Parallel`` sends work to ``backend``; yields the keyword
    arguments for ``Parallel`` (``n_jobs``, and ``backend`` for the local ones). For dask a
    client is connected to the scheduler for the block and closed after it; an unreachable
    scheduler or a cluster without workers is one :class:`ClusterError` line."""
    check_backend(backend)
    if backend.name != "dask":
        yield {"backend": backend.name, "n_jobs": backend.n_jobs}
        return
    from joblib import parallel_config

    client = connect(backend)
    try:
        with parallel_config(backend="dask", client=client,
                             wait_for_workers_timeout=backend.workers_timeout):
            yield {"n_jobs": -1}
    finally:
        with contextlib.suppress(Exception):  # closing a client whose scheduler died is noisy
            client.close(timeout=5)


def connect(backend: ProfileBackend):
    """A ``distributed.Client`` on the backend's scheduler, or one clear error line."""
    distributed = _import_distributed()
    address = backend.address()
    try:
        return distributed.Client(address, timeout=backend.connect_timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"--dask-scheduler {address}: cannot reach the Dask scheduler within "
                           f"{backend.connect_timeout:g} s ({type(e).__name__}: {reason})") from None


def probe(backend: ProfileBackend) -> None:
    """For dask: connect to the scheduler once and leave, so that an unreachable one is an
    error before any costly work (``run`` calls it first)."""
    check_backend(backend)
    if backend.name == "dask":
        client = connect(backend)
        with contextlib.suppress(Exception):
            client.close(timeout=5)


def describe_error(backend: ProfileBackend, e: BaseException) -> ClusterError | None:
    """A cluster failure during profiling (a worker died, the scheduler went away, no worker
    joined) as one line; None for any other error (which is then raised as it is)."""
    if backend.name != "dask":
        return None
    import distributed

    kinds = (distributed.KilledWorker, distributed.comm.CommClosedError, TimeoutError, OSError)
    if not isinstance(e, kinds):
        return None
    reason = (str(e).strip().splitlines() or [""])[0]
    return ClusterError(f"profiling on the Dask cluster at {backend.address()} failed "
                        f"({type(e).__name__}: {reason})")
