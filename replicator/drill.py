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
import dataclasses
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

from .aio import wait_event
from .errors import ReplicatorError
from .fsutil import atomic_writer
from .notify import FAILING, RECOVERED, Notifier
from .restore import apply_plan, plan_restore
from .storage.base import StorageClient

if TYPE_CHECKING:
    from .replica import Replica
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
    replicas: tuple[str, ...] = ()
    """The destinations a drill proved it on (empty: every one)."""


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
    replica: str = ""
    """The destination drilled (empty: every destination, each one in ``replicas``)."""
    replicas: list[DrillResult] = field(default_factory=list)

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
                      float(p.get("time", 0.0)), tuple(str(n) for n in p.get("replicas", ())))
                for p in raw]
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
        await apply_plan(client, plan, out, full_check=True)
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


async def drill_replica(
    name: str,
    client: StorageClient,
    newest: Point,
    points: Sequence[Point],
    *,
    partial: Sequence[tuple[PartialCheck, list[tuple[object, ...]]]] = (),
    temp_parent: str | None = None,
    rng: random.Random | None = None,
) -> DrillResult:
    """Restore ``newest`` and a random earlier point from one destination and prove them
    equal; ``partial`` pairs each check with the rows the live database returned at
    ``newest``."""
    started = time.monotonic()
    rng = rng or random.Random()
    checked: list[str] = []
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
    except DrillFailed as exc:
        return DrillResult(False, str(exc), checked, time.monotonic() - started, name)
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return DrillResult(True, f"restore drill ok: generation {newest.generation} txid "
                       f"{newest.txid} equal; checked {', '.join(checked)}", checked,
                       time.monotonic() - started, name)


def combine(newest: Point | None, results: list[DrillResult], duration: float) -> DrillResult:
    """The outcome of a drill of every destination from the outcome of each: ok only when
    every one is."""
    checked = [c for r in results for c in r.checked]
    failed = [r for r in results if not r.ok]
    if failed:
        message = "; ".join(f"{r.replica}: {r.message}" for r in failed)
    elif newest is None or not results:
        message = "restore drill ok: no destination"
    else:
        message = (f"restore drill ok: generation {newest.generation} txid {newest.txid} "
                   f"equal on {len(results)} replica(s); checked {', '.join(checked)}")
    return DrillResult(not failed, message, checked, duration, replicas=results)


async def drill(
    clients: Sequence[tuple[str, StorageClient]], newest: Point, points: Sequence[Point]
) -> DrillResult:
    """:func:`drill_replica` of every destination in turn (no partial checks), combined."""
    started = time.monotonic()
    results = [await drill_replica(name, client, newest, points) for name, client in clients]
    return combine(newest, results, time.monotonic() - started)


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
        """One drill of every destination, each on its own: a destination that does not hold
        the newest point within the timeout fails its own drill while the others are proven.
        Metrics per destination, log lines, and a notification when the outcome changes."""
        async with self._lock:
            started = time.monotonic()
            s = self.service
            try:
                point, rows = await s.drill_point([c.sql for c in self.cfg.partial])
            except ReplicatorError as exc:
                failed = [DrillResult(False, f"restore drill failed: {exc}", replica=r.name)
                          for r in s.replicas]
                result = combine(None, failed, time.monotonic() - started)
            else:
                points = await asyncio.to_thread(load_points, self.spool_dir)
                partial = list(zip(self.cfg.partial, rows, strict=True))
                results = await asyncio.gather(*(
                    self._drill_replica(r, point, points, partial) for r in s.replicas))
                result = combine(point, list(results), time.monotonic() - started)
                proven = tuple(r.replica for r in results if r.ok)
                if proven:  # a proven point: later drills restore it again
                    await asyncio.to_thread(save_point, self.spool_dir,
                                            dataclasses.replace(point, replicas=proven))
            await self._record(result, time.time() if now is None else now)
            return result

    async def _drill_replica(
        self, replica: Replica, point: Point, points: list[Point],
        partial: list[tuple[PartialCheck, list[tuple[object, ...]]]],
    ) -> DrillResult:
        started = time.monotonic()
        try:
            await self.service.wait_shipped(point.generation, point.txid, self.cfg.timeout,
                                            [replica])
            result = await drill_replica(replica.name, replica.client, point, points,
                                         partial=partial, temp_parent=self.spool_dir)
        except (ReplicatorError, TimeoutError) as exc:
            result = DrillResult(False, f"restore drill failed: {exc}", replica=replica.name)
        result.duration = time.monotonic() - started
        return result

    async def _record(self, result: DrillResult, now: float) -> None:
        name = self.service.cfg.name
        m = self.service.metrics
        before = self.last
        self.last = result
        self._last_run = now
        for r in result.replicas:
            m.verify_ok.labels(name, r.replica).set(1 if r.ok else 0)
            m.verify_duration.labels(name, r.replica).set(r.duration)
            if r.ok:
                m.verify_last_success.labels(name, r.replica).set(now)
                log.info("%s: %s: %s", name, r.replica, r.message)
            else:
                log.error("%s: %s: %s", name, r.replica, r.message)
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
        for r in self.service.replicas:  # the last success before a restart
            proven = [p.time for p in points if not p.replicas or r.name in p.replicas]
            if proven:
                m.verify_last_success.labels(name, r.name).set(max(proven))
        while not stop.is_set():
            wait = self.next_due() - time.time()
            if wait > 0:
                await wait_event(stop, min(wait, 3600.0))
                continue
            await self.run_once()  # failed or not, the next one is an interval later


def _remove_stale_dirs(spool_dir: str) -> None:
    """Temp directories of drills a crash interrupted."""
    with contextlib.suppress(OSError):
        for name in os.listdir(spool_dir):
            if name.startswith("replicator-") and name.endswith(".drill"):
                shutil.rmtree(os.path.join(spool_dir, name), True)
