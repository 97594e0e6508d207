"""The one file watcher: inotify read by the event loop (and watchdog where there is none), with
real files changed in this process and by a SQLite writer in another."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import util
from util import commit
from writer import init_db

from replicator.inotify import IN_MODIFY, open_inotify
from replicator.watcher import DIR_GONE, FileEvents, InotifyEvents, WatchdogEvents

WAIT = 30.0


def _inotify() -> FileEvents:
    ino = open_inotify()
    if ino is None:
        pytest.skip("no inotify here")
    return InotifyEvents(ino)


BACKENDS = [pytest.param(_inotify, id="inotify"), pytest.param(WatchdogEvents, id="watchdog")]



@pytest.mark.parametrize("make", BACKENDS)
async def test_tree_reports_new_and_moved_directories_never_hidden_ones(
        tmp_path: Path, make: Callable[[], FileEvents]) -> None:
    root = tmp_path / "tenants"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "m"
    outside.mkdir(parents=True)
    init_db(str(outside / "moved.db"))
    told: list[tuple[str, str]] = []
    events = make()
    events.add_tree(str(root), True, lambda p: p.endswith(".db"),
                    lambda p, kind: told.append((p, kind)))
    try:
        init_db(str(root / "a" / "one.db"))
        (root / "new" / "deeper").mkdir(parents=True)  # made after the watch: watched too
        init_db(str(root / "new" / "deeper" / "two.db"))
        (root / ".spool").mkdir()
        init_db(str(root / ".spool" / "hidden.db"))
        os.rename(tmp_path / "elsewhere", root / "elsewhere")  # a tree moved in
        paths = {str(root / "a" / "one.db"), str(root / "new" / "deeper" / "two.db"),
                 str(root / "elsewhere" / "m" / "moved.db")}
        await util.until(lambda: paths <= {p for p, _ in told}, "the new databases")
        (root / "a" / "one.db").unlink()
        await util.until(lambda: (str(root / "a" / "one.db"), "deleted") in told, "the deletion")
        commit(root / ".spool" / "hidden.db", 3)
        await asyncio.sleep(0.3)
    finally:
        events.stop()
    assert not [p for p, _ in told if "/.spool/" in p]


async def test_a_file_made_while_a_new_directory_is_watched_is_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory made and filled at once: a database created in it after its event but just
    before its watch is in place (no event of its own) is still told, as created."""
    root = tmp_path / "tenants"
    root.mkdir()
    new = root / "new"
    events = _inotify()
    assert isinstance(events, InotifyEvents)
    watch = InotifyEvents._watch

    def racing_watch(self: InotifyEvents, directory: str) -> object:
        if directory == str(new) and not (new / "raced.db").exists():
            init_db(str(new / "raced.db"))  # the application is quicker than the watch
        return watch(self, directory)

    monkeypatch.setattr(InotifyEvents, "_watch", racing_watch)
    told: list[tuple[str, str]] = []
    events.add_tree(str(root), True, lambda p: p.endswith(".db"),
                    lambda p, kind: told.append((p, kind)))
    try:
        new.mkdir()
        await util.until(lambda: (str(new / "raced.db"), "created") in told, "the raced file",
                         WAIT)
    finally:
        events.stop()


@pytest.mark.parametrize("make", BACKENDS)
async def test_tree_told_of_directories_moved_away_or_deleted(
        tmp_path: Path, make: Callable[[], FileEvents]) -> None:
    """A directory moved out of the tree reports nothing about the files it takes: the tree is
    told the directory is gone (as for one deleted), never for a hidden one."""
    root = tmp_path / "tenants"
    for sub in ("g1", "g2", ".hidden"):
        (root / sub).mkdir(parents=True)
        init_db(str(root / sub / "t.db"))
    told: list[tuple[str, str]] = []
    events = make()
    events.add_tree(str(root), True, lambda p: p.endswith(".db"),
                    lambda p, kind: told.append((p, kind)))
    try:
        # watchdog's observer starts its watches in its thread: wait until they report
        init_db(str(root / "probe.db"))
        await util.until(lambda: (str(root / "probe.db"), "created") in told, "the watches")
        os.rename(root / "g1", tmp_path / "archived")
        await util.until(lambda: (str(root / "g1"), DIR_GONE) in told, "the move")
        shutil.rmtree(root / "g2")
        await util.until(lambda: (str(root / "g2"), DIR_GONE) in told, "the deletion")
        os.rename(root / ".hidden", tmp_path / "hidden")
        (root / "g3").mkdir()  # an event after the hidden one's, to wait for
        init_db(str(root / "g3" / "t.db"))
        await util.until(lambda: (str(root / "g3" / "t.db"), "created") in told, "g3")
    finally:
        events.stop()
    assert not [p for p, _ in told if "hidden" in p]
    assert (str(root / "g1" / "t.db"), "created") not in told


