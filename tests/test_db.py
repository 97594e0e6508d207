"""The capture engine, driven one step at a time in-process beside a real application
connection."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from util import commit, restore_latest
from util import seqs as util_seqs
from writer import init_db

from replicator.db import Database, Tuning
from replicator.errors import DatabaseError
from replicator.format import read_header
from replicator.headers import SegmentHeader, header_from_json
from replicator.rescue import rescue
from replicator.restore import apply_plan, plan_restore
from replicator.spool import Spool
from replicator.wal import read_wal_header


@pytest.fixture
def app(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    init_db(str(tmp_path / "app.db"))
    conn = sqlite3.connect(tmp_path / "app.db", isolation_level=None, timeout=0)
    yield conn
    conn.close()


def open_db(tmp_path: Path, **kw: Any) -> Database:
    d = Database(str(tmp_path / "app.db"), Spool(str(tmp_path / "spool")), **kw)
    d.open()
    return d


def restored_dump(tmp_path: Path, name: str = "out.db") -> list[str]:
    spool = Spool(str(tmp_path / "spool"))
    restore_latest(spool.storage, tmp_path / name)
    c = sqlite3.connect(tmp_path / name)
    try:
        return list(c.iterdump())
    finally:
        c.close()


def dump(conn: sqlite3.Connection) -> list[str]:
    return list(conn.iterdump())


def generations(tmp_path: Path) -> list[str]:
    return Spool(str(tmp_path / "spool")).generations()


def test_first_step_snapshots_and_idle_steps_write_nothing(tmp_path: Path, app) -> None:
    d = open_db(tmp_path)
    res = d.step()
    assert res.new_generation == "no_position"
    assert [o.kind for o in res.objects] == ["snapshot"]
    for _ in range(3):
        assert d.step().objects == []
    commit(app, 5, payload=500)
    res = d.step()
    assert res.transactions == 5 and len(res.objects) == 1
    assert d.step().objects == []
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_the_step_after_a_commit_captured_ends_at_once_and_the_next_commit_is_seen(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file event of a commit's last frame wakes one step more after the step that
    captured it: that one finds the signature the capture left and does no capture work (the
    WAL's size it reports is still right); a commit after it is captured by the next."""
    d = open_db(tmp_path)
    d.step()
    full: list[int] = []
    inner = d._step
    monkeypatch.setattr(d, "_step", lambda res, started, st: (full.append(1),
                                                             inner(res, started, st)))
    for n in range(1, 4):
        commit(app, 1, payload=300)
        res = d.step()  # its first look sees the commit's frames: a full step
        assert res.transactions == 1 and len(full) == n
        again = d.step()
        assert again.transactions == 0 and again.objects == [] and len(full) == n
        assert again.sizes == (os.path.getsize(d.path), os.path.getsize(d.wal_path))
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_a_step_that_captures_everything_says_how_it_saw_the_files_and_when(
    tmp_path: Path, app
) -> None:
    """A step that captured a commit and then found nothing more reports the files as it saw
    them (the backstop's signature) and the moment just before it looked; a step with
    commits left over (or that did not look again) reports neither."""
    from replicator.runtime import signature

    d = open_db(tmp_path, tuning=Tuning(segment_max_frames=2, step_batches=1))
    d.step()
    commit(app, 1, payload=300)
    before = time.monotonic()
    res = d.step()
    assert res.transactions == 1 and not res.more
    assert res.looked == signature(d.path)  # nothing written since
    assert before <= d.settled_at <= time.monotonic()
    assert res.sizes == (os.path.getsize(d.path), os.path.getsize(d.wal_path))
    settled = d.settled_at
    again = d.step()  # the signature is the same: refreshed, without a new look at the files
    assert again.looked is None and d.settled_at > settled
    commit(app, 5)  # five transactions, two frames a segment, one segment a step
    res = d.step()
    assert res.more and res.looked is None and d.settled_at == 0.0
    while d.step().more:
        pass
    d.close()
    assert d.settled_at == 0.0
    assert restored_dump(tmp_path) == dump(app)


