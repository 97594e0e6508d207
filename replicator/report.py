"""What one database reports: the metric series of its capture, a DEBUG line per capture (rate
limited), an INFO summary of what each replica shipped (one for the whole process when it
replicates many databases), and its entry in ``/status``."""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .db import CATCH_UP_REASONS, CaptureResult, Database
from .logs import RateLimit, fmt_bytes
from .metrics import Metrics
from .replica import Replica

if TYPE_CHECKING:
    from .health import CheckResult
    from .replicator import DatabaseService

log = logging.getLogger("replicator.replicator")

# an INFO line per database with what was shipped, at most this often (none while idle)
SUMMARY_EVERY = 60.0
# past this many databases in the process, one INFO line for all of them instead (each
# database's own line at DEBUG): a thousand tenants do not log a thousand lines a minute
SUMMARY_FOLD_ABOVE = 16
# the DEBUG capture line, at most this often (a busy WAL is captured every few ms)
DEBUG_EVERY = 1.0
CHECKPOINT_RESULTS = ("ok", "busy", "error")


Shipped = dict[str, tuple[int, int]]
"""Per destination name: transactions and bytes shipped (over some time)."""


def shipped_text(shipped: Shipped) -> str:
    """``5 transactions (2.1 KiB) to local, 5 transactions (2.1 KiB) to s3``."""
    return ", ".join(f"{txns} transactions ({fmt_bytes(nbytes)}) to {name}"
                     for name, (txns, nbytes) in shipped.items())


