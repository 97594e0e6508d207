"""Differential snapshots: a restore of the newest state reads a bounded chain (one full
snapshot, one differential snapshot, the WAL since it) however long the history, every instant
stays exact, and compaction, retention, restarts and damage keep it correct."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from test_compact import (
    LEVELS,
    History,
    all_objects,
    build,
    commit,
    content,
    expected_txid,
    restore_at,
    txn_times,
    wal_snapshot_service,
)
from writer import init_db

from replicator.db import Database
from replicator.dbstate import read_state
from replicator.diffsnap import DiffBase, write_diff
from replicator.errors import CorruptObjectError, RestoreError
from replicator.format import read_header
from replicator.pageindex import PageIndex
from replicator.pos import ObjectInfo
from replicator.replica import Replica
from replicator.restore import RestorePlan, apply_plan, plan_restore
from replicator.retention import apply_retention
from replicator.spool import Spool
from replicator.storage.file import FileStorage


def db_bytes(app: Path) -> int:
    c = sqlite3.connect(f"file:{app}?mode=ro", uri=True)
    try:
        return int(c.execute("PRAGMA page_count").fetchone()[0]) * 4096
    finally:
        c.close()


def cost(plan: RestorePlan) -> tuple[int, int]:
    return len(plan.objects), sum(o.size for o in plan.objects)


@pytest.mark.timeout(900)
def test_newest_state_reads_a_bounded_chain_however_long_the_history(tmp_path: Path) -> None:
    """A service left to its own snapshot policy (a 1 h interval, so only the WAL triggers
    snapshots): at every checkpoint of a growing history the newest state is one full snapshot,
    one differential snapshot and a few segments, at most 2x the database; every sampled
    instant restores exactly; the newest restore equals the source."""
    app = tmp_path / "app.db"
    init_db(str(app))
    rep = tmp_path / "r"
    dest = FileStorage(str(rep))
    seen: list[tuple[int, int, int, bool]] = []  # objects, bytes, db bytes, from a diff

    async def go() -> None:
        s = wal_snapshot_service(app, rep)
        await s.open()
        conn = sqlite3.connect(app, isolation_level=None)
        rnd = random.Random(7)
        try:
            for seq in range(1, 8001):
                commit(conn, seq, rnd)
                if seq % 20 == 0:
                    await s.sync()
                    await s.snapshot_if_due()
                if seq % 1000 == 0:
                    await s.sync()
                    for r in s.replicas:
                        await r.sync()
                    n, size = cost(plan := await plan_restore(dest))
                    seen.append((n, size, db_bytes(app), plan.diff is not None))
        finally:
            conn.close()
            await s.close(10)

    asyncio.run(go())
    assert sum(d for *_, d in seen) >= 5, seen  # differential snapshots did the bounding
    for n, size, db, _ in seen:
        assert n <= 16 and size <= 2 * db, seen
    times = asyncio.run(txn_times(dest))
    snaps = [o for o in asyncio.run(all_objects(dest)) if o.kind == "snapshot"]
    # a full snapshot only once the database has grown (or changed) by half since the last
    # one: together they stay a small multiple of the database, not one per WAL threshold
    assert sum(o.size for o in snaps) <= 4 * db_bytes(app), snaps
    assert sum(o.kind == "diff" for o in asyncio.run(all_objects(dest))) > len(snaps)
    instants = [random.Random(1).randrange(min(times.values()), max(times.values()) + 1)
                for _ in range(200)]

    async def plans() -> None:
        for t in instants:
            assert (await plan_restore(dest, to_time_ns=t)).txid == expected_txid(times, t)

    asyncio.run(plans())
    for t in instants[:25]:
        txid, seqs = asyncio.run(restore_at(dest, tmp_path / "t.db", to_time_ns=t))
        assert seqs == list(range(1, expected_txid(times, t) + 1))
    txid, seqs = asyncio.run(restore_at(dest, tmp_path / "newest.db"))
    assert seqs == list(range(1, 8001))
    assert content(tmp_path / "newest.db") == content(app)


# --------------------------------------------------------------- a history built step by step


def diff_every_100(db: Database, seq: int) -> None:
    """A differential snapshot every 100 txids, a full one every 700."""
    if seq % 700 == 0:
        db.snapshot()
    elif seq % 100 == 0:
        assert db.diff_snapshot(max_fraction=1.0) is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> History:
    return asyncio.run(build(tmp_path_factory.mktemp("diffs"), commits=1750, seed=9,
                             snapshots=diff_every_100))


@pytest.fixture
def history(built: History, tmp_path: Path) -> Iterator[History]:
    shutil.copytree(built.dest.root, tmp_path / "replica")
    (tmp_path / "replica" / "lease.json").unlink()
    dest = FileStorage(str(tmp_path / "replica"))
    replica = Replica("dir", dest, built.spool, "app")
    replica.set_levels(LEVELS, grace=0)
    asyncio.run(replica.init())
    yield History(built.app, built.spool, dest, replica, built.times, built.end_ns)


def objects(h: History) -> list[ObjectInfo]:
    return asyncio.run(all_objects(h.dest))


@pytest.mark.timeout(900)
def test_compaction_thins_diffs_and_keeps_every_instant_exact(
    history: History, tmp_path: Path
) -> None:
    h = history
    newest = asyncio.run(plan_restore(h.dest))
    assert newest.diff is not None and newest.diff.end_txid == 1700
    assert newest.snapshot.end_txid == 1400 and len(newest.segments) == 50  # one per commit
    instants = sorted(random.Random(4).randrange(min(h.times.values()), max(h.times.values()))
                      for _ in range(200))
    before = [asyncio.run(plan_restore(h.dest, to_time_ns=t)).txid for t in instants]
    assert before == [expected_txid(h.times, t) for t in instants]
    end_s = max(h.times.values()) / 1e9
    res = asyncio.run(h.replica.compact(now=end_s + 10 * LEVELS[-1]))
    assert res is not None and res.merged > 0
    after = objects(h)
    diffs = [o for o in after if o.kind == "diff"]
    start_s = min(h.times.values()) / 1e9
    windows = int(end_s // LEVELS[-1]) - int(start_s // LEVELS[-1]) + 1
    assert 1 <= len(diffs) <= windows, (len(diffs), windows)
    assert [asyncio.run(plan_restore(h.dest, to_time_ns=t)).txid for t in instants] == before
    for i in range(0, 200, 8):
        txid, seqs = asyncio.run(restore_at(h.dest, tmp_path / "t.db", to_time_ns=instants[i]))
        assert txid == before[i] and seqs == list(range(1, txid + 1))
    plan = asyncio.run(plan_restore(h.dest))
    assert plan.diff is not None and plan.diff.key in {o.key for o in diffs}
    txid, seqs = asyncio.run(restore_at(h.dest, tmp_path / "newest.db"))
    assert seqs == list(range(1, 1751))
    assert content(tmp_path / "newest.db") == content(h.app)


def test_a_damaged_diff_stops_the_restore_naming_it(history: History, tmp_path: Path) -> None:
    h = history
    plan = asyncio.run(plan_restore(h.dest))
    assert plan.diff is not None
    path = Path(h.dest.root, plan.diff.key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "out.db"
    with pytest.raises((CorruptObjectError, RestoreError), match=plan.diff.name):
        asyncio.run(apply_plan(h.dest, plan, str(out)))
    assert not out.exists()


def test_a_diff_without_its_full_snapshot_is_not_used(history: History, tmp_path: Path) -> None:
    """A differential snapshot whose full snapshot is gone (deleted by a tool that does not
    know differential snapshots) is passed over; the restore is the same."""
    h = history
    plan = asyncio.run(plan_restore(h.dest))
    assert plan.diff is not None
    Path(h.dest.root, plan.snapshot.key).unlink()
    again = asyncio.run(plan_restore(h.dest))
    assert again.diff is None or again.diff.start_txid != plan.snapshot.end_txid
    assert again.txid == plan.txid
    _, seqs = asyncio.run(restore_at(h.dest, tmp_path / "a.db"))
    assert seqs == list(range(1, 1751))
    # and a reader that knows no differential snapshots restores the same from the rest
    for o in objects(h):
        if o.kind == "diff":
            Path(h.dest.root, o.key).unlink()
    _, seqs = asyncio.run(restore_at(h.dest, tmp_path / "b.db"))
    assert content(tmp_path / "b.db") == content(tmp_path / "a.db") == content(h.app)


def test_retention_keeps_what_the_chain_needs(history: History, tmp_path: Path) -> None:
    h = history
    snaps = sorted((o for o in objects(h) if o.kind == "snapshot"), key=lambda o: o.end_txid)
    newest = snaps[-1]
    asyncio.run(apply_retention(h.dest, 1.0, now=newest.last_ms / 1000 + 1.0005))
    left = objects(h)
    assert min(o.end_txid for o in left if o.kind == "snapshot") == newest.end_txid
    assert all(o.start_txid == newest.end_txid for o in left if o.kind == "diff")
    plan = asyncio.run(plan_restore(h.dest))
    assert plan.diff is not None and plan.snapshot == newest
    _, seqs = asyncio.run(restore_at(h.dest, tmp_path / "a.db"))
    assert seqs == list(range(1, 1751))


def test_a_diff_of_a_moved_state_is_not_written(tmp_path: Path) -> None:
    """If a page read for a differential snapshot is not the one the index records (the
    database moved under the read), nothing is written."""
    with captured(tmp_path, 30) as (db, _):
        spool = db.spool
        ix = db.keeper.index
        assert ix is not None and db.progress.diff_base is not None
        lying = ix.copy()
        lying.set_page(2, bytes(4096))  # the index says page 2 is zeros
        state = db.snapshots.read_state(db.pos)
        before = spool.objects(db.generation or "")
        assert write_diff(spool, state, lying, db.progress.diff_base, db.txid, state.pos,
                      1.0) is None
        assert spool.objects(db.generation or "") == before
        assert db.diff_snapshot(max_fraction=0.0) is None  # too many pages: take a full one
        assert db.diff_snapshot(max_fraction=1.0) is not None


@contextlib.contextmanager
def captured(tmp_path: Path, commits: int) -> Iterator[tuple[Database, sqlite3.Connection]]:
    """A database with a capture (its spool in tmp_path) that captured ``commits - 1`` commits
    of the application's connection, which it yields with it."""
    app = tmp_path / "app.db"
    init_db(str(app))
    db = Database(str(app), Spool(str(tmp_path / "spool")))
    db.open()
    conn = sqlite3.connect(app, isolation_level=None)
    try:
        db.step()
        for seq in range(1, commits):
            commit(conn, seq, random.Random(seq))
        db.step()
        yield db, conn
    finally:
        conn.close()
        db.close()


