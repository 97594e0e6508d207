"""Scheduled maintenance on a real replicated database, with the clock set by the test:
optimize refreshes stale statistics, VACUUM shrinks the file and is followed by a snapshot (the
replica restores the vacuumed database), a TRUNCATE checkpoint empties the WAL, and neither
optimize nor VACUUM runs while a writer with no busy timeout is committing (it never sees
SQLITE_BUSY). Failures reach notify."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import util
from fakeservers import WebhookTestServer
from svcutil import running_service
from writer import init_db

from replicator import maintenance
from replicator.config import DbConfig, load_config
from replicator.errors import ConfigError
from replicator.maintenance import MaintenanceConfig, When, parse_when
from replicator.notify import Notifier, WebhookNotifier
from replicator.replicator import DatabaseService

UTC = dt.UTC
MON_9 = dt.datetime(2026, 11, 30, 9, 0, tzinfo=UTC).timestamp()  # a Monday


@pytest.mark.parametrize(("text", "after", "expected"), [
    ("03:00", MON_9, dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC)),
    ("09:30", MON_9, dt.datetime(2026, 11, 30, 9, 30, tzinfo=UTC)),
    ("Sun 03:00", MON_9, dt.datetime(2026, 12, 6, 3, 0, tzinfo=UTC)),
    ("mon 09:00", MON_9, dt.datetime(2026, 12, 7, 9, 0, tzinfo=UTC)),  # strictly after
    ("Mon 09:01", MON_9, dt.datetime(2026, 11, 30, 9, 1, tzinfo=UTC)),
])
def test_when_is_the_next_such_moment(text: str, after: float, expected: dt.datetime) -> None:
    assert parse_when(text, "w").next_after(after) == expected.timestamp()


@pytest.mark.parametrize("bad", ["3am", "Sun", "25:00", "Sun 03:60", "Someday 03:00", 3])
def test_bad_when_is_an_error_naming_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"^dbs\[0\].maintenance.vacuum.when: expected HH:MM"):
        parse_when(bad, "dbs[0].maintenance.vacuum.when")


def test_config_defaults_and_full_form(tmp_path: Path) -> None:
    p = tmp_path / "r.yml"
    p.write_text("""
dbs:
  - {path: /d/a.db, replicas: [/b]}
  - path: /d/b.db
    replicas: [/c]
    maintenance:
      optimize: 12h
      checkpoint: {mode: truncate, when: "Sun 03:00", timeout: 5s}
      vacuum: {when: "Sun 03:30", max-size: 2GB, max-duration: 2m}
  - path: /d/c.db
    replicas: [/e]
    maintenance: {optimize: off}
