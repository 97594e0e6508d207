"""When committed WAL frames were first seen: the observation times of transactions.

A transaction's observation time (``observed_ns`` in a segment header, docs/format.md) is what
``restore --to-time`` goes by, so it must never be before the commit and should be as close after
it as possible. The capture does not stamp a transaction when its batch is written (a busy capture
may be tens of milliseconds behind the writer) but with the first moment the WAL was *seen* to
hold it: the wal-index header (``-shm``) says how far the committed WAL reaches (``mxFrame``) in
which epoch (the salts), and a reading of it taken at time t proves that every transaction whose
commit frame is at or below ``mxFrame`` had committed by t.

Readings are taken at the start of each capture step and, while a step runs (a long batch),
every ``SIGHT_INTERVAL`` by the process's one :class:`Sighter` thread, so a transaction is
stamped within a few milliseconds of its commit however long the capture takes to write it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from .threads import name_os_thread

SIGHT_INTERVAL = 0.004
"""Seconds between readings while a capture step runs."""
MAX_READINGS = 16384
"""Readings kept per database (the oldest go first; the capture forgets used ones sooner):
about a minute of a writer that commits all the time, so a capture behind a bulk load (or
held up by a snapshot) still stamps its oldest commits from readings of their time. At most
about 3 MiB, for a database whose capture is that far behind."""
SIGHTER_IDLE_EXIT = 10.0
"""The sighter thread ends after this many seconds with no step running (and comes back)."""
_SHM_HEADER = 136

# (salts as the 8 raw bytes of the WAL header, mxFrame, nBackfill)
WalIndex = tuple[bytes, int, int]


def read_walindex(fd: int) -> WalIndex | None:
    """(salt bytes, mxFrame, nBackfill) from a consistent read of the wal-index header open at
    ``fd`` (its two copies equal, initialised), or None if there is none."""
    for _ in range(8):
        raw = os.pread(fd, _SHM_HEADER, 0)
        if len(raw) < _SHM_HEADER:
            return None
        if raw[:48] == raw[48:96] and raw[12] == 1:
            mx = int.from_bytes(raw[16:20], sys.byteorder)
            nb = int.from_bytes(raw[96:100], sys.byteorder)
            return raw[32:40], mx, nb
    return None


def salt_bytes(salts: tuple[int, int]) -> bytes:
    """The salts as the wal-index holds them (the WAL header's big-endian bytes)."""
    return salts[0].to_bytes(4, "big") + salts[1].to_bytes(4, "big")


class Sightings:
    """The readings of one database's wal-index, oldest first: ``(salts, mxFrame, time_ns)``,
    one per change. Thread-safe: the capture and the sighter thread both take readings."""

    def __init__(self, shm_path: str) -> None:
        self.shm_path = shm_path
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._readings: list[tuple[bytes, int, int]] = []

    def take(self) -> WalIndex | None:
        """Read the wal-index now and remember when it was first seen this far; returns the
        reading (None without a wal-index)."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.shm_path, os.O_RDONLY)
                except OSError:
                    return None
            shm = read_walindex(self._fd)
            seen = time.time_ns()  # after the read: everything it shows had committed by now
            if shm is None:
                return None
            last = self._readings[-1] if self._readings else None
            if last is None or last[:2] != shm[:2]:
                self._readings.append((shm[0], shm[1], seen))
                if len(self._readings) > MAX_READINGS:
                    del self._readings[0]
            return shm

    def first_seen(self, salts: bytes, commit: int) -> int | None:
        """When a reading first showed the commit frame ``commit`` of the epoch of ``salts``
        (None if none did)."""
        with self._lock:
            for s, mx, seen in self._readings:
                if s == salts and mx >= commit:
                    return seen
        return None

    def stamps(self, salts: bytes, commits: list[int], floor: int) -> list[int]:
        """The observation times of the transactions whose commit frames are ``commits``
        (ascending) in the epoch of ``salts``: when each was first seen (now if no reading
        showed it), never before ``floor`` nor before the one ahead of it. One pass over the
        readings: a reading that does not show a commit shows none after it either."""
        now = time.time_ns()
        out = []
        with self._lock:
            readings, i = self._readings, 0
            for commit in commits:
                while i < len(readings) and not (
                    readings[i][0] == salts and readings[i][1] >= commit
                ):
                    i += 1
                floor = max(readings[i][2] if i < len(readings) else now, floor)
                out.append(floor)
        return out

    def forget(self, salts: bytes, upto: int) -> None:
        """Drop the readings no later transaction can use: those of the epoch of ``salts`` up to
        frame ``upto`` (captured), and those of earlier epochs."""
        with self._lock:
            keep: list[tuple[bytes, int, int]] = []
            current = False  # a reading of this epoch comes later in time
            for r in reversed(self._readings):
                if r[0] == salts:
                    current = True
                    if r[1] > upto:
                        keep.append(r)
                elif not current:
                    keep.append(r)
            keep.reverse()
            self._readings = keep

    def close(self) -> None:
        """Close the wal-index descriptor (a later reading opens it again)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Sighter:
    """One thread for the process that takes readings for every database whose capture step is
    running, every ``interval`` seconds; it runs only while some step does (and a while after)."""

    def __init__(self, interval: float = SIGHT_INTERVAL) -> None:
        self.interval = interval
        self._cond = threading.Condition()
        self._active: dict[int, tuple[Sightings, int]] = {}  # id -> (sightings, users)
        self._thread: threading.Thread | None = None
        self.wakeups = 0
        """Times the thread woke: to be told a step started, or to take readings."""

    @contextlib.contextmanager
    def watching(self, sightings: Sightings) -> Iterator[None]:
        """Take readings of ``sightings`` until the block ends."""
        key = id(sightings)
        with self._cond:
            idle = not self._active
            _, users = self._active.get(key, (sightings, 0))
            self._active[key] = (sightings, users + 1)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="replicator-sighter",
                                                daemon=True)
                self._thread.start()
            elif idle:
                self._cond.notify()  # it waits only while nothing is watched
        try:
            yield
        finally:
            with self._cond:
                _, users = self._active[key]
                if users > 1:
                    self._active[key] = (sightings, users - 1)
                else:
                    del self._active[key]

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                if not self._active:
                    if not self._cond.wait_for(lambda: bool(self._active), SIGHTER_IDLE_EXIT):
                        self._thread = None
                        return
                    self.wakeups += 1
            time.sleep(self.interval)
            with self._cond:
                self.wakeups += 1
                current = [s for s, _ in self._active.values()]
            for s in current:
                try:
                    s.take()
                except OSError:
                    pass  # the next step reads it again, or notices what went wrong


SIGHTER = Sighter()
"""The process's sighter."""
