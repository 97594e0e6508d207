"""When a database's snapshots are taken: a full one every ``snapshot-interval`` once something
changed, or when a destination needs one; a differential one (see replicator.diffsnap) when the
WAL captured since the last snapshot outgrew ``snapshot-wal-factor`` times the database, or a
full one if too many pages changed since the last full one (those taken for WAL volume spaced so
that they use at most ``WAL_SNAPSHOT_DUTY`` of the time, and put off while the capture follows a
busy writer, for ``WAL_SNAPSHOT_DEFER`` seconds or, while the WAL grows no faster than the
database, longer); and, after a restart, when the last
one was taken."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .diffsnap import DEFAULT_DIFF_MAX
from .pos import ObjectInfo
from .progress import CaptureResult
from .retry import Deferral
from .wal import FRAME_HEADER_SIZE

if TYPE_CHECKING:
    from .replicator import DatabaseService

WAL_SNAPSHOT_MIN = 4 << 20  # bytes: databases smaller than this count as this big
WAL_SNAPSHOT_DUTY = 0.1
"""Snapshots taken for WAL volume use at most this fraction of the time: after one that took
d seconds the next waits (1 / duty - 1) * d, so a writer faster than the capture is not slowed
further by snapshots of a state that is already out of date."""
WAL_SNAPSHOT_DEFER = 5.0
"""A snapshot due for WAL volume waits at least this long (seconds) while the capture follows a
busy writer: taken in the writer's next pause, it does not hold up the capture of the commits
of a burst (the capture and the snapshot take turns on the database)."""
WAL_SNAPSHOT_DEFER_VOLUME = 4.0
"""... and on, while the writer stays busy, until the WAL captured since the last snapshot
reaches this many times the volume that made it due. A bulk load that grows the database as
fast as it writes WAL (inserts) never gets there: its database is not copied midway, which
would hold up the capture for as long as the copy takes, while a restore of its newest state
replays at most about the database's size in WAL. A writer that rewrites the same pages gets
there within seconds."""


class SnapshotSchedule:
    """The snapshot policy of one database service."""

    def __init__(self, service: DatabaseService) -> None:
        self.service = service
        self.wal_snapshot_min = WAL_SNAPSHOT_MIN
        self.wal_snapshot_duty = WAL_SNAPSHOT_DUTY
        self._db_size = 0
        # bytes of WAL frames captured since the last snapshot, full or differential
        self._wal_since_snapshot = 0
        self._wal_snapshot_after = 0.0  # monotonic time before which none is taken for volume
        self.deferral = Deferral(WAL_SNAPSHOT_DEFER)
        """Puts off snapshots due for WAL volume while the capture follows a busy writer."""

    def captured(self, res: CaptureResult, db_size: int) -> None:
        """Count what a capture step wrote (``db_size``: the database's size after it)."""
        self._db_size = db_size
        if res.new_generation:
            self._wal_since_snapshot = 0
        page_size = self.service.db.page_size or 4096
        self._wal_since_snapshot += res.frames * (FRAME_HEADER_SIZE + page_size)

    def _wal_heavy(self, times: float = 1.0) -> bool:
        """Whether the WAL captured since the last snapshot (full or differential) exceeds
        ``times`` x ``snapshot-wal-factor`` times the database (at least ``wal_snapshot_min``,
        so that a tiny busy database is not snapshotted every moment): a restore of the newest
        state would replay more."""
        factor = self.service.cfg.snapshot_wal_factor
        base = max(self._db_size, self.wal_snapshot_min)
        return (factor > 0 and self._wal_since_snapshot > times * factor * base
                and time.monotonic() >= self._wal_snapshot_after)

    def _put_off(self, following: bool) -> bool:
        """Whether a snapshot that only the WAL volume asks for waits for the writer's pause
        (see ``WAL_SNAPSHOT_DEFER`` and ``WAL_SNAPSHOT_DEFER_VOLUME``)."""
        if self.deferral.defers(following):
            return True
        return following and not self._wal_heavy(WAL_SNAPSHOT_DEFER_VOLUME)

    async def if_due(self) -> bool:
        """Take a full snapshot when the interval has passed and something changed, or a
        destination needs one; when the WAL captured since the last snapshot outgrew
        ``snapshot-wal-factor`` times the database, a differential one (the pages changed since
        the last full snapshot), or a full one if too many pages changed."""
        s = self.service
        if s.parked:
            return False  # nothing changed since it was parked (a change unparks it)
        due = s.db.last_snapshot_ns / 1e9 + s.cfg.snapshot_interval
        needed = any(r.needs_snapshot for r in s.replicas)
        heavy = self._wal_heavy()
        interval = time.time() >= due and s.cfg.snapshot_interval > 0
        if not (needed or heavy or interval):
            return False
        if not (needed or interval) and self._put_off(s.following):
            return False  # only the WAL volume asks for it: in the writer's next pause
        if not needed and s.db.last_snapshot_txid == s.db.txid:
            return False  # nothing changed since the last snapshot
        res = CaptureResult()  # what the snapshot captures first is counted like any capture
        async with s.runtime.snapshots:
            started = time.monotonic()
            diff = None
            if heavy and not (needed or interval):
                diff = await s.call(s.db.diff_snapshot, DEFAULT_DIFF_MAX, res)
            if diff is None:
                await s.call(s.db.snapshot, res)
            took = time.monotonic() - started
        s.report.counted(res)
        self.deferral.done()
        self._wal_since_snapshot = 0
        self._wal_snapshot_after = time.monotonic() + took * (1 / self.wal_snapshot_duty - 1)
        for r in s.replicas:
            r.needs_snapshot = False
            r.wake.set()
        if diff is None:
            s.report.snapshot_taken(s.db)
        return True

    async def now(self) -> ObjectInfo:
        """Take a snapshot at once (``replicator snapshot``) and wake the shippers."""
        s = self.service
        await s.awake()
        await s.sync()
        res = CaptureResult()
        info = await s.call(s.db.snapshot, res)
        s.report.counted(res)
        for r in s.replicas:
            r.hurry()
        s.report.snapshot_taken(s.db)
        return info

    async def recall_last(self) -> None:
        """After a restart the spool may no longer hold the generation's last snapshot (it was
        pruned once shipped): take its time from the destinations, so a restart does not force a
        new snapshot."""
        s = self.service
        db = s.db
        gen = db.generation
        if gen is None or db.last_snapshot_ns:
            return
        for r in s.replicas:
            if not r.healthy:
                continue
            try:
                objs = await r.client.objects(gen)
            except Exception:  # noqa: BLE001 - only an optimisation; shipping reports errors
                continue
            snaps = [o for o in objs if o.kind == "snapshot"]
            if snaps:
                newest = max(snaps, key=lambda o: o.end_txid)
                db.last_snapshot_ns = max(db.last_snapshot_ns, newest.last_ms * 1_000_000)
                db.last_snapshot_txid = max(db.last_snapshot_txid, newest.end_txid)
        if db.last_snapshot_ns:
            s.metrics.snapshot_last_timestamp.labels(s.cfg.name).set(db.last_snapshot_ns / 1e9)
