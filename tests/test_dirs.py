"""Directories of databases (``dbs: [{dir: ...}]``): configuration, discovery, the real CLI with
databases appearing and disappearing while others are written, and many databases restored."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import util
from faultproxy import FaultProxy
from s3fixtures import TEST_REGION, S3Server
from util import commit, free_port
from writer import init_db

from replicator.config import DbConfig, ReplicaConfig, parse_config
from replicator.discovery import EMPTY, classify, find_db, matches, scan, sub_url
from replicator.errors import ConfigError
from replicator.notify import Notifier
from replicator.pos import parse_key
from replicator.replicator import DatabaseService, Replicator
from replicator.storage.s3 import S3Storage


async def run_until(rep: Replicator, done: Callable[[], bool], what: str) -> None:
    """Run ``rep`` until ``done()`` (looked at every 50 ms, for at most a minute), then stop
    it; fail with ``what`` and the fleet's status if it never is."""
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    try:
        for _ in range(1200):
            if done():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what}: {rep.fleet.status()}")
    finally:
        stop.set()
        await task


def _config(tmp_path: Path, root: Path, dest: Path, port: int | None = None,
            extra: str = "") -> Path:
    cfg = tmp_path / "replicator.yml"
    addr = f"metrics-addr: 127.0.0.1:{port}\n" if port else ""
    cfg.write_text(
        f"{addr}shutdown-timeout: 20s\n"
        f"dbs:\n  - dir: {root}\n    pattern: '*.db'\n    recursive: true\n"
        f"    integrity: off\n{extra}"
        f"    replicas:\n      - {{name: local, path: {dest}}}\n"
    )
    return cfg


def test_dir_entry_config_and_paths(tmp_path: Path) -> None:
    root = tmp_path / "tenants"
    cfg = parse_config({"dbs": [
        {"dir": str(root), "recursive": True, "snapshot-interval": "1h",
         "replicas": [{"name": "local", "path": "/backups/t"},
                      {"name": "s3", "url": "s3://bkt/t?region=x"}]},
        {"path": str(tmp_path / "app.db"), "replicas": ["/backups/app"]},
    ]})
    assert [d.path for d in cfg.dbs] == [str(tmp_path / "app.db")]
    d = cfg.dirs[0]
    assert (d.dir, d.pattern, d.recursive) == (str(root), "*.db", True)
    db = find_db(cfg, str(root / "sub" / "a.db"))
    assert db is not None and db.snapshot_interval == 3600
    assert [r.url for r in db.replicas][0] == "/backups/t/sub/a.db"
    assert [r.url for r in db.replicas][1].startswith("s3://bkt/t/sub/a.db")
    assert db.spool_dir == str(root / "sub" / ".a.db-replicator")
    assert find_db(cfg, str(root / "a.db-wal")) is None
    assert find_db(cfg, str(root / ".a.db-replicator" / "x.db")) is None
    assert find_db(cfg, str(tmp_path / "other.db")) is None
    assert sub_url("file:///b/t", "a.db") == "file:///b/t/a.db"
    assert not matches(d, str(root / "a.txt"))
    restoring = parse_config({"dbs": [{"dir": str(root), "replicas": ["/b"],
                                       "restore-if-db-not-exists": True}]})
    assert restoring.dirs[0].template.restore_if_db_not_exists
    for bad, msg in (
        ({"dir": str(root), "path": "x", "replicas": ["/b"]}, "either path or dir"),
        ({"dir": str(root), "pattern": "a/*.db", "replicas": ["/b"]}, "pattern"),
        ({"dir": str(root), "recursive": "yes", "replicas": ["/b"]}, "recursive"),
    ):
        with pytest.raises(ConfigError, match=msg):
            parse_config({"dbs": [bad]})


def test_scan_and_classify(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / ".spool").mkdir()
    init_db(str(root / "a.db"))
    init_db(str(root / "sub" / "b.db"))
    init_db(str(root / ".spool" / "c.db"))
    (root / "notes.db").write_text("not a database, but named like one\n" * 5)
    (root / "new.db").touch()
    rollback = sqlite3.connect(root / "old.db")
    rollback.execute("CREATE TABLE t(x)")
    rollback.commit()
    rollback.close()
    cfg = parse_config({"dbs": [{"dir": str(root), "recursive": True, "replicas": ["/b"]}]})
    found = sorted(os.path.relpath(p, root) for p, _ in scan(cfg.dirs[0]))
    assert found == ["a.db", "new.db", "notes.db", "old.db", "sub/b.db"]
    assert classify(str(root / "a.db")) is None
    assert classify(str(root / "new.db")) == EMPTY
    assert classify(str(root / "notes.db")) == "not a SQLite database"
    assert "not in WAL mode" in str(classify(str(root / "old.db")))