class ProcessSummary:
    """The process's INFO line of what its databases shipped, at most every ``every`` seconds,
    while it replicates more than ``SUMMARY_FOLD_ABOVE`` databases (``count``): it folds their
    own summaries (:meth:`CaptureReport.summary`), which then go to DEBUG. No timer: the line
    is due with the first database summary after ``every`` seconds (none while all are idle)."""

    def __init__(self, count: Callable[[], int], every: float = SUMMARY_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self.every = every
        self._at = clock()
        self._shipped: Shipped = {}
        self._dbs: set[str] = set()
        self._stopping: bool | None = None  # folding when the shutdown began (None: running)
        self._stopped = 0

    @property
    def folding(self) -> bool:
        """Whether database summaries are folded into this one (the process has many)."""
        return self._count() > SUMMARY_FOLD_ABOVE

    def stopping(self) -> None:
        """The process shuts down: its databases' lines of their final sync are folded into
        one (:meth:`stopped_all`) if it has many now (their count falls as they stop)."""
        self._stopping, self._stopped = self.folding, 0

    def stopped(self, db: str, txid: int) -> None:
        """Database ``db`` stopped after its final sync at ``txid``: logged at INFO, or at
        DEBUG and counted while a shutdown of many databases folds them."""
        folding = self.folding if self._stopping is None else self._stopping
        line = f"{db}: stopped after final sync at txid {txid}"
        if folding:
            log.debug("%s", line)
            self._stopped += 1
        else:
            log.info("%s", line)

    def stopped_all(self) -> str | None:
        """The shutdown's line for the databases folded (logged at INFO; None: none)."""
        n, self._stopped, self._stopping = self._stopped, 0, None
        if not n:
            return None
        line = f"{n} databases stopped after final sync"
        log.info("%s", line)
        return line

    def add(self, db: str, shipped: Shipped, now: float) -> str | None:
        """Fold database ``db``'s summary; the process's line (logged at INFO) when it is due,
        else None."""
        self._dbs.add(db)
        for name, (txns, nbytes) in shipped.items():
            t, b = self._shipped.get(name, (0, 0))
            self._shipped[name] = (t + txns, b + nbytes)
        elapsed = now - self._at
        if elapsed < self.every:
            return None
        line = (f"shipped {shipped_text(self._shipped)} from {len(self._dbs)} of "
                f"{self._count()} databases in the last {elapsed:.0f}s")
        self._at, self._shipped, self._dbs = now, {}, set()
        log.info("%s", line)
        return line


class CaptureReport:
    """The metrics and logs of one database's capture and shipping."""

    def __init__(self, name: str, metrics: Metrics, replicas: list[Replica],
                 process: ProcessSummary | None = None) -> None:
        self.name = name
        self.process = process
        """Folds the periodic summary of many databases into one line (None: never)."""
        self.metrics = metrics
        self.replicas = replicas
        # spread over the interval: a thousand databases started together log apart
        self._summary_at = time.monotonic() - random.uniform(0, SUMMARY_EVERY / 2)
        self._summary_base = {r.name: (0, 0) for r in replicas}
        self._debug = RateLimit(DEBUG_EVERY)
        self._debug_counts = [0, 0]  # transactions, frames captured since the last debug line
        self._init_metrics()

    def _init_metrics(self) -> None:
        """Create the series whose label values are known up front, so they read 0 (not
        "absent") until something happens."""
        m, name = self.metrics, self.name
        for counter in (m.captured_transactions, m.captured_frames, m.snapshots):
            counter.labels(name)
        for result in CHECKPOINT_RESULTS:
            m.checkpoints.labels(name, "passive", result)
        for reason in CATCH_UP_REASONS:
            m.catch_ups.labels(name, reason.value)
        for r in self.replicas:
            for family in (m.replica_shipped_transactions, m.replica_shipped_frames,
                           m.replica_shipped_bytes):
                family.labels(name, r.name)

    def counted(self, res: CaptureResult) -> None:
        """Count the transactions and frames ``res`` captured (a step's, or what a snapshot
        captured before it was taken)."""
        if res.transactions:
            m, name = self.metrics, self.name
            m.captured_transactions.labels(name).inc(res.transactions)
            m.captured_frames.labels(name).inc(res.frames)

    def captured(self, db: Database, res: CaptureResult, seconds: float,
                 sizes: tuple[int, int]) -> None:
        """Record a capture step that took ``seconds``; ``sizes``: the database's and the
        WAL's file sizes after it."""
        self._debug_counts[0] += res.transactions
        self._debug_counts[1] += res.frames
        if self._debug_counts[0] and log.isEnabledFor(logging.DEBUG) and self._debug.ready():
            log.debug("%s: captured %d transactions (%d frames) to txid %d, pos %s",
                      self.name, *self._debug_counts, db.txid, db.pos)
            self._debug_counts = [0, 0]
        m, name = self.metrics, self.name
        m.capture_seconds.labels(name).observe(seconds)
        self.counted(res)
        if res.new_generation:
            m.generation_changes.labels(name, res.new_generation).inc()
            self.snapshot_taken(db)
        if res.catch_up:
            m.catch_ups.labels(name, res.catch_up).inc()
        for result, count in db.checkpoints.items():
            m.checkpoints.labels(name, "passive", result).inc(count)
        db.checkpoints.clear()
        m.db_size_bytes.labels(name).set(sizes[0])
        m.wal_size_bytes.labels(name).set(sizes[1])
        m.wal_frames.labels(name).set(db.pos.frame if db.pos else 0)

    def snapshot_taken(self, db: Database) -> None:
        """Record the snapshot ``db`` took last."""
        m, name = self.metrics, self.name
        m.snapshots.labels(name).inc()
        m.snapshot_last_timestamp.labels(name).set(db.last_snapshot_ns / 1e9)
        m.snapshot_duration_seconds.labels(name).set(db.last_snapshot_seconds)
        m.snapshot_size_bytes.labels(name).set(db.last_snapshot_size)

    def summary(self, now: float | None = None) -> str | None:
        """Log (at INFO) and return what each replica shipped since the last summary, if
        ``SUMMARY_EVERY`` seconds have passed and anything was shipped; else None."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._summary_at
        if elapsed < SUMMARY_EVERY:
            return None
        current = {r.name: (r.shipped_transactions, r.shipped_bytes) for r in self.replicas}
        shipped: Shipped = {}
        for name, (txns, nbytes) in current.items():
            base = self._summary_base.get(name, (0, 0))
            if (txns, nbytes) != base:
                shipped[name] = (txns - base[0], nbytes - base[1])
        self._summary_at, self._summary_base = now, current
        if not shipped:
            return None
        line = f"{self.name}: shipped {shipped_text(shipped)} in the last {elapsed:.0f}s"
        if self.process is not None and self.process.folding:
            log.debug("%s", line)
            self.process.add(self.name, shipped, now)
        else:
            log.info("%s", line)
        return line


def iso(ts: float) -> str | None:
    """Unix seconds as RFC 3339 UTC (None for 0, "never")."""
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def _result_json(r: CheckResult) -> dict[str, Any]:
    return {"check": r.check, "kind": r.kind, "ok": r.ok, "ran": r.ran, "value": r.value,
            "reason": r.reason, "time": iso(r.timestamp)}


def service_status(s: DatabaseService) -> dict[str, Any]:
    """The state of a database's service for ``/status`` (call from the event loop)."""
    db = s.db
    health = s.health.last_results if s.health is not None else {}
    integrity = next((r for r in health.values() if r.kind == "integrity"), None)
    return {
        "name": s.cfg.name,
        "path": s.cfg.path,
        "generation": db.generation,
        "txid": db.txid,
        "position": db.pos.to_json() if db.pos is not None else None,
        "last_capture": iso(s.last_capture),
        "parked": s.parked,
        "last_snapshot": {"time": iso(db.last_snapshot_ns / 1e9),
                          "txid": db.last_snapshot_txid} if db.last_snapshot_ns else None,
        "ready_max_lag_seconds": s.cfg.ready_max_lag,
        "replicas": [
            {"name": r.name, "url": r.url, "healthy": r.healthy,
             "generation": (db.generation if r.holdings.newest_txid(db.generation or "")
                            is not None else None),
             "txid": r.holdings.newest_txid(db.generation or ""), "lag_seconds": round(r.lag, 3),
             "last_sync": iso(r.last_sync), "error": r.last_error,
             "sync_interval_seconds": r.sync_interval}
            for r in s.replicas
        ],
        "integrity": _result_json(integrity) if integrity is not None else None,
        "health": [_result_json(r) for r in health.values() if r.kind != "integrity"],
        "verify": s.driller.last.to_json() if s.driller.last is not None else None,
    }
