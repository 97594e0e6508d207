"""Sightings of the wal-index: what they read, how transactions are stamped from them, and the
sighter thread that takes them while a capture step runs. A real SQLite application writes."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from util import commit, wait_until
from writer import init_db

from replicator.sightings import Sighter, Sightings, salt_bytes
from replicator.wal import parse_wal_header


@pytest.fixture
def app(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    init_db(str(tmp_path / "app.db"))
    conn = sqlite3.connect(tmp_path / "app.db", isolation_level=None, timeout=0)
    commit(conn, 1)
    yield conn
    conn.close()


def wal_salts(tmp_path: Path) -> bytes:
    hdr = parse_wal_header((tmp_path / "app.db-wal").read_bytes()[:32])
    return salt_bytes(hdr.salts)


def test_a_reading_shows_the_committed_end_of_the_wal(tmp_path: Path, app) -> None:
    s = Sightings(str(tmp_path / "app.db-shm"))
    first = s.take()
    assert first is not None and first[0] == wal_salts(tmp_path) and first[1] >= 1
    commit(app, 3)
    second = s.take()
    assert second is not None and second[0] == first[0] and second[1] >= first[1] + 3
    s.close()


def test_stamps_are_the_first_reading_that_shows_the_commit(tmp_path: Path, app) -> None:
    s = Sightings(str(tmp_path / "app.db-shm"))
    a = s.take()
    t_a = time.time_ns()
    commit(app, 1)
    b = s.take()
    t_b = time.time_ns()
    s.take()  # unchanged: not a new sighting
    assert a is not None and b is not None
    salts = a[0]
    # a commit frame at or before a's end was seen by a; after it, by b; after b, not yet
    seen_a, seen_b = s.first_seen(salts, a[1]), s.first_seen(salts, b[1])
    assert seen_a is not None and seen_a <= t_a
    assert seen_b is not None and t_a <= seen_b <= t_b
    assert s.first_seen(salts, b[1] + 1) is None
    before = time.time_ns()
    # in one pass: seen by a, by b, not yet (now)
    stamps = s.stamps(salts, [a[1], b[1], b[1] + 1], 0)
    assert stamps[:2] == [seen_a, seen_b] and stamps[2] >= before
    # never before the floor nor the one ahead, and nothing from another epoch
    assert s.stamps(salts, [a[1], b[1]], t_b + 5) == [t_b + 5, t_b + 5]
    assert s.stamps(b"\0" * 8, [a[1]], 0)[0] >= before
    assert s.first_seen(b"\0" * 8, 1) is None
    # once captured up to a's end, a is forgotten; b is still the stamp of what follows it
    s.forget(salts, a[1])
    assert s.first_seen(salts, a[1]) == seen_b
    s.forget(salts, b[1])
    assert s.first_seen(salts, b[1]) is None
    s.close()


def test_forget_drops_earlier_epochs_only(tmp_path: Path, app) -> None:
    s = Sightings(str(tmp_path / "app.db-shm"))
    a = s.take()
    assert a is not None
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    commit(app, 1)  # a new epoch
    b = s.take()
    assert b is not None and b[0] != a[0]
    s.forget(a[0], 0)  # still capturing the old epoch: the new one's reading stays
    assert s.first_seen(a[0], a[1]) is not None and s.first_seen(b[0], b[1]) is not None
    s.forget(b[0], 0)  # moved on to the new epoch: the old one's readings go
    assert s.first_seen(a[0], a[1]) is None and s.first_seen(b[0], b[1]) is not None
    s.close()


def first_reading(tmp_path: Path) -> tuple[Sightings, bytes, int]:
    """The application's wal-index read once: the sightings, the salts and the committed end."""
    s = Sightings(str(tmp_path / "app.db-shm"))
    first = s.take()
    assert first is not None
    return s, first[0], first[1]


def test_the_sighter_takes_readings_while_a_step_runs(tmp_path: Path, app) -> None:
    s, salts, end = first_reading(tmp_path)
    sighter = Sighter(interval=0.001)
    with sighter.watching(s):
        commit(app, 2)
        # nobody calls take(): the sighter's reading shows the commits
        wait_until(lambda: s.first_seen(salts, end + 2) is not None, 10,
                   what="a sighting of the commits")
    time.sleep(0.05)
    commit(app, 1)
    time.sleep(0.05)
    other = Sightings(str(tmp_path / "app.db-shm"))
    now = other.take()
    other.close()
    assert now is not None and now[0] == salts
    # after the step no more readings: the next commit is seen at the next step
    assert s.first_seen(salts, now[1]) is None
    s.close()


def test_the_sighter_sleeps_between_steps_and_wakes_for_each_one(tmp_path: Path, app) -> None:
    s, salts, end = first_reading(tmp_path)
    sighter = Sighter(interval=0.01)
    # short steps, some over before the thread wakes: two wake-ups each at most
    for pause in (0.0, 0.0, 0.005, 0.03, 0.03, 0.0):
        with sighter.watching(s):
            time.sleep(pause / 10)
        time.sleep(pause)
    time.sleep(3 * sighter.interval)
    assert 0 < sighter.wakeups <= 2 * 6
    # while no step runs it is not woken at all
    idle_from = sighter.wakeups
    time.sleep(0.1)
    assert sighter.wakeups == idle_from
    # a step over before the thread can wake, then a long one: the long one gets readings,
    # the commits made meanwhile are seen
    with sighter.watching(s):
        pass
    with sighter.watching(s):
        commit(app, 2)
        wait_until(lambda: s.first_seen(salts, end + 2) is not None, 10,
                   what="a sighting of the commits")
    assert sighter.wakeups > idle_from
    s.close()