def test_a_restart_after_diffs_continues_the_generation(tmp_path: Path) -> None:
    """The page index is brought up to date past differential snapshots in the spool: a restart
    resumes the generation, and the next snapshot due is a full one."""
    app = tmp_path / "app.db"
    init_db(str(app))
    rep = tmp_path / "r"

    async def run(first: int, last: int) -> list[str]:
        s = wal_snapshot_service(app, rep)
        await s.open()
        conn = sqlite3.connect(app, isolation_level=None)
        try:
            for seq in range(first, last + 1):
                commit(conn, seq, random.Random(seq))
                if seq % 20 == 0:
                    await s.sync()
                    await s.snapshot_if_due()
        finally:
            conn.close()
            await s.close(10)
        return await FileStorage(str(rep)).generations()

    gens = asyncio.run(run(1, 1500))
    assert any(o.kind == "diff" for o in asyncio.run(all_objects(FileStorage(str(rep)))))
    assert asyncio.run(run(1501, 2500)) == gens
    _, seqs = asyncio.run(restore_at(FileStorage(str(rep)), tmp_path / "a.db"))
    assert seqs == list(range(1, 2501))
    assert content(tmp_path / "a.db") == content(app)


def test_changed_pages_compares_with_the_full_snapshot() -> None:
    from replicator.diffsnap import changed_pages

    ix = PageIndex(512)
    for p in range(1, 5):
        ix.set_page(p, bytes([p]) * 512)
    ix.resize(4)
    base = DiffBase.of("g" * 16, 0, ix)
    ix.set_page(3, b"x" * 512)
    ix.set_page(6, b"y" * 512)
    ix.resize(6)
    assert changed_pages(base, ix) == [3, 5, 6]  # page 5 came back as zeros
    ix.resize(2)
    assert changed_pages(base, ix) == []


