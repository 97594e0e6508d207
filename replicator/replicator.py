"""The top-level service: owns the databases, their replicas and the metrics server.

``DatabaseService.sync()`` is the one-step capture that tests call directly; ``run()`` is the loop
around it (file events wake it, a timer is the backstop). Each replica ships in its own task, so a
slow or broken destination never holds up capture or the other destinations. The database's health
checks (if configured) run in a task of their own on their own read-only connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import __version__
from .affinity import allowed as allowed_cpus
from .aio import Lock, Outcome, Timed, Wake, bounded, relay, wait_event
from .compact import due_phase
from .config import Config, DbConfig
from .courier import Shipped
from .db import DEFAULT_TUNING, CaptureResult, Database, Tuning
from .drill import DRILL_ATTEMPTS, Driller, Point
from .errors import ReplicatorError, StorageError
from .fleet import Fleet
from .following import FOLLOW_BULK as FOLLOW_BULK
from .following import FOLLOW_POLL as FOLLOW_POLL
from .following import FOLLOW_POLL_BULK as FOLLOW_POLL_BULK
from .following import FOLLOW_QUIET as FOLLOW_QUIET
from .following import Follower
from .health import HealthChecker
from .maintenance import Maintainer, Skipped
from .metrics import Metrics, create_metrics
from .notices import NoticeThresholds, ReplicaNotices
from .notify import Notifier
from .pos import ObjectInfo
from .progress import FilesSig
from .pruning import PruneSchedule, keep_recent_ms, prune_spool
from .replica import DEFAULT_BACKSTOP, Replica
from .report import SUMMARY_EVERY as SUMMARY_EVERY
from .report import CaptureReport, iso, service_status
from .retry import Backoff, ErrorLog
from .runtime import Runtime
from .runtime import signature as runtime_sig
from .schedule import SnapshotSchedule
from .spool import Spool
from .storage.file import FileStorage
from .watcher import Watcher

log = logging.getLogger(__name__)
T = TypeVar("T")
# a capture that fails is retried after this backoff (it fails only when the database does)
CAPTURE_RETRY = Backoff(base=0.1, cap=10.0)
# how long a health check in progress may finish at shutdown before it is interrupted
HEALTH_STOP_GRACE = 2.0
# the spool is pruned at most this often (seconds)
PRUNE_EVERY = 1.0
# how often a wait for the destinations (sync --wait, drills) looks at their positions
SHIPPED_POLL = 0.05
# an idle database's loop looks whether a snapshot is due about this often (jittered)
IDLE_TIMER = 10.0
# a database of a dir: entry that has been idle this long, with every replica caught up, is
# parked: its connections and files are closed until its next change (see DatabaseService.park)
PARK_AFTER = 30.0
# a pin that may hold read mark 0 is released once the database has been idle this long (see
# Database.release_idle_pin): a paused or hung replicator then holds nothing the application's
# checkpoints wait on
RELEASE_PIN_AFTER = 2.0


def _before(held: int | None, txid: int) -> bool:
    """Whether a destination holding ``held`` (None: nothing) lacks ``txid``."""
    return held is None or held < txid


class DatabaseService:
    """One database with its replicas (and its health checks, if configured)."""

    # slots: past 29 attributes an instance's dictionary is no longer shared-key and costs
    # about 1.6 KB, not 0.4 (one per database, a thousand parked databases)
    __slots__ = (
        "_counted", "_errors", "_lock", "_looked", "_open", "_others_seen", "_own_runtime",
        "_parked_sig",
        "_release_tried", "_tasks", "_watcher", "cfg", "db", "driller", "follower",
        "following", "health", "last_capture", "last_commit", "maintainer", "metrics",
        "notices", "notifier", "park_after", "parked", "pruning", "replicas", "report",
        "runtime", "schedule", "spool", "tuning", "wake",
    )

    def __init__(
        self, cfg: DbConfig, metrics: Metrics | None = None, notifier: Notifier | None = None,
        runtime: Runtime | None = None, thresholds: NoticeThresholds | None = None,
        *, tuning: Tuning = DEFAULT_TUNING,
    ) -> None:
        self.cfg = cfg
        # the shared pool, watcher and limits (a small runtime of its own when made alone)
        self._own_runtime = runtime is None
        self.runtime = runtime if runtime is not None else Runtime(workers=1)
        self._lock = Lock()  # the database's blocking methods run one at a time
        self.metrics = metrics if metrics is not None else create_metrics()
        self.notifier = notifier
        self.spool = Spool(cfg.spool_dir)
        self._counted = False  # the spool held is counted in the runtime's ``claimed``
        self.tuning = tuning
        self.db = self._database()
        self.park_after: float | None = None
        """Park after this many idle seconds (None: never)."""
        self.parked = False
        self._parked_sig: object = None
        # (the loop's last change, the pin's number) when an idle pin release was last tried
        self._release_tried: tuple[float, int] | None = None
        self._open = False  # counted in the runtime's open databases
        self.wake = Wake()
        self._looked: FilesSig | None = None  # the files as the last step found all captured
        self._others_seen = 0  # the wake-up's count of non-file wake-ups at the last look
        self.pruning = PruneSchedule(self.prune_spool, PRUNE_EVERY, lambda: self.following)
        self.replicas = [
            Replica(rc.name, rc.open(), self.spool, cfg.name, self.metrics)
            for rc in cfg.replicas
        ]
        # compaction reads what a local directory destination holds rather than download it
        local = [r.client for r in self.replicas if isinstance(r.client, FileStorage)]
        for r, rc in zip(self.replicas, cfg.replicas, strict=True):
            r.on_shipped = self.pruning.soon
            r.on_needs_snapshot = self.wake.set
            r.retention = cfg.retention_policy(rc)
            r.sync_interval = rc.sync_interval
            r.limit = self.runtime.uploads
            r.set_levels(cfg.compaction_levels, local=local, executor=self.runtime.compaction,
                         phase=due_phase(cfg.path))
        self.health: HealthChecker | None = None
        if cfg.health:
            self.health = HealthChecker(cfg.path, cfg.health, metrics=self.metrics,
                                        notifier=notifier, db_label=cfg.name,
                                        executor=self.runtime.health)
        self.driller = Driller(self, notifier)
        self.maintainer = Maintainer(self, cfg.maintenance, notifier)
        self.last_commit = 0.0  # monotonic time of the last capture that found commits
        self.notices = None if notifier is None else ReplicaNotices(
            cfg.name, self.replicas, notifier, thresholds or NoticeThresholds())
        self._tasks: set[asyncio.Task[None]] = set()
        self.report = CaptureReport(cfg.name, self.metrics, self.replicas, self.runtime.summary)
        self.schedule = SnapshotSchedule(self)
        self._watcher: Watcher | None = None
        self._errors = ErrorLog(log)
        self.last_capture = 0.0
        self.following = False
        """Whether the loop follows a busy writer (commits keep coming, file events are off):
        housekeeping yields to the capture meanwhile (see :class:`replicator.retry.Deferral`)."""
        self.follower = Follower(self)

    def _database(self) -> Database:
        return Database(self.cfg.path, self.spool, name=self.cfg.name,
                        checkpoint_pages=self.cfg.checkpoint_pages, tuning=self.tuning,
                        own_spool=True)

    async def park(self) -> bool:
        """Close the database's connections and files while it is idle: only when everything
        is captured and every replica holds every spooled object. Its file watch and the
        runtime's backstop stay; :meth:`unpark` opens it again like a restart would (the WAL
        still holds the last captured frame: the generation goes on; otherwise a new one
        starts). Returns whether it parked."""
        if self.parked:
            return True
        for r in self.replicas:
            if not r.healthy or await r.pending(remote=False):
                return False
        # the files' signature before the look that shows everything captured, and before
        # the connections close: a commit after it (the application's checkpoint on closing
        # its last connection among them) makes the next signature differ
        sig = await self.call(self._idle_signature)
        if sig is None:
            return False  # a commit since the last step: captured first
        await self.call(self.db.close, False)
        self._parked_sig = sig
        if self.health is not None:
            self.health.close()  # its next check opens a connection again
        self.parked = True
        for r in self.replicas:
            r.quiet = True  # nothing reaches the spool until the database opens again
            r.wake.set()  # a round with nothing to ship, then no backstop timer
        self._mark_open(False)
        self.runtime.release_memory()
        log.debug("%s: parked at txid %d (idle, every replica caught up)", self.cfg.name,
                  self.db.txid)
        if await self._changed_since_parked():
            self.wake.set()  # written while it closed: the loop opens it again
        return True

    def _idle_signature(self) -> FilesSig | None:
        """The database's and its ``-wal``'s signature, if the wal-index read after it shows
        every committed frame captured (see :meth:`park`); else None (blocking)."""
        sig = runtime_sig(self.cfg.path)
        return sig if self.db.all_captured() else None

    async def _changed_since_parked(self) -> bool:
        return await self.runtime.call(runtime_sig, self.cfg.path) != self._parked_sig

    def _mark_open(self, is_open: bool) -> None:
        """Keep the runtime's count of open databases."""
        if is_open != self._open:
            self._open = is_open
            self.runtime.open_dbs += 1 if is_open else -1

    async def unpark(self) -> None:
        """Open a parked database again (a new :class:`Database`, resumed from the spool)."""
        if not self.parked:
            return
        db, old = self._database(), self.db
        await self.call(db.open, old)
        self._mark_open(True)
        db.watched_while_closed()
        db.last_snapshot_ns = max(db.last_snapshot_ns, old.last_snapshot_ns)
        db.last_snapshot_txid = max(db.last_snapshot_txid, old.last_snapshot_txid)
        self.db, self.parked = db, False
        for r in self.replicas:
            r.quiet = False

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking method of the database on the runtime's pool, one at a time."""
        async with self._lock:
            return await self.runtime.call(fn, *args)

    async def open(self) -> None:
        """Open the database and take its spool (errors are fatal: another process replicating
        the database among them) and check every replica (a failing replica is logged and
        retried; if every replica fails, that is fatal)."""
        try:
            await self.call(self.db.open)
        finally:
            if self.spool.claimed and not self._counted:
                self._counted = True  # held: counted against the descriptors
                self.runtime.claimed += 1
        async def check(r: Replica) -> str | None:
            try:
                await r.init()
            except StorageError as exc:
                r.record_error("init", exc)
                return str(exc)
            self.metrics.replica_up.labels(self.cfg.name, r.name).set(1)
            return None

        # concurrently: a slow or unreachable destination does not hold up the others
        results = await asyncio.gather(*(check(r) for r in self.replicas))
        failures = [f for f in results if f is not None]
        if failures and len(failures) == len(self.replicas):
            await self.call(self.db.close)
            for r in self.replicas:
                await r.aclose()
            raise ReplicatorError("; ".join(failures))
        self._mark_open(True)
        await self.sync()
        await self.schedule.recall_last()

    async def sync(self) -> CaptureResult:
        """Capture once, then wake the shippers if anything new was spooled."""
        started = time.monotonic()
        db, generation = self.db, self.db.generation
        lent: list[tuple[Replica, int]] = []
        shipped: list[list[Shipped] | None] = []
        try:
            for r in self.replicas:
                if (after := await r.lend(generation)) is not None:
                    lent.append((r, after))
            if not lent:
                res = await self.call(db.step)
            else:
                assert generation is not None  # lent only for a generation
                gen = generation

                def step() -> tuple[CaptureResult, list[list[Shipped] | None]]:
                    # the replicas' links in the step's own worker call (see Replica.lend)
                    res = db.step()
                    return res, [r.courier.link_now(res.objects, gen, after)
                                 for r, after in lent]

                res, shipped = await self.call(step)
        except BaseException:
            for r, _ in lent:
                r.linked(None)
            raise
        if res.looked is not None:
            self._looked = res.looked
            self.runtime.looked(self.cfg.path, res.looked)
        self.last_capture = time.time()
        self.follower.looked(res)
        if res.transactions:
            self.last_commit = time.monotonic()
        sizes = res.sizes
        self.report.captured(self.db, res, time.monotonic() - started, sizes)
        if res.new_generation and self.notices is not None and self.db.generation is not None:
            task = asyncio.ensure_future(
                self.notices.new_generation(self.db.generation, res.new_generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.schedule.captured(res, sizes[0])
        done = {r for (r, _), links in zip(lent, shipped, strict=True) if r.linked(links)}
        for r in self.replicas:
            if ((res.objects and r not in done)
                    or (r.source_behind and not res.more)):
                r.wake.set()
            r.source_behind = res.more
        return res

    def log_summary(self, now: float | None = None) -> str | None:
        """Log (at INFO) and return what each replica shipped since the last summary, if
        ``SUMMARY_EVERY`` seconds have passed and anything was shipped; else None."""
        return self.report.summary(now)

    async def snapshot_if_due(self) -> bool:
        """Take a snapshot if one is due (see ``SnapshotSchedule.if_due``)."""
        return await self.schedule.if_due()

    async def awake(self) -> None:
        """Open the database again if it is parked (an on-demand operation needs it)."""
        if self.parked:
            await self.unpark()

    async def snapshot_now(self) -> ObjectInfo:
        """Take a snapshot at once (``replicator snapshot``) and wake the shippers."""
        return await self.schedule.now()

    async def wait_shipped(self, generation: str, txid: int, within: float,
                           replicas: Sequence[Replica] | None = None) -> None:
        """Return once every destination (of ``replicas``, default all) holds ``txid`` of
        ``generation``; TimeoutError naming the ones that do not after ``within`` seconds."""
        deadline = time.monotonic() + within
        replicas = self.replicas if replicas is None else replicas
        while True:
            behind = [r for r in replicas if _before(r.holdings.newest_txid(generation), txid)]
            if not behind:
                return
            if time.monotonic() >= deadline:
                names = ", ".join(f"{r.name} ({r.last_error or 'behind'})" for r in behind)
                raise TimeoutError(f"txid {txid} not on every destination within "
                                   f"{within:g}s: {names}")
            for r in behind:
                r.hurry()
            await asyncio.sleep(SHIPPED_POLL)

    async def sync_wait(self, within: float, *, wait: bool = True) -> tuple[str, int]:
        """Capture everything committed so far and (``wait``) wait until every destination
        has it (``replicator sync --wait``); returns the generation and txid reached."""
        await self.awake()
        while (await self.sync()).more:
            pass
        gen, txid = self.db.generation, self.db.txid
        if gen is None:
            raise ReplicatorError(f"{self.cfg.name}: nothing captured yet")
        for r in self.replicas:
            r.hurry()
        if wait:
            await self.wait_shipped(gen, txid, within)
        return gen, txid

    async def checkpoint_truncate(self, within: float) -> str:
        """A TRUNCATE checkpoint (maintenance): capture everything, checkpoint with the pin
        released, capture again."""
        await self.awake()
        while (await self.sync()).more:
            pass
        busy, _, _ = await self.call(self.db.checkpoint_truncate, within)
        await self.sync()
        if busy:
            raise Skipped(f"readers kept the WAL busy for {within:g}s; the WAL was not truncated")
        return "WAL truncated"

    async def drill_point(self, sqls: list[str]) -> tuple[Point, list[list[tuple[Any, ...]]]]:
        """The content hash of the captured state, with the rows of ``sqls`` read at exactly
        that txid (captured again until the application is not committing at that moment)."""
        await self.awake()

        def take() -> tuple[Point, list[list[tuple[Any, ...]]]] | None:
            rows = self.db.read_captured(sqls) if sqls else []
            if rows is None:
                return None
            gen, txid, digest = self.db.content_hash()
            return Point(gen, txid, digest, time.time()), rows

        for _ in range(DRILL_ATTEMPTS):
            await self.sync()
            got = await self.call(take)
            if got is not None:
                return got
        raise ReplicatorError(f"{self.cfg.name}: the database never stopped changing long "
                              "enough to read it at the captured txid")

    async def prune_spool(self) -> int:
        """Drop spooled objects every replica has (see :mod:`replicator.pruning`); returns how
        many."""
        keep_ms = keep_recent_ms(self.replicas)

        def prune() -> int:
            return prune_spool(self.spool, self.db.keeper, self.replicas, keep_ms)

        dropped = await self.call(prune)
        # what the destinations are known to hold matters only for what is still spooled
        spooled = {gen: self.spool.objects(gen) for gen in self.spool.generations()}
        for r in self.replicas:
            r.holdings.trim(spooled)
        return dropped

    def _record_error(self, operation: str, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, ReplicatorError) else f"{type(exc).__name__}: {exc}"
        self.metrics.errors.labels(self.cfg.name, "", operation).inc()
        self._errors.error(msg, f"{self.cfg.name}: {operation} failed: ")

    async def run(self, stop: asyncio.Event) -> None:
        """Capture on every file event (or backstop wake-up) and ship, until ``stop`` is set.

        A change no file event reported is found by the runtime's backstop within about
        ``monitor-interval``; the loop's own jittered timer only looks whether a snapshot is due."""
        self._watcher = Watcher(self.cfg.path, self.wake, self.runtime.events)
        self._watcher.start()
        self.runtime.watch(self.cfg.path, self.wake, self.cfg.monitor_interval, self._looked)
        backstop = self.runtime.backstop(DEFAULT_BACKSTOP)
        shippers = [asyncio.create_task(r.run(stop, backstop)) for r in self.replicas]
        # timed chores hold a loop timer, not a task, while they wait (see Timed)
        checks = Timed(self.health.step).start() if self.health is not None else None
        drills = asyncio.create_task(self.driller.run(stop))
        upkeep = Timed(self.maintainer.step).start() if self.maintainer.tasks else None
        notices = asyncio.create_task(self.notices.run(stop)) if self.notices else None
        try:
            async with relay(stop, self.wake):
                await self._loop(stop, self._watcher)
        finally:
            for chore in (checks, upkeep):
                if chore is not None:
                    chore.halt()  # none starts while the replicas finish
            self.follower.close()
            self.runtime.unwatch(self.cfg.path)
            await asyncio.gather(*shippers, return_exceptions=True)
            drills.cancel()  # a drill in progress only reads: it may stop anywhere
            await asyncio.gather(drills, return_exceptions=True)
            if upkeep is not None:
                await upkeep.stop()  # a task in progress finishes
            if notices is not None:
                await asyncio.gather(notices, return_exceptions=True)
            if checks is not None:
                # a check in progress may finish (and notify); a long one is interrupted
                await checks.stop(HEALTH_STOP_GRACE)
            if self.health is not None:
                self.health.close()

    def _wait_for(self, watcher: Watcher, last_change: float) -> float | None:
        """How long the loop waits for a wake-up: a moment while it follows a busy writer, none
        while parked (only a change, which wakes it, gives it work), else until it is time to
        park or the backstop (which looks whether a snapshot is due)."""
        if watcher.paused:
            return self.follower.poll()
        if self.parked:
            return None
        timeout = self.runtime.backstop(IDLE_TIMER)
        release_at = self._release_at(last_change)
        if release_at is not None:
            timeout = min(timeout, max(0.05, release_at - time.monotonic()))
        if self.park_after is not None:
            park_at = last_change + self.runtime.park_delay(self.park_after)
            timeout = min(timeout, max(0.5, park_at - time.monotonic()))
        return timeout

    def _release_at(self, last_change: float) -> float | None:
        """When (``time.monotonic()``) to try releasing an idle pin; None if not to be tried
        (one try per change and per pin taken)."""
        if (self.parked or self._release_tried == (last_change, self.db.handles.pins)
                or not self.db.pin_releasable):
            return None
        return last_change + RELEASE_PIN_AFTER

    def seen_already(self, watcher: Watcher) -> bool:
        """Whether what set the wake-up is only file events that the last capture step already
        saw: handled before that step read the signature that showed everything captured (the
        change an event reports was made before it was handled). The file event of a commit's
        last frame often comes while the step that captures the commit runs; no step is then
        needed for it. Call once per wake-up (it notes the other wake-ups counted so far)."""
        fresh = self.wake.others != self._others_seen
        self._others_seen = self.wake.others
        return (not fresh and not watcher.paused and not self.parked
                and 0.0 < self.wake.file_at < self.db.settled_at)

    async def _loop(self, stop: asyncio.Event, watcher: Watcher) -> None:
        failures = 0
        last_change = time.monotonic()
        while not stop.is_set():
            if not self.wake.is_set():
                await wait_event(self.wake, self._wait_for(watcher, last_change))
            if stop.is_set():
                break
            woken = self.wake.is_set() or watcher.paused
            polled = not self.wake.is_set() and watcher.paused  # a look while following
            seen = woken and self.seen_already(watcher)
            self.wake.clear()
            try:
                wanted = any(r.needs_snapshot for r in self.replicas)
                if (woken and self.parked and not wanted
                        and not await self._changed_since_parked()):
                    continue  # its own closing, or a look at the files: nothing was written
                if woken and not seen:
                    if polled and not self.parked and self.db.unchanged():
                        # no commit since the last step: no step (a round trip to a worker)
                        res = CaptureResult()
                        self.follower.looked(res)
                    else:
                        await self.unpark()
                        res = await self.sync()
                    last_change = self.follower.captured(res, watcher, last_change)
                elif ((release_at := self._release_at(last_change)) is not None
                      and time.monotonic() >= release_at):
                    self._release_tried = (last_change, self.db.handles.pins)
                    await self.call(self.db.release_idle_pin)
                elif (self.park_after is not None and not self.parked and time.monotonic()
                      - last_change >= self.runtime.park_delay(self.park_after)):
                    await self.park()
                if self.parked and any(r.needs_snapshot for r in self.replicas):
                    await self.unpark()
                await self.snapshot_if_due()
                self.log_summary()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - logged, counted, retried
                self._record_error("capture", exc)
                failures += 1
                await wait_event(stop, CAPTURE_RETRY.delay(failures))

    async def close(self, grace: float, skip: asyncio.Event | None = None) -> None:
        """Final capture and ship within ``grace`` seconds (none once ``skip`` is set), then
        release everything (the spool last)."""
        if self._watcher is not None:
            self._watcher.stop()
        claimed = self.spool.claimed
        if claimed:
            # otherwise the spool was refused (another process replicates the database):
            # nothing was opened, and nothing of the spool is this process's to finish
            await self._final_sync(grace, skip)
            await self.pruning.stop()
            if self.health is not None:
                self.health.close()
            await self.call(self.db.close)
            self._mark_open(False)
        for r in self.replicas:
            await r.aclose()
        self.release_spool()
        if self._own_runtime:
            await self.runtime.aclose()
        else:
            self.runtime.release_memory()

    def release_spool(self) -> None:
        """Let go of the database's spool (after :meth:`close`, or an :meth:`open` that failed
        and is not followed by one); nothing if it is not held."""
        self.spool.release()
        if self._counted:
            self._counted = False
            self.runtime.claimed -= 1

    async def _final_sync(self, grace: float, skip: asyncio.Event | None) -> None:
        """Capture what is left and ship it everywhere, within ``grace`` seconds (none once
        ``skip`` is set); an error is logged and counted."""
        async def final() -> None:
            log.debug("%s: final sync", self.cfg.name)
            if self.parked and await self._changed_since_parked():
                await self.unpark()  # changed since it was parked, and no event said so yet
            while not self.parked and (await self.sync()).more:
                pass
            async def ship(r: Replica) -> None:
                try:
                    await r.sync()
                except Exception as exc:  # noqa: BLE001 - counted and logged per replica
                    r.record_error("sync", exc)

            # concurrently: a destination that is down cannot use up the others' time budget
            await asyncio.gather(*(ship(r) for r in self.replicas))
            await self.pruning.stop()
            await self.prune_spool()
            self.runtime.summary.stopped(self.cfg.name, self.db.txid)

        try:
            outcome = await bounded(final(), grace, skip)
            if outcome is Outcome.SKIPPED:
                log.warning("%s: final sync skipped", self.cfg.name)
            elif outcome is Outcome.LATE:
                log.error("%s: final sync did not finish within %.1fs", self.cfg.name, grace)
        except Exception as exc:  # noqa: BLE001 - shutdown goes on; the error is logged
            self._record_error("final sync", exc)

    def status(self) -> dict[str, Any]:
        """The database's state for ``/status`` (call from the event loop)."""
        return service_status(self)


class Replicator:
    """Every configured database, replicated until stopped."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else create_metrics()
        self.metrics.build_info.info({
            "version": __version__,
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
        })
        channels = config.notify.channels
        self.notifier = Notifier(channels, metrics=self.metrics,
                                 min_interval=config.notify.min_interval) if channels else None
        self.runtime = Runtime()
        self.runtime.park_after = PARK_AFTER
        thresholds = config.notify.thresholds
        self.services = [DatabaseService(d, self.metrics, self.notifier, self.runtime,
                                         thresholds) for d in config.held()]
        self.fleet = Fleet(config.dirs, self.runtime, self.metrics,
                           lambda d: DatabaseService(d, self.metrics, self.notifier, self.runtime,
                                                     thresholds), config.shard)
        self.started = time.time()

    def service(self, name: str | None) -> DatabaseService | None:
        """The database named ``name`` (its name or path; None: the only one, if just one)."""
        services = self.all_services()
        if name is None:
            return services[0] if len(services) == 1 else None
        for s in services:
            if name in (s.cfg.name, s.cfg.path) or os.path.abspath(name) == s.cfg.path:
                return s
        return None

    def all_services(self) -> list[DatabaseService]:
        """The listed databases' services, then those of ``dir:`` entries running now."""
        return self.services + list(self.fleet.services.values())

    def status(self) -> dict[str, Any]:
        """Every database's state for ``/status`` (call from the event loop)."""
        doc: dict[str, Any] = {"version": __version__, "started": iso(self.started),
                               "dbs": [s.status() for s in self.all_services()]}
        cpus = allowed_cpus()
        if cpus is not None:
            doc["cpus"] = sorted(cpus)  # what the event loop's thread may run on
        if self.config.shard is not None:
            doc["shard"] = str(self.config.shard)
        if self.config.dirs:
            doc["databases"] = self.fleet.status()
        return doc

    async def open(self) -> None:
        """Open every listed database; on failure close what was opened and re-raise. (The
        databases of ``dir:`` entries open in the background once :meth:`run` starts.)"""
        self.runtime.adopt()
        opened: list[DatabaseService] = []
        try:
            for s in self.services:
                try:
                    await s.open()
                except BaseException:
                    s.release_spool()
                    raise
                opened.append(s)
        except BaseException:
            for s in opened:
                await s.close(1.0)
            await self.runtime.aclose()
            raise

    async def run(self, stop: asyncio.Event, skip_final_sync: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set, then shut down gracefully (without the final sync once
        ``skip_final_sync`` is set)."""
        from .server import start_control_socket

        self.runtime.adopt()
        sockets = []
        for s in self.services:
            try:
                sockets.append(start_control_socket(asyncio.get_running_loop(), self, s))
            except ReplicatorError as exc:
                log.warning("%s: no on-demand control: %s", s.cfg.name, exc)
        grace = self.config.shutdown_timeout
        try:
            await self.fleet.start()
            await asyncio.gather(*(s.run(stop) for s in self.services), stop.wait())
        finally:
            for sock in sockets:
                sock.close()
            self.runtime.summary.stopping()
            await asyncio.gather(
                self.fleet.aclose(grace, skip_final_sync),
                *(s.close(grace, skip_final_sync) for s in self.services),
                return_exceptions=True,
            )
            self.runtime.summary.stopped_all()
            await self.runtime.aclose()
