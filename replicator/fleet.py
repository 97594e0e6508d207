"""The databases of ``dir:`` entries at run time: found, queued, opened a few at a time, run,
and stopped when their file goes.

A fresh start with a thousand databases does not open (and snapshot) them all at once: they wait
in a queue, the most recently changed first, and ``Runtime.snapshot_limit`` of them open at a
time. How far that got is in ``/status`` (``databases``) and in the metric
``replicator_databases{state}``.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .aio import Stop, wait_event
from .config import DbConfig, DirConfig, Shard
from .discovery import DirWatch
from .errors import SpoolBusyError
from .metrics import Metrics
from .runtime import Runtime

if TYPE_CHECKING:
    from .replicator import DatabaseService

log = logging.getLogger("replicator")

STATES = ("queued", "opening", "replicating", "skipped", "failed")
# how often a full opener looks whether a database parked
OPEN_WAIT = 0.5
# how long a removed database's service may take for its final capture and ship
REMOVE_GRACE = 5.0
# a database another process replicates is tried again on a change at most this often
BUSY_RETRY = 60.0
# a database that could not open for want of descriptors is tried again after this long
FDS_RETRY = 5.0


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is the process or the system out of
    file descriptors (EMFILE, ENFILE)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            return True
        e = e.__cause__ or e.__context__
    return False


class Fleet:
    """Every database found in the ``dir:`` entries, each with its own service."""

    def __init__(self, dirs: list[DirConfig], runtime: Runtime, metrics: Metrics,
                 make: Callable[[DbConfig], DatabaseService], shard: Shard | None = None) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self._make = make
        self.watches = [DirWatch(d, runtime, self.add, self.remove_below, shard) for d in dirs]
        self.services: dict[str, DatabaseService] = {}
        self._runs: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self._queue: list[tuple[float, str]] = []
        self._queued: dict[str, DbConfig] = {}
        self._opening: set[str] = set()
        self._gone: set[str] = set()  # removed while opening: closed once opened
        self.failed: dict[str, str] = {}
        # another process replicates these: (monotonic time before which a change does not
        # try again, the error logged last)
        self._busy: dict[str, tuple[float, str]] = {}
        # out of descriptors when they opened: queued again once their timer fires; logged
        # once until they open
        self._later: dict[str, asyncio.TimerHandle] = {}
        self._short: set[str] = set()
        self._more = asyncio.Event()
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Scan every directory, queue what was found and start opening."""
        self._stop.clear()
        for w in self.watches:
            await w.start()
        self._workers = [asyncio.ensure_future(self._opener())
                         for _ in range(self.runtime.snapshot_limit)]
        self._set_metrics()

    def add(self, cfg: DbConfig, changed: float) -> None:
        """Queue a database found (nothing if it is queued, opening or running already)."""
        path = cfg.path
        if path in self._opening:
            self._gone.discard(path)  # there again: the service checks the file it opened
            return
        if path in self._queued or path in self.services:
            return
        busy = self._busy.get(path)
        if busy is not None and path in self.failed and time.monotonic() < busy[0]:
            return  # another process replicates it (its checkpoints change the file often)
        self.failed.pop(path, None)
        self._queued[path] = cfg
        heapq.heappush(self._queue, (-changed, path))
        self._more.set()
        self._set_metrics()

    def remove(self, path: str) -> None:
        """A database's file is gone: drop it from the queue, or stop its service."""
        self.failed.pop(path, None)
        self._busy.pop(path, None)
        self._short.discard(path)
        later = self._later.pop(path, None)
        if later is not None:
            later.cancel()
        if self._queued.pop(path, None) is not None:
            self._set_metrics()
            return
        if path in self._opening:
            self._gone.add(path)
            return
        run = self._runs.pop(path, None)
        if run is None:
            return
        log.info("%s: removed; replication stops", path)
        run[0].set()
        task = asyncio.ensure_future(self._retire(path, run[1]))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def remove_below(self, path: str) -> None:
        """A database's file is gone (:meth:`remove`), or a directory: every database known
        below it is (queued, opening, running or failed)."""
        known = (self._queued, self._opening, self._runs, self.failed)
        if any(path in k for k in known):
            self.remove(path)
            return
        prefix = path + os.sep
        for p in sorted({p for k in known for p in k if p.startswith(prefix)}):
            self.remove(p)

    async def _retire(self, path: str, task: asyncio.Task[None]) -> None:
        await asyncio.gather(task, return_exceptions=True)
        s = self.services.pop(path, None)
        self._set_metrics()
        if s is not None:
            try:
                await s.close(REMOVE_GRACE)
            finally:
                if path not in self.services and path not in self._opening \
                        and path not in self._queued:  # not found again meanwhile
                    _forget(s)

    async def _opener(self) -> None:
        while not self._stop.is_set():
            if not self._queue:
                self._more.clear()
                await self._more.wait()
                continue
            while not self.runtime.room_to_open() and not self._stop.is_set():
                await wait_event(self._stop, OPEN_WAIT)  # open databases park when idle
            _, path = heapq.heappop(self._queue)
            cfg = self._queued.pop(path, None)
            if cfg is None:
                continue  # removed while queued
            self._opening.add(path)
            self._set_metrics()
            try:
                await self._open(cfg)
            finally:
                self._opening.discard(path)
                self._gone.discard(path)
                self._set_metrics()

    async def _open(self, cfg: DbConfig) -> None:
        s = self._make(cfg)
        s.park_after = self.runtime.park_after
        try:
            async with self.runtime.snapshots:
                await s.open()
        except asyncio.CancelledError:
            await asyncio.shield(s.close(0.0))
            raise
        except Exception as exc:  # noqa: BLE001 - one database's trouble is not the others'
            if cfg.path not in self._gone:
                self.failed[cfg.path] = str(exc)
                if out_of_descriptors(exc):
                    self._retry_later(cfg, exc)
                else:
                    self._failed(cfg.path, exc)
            await self._discard(s)
            return
        self._busy.pop(cfg.path, None)
        self._short.discard(cfg.path)
        if self._stop.is_set() or cfg.path in self._gone:
            await self._discard(s)
            return
        self.services[cfg.path] = s
        stop = Stop()
        self._runs[cfg.path] = (stop, asyncio.ensure_future(s.run(stop)))

    def _retry_later(self, cfg: DbConfig, exc: Exception) -> None:
        """A database could not open for want of descriptors: queue it again in FDS_RETRY
        seconds (no change may come to queue it), failed meanwhile; logged once until it
        opens."""
        level = logging.DEBUG if cfg.path in self._short else logging.WARNING
        self._short.add(cfg.path)
        log.log(level, "%s: cannot replicate yet, out of file descriptors (tried again every "
                "%.0f s): %s", cfg.path, FDS_RETRY, exc)

        def again() -> None:
            self._later.pop(cfg.path, None)
            if not self._stop.is_set() and cfg.path in self.failed:
                self.add(cfg, 0.0)  # behind the databases queued meanwhile

        old = self._later.pop(cfg.path, None)
        if old is not None:
            old.cancel()
        self._later[cfg.path] = asyncio.get_running_loop().call_later(FDS_RETRY, again)

    def _failed(self, path: str, exc: Exception) -> None:
        """Log why a database cannot be replicated; one that another process replicates is
        tried again on a change at most every BUSY_RETRY seconds, and logged again only when
        the holder changes."""
        if not isinstance(exc, SpoolBusyError):
            log.error("%s: cannot replicate: %s", path, exc)
            return
        last = self._busy.get(path)
        self._busy[path] = (time.monotonic() + BUSY_RETRY, str(exc))
        if last is None or last[1] != str(exc):
            log.error("%s: cannot replicate: %s", path, exc)
        else:
            log.debug("%s: cannot replicate: %s", path, exc)

    async def _discard(self, s: DatabaseService) -> None:
        """Close a service that will not run; if its file was removed while it opened, forget
        its metric series too."""
        gone = s.cfg.path in self._gone
        if gone:
            log.info("%s: removed while it opened; replication stops", s.cfg.path)
        await s.close(0.0)
        if gone:
            _forget(s)

    def progress(self) -> dict[str, int]:
        """How many databases are in each state."""
        skipped = sum(len(w.skipped) for w in self.watches)
        return {"queued": len(self._queued), "opening": len(self._opening),
                "replicating": len(self.services), "skipped": skipped,
                "failed": len(self.failed)}

    def _set_metrics(self) -> None:
        self.runtime.queued = len(self._queued)
        for state, n in self.progress().items():
            self.metrics.databases.labels(state).set(n)

    def status(self) -> dict[str, Any]:
        """``/status``'s ``databases``: the counts, and the skipped and failed files."""
        skipped = {p: r for w in self.watches for p, r in w.skipped.items()}
        return {**self.progress(), "skipped_files": skipped, "failed_files": dict(self.failed)}

    async def aclose(self, grace: float, skip: asyncio.Event | None = None) -> None:
        """Stop opening and watching; stop every service (final sync within ``grace``)."""
        self._stop.set()
        self._more.set()
        for later in self._later.values():
            later.cancel()
        self._later.clear()
        for w in self.watches:
            w.stop()
        if self._workers:
            # an open in progress may finish (and is then closed); a long one is cut short
            await asyncio.wait(self._workers, timeout=grace)
        for t in self._workers:
            t.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        runs = list(self._runs.values())
        self._runs.clear()
        for stop, _ in runs:
            stop.set()
        await asyncio.gather(*(t for _, t in runs), return_exceptions=True)
        await asyncio.gather(*self._closing, return_exceptions=True)
        services = list(self.services.values())
        self.services.clear()
        await asyncio.gather(*(s.close(grace, skip) for s in services), return_exceptions=True)
        self._set_metrics()


def _forget(s: DatabaseService) -> None:
    """Drop what the process keeps of a database no longer replicated: its metric series and
    its notification state."""
    s.metrics.forget(s.cfg.name)
    if s.notifier is not None:
        s.notifier.forget(s.cfg.name)