def test_diff_keys_headers_and_versions(history: History) -> None:
    """A differential snapshot's key names its full snapshot, its header round-trips, and it
    alone carries format version 3 (a version-2 reader never opens it: it ignores the key)."""
    from replicator.headers import DiffHeader
    from replicator.pos import diff_info, parse_key

    info = diff_info("0123456789abcdef", 17, 5, 1234, 99)
    assert info.key.endswith("/snapshots/0000000000000011-0000000000000005-0000000004d2.dsnap")
    assert parse_key(info.key, 99) == info
    assert parse_key(info.key.replace("0000000000000005", "0000000000000011")) is None
    for o in objects(history):
        raw = Path(history.dest.root, o.key).read_bytes()
        assert int.from_bytes(raw[4:6], "big") == (3 if o.kind == "diff" else 2), o.key
    d = next(o for o in objects(history) if o.kind == "diff")
    h = DiffHeader.from_json(asyncio.run(read_header(history.dest.read_object(d), d.key)), d.key)
    assert (h.txid, h.base_txid) == (d.end_txid, d.start_txid)
    assert DiffHeader.from_json(h.to_json(), d.key) == h
    bad = h.to_json() | {"base_content_hash": "xyz"}
    with pytest.raises(CorruptObjectError, match="base_content_hash"):
        DiffHeader.from_json(bad, d.key)


