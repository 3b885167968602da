"""Atomic file writes: a temporary file in the destination folder, fsynced, then renamed over the
destination. An interrupted writer leaves the previous file (or none), never a partial one.

Temporary files are named ``.<name>.<host>-<pid>.<random>.tmp``: hidden, with a suffix no output
has, so they cannot be mistaken for outputs. A writer killed with SIGKILL cannot remove its own;
the next write of the same file removes those of writers on this machine whose process is gone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for a writer that opens files by name (gguf-py's writer).

    When the block ends without error the temporary file is fsynced, given an ordinary file's mode
    and renamed over ``path``; on any error (or interrupt) it is removed and ``path`` is untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(dest)}{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``."""
    if mode not in ("wb", "w"):
        raise ValueError("atomic_open supports 'wb' and 'w'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{_host()}-"


_TEMP_REST = re.compile(r"^(\d+)\.[A-Za-z0-9_]+\.tmp$")  # <pid>.<mkstemp's random part>.tmp


def remove_stale_temps(dest: str | Path) -> list[Path]:
    """Remove the temporary files of ``dest`` whose writer ran on this machine and is gone (a
    SIGKILL or a power cut skips the cleanup); a live writer's file is left alone."""
    dest = Path(dest)
    prefix, removed = _temp_prefix(dest), []
    try:
        entries = os.listdir(dest.parent)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_REST.match(entry[len(prefix):]) if entry.startswith(prefix) else None
        if m and not _alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(dest.parent / entry)
                removed.append(dest.parent / entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no way to tell: keep its file
        return True
    return True


def _umask_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp's files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
