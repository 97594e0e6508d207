"""Durable file helpers: write to a temp name, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

TMP_SUFFIX = ".tmp"
WRITE_BUFFER = 64 << 10
"""The buffer of a file written by :func:`atomic_writer`: smaller writes are gathered up to
this size; a larger one goes to the kernel as it is."""


def stat_or_none(path: str) -> os.stat_result | None:
    """``os.stat(path)``, or None when it cannot be looked at (missing, say)."""
    try:
        return os.stat(path)
    except OSError:
        return None


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """Create ``path`` and its parents, fsyncing each parent that gained an entry."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        fsync_dir(os.path.dirname(d))


class _TempNames:
    """This process's part of temp names: its pid and a random token, learnt once (and again
    in a forked child), then a counter: a name costs no system call."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.prefix = f".{os.getpid()}.{os.urandom(4).hex()}"
        self.counter = itertools.count()

    def suffix(self) -> str:
        # next() on itertools.count is atomic under the GIL: threads get distinct numbers
        return f"{self.prefix}{next(self.counter):x}{TMP_SUFFIX}"


_TEMP_NAMES = _TempNames()


def temp_path(path: str) -> str:
    """A unique temp name beside ``path`` (same directory, so rename is atomic):
    ``PATH.PID.RANDOM.tmp``."""
    return path + _TEMP_NAMES.suffix()


def owned_temp_dir(path: str) -> str:
    """Create a temp directory ``.NAME.PID.RANDOM.tmp`` beside ``path``, named after this
    process like ``temp_path``."""
    parent, base = os.path.split(os.path.abspath(path))
    return tempfile.mkdtemp(TMP_SUFFIX, f".{base}.{os.getpid()}.", parent)


def lock_owned(fd: int) -> None:
    """Mark the temp file or directory open at ``fd`` as in use by this process (an exclusive
    ``flock``, dropped by the kernel when the process ends, however it ends)."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temp files and directories a killed process left beside ``path``: only names
    of our own pattern (``NAME.PID.RANDOM.tmp``, ``.NAME.PID.RANDOM.tmp``), only when process
    PID is gone and nothing holds the entry's lock (``lock_owned``). Returns what was removed."""
    parent, base = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.?{re.escape(base)}\.(\d+)\.[A-Za-z0-9_]+{re.escape(TMP_SUFFIX)}")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _pid_alive(int(m[1])):
            continue
        entry = os.path.join(parent, name)
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            lock_owned(fd)  # its owner (another pid namespace, say) still holds it: skip
            if os.path.isdir(entry):
                shutil.rmtree(entry)
            else:
                os.unlink(entry)
            removed.append(entry)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


class DurableFile:
    """A new file open for writing by :func:`atomic_writer`, on its bare descriptor: writes
    smaller than ``WRITE_BUFFER`` are copied into one buffer, larger ones written as they
    are. A capture writes one such file a commit; a buffered file object would cost a
    ``fstat``, a ``lseek`` and the building of two objects each time."""

    __slots__ = ("fd", "_buf")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` (bytes; a view of bytes); returns its length."""
        n = len(data)
        if len(self._buf) + n <= WRITE_BUFFER:
            self._buf += data
            return n
        self.flush()
        if n < WRITE_BUFFER:
            self._buf += data
        else:
            _write_all(self.fd, data)
        return n

    def flush(self) -> None:
        """Hand what is gathered to the kernel."""
        if self._buf:
            _write_all(self.fd, self._buf)
            self._buf = bytearray()


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def atomic_writer(path: str, parent_exists: bool = False) -> Iterator[DurableFile]:
    """Create a temp file beside ``path``; on clean exit fsync it, rename it over ``path`` and
    fsync the directory. On error the temp file is removed and ``path`` is untouched.
    ``parent_exists``: the caller knows the directory is there (and durable): no look."""
    if not parent_exists:
        makedirs_durable(os.path.dirname(path) or ".")
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        f = DurableFile(fd)
        yield f
        f.flush()
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
