"""Health checks on a live WAL-mode database: freshness, size, custom SQL and integrity checks
fire and recover, notify by e-mail and webhook, and never make a concurrent writer see
SQLITE_BUSY."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeservers import SMTP_PASSWORD, SMTP_USER, SmtpTestServer, WebhookTestServer, body_of

from replicator.errors import ConfigError
from replicator.health import (
    CheckResult,
    FreshnessCheck,
    HealthChecker,
    IntegrityCheck,
    SizeCheck,
    SqlThresholdCheck,
    integrity_check,
    parse_timestamp,
)
from replicator.metrics import Metrics, create_metrics
from replicator.notify import Notifier, SmtpNotifier, WebhookNotifier

HOUR = 3600.0
FRESHNESS_SQL = "SELECT MAX(created_at) FROM releases"
ENDLESS_SQL = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c"
MakeChecker = Callable[..., HealthChecker]
OVERDUE_SQL = (
    "SELECT COUNT(*) FROM releases WHERE notified = 0 AND release_date < date('now', '-1 day')"
)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def db_and_wal_size(path: str) -> int:
    return os.path.getsize(path) + os.path.getsize(path + "-wal")


def patch_file(path: str, offset: int, data: bytes) -> bytes:
    """Overwrite bytes at ``offset``; return what was there."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(len(data))
        f.seek(offset)
        f.write(data)
    return old


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    v = m.registry.get_sample_value(name, labels)
    return None if v is None else float(v)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    """A WAL-mode database shaped like the DBA plan's: a ``releases`` table."""
    path = str(tmp_path / "app.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(
        "CREATE TABLE releases (id INTEGER PRIMARY KEY, title TEXT, created_at TEXT, "
        "notified INTEGER NOT NULL DEFAULT 0, release_date TEXT)"
    )
    conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    conn.close()
    return path