def _status(port: int) -> dict[str, object]:
    r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def _replicated(port: int) -> set[str]:
    """The databases every replica of which holds something (none before the server is up)."""
    r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
    if r.returncode != 0:
        return set()
    dbs = json.loads(r.stdout)["dbs"]
    assert isinstance(dbs, list)
    return {d["path"] for d in dbs if all(r["generation"] for r in d["replicas"])}


def test_a_process_of_many_databases_logs_its_stop_in_one_line(tmp_path: Path) -> None:
    """Past SUMMARY_FOLD_ABOVE databases the final syncs of a stop are one INFO line; each
    database's own line is at DEBUG, and what was committed before the stop is in the replica."""
    from replicator.report import SUMMARY_FOLD_ABOVE

    root, dest = tmp_path / "tenants", tmp_path / "backups"
    root.mkdir()
    n = SUMMARY_FOLD_ABOVE + 2
    for i in range(n):
        init_db(str(root / f"t{i}.db"))
    port = free_port()
    cfg = _config(tmp_path, root, dest, port)
    rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep.log", log_level="info",
                         log_format="json")
    try:
        util.wait_until(lambda: len(_replicated(port)) == n, 60, 0.3, "every database")
        for i in range(3):
            commit(root / f"t{i}.db", i + 1)
    finally:
        assert rep.stop() == 0, rep.text()
    messages = [json.loads(line)["message"] for line in rep.text().splitlines()]
    assert not [m for m in messages if ": stopped after final sync at txid" in m], messages
    assert messages.count(f"{n} databases stopped after final sync") == 1, messages
    (tmp_path / "out").mkdir()
    for i in range(3):
        out = tmp_path / "out" / f"t{i}.db"
        r = util.cli("restore", "--config", str(cfg), "-o", str(out), str(root / f"t{i}.db"))
        assert r.returncode == 0, r.stderr
        assert util.seqs(out) == list(range(1, i + 2))


def test_databases_appear_and_disappear_while_others_are_written(tmp_path: Path) -> None:
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    (root / "sub").mkdir(parents=True)
    (root / "old").mkdir()
    for name in ("a.db", "b.db", "sub/c.db", "old/e.db"):
        init_db(str(root / name))
    notes = root / "notes.db"
    notes.write_text("a note, not a database\n")
    (root / "old" / "junk.db").write_text("not a database either\n")
    port = free_port()
    cfg = _config(tmp_path, root, dest, port)
    rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep.log")
    writer = util.CommitLoop(root / "a.db")
    try:
        base = {str(root / n) for n in ("a.db", "b.db", "sub/c.db", "old/e.db")}
        util.wait_until(lambda: base <= _replicated(port), 60, 0.3, "first databases")
        skipped = _status(port)["databases"]["skipped_files"]  # type: ignore[index]
        assert str(root / "old" / "junk.db") in skipped
        writer.start()
        # a new database (created empty, then made a WAL database), another removed, a
        # directory with a database and a skipped file moved away (no event names its files),
        # the non-database file changed again: all while a.db is written
        os.rename(root / "old", tmp_path / "archived")
        (root / "sub" / "deeper").mkdir()
        init_db(str(root / "sub" / "deeper" / "d.db"))
        commit(root / "sub" / "deeper" / "d.db", 5)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{root / 'b.db'}{suffix}").unlink(missing_ok=True)
        notes.write_text("changed, still not a database\n")
        d_path = str(root / "sub" / "deeper" / "d.db")
        util.wait_until(lambda: d_path in _replicated(port), 60, 0.3, "new database")
        doc = _status(port)
        paths = {d["path"] for d in doc["dbs"]}  # type: ignore[union-attr]
        assert str(root / "b.db") not in paths
        util.wait_until(lambda: str(root / "old" / "e.db") not in {
            d["path"] for d in _status(port)["dbs"]}, 30, 0.2, "the moved database stops")
        doc = _status(port)
        databases = doc["databases"]
        assert isinstance(databases, dict)
        assert databases["replicating"] == 3 and databases["queued"] == 0
        assert databases["skipped_files"] == {str(notes): "not a SQLite database"}
        text = util.cli("status", "--config", str(cfg), timeout=30).stdout
        assert "databases of dir entries: 3 replicating, 0 queued" in text, text
        assert f"skipped {notes}: not a SQLite database" in text
        assert str(root / "sub" / "c.db") in text
        commit(root / "sub" / "deeper" / "d.db", 5)
    finally:
        writer.stop()
        assert rep.stop() == 0, rep.text()
    log = rep.text()
    assert log.count("notes.db: not a SQLite database; skipped") == 1, log
    assert "b.db: removed; replication stops" in log
    assert "old/e.db: removed; replication stops" in log
    assert "Traceback" not in log
    for name, rows in (("a.db", writer.count), ("sub/deeper/d.db", 10), ("sub/c.db", 0)):
        out = tmp_path / "out" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        r = util.cli("restore", "--config", str(cfg), "-o", str(out), str(root / name))
        assert r.returncode == 0, r.stderr
        assert util.dump(out) == util.dump(root / name)
        assert len(util.seqs(out)) == rows
    r = util.cli("generations", "--config", str(cfg), str(root / "a.db"))
    assert r.returncode == 0 and "local" in r.stdout, r.stderr
    # b.db is gone from the directory, but its replica stays restorable by path
    r = util.cli("restore", "--config", str(cfg), "-o", str(tmp_path / "b.db"), str(root / "b.db"))
    assert r.returncode == 0, r.stderr
    # so is the database of the directory moved away, equal to the moved file
    e_out = tmp_path / "e.db"
    r = util.cli("restore", "--config", str(cfg), "-o", str(e_out), str(root / "old" / "e.db"))
    assert r.returncode == 0, r.stderr
    assert util.dump(e_out) == util.dump(tmp_path / "archived" / "e.db")
    r = util.cli("restore", "--config", str(cfg), "-o", str(tmp_path / "x.db"),
                 str(tmp_path / "elsewhere.db"))
    assert r.returncode != 0 and "is not in" in r.stderr and "Traceback" not in r.stderr


