"""Atomic file writes: a temporary file in the destination folder, fsynced, then renamed over the
destination. An interrupted writer leaves the previous file (or none), never a partial one.

Before anything is written, :func:`check_output` refuses in one line an output that is one of the
command's own inputs (the same path, another spelling of it, a symlink or a hard link to it) or
that cannot be written there: a folder, a device, a path under a file, a read-only or immutable
file or folder, a name longer than the file system allows. Commands call it with their inputs
before their work starts; :func:`atomic_path` calls it again without them.

Temporary files are named ``.<name>.dynsearch-<host>-<pid>.<random>.tmp`` (the name cut to 100
characters): hidden, with a suffix no output has, saying who wrote them. A writer killed with
SIGKILL cannot remove its own; the next atomic write into the same folder removes every such file
of a writer on this machine whose process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import socket
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

from dynsearch.errors import OutputError

_NAME_IN_TEMP = 100  # characters of the destination's name kept in its temporary file's name
# errors of a write into the temporary file that are about the destination, not the input
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output(dest: str | Path, inputs: Iterable[str | Path | None] = ()) -> Path:
    """``dest`` as a Path, after checking that an atomic write can create or replace it and that it
    is none of ``inputs`` (None entries are skipped); raises OutputError naming the problem."""
    dest = check_not_input(dest, inputs)
    folder = _nearest_folder(dest)
    name_max = _name_max(folder)
    for part in dest.parts:
        if len(os.fsencode(part)) > name_max:
            raise OutputError(f"{dest}: a name of {len(os.fsencode(part))} bytes, the file system "
                              f"allows at most {name_max}")
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{dest}: cannot write: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{dest}: is a folder; give the name of a file to write")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{dest}: is not a regular file (a device, pipe or socket); "
                              "give the name of a file to write")
        if not os.access(dest, os.W_OK):
            raise OutputError(f"{dest}: is read-only{_why_read_only(dest)}; not replaced")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{dest}: cannot write in the folder {folder}{_why_read_only(folder)}")
    return dest


def check_output_folder(folder: str | Path, option: str) -> Path:
    """``folder`` as a Path, after checking that a command can write files in it (creating it and
    its missing parents where needed); raises OutputError naming ``option`` and the problem."""
    folder = Path(folder)
    try:
        st = os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as e:
        raise OutputError(f"{option} {folder}: cannot use it: {e.strerror or e}") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{option} {folder}: exists and is not a folder")
    nearest = folder
    while st is None:  # the closest existing ancestor, where the missing folders would be made
        nearest = nearest.parent
        try:
            st = os.stat(nearest)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise OutputError(f"{option} {folder}: cannot reach {nearest}: {e.strerror or e}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{option} {folder}: {nearest} is not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {folder}: cannot write in {nearest}{_why_read_only(nearest)}")
    return folder


def check_not_input(dest: str | Path, inputs: Iterable[str | Path | None]) -> Path:
    """``dest`` as a Path, after checking that it is none of ``inputs`` (None entries skipped)."""
    dest = Path(dest)
    for src in inputs:
        if src is not None and _same_file(dest, Path(src)):
            raise OutputError(f"{dest}: the output would overwrite the input {src}")
    return dest


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode (any spelling, symlink or hard link),
    or, where one does not exist yet, the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _nearest_folder(dest: Path) -> Path:
    """The closest existing ancestor of ``dest`` (where its missing folders would be created);
    OutputError when that is not a folder."""
    p = dest.parent
    while True:
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            p = p.parent
            continue
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # reported by name below
                p = p.parent
                continue
            raise OutputError(f"{dest}: cannot reach {p}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{dest}: {p} is not a folder")
        return p


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _why_read_only(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return " (a read-only file system)"
    except OSError:
        pass
    return " (no write permission, or marked immutable)"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` for a writer that opens files by name (gguf-py's writer).

    When the block ends without error the temporary file is fsynced, given an ordinary file's mode
    and renamed over ``path``; on any error (or interrupt) it is removed and ``path`` is untouched.
    A full disk or a destination that turns read-only meanwhile is an OutputError.
    """
    dest = check_output(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.parent)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write: {e.strerror or e}") from None
    try:
        yield Path(tmp)
        _commit(Path(tmp), dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS and e.filename in (None, tmp):
            raise OutputError(f"{dest}: cannot write: {e.strerror or e}") from None
        raise


def _commit(tmp: Path, dest: Path) -> None:
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dest)
    except OSError as e:
        raise OutputError(f"{dest}: cannot write: {e.strerror or e}") from None
    _fsync_dir(dest.parent)


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
    return f".{dest.name[:_NAME_IN_TEMP]}.dynsearch-{_host()}-{os.getpid()}."


# .<name>.dynsearch-<host>-<pid>.<mkstemp's random part>.tmp (greedy: the last "dynsearch-")
_TEMP = re.compile(r"^\..*\.dynsearch-([A-Za-z0-9]+)-(\d+)\.[A-Za-z0-9_]+\.tmp$", re.DOTALL)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writer ran on this machine and is gone (a
    SIGKILL or a power cut skips the cleanup); a live writer's file is left alone."""
    folder, removed = Path(folder), []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry)
        if m and m.group(1) == _host() and not _alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                os.unlink(folder / entry)
                removed.append(folder / entry)
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
