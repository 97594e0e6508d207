"""Restore drills: restore points of a replica into a temp directory and prove them equal to
what the application had.

A *point* is ``(generation, txid, sha256)``: the SHA-256 of pages 1..n of the database at that
txid, taken from the live database under the replicator's read transaction
(:meth:`replicator.db.Database.content_hash`). The running replicator records one at each drill
in ``drill-points.json`` in the spool directory once a drill proved it (the newest
:data:`MAX_POINTS`). A drill
restores, from every destination, the newest point and one earlier recorded point picked at
random among those still restorable, runs ``PRAGMA integrity_check`` on each result (as every
restore does) and compares the SHA-256 of its pages with the recorded one. A *partial* drill runs
configured queries on the restored newest point and on the live database at the same txid and
compares the rows.

Any difference, missing or corrupt object, or failed check makes the drill fail with one line
saying what differed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .aio import wait_any
from .errors import ReplicatorError
from .fsutil import atomic_writer
from .notify import FAILING, RECOVERED, Notifier
from .restore import apply_plan, plan_restore
from .storage.base import StorageClient

if TYPE_CHECKING:
    from .replicator import DatabaseService

log = logging.getLogger("replicator.drill")

POINTS_FILE = "drill-points.json"
MAX_POINTS = 64
_READ = 1 << 20


@dataclass(frozen=True)
class Point:
    """The content of the database at one txid of one generation."""

    generation: str
    txid: int
    sha256: str
    time: float = 0.0
    """When it was recorded (unix seconds)."""


@dataclass(frozen=True)
class PartialCheck:
    """A query whose rows must be the same on a restored copy and on the live database."""

    name: str
    sql: str


@dataclass
class DrillResult:
    """The outcome of one drill."""

    ok: bool
    message: str
    """One line: what was proven, or what differed."""
    checked: list[str] = field(default_factory=list)
    duration: float = 0.0

    def to_json(self) -> dict[str, object]:
        """The JSON form (``/verify``, ``verify --json``)."""
        return asdict(self)


class DrillFailed(ReplicatorError):
    """A restore drill found a difference or could not restore."""


def load_points(spool_dir: str) -> list[Point]:
    """The recorded points (oldest first); none if the file is absent or unreadable."""
    try:
        with open(os.path.join(spool_dir, POINTS_FILE), encoding="utf-8") as f:
            raw = json.load(f)
        return [Point(str(p["generation"]), int(p["txid"]), str(p["sha256"]),
                      float(p.get("time", 0.0))) for p in raw]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def save_point(spool_dir: str, point: Point) -> list[Point]:
    """Record ``point`` (temp name, fsync, rename), keeping the newest :data:`MAX_POINTS`."""
    points = [p for p in load_points(spool_dir)
              if (p.generation, p.txid) != (point.generation, point.txid)]
    points = (points + [point])[-MAX_POINTS:]
    os.makedirs(spool_dir, exist_ok=True)
    with atomic_writer(os.path.join(spool_dir, POINTS_FILE)) as f:
        f.write(json.dumps([asdict(p) for p in points], indent=1).encode())
    return points


def file_sha256(path: str) -> str:
    """SHA-256 of a closed database file (its pages 1..n: the whole file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            digest.update(chunk)
    return digest.hexdigest()


def query_rows(path: str, sql: str) -> list[tuple[object, ...]]:
    """The rows of ``sql`` on a closed database file (opened read-only, immutable)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


async def restore_point(
    client: StorageClient, point: Point, directory: str
) -> str:
    """Restore ``point`` from ``client`` into ``directory`` (integrity checked) and prove its
    pages equal; returns the restored file. Raises :class:`DrillFailed` naming the difference."""
    out = os.path.join(directory, f"{point.generation}-{point.txid}.db")
    where = f"{client.url}: generation {point.generation} txid {point.txid}"
    try:
        plan = await plan_restore(client, txid=point.txid, generation=point.generation)
        await apply_plan(client, plan, out)
    except ReplicatorError as exc:
        raise DrillFailed(f"{where}: restore failed: {exc}") from None
    got = await asyncio.to_thread(file_sha256, out)
    if got != point.sha256:
        raise DrillFailed(f"{where}: restored content differs from the database's "
                          f"(sha256 {got[:16]}.., expected {point.sha256[:16]}..)")
    return out


async def _restorable(client: StorageClient, p: Point) -> bool:
    try:
        await plan_restore(client, txid=p.txid, generation=p.generation)
    except ReplicatorError:
        return False
    return True


async def pick_earlier(
    client: StorageClient, points: Sequence[Point], newest: Point, rng: random.Random
) -> Point | None:
    """A recorded point other than ``newest`` that the replica can still restore, at random."""
    candidates = [p for p in points if (p.generation, p.txid) != (newest.generation, newest.txid)
                  and (p.generation, p.txid) < (newest.generation, newest.txid)]
    rng.shuffle(candidates)
    for p in candidates:
        if await _restorable(client, p):
            return p
    return None


async def drill(
    clients: Sequence[tuple[str, StorageClient]],
    newest: Point,
    points: Sequence[Point],
    *,
    partial: Sequence[tuple[PartialCheck, list[tuple[object, ...]]]] = (),
    temp_parent: str | None = None,
    rng: random.Random | None = None,
) -> DrillResult:
    """Restore ``newest`` and a random earlier point from every replica and prove them equal;
    ``partial`` pairs each check with the rows the live database returned at ``newest``."""
    started = time.monotonic()
    rng = rng or random.Random()
    checked: list[str] = []
    try:
        for name, client in clients:
            tmp = await asyncio.to_thread(tempfile.mkdtemp, ".drill", "replicator-", temp_parent)
            try:
                out = await restore_point(client, newest, tmp)
                checked.append(f"{name}@{newest.txid}")
                for check, rows in partial:
                    got = await asyncio.to_thread(query_rows, out, check.sql)
                    if got != rows:
                        raise DrillFailed(
                            f"{client.url}: partial check {check.name} at txid {newest.txid}: "
                            f"{len(got)} rows restored, {len(rows)} in the database"
                            + (" (same count, different values)" if len(got) == len(rows) else "")
                        )
                    checked.append(f"{name}@{newest.txid}:{check.name}")
                earlier = await pick_earlier(client, points, newest, rng)
                if earlier is not None:
                    await restore_point(client, earlier, tmp)
                    checked.append(f"{name}@{earlier.txid}")
            finally:
                await asyncio.to_thread(shutil.rmtree, tmp, True)
    except DrillFailed as exc:
        return DrillResult(False, str(exc), checked, time.monotonic() - started)
    message = (f"restore drill ok: generation {newest.generation} txid {newest.txid} equal on "
               f"{len(clients)} replica(s); checked {', '.join(checked)}")
    return DrillResult(True, message, checked, time.monotonic() - started)


def source_rows(path: str, sql: str) -> list[tuple[object, ...]]:
    """The rows of ``sql`` on a live database, on a read-only connection of its own."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA query_only = ON")
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.close()


