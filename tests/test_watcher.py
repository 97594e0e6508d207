"""The one file watcher: inotify read by the event loop (and watchdog where there is none), with
real files changed in this process and by a SQLite writer in another."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import util
from util import commit
from writer import init_db

from replicator.inotify import open_inotify
from replicator.watcher import FileEvents, InotifyEvents, WatchdogEvents

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
