"""Scheduled maintenance of a replicated database: ``PRAGMA optimize``, a ``TRUNCATE``
checkpoint and ``VACUUM``.

* **optimize** (on by default, every 24 h): ``PRAGMA optimize`` first asked what it would do, on
  a read-only connection (no lock a writer needs). By default stale statistics are only
  reported (the run is ``skipped`` with the ``ANALYZE`` statements in its reason): the
  replicator takes no write lock the configuration did not ask for. When ``optimize`` is set in
  the configuration, it wants to ``ANALYZE`` something, and the database has seen no commit for
  :data:`QUIET` seconds, it runs that with ``analysis_limit`` (milliseconds of work) on a
  connection that never waits for the write lock: when the application holds it, the run is
  skipped with the reason logged. Like any write, those milliseconds would make a writer with
  no busy timeout at all that starts in exactly that moment see ``SQLITE_BUSY``; a busy timeout
  of a few milliseconds absorbs it.
* **checkpoint** (off by default; ``mode: truncate``): a blocking operation by nature. The
  replicator captures everything, lets go of its read transaction and runs ``PRAGMA
  wal_checkpoint(TRUNCATE)``, which holds the write lock while it waits up to ``timeout`` for
  the application's readers. The next capture writes a catch-up in the same generation (the
  pages that differ from the captured state: none, as everything was captured first).
* **vacuum** (off by default): ``VACUUM`` holds the write lock for its whole run, so it is
  skipped with a logged reason when the database is larger than ``max-size`` or the application
  committed within the last :data:`QUIET` seconds or holds the write lock; it is interrupted
  (and rolled back) after ``max-duration``. It is captured like any transaction, and a snapshot
  follows at once.

``when`` is ``"HH:MM"`` (every day) or ``"Sun HH:MM"`` (every week), in UTC. :class:`Maintainer`
runs them: :meth:`Maintainer.run_due` is one step at a given time (tests pass the time),
:meth:`Maintainer.run` the loop. Each task sets ``replicator_maintenance_last_run_timestamp_
seconds`` and ``..._duration_seconds`` and counts its runs by result (ok, skipped, failed); a
failure is sent to ``notify`` (check ``maintenance:TASK``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .aio import wait_event
from .errors import ConfigError
from .notify import FAILING, RECOVERED, Notifier

if TYPE_CHECKING:
    from .replicator import DatabaseService

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZE_INTERVAL = 24 * 3600.0
DEFAULT_CHECKPOINT_TIMEOUT = 10.0
DEFAULT_VACUUM_MAX_DURATION = 60.0
QUIET = 5.0
"""Seconds without a commit before a task that writes may start."""
ANALYSIS_LIMIT = 400
TASKS = ("optimize", "checkpoint", "vacuum")
RESULTS = ("ok", "skipped", "failed")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WHEN_RE = re.compile(r"^(?:([A-Za-z]{3})\s+)?(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class When:
    """A time of day (UTC), every day or on one weekday (0 = Monday)."""

    hour: int
    minute: int
    weekday: int | None = None

    def next_after(self, t: float) -> float:
        """The first such moment strictly after ``t`` (unix seconds)."""
        now = dt.datetime.fromtimestamp(t, tz=dt.UTC)
        at = now.replace(hour=self.hour, minute=self.minute, second=0, microsecond=0)
        while at.timestamp() <= t or (self.weekday is not None and at.weekday() != self.weekday):
            at += dt.timedelta(days=1)
        return at.timestamp()


def parse_when(value: object, where: str) -> When:
    """``"03:00"`` or ``"Sun 03:30"`` (UTC)."""
    m = _WHEN_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None or int(m[2]) > 23 or int(m[3]) > 59 or (
        m[1] is not None and m[1].lower() not in _DAYS
    ):
        raise ConfigError(f"{where}: expected HH:MM or a weekday and HH:MM like 'Sun 03:00' "
                          f"(UTC), got {value!r}")
    return When(int(m[2]), int(m[3]), None if m[1] is None else _DAYS.index(m[1].lower()))


@dataclass(frozen=True)
class MaintenanceConfig:
    """``maintenance:`` of one database; None: the task is off."""

    optimize: float | None = DEFAULT_OPTIMIZE_INTERVAL
    optimize_analyze: bool = False
    """Whether ``optimize`` may run the ``ANALYZE`` it finds wanting (a write: only when the
    configuration sets ``optimize`` itself); by default stale statistics are only reported."""
    checkpoint: When | None = None
    checkpoint_timeout: float = DEFAULT_CHECKPOINT_TIMEOUT
    vacuum: When | None = None
    vacuum_max_size: int | None = None
    vacuum_max_duration: float = DEFAULT_VACUUM_MAX_DURATION


class Skipped(Exception):
    """A task did not run, for the reason given."""


def _stale_statistics(path: str) -> list[str]:
    """The ``ANALYZE`` statements ``PRAGMA optimize`` would run, asked on a read-only
    connection. It only considers tables the connection queried through an index, so each
    index is probed once first (``WHERE col IS NULL LIMIT 1``: a b-tree descent)."""
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        ro.execute("PRAGMA query_only = ON")
        indexes = ro.execute("SELECT tbl_name, name FROM sqlite_schema WHERE type = 'index'"
                             ).fetchall()
        for table, index in indexes:
            info = ro.execute("SELECT name FROM pragma_index_info(?)", (index,)).fetchone()
            if info is not None and info[0] is not None:
                ro.execute(f'SELECT 1 FROM "{_quote(table)}" WHERE "{_quote(info[0])}" IS NULL '
                           "LIMIT 1").fetchall()
        # 0x01: only report; 0x02: ANALYZE where it helps; 0x10000: every table (3.46+)
        return [str(r[0]) for r in ro.execute("PRAGMA optimize(0x10003)").fetchall()]
    finally:
        ro.close()


def _quote(name: str) -> str:
    return name.replace('"', '""')


def _optimize(path: str, quiet: bool, analyze: bool) -> str:
    """``PRAGMA optimize``: asked read-only first; its ``ANALYZE`` statements run only when the
    configuration asks for them (``analyze``) and the database is quiet, limited, and never
    waiting for the write lock."""
    wanted = _stale_statistics(path)
    if not wanted:
        return "statistics are up to date"
    if not analyze:
        raise Skipped(f"statistics are stale ({'; '.join(wanted)}); ANALYZE takes the write "
                      "lock, so it runs only when maintenance.optimize is set in the config")
    if not quiet:
        raise Skipped("the application committed within the last few seconds")
    rw = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        rw.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
        for statement in wanted:
            rw.execute(statement)
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
            raise Skipped("the application holds the write lock") from None
        raise
    finally:
        rw.close()
    return "; ".join(wanted)


def _vacuum(path: str, max_size: int | None, max_duration: float, quiet: bool) -> str:
    size = os.path.getsize(path)
    if max_size is not None and size > max_size:
        raise Skipped(f"the database ({size} bytes) is larger than max-size ({max_size})")
    if not quiet:
        raise Skipped("the application committed within the last few seconds")
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    deadline = time.monotonic() + max_duration
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        before = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute("VACUUM")
        after = conn.execute("PRAGMA page_count").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:
            raise Skipped("the application holds the write lock") from None
        if time.monotonic() > deadline:
            raise Skipped(f"interrupted after max-duration ({max_duration:g}s)") from None
        raise
    finally:
        conn.close()
    return f"{before} -> {after} pages"


@dataclass
class _Task:
    name: str
    next_at: float
    failing: bool = False
    last: str = ""
    results: dict[str, int] = field(default_factory=dict)


class Maintainer:
    """Runs one database's maintenance tasks when they fall due."""

    def __init__(self, service: DatabaseService, cfg: MaintenanceConfig,
                 notifier: Notifier | None = None, now: float | None = None) -> None:
        self.service = service
        self.cfg = cfg
        self.notifier = notifier
        t = time.time() if now is None else now
        self.tasks: dict[str, _Task] = {}
        if cfg.optimize is not None:
            self.tasks["optimize"] = _Task("optimize", t + min(cfg.optimize, 3600.0))
        if cfg.checkpoint is not None:
            self.tasks["checkpoint"] = _Task("checkpoint", cfg.checkpoint.next_after(t))
        if cfg.vacuum is not None:
            self.tasks["vacuum"] = _Task("vacuum", cfg.vacuum.next_after(t))
        for task in self.tasks:  # each configured task's runs count from 0
            for result in RESULTS:
                service.metrics.maintenance_runs.labels(service.cfg.name, task, result)

    def next_due(self) -> float:
        """The earliest time a task is due (inf: none configured)."""
        return min((task.next_at for task in self.tasks.values()), default=math.inf)

    def _reschedule(self, task: _Task, now: float) -> None:
        if task.name == "optimize":
            assert self.cfg.optimize is not None
            task.next_at = now + self.cfg.optimize
        else:
            when = self.cfg.checkpoint if task.name == "checkpoint" else self.cfg.vacuum
            assert when is not None
            task.next_at = when.next_after(now)

    async def _run(self, name: str, quiet: bool) -> str:
        s = self.service
        if name == "optimize":
            return await asyncio.to_thread(_optimize, s.cfg.path, quiet,
                                           self.cfg.optimize_analyze)
        if name == "checkpoint":
            return await s.checkpoint_truncate(self.cfg.checkpoint_timeout)
        result = await asyncio.to_thread(_vacuum, s.cfg.path, self.cfg.vacuum_max_size,
                                         self.cfg.vacuum_max_duration, quiet)
        await s.snapshot_now()  # the rewritten database is captured; a snapshot follows it
        return result

    async def run_due(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Run every task due at ``now``; ``(task, result, detail)`` for each."""
        t = time.time() if now is None else now
        # before the round: the tasks' own writes (ANALYZE, VACUUM) are not the application's
        quiet = time.monotonic() - self.service.last_commit >= QUIET
        out = []
        for task in self.tasks.values():
            if task.next_at > t:
                continue
            started = time.monotonic()
            try:
                detail = await self._run(task.name, quiet)
                result = "ok"
            except Skipped as exc:
                result, detail = "skipped", str(exc)
            except Exception as exc:  # noqa: BLE001 - reported, counted, notified
                result, detail = "failed", f"{type(exc).__name__}: {exc}"
            self._reschedule(task, t)
            await self._record(task, result, detail, t, time.monotonic() - started)
            out.append((task.name, result, detail))
        return out

    async def _record(self, task: _Task, result: str, detail: str, now: float,
                      duration: float) -> None:
        name, m = self.service.cfg.name, self.service.metrics
        m.maintenance_runs.labels(name, task.name, result).inc()
        m.maintenance_last_run.labels(name, task.name).set(now)
        m.maintenance_duration.labels(name, task.name).set(duration)
        level = logging.ERROR if result == "failed" else logging.INFO
        log.log(level, "%s: maintenance %s %s: %s", name, task.name, result, detail)
        failing = result == "failed"
        if self.notifier is not None and failing != task.failing:
            await self.notifier.notify(name, f"maintenance:{task.name}",
                                       FAILING if failing else RECOVERED, detail, now=now)
        task.failing = failing

    async def step(self) -> float:
        """Run the tasks that are due (:meth:`run_due`) and return how many seconds to wait
        before the next step (``math.inf``: no task is configured). The wait is at most an hour:
        the tasks are due at wall-clock times, and the clock may be set meanwhile."""
        if not self.tasks:
            return math.inf
        if self.next_due() <= time.time():
            await self.run_due()
        return min(self.next_due() - time.time(), 3600.0)

    async def run(self, stop: asyncio.Event) -> None:
        """Run tasks as they fall due (:meth:`step`) until ``stop`` is set."""
        while not stop.is_set() and self.tasks:
            await wait_event(stop, await self.step())