""")
    a, b, c = load_config(str(p)).dbs
    assert a.maintenance == MaintenanceConfig()  # optimize every 24h, nothing else
    assert b.maintenance == MaintenanceConfig(
        optimize=12 * 3600.0, optimize_analyze=True, checkpoint=When(3, 0, 6),
        checkpoint_timeout=5.0,
        vacuum=When(3, 30, 6), vacuum_max_size=2 * 10**9, vacuum_max_duration=120.0)
    assert c.maintenance.optimize is None
    p.write_text("dbs:\n  - path: /d/a.db\n    replicas: [/b]\n"
                 "    maintenance: {checkpoint: {mode: passive, when: '03:00'}}\n")
    with pytest.raises(ConfigError, match=r"maintenance.checkpoint.mode: only truncate"):
        load_config(str(p))


def make_db(path: Path) -> None:
    """An analyzed table that then grew 100-fold, and many deleted large rows: stale statistics
    and free pages."""
    init_db(str(path))
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("BEGIN")
    c.executemany("INSERT INTO data(k, payload) VALUES (?, ?)", [(i, b"p" * 50)
                                                                 for i in range(100)])
    c.execute("COMMIT")
    c.execute("ANALYZE")
    c.execute("BEGIN")
    c.executemany("INSERT INTO data(k, payload) VALUES (?, ?)", [(i, b"p" * 50)
                                                                 for i in range(10_000)])
    c.executemany("INSERT INTO data(k, payload) VALUES (-1, ?)", [(b"x" * 4000,)] * 3000)
    c.execute("COMMIT")
    c.execute("DELETE FROM data WHERE k = -1")
    c.close()


def db_config(tmp_path: Path, maintenance: str) -> DbConfig:
    """A database made by :func:`make_db`, replicated to ``rep``, with this maintenance."""
    db = tmp_path / "app.db"
    make_db(db)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n    replicas: [{tmp_path / 'rep'}]\n"
                   f"    maintenance: {maintenance}\n")
    return load_config(str(cfg)).dbs[0]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[DatabaseService]:
    async with running_service(db_config(tmp_path, (
            '{optimize: 24h, checkpoint: {mode: truncate, when: "Sun 03:00", timeout: 2s}, '
            'vacuum: {when: "Sun 03:30", max-size: 100MB}}'))) as svc:
        yield svc


async def test_default_optimize_only_reports_stale_statistics(tmp_path: Path) -> None:
    """Without ``optimize`` in the config nothing takes the write lock: stale statistics are
    reported in the skipped run's reason and left as they are."""
    svc = DatabaseService(db_config(tmp_path, "{}"))
    await svc.open()
    try:
        db = Path(svc.cfg.path)
        svc.last_commit = 0.0  # quiet
        svc.maintainer.tasks["optimize"].next_at = MON_9
        [(task, result, detail)] = await svc.maintainer.run_due(now=MON_9)
        assert (task, result) == ("optimize", "skipped"), detail
        assert "ANALYZE" in detail and "maintenance.optimize" in detail
        assert stat_rows(db) == 100
    finally:
        await svc.close(5.0)


def stat_rows(db: Path) -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = c.execute("SELECT stat FROM sqlite_stat1 WHERE idx = 'data_k'").fetchone()
        return int(row[0].split()[0])
    finally:
        c.close()


async def test_tasks_run_when_due_and_the_replica_follows(
    service: DatabaseService, tmp_path: Path
) -> None:
    db = Path(service.cfg.path)
    m = service.maintainer
    t0 = MON_9
    m.tasks["optimize"].next_at = t0
    m.tasks["checkpoint"].next_at = When(3, 0, 6).next_after(t0)
    m.tasks["vacuum"].next_at = When(3, 30, 6).next_after(t0)
    service.last_commit = 0.0  # quiet
    assert stat_rows(db) == 100
    assert await m.run_due(now=t0 - 1) == []  # nothing due yet
    [(task, result, detail)] = await m.run_due(now=t0)
    assert (task, result) == ("optimize", "ok") and "ANALYZE" in detail
    assert stat_rows(db) > 100
    assert m.tasks["optimize"].next_at == t0 + 86400

    snaps = service.metrics.registry.get_sample_value("replicator_snapshots_total",
                                                      {"db": service.cfg.name}) or 0
    generation = service.db.generation
    sunday = dt.datetime(2026, 12, 6, 3, 30, tzinfo=UTC).timestamp()
    results = {t: (r, d) for t, r, d in await m.run_due(now=sunday)}
    assert results["checkpoint"][0] == "ok", results
    assert results["vacuum"][0] == "ok", results
    before, _, after = results["vacuum"][1].split()[:3]
    assert int(after) < int(before) / 2
    # the truncated WAL is caught up in the same generation; a snapshot right after the vacuum
    assert service.db.generation == generation
    assert (service.metrics.registry.get_sample_value(
        "replicator_catch_ups_total", {"db": service.cfg.name, "reason": "wal_shrunk"})) == 1
    assert (service.metrics.registry.get_sample_value(
        "replicator_snapshots_total", {"db": service.cfg.name}) or 0) == snaps + 1
    assert service.db.last_snapshot_txid == service.db.txid
    await service.sync_wait(30)
    out = tmp_path / "restored.db"
    util.restore(str(tmp_path / "rep"), out)
    assert util.dump(out) == util.dump(db)
    assert util.integrity(out) == "ok"
    get = service.metrics.registry.get_sample_value
    for task, runs in (("optimize", 2), ("checkpoint", 1), ("vacuum", 1)):
        labels = {"db": service.cfg.name, "task": task}
        assert get("replicator_maintenance_runs_total", {**labels, "result": "ok"}) == runs
        assert get("replicator_maintenance_last_run_timestamp_seconds", labels) == sunday
        assert (get("replicator_maintenance_duration_seconds", labels) or 0) >= 0


