"""One destination of one database: its position, the one-step ``sync()`` that copies what the
spool has and the destination lacks, and ``run()``, the loop around it with backoff.

Each replica holds the lease of its replica path (:mod:`replicator.lease`): ``init()`` claims it,
``sync()`` verifies it at most once per renew interval while it has something to ship (never when
idle), and a replica whose lease was taken over stops shipping for good, leaving the spool intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor

from . import batch
from .aio import Background, Flag, Lock, relay, wait_event
from .compact import DEFAULT_DELETE_GRACE, Compactor, CompactResult
from .courier import Courier, Shipped
from .errors import ReplicatorError
from .holdings import Holdings, covered
from .lease import RELEASE_TIMEOUT, Lease, LeaseError, LeaseLostError
from .logs import RateLimit
from .metrics import Metrics
from .pos import ObjectInfo
from .retention import RetentionPlan, RetentionPolicy, apply_plan, plan_retention
from .retry import Backoff, Deferral, ErrorLog
from .spool import Spool
from .storage.base import StorageClient
from .storage.file import FileStorage
from .threads import off_loop

log = logging.getLogger(__name__)

# a destination that is back is retried within about RETRY.cap seconds
RETRY = Backoff(base=0.25, cap=1.0)
DEFAULT_BACKSTOP = 5.0
DEBUG_EVERY = 1.0  # per-round debug lines, at most this often (a busy database ships every ms)
DELETE_AT_EXIT = 10.0  # seconds a clean shutdown spends deleting objects merges replaced
COMPACT_DUTY = 0.1
"""Compaction aims at this fraction of the time: after a step that took d seconds the next
waits (1 / duty - 1) * d, but never longer than COMPACT_SPACING or the first level's window,
whichever is longer. Under a flat-out writer a merge rewrites every byte the capture just wrote;
spaced out, it takes little of the application's CPU (the windows it has not merged yet wait,
whole, for the next step). The cap keeps a slow step from spacing the next ones ever further
apart: objects would pile up faster than the steps merge them, and each step would take longer
still. It is not the first level's window alone: a 1 s level would let steps take half the
time under a flat-out writer, and the capture fall behind."""
COMPACT_SPACING = 10.0  # seconds: the longest wait COMPACT_DUTY puts between two steps


class ReplicaSeries:
    """The metric series of one destination of one database (none without metrics)."""

    def __init__(self, metrics: Metrics | None, db_name: str, name: str) -> None:
        self.metrics = metrics
        self.labels = (db_name, name)

    def up(self, up: int) -> None:
        """Whether the last operation on the destination succeeded (1) or not (0)."""
        if self.metrics is not None:
            self.metrics.replica_up.labels(*self.labels).set(up)

    def synced(self, at: float) -> None:
        """A sync went through at ``at``: the destination is up."""
        if self.metrics is not None:
            self.metrics.replica_last_sync_timestamp.labels(*self.labels).set(at)
            self.metrics.replica_up.labels(*self.labels).set(1)

    def lag_since(self, since: float | None) -> None:
        """The oldest commit the destination lacks was observed at ``since`` (None: it lacks
        none); the gauge shows its age at each scrape."""
        if self.metrics is not None:
            self.metrics.replica_lag_seconds.labels(*self.labels).since(since)

    def error(self, operation: str) -> None:
        """Count a failed ``operation``."""
        if self.metrics is not None:
            self.metrics.errors.labels(*self.labels, operation).inc()

    def shipped(self, info: ObjectInfo, size: int, frames: int, done: float) -> None:
        """One object of ``size`` bytes holding ``frames`` WAL frames, durable at ``done``."""
        if self.metrics is None:
            return
        self.metrics.replica_shipped_bytes.labels(*self.labels).inc(size)
        if info.kind == "wal":
            n = info.end_txid - info.start_txid + 1
            self.metrics.replica_shipped_transactions.labels(*self.labels).inc(n)
            self.metrics.replica_shipped_frames.labels(*self.labels).inc(frames)
            self.metrics.replica_commit_to_durable_seconds.labels(*self.labels).observe(
                max(0.0, done - info.first_ms / 1000)
            )

    def compacted(self, res: CompactResult) -> None:
        """Merges by level, and what the destination holds after a compaction step."""
        if self.metrics is None:
            return
        for level, n in res.levels.items():
            self.metrics.compactions.labels(*self.labels, str(level)).inc(n)
        self.metrics.replica_objects.labels(*self.labels).set(res.objects)
        self.metrics.replica_bytes.labels(*self.labels).set(res.bytes)

    def inventory(self, plan: RetentionPlan) -> None:
        """Objects, bytes and the oldest restorable time the destination holds after ``plan``."""
        if self.metrics is None:
            return
        self.metrics.replica_objects.labels(*self.labels).set(len(plan.keep))
        self.metrics.replica_bytes.labels(*self.labels).set(sum(o.size for o in plan.keep))
        self.metrics.replica_oldest_restorable.labels(*self.labels).set(plan.oldest_ms / 1000)


class Replica:
    """Ships spooled objects to one storage client."""

    # slots: past 29 attributes an instance's dictionary is no longer shared-key and costs
    # about 1.6 KB, not 0.4 (one per database, a thousand parked databases)
    __slots__ = (
        "_behind_since", "_bulk", "_busy", "_compact_after", "_compacting", "_errors", "_feed",
        "_hurried", "_lacking", "_maintenance", "_relist", "_retain_again", "_retaining",
        "_round", "_round_at", "batch", "client", "compactor", "courier", "db_name",
        "failing_since", "fenced", "healthy", "holdings", "last_error", "last_sync", "lease",
        "limit", "name",
        "needs_snapshot", "on_needs_snapshot", "on_shipped", "quiet", "retention", "series",
        "shipped_bytes", "shipped_transactions", "source_behind", "source_bulk", "source_busy",
        "spool", "sync_interval", "wake",
    )

    def __init__(
        self,
        name: str,
        client: StorageClient,
        spool: Spool,
        db_name: str,
        metrics: Metrics | None = None,
        *,
        batch: bool | None = None,
    ) -> None:
        self.name = name
        # ship runs of consecutive segments as one object (None: for every destination that
        # cannot link the spooled files themselves)
        self.batch = not client.can_link if batch is None else batch
        self.client = client
        self.spool = spool
        self.db_name = db_name
        self.series = ReplicaSeries(metrics, db_name, name)
        self.wake = Flag()
        self.holdings = Holdings()
        self._behind_since: float | None = None  # observed time (s) of the oldest commit lacked
        self.last_sync = 0.0
        self.last_error: str | None = None
        self.needs_snapshot = False
        self.healthy = False
        self._errors = ErrorLog(log)
        self.failing_since = 0.0  # wall-clock time of the first error since the last success
        self.on_shipped: Callable[[], None] | None = None
        self.on_needs_snapshot: Callable[[], None] | None = None
        self.retention: RetentionPolicy | None = None
        self._relist = False
        self._feed = spool.follow()
        self._lacking: list[ObjectInfo] | None = None  # as last found (None: walk the spool)
        self.lease = Lease(client, db_name)
        self.fenced: str | None = None  # why shipping stopped for good (lease taken over)
        self.shipped_transactions = 0  # since start, for the periodic log summary
        self.shipped_bytes = 0
        self.courier = Courier(client, spool, f"{db_name}: replica {name}",
                               RateLimit(DEBUG_EVERY), count_frames=metrics is not None)
        self.limit: asyncio.Semaphore | None = None
        """Shared by the replicas of many databases: held while uploading (``run()``) and
        compacting. Not while linking spooled files into a local destination: that costs a
        rename and a directory fsync an object, bounded by the threads that do it, and a
        thousand databases committing would otherwise queue behind each other."""
        self.quiet = False
        """Nothing can reach the spool without a wake-up (the database is parked): ``run()``
        then has no backstop timer, only the closing of compaction windows."""
        self.compactor: Compactor | None = None
        # compaction runs beside shipping (a long merge must not hold up new objects), never
        # beside retention: both delete objects
        self._compacting = Background()
        # the capture is behind a writer faster than it: compaction (which rewrites what was
        # shipped) waits until it caught up rather than take the CPU it needs
        self.source_behind = False
        # the capture follows a busy writer: a compaction step put off until the writer pauses
        # (at most one first-level window) takes neither its CPU nor its disk
        self.source_busy = False
        # ... and it writes in bulk (see :mod:`replicator.following`): a compaction step waits
        # up to COMPACT_SPACING rather than one first-level window, since each would rewrite
        # that much WAL while the capture needs the CPU and the disk
        self.source_bulk = False
        self._busy = Deferral(0.0)
        self._bulk = Deferral(0.0)
        self._retaining = Background()
        self._retain_again = False
        self._compact_after = 0.0  # monotonic time before which no compaction step starts
        self._maintenance = Lock()
        self.sync_interval = 0.0
        """Seconds between the starts of two rounds of ``run()`` while the destination is up
        (0: a round as soon as something new is spooled). What is spooled meanwhile goes in the
        next round: to a remote destination as one object per first compaction window, so a
        busy database costs about one upload a window, not one per round trip."""
        self._round_at = -math.inf  # monotonic start of run()'s last round
        # held by a round of sync(), or lent to a capture step (see lend())
        self._round = Lock()
        self._hurried = False

    def set_levels(self, levels: Iterable[float], grace: float = DEFAULT_DELETE_GRACE, *,
                   local: Sequence[FileStorage] = (), executor: Executor | None = None,
                   phase: float = 0.0) -> None:
        """Compact this destination on these levels (seconds, shortest first; none: never),
        deleting what a merge replaced ``grace`` seconds after it, reading what the spool and
        the directories ``local`` hold rather than downloading it, its blocking work on
        ``executor``, its merges ``phase`` of the way into their spread after a window closes
        (see :class:`~replicator.compact.Compactor` and :class:`~replicator.compact.DueTimes`)."""
        levels = tuple(levels)
        self.compactor = Compactor(self.client, self.spool, levels, grace, local=local,
                                   executor=executor, phase=phase) if levels else None
        if self.compactor is not None:
            self.compactor.yield_to = lambda: self.source_behind
        self._busy = Deferral(levels[0] if levels else 0.0)
        self._bulk = Deferral(max(COMPACT_SPACING, levels[0]) if levels else 0.0)

    async def compact(self, now: float | None = None) -> CompactResult | None:
        """One compaction step (see :mod:`replicator.compact`) with windows closed at ``now``
        (default: the wall clock); None when this destination does not compact or is fenced."""
        if self.compactor is None or self.fenced is not None:
            return None
        if not await self._check_lease():
            return None
        async with self._maintenance:
            res = await self.compactor.step(now)
        for info in res.written:
            self.holdings.remember(info.generation, [info.key])
        self.series.compacted(res)
        return res

    async def compact_if_due(self) -> None:
        """Compact when a window holding shipped objects has closed (or replaced objects are
        due for deletion); a failure is counted, logged and retried a level later, and never
        stops shipping."""
        if self.compactor is None or not self.compactor.levels:
            return
        now = time.time()
        if not self.compactor.due.take(now):
            return
        try:
            res = await self.compact()
            if res is not None and res.cut_short:
                self.compactor.due.at(now + self.compactor.levels[0])  # the rest, later
        except Exception as exc:  # noqa: BLE001 - retried later
            self._log_error("compact", exc)
            self.compactor.due.at(now + self.compactor.levels[0])
        if self.compactor.pending_deletes():
            self.compactor.due.at(now + self.compactor.grace)

    @property
    def lag(self) -> float:
        """The age now of the oldest commit this destination lacks, as last seen (0: none):
        it grows between rounds (a destination paced by :attr:`sync_interval`, or failing),
        as seen by ``/status``, ``/readyz`` and the notices."""
        since = self._behind_since
        return 0.0 if since is None else max(0.0, time.time() - since)

    @lag.setter
    def lag(self, seconds: float) -> None:
        """Lacking a commit observed ``seconds`` ago (0: none)."""
        self._behind_since = time.time() - seconds if seconds > 0 else None

    def _lacks(self, oldest: ObjectInfo | None) -> None:
        """``oldest`` is the oldest object the destination lacks (None: it lacks none): record
        it and set the lag gauge from it."""
        self._behind_since = oldest.first_ms / 1000 if oldest is not None else None
        self.series.lag_since(self._behind_since)

    @property
    def url(self) -> str:
        """The destination as shown to people."""
        return self.client.url

    async def init(self) -> None:
        """Check the destination is usable and claim its lease (StorageError if it is not usable
        or another process ships there)."""
        await self.client.init()
        try:
            await self.lease.claim()
        except LeaseLostError as exc:
            self._fence(exc)
            raise
        self.healthy = True
        self.failing_since = 0.0
        self.series.up(1)

    def _fence(self, exc: LeaseLostError) -> None:
        """Stop shipping for good: another process owns the replica path now."""
        self.fenced = str(exc)
        self.record_error("lease", exc)

    async def _check_lease(self) -> bool:
        """Verify the lease if due; False (and fenced) if it was taken over."""
        if self.lease.due():
            try:
                await self.lease.renew()
            except LeaseLostError as exc:
                self._fence(exc)
                return False
        return True

    async def aclose(self) -> None:
        """Release the lease (clean shutdown; bounded wait) and close the client."""
        if self.lease.held and self.healthy and self.fenced is None:
            try:
                await asyncio.wait_for(self.lease.release(), RELEASE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a lease left behind expires on its own
                log.warning("%s: replica %s: could not release the lease: %s", self.db_name,
                            self.name, exc)
        # whatever the record says, this process no longer ships here: a service opened again
        # for the same database (a tenant's file that comes back) may take it over at once
        self.lease.forget()
        self.spool.unfollow(self._feed)
        await self.client.aclose()

    async def pending(self, remote: bool = True) -> list[ObjectInfo]:
        """Spooled objects this destination does not have yet, in shipping order. With
        ``remote=False`` nothing is asked of the destination (what it holds is as last known).

        What it lacked last time is kept, with what the spool wrote since (its feed), so that
        this looks at every spooled object only the first time, after a relisting, and when
        the feed cannot say (see :meth:`Spool.take`)."""
        if remote and self._relist:
            self.holdings.clear()
            self._relist = False
            self._lacking = None
        objs = None
        if self._lacking is not None:
            objs = self.spool.take(self._feed, self._lacking)
        if objs is None:
            self.spool.restart(self._feed)  # the walk below sees what it held
            # the spool's index is in memory once read: no thread needed for it then
            objs = (self.spool.all_objects() if self.spool.indexed
                    else await off_loop(self.spool.all_objects))
        for gen in sorted({o.generation for o in objs}):
            if gen not in self.holdings.keys and remote:
                have = await self.client.objects(gen)
                spooled = self.spool.objects(gen)
                self.holdings.remember(gen, [o.key for o in have] + sorted(covered(spooled,
                                                                                   have)))
        lacking = [o for o in objs if not self.holdings.holds(o)]
        self._lacking = lacking
        return list(lacking)

    async def sync(self, *, beside: bool = False) -> int:
        """Copy every missing spooled object, oldest first; return how many were written.

        A replica marked down (a failed init or sync) is initialised again first, so a final sync
        at shutdown follows the same steps as the loop. Nothing is written (0 is returned) once
        the replica is fenced. After a snapshot was shipped the retention policy is applied:
        before returning, or (``beside``) in a task of its own, so that the next objects need
        not wait for its listing (nor for a compaction step that holds the destination)."""
        if self.fenced is not None:
            return 0
        async with self._round:
            return await self._sync(beside)

    async def _sync(self, beside: bool) -> int:
        if not self.healthy:
            await self.init()
        missing = await self._missing()
        # a remote destination pays per request: consecutive segments go as one object
        levels = self.compactor.levels if self.compactor is not None else ()
        groups = await self.courier.plan(missing, self.batch, levels[0] if levels else None)
        width = self.courier.width(self.batch)
        written = 0
        snapshot_shipped = False
        # each round completes before the next starts
        for first in range(0, len(groups), width):
            if not await self._check_lease():
                return written
            nxt = groups[first + width][0][0] if first + width < len(groups) else None
            shipped = await self._ship_round(groups[first : first + width], nxt)
            written += len(shipped)
            snapshot_shipped = snapshot_shipped or any(i.kind == "snapshot" for i in shipped)
        await self._after_sync(written, snapshot_shipped, beside)
        return written

    async def lend(self, generation: str | None) -> int | None:
        """Lend this destination to the next capture step, which then links what it writes
        (see :meth:`Courier.link_now`) in its own worker call: the commit reaches the
        destination without a round of :meth:`sync` (two hops across the event loop and a
        thread less). Only a directory that links, up, not paced, and holding everything
        spooled so far (nothing waits for a round) is lent; returns the txid of
        ``generation`` the step's segments must continue from, or None (not lent). A lent
        destination has no round until :meth:`linked` takes it back."""
        if (generation is None or not self.courier.direct or self.batch or not self.healthy
                or self.fenced is not None or self.sync_interval > 0 or self.needs_snapshot
                or self._relist or self.wake.is_set() or self._round.locked()
                or self.lease.due()):
            return None
        after = self.holdings.newest_txid(generation)
        if after is None:
            return None
        await self._round.acquire()  # free: takes it without waiting
        try:
            waiting = await self.pending(remote=False)
        except BaseException:
            self._round.release()
            raise
        if waiting:  # a round ships what waits, in order
            self._round.release()
            return None
        return after

    def linked(self, shipped: list[Shipped] | None) -> bool:
        """Take back a destination lent to a capture step and record what the step linked
        into it (None: nothing, its next round ships what the step wrote); whether it did."""
        self._round.release()
        if not shipped:
            return False
        done = time.time()
        for info, size, frames in shipped:
            self._shipped(info, [], size, frames, done)
        self._lacks(None)
        self._after_round(len(shipped))
        if self.spool.fed_more(self._feed, len(shipped)):
            self.wake.set()  # spooled beside the step (a snapshot): a round ships it
        if self.fenced is None:
            self._compact_beside()
        return True

    async def _missing(self) -> list[ObjectInfo]:
        """What this destination lacks (see :meth:`pending`), with the lag it makes; a
        destination that lacks the base of its oldest object needs a snapshot."""
        t0 = time.monotonic()
        missing = await self.pending()
        if len(missing) > 1 and self.courier.debug.ready():
            log.debug("%s: replica %s: %d objects to ship (listed in %.3f s)", self.db_name,
                      self.name, len(missing), time.monotonic() - t0)
        self._lacks(missing[0] if missing else None)
        if missing and not self.holdings.has_base(missing[0]):
            self.needs_snapshot = True
            if self.on_needs_snapshot is not None:
                self.on_needs_snapshot()
        return missing

    async def _ship_round(self, window: list[batch.Group],
                          nxt: ObjectInfo | None) -> list[ObjectInfo]:
        """Ship one round of groups and record what the destination holds now, and the lag of
        ``nxt``, the first object of the next round (None: caught up); returns what was
        written."""
        results = await self.courier.send(window, self.batch)
        done = time.time()
        for (parts, _), (info, size, frames) in zip(window, results, strict=True):
            self._shipped(info, parts, size, frames, done)
        self._lacks(nxt)
        return [info for info, _, _ in results]

    def _after_round(self, written: int) -> None:
        """Everything spooled was shipped: the replica is up."""
        self._synced()
        if written and self.on_shipped is not None:
            self.on_shipped()

    async def _after_sync(self, written: int, snapshot_shipped: bool, beside: bool) -> None:
        """Every group was shipped: the replica is up, and after a snapshot the retention
        policy is applied (``beside``: in a task of its own)."""
        self._after_round(written)
        if snapshot_shipped:
            # only after a new snapshot can anything become unnecessary; an idle database
            # therefore costs no listing requests for retention
            if beside:
                self._retain_beside()
            else:
                await self.enforce_retention()

    def _retain_beside(self) -> None:
        """Apply the retention policy in a task of its own (once more after it, if one runs)."""
        if self._retaining.running():
            self._retain_again = True
            return

        async def retain() -> None:
            while True:
                self._retain_again = False
                await self.enforce_retention()
                if not self._retain_again:
                    return

        self._retaining.start(retain())

    def _shipped(self, info: ObjectInfo, parts: list[ObjectInfo], size: int, frames: int,
                 done: float) -> None:
        """Record one object written at ``done`` (holding ``parts``, the spooled objects merged
        into it, if any): what the destination holds, compaction's view, counters and
        metrics."""
        self.holdings.remember(info.generation, [info.key, *(p.key for p in parts)])
        if self.compactor is not None:
            self.compactor.shipped(info)
        self.shipped_bytes += size
        if info.kind == "wal":
            self.shipped_transactions += info.end_txid - info.start_txid + 1
        self.series.shipped(info, size, frames, done)

    def _synced(self) -> None:
        """A round went through: the replica is up."""
        self.last_sync = time.time()
        self.healthy = True
        self.failing_since = 0.0
        self.last_error = None
        self.series.synced(self.last_sync)

    async def enforce_retention(self, now: float | None = None) -> RetentionPlan | None:
        """Apply the retention policy to this destination (one listing) and update its
        inventory metrics; None when that failed (logged and counted)."""
        policy = self.retention or RetentionPolicy()
        try:
            async with self._maintenance:
                plan = await plan_retention(self.client, policy, now)
                if await apply_plan(self.client, plan):
                    self._relist = True
                    if self.compactor is not None:
                        self.compactor.relist()
        except Exception as exc:  # noqa: BLE001 - retention failures never stop shipping
            self.record_error("retention", exc)
            return None
        self.series.inventory(plan)
        return plan

    def record_error(self, operation: str, exc: BaseException) -> None:
        """Count an error, mark the replica down and log it (at most once a minute)."""
        self.healthy = False
        if not self.failing_since:
            self.failing_since = time.time()
        if isinstance(exc, LeaseError):
            operation = "lease"
        self._log_error(operation, exc)
        self.series.up(0)

    def _log_error(self, operation: str, exc: BaseException) -> None:
        """Count an error and log it (at most once a minute while it stays the same)."""
        msg = str(exc) if isinstance(exc, ReplicatorError) else f"{type(exc).__name__}: {exc}"
        if self.last_error is None:
            self._errors.reset()  # the replica was fine since the last error: log this one
        self.last_error = msg
        self.series.error(operation)
        self._errors.error(msg, f"{self.db_name}: replica {self.name}: {operation} failed: ")

    def _compact_beside(self) -> None:
        """Start a compaction step in a task of its own, unless one is running."""
        if self.source_behind or self._compacting.running():
            return
        if self.compactor is None or not self.compactor.due.is_due(time.time()):
            return
        # both asked (``|``, not ``or``): each counts how long it has put the step off
        if self._busy.defers(self.source_busy) | self._bulk.defers(self.source_bulk):
            return  # the round after the writer's pause looks again
        if time.monotonic() < self._compact_after:
            return  # the next round after it looks again

        async def step() -> None:
            async with self.limit or contextlib.nullcontext():
                started = time.monotonic()
                self._busy.done()
                self._bulk.done()
                await self.compact_if_due()
                took = time.monotonic() - started
                assert self.compactor is not None
                self._compact_after = time.monotonic() + min(
                    took * (1 / COMPACT_DUTY - 1),
                    max(COMPACT_SPACING, self.compactor.levels[0]))
                if self.compactor.due.is_due(time.time()):
                    self.wake.set()  # windows closed meanwhile: the loop spaces the next step

        self._compacting.start(step())

    def _idle_wait(self, backstop: float) -> float | None:
        """How long ``run()`` waits for a wake-up after a successful round: ``backstop``, or
        until the next compaction window closes if that is sooner (a compaction step then
        starts in the writer's pause, not with the first object after it), or while
        :attr:`quiet` until that window closes (None: until woken). A step due now that this
        round did not start waits for the spacing after the last step to end (then the loop
        looks again: the newest windows are merged soon after the writer stops, not at the
        backstop or the next commit), or for the end of the longest it defers to a busy
        capture, or for its wake-up (a busy capture's pause, a running step's end)."""
        due = None if self.compactor is None else self.compactor.due.next()
        now = time.time()
        if due is not None and due <= now:
            mono = time.monotonic()
            spaced = max(self._compact_after - mono, self._busy.left(mono),
                         self._bulk.left(mono))
            due = now + spaced if spaced > 0 else None
        if not self.quiet:
            return backstop if due is None else min(backstop, due - now)
        return None if due is None else due - now

    async def run(self, stop: asyncio.Event, backstop: float = DEFAULT_BACKSTOP) -> None:
        """Ship whenever woken (or every ``backstop`` seconds, none while :attr:`quiet`) until
        ``stop`` is set; compaction runs beside it."""
        try:
            async with relay(stop, self.wake):
                await self._run(stop, backstop)
        finally:
            tasks = [b.task for b in (self._compacting, self._retaining) if b.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._delete_replaced()

    async def _delete_replaced(self) -> None:
        """At shutdown, delete what merges replaced rather than leave it for the next start
        (bounded: a destination that does not answer keeps them)."""
        if self.compactor is None or not self.compactor.pending_deletes() or self.fenced:
            return
        try:
            async with self._maintenance:
                await asyncio.wait_for(self.compactor.delete_replaced(), DELETE_AT_EXIT)
        except Exception as exc:  # noqa: BLE001 - the next start deletes them as covered
            self._log_error("compact", exc)

    def hurry(self) -> None:
        """Start the next round now, whatever :attr:`sync_interval` says (``sync --wait``, a
        restore drill, a snapshot asked for)."""
        self._hurried = True
        self.wake.set()

    async def _pace(self, stop: asyncio.Event) -> None:
        """Wait until :attr:`sync_interval` after the last round started (not while the
        destination is failing: its retries have their own backoff), or until hurried or
        stopped. Wake-ups that come meanwhile (new objects in the spool) are taken in the next
        round."""
        while self.sync_interval > 0 and self.healthy and not self._hurried:
            wait = self._round_at + self.sync_interval - time.monotonic()
            if wait <= 0 or stop.is_set():
                break
            self.wake.clear()
            await wait_event(self.wake, wait)
            if self.wake.is_set() and self._behind_since is None and not stop.is_set():
                # something new was spooled: the lag counts from it (gauge included)
                missing = await self.pending(remote=False)
                self._lacks(missing[0] if missing else None)
        self._hurried = False

    async def _run(self, stop: asyncio.Event, backstop: float) -> None:
        failures = 0
        while not stop.is_set() and self.fenced is None:
            await self._pace(stop)
            if stop.is_set():
                break
            self._round_at = time.monotonic()
            try:
                links = self.courier.links(self.batch)
                async with (None if links else self.limit) or contextlib.nullcontext():
                    if not self.healthy:
                        await self.init()
                    await self.sync(beside=True)
                if self.fenced is None:
                    self._compact_beside()
                if self.fenced is not None:
                    break
                failures = 0
                timeout = self._idle_wait(backstop)
            except Exception as exc:  # noqa: BLE001 - every failure is retried with backoff
                if self.fenced is not None:
                    break  # already counted and logged
                self.record_error("sync" if self.healthy else "init", exc)
                self._relist = True  # the destination may have changed while failing
                failures += 1
                timeout = RETRY.delay(failures)
                # the lag keeps growing while the destination is down
                missing = await self.pending(remote=False)
                if missing:
                    self._lacks(missing[0])
            await wait_event(self.wake, timeout)
            self.wake.clear()

