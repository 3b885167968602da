"""What the machine allows this process: memory limits, freed heap memory given back, the cache folder.

:func:`memory_limit` is the tightest of: the cgroup's limit (v2 ``memory.max`` or v1
``memory.limit_in_bytes``), ``RLIMIT_AS`` / ``RLIMIT_DATA``, and physical RAM; caches size
themselves from it. 
:func:`trim` gives freed heap memory back to the system between blocks and tensors;
:func:`cache_root` is where built tools and measured throughputs are kept.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import threading
from pathlib import Path

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
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), *_cgroup_limits()]
    for r in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft, _ = resource.getrlimit(r)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    return int(min(limits))


def cache_root() -> Path:
    """``$DYNSEARCH_CACHE`` or ``~/.cache/dynsearch``."""
    env = os.environ.get("DYNSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dynsearch"


# --------------------------------------------------------------------------- heap
# Freed memory given back to the operating system between blocks and tensors.
#
# glibc's malloc keeps freed chunks for reuse and returns them to the system only from the top of
# its heaps. The temporaries of a block (matmul outputs, autograd buffers, quantized copies) come
# in many sizes and interleave with longer-lived ones, so over hundreds of blocks a process keeps
# growing though it holds no more live data: the Fisher pass of a 163-layer 768-wide model ended
# at 1.4 GB of anonymous memory, 0.26 GB after ``malloc_trim`` (its live data), and a run under a
# memory cap three times smaller than the model was killed for it.
#
# :func:`trim` calls ``malloc_trim(0)`` when more than ``keep`` bytes lie free in malloc's arenas
# (``mallinfo2``), so a block's temporaries are reused as before and only the excess goes back:
# the same pass then peaks at 0.5 GB for 8% more time (trimming after every block: 0.27 GB, 23%
# more). A no-op where the C library is not glibc.
KEEP_FREE_BYTES = 256 << 20  # free heap memory kept for reuse; beyond it, trimmed


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim_fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None, None
    trim_fn.argtypes, trim_fn.restype = [ctypes.c_size_t], ctypes.c_int
    info_fn = getattr(libc, "mallinfo2", None)  # glibc >= 2.33
    if info_fn is not None:
        info_fn.argtypes, info_fn.restype = [], _MallInfo2
    return trim_fn, info_fn


_TRIM, _INFO = _load()
_LOCK = threading.Lock()  # one trim at a time (profiling threads call it too)


def free_bytes() -> int | None:
    """Bytes free in malloc's arenas (held by the process, not in use), or None where unknown."""
    return None if _INFO is None else int(_INFO().fordblks)


def trim(keep: int = KEEP_FREE_BYTES) -> bool:
    """Give freed heap memory back to the system if more than ``keep`` bytes of it are held.
    Returns whether it trimmed."""
    if _TRIM is None:
        return False
    free = free_bytes()
    if free is not None and free <= keep:
        return False
    with _LOCK:
        _TRIM(0)
    return True
