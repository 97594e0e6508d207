"""Health checks on a live SQLite database, run without ever blocking the application's writers.

Checks run in a worker thread on the checker's own read-only connection (``file:...?mode=ro``,
``PRAGMA query_only``, a small busy timeout). It is opened on first use and kept between runs
(reopened after an error or when the database file was replaced); the checks of one run share
one read transaction, ended as soon as they are done. Nothing is ever written. In WAL mode (the
only mode the replicator supports) a reader holds no lock a writer needs, so checks do not block
the application's writers, even ones with no busy timeout.

One SQLite caveat, true of every reader: when a read transaction starts at the very instant a
writer is publishing a commit, the reader sees a half-written WAL-index header and takes the
WAL write lock for a few microseconds to re-read it. A writer with *no* busy timeout that
begins a transaction in exactly that window gets ``SQLITE_BUSY``. Hence one read transaction per
run, and one kept connection rather than one per run (opening and closing connections under a
writer committing flat out made such collisions markedly more frequent in our stress tests).
Any busy timeout on the writer (SQLite's default in Python is 5 s) absorbs it. The integrity
check drops the connection's page cache first (``PRAGMA shrink_memory``) so it verifies what is
on disk.

The checks (all frozen dataclasses; ``name`` is the ``check`` label of the metrics):

* :class:`IntegrityCheck` - ``PRAGMA quick_check`` / ``integrity_check``; sets
  ``replicator_integrity_check_ok`` and ``..._timestamp_seconds`` (not the ``health_check_*``
  gauges, so a corruption raises only ``IntegrityCheckFailed``).
* :class:`FreshnessCheck` - a query returning the newest timestamp of some data (ISO-8601 text,
  naive = UTC, or unix seconds); failing when it is older than ``max_age`` or NULL.
* :class:`SizeCheck` - database file plus ``-wal`` file, failing above ``max_bytes``.
* :class:`SqlThresholdCheck` - a query returning one number; failing when
  ``value <op> threshold`` holds (``op=">", threshold=100`` reads "fail if > 100").

The other three set ``replicator_health_check_ok`` / ``_value`` / ``_timestamp_seconds``. A check
whose SQL fails is a failing result with the error as its reason (and counts one
``replicator_errors_total{operation="health_check"}``), never an exception.

:class:`HealthChecker` runs them: :meth:`HealthChecker.run_once` is one step (tests call it with
an explicit ``now``), :meth:`HealthChecker.run` is a loop over it. State changes (a check starts
failing, or recovers) go to a :class:`~replicator.notify.Notifier`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .aio import wait_event
from .errors import ConfigError
from .logs import fmt_bytes
from .metrics import Metrics
from .notify import FAILING, RECOVERED, Notifier
from .retry import CHORE_RETRY, ErrorLog
from .threads import name_os_thread

DEFAULT_INTERVAL = 60.0
DEFAULT_INTEGRITY_INTERVAL = 24 * 3600.0
# the longest a checker sleeps when no check is due sooner (a thousand databases' checkers do
# not wake every minute for nothing)
NO_CHECK_DUE = 3600.0
DEFAULT_BUSY_TIMEOUT = 0.1
DEFAULT_QUERY_TIMEOUT = 30.0
MAX_INTEGRITY_ERRORS = 20
MAX_REASON_CHARS = 500
INTEGRITY_CHECK_NAME = "integrity"
HEALTH_CHECK_OPERATION = "health_check"
# Corruption, as opposed to "could not run" (busy, locked, cannot open, interrupted).
CORRUPTION_ERRORS = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
_PROGRESS_STEPS = 10_000

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntegrityCheck:
    """``PRAGMA quick_check`` (``quick=True``: b-tree structure only, fast) or the full
    ``PRAGMA integrity_check`` (also indexes against tables), every ``interval``."""

    quick: bool = True
    interval: float = DEFAULT_INTEGRITY_INTERVAL
    name: str = INTEGRITY_CHECK_NAME


@dataclass(frozen=True)
class FreshnessCheck:
    """Fails when ``sql`` returns a timestamp older than ``max_age`` (or NULL / no row).

    The first column of the first row may be ISO-8601 text (``2024-05-01 12:00:00``,
    ``...T12:00:00Z``, ``...+09:00``; without an offset it is UTC, like SQLite's
    ``CURRENT_TIMESTAMP``) or a unix epoch in seconds (number or numeric text). The measured
    value is the age in seconds. Example: ``SELECT MAX(created_at) FROM releases``.
    """

    name: str
    sql: str
    max_age: float
    interval: float = DEFAULT_INTERVAL


@dataclass(frozen=True)
class SizeCheck:
    """Fails when the database file plus its ``-wal`` file exceed ``max_bytes``."""

    name: str
    max_bytes: int
    interval: float = DEFAULT_INTERVAL


def parse_fail_if(text: str) -> tuple[str, float] | None:
    """``"> 100"`` -> ``(">", 100.0)``; None unless it is ``<op> <finite number>``."""
    text = text.strip()
    for op in sorted(OPERATORS, key=len, reverse=True):
        if text.startswith(op):
            try:
                threshold = float(text[len(op):])
            except ValueError:
                return None
            return (op, threshold) if math.isfinite(threshold) else None
    return None


@dataclass(frozen=True)
class SqlThresholdCheck:
    """Fails when ``value <op> threshold`` holds, ``value`` being the first column of the first
    row of ``sql`` (a number; NULL or no row fails). ``op`` is one of ``> >= < <= == !=``.

    Example, "more than 100 overdue notifications is unhealthy"::

        SqlThresholdCheck("overdue", "SELECT COUNT(*) FROM releases WHERE notified = 0 "
                          "AND release_date < date('now', '-1 day')", ">", 100)
    """

    name: str
    sql: str
    op: str
    threshold: float
    interval: float = DEFAULT_INTERVAL

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ConfigError(
                f"health check {self.name!r}: op {self.op!r} is not one of {' '.join(OPERATORS)}"
            )

    @classmethod
    def from_fail_if(
        cls, name: str, sql: str, fail_if: str, interval: float = DEFAULT_INTERVAL
    ) -> SqlThresholdCheck:
        """Build from a config string such as ``fail_if: "> 100"``."""
        parsed = parse_fail_if(fail_if)
        if parsed is not None:
            return cls(name, sql, parsed[0], parsed[1], interval)
        raise ConfigError(
            f"health check {name!r}: fail_if {fail_if!r} is not '<op> <number>' "
            f"(op one of {' '.join(OPERATORS)})"
        )


Check = IntegrityCheck | FreshnessCheck | SizeCheck | SqlThresholdCheck


def check_names(checks: Sequence[Check], where: str = "health") -> None:
    """Raise ConfigError unless every check has a name of its own."""
    names = [c.name for c in checks]
    for n in names:
        if not n:
            raise ConfigError(f"{where}: a check has an empty name")
        if names.count(n) > 1:
            hint = " (reserved for the integrity check)" if n == INTEGRITY_CHECK_NAME else ""
            raise ConfigError(f"{where}: duplicate check name {n!r}{hint}")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check at one time."""

    db: str
    check: str
    kind: str
    """``integrity``, ``freshness``, ``size`` or ``sql``."""
    ok: bool
    value: float | None
    """What was measured: age in seconds, bytes, the query's number, integrity error count."""
    reason: str
    timestamp: float
    ran: bool = True
    """False when the check could not run (cannot open, busy, SQL error)."""


