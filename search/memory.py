"""How much memory this process may use, and how much a process tree uses.

:func:`memory_limit` is the tightest of: the cgroup's limit (v2 ``memory.max`` or v1
``memory.limit_in_bytes``), ``RLIMIT_AS`` / ``RLIMIT_DATA``, and physical RAM; caches size
themselves from it. :class:`PeakRSS` samples the resident memory of a process and all of its
children (joblib/loky workers, search workers) from a thread: ``ru_maxrss`` alone reports one
process, never a sum.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import psutil

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroup (v2 and v1), where they can be read."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2
            candidates = [Path("/sys/fs/cgroup") / rel / "memory.max"]
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            candidates = [base / rel / "memory.limit_in_bytes", base / "memory.limit_in_bytes"]
        else:
            continue
        for c in candidates:
            try:
                text = c.read_text().strip()
            except OSError:
                continue
            if text and text != "max" and int(text) < _UNLIMITED:
                out.append(int(text))
            break
    return out


def memory_limit() -> int:
    """Bytes this process may use: cgroup limit, RLIMIT_AS, RLIMIT_DATA and RAM, the smallest."""
    limits = [psutil.virtual_memory().total, *_cgroup_limits()]
    for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(r)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    return int(min(limits))


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of process ``pid`` (default: this one) plus all of its descendants."""
    try:
        p = psutil.Process(pid or os.getpid())
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Peak of :func:`tree_rss` sampled every ``interval`` seconds in a thread; a context manager.

    Sampling misses spikes shorter than the interval; ``ru_maxrss`` of the process itself (and
    of each waited-for child) is folded in at the end, so the peak is never below what the
    kernel recorded for any single process.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.pid is None:
            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