def test_rotation_keeps_wal_small_and_generation_unbroken(tmp_path: Path, app) -> None:
    d = open_db(tmp_path, checkpoint_pages=64)
    d.step()
    sizes = []
    for _ in range(40):
        commit(app, 20, payload=2000)
        res = d.step()
        assert res.new_generation is None
        sizes.append(os.path.getsize(tmp_path / "app.db-wal"))
    assert len(generations(tmp_path)) == 1
    # the WAL was reset over and over instead of growing with the 800 commits (~2 MB of pages)
    assert max(sizes) < 1_500_000
    assert d.txid == 800
    d.close()
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("tail", "payload", "max_bytes", "seg"), [
    (3, 500, None, None),  # read into memory
    # ~1 MB, longer than the in-memory read: scanned from the file. The largest read is whole
    # frames, below a limit that is not a multiple of the frame size (as 8 MiB is not of a
    # 4 KiB page's frame): reaching it ends the growing reads, it does not repeat for ever
    (120, 4000, 300_001, None),
    # a tail longer than a segment: several segments, as a step would have shipped it, read
    # into memory or from the file
    (40, 500, None, 8),
    (120, 4000, 300_001, 16),
])
def test_reset_in_an_unpinned_gap_with_intact_tail_is_proven(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch, tail: int, payload: int,
    max_bytes: int | None, seg: int | None,
) -> None:
    if max_bytes is not None:
        monkeypatch.setattr("replicator.rescue.RESCUE_MAX_BYTES", max_bytes)
    d = open_db(tmp_path, **({} if seg is None else {"tuning": Tuning(segment_max_frames=seg)}))
    d.step()
    commit(app, 30, payload=500)
    d.step()
    gen = d.generation
    d.handles.unpin()  # a rotation's window: no pin is held
    commit(app, tail, payload=payload)  # committed but not captured yet
    assert app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
    # this write resets the WAL: the tail's commits are only in the old epoch's tail
    commit(app, 1, payload=500)
    txid = d.txid
    res = d.step()
    transactions = res.transactions
    objects = list(res.objects)
    if max_bytes is None and seg is None:
        assert transactions == tail + 1, "a tail read into memory goes in one step"
    while res.more:
        res = d.step()
        transactions += res.transactions
        objects += res.objects
    assert res.catch_up is None and res.new_generation is None
    segs = sorted((o for o in objects if o.kind == "wal"), key=lambda o: o.start_txid)
    assert [o.start_txid for o in segs] == [txid + 1] + [o.end_txid + 1 for o in segs[:-1]]
    if seg is not None:
        spool = Spool(str(tmp_path / "spool"))
        for o in segs:  # each segment at most a segment's frames (these transactions are short)
            h = spool.read_header(o)
            assert isinstance(h, SegmentHeader)
            assert h.frames <= seg, (o.start_txid, h.frames)
    assert d.generation == gen
    assert transactions == tail + 1
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_tail_of_a_reset_in_a_long_wal_file_is_kept_as_read(tmp_path: Path, app) -> None:
    """Past a reset the WAL file keeps its largest size, older epochs' frames beyond the new
    one's end. The old epoch's short tail is still read into memory at once (as a rotation does
    right after it pinned again), so the new epoch overwriting it before it is written to the
    spool loses nothing."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 900, payload=4000)  # ~11 MB of WAL, captured; a rotation then lets it reset
    while d.step().transactions:
        pass
    commit(app, 30, payload=500)  # the reset: a new epoch at the start of the long file
    d.step()
    assert os.path.getsize(tmp_path / "app.db-wal") > 10 << 20
    gen = d.generation
    h = d.handles
    h.unpin()  # a rotation's window: no pin is held
    commit(app, 3, payload=500)  # the tail: committed but not captured
    assert app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
    commit(app, 1, payload=500)  # this write resets the WAL
    h.pin(1 - h.active)
    fd = h.wal()
    assert fd is not None
    hdr = read_wal_header(fd)
    assert hdr is not None and d.pos is not None and hdr.salts != d.pos.salts
    d.capture._early_tail = (hdr.salts, rescue(fd, hdr, d.progress, h, "app"))
    commit(app, 60, payload=500)  # the new epoch grows over the old tail's frames
    res = d.step()
    assert res.catch_up is None and res.new_generation is None and d.generation == gen
    assert res.transactions == 3 + 1 + 60
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_a_new_pin_never_lets_a_reset_overtake_uncaptured_frames(tmp_path: Path, app) -> None:
    """Behind the writer, the capture hands its pin over to the newest snapshot so that the
    application's checkpoints can backfill. A pin taken while the WAL is wholly backfilled
    reads the database file alone and lets the WAL reset: the application would then
    overwrite frames the capture has not read. Such a handover keeps the old pin instead."""
    d = open_db(tmp_path)
    commit(app, 1, payload=500)
    d.step()
    commit(app, 20, payload=500)  # not captured yet: the capture is behind
    d.handles.handover()  # pinned on the newest commit
    # the application's own checkpoint backfills everything the new pin allows: all of it
    busy, log, done = app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and log == done
    d.handles.handover()  # the capture is still behind
    commit(app, 40, payload=500)  # a reset here would overwrite the 20 uncaptured commits
    res = d.step()
    while res.more:
        res = d.step()
    assert res.catch_up is None
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_reset_that_destroyed_the_tail_catches_up(tmp_path: Path, app) -> None:
    d = open_db(tmp_path)
    d.step()
    commit(app, 5, payload=500)
    d.step()
    d.handles.unpin()
    commit(app, 3, payload=500)
    # the application truncates the WAL: the uncaptured tail is gone from it
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    commit(app, 2, payload=500)
    res = d.step()
    assert res.catch_up == "wal_reset" and res.new_generation is None
    assert [o.kind for o in res.objects] == ["catchup"]
    assert len(generations(tmp_path)) == 1
    commit(app, 2, payload=500)
    d.step()
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_truncate_in_an_unpinned_gap_as_the_last_write_catches_up(
    tmp_path: Path, app
) -> None:
    """The application commits and truncates the WAL in a moment no pin is held, then writes
    nothing more: the WAL is empty, the commits are in the database file only. A catch-up (the
    pages that changed) holds them, including at shutdown."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 5, payload=500)
    d.step()
    d.handles.unpin()
    commit(app, 2, payload=500)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert os.path.getsize(tmp_path / "app.db-wal") == 0
    res = d.step()
    assert res.catch_up == "wal_shrunk" and res.new_generation is None
    assert d.step().catch_up is None  # once
    assert len(generations(tmp_path)) == 1
    d.close()
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize("then", ["truncate", "restart"])
def test_unpinned_writes_after_a_state_without_wal_catch_up(tmp_path: Path, then: str) -> None:
    """The first state is read while the database has no WAL (the application's last
    connection closed and removed it). In a moment no pin is held the application commits and
    checkpoints: with the WAL then empty (or restarted with new frames) only the database file
    shows those commits, and a catch-up must hold them."""
    db = tmp_path / "app.db"
    init_db(str(db))
    commit(db, 3, payload=500)  # its own connection, the last one: the WAL is removed
    assert not os.path.exists(f"{db}-wal")
    d = open_db(tmp_path)
    assert d.step().new_generation is not None and d.pos is None
    d.handles.unpin()
    app = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        commit(app, 4, payload=500)
        assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        if then == "restart":
            commit(app, 2, payload=500)  # new frames in a WAL that restarted
        res = d.step()
        assert res.catch_up == "wal_shrunk" and res.new_generation is None
        commit(app, 1, payload=500)
        assert d.step().transactions == 1
        d.close()
        assert restored_dump(tmp_path) == dump(app)
    finally:
        app.close()


