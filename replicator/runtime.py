"""What every database of a process shares: the worker pool for blocking SQLite and file work, the
one file watcher, the limits on concurrent snapshots and uploads, and the timer backstop.

Nothing here grows a thread per database. The pool has ``workers`` threads whatever the number of
databases (each database's work is serialized by its own lock, as its SQLite connections require),
the loop's default pool ``IO_WORKERS`` whatever the number of cores; the watcher has one thread per
watched directory tree; timers are jittered so that a thousand databases started together do not
wake together. The backstop for missed file events is one job a tick that stats the watched
databases that are due (their file and ``-wal``) and wakes only those that changed, instead of a
capture step per database per tick; with file events working it looks at no more than
``BACKSTOP_STATS`` databases a second, so an idle fleet of any size costs next to nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import resource
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .fsutil import stat_or_none
from .libc import function
from .progress import FilesSig, files_sig
from .report import ProcessSummary
from .threads import Workers, name_os_thread
from .watcher import FileEvents, file_events

T = TypeVar("T")

DEFAULT_WORKERS = 8
DEFAULT_HEALTH_WORKERS = 2
# compaction is background work: one thread bounds it to one CPU whatever the number of
# databases (each destination's steps are spaced to take a tenth of the time besides)
COMPACTION_WORKERS = 1
# the loop's default pool (asyncio.to_thread, aiofiles: a destination's file work), whose own
# default grows with the host's cores (up to 32 threads)
IO_WORKERS = 8
DEFAULT_SNAPSHOTS = 2
DEFAULT_UPLOADS = 16
DEFAULT_TICK = 1.0
JITTER = 0.2
FDS_PER_OPEN_DB = 13
"""Descriptors an open (unparked) database may hold besides its spool's lock: its SQLite
connections' database, ``-wal`` and ``-shm`` files (12 measured while it replicates: 5, 4 and 3)
and one for spool work. Every spool held, parked or open, holds one more (its lock)."""
# with databases waiting to open and more than half of the open budget in use, idle databases
# park after this many seconds
CROWDED_PARK_AFTER = 2.0
# timer backstops (e.g. a replica's) are stretched so that all of them together wake at most
# this often a second
BACKSTOP_RATE = 20.0
# the stat backstop looks at most this many databases a second whose changes file events report
# (a database without a file watch is looked at every monitor-interval, however many there are)
BACKSTOP_STATS = 100.0

# freed memory is handed back to the system this many seconds after a database closed (once for
# a burst of them)
TRIM_DELAY = 2.0


def signature(path: str) -> FilesSig:
    """(inode, size, mtime) of a database file and of its ``-wal`` (None for a missing one):
    it changes with every write (blocking)."""
    return files_sig(stat_or_none(path), stat_or_none(path + "-wal"))


def fd_budget() -> int:
    """The descriptors databases may hold: the descriptor limit (raised to its hard limit
    first), less a reserve for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, soft - 256)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (None elsewhere): it hands the freed parts of the heap back
    to the system, which glibc otherwise keeps (a closed SQLite connection's caches among
    them: without it a thousand parked databases hold hundreds of MiB they no longer use)."""
    trim = function("malloc_trim")
    if trim is None:
        return None
    return lambda: trim(0)


def jitter(seconds: float, spread: float = JITTER) -> float:
    """``seconds`` give or take ``spread`` of it, at random."""
    return seconds * random.uniform(1 - spread, 1 + spread)


class Runtime:
    """The shared resources of one process (one per :class:`~replicator.replicator.Replicator`;
    a database service made on its own gets a small one of its own)."""

    def __init__(self, workers: int = DEFAULT_WORKERS, snapshots: int = DEFAULT_SNAPSHOTS,
                 uploads: int = DEFAULT_UPLOADS) -> None:
        self.executor = Workers(workers, "replicator-worker")
        self.health = ThreadPoolExecutor(DEFAULT_HEALTH_WORKERS,
                                         thread_name_prefix="replicator-health",
                                         initializer=name_os_thread)
        """Health checks' pool: a long integrity check never holds a capture worker."""
        self.compaction = ThreadPoolExecutor(COMPACTION_WORKERS,
                                             thread_name_prefix="replicator-compact",
                                             initializer=name_os_thread)
        """Compaction's pool: a merge never waits for a capture worker nor holds one."""
        self.io = ThreadPoolExecutor(IO_WORKERS, thread_name_prefix="replicator-io",
                                     initializer=name_os_thread)
        """The loop's default pool once :meth:`adopt` ran (a destination's file work)."""
        self.events: FileEvents = file_events()
        self.snapshots = asyncio.Semaphore(snapshots)
        """Held while a snapshot is written (and while a database opens, which may take one)."""
        self.uploads = asyncio.Semaphore(uploads)
        """Held while a replica ships."""
        self.snapshot_limit = snapshots
        self.park_after: float | None = None
        """Idle databases of ``dir:`` entries close their files after this long (None: never)."""
        self.fds = fd_budget()
        """The descriptors databases may hold (see :meth:`room_to_open`)."""
        self.max_open = max(16, self.fds // (FDS_PER_OPEN_DB + 1))
        """Databases of ``dir:`` entries wait to open while this many are open (what the
        descriptors allow over what an open database holds)."""
        self.open_dbs = 0
        """Databases open now (not parked)."""
        self.claimed = 0
        """Spools held (:meth:`Spool.claim`: one descriptor each, a parked database's too)."""
        self.queued = 0
        """Databases of ``dir:`` entries waiting to open."""
        self.summary = ProcessSummary(lambda: self.claimed)
        """The periodic INFO line of what the databases shipped, when there are many."""
        self._watched: dict[str, tuple[asyncio.Event, float]] = {}
        self._sigs: dict[str, FilesSig] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (due, path), stale entries left in place
        self._min_interval = DEFAULT_TICK
        self._ticker: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._trim = _malloc_trim()
        self._trimming: asyncio.Task[None] | None = None

    def adopt(self) -> None:
        """Make :attr:`io` the running loop's default pool, so that the number of threads does
        not depend on the host's cores (it stays when this runtime closes: the loop shuts it
        down with itself)."""
        asyncio.get_running_loop().set_default_executor(self.io)

    def room_to_open(self) -> bool:
        """Whether a database of a ``dir:`` entry may open now: fewer than ``max_open`` are
        open, and the descriptors of those, with the lock of every spool held (parked or open),
        leave room for one more and its lock."""
        return (self.open_dbs < self.max_open
                and (self.open_dbs + 1) * FDS_PER_OPEN_DB + self.claimed + 1 <= self.fds)

    def park_delay(self, park_after: float) -> float:
        """How long an idle database waits before it parks: shorter while others wait to open
        and many are open (parking is cheap, but opening again costs a little: a database that
        pauses a few seconds between commits stays open while nothing waits)."""
        if self.queued and self.open_dbs * 2 >= self.max_open:
            return min(park_after, CROWDED_PARK_AFTER)
        return park_after

    def release_memory(self) -> None:
        """A database closed its connections: hand the memory they freed back to the system
        soon (one trim for all that close within ``TRIM_DELAY``; nothing where there is no
        glibc)."""
        if self._trim is None or (self._trimming is not None and not self._trimming.done()):
            return
        self._trimming = asyncio.ensure_future(self._trim_later(self._trim))

    async def _trim_later(self, trim: Callable[[], object]) -> None:
        await asyncio.sleep(TRIM_DELAY)
        await self.call(trim)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking ``fn(*args)`` on the pool."""
        return await self.executor.run(fn, *args)

    def backstop(self, seconds: float) -> float:
        """A jittered timer of about ``seconds``, longer when many databases have one."""
        return jitter(max(seconds, len(self._watched) / BACKSTOP_RATE))

    # ------------------------------------------------------------------ backstop ticker

    def watch(self, path: str, wake: asyncio.Event, interval: float,
              since: FilesSig | None = None) -> None:
        """Set ``wake`` within about ``interval`` seconds of any change to ``path`` or its
        ``-wal`` that no file event reported since ``since``, the files as the capture last
        found everything captured (see :meth:`looked`; a commit between that look and the
        watch has no file event). Without it the backstop's first look wakes the capture
        once: it cannot tell what changed before it."""
        self._watched[path] = (wake, interval)
        if since is not None:
            self._sigs[path] = since
        self._set_due(path, time.monotonic() + random.uniform(0, interval))
        self._min_interval = min(i for _, i in self._watched.values())
        if self._ticker is None or self._ticker.done():
            self._stop.clear()
            self._ticker = asyncio.ensure_future(self._tick_loop())

    def looked(self, path: str, sig: FilesSig) -> None:
        """The capture of ``path`` found everything captured with its files as ``sig``: the
        backstop wakes it for a change since then only (not for one it already captured)."""
        if path in self._watched:
            self._sigs[path] = sig

    def unwatch(self, path: str) -> None:
        """Stop the backstop for ``path``."""
        self._watched.pop(path, None)
        self._sigs.pop(path, None)
        self._due.pop(path, None)
        self._min_interval = min((i for _, i in self._watched.values()), default=DEFAULT_TICK)
        if len(self._heap) > 2 * len(self._due) + 64:
            self._heap = [(t, p) for p, t in self._due.items()]
            heapq.heapify(self._heap)

    def _set_due(self, path: str, at: float) -> None:
        self._due[path] = at
        heapq.heappush(self._heap, (at, path))

    def _take_due(self, now: float) -> list[str]:
        """The watched paths due by ``now`` (each once), oldest first."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            at, p = heapq.heappop(self._heap)
            if self._due.get(p) == at:  # not unwatched or rescheduled since
                due.append(p)
        return due

    def _changed(self, paths: list[str]) -> list[str]:
        """Which of ``paths`` (still watched) changed since they were last looked at, or may
        have: a path watched with no look known yet wakes its capture once (blocking)."""
        out = []
        for p in paths:
            if p not in self._watched:
                continue  # unwatched meanwhile: no need to look
            sig = signature(p)
            if self._sigs.get(p) != sig:
                out.append(p)
            self._sigs[p] = sig
        return out

    async def tick(self) -> int:
        """One backstop step: stat the databases that are due, wake those that changed;
        returns how many were woken."""
        now = time.monotonic()
        due = self._take_due(now)
        if not due:
            return 0
        spread = len(self._watched) / BACKSTOP_STATS
        for p in due:
            interval = self._watched[p][1]
            if self.events.watching(p):
                interval = max(interval, spread)
            self._set_due(p, now + jitter(interval, JITTER / 2))
        changed = await self.call(self._changed, due)
        for p in changed:
            entry = self._watched.get(p)
            if entry is not None:
                entry[0].set()
        return len(changed)

    async def _tick_loop(self) -> None:
        while self._watched and not self._stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(self._stop.wait(), min(self._min_interval, DEFAULT_TICK) / 2)
            except TimeoutError:
                pass

    async def aclose(self) -> None:
        """Stop the ticker and the watcher, then the pool (after its running jobs)."""
        self._stop.set()
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._trimming is not None:
            self._trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._trimming
        self.events.stop()
        self.health.shutdown(wait=False)  # a check in progress is interrupted by its checker
        # replicas wait for their compaction steps before they close
        await asyncio.get_running_loop().run_in_executor(None, self.compaction.shutdown, True)
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)