@dataclass(frozen=True)
class VerifyConfig:
    """``verify:`` of one database: a drill every ``interval`` seconds (None: only on demand),
    with ``partial`` checks at the newest point."""

    interval: float | None = None
    partial: tuple[PartialCheck, ...] = ()
    timeout: float = 600.0
    """How long a drill waits for the destinations to hold the newest point."""


DRILL_ATTEMPTS = 50
"""Captures tried to find a moment when the live database is at the captured txid."""
DRILL_CHECK = "verify"
"""The ``check`` of drill notifications."""


class Driller:
    """Runs the drills of one database: :meth:`run_once` is one drill, :meth:`run` the
    schedule (first drill one interval after the newest recorded point, at once if none)."""

    def __init__(self, service: DatabaseService, notifier: Notifier | None = None) -> None:
        self.service = service
        self.cfg = service.cfg.verify
        self.notifier = notifier
        self.last: DrillResult | None = None
        self._last_run = 0.0
        self._lock = asyncio.Lock()  # one drill at a time (schedule and on demand)

    @property
    def spool_dir(self) -> str:
        """Where points are recorded and drills restore (the spool directory)."""
        return self.service.cfg.spool_dir

    async def run_once(self, now: float | None = None) -> DrillResult:
        """One drill of every destination; metrics, a log line, and a notification when the
        outcome changes."""
        async with self._lock:
            started = time.monotonic()
            s = self.service
            try:
                point, rows = await s.drill_point([c.sql for c in self.cfg.partial])
                await s.wait_shipped(point.generation, point.txid, self.cfg.timeout)
                points = await asyncio.to_thread(load_points, self.spool_dir)
                result = await drill(
                    [(r.name, r.client) for r in s.replicas], point, points,
                    partial=list(zip(self.cfg.partial, rows, strict=True)),
                    temp_parent=self.spool_dir,
                )
                if result.ok:  # a proven point: later drills restore it again
                    await asyncio.to_thread(save_point, self.spool_dir, point)
            except (ReplicatorError, TimeoutError) as exc:
                result = DrillResult(False, f"restore drill failed: {exc}")
            result.duration = time.monotonic() - started
            await self._record(result, time.time() if now is None else now)
            return result

    async def _record(self, result: DrillResult, now: float) -> None:
        name = self.service.cfg.name
        m = self.service.metrics
        before = self.last
        self.last = result
        m.verify_ok.labels(name).set(1 if result.ok else 0)
        m.verify_duration.labels(name).set(result.duration)
        self._last_run = now
        if result.ok:
            m.verify_last_success.labels(name).set(now)
            log.info("%s: %s", name, result.message)
        else:
            log.error("%s: %s", name, result.message)
        if self.notifier is None:
            return
        if not result.ok:
            await self.notifier.notify(name, DRILL_CHECK, FAILING, result.message, now=now)
        elif before is not None and not before.ok:
            await self.notifier.notify(name, DRILL_CHECK, RECOVERED, result.message, now=now)

    def next_due(self) -> float:
        """When the next scheduled drill is due (unix seconds; inf without a schedule)."""
        if self.cfg.interval is None:
            return math.inf
        points = load_points(self.spool_dir)
        last = max([self._last_run, *(p.time for p in points)])
        return last + self.cfg.interval if last else 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Drill on schedule until ``stop`` is set."""
        await asyncio.to_thread(_remove_stale_dirs, self.spool_dir)
        if self.cfg.interval is None:
            return
        name, m = self.service.cfg.name, self.service.metrics
        m.verify_interval.labels(name).set(self.cfg.interval)
        points = await asyncio.to_thread(load_points, self.spool_dir)
        if points:  # the last success before a restart
            m.verify_last_success.labels(name).set(max(p.time for p in points))
        while not stop.is_set():
            wait = self.next_due() - time.time()
            if wait > 0:
                await wait_any(stop, within=min(wait, 3600.0))
                continue
            await self.run_once()  # failed or not, the next one is an interval later


def _remove_stale_dirs(spool_dir: str) -> None:
    """Temp directories of drills a crash interrupted."""
    with contextlib.suppress(OSError):
        for name in os.listdir(spool_dir):
            if name.startswith("replicator-") and name.endswith(".drill"):
                shutil.rmtree(os.path.join(spool_dir, name), True)