def test_a_directory_restore_imports_neither_the_configuration_nor_s3(
    history: History, tmp_path: Path
) -> None:
    """A restore from a directory starts lean: the configuration (capture, compaction, drills,
    notifications) and the S3 client are not imported."""
    import subprocess
    import sys

    out = tmp_path / "out.db"
    code = ("import sys; from replicator.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('replicator.config', 'replicator.db', 'replicator.storage.s3', "
            "'aiobotocore', 'botocore', 'yaml') if m in sys.modules]; "
            "print('IMPORTED', bad); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "restore", history.dest.root, "-o",
                        str(out)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout, r.stdout
    assert content(out) == content(history.app)


def test_the_captured_state_is_read_without_scanning_the_wal_again(tmp_path: Path) -> None:
    """Up to the captured position (pinned) the state is read without a second scan of the
    frames the capture verified: the same pages, size and position as a full scan finds, and
    a position of an older epoch still scans."""
    with captured(tmp_path, 60) as (db, conn):
        h = db.handles
        assert db.pos is not None and db.pos.frame > 0 and h.db_fd is not None
        quick = db.snapshots.read_state(db.pos)
        full = read_state(h.path, h.db_fd, h.wal(), db.page_size, db.pos)
        assert (quick.pos, quick.pages, quick.pagemap) == (full.pos, full.pages, full.pagemap)
        assert [bytes(b) for _, b in quick.chunks()] == [bytes(b) for _, b in full.chunks()]
        for seq in range(60, 70):  # committed past the captured position: not in the state
            commit(conn, seq, random.Random(seq))
        again = db.snapshots.read_state(db.pos)
        assert (again.pos, again.pages, again.pagemap) == (full.pos, full.pages, full.pagemap)
        other = replace(db.pos, salt1=db.pos.salt1 ^ 1)  # not this epoch: the whole WAL
        whole = read_state(h.path, h.db_fd, h.wal(), db.page_size, other, verified=True)
        assert whole.pos is not None and whole.pos.frame > db.pos.frame


def test_snapshots_for_wal_volume_are_spaced_by_their_duration(tmp_path: Path) -> None:
    """After a snapshot taken for WAL volume, the next waits (1 / duty - 1) times as long as it
    took, however much WAL comes meanwhile; a snapshot a destination needs does not wait."""
    app = tmp_path / "app.db"
    init_db(str(app))

    async def go() -> None:
        s = wal_snapshot_service(app, tmp_path / "r", duty=1e-9)  # the next one waits for ages
        await s.open()
        conn = sqlite3.connect(app, isolation_level=None)
        rnd = random.Random(3)
        try:
            taken = 0
            for seq in range(1, 601):
                commit(conn, seq, rnd)
                if seq % 20 == 0:
                    await s.sync()
                    taken += await s.snapshot_if_due()
            assert taken == 1
            s.replicas[0].needs_snapshot = True
            assert await s.snapshot_if_due()
        finally:
            conn.close()
            await s.close(10)

    asyncio.run(go())