def test_pinned_truncate_by_application_never_loses_frames(tmp_path: Path, app) -> None:
    d = open_db(tmp_path, checkpoint_pages=16)
    d.step()
    for i in range(30):
        commit(app, 7, payload=500)
        app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # may or may not succeed
        if i % 2:
            d.step()
    d.step()
    assert len(generations(tmp_path)) == 1
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_resume_after_clean_close(tmp_path: Path, app) -> None:
    d = open_db(tmp_path)
    d.step()
    commit(app, 10, payload=500)
    d.step()
    gen = d.generation
    d.close()
    d = open_db(tmp_path)
    assert d.generation == gen and d.txid == 10
    commit(app, 10, payload=500)
    assert d.step().transactions == 10
    d.close()
    assert generations(tmp_path) == [gen]
    assert restored_dump(tmp_path) == dump(app)


def test_a_parked_database_opens_again_from_what_its_close_recorded(tmp_path: Path, app) -> None:
    """Closed and opened again in one process (parking): the reopened database resumes from the
    record its close kept in memory, a close with no new transaction does not save the page
    index again (nor the record, when it watched no longer), and the record left on disk is
    ignored by a restart after a crash once the spool has gone past it."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 5, payload=500)
    d.step()
    gen = d.generation
    d.close(False)
    assert d.closed is not None and (d.closed.generation, d.closed.txid) == (gen, 5)

    def sig(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns

    written = sig(d.state_path), sig(d.keeper.path)
    e = Database(str(tmp_path / "app.db"), Spool(str(tmp_path / "spool")))
    e.open(d)
    assert e.generation == gen and e.txid == 5
    assert e.progress.confirmed_ns == d.closed.confirmed_ns
    e.close(False)
    assert (sig(e.state_path), sig(e.keeper.path)) == written  # nothing new: nothing written
    e = Database(str(tmp_path / "app.db"), Spool(str(tmp_path / "spool")))
    e.open(d)
    assert e.step().transactions == 0  # watched for longer: only the record is new
    e.close(False)
    assert sig(e.keeper.path) == written[1] and sig(e.state_path) != written[0]
    assert e.closed is not None and e.closed.confirmed_ns > d.closed.confirmed_ns

    f = Database(str(tmp_path / "app.db"), Spool(str(tmp_path / "spool")))
    f.open(e)
    commit(app, 3, payload=500)
    res = f.step()
    assert res.transactions == 3 and res.catch_up is None and f.txid == 8
    f.handles.close(False)  # a crash: no close of its own, the earlier record stays
    assert os.path.exists(f.state_path)
    g = open_db(tmp_path)
    assert not os.path.exists(g.state_path)  # consumed on a restart
    assert g.generation == gen and g.txid == 8
    commit(app, 2, payload=500)
    assert g.step().transactions == 2
    g.close(False)
    g.open()  # the same object opened again like a restart: it reads the record, consumed
    assert not os.path.exists(g.state_path) and g.txid == 10
    g.close(False)
    assert os.path.exists(g.state_path)  # written again, though it says what it said before
    g.open()
    g.close()
    assert generations(tmp_path) == [gen]
    assert restored_dump(tmp_path) == dump(app)


def stop_while_the_app_truncates(tmp_path: Path, app: sqlite3.Connection) -> None:
    """Capture 10 transactions, stop; the application commits 5 and truncates its WAL."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 10, payload=500)
    d.step()
    d.close()
    commit(app, 5, payload=500)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0


def test_wal_changed_while_stopped_catches_up(tmp_path: Path, app) -> None:
    stop_while_the_app_truncates(tmp_path, app)
    commit(app, 5, payload=500)
    d = open_db(tmp_path)
    res = d.step()
    assert res.catch_up == "resume_failed" and res.new_generation is None
    assert d.txid == 11
    commit(app, 3, payload=500)
    assert d.step().transactions == 3
    d.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


def close_after_a_backfill(tmp_path: Path, app: sqlite3.Connection, quiet: bool) -> str:
    """Capture 10 transactions, backfill them all (the replicator's rotation), close (after more
    than a second when ``quiet``); the generation."""
    d = open_db(tmp_path, checkpoint_pages=4)
    d.step()
    commit(app, 10, payload=500)
    d.step()
    d.step()
    busy, log, done = app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert (busy, log) == (0, done)
    if quiet:
        time.sleep(1.2)
    d.close()
    assert d.generation is not None
    return d.generation