def test_many_databases_replicated_and_restored_equal(tmp_path: Path) -> None:
    count = 200
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    names = [f"g{i % 10}/t{i:03d}.db" for i in range(count)]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        init_db(str(root / name))
        commit(root / name, 1 + i % 7)
    port = free_port()
    cfg = _config(tmp_path, root, dest, port)
    rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep.log")
    try:
        util.wait_until(lambda: len(_replicated(port)) == count, 90, 0.5,
                        "every database replicated")
        for name in names[:50]:
            commit(root / name, 3)  # and more commits after the start
    finally:
        assert rep.stop(60) == 0, rep.text()
    for name in names:
        (tmp_path / "out" / name).parent.mkdir(parents=True, exist_ok=True)
    _restore_all(cfg, tmp_path / "out", root, names)
    for name in names:
        assert util.dump(tmp_path / "out" / name) == util.dump(root / name), name


def _restore_all(cfg: Path, out: Path, root: Path, names: list[str]) -> None:
    """``restore --config`` for every database, in one interpreter (the CLI's own ``main``)."""
    code = (
        "import sys\n"
        "from replicator.cli import main\n"
        "cfg, out, root = sys.argv[1:4]\n"
        "for name in sys.argv[4:]:\n"
        "    if main(['restore', '--config', cfg, '-o', f'{out}/{name}', f'{root}/{name}']):\n"
        "        sys.exit(f'restore of {name} failed')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(cfg), str(out), str(root), *names],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]


def _fds_on(path: Path) -> int:
    """This process's descriptors open on ``path`` (or its -wal/-shm)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        n += target.startswith(str(path))
    return n


async def test_parked_database_holds_no_files_and_resumes(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = tmp_path / "replica"

    # an application with its database open (as a connection pool keeps it), and a first commit
    # in a process of its own: SQLite keeps a process's closed descriptors on a file open while
    # another connection of that process holds a lock on it
    app = util.hold_open(db)
    commit(db, 1)

    async def go() -> tuple[list[str | None], list[bool]]:
        cfg = DbConfig(path=str(db), replicas=[ReplicaConfig("local", str(dest))], health=[])
        s = DatabaseService(cfg)
        await s.open()
        gens: list[str | None] = [s.db.generation]
        parked = [await s.park()]  # the first snapshot is not shipped yet: no parking
        await s.replicas[0].sync()
        parked.append(await s.park())
        assert _fds_on(db) == 0
        commit(db, 10)  # written while parked: the same epoch goes on
        await s.unpark()
        await s.sync()
        gens.append(s.db.generation)
        await s.replicas[0].sync()
        parked.append(await s.park())
        # while parked the application checkpoints, resets the WAL and writes on (a catch-up)
        util.checkpoint_truncate(db)
        commit(db, 5)
        await s.unpark()
        await s.sync()
        gens.append(s.db.generation)
        await s.close(10)
        return gens, parked

    try:
        gens, parked = await go()
    finally:
        app.communicate("", timeout=30)
    assert parked == [False, True, True]
    # the WAL reset while parked costs a catch-up of the changed pages, not a new generation
    assert gens[0] == gens[1] == gens[2]
    assert len(list(dest.glob("generations/*/wal/*.cu"))) == 1
    out = tmp_path / "out.db"
    util.restore(str(dest), out)
    assert util.dump(out) == util.dump(db)
    assert len(util.seqs(out)) == 16


async def test_a_commit_while_a_database_parks_is_captured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application commits between the replicator's last look and the close of its
    connections, and closes its own, the last one: checkpointed, the WAL removed. The parked
    state must not take that for the state it parked at."""
    db = tmp_path / "app.db"
    init_db(str(db))
    commit(db, 1)
    dest = tmp_path / "replica"
    cfg = DbConfig(path=str(db), replicas=[ReplicaConfig("local", str(dest))], health=[])
    s = DatabaseService(cfg)
    await s.open()
    await s.sync()
    await s.replicas[0].sync()
    closing = s.db.close

    def close_then_commit(tidy: bool = True) -> None:
        closing(tidy)
        commit(db, 3)  # the last connection: checkpointed on close, the WAL removed

    monkeypatch.setattr(s.db, "close", close_then_commit)
    assert await s.park()
    assert not await asyncio.to_thread(os.path.exists, f"{db}-wal")
    await s.close(10)  # the final sync must see the change
    out = tmp_path / "out.db"
    util.restore(str(dest), out)
    assert util.seqs(out) == [1, 2, 3, 4]


async def test_open_budget_parks_idle_databases_to_open_the_next(tmp_path: Path) -> None:
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    root.mkdir()
    names = [f"t{i}.db" for i in range(6)]
    for i, name in enumerate(names):
        init_db(str(root / name))
        commit(root / name, i + 1)
    cfg = parse_config({"dbs": [{"dir": str(root), "integrity": "off",
                                 "replicas": [{"name": "local", "path": str(dest)}]}]})

    rep = Replicator(cfg)
    rep.runtime.max_open, rep.runtime.park_after = 2, 0.2
    most = 0

    def opened_and_parked() -> bool:
        nonlocal most
        most = max(most, rep.runtime.open_dbs)
        services = list(rep.fleet.services.values())
        return len(services) == len(names) and all(s.parked for s in services)

    await run_until(rep, opened_and_parked, "not all opened and parked")
    assert most <= 2
    (tmp_path / "out").mkdir()
    for name in names:
        out = tmp_path / "out" / name
        util.restore(str(dest / name), out)
        assert util.dump(out) == util.dump(root / name)


async def test_a_database_out_of_descriptors_is_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A database whose open ran out of file descriptors (EMFILE) is not left failed for good
    (no change may come to queue it again): it shows as failed, with why, and is queued again
    every FDS_RETRY until it opens, with one warning; the others are not held up."""
    from replicator import fleet as fleet_mod

    root, dest = tmp_path / "tenants", tmp_path / "backups"
    root.mkdir()
    names = ["a.db", "b.db", "c.db"]
    for i, name in enumerate(names):
        init_db(str(root / name))
        commit(root / name, i + 1)
    monkeypatch.setattr(fleet_mod, "FDS_RETRY", 0.3)
    real_open = DatabaseService.open
    refused: list[str] = []

    async def open_once_refused(self: DatabaseService) -> None:
        if self.cfg.path.endswith("b.db") and len(refused) < 2:  # twice running
            refused.append(self.cfg.path)
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), self.cfg.path)
        await real_open(self)

    monkeypatch.setattr(DatabaseService, "open", open_once_refused)
    cfg = parse_config({"dbs": [{"dir": str(root), "integrity": "off",
                                 "replicas": [{"name": "local", "path": str(dest)}]}]})
    rep = Replicator(cfg)
    seen_failed = False

    def all_replicating() -> bool:
        nonlocal seen_failed
        if str(root / "b.db") in rep.fleet.failed:
            seen_failed = True
            assert "Too many open files" in rep.status()["databases"]["failed_files"][
                str(root / "b.db")]
        return len(rep.fleet.services) == len(names) and not rep.fleet.failed

    await run_until(rep, all_replicating, "not all replicating")
    assert len(refused) == 2 and seen_failed
    warned = [r for r in caplog.records if "out of file descriptors" in r.getMessage()
              and r.levelno >= logging.WARNING]
    assert len(warned) == 1  # logged once until it opens
    assert not any("cannot replicate:" in r.getMessage() for r in caplog.records)
    (tmp_path / "out").mkdir()
    for name in names:
        out = tmp_path / "out" / name
        util.restore(str(dest / name), out)
        assert util.dump(out) == util.dump(root / name)


async def test_removed_databases_leave_no_service_series_or_notices(tmp_path: Path) -> None:
    """A database whose file goes stops, and its metric series and notification state go with
    it (a directory of tenants that come and go does not grow the exposition); one removed
    while it opens is closed once opened, never run nor reported failed. The others stay."""
    from prometheus_client import generate_latest

    root, dest = tmp_path / "tenants", tmp_path / "backups"
    root.mkdir()
    for name in ("a.db", "b.db", "c.db"):
        init_db(str(root / name))
        commit(root / name, 2)
    cfg = parse_config({"dbs": [{"dir": str(root), "integrity": "off",
                                 "replicas": [{"name": "local", "path": str(dest)}]}]})
    late = str(root / "c.db")

    def exposed() -> str:
        return generate_latest(rep.metrics.registry).decode()

    rep = Replicator(cfg)
    notifier = rep.notifier = Notifier([], min_interval=3600)  # as with a channel configured
    release = asyncio.Event()
    make = rep.fleet._make

    class OpenLater(DatabaseService):
        __slots__ = ()

        async def open(self) -> None:
            await release.wait()
            await super().open()

    def slow(c: DbConfig) -> DatabaseService:
        s = make(c)
        if c.path == late:
            s.__class__ = OpenLater  # the same service, whose open() waits for the release
        return s

    rep.fleet._make = slow

    async def until(what: str, cond: Callable[[], bool]) -> None:
        for _ in range(600):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what}: {rep.fleet.status()}")

    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    try:
        await until("a and b replicate, c opens", lambda: len(rep.fleet.services) == 2
                    and rep.fleet.progress()["opening"] == 1)
        names = {p: s.cfg.name for p, s in rep.fleet.services.items()}
        a, b = str(root / "a.db"), str(root / "b.db")
        assert f'db="{names[a]}"' in exposed() and f'db="{names[b]}"' in exposed()
        for _ in range(2):  # the second is held back by the rate limit
            await notifier.notify(names[a], "lag", "failing", "behind")
        assert (names[a], "lag") in notifier._keys and (names[a], "lag") in notifier._held
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(a + suffix)
        await until("a stops", lambda: a not in rep.fleet.services
                    and f'db="{names[a]}"' not in exposed())
        assert not any(k[0] == names[a] for k in notifier._keys) and not notifier._held
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(late + suffix)
        await until("the removal of c is seen", lambda: late in rep.fleet._gone)
        release.set()
        await until("c is closed", lambda: rep.fleet.progress()["opening"] == 0)
        assert late not in rep.fleet.services and late not in rep.fleet.failed
        assert f'db="{names[b]}"' in exposed()
        assert rep.fleet.progress()["replicating"] == 1
    finally:
        release.set()
        stop.set()
        await task


@pytest.mark.s3
async def test_idle_fleet_makes_no_requests_and_a_write_wakes_its_database(
        tmp_path: Path, seaweedfs_server: S3Server, s3_url_factory: Callable[..., str]) -> None:
    root = tmp_path / "tenants"
    names = [f"g{i % 3}/t{i}.db" for i in range(12)]
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        init_db(str(root / name))
        commit(root / name, 1 + i % 3)
    bucket = S3Storage.from_url(s3_url_factory("seaweedfs")).bucket
    woken = names[4]

    def shipped_txid() -> int:
        prefix = f"t/{woken}/"
        infos = [parse_key(k[len(prefix):]) for k in seaweedfs_server.keys(bucket)
                 if k.startswith(prefix)]
        return max((i.end_txid for i in infos if i is not None), default=0)

    with FaultProxy(("127.0.0.1", seaweedfs_server.port)) as proxy:
        url = (f"s3://{bucket}/t?endpoint={proxy.endpoint}&region={TEST_REGION}"
               "&force_path_style=true")
        # compaction off: it follows the last writes with a listing as each level's window
        # closes, which is bounded work, not polling
        cfg = parse_config({"dbs": [{"dir": str(root), "recursive": True, "integrity": "off",
                                     "compaction-levels": [],
                                     "replicas": [{"name": "s3", "url": url}]}]})
        rep = Replicator(cfg)
        rep.runtime.park_after = 0.2
        stop = asyncio.Event()
        task = asyncio.create_task(rep.run(stop))
        try:
            def all_parked() -> bool:
                services = list(rep.fleet.services.values())
                return len(services) == len(names) and all(s.parked for s in services)

            await util.until(all_parked, "every database replicated and parked")
            loop = asyncio.get_running_loop()
            before = proxy.client_bytes, proxy.connections
            await asyncio.sleep(3)
            assert (proxy.client_bytes, proxy.connections) == before, "requests while idle"
            # nothing of a database wakes within the next minute (a few timers of the process,
            # and an hourly look at the maintenance schedule)
            soon = [h for h in loop._scheduled  # type: ignore[attr-defined]
                    if not h.cancelled() and h.when() < loop.time() + 60]
            assert len(soon) < len(names) // 2, soon
            txid = shipped_txid()
            w = util.start_writer(root / woken, tmp_path / "w.log", "--count", "5")
            await asyncio.to_thread(w.communicate, timeout=60)
            # shipped as WAL segments, or as one catch-up when the WAL restarted while the
            # database was parked: the restore below has every commit either way
            await util.until(lambda: shipped_txid() > txid, "the parked database's commits")
        finally:
            stop.set()
            await task
    out = tmp_path / "out.db"
    await asyncio.to_thread(util.restore, seaweedfs_server.url(bucket, f"t/{woken}"), out)
    assert util.dump(out) == util.dump(root / woken)


async def test_threads_bounded_whatever_the_number_of_cores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forty databases shipping to a local directory at once on a host that says it has 256
    cores: the process's threads stay within the fixed pools (asyncio's own default pool, which
    would grow with the cores, is not used)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    names = [f"g{i % 4}/t{i}.db" for i in range(40)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        init_db(str(root / name))
    cfg = parse_config({"dbs": [{"dir": str(root), "recursive": True, "integrity": "off",
                                 "replicas": [{"name": "local", "path": str(dest)}]}]})
    rep = Replicator(cfg)
    stop = asyncio.Event()
    task = asyncio.create_task(rep.run(stop))
    threads: dict[int, str] = {}
    seen: dict[str, int] = {}

    async def shipped() -> bool:
        """Every database captured past ``seen`` and shipped all it captured."""
        threads.update((t.ident or 0, t.name) for t in threading.enumerate())
        services = dict(rep.fleet.services)
        if len(services) < len(names):
            return False
        for path, s in services.items():
            if s.db.txid <= seen.get(path, -1):
                return False
            for r in s.replicas:
                if await r.pending(remote=False):
                    return False
        return True

    try:
        await util.until(shipped, "every database replicated")
        for _ in range(3):  # every database commits at once, three times over
            seen.update((p, s.db.txid) for p, s in rep.fleet.services.items())
            await asyncio.gather(*(asyncio.to_thread(commit, root / n, 2) for n in names))
            await util.until(shipped, "the commits shipped")
    finally:
        stop.set()
        await task
    names_seen = sorted(threads.values())
    assert len(threads) <= 32, names_seen
    assert not [n for n in names_seen if n.startswith("asyncio_")], names_seen
    assert [n for n in names_seen if n.startswith("replicator-io")], names_seen
    restored = tmp_path / "out.db"
    util.restore(str(dest / names[7]), restored)
    assert util.dump(restored) == util.dump(root / names[7])


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not os.path.isdir("/proc/self/task"),
                    reason="OpenBLAS starts no thread on one core; Linux's /proc tells threads")
def test_numpy_starts_no_threads_of_its_own_unless_told() -> None:
    """numpy's OpenBLAS would start a thread per core when the replicator imports it (the page
    index and the WAL checksums use numpy, never BLAS); a setting the environment gives stays."""
    probe = ("import replicator.cli, replicator.pageindex, numpy, os; "
             "print(len(os.listdir('/proc/self/task')))")

    def threads(**env: str) -> int:
        environ = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             env={**environ, **env}, check=True)
        return int(out.stdout)

    assert threads() == 1
    assert threads(OPENBLAS_NUM_THREADS="2") == 2