@pytest.fixture
def writer(db_path: str) -> Iterator[sqlite3.Connection]:
    """The application's connection, kept open (so the -wal file stays) between check runs."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    yield conn
    conn.close()


@pytest.fixture
def make_checker() -> Iterator[Callable[..., HealthChecker]]:
    """Builds HealthCheckers and closes their connections at teardown."""
    made: list[HealthChecker] = []

    def make(*args: Any, **kwargs: Any) -> HealthChecker:
        made.append(HealthChecker(*args, **kwargs))
        return made[-1]

    yield make
    for checker in made:
        checker.close()


def by_check(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.check: r for r in results}


async def test_freshness_size_and_sql_checks_fire_notify_and_recover(
    db_path: str,
    writer: sqlite3.Connection,
    metrics: Metrics,
    smtp_plain: SmtpTestServer,
    webhook: WebhookTestServer,
    caplog: pytest.LogCaptureFixture,
    make_checker: MakeChecker,
) -> None:
    t0 = time.time()
    writer.execute(
        "INSERT INTO releases (title, created_at, notified, release_date) "
        "VALUES ('v1', ?, 1, '2000-01-01')",
        (iso(t0),),
    )
    base_size = db_and_wal_size(db_path)
    notifier = Notifier(
        [
            SmtpNotifier(
                "127.0.0.1", smtp_plain.port, username=SMTP_USER, password=SMTP_PASSWORD,
                sender="replicator@example.test", recipients=["dba@example.test"], timeout=5,
            ),
            WebhookNotifier(webhook.url, timeout=5),
        ],
        metrics=metrics, min_interval=600, hostname="db-host",
    )
    checker = make_checker(
        db_path,
        [
            FreshnessCheck("releases_fresh", FRESHNESS_SQL, max_age=25 * HOUR),
            SizeCheck("size", max_bytes=base_size + 512 * 1024),
            SqlThresholdCheck.from_fail_if("overdue", OVERDUE_SQL, "> 100"),
        ],
        metrics=metrics, notifier=notifier, db_label="app",
    )

    # 1. all healthy: metrics set, nothing notified
    with caplog.at_level(logging.INFO, logger="replicator.health"):
        results = await checker.run_once(now=t0 + 60)
    assert [(r.check, r.ok) for r in results] == [
        ("releases_fresh", True), ("size", True), ("overdue", True)
    ]
    assert len([r for r in caplog.records if r.name == "replicator.health"]) == 3
    for check in ("releases_fresh", "size", "overdue"):
        assert sample(metrics, "replicator_health_check_ok", db="app", check=check) == 1
        assert sample(
            metrics, "replicator_health_check_timestamp_seconds", db="app", check=check
        ) == t0 + 60
    assert sample(metrics, "replicator_health_check_value", db="app", check="overdue") == 0
    assert sample(
        metrics, "replicator_health_check_value", db="app", check="releases_fresh"
    ) == pytest.approx(60, abs=1)
    assert smtp_plain.messages == [] and webhook.payloads == []

    # 2. the application writes: 150 overdue rows and a 1 MiB blob; 26 h pass with no release
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.executemany(
        "INSERT INTO releases (title, created_at, release_date) VALUES (?, ?, '2000-01-01')",
        [(f"r{i}", iso(t0)) for i in range(150)],
    )
    writer.execute("INSERT INTO blobs (data) VALUES (zeroblob(1048576))")
    t1 = t0 + 26 * HOUR
    results = await checker.run_once(now=t1)
    r = by_check(results)
    assert [x.ok for x in results] == [False, False, False]
    assert r["overdue"].reason == "value 150 > 100"
    assert r["releases_fresh"].reason.startswith("stale: newest ")
    assert r["size"].reason.startswith("too large: ")
    for check in ("releases_fresh", "size", "overdue"):
        assert sample(metrics, "replicator_health_check_ok", db="app", check=check) == 0
    assert sample(metrics, "replicator_health_check_value", db="app", check="overdue") == 150
    assert sample(
        metrics, "replicator_health_check_value", db="app", check="releases_fresh"
    ) == pytest.approx(26 * HOUR, abs=1)

    mails = {m["Subject"]: body_of(m) for _, _, m in smtp_plain.messages}
    assert set(mails) == {
        f"[replicator] FAILING: {c} on app (db-host)" for c in ("releases_fresh", "size", "overdue")
    }
    assert "reason: value 150 > 100\n" in mails["[replicator] FAILING: overdue on app (db-host)"]
    assert {(p["check"], p["state"]) for p in webhook.payloads} == {
        ("releases_fresh", "failing"), ("size", "failing"), ("overdue", "failing")
    }
    assert all(p["hostname"] == "db-host" and p["db"] == "app" for p in webhook.payloads)
    overdue = next(p for p in webhook.payloads if p["check"] == "overdue")
    assert overdue["reason"] == "value 150 > 100" and overdue["value"] == 150

    # 3. still failing a minute later: not a change, nothing re-sent
    assert all(not x.ok for x in await checker.run_once(now=t1 + 60))
    assert len(webhook.payloads) == 3 and len(smtp_plain.messages) == 3

    # 4. the application catches up: a fresh release, rows notified, blob gone, WAL truncated
    writer.execute(
        "INSERT INTO releases (title, created_at, release_date) VALUES ('v2', ?, '2000-01-01')",
        (iso(t1 + 100),),
    )
    writer.execute("UPDATE releases SET notified = 1")
    writer.execute("DELETE FROM blobs")
    writer.execute("VACUUM")
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    results = await checker.run_once(now=t1 + 120)
    assert [x.ok for x in results] == [True, True, True]
    for check in ("releases_fresh", "size", "overdue"):
        assert sample(metrics, "replicator_health_check_ok", db="app", check=check) == 1
    recovered = webhook.payloads[3:]
    assert {(p["check"], p["state"]) for p in recovered} == {
        ("releases_fresh", "recovered"), ("size", "recovered"), ("overdue", "recovered")
    }
    assert next(p for p in recovered if p["check"] == "overdue")["reason"] == (
        "value 0 (fails if > 100)"
    )
    assert [m["X-Replicator-State"] for _, _, m in smtp_plain.messages[3:]] == ["recovered"] * 3

    # 5. overdue fails again within 10 min of its last failure e-mail: held back (rate limit) ...
    writer.executemany(
        "INSERT INTO releases (title, created_at, release_date) VALUES (?, ?, '2000-01-01')",
        [(f"s{i}", iso(t1 + 100)) for i in range(101)],
    )
    results = await checker.run_once(now=t1 + 180)
    assert [x.ok for x in results] == [True, True, False]
    assert sample(metrics, "replicator_health_check_ok", db="app", check="overdue") == 0
    assert len(webhook.payloads) == 6 and len(smtp_plain.messages) == 6
    # ... and sent once the interval has passed, as it is still failing
    await checker.run_once(now=t1 + 600)
    assert webhook.payloads[-1]["check"] == "overdue"
    assert webhook.payloads[-1]["state"] == "failing"
    assert webhook.payloads[-1]["reason"] == "value 101 > 100"
    assert len(webhook.payloads) == 7 and len(smtp_plain.messages) == 7
    assert sample(
        metrics, "replicator_errors_total", db="app", replica="", operation="notify"
    ) is None


async def test_integrity_check_healthy_then_corrupted_flips_metric(
    tmp_path: Path, metrics: Metrics, webhook: WebhookTestServer, make_checker: MakeChecker
) -> None:
    src = str(tmp_path / "src.db")
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE INDEX t_v ON t (v)")
    conn.executemany(
        "INSERT INTO t (v) VALUES (?)", [(f"{i:06d}" + "x" * 60,) for i in range(3000)]
    )
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    leaf_page = conn.execute("PRAGMA page_count").fetchone()[0] // 2
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    copy = str(tmp_path / "copy.db")
    shutil.copy(src, copy)

    assert integrity_check(copy) == (True, "ok")
    notifier = Notifier([WebhookNotifier(webhook.url, timeout=5)], metrics=metrics)
    checker = make_checker(
        copy, [IntegrityCheck(quick=False, interval=60)], metrics=metrics, notifier=notifier,
        db_label="copy",
    )
    [r] = await checker.run_once(now=1000.0)
    assert r.ok and r.reason == "ok"
    assert sample(metrics, "replicator_integrity_check_ok", db="copy") == 1
    assert sample(metrics, "replicator_integrity_check_timestamp_seconds", db="copy") == 1000.0
    # the integrity check reports through its own gauges only
    assert sample(metrics, "replicator_health_check_ok", db="copy", check="integrity") is None

    # not due again before its interval
    assert await checker.run_once(now=1030.0) == []

    # scribble over the cell pointers of a b-tree page in the middle of the file
    offset = (leaf_page - 1) * page_size + 8
    good = patch_file(copy, offset, b"\xde\xad\xbe\xef" * 16)
    [r] = await checker.run_once(now=1060.0)
    assert not r.ok and r.ran
    assert f"page {leaf_page}" in r.reason.lower()
    assert sample(metrics, "replicator_integrity_check_ok", db="copy") == 0
    assert sample(metrics, "replicator_integrity_check_timestamp_seconds", db="copy") == 1060.0
    [p] = webhook.payloads
    assert (p["check"], p["state"], p["db"]) == ("integrity", "failing", "copy")
    assert p["reason"] == r.reason
    ok, reason = integrity_check(copy)
    assert not ok and f"page {leaf_page}" in reason.lower()
    ok, reason = integrity_check(copy, quick=True)
    assert not ok
    assert integrity_check(src) == (True, "ok")  # the original is untouched

    # repaired: the metric flips back and the recovery is sent
    patch_file(copy, offset, good)
    [r] = await checker.run_once(now=1120.0)
    assert r.ok
    assert sample(metrics, "replicator_integrity_check_ok", db="copy") == 1
    assert [(p["check"], p["state"]) for p in webhook.payloads] == [
        ("integrity", "failing"), ("integrity", "recovered")
    ]


def test_integrity_check_on_bad_or_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    ok, reason = integrity_check(str(junk))
    assert not ok and "not a database" in reason
    ok, reason = integrity_check(str(tmp_path / "missing.db"))
    assert not ok and "no such file" in reason
    assert not (tmp_path / "missing.db").exists()


def test_integrity_check_not_live_leaves_no_files_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "restored.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    assert sorted(os.listdir(tmp_path)) == ["restored.db"]
    assert integrity_check(str(path), live=False) == (True, "ok")
    assert sorted(os.listdir(tmp_path)) == ["restored.db"]


async def test_corrupt_database_fails_the_other_checks_without_raising(
    tmp_path: Path, metrics: Metrics, make_checker: MakeChecker
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x01" * 8192)
    checker = make_checker(
        str(junk),
        [IntegrityCheck(), FreshnessCheck("fresh", FRESHNESS_SQL, 60), SizeCheck("size", 10**9)],
        metrics=metrics,
    )
    results = await checker.run_once(now=5.0)
    assert [(r.check, r.ok, r.ran) for r in results] == [
        ("integrity", False, True), ("fresh", False, False), ("size", True, True)
    ]
    assert "not a database" in results[0].reason
    assert sample(metrics, "replicator_integrity_check_ok", db=str(junk)) == 0


async def test_sql_errors_are_failing_results_and_nothing_is_written(
    db_path: str,
    writer: sqlite3.Connection,
    metrics: Metrics,
    webhook: WebhookTestServer,
    make_checker: MakeChecker,
) -> None:
    writer.execute("INSERT INTO releases (title, created_at) VALUES ('a', '2024-01-01 00:00:00')")
    notifier = Notifier([WebhookNotifier(webhook.url, timeout=5)], metrics=metrics)
    checker = make_checker(
        db_path,
        [
            SqlThresholdCheck("missing_table", "SELECT COUNT(*) FROM nope", ">", 0),
            SqlThresholdCheck("writes", "DELETE FROM releases RETURNING id", ">", 5),
            SqlThresholdCheck("two", "SELECT 1; SELECT 2", ">", 5),
            SqlThresholdCheck("text", "SELECT 'abc'", ">", 5),
            SqlThresholdCheck("null", "SELECT NULL", ">", 5),
            SqlThresholdCheck("norows", "SELECT 1 WHERE 0", ">", 5),
            FreshnessCheck("empty", "SELECT MAX(created_at) FROM releases WHERE 0", 60),
            FreshnessCheck("garbage", "SELECT 'yesterday-ish'", 60),
        ],
        metrics=metrics,
        notifier=notifier,
    )
    results = await checker.run_once(now=1e9)
    reasons = {r.check: r.reason for r in results}
    assert all(not r.ok and not r.ran for r in results)
    assert "no such table: nope" in reasons["missing_table"]
    assert "readonly" in reasons["writes"]
    assert "one statement" in reasons["two"]
    assert "non-number" in reasons["text"]
    assert reasons["null"] == "query returned NULL"
    assert reasons["norows"] == "query returned no rows"
    assert reasons["empty"] == "query returned NULL"
    assert "not an ISO-8601 timestamp" in reasons["garbage"]
    assert writer.execute("SELECT COUNT(*) FROM releases").fetchone() == (1,)
    assert sample(metrics, "replicator_health_check_ok", db=db_path, check="writes") == 0
    assert sample(metrics, "replicator_health_check_value", db=db_path, check="writes") is None
    assert sample(
        metrics, "replicator_errors_total", db=db_path, replica="", operation="health_check"
    ) == len(results)
    # the first result of a check that fails is a change: notified
    assert len(webhook.payloads) == len(results)
    assert {p["state"] for p in webhook.payloads} == {"failing"}


async def test_slow_query_is_interrupted(
    db_path: str, metrics: Metrics, make_checker: MakeChecker
) -> None:
    checker = make_checker(
        db_path, [SqlThresholdCheck("slow", ENDLESS_SQL, ">", 0)], metrics=metrics,
        query_timeout=0.2,
    )
    start = time.monotonic()
    [r] = await checker.run_once(now=1.0)
    assert time.monotonic() - start < 5
    assert not r.ok and "interrupted" in r.reason


async def test_cancelling_run_interrupts_a_long_check(db_path: str, metrics: Metrics) -> None:
    checker = HealthChecker(
        db_path, [SqlThresholdCheck("slow", ENDLESS_SQL, ">", 0)], metrics=metrics,
        query_timeout=120,
    )
    task = asyncio.create_task(checker.run(asyncio.Event()))
    await asyncio.sleep(0.3)
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # close() did not block the loop; it interrupted the query, and the run closed the connection
    assert time.monotonic() - start < 1
    for _ in range(100):
        if checker._conn is None:
            break
        await asyncio.sleep(0.05)
    assert checker._conn is None
    assert time.monotonic() - start < 5


def replace_db(path: str, rows: int) -> None:
    tmp = path + ".new"
    conn = sqlite3.connect(tmp, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(rows)])
    conn.close()
    os.replace(tmp, path)


async def test_a_replaced_database_file_is_reopened(
    tmp_path: Path, metrics: Metrics, make_checker: MakeChecker
) -> None:
    path = str(tmp_path / "swap.db")
    replace_db(path, 3)
    checker = make_checker(
        path, [SqlThresholdCheck("rows", "SELECT COUNT(*) FROM t", ">", 100, 1)], metrics=metrics
    )
    [r] = await checker.run_once(now=1.0)
    assert r.value == 3
    replace_db(path, 7)  # e.g. a restore put a new file in place
    [r] = await checker.run_once(now=2.0)
    assert r.value == 7


async def test_missing_database_is_a_failing_result(
    tmp_path: Path, metrics: Metrics, make_checker: MakeChecker
) -> None:
    path = str(tmp_path / "gone.db")
    checker = make_checker(
        path,
        [IntegrityCheck(), SqlThresholdCheck("n", "SELECT 1", ">", 5), SizeCheck("size", 1)],
        metrics=metrics,
    )
    results = await checker.run_once(now=1.0)
    assert [(r.ok, r.ran) for r in results] == [(False, False)] * 3
    assert "No such file" in results[0].reason
    assert os.listdir(tmp_path) == []  # a read-only open never creates the file
    # could not run says nothing about corruption: the integrity gauge is left alone
    assert sample(metrics, "replicator_integrity_check_ok", db=path) is None


async def test_writer_with_no_busy_timeout_never_sees_busy_while_checks_run(db_path: str) -> None:
    """A writer committing flat out with busy_timeout=0 while every kind of check runs.

    SQLite leaves one microsecond-wide race that any reader can trigger (see the module docstring
    of replicator.health); one read transaction per run on a kept connection makes it rare
    enough that 180 consecutive runs of this test under load saw no SQLITE_BUSY."""
    errors: list[BaseException] = []
    commits = 0
    stop = threading.Event()
    writing = threading.Event()

    def write() -> None:
        nonlocal commits
        # The application is up (connection open, schema read) before the checker starts, as
        # with a sidecar; two connections opening the same WAL database at the same instant is
        # a different race, between any two openers, and not what this test is about.
        try:
            conn = sqlite3.connect(db_path, isolation_level=None, timeout=0)
            conn.execute("PRAGMA synchronous = NORMAL")  # commit fast: no fsync per commit
        except BaseException as e:
            errors.append(e)
            return
        finally:
            writing.set()
        try:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(
                        "INSERT INTO releases (title, created_at, release_date) "
                        "VALUES (?, CURRENT_TIMESTAMP, '2000-01-01')",
                        (f"t{i}",),
                    )
                    conn.execute("UPDATE releases SET notified = 1 WHERE id = ?", (i // 2,))
                    conn.execute("COMMIT")
                    commits += 1
                except sqlite3.Error as e:
                    errors.append(e)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
        finally:
            conn.close()

    seed = sqlite3.connect(db_path)
    seed.execute("INSERT INTO releases (title, created_at) VALUES ('seed', CURRENT_TIMESTAMP)")
    seed.commit()
    seed.close()
    metrics = create_metrics()
    checker = HealthChecker(
        db_path,
        [
            IntegrityCheck(quick=False, interval=1e-6),
            FreshnessCheck("fresh", FRESHNESS_SQL, 3600, interval=1e-6),
            SqlThresholdCheck("overdue", OVERDUE_SQL, ">", 1e9, interval=1e-6),
            SizeCheck("size", 10**9, interval=1e-6),
        ],
        metrics=metrics,
    )

    async def check_repeatedly() -> int:
        runs = 0
        deadline = time.monotonic() + 1.5
        async with checker:
            while time.monotonic() < deadline:
                results = await checker.run_once()
                assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
                runs += 1
        return runs

    t = threading.Thread(target=write)
    t.start()
    try:
        assert writing.wait(10)
        assert errors == []
        runs = await check_repeatedly()
    finally:
        stop.set()
        t.join(10)
    assert errors == []
    assert runs >= 5
    assert commits >= 50


async def test_run_loop_runs_checks_until_stopped(db_path: str, metrics: Metrics) -> None:
    checker = HealthChecker(
        db_path, [SqlThresholdCheck("n", "SELECT COUNT(*) FROM releases", ">", 5, 0.05)],
        metrics=metrics,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(checker.run(stop))
    await asyncio.sleep(0.4)
    first = sample(metrics, "replicator_health_check_timestamp_seconds", db=db_path, check="n")
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 5)
    last = sample(metrics, "replicator_health_check_timestamp_seconds", db=db_path, check="n")
    assert first is not None and last is not None and last > first
    assert sample(metrics, "replicator_health_check_ok", db=db_path, check="n") == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2024-05-01 12:00:00", 1714564800.0),
        ("2024-05-01T12:00:00Z", 1714564800.0),
        ("2024-05-01T21:00:00+09:00", 1714564800.0),
        ("2024-05-01T12:00:00.500", 1714564800.5),
        ("2024-05-01", 1714521600.0),
        (1714564800, 1714564800.0),
        (1714564800.25, 1714564800.25),
        (" 1714564800 ", 1714564800.0),
    ],
)
def test_parse_timestamp(raw: object, expected: float) -> None:
    assert parse_timestamp(raw) == expected


@pytest.mark.parametrize("raw", [None, "soon", b"\x00", "2024-13-01"])
def test_parse_timestamp_rejects(raw: object) -> None:
    with pytest.raises(ValueError):
        parse_timestamp(raw)


def test_fail_if_parsing_and_validation() -> None:
    c = SqlThresholdCheck.from_fail_if("n", "SELECT 1", ">= 100")
    assert (c.op, c.threshold) == (">=", 100.0)
    c = SqlThresholdCheck.from_fail_if("n", "SELECT 1", "!=0.5")
    assert (c.op, c.threshold) == ("!=", 0.5)
    for bad in ("100", "=> 5", "> lots", ""):
        with pytest.raises(ConfigError, match="fail_if"):
            SqlThresholdCheck.from_fail_if("n", "SELECT 1", bad)
    with pytest.raises(ConfigError, match="op"):
        SqlThresholdCheck("n", "SELECT 1", "=", 1)
    with pytest.raises(ConfigError, match="duplicate"):
        HealthChecker("x.db", [SizeCheck("a", 1), SizeCheck("a", 2)])
    with pytest.raises(ConfigError, match="interval"):
        HealthChecker("x.db", [SizeCheck("a", 1, interval=0)])


@pytest.mark.parametrize(
    ("op", "value", "fails"),
    [(">", 101, True), (">", 100, False), (">=", 100, True), ("<", 5, True), ("<=", 6, False),
     ("==", 7, True), ("!=", 7, False)],
)
async def test_threshold_operators(
    db_path: str, metrics: Metrics, op: str, value: int, fails: bool, make_checker: MakeChecker
) -> None:
    threshold = {">": 100, ">=": 100, "<": 6, "<=": 5, "==": 7, "!=": 7}[op]
    checker = make_checker(
        db_path, [SqlThresholdCheck("v", f"SELECT {value}", op, threshold)], metrics=metrics
    )
    [r] = await checker.run_once(now=1.0)
    assert r.ok is not fails and r.value == value