def test_wal_restarted_while_closed_resumes_without_catch_up(tmp_path: Path, app) -> None:
    """The application restarts its WAL (its next commit after a full backfill) while the
    replicator is stopped: the database file is as captured, so capture continues from the new
    epoch's first frame, without a catch-up."""
    gen = close_after_a_backfill(tmp_path, app, quiet=True)
    salts = read_wal_header(os.open(tmp_path / "app.db-wal", os.O_RDONLY))
    commit(app, 5, payload=500)
    fd = os.open(tmp_path / "app.db-wal", os.O_RDONLY)
    try:
        restarted = read_wal_header(fd)
    finally:
        os.close(fd)
    assert salts is not None and restarted is not None and restarted.salts != salts.salts
    d = open_db(tmp_path)
    res = d.step()
    assert res.catch_up is None and res.new_generation is None
    assert res.transactions == 5 and d.txid == 15
    commit(app, 3, payload=500)
    assert d.step().transactions == 3
    d.close()
    assert generations(tmp_path) == [gen]
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize(
    "quiet, old_epoch_commits", [(False, 0), (True, 1)],
    ids=["closed-right-after-a-write", "old-epoch-backfilled-while-closed"],
)
def test_wal_restarted_while_closed_without_proof_is_caught_up(
    tmp_path: Path, app, quiet: bool, old_epoch_commits: int
) -> None:
    """Nothing proven, so the restart is bridged by a catch-up: closed within a second of the
    file's last write (a later write might keep its times), or the file written while closed
    (commits in the old epoch, backfilled, then the restart)."""
    gen = close_after_a_backfill(tmp_path, app, quiet=quiet)
    if old_epoch_commits:
        commit(app, old_epoch_commits, payload=500)
        app.execute("PRAGMA wal_checkpoint(PASSIVE)")
    commit(app, 5, payload=500)
    d = open_db(tmp_path)
    res = d.step()
    assert res.catch_up == "resume_failed" and d.txid == 11
    d.close()
    assert generations(tmp_path) == [gen]
    assert restored_dump(tmp_path) == dump(app)


def test_no_wal_state_resumes_when_the_application_creates_its_wal(tmp_path: Path) -> None:
    """Captured with no WAL at all (every connection had closed); the application's first
    commit after a restart creates the WAL: it continues without a catch-up."""
    init_db(str(tmp_path / "app.db"))
    assert not (tmp_path / "app.db-wal").exists()
    d = open_db(tmp_path)
    assert d.step().new_generation == "no_position"
    time.sleep(1.2)
    d.close()
    gen = d.generation
    app = sqlite3.connect(tmp_path / "app.db", isolation_level=None, timeout=0)
    try:
        commit(app, 4, payload=500)
        d = open_db(tmp_path)
        res = d.step()
        assert res.catch_up is None and res.transactions == 4
        d.close()
        assert generations(tmp_path) == [gen]
        assert restored_dump(tmp_path) == dump(app)
    finally:
        app.close()


def test_replaced_database_file_starts_a_generation(tmp_path: Path, app) -> None:
    d = open_db(tmp_path)
    d.step()
    commit(app, 3, payload=500)
    d.step()
    other = tmp_path / "other.db"
    init_db(str(other))
    c = sqlite3.connect(other)
    c.execute("INSERT INTO log(seq, t_ns) VALUES (99, 0)")
    c.commit()
    c.close()
    app.close()
    # the usual way to put a database back: its -wal and -shm go, the new file moves in
    for name in ("other.db-wal", "other.db-shm", "app.db-wal", "app.db-shm"):
        if (tmp_path / name).exists():
            os.unlink(tmp_path / name)
    os.replace(other, tmp_path / "app.db")
    res = d.step()
    assert res.new_generation == "db_replaced"
    d.close()
    out = restored_dump(tmp_path)
    assert any("VALUES(99," in line for line in out)


def test_database_not_in_wal_mode_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "rollback.db"
    init_db(str(p), wal=False)
    d = Database(str(p), Spool(str(tmp_path / "spool")))
    with pytest.raises(DatabaseError, match="not in WAL mode"):
        d.open()
    assert not (tmp_path / "spool").exists()


def test_missing_database_is_refused(tmp_path: Path) -> None:
    d = Database(str(tmp_path / "nope.db"), Spool(str(tmp_path / "spool")))
    with pytest.raises(DatabaseError, match="does not exist"):
        d.open()
    assert not (tmp_path / "nope.db").exists()


def test_segments_are_bounded_and_long_transactions_whole(tmp_path: Path, app) -> None:
    d = open_db(tmp_path, tuning=Tuning(segment_max_frames=8))
    d.step()
    commit(app, 6, payload=500)  # small transactions: several segments of at most ~8 frames
    commit(app, 1, payload=200_000)  # one transaction of ~50 pages: one segment, whole
    commit(app, 3, payload=500)
    res = d.step()
    assert res.transactions == 10
    segs = [o for o in res.objects if o.kind == "wal"]
    assert len(segs) >= 3
    assert sum(o.end_txid - o.start_txid + 1 for o in segs) == 10
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_journal_size_limit_truncation_of_the_tail_is_not_taken_for_its_end(
    tmp_path: Path, app
) -> None:
    app.execute("PRAGMA journal_size_limit=300000")  # not a frame boundary
    d = open_db(tmp_path)
    d.step()
    commit(app, 10, payload=500)
    d.step()
    d.handles.unpin()
    commit(app, 40, payload=3000)  # the WAL grows well past the limit; none of it captured
    assert app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
    commit(app, 1, payload=500)  # reset, and at this commit the file is cut back to the limit
    assert os.path.getsize(tmp_path / "app.db-wal") == 300_000
    res = d.step()
    assert res.catch_up == "wal_reset"
    d.close()
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize("page_size", [512, 65536])
def test_page_sizes(tmp_path: Path, page_size: int) -> None:
    init_db(str(tmp_path / "app.db"), page_size=page_size)
    app = sqlite3.connect(tmp_path / "app.db", isolation_level=None, timeout=0)
    try:
        d = open_db(tmp_path, checkpoint_pages=32)
        d.step()
        for _ in range(10):
            commit(app, 5, payload=3000)
            d.step()
        d.close()
        assert d.page_size == page_size
        assert restored_dump(tmp_path) == dump(app)
    finally:
        app.close()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "other generation"])