async def test_overflow_tells_trees_of_databases_gone_meanwhile(tmp_path: Path) -> None:
    """Events lost to an inotify queue overflow: the tree is told its files that are there (as
    modified) and its databases that are not (as deleted), since no event will say so."""
    events = _inotify()
    assert isinstance(events, InotifyEvents)
    root = tmp_path / "tenants"
    (root / "g").mkdir(parents=True)
    for name in ("kept.db", "g/gone.db", "g/new.db"):
        init_db(str(root / name))
    told: list[tuple[str, str]] = []
    events.add_tree(str(root), True, lambda p: p.endswith(".db"),
                    lambda p, kind: told.append((p, kind)))
    try:
        for name in ("kept.db", "g/gone.db"):
            events.add_db(str(root / name), asyncio.Event())
        loop = asyncio.get_running_loop()
        assert events._ino is not None
        loop.remove_reader(events._ino.fd)  # the events below are lost
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{root / 'g' / 'gone.db'}{suffix}")
        events._overflow()
        assert sorted(told) == [(str(root / "g" / "gone.db"), "deleted"),
                                (str(root / "g" / "new.db"), "modified")]
    finally:
        events.stop()


@pytest.mark.parametrize("make", BACKENDS)
async def test_database_woken_by_a_writer_in_another_process(
        tmp_path: Path, make: Callable[[], FileEvents]) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    wake = asyncio.Event()
    events = make()
    events.add_db(str(db), wake)
    try:
        assert events.watching(str(db))
        assert not events.watching(str(tmp_path / "other" / "x.db"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('INSERT INTO log(seq, t_ns) VALUES (1, 1)'); c.commit()", str(db))
        assert await proc.wait() == 0
        await asyncio.wait_for(wake.wait(), WAIT)
        events.remove_db(str(db))
        assert not events.watching(str(db))
    finally:
        events.stop()


async def test_paused_database_alone_in_its_directory_costs_no_wake_up(tmp_path: Path) -> None:
    """While the only database of a directory is paused its writes queue no modification event
    (the process is not even woken); a database registered beside it, and resuming, bring them
    back."""
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    init_db(str(a))
    init_db(str(b))
    wake_a, wake_b = asyncio.Event(), asyncio.Event()
    events = _inotify()
    assert isinstance(events, InotifyEvents)
    target = events.add_db(str(a), wake_a)
    try:
        events.set_paused(target, True)
        loop = asyncio.get_running_loop()
        assert events._ino is not None
        inotify = events._ino
        loop.remove_reader(inotify.fd)  # read by this test for a moment
        # the -wal stays while this connection is open: the writes only modify it
        conn = sqlite3.connect(a, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(commit, conn, 1)
            list(inotify.read())
            await asyncio.to_thread(commit, conn, 20)
            await asyncio.sleep(0.2)
            assert not [ev for ev in inotify.read() if ev.mask & IN_MODIFY]
        finally:
            conn.close()
        loop.add_reader(inotify.fd, events._on_readable)
        events.add_db(str(b), wake_b)  # a neighbour that is not paused: modifications again
        await asyncio.to_thread(commit, b, 1)
        await asyncio.wait_for(wake_b.wait(), WAIT)
        events.remove_db(str(b))
        events.set_paused(target, False)
        await asyncio.to_thread(commit, a, 1)
        await asyncio.wait_for(wake_a.wait(), WAIT)
    finally:
        events.stop()
