"""Calendar retention (keep-daily/-weekly/-monthly/-yearly) beside the PITR window: a pure planner
checked against hand-written tables, and a real 400-day history pruned by the CLI and restored at
every point it keeps."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import util

from replicator.db import Database
from replicator.pos import ObjectInfo, segment_info, snapshot_info
from replicator.restore import apply_plan, plan_restore
from replicator.retention import RetentionPolicy, plan_objects
from replicator.spool import Spool
from replicator.storage.file import FileStorage

DAY = 86400
UTC = dt.UTC
GEN = "0000000000010001"
# Monday 2026-11-30 09:00 UTC; one snapshot a day at 06:00 UTC from 2025-10-26 to 2026-11-29
NOW = dt.datetime(2026, 11, 30, 9, 0, tzinfo=UTC).timestamp()
FIRST = dt.date(2025, 10, 26)


def day_ms(d: dt.date, hour: int = 6) -> int:
    return int(dt.datetime(d.year, d.month, d.day, hour, tzinfo=UTC).timestamp() * 1000)


def synthetic_history(days: int = 400) -> list[ObjectInfo]:
    """Snapshot ``i`` at txid 10*i on day i at 06:00, nine one-transaction segments after it
    (07:00 .. 15:00)."""
    out: list[ObjectInfo] = []
    for i in range(days):
        d = FIRST + dt.timedelta(days=i)
        out.append(snapshot_info(GEN, 10 * i, day_ms(d)))
        for k in range(1, 10):
            t = day_ms(d, 6 + k)
            out.append(segment_info(GEN, 10 * i + k, 10 * i + k, t, t))
    return out


def dates(objs: list[ObjectInfo]) -> set[str]:
    return {dt.datetime.fromtimestamp(o.last_ms / 1000, tz=UTC).date().isoformat()
            for o in objs if o.kind == "snapshot"}


def days_between(first: str, last: str) -> set[str]:
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return {(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)}


# (policy, the snapshot days kept): written out by hand from a calendar
TABLE: list[tuple[RetentionPolicy, set[str]]] = [
    # nothing but the newest restorable state
    (RetentionPolicy(keep_daily=0, window=0.0), {"2026-11-29"}),
    (RetentionPolicy(keep_daily=7), days_between("2026-11-23", "2026-11-29")),
    # ISO weeks end on Sundays: 29, 22, 15 and 8 November
    (RetentionPolicy(keep_weekly=4), {"2026-11-29", "2026-11-22", "2026-11-15", "2026-11-08"}),
    (RetentionPolicy(keep_monthly=3), {"2026-11-29", "2026-10-31", "2026-09-30"}),
    # only periods that have a snapshot count: 14 months, two years
    (RetentionPolicy(keep_monthly=24), {
        "2026-11-29", "2026-10-31", "2026-09-30", "2026-08-31", "2026-07-31", "2026-06-30",
        "2026-05-31", "2026-04-30", "2026-03-31", "2026-02-28", "2026-01-31", "2025-12-31",
        "2025-11-30", "2025-10-31"}),
    (RetentionPolicy(keep_yearly=5), {"2026-11-29", "2025-12-31"}),
    # the rules are OR-ed
    (RetentionPolicy(keep_daily=3, keep_weekly=2, keep_monthly=2, keep_yearly=2),
     {"2026-11-27", "2026-11-28", "2026-11-29", "2026-11-22", "2026-10-31", "2025-12-31"}),
    # the window (2 days: cutoff 28 Nov 09:00) keeps its base (28 Nov 06:00) and what follows
    (RetentionPolicy(window=2 * DAY, keep_monthly=2), {"2026-11-28", "2026-11-29",
                                                       "2026-10-31"}),
]


@pytest.mark.parametrize(("policy", "expected"), TABLE)
def test_calendar_points_match_the_table(policy: RetentionPolicy, expected: set[str]) -> None:
    objs = synthetic_history()
    plan = plan_objects(objs, policy, NOW)
    assert dates(plan.keep) == expected
    assert dates(plan.points) == expected
    assert sorted(plan.keep + plan.delete) == sorted(objs)
    # a calendar point keeps its snapshot only; the window's base keeps every segment after it
    base_ms = day_ms(dt.date(2026, 11, 28)) if policy.window else day_ms(dt.date(2026, 11, 29))
    assert {o for o in plan.keep if o.kind == "wal"} == {
        o for o in objs if o.kind == "wal" and o.first_ms > base_ms}
    assert plan.oldest_ms == min(o.last_ms for o in plan.keep if o.kind == "snapshot")


def test_retention_off_and_no_policy_keep_everything() -> None:
    objs = synthetic_history(30)
    for policy in (RetentionPolicy(), RetentionPolicy(keep_daily=0)):
        plan = plan_objects(objs, policy, NOW)
        assert plan.delete == [] and len(plan.keep) == len(objs)


def test_grace_keeps_what_became_unneeded_recently() -> None:
    """A restore planned in the last hour may still read what a new snapshot just made
    unnecessary: it stays until the grace period has passed."""
    objs = synthetic_history(3)
    newest = max(o.last_ms for o in objs if o.kind == "snapshot")
    objs = [o for o in objs if o.last_ms <= newest]  # that snapshot has just been written
    day1 = {o for o in objs if day_ms(FIRST + dt.timedelta(days=1)) <= o.last_ms < newest}
    policy = RetentionPolicy(keep_daily=1, grace=3600)
    soon = set(plan_objects(objs, policy, newest / 1000 + 1800).delete)
    assert soon and not soon & day1  # day 0 went long ago; day 1 stays for the hour
    later = set(plan_objects(objs, policy, newest / 1000 + 7200).delete)
    assert later == soon | day1


def test_newer_generation_without_a_snapshot_keeps_the_older_one() -> None:
    objs = synthetic_history(5)
    gen2 = "0000000000020001"
    t = day_ms(dt.date(2025, 11, 5))
    objs.append(segment_info(gen2, 1, 3, t, t))
    plan = plan_objects(objs, RetentionPolicy(keep_daily=1, grace=0), NOW)
    assert [o for o in plan.keep if o.generation == gen2]
    assert dates(plan.keep) == {"2025-10-30"}  # GEN's newest snapshot: the newest restorable
    assert plan.drop_generations == []


# ------------------------------------------------------------------------------------------
# A real history: 400 days of a real database, pruned by the CLI, restored at every kept point


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """``time.time_ns`` reads the first item of the list."""
    now = [time.time_ns()]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    yield now


def build_history(tmp_path: Path, clock: list[int], start: float, days: int) -> Path:
    """A database with a row per day and a snapshot per day, the day ``i`` at ``start + i*DAY``;
    its spool (a replica's layout) is returned."""
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (day INTEGER PRIMARY KEY, v TEXT)")
    spool = tmp_path / "replica"
    clock[0] = int(start * 1e9)
    d = Database(str(db), Spool(str(spool)), checkpoint_pages=64)
    d.open()
    try:
        d.step()
        for i in range(days):
            clock[0] = int((start + i * DAY) * 1e9)
            conn.execute("INSERT INTO t VALUES (?, ?)", (i, f"day {i}" * 20))
            d.step()
            d.snapshot()
    finally:
        d.close()
        conn.close()
    return spool


def expected_days(stamps: dict[int, float], now: float, window: float,
                  rules: dict[Callable[[dt.datetime], object], int]) -> set[int]:
    """An independent expectation: group by period, take the newest snapshot of the newest N
    groups per rule, plus the window's base and everything after it."""
    keep = {i for i, t in stamps.items() if t > now - window}
    keep.add(max(i for i, t in stamps.items() if t <= now - window))
    for period, n in rules.items():
        groups: dict[object, list[int]] = {}
        for i, t in stamps.items():
            groups.setdefault(period(dt.datetime.fromtimestamp(t, tz=UTC)), []).append(i)
        for key in sorted(groups)[-n:]:  # type: ignore[type-var]
            keep.add(max(groups[key], key=lambda i: stamps[i]))
    return keep


async def test_prune_400_days_keeps_the_expected_points_and_each_restores(
    tmp_path: Path, fake_clock: list[int]
) -> None:
    days = 400
    now = time.time()
    start = now - days * DAY - 3 * 3600  # the last day: a day and 3 hours ago
    replica = build_history(tmp_path, fake_clock, start, days)
    fake_clock[0] = int(now * 1e9)
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"""
dbs:
  - path: {tmp_path / "app.db"}
    retention: 3d
    keep-daily: 7
    replicas:
      - name: local
        path: {replica}
        keep-weekly: 5
        keep-monthly: 12
        keep-yearly: 3
""")
    r = util.cli("prune", "--dry-run", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    doomed = {line.split()[-1] for line in r.stdout.splitlines()
              if line.startswith("  would delete ")}
    store = FileStorage(str(replica))
    objs = await _all(store)
    snaps = {o.end_txid: o for o in objs if o.kind == "snapshot" and o.end_txid > 0}
    kept_snaps = {txid for txid, o in snaps.items() if o.key not in doomed}
    # txid i+1 holds the rows of days 0..i; its snapshot was taken on day i
    stamps = {txid: o.last_ms / 1000 for txid, o in snaps.items()}
    expected = expected_days(stamps, now, 3 * DAY, {
        lambda t: t.date(): 7,
        lambda t: tuple(t.isocalendar())[:2]: 5,
        lambda t: (t.year, t.month): 12,
        lambda t: t.year: 3,
    })
    assert kept_snaps == expected
    assert 12 + 3 <= len(kept_snaps) < 40  # months and years alone are 12 + 2 distinct days
    assert "keeps" in r.stdout.splitlines()[0]
    assert all(o.key in {x.key for x in objs} for o in objs)  # dry run: nothing deleted
    assert len(await _all(store)) == len(objs)

    r = util.cli("prune", "--config", str(cfg), str(tmp_path / "app.db"))
    assert r.returncode == 0, r.stderr
    left = await _all(store)
    assert {o.key for o in left} == {o.key for o in objs} - doomed
    again = util.cli("prune", "--dry-run", "--config", str(cfg))
    assert "  would delete " not in again.stdout and "would delete 0" in again.stdout

    # every kept point restores, with exactly the rows it had
    for txid in sorted(kept_snaps):
        out = tmp_path / f"r{txid}.db"
        await _restore(store, txid, out)
        conn = sqlite3.connect(out)
        assert conn.execute("SELECT COUNT(*), MAX(day) FROM t").fetchone() == (txid, txid - 1)
        conn.close()
    # and so does any point inside the window, through its segments (the newest one here)
    out = tmp_path / "newest.db"
    res = util.restore(str(replica), out)
    assert res.returncode == 0, res.stderr
    conn = sqlite3.connect(out)
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (days,)
    conn.close()


async def _all(store: FileStorage) -> list[ObjectInfo]:
    return [o for g in await store.generations() for o in await store.objects(g)]


async def _restore(store: FileStorage, txid: int, out: Path) -> None:
    plan = await plan_restore(store, txid=txid)
    assert plan.segments == []  # straight from its snapshot
    await apply_plan(store, plan, str(out))


async def test_retention_pass_sets_the_inventory_metrics_per_destination(tmp_path: Path) -> None:
    from replicator.metrics import create_metrics
    from replicator.pos import parse_key
    from replicator.replica import Replica
    from replicator.storage.memory import MemoryStorage

    store = MemoryStorage()
    for o in synthetic_history(40):
        store.data[o.key] = b"x" * 100
    metrics = create_metrics()
    rep = Replica("archive", store, Spool(str(tmp_path / "spool")), "app", metrics)
    rep.retention = RetentionPolicy(keep_weekly=2, grace=0)
    plan = await rep.enforce_retention(now=NOW)
    assert plan is not None and plan.delete
    left = [parse_key(k) for k in store.data]
    assert sorted(o for o in left if o is not None) == sorted(
        dataclasses.replace(o, size=0) for o in plan.keep)

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"db": "app", "replica": "archive"})

    assert sample("replicator_replica_objects") == len(plan.keep) == len(store.data)
    assert sample("replicator_replica_bytes") == 100 * len(store.data)
    assert sample("replicator_replica_oldest_restorable_timestamp_seconds") == (
        plan.oldest_ms / 1000)
    assert plan.oldest_ms == day_ms(FIRST + dt.timedelta(days=35))  # Sunday 30 Nov 2025