def test_untrustworthy_page_index_starts_a_generation(
    tmp_path: Path, app, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a page index that can be trusted a catch-up cannot be proven: a restart whose WAL
    moved on starts a new generation, and says why."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 5, payload=500)
    d.step()
    d.close()
    idx = tmp_path / "spool" / "pages.idx"
    if damage == "missing":
        idx.unlink()
    elif damage == "corrupt":
        raw = bytearray(idx.read_bytes())
        raw[-10] ^= 0xFF
        idx.write_bytes(bytes(raw))
    else:
        raw = bytearray(idx.read_bytes())
        raw[8:24] = b"0123456789abcdef"
        idx.write_bytes(bytes(raw))
    commit(app, 3, payload=500)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    d = open_db(tmp_path)
    res = d.step()
    assert res.new_generation == "no_index" and res.catch_up is None
    assert "cannot continue generation" in caplog.text
    assert "no trustworthy page index" in caplog.text
    d.close()
    assert len(generations(tmp_path)) == 2
    assert restored_dump(tmp_path) == dump(app)


def test_page_index_is_replayed_from_the_spool(tmp_path: Path, app) -> None:
    """A kill leaves the saved index behind the spool: a restart replays the spooled objects
    after it (segments, a snapshot, a catch-up) and catches up exactly."""
    d = open_db(tmp_path)
    d.step()
    idx = tmp_path / "spool" / "pages.idx"
    stale = idx.read_bytes()  # as of txid 0
    commit(app, 4, payload=500)
    d.step()
    d.snapshot()
    commit(app, 20, payload=3000)  # grows the database
    d.step()
    app.execute("DELETE FROM data")
    app.execute("VACUUM")  # shrinks it
    d.step()
    d.close()
    idx.write_bytes(stale)  # as if killed before any save
    commit(app, 2, payload=500)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    d2 = open_db(tmp_path)
    res = d2.step()
    assert res.catch_up == "resume_failed"
    commit(app, 2, payload=500)
    d2.step()
    d2.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


def test_catchup_of_a_shrunk_database(tmp_path: Path, app) -> None:
    """While the replicator is stopped the application deletes most rows and VACUUMs (the
    database shrinks) and truncates its WAL: the catch-up ships the pages that changed and the
    new size; the restore equals the database, its content hash checked."""
    d = open_db(tmp_path)
    d.step()
    commit(app, 40, payload=3000)
    d.step()
    d.close()
    before = app.execute("PRAGMA page_count").fetchone()[0]
    app.execute("DELETE FROM data WHERE k > 3")
    app.execute("VACUUM")
    commit(app, 1, payload=500)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert app.execute("PRAGMA page_count").fetchone()[0] < before
    d = open_db(tmp_path)
    res = d.step()
    assert res.catch_up == "resume_failed"
    commit(app, 2, payload=3000)  # and grows again
    d.step()
    d.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


def test_crash_while_writing_a_catchup(tmp_path: Path, app,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A catch-up that fails half-written leaves no object and the page index as it was: the
    next start catches up again, exactly."""
    import replicator.catchup

    stop_while_the_app_truncates(tmp_path, app)
    real = replicator.catchup._changed_body

    def dies(*args: object) -> Iterator[bytes]:
        it = real(*args)
        yield next(it)[:100]
        raise OSError("disk gone")

    monkeypatch.setattr(replicator.catchup, "_changed_body", dies)
    d = open_db(tmp_path)
    with pytest.raises(OSError, match="disk gone"):
        d.step()
    assert not list((tmp_path / "spool").rglob("*.cu"))
    d.close()
    monkeypatch.setattr(replicator.catchup, "_changed_body", real)
    d = open_db(tmp_path)
    assert d.step().catch_up == "resume_failed"
    d.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


def _segment_txns(tmp_path: Path) -> list[tuple[int, int]]:
    """(txid, observed ns) of every captured transaction, from the spooled headers."""
    spool = Spool(str(tmp_path / "spool"))
    out = []
    for gen in spool.generations():
        for o in spool.objects(gen):
            h = spool.read_header(o)
            if o.kind == "wal":
                assert isinstance(h, SegmentHeader)
                out += [(t.txid, t.observed_ns) for t in h.txns]
    return out


def _restore_at(tmp_path: Path, ns: int, name: str) -> list[int]:
    async def run() -> None:
        client = Spool(str(tmp_path / "spool")).storage
        plan = await plan_restore(client, to_time_ns=ns)
        await apply_plan(client, plan, str(tmp_path / name), force=True)

    asyncio.run(run())
    return util_seqs(tmp_path / name)


def test_transactions_are_stamped_when_first_seen_not_when_written(
    tmp_path: Path, app
) -> None:
    d = open_db(tmp_path)
    d.step()
    t0 = time.time_ns()
    commit(app, 1)
    d.handles.sightings.take()  # what the capture (or the sighter, in a step) reads
    t1 = time.time_ns()
    commit(app, 2)
    d.handles.sightings.take()
    t2 = time.time_ns()
    time.sleep(0.05)  # the capture comes later; the transactions keep the times they were seen
    commit(app, 1)
    before_step = time.time_ns()
    res = d.step()
    after = time.time_ns()
    d.close()
    assert res.transactions == 4 and len(res.objects) == 1  # grouped into one segment
    stamps = [ns for _, ns in _segment_txns(tmp_path)]
    assert t0 <= stamps[0] <= t1
    assert stamps[1] == stamps[2] and t1 <= stamps[1] <= t2  # seen together
    assert before_step <= stamps[3] <= after  # first seen by the step itself
    assert stamps == sorted(stamps)
    # a point in time between two sightings restores exactly what had been seen by then
    assert _restore_at(tmp_path, stamps[0], "a.db") == [1]
    assert _restore_at(tmp_path, stamps[1] - 1, "b.db") == [1]
    assert _restore_at(tmp_path, stamps[1], "c.db") == [1, 2, 3]
    assert _restore_at(tmp_path, stamps[3], "d.db") == [1, 2, 3, 4]


def test_commits_during_a_snapshot_are_stamped_while_it_runs(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot holds up the capture (they take turns on the database) but not the stamps:
    a commit made while the snapshot is written is stamped by a reading taken meanwhile, not
    when the next step sees it."""
    d = open_db(tmp_path)
    d.step()
    write = d.snapshots.spool.write
    times: list[int] = []

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        if not times:  # the snapshot's object
            times.append(time.time_ns())
            commit(app, 1)  # the application commits while a large database is copied
            time.sleep(0.3)
        return write(*args, **kwargs)

    monkeypatch.setattr(d.snapshots.spool, "write", slow_write)
    d.snapshot()
    times.append(time.time_ns())
    assert d.step().transactions == 1
    d.close()
    _, stamp = _segment_txns(tmp_path)[-1]
    assert times[0] <= stamp < times[1]


def test_idle_steps_skip_work_and_still_see_every_commit(tmp_path: Path, app) -> None:
    d = open_db(tmp_path)
    d.step()
    commit(app, 3)
    assert d.step().transactions == 3
    for _ in range(5):
        res = d.step()
        assert res.objects == [] and res.transactions == 0
    for n in (1, 2, 1):
        commit(app, n)
        assert d.step().transactions == n
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_a_rotation_pins_again_once_the_writer_appends_a_tail_without_resetting(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a rotation has the pin released, another reader holds the backfill back, so the
    application appends frames instead of resetting the WAL: the pin is taken again as soon as
    they pass half the frames captured in the epoch, or ROTATE_TAIL if more (not after
    ROTATE_WAIT), so a reset that follows later never has a long uncaptured tail to overtake.
    Every commit is captured, with no catch-up."""
    import types

    from replicator import capture
    from replicator.wal import frame_size

    d = open_db(tmp_path, checkpoint_pages=16)
    d.step()
    commit(app, 5, payload=500)
    reader = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM log").fetchone()  # holds its read mark
    commit(app, 20, payload=500)  # past checkpoint_pages: the next step rotates
    polls: list[int] = []
    ends: list[tuple[int, int]] = []  # (the WAL's end, the captured end) when pinned again

    def sleep(_: float) -> None:
        # the application commits while the pin is released
        if len(polls) > 500:
            raise AssertionError("the pin stayed released while the tail grew")
        polls.append(1)
        commit(app, 1, payload=500)

    tail = 8 * frame_size(4096)
    monkeypatch.setattr(capture, "ROTATE_TAIL", tail)
    monkeypatch.setattr(capture, "ROTATE_WAIT", 60.0)
    monkeypatch.setattr(capture, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=sleep))
    pin = d.handles.pin

    def pinned(idx: int) -> None:
        pin(idx)
        shm = d.handles.read_shm()
        assert shm is not None
        assert d.pos is not None
        ends.append((shm[1], d.pos.frame))

    monkeypatch.setattr(d.handles, "pin", pinned)
    res = d.step()
    assert polls and ends, "no rotation released the pin"
    # pinned again within a commit (a few frames) of the tail's bound, not after the window
    assert all(end - captured <= max(captured // 2, 8) + 4 for end, captured in ends)
    assert res.catch_up is None
    monkeypatch.undo()
    reader.execute("COMMIT")
    reader.close()
    commit(app, 3, payload=500)
    res = d.step()
    assert res.catch_up is None
    d.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize("step_after_reset", [True, False])
def test_a_pin_on_read_mark_0_moves_off_once_the_new_epoch_has_frames(
    tmp_path: Path, app, step_after_reset: bool
) -> None:
    """A rotation with the application idle pins again while the WAL is wholly backfilled: that
    read holds read mark 0, which blocks every backfill, so each of the application's
    autocheckpoints past the threshold would fail after sorting the whole WAL. The first step
    after the application writes again moves the pin to a mark that lets its checkpoints
    backfill up to it (without that step, nothing is backfilled: the reason for the move)."""
    d = open_db(tmp_path, checkpoint_pages=16)
    d.step()
    commit(app, 20, payload=500)
    d.step()  # captures, rotates: nothing is written during the rotation
    shm = d.handles.read_shm()
    assert shm is not None and shm[1] == shm[2]  # wholly backfilled under the new pin
    assert d.handles.mark0
    commit(app, 1, payload=500)  # resets the WAL
    if step_after_reset:
        d.step()
        assert not d.handles.mark0
    # past the application's autocheckpoint threshold (1,000 frames), no step in between
    commit(app, 400, payload=8000)
    shm = d.handles.read_shm()
    assert shm is not None and shm[1] > 1000
    assert (shm[2] > 0) == step_after_reset
    d.step()
    assert d.handles.pinned
    assert d.txid == 421
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def _spiller(tmp_path: Path) -> sqlite3.Connection:
    """A connection whose transactions spill their frames into the WAL long before they
    commit."""
    conn = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    conn.execute("PRAGMA cache_size=4")
    return conn


def _spill(conn: sqlite3.Connection) -> None:
    """Begin a transaction on ``conn`` (a ``_spiller``) that writes frames, and leave it open."""
    conn.execute("BEGIN")
    for i in range(10):
        conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)", (i, b"P" * 3000))


@pytest.mark.parametrize("pages", [16, 1000])
@pytest.mark.parametrize("pending", [False, True])
def test_a_rotation_beside_a_busy_writer_pins_the_new_epoch_off_read_mark_0(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch, pending: bool, pages: int
) -> None:
    """A busy writer resets the WAL the moment a rotation releases the pin. The rotation waits
    for the new epoch's first commit to reach the wal-index and pins then: the pin is proven
    off read mark 0, so no handover has to move it at the next step (each read transaction
    begun beside a busy writer is a risk to a writer without a busy timeout). With that commit
    still pending (a transaction spilling frames into the new epoch), the rotation pins after
    ``ROTATE_GRACE`` (at once in an epoch of a few frames), maybe on read mark 0, and the next
    step moves it. Either way every commit is captured, without a catch-up."""
    import types

    from replicator import capture

    d = open_db(tmp_path, checkpoint_pages=pages)
    d.step()
    # past checkpoint_pages: the next step rotates
    commit(app, 20 if pages < 100 else 150, payload=500 if pages < 100 else 30000)
    other = _spiller(tmp_path)
    unpins: list[int] = []
    unpin, handover = d.handles.unpin, d.handles.handover
    handovers: list[int] = []

    def unpinned() -> None:
        # the rotation's checkpoint backfilled the WAL wholly: the first write resets it
        unpin()
        unpins.append(1)
        if len(unpins) == 1:
            if pending:
                _spill(other)
            else:
                commit(app, 1, payload=500)

    def counted() -> None:
        handovers.append(1)
        handover()

    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        time.sleep(seconds)

    d.handles.unpin = unpinned  # type: ignore[method-assign]
    monkeypatch.setattr(capture, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=sleep))
    res = d.step()
    monkeypatch.undo()
    assert unpins, "no rotation released the pin"
    # waited for the pending commit only where the epoch is long enough for it to be safe
    assert bool(polls) == (pending and pages >= 1000)
    fd = os.open(tmp_path / "app.db-wal", os.O_RDONLY)
    wal = read_wal_header(fd)
    os.close(fd)
    assert wal is not None and d.pos is not None and d.pos.salts == wal.salts  # reset, proven
    assert res.catch_up is None
    if not pending:
        assert not d.handles.mark0
    else:
        shm = d.handles.read_shm()
        assert shm is not None and shm[1] == 0  # the transaction is not in the wal-index yet
        other.execute("COMMIT")
    commit(app, 3, payload=500)
    d.checkpoint_pages = 10_000  # no second rotation
    d.handles.handover = counted  # type: ignore[method-assign]
    res = d.step()
    assert res.catch_up is None
    assert len(handovers) == (1 if pending else 0)
    assert not d.handles.mark0
    other.close()
    d.close()
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("older_writer", [False, True])
@pytest.mark.parametrize("kind", ["snapshot", "diff"])
def test_a_snapshot_at_the_header_of_a_new_epoch_restores(
    tmp_path: Path, app, kind: str, older_writer: bool, restart: bool,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation proves a reset while the application's next transaction is still spilling
    frames into the new epoch: the capture stands at that epoch's header, none of its frames
    captured. A snapshot (full or differential) taken then records the end of the previous
    epoch, which the next segment continues; a replica whose snapshot recorded the header's
    position instead (earlier writers) restores all the same."""
    from replicator import progress

    if older_writer:
        monkeypatch.setattr(progress.Progress, "position_of", lambda self, pos: pos)
    d = open_db(tmp_path, checkpoint_pages=16)
    d.step()
    commit(app, 20, payload=500)  # past checkpoint_pages: the next step rotates
    other = _spiller(tmp_path)
    unpin = d.handles.unpin

    def unpinned() -> None:
        unpin()
        if not other.in_transaction:
            _spill(other)  # its first write resets the wholly backfilled WAL

    d.handles.unpin = unpinned  # type: ignore[method-assign]
    d.step()
    d.handles.unpin = unpin  # type: ignore[method-assign]
    assert other.in_transaction, "no rotation released the pin"
    assert d.pos is not None and d.pos.frame == 0  # at the new epoch's header
    at, ended = d.pos, d.progress.last_end
    assert ended is not None and ended.salts != at.salts
    taken = d.snapshot() if kind == "snapshot" else d.diff_snapshot(max_fraction=1.0)
    assert taken is not None
    other.execute("COMMIT")
    commit(app, 3, payload=500)
    if restart:  # from the snapshot, the newest object: the epoch it stands at moved on
        d.close()
        d = open_db(tmp_path, checkpoint_pages=16)
    res = d.step()
    assert (res.catch_up is not None) == (restart and not older_writer)
    other.close()
    d.close()

    async def plan_and_header() -> tuple[Any, Any]:
        client = Spool(str(tmp_path / "spool")).storage
        plan = await plan_restore(client)
        return plan, header_from_json(await read_header(client.read_object(taken), taken.key),
                                      taken.key)

    plan, header = asyncio.run(plan_and_header())
    assert taken in (plan.snapshot, plan.diff)  # the restore starts from it
    assert header.position == (at if older_writer else ended)  # type: ignore[union-attr]
    assert len(generations(tmp_path)) == 1
    assert restored_dump(tmp_path) == dump(app)


def _idle_after_rotation(tmp_path: Path, app, wait: bool = True) -> Database:
    """A database that rotated with the application idle (its pin on read mark 0), then (with
    ``wait``) idle for over a second: its pin is releasable."""
    d = open_db(tmp_path, checkpoint_pages=16)
    d.step()
    commit(app, 20, payload=500)
    d.step()  # captures, rotates: the new pin finds the WAL wholly backfilled
    assert d.pin_releasable
    if wait:  # the database file's last write (the rotation's checkpoint) is a second old
        time.sleep(1.1)
    return d


@pytest.mark.parametrize(("truncate", "commits"), [
    (False, 0), (False, 5), (True, 0), (True, 5),
    # the new epoch overwrites the slot after the old one's captured end: only the unchanged
    # database file proves that the old epoch ended there
    (False, 60),
])
def test_an_idle_pin_is_released_and_taken_again_without_a_catch_up(
    tmp_path: Path, app, truncate: bool, commits: int
) -> None:
    """Released while idle, the pin holds back no checkpoint. With the database file unchanged
    when the next step pins again, nothing was backfilled meanwhile, so whatever the
    application did to the WAL (a reset at its next commit, a truncation) lost nothing: every
    commit is captured, with no catch-up and no new generation."""
    d = _idle_after_rotation(tmp_path, app)
    assert d.pos is not None
    end = d.pos.frame
    assert d.release_idle_pin()
    assert not d.handles.pinned and not d.pin_releasable
    if truncate:
        assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        assert os.path.getsize(tmp_path / "app.db-wal") == 0
    commit(app, commits, payload=500)
    if commits == 60:
        shm = d.handles.read_shm()
        assert shm is not None and shm[1] > end
    res = d.step()
    assert d.handles.pinned
    assert res.catch_up is None and res.new_generation is None
    assert res.transactions == commits
    commit(app, 2, payload=500)
    res = d.step()
    assert res.transactions == 2 and res.catch_up is None
    assert len(generations(tmp_path)) == 1
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_with_the_pin_released_checkpoints_run_and_lost_frames_are_caught_up(
    tmp_path: Path, app
) -> None:
    """While released, the application's own checkpoints backfill and reset the WAL as if no
    replicator were there (what a paused replicator must allow). Frames overwritten meanwhile
    cannot be proven: the next step catches up the pages that changed, in the same
    generation, and the replica still restores equal."""
    d = _idle_after_rotation(tmp_path, app)
    assert d.release_idle_pin()
    assert d.pos is not None
    salt1 = d.pos.salt1
    # over 1,000 frames each: SQLite's automatic checkpoint backfills them (nothing holds it
    # back) and the next commit resets the WAL, over frames the capture never saw
    commit(app, 400, payload=8000)
    commit(app, 400, payload=8000)
    fd = os.open(tmp_path / "app.db-wal", os.O_RDONLY)
    try:
        hdr = read_wal_header(fd)
    finally:
        os.close(fd)
    assert hdr is not None and hdr.salt1 - salt1 >= 2
    res = d.step()
    assert res.catch_up is not None and res.new_generation is None
    assert len(generations(tmp_path)) == 1
    d.close()
    assert restored_dump(tmp_path) == dump(app)


def test_an_idle_pin_is_kept_when_it_protects_frames_or_the_file_was_just_written(
    tmp_path: Path, app
) -> None:
    """Released only while the WAL is wholly backfilled and captured, and the database file
    was last written over a second ago (so that any later write shows in its signature)."""
    d = _idle_after_rotation(tmp_path, app, wait=False)
    assert not d.release_idle_pin()  # the rotation's checkpoint wrote the file just now
    time.sleep(1.1)
    commit(app, 1, payload=500)  # not captured yet
    assert not d.release_idle_pin()
    d.step()
    assert not d.pin_releasable  # moved off read mark 0: it holds nothing back
    assert not d.release_idle_pin()
    d.close()


def test_spool_header_cache_is_bounded_by_transactions(
    tmp_path: Path, app, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool keeps the headers it wrote lately up to a number of transactions, not of
    headers (a segment's header lists each of its transactions): the newest stays in memory,
    older ones are read back from their files, the same."""
    monkeypatch.setattr("replicator.spool.HEADER_CACHE", 20)
    d = open_db(tmp_path, tuning=Tuning(segment_max_frames=8))
    d.step()
    commit(app, 60, payload=300)
    objects = []
    while True:
        res = d.step()
        objects += res.objects
        if not res.more:
            break
    segs = [o for o in objects if o.kind == "wal"]
    assert len(segs) >= 8
    spool = d.spool
    cached = [spool.cached_header(o) for o in segs]
    assert cached[-1] is not None
    assert cached[0] is None
    kept = [h for h in cached if h is not None]
    assert sum(1 + len(h.txns) for h in kept if isinstance(h, SegmentHeader)) <= 20
    fresh = Spool(str(tmp_path / "spool"))  # no cache: every header from its file
    assert [spool.read_header(o) for o in segs] == [fresh.read_header(o) for o in segs]
    d.close()
    assert restored_dump(tmp_path) == dump(app)


@pytest.mark.parametrize(("before", "after", "proven"), [
    ((b"S1", 10, 4), (b"S1", 12, 9), True),  # backfill stayed below the first mxFrame
    ((b"S1", 10, 4), (b"S1", 12, 10), False),  # may have reached it: wholly backfilled then
    ((b"S1", 0, 0), (b"S1", 0, 0), False),  # an empty epoch is wholly backfilled
    ((b"S1", 10, 4), (b"S2", 3, 0), False),  # reset in between
    (None, (b"S1", 12, 9), False),
    ((b"S1", 10, 4), None, False),
])
def test_a_pin_is_proven_off_read_mark_0_only_when_backfill_stayed_short(
    before: tuple[bytes, int, int] | None, after: tuple[bytes, int, int] | None, proven: bool
) -> None:
    """A read transaction takes read mark 0 only if it begins while the WAL is wholly
    backfilled: the wal-index read just before and just after it proves it did not only when
    both show the same epoch and nBackfill after stayed below mxFrame before."""
    from replicator.handles import _short_of_backfill

    assert _short_of_backfill(before, after) is proven