class _CouldNotRun(Exception):
    """The check failed for a reason other than what it measures."""


def _kind(check: Check) -> str:
    if isinstance(check, IntegrityCheck):
        return "integrity"
    if isinstance(check, FreshnessCheck):
        return "freshness"
    if isinstance(check, SizeCheck):
        return "size"
    return "sql"


def parse_timestamp(value: object) -> float:
    """A timestamp from SQL as unix seconds: ISO-8601 text (naive = UTC) or an epoch number.

    Raises ValueError naming the value when it is neither.
    """
    if value is None:
        raise ValueError("query returned NULL")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"unsupported timestamp type {type(value).__name__}")
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp or epoch: {text[:64]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _fmt_duration(seconds: float) -> str:
    s = abs(seconds)
    sign = "-" if seconds < 0 else ""
    if s < 120:
        return f"{sign}{s:.0f}s"
    if s < 7200:
        return f"{sign}{s / 60:.1f}m"
    if s < 172800:
        return f"{sign}{s / 3600:.1f}h"
    return f"{sign}{s / 86400:.1f}d"


def _fmt_number(v: float) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _connect_ro(
    path: str, busy_timeout: float, *, immutable: bool = False, any_thread: bool = False
) -> sqlite3.Connection:
    """A read-only, query-only connection: it can neither write nor take the write lock."""
    uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"
    if immutable:
        uri += "&immutable=1"
    conn = sqlite3.connect(
        uri, uri=True, timeout=busy_timeout, isolation_level=None,
        check_same_thread=not any_thread,
    )
    try:
        conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _query_one(conn: sqlite3.Connection, sql: str) -> object:
    """The first column of the first row; the cursor is closed at once so the implicit read
    transaction (and its WAL snapshot) ends here."""
    cur = conn.execute(sql)
    try:
        row = cur.fetchone()
    finally:
        cur.close()
    if row is None:
        raise _CouldNotRun("query returned no rows")
    if len(row) == 0:
        raise _CouldNotRun("query returned no columns")
    return row[0]


def _run_integrity(
    conn: sqlite3.Connection, quick: bool, max_errors: int = MAX_INTEGRITY_ERRORS
) -> list[str]:
    """The problems ``quick_check``/``integrity_check`` report: an empty list means "ok"."""
    pragma = "quick_check" if quick else "integrity_check"
    cur = conn.execute(f"PRAGMA {pragma}({int(max_errors)})")
    try:
        rows = [str(r[0]) for r in cur.fetchall()]
    finally:
        cur.close()
    if rows == ["ok"]:
        return []
    # one row may hold several newline-separated problems under a "*** in database" header
    lines = [ln.strip() for row in rows for ln in row.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("*** in database")] or rows


def _has_wal_content(path: str) -> bool:
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False


def integrity_check(
    path: str,
    *,
    quick: bool = False,
    live: bool = True,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> tuple[bool, str]:
    """Check any SQLite file: ``(True, "ok")`` or ``(False, reason)``; never raises for a bad
    or unreadable file (the reason says why).

    ``live=True`` (the default) is safe on a database others have open: a normal read-only
    connection that takes shared locks and reads the WAL; on a WAL-mode file it may leave empty
    ``-wal``/``-shm`` files beside it. ``live=False`` is for files nobody else has open (a
    restore's output): the file is opened ``immutable`` (no locks, nothing created beside it),
    unless a non-empty ``-wal`` file is there to be read.
    """
    if not os.path.isfile(path):
        return False, f"{path}: no such file"
    immutable = not live and not _has_wal_content(path)
    try:
        conn = _connect_ro(path, busy_timeout, immutable=immutable)
        try:
            problems = _run_integrity(conn, quick)
        finally:
            conn.close()
    except sqlite3.Error as e:
        return False, _truncate(f"{path}: {e}")
    if problems:
        return False, _truncate("; ".join(problems))
    return True, "ok"


class HealthChecker:
    """Runs the health checks of one database on schedule, exports them as metrics, logs one
    line per result and tells ``notifier`` when a check starts failing or recovers.

    ``db_label`` is the ``db`` label (default: ``db_path`` as given). ``query_timeout`` aborts a
    freshness or threshold query that runs longer (the integrity check has no limit).
    """

    def __init__(
        self,
        db_path: str,
        checks: Sequence[Check],
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        db_label: str | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        query_timeout: float = DEFAULT_QUERY_TIMEOUT,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        check_names(checks)
        for c in checks:
            if not c.interval > 0:
                raise ConfigError(f"health check {c.name!r}: interval must be > 0")
        self.db_path = db_path
        self.db = db_label if db_label is not None else db_path
        self.checks = list(checks)
        self.metrics = metrics
        self.notifier = notifier
        self.busy_timeout = busy_timeout
        self.query_timeout = query_timeout
        self._next_due: dict[str, float] = {}
        self._ok: dict[str, bool] = {}
        self.last_results: dict[str, CheckResult] = {}
        """The latest result of each check that has run, by check name."""
        # the kept read-only connection, the (st_dev, st_ino) it was opened on, and a lock that
        # serializes its use across worker threads
        self._conn: sqlite3.Connection | None = None
        self._conn_ident: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._close_requested = False
        # checks run on a thread of their own: a long integrity check never holds a thread
        # that file and network work of the event loop needs
        # (or on a pool shared by many databases' checkers, given from outside and kept open)
        self._shared_executor = executor
        self._executor: ThreadPoolExecutor | None = executor  # else created by the first run
        self._errors = ErrorLog(log)
        self._failures = 0  # runs in a row that raised

    async def __aenter__(self) -> HealthChecker:
        """Use as ``async with HealthChecker(...) as checker:``; closes the connection on exit."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the kept connection."""
        self.close()

    def close(self) -> None:
        """Close the kept read-only connection (a later run opens a new one). Never blocks: if
        a run is in progress (e.g. ``run()`` was cancelled during a long integrity check), its
        query is interrupted and the connection is closed when that run ends."""
        if self._executor is not None and self._shared_executor is None:
            self._executor.shutdown(wait=False)  # a run in progress still finishes
            self._executor = None
        if self._lock.acquire(blocking=False):
            try:
                self._drop_connection()
            finally:
                self._lock.release()
            return
        self._close_requested = True
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.interrupt()

    def next_due(self) -> float:
        """The earliest time (unix seconds) a check is due; ``-inf`` before the first run."""
        return min((self._next_due.get(c.name, -math.inf) for c in self.checks), default=math.inf)

    async def run_once(self, now: float | None = None) -> list[CheckResult]:
        """Run every check that is due at ``now`` (default: the current time) and return their
        results, in configuration order. Never raises for a failing check."""
        t = time.time() if now is None else now
        due = [c for c in self.checks if self._next_due.get(c.name, -math.inf) <= t]
        results: list[CheckResult] = []
        if due:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="replicator-health",
                                                    initializer=name_os_thread)
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_checks, due, t)
            for c in due:
                self._next_due[c.name] = t + c.interval
            for r in results:
                self._record(r)
                self.last_results[r.check] = r
            await self._report_changes(results)
        if self.notifier is not None:
            await self.notifier.flush(t)
        return results

    async def step(self) -> float:
        """Run the checks that are due (:meth:`run_once`) and return how many seconds to wait
        before the next step: until the next check is due, or a backoff after a run that
        failed (a bug in one run must not stop health checking)."""
        try:
            await self.run_once()
        except Exception as exc:  # noqa: BLE001 - logged, and tried again after a backoff
            self._failures += 1
            self._errors.error(f"{type(exc).__name__}: {exc}",
                               f"{self.db}: health check run failed: ")
            return CHORE_RETRY.delay(self._failures)
        self._failures = 0
        # with a notifier, its held-back notices are flushed at least this often
        cap = DEFAULT_INTERVAL if self.notifier is not None else NO_CHECK_DUE
        return min(max(self.next_due() - time.time(), 0.1), cap)

    async def run(self, stop_event: asyncio.Event) -> None:
        """Run checks as they fall due (:meth:`step`) until ``stop_event`` is set."""
        try:
            while not stop_event.is_set():
                await wait_event(stop_event, await self.step())
        finally:
            self.close()

    # -- in the worker thread ------------------------------------------------------------------

    def _run_checks(self, due: list[Check], now: float) -> list[CheckResult]:
        with self._lock:
            conn: sqlite3.Connection | None = None
            open_error: Exception | None = None
            if any(not isinstance(c, SizeCheck) for c in due):
                try:
                    conn = self._connection()
                except (sqlite3.Error, OSError) as e:
                    open_error = e
            if conn is not None:
                try:
                    self._begin(conn, integrity=any(isinstance(c, IntegrityCheck) for c in due))
                except sqlite3.Error as e:
                    conn, open_error = None, e
            results = [self._run_one(conn, open_error, c, now) for c in due]
            bad = any(not r.ran or (r.kind == "integrity" and not r.ok) for r in results)
            if conn is not None and conn.in_transaction:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error:
                    bad = True
            if bad or self._close_requested:
                # start from a fresh connection after an error or a corruption
                self._drop_connection()
                self._close_requested = False
            return results

    @staticmethod
    def _begin(conn: sqlite3.Connection, *, integrity: bool) -> None:
        """Start the run's one read transaction (each start of a read transaction reads the
        WAL-index header: see the module docstring)."""
        if conn.in_transaction:
            conn.execute("COMMIT")
        if integrity:
            # drop cached pages so the integrity check verifies what is on disk now
            conn.execute("PRAGMA shrink_memory").close()
        conn.execute("BEGIN DEFERRED")

    def _connection(self) -> sqlite3.Connection:
        st = os.stat(self.db_path)
        ident = (st.st_dev, st.st_ino)
        if self._conn is not None and self._conn_ident != ident:
            self._drop_connection()  # the file was replaced (e.g. restored): reopen
        if self._conn is None:
            self._conn = _connect_ro(self.db_path, self.busy_timeout, any_thread=True)
            self._conn_ident = ident
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._conn_ident = None

    def _run_one(
        self,
        conn: sqlite3.Connection | None,
        open_error: Exception | None,
        check: Check,
        now: float,
    ) -> CheckResult:
        kind = _kind(check)
        try:
            if isinstance(check, SizeCheck):
                ok, value, reason = self._size(check)
            elif conn is None:
                raise open_error or _CouldNotRun("no connection")
            elif isinstance(check, IntegrityCheck):
                ok, value, reason = self._integrity(conn, check)
            elif isinstance(check, FreshnessCheck):
                ok, value, reason = self._freshness(conn, check, now)
            else:
                ok, value, reason = self._threshold(conn, check)
        except Exception as e:  # any failure is a failing result, never an exception
            if (
                isinstance(check, IntegrityCheck)
                and isinstance(e, sqlite3.Error)
                and getattr(e, "sqlite_errorname", "") in CORRUPTION_ERRORS
            ):
                return CheckResult(self.db, check.name, kind, False, 1.0, _truncate(str(e)), now)
            what = str(e) if isinstance(e, _CouldNotRun) else f"{type(e).__name__}: {e}"
            return CheckResult(
                self.db, check.name, kind, False, None, _truncate(what), now, ran=False
            )
        return CheckResult(self.db, check.name, kind, ok, value, _truncate(reason), now)

    def _with_deadline(self, conn: sqlite3.Connection, sql: str) -> object:
        deadline = time.monotonic() + self.query_timeout
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)
        try:
            return _query_one(conn, sql)
        finally:
            conn.set_progress_handler(None, 0)

    def _integrity(
        self, conn: sqlite3.Connection, check: IntegrityCheck
    ) -> tuple[bool, float, str]:
        problems = _run_integrity(conn, check.quick)
        if problems:
            return False, float(len(problems)), "; ".join(problems)
        return True, 0.0, "ok"

    def _freshness(
        self, conn: sqlite3.Connection, check: FreshnessCheck, now: float
    ) -> tuple[bool, float, str]:
        raw = self._with_deadline(conn, check.sql)
        try:
            ts = parse_timestamp(raw)
        except ValueError as e:
            raise _CouldNotRun(str(e)) from None
        age = now - ts
        last = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")
        if age > check.max_age:
            return False, age, (
                f"stale: newest {last}, age {_fmt_duration(age)} > max "
                f"{_fmt_duration(check.max_age)}"
            )
        return True, age, f"newest {last}, age {_fmt_duration(age)}"

    def _size(self, check: SizeCheck) -> tuple[bool, float, str]:
        db = os.path.getsize(self.db_path)
        try:
            wal = os.path.getsize(self.db_path + "-wal")
        except FileNotFoundError:
            wal = 0
        total = db + wal
        sizes = f"db {fmt_bytes(db)} + wal {fmt_bytes(wal)} = {fmt_bytes(total)}"
        if total > check.max_bytes:
            return False, float(total), f"too large: {sizes} > max {fmt_bytes(check.max_bytes)}"
        return True, float(total), sizes

    def _threshold(
        self, conn: sqlite3.Connection, check: SqlThresholdCheck
    ) -> tuple[bool, float, str]:
        raw = self._with_deadline(conn, check.sql)
        if raw is None:
            raise _CouldNotRun("query returned NULL")
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _CouldNotRun(f"query returned a non-number: {str(raw)[:64]!r}") from None
        rule = f"{check.op} {_fmt_number(check.threshold)}"
        if OPERATORS[check.op](value, check.threshold):
            return False, value, f"value {_fmt_number(value)} {rule}"
        return True, value, f"value {_fmt_number(value)} (fails if {rule})"

    # -- back in the event loop ----------------------------------------------------------------

    def _record(self, r: CheckResult) -> None:
        level = logging.INFO if r.ok else logging.WARNING
        value = "" if r.value is None else f" (value {r.value:g})"
        state = "ok" if r.ok else "FAILING" if r.ran else "could not run"
        log.log(level, "%s: health check %s: %s: %s%s", r.db, r.check, state, r.reason, value)
        m = self.metrics
        if m is None:
            return
        if not r.ran:
            m.errors.labels(db=r.db, replica="", operation=HEALTH_CHECK_OPERATION).inc()
        if r.kind == "integrity":
            # "could not run" says nothing about corruption: keep the last verdict
            if r.ran:
                m.integrity_check_ok.labels(db=r.db).set(1 if r.ok else 0)
                m.integrity_check_timestamp.labels(db=r.db).set(r.timestamp)
            return
        m.health_check_ok.labels(db=r.db, check=r.check).set(1 if r.ok else 0)
        if r.value is not None:
            m.health_check_value.labels(db=r.db, check=r.check).set(r.value)
        m.health_check_timestamp.labels(db=r.db, check=r.check).set(r.timestamp)

    async def _report_changes(self, results: list[CheckResult]) -> None:
        for r in results:
            before = self._ok.get(r.check)
            self._ok[r.check] = r.ok
            if self.notifier is None or before == r.ok or (before is None and r.ok):
                continue
            await self.notifier.notify(
                r.db, r.check, RECOVERED if r.ok else FAILING, r.reason,
                value=r.value, now=r.timestamp,
            )