async def test_vacuum_larger_than_max_size_is_skipped_with_its_reason(
    service: DatabaseService,
) -> None:
    m = service.maintainer
    m.cfg = MaintenanceConfig(optimize=None, vacuum=When(3, 30), vacuum_max_size=1000)
    m.tasks = {"vacuum": m.tasks["vacuum"]}
    m.tasks["vacuum"].next_at = 0
    [(task, result, detail)] = await m.run_due(now=MON_9)
    assert (task, result) == ("vacuum", "skipped") and "larger than max-size (1000)" in detail


async def test_a_busy_writer_with_no_busy_timeout_is_never_in_the_way(tmp_path: Path) -> None:
    dbcfg = db_config(tmp_path, '{vacuum: {when: "03:00"}}')
    db = Path(dbcfg.path)
    log = tmp_path / "commits.log"
    writer = util.start_writer(db, log, "--duration", "4", "--rate", "300")

    async def run() -> list[tuple[str, str, str]]:
        svc = DatabaseService(dbcfg)
        await svc.open()
        seen: list[tuple[str, str, str]] = []
        try:
            for _ in range(1000):  # until the writer is under way
                if (await svc.sync()).transactions:
                    break
                await asyncio.sleep(0.01)
            while writer.poll() is None:
                await svc.sync()
                for task in svc.maintainer.tasks.values():
                    task.next_at = 0
                seen += await svc.maintainer.run_due(now=MON_9)
                await asyncio.sleep(0.05)
        finally:
            await svc.close(5.0)
        return seen

    seen = await run()
    _, err = writer.communicate()
    assert writer.returncode == 0, err  # 3 would mean it saw "database is locked"
    # nothing that writes ran: vacuum always skipped, optimize skipped (or had nothing to do)
    assert {t for t, _, _ in seen} == {"optimize", "vacuum"}
    assert all(r == "skipped" or d == "statistics are up to date" for _, r, d in seen), seen
    assert all(r == "skipped" for t, r, _ in seen if t == "vacuum")
    assert any("committed within" in d for _, _, d in seen)


async def test_a_failing_task_is_notified_and_so_is_its_recovery(
    service: DatabaseService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a disk that fills up cannot be arranged here: the vacuum itself is made to fail
    def full(*args: object) -> str:
        raise OSError(28, "No space left on device")

    with WebhookTestServer() as hook:
        m = service.maintainer
        m.notifier = Notifier([WebhookNotifier(hook.url)], min_interval=0)
        m.tasks = {"vacuum": m.tasks["vacuum"]}
        service.last_commit = 0.0
        monkeypatch.setattr(maintenance, "_vacuum", full)
        m.tasks["vacuum"].next_at = 0
        [(_, result, detail)] = await m.run_due(now=MON_9)
        assert result == "failed" and "No space left" in detail
        monkeypatch.undo()
        m.tasks["vacuum"].next_at = 0
        [(_, result, _)] = await m.run_due(now=MON_9 + 60)
        assert result == "ok"
        assert [(p["check"], p["state"]) for p in hook.payloads] == [
            ("maintenance:vacuum", "failing"), ("maintenance:vacuum", "recovered")]
