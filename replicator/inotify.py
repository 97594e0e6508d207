"""Linux inotify through ctypes: a non-blocking descriptor the event loop reads itself (no
thread), watches on single directories, and the parsing of the event records.

Only what :mod:`replicator.watcher` needs; :func:`open_inotify` returns None where inotify is
not available (another system, or the per-user instance limit reached), and the watcher falls
back to watchdog.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .libc import function, libc

IN_MODIFY = 0x2
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000

# what a watched directory reports: its entries written, created, deleted and moved in or out
DIR_MASK = (IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
            | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, length of the name
_READ_SIZE = 1 << 16
_READS = 8


@dataclass(frozen=True, slots=True)
class InotifyEvent:
    """One event record: the watch, what happened, and the entry's name (empty for the
    watched directory itself)."""

    wd: int
    mask: int
    name: str


class Inotify:
    """An inotify instance: its descriptor (non-blocking), watches added and removed, and the
    events read from it."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self.fd = fd
        self._libc = libc

    def add_watch(self, path: str, mask: int = DIR_MASK) -> int:
        """Watch ``path`` (the same watch again for a path watched already); OSError if it
        cannot be watched."""
        wd = int(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        return wd

    def rm_watch(self, wd: int) -> None:
        """Stop a watch (nothing if it is gone already)."""
        self._libc.inotify_rm_watch(self.fd, wd)

    def read(self) -> Iterator[InotifyEvent]:
        """The events waiting now, at most a few buffers of them (the loop calls again for
        more); none when there are none: the descriptor never blocks."""
        for _ in range(_READS):
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            if not buf:
                return
            yield from parse(buf)

    def close(self) -> None:
        """Close the descriptor (every watch goes with it)."""
        os.close(self.fd)


def parse(buf: bytes) -> Iterator[InotifyEvent]:
    """The event records in ``buf`` (whole records, as ``read(2)`` returns them)."""
    off, end, size = 0, len(buf), _EVENT.size
    while off + size <= end:
        wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
        off += size
        name = buf[off:off + length].rstrip(b"\0")
        off += length
        yield InotifyEvent(wd, mask, os.fsdecode(name))


def open_inotify() -> Inotify | None:
    """A new inotify instance, or None where there is none to be had."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    lib, init = libc(), function("inotify_init1")
    if lib is None or init is None:
        return None
    fd = int(init(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        return None
    return Inotify(fd, lib)
