"""One process per database: a second ``replicate`` of a database another process replicates
(by its path, or found by a ``dir:`` entry) is refused before it touches the spool, and a
killed holder leaves the database free for the next one. The real CLI, in processes of its own."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
import util
from util import commit, free_port, seqs
from writer import init_db

from replicator.db import Database
from replicator.errors import SpoolBusyError
from replicator.runtime import FDS_PER_OPEN_DB, Runtime
from replicator.spool import OWNER_FILE, Spool


def _spool(db: Path) -> Path:
    return db.parent / f".{db.name}-replicator"


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root``: (size, mtime_ns)."""
    out = {}
    for top, _dirs, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(top, f))
            out[os.path.relpath(os.path.join(top, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _has_objects(dest: Path, kind: str = "") -> bool:
    """Whether ``dest`` holds a finished object (of ``kind``: ``.seg``, ``.snap``...)."""
    return any(f.endswith(kind or (".seg", ".snap")) for _t, _d, fs in os.walk(dest)
               for f in fs)


def test_a_second_process_on_the_same_database_is_refused(tmp_path: Path) -> None:
    db, one, two = tmp_path / "app.db", tmp_path / "one", tmp_path / "two"
    init_db(str(db))
    first = util.Replicate(str(db), str(one), log=tmp_path / "first.log")
    try:
        first.wait_ready(lambda: _has_objects(one), 30, "the first process ships")
        commit(db, 5)
        first.wait_ready(lambda: _has_objects(one, ".seg"), 30, "the first process ships")
        before = _tree(_spool(db))
        # another destination, so that no destination's lease stands in the way: the spool
        # beside the database is what both would write
        r = util.cli("replicate", str(db), str(two), timeout=60)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{db}: another process is replicating this database (pid {first.proc.pid} " in (
            lines[0]), lines[0]
        assert str(_spool(db)) in lines[0]
        assert not two.exists()
        # nothing of the first one's spool was touched
        after = _tree(_spool(db))
        assert {k: v for k, v in after.items() if k in before} == before
        commit(db, 5)
        assert first.running
    finally:
        assert first.stop() == 0
    out = tmp_path / "out.db"
    assert util.restore(str(one), out).returncode == 0
    assert seqs(out) == seqs(db) == list(range(1, 11))


def test_a_killed_holder_leaves_the_database_free(tmp_path: Path) -> None:
    db, dest = tmp_path / "app.db", tmp_path / "dest"
    init_db(str(db))
    first = util.Replicate(str(db), str(dest), log=tmp_path / "first.log")
    first.wait_ready(lambda: _has_objects(dest), 30, "the first process ships")
    commit(db, 3)
    first.wait_ready(lambda: _has_objects(dest, ".seg"), 30, "the first process ships")
    first.kill()
    assert (_spool(db) / OWNER_FILE).read_text().startswith(f"pid {first.proc.pid} on ")
    second = util.Replicate(str(db), str(dest), log=tmp_path / "second.log")
    try:
        commit(db, 3)
        out = tmp_path / "out.db"

        def restored_all() -> bool:
            r = util.cli("restore", str(dest), "-o", str(out), "--force")
            return r.returncode == 0 and seqs(out) == list(range(1, 7))

        second.wait_ready(restored_all, 60, "the next process replicates")
        assert (_spool(db) / OWNER_FILE).read_text().startswith(f"pid {second.proc.pid} on ")
    finally:
        assert second.stop() == 0


def test_a_dir_entry_database_held_elsewhere_fails_alone(tmp_path: Path) -> None:
    """A database that another process replicates (listed by path there) is a failed file of a
    ``dir:`` entry here, with the reason in ``status``; the others replicate."""
    root, mine, theirs = tmp_path / "tenants", tmp_path / "mine", tmp_path / "theirs"
    root.mkdir()
    for name in ("a.db", "b.db"):
        init_db(str(root / name))
    other = util.Replicate(str(root / "a.db"), str(theirs), log=tmp_path / "other.log")
    port = free_port()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"metrics-addr: 127.0.0.1:{port}\ndbs:\n  - dir: {root}\n"
                   f"    replicas: [{{name: local, path: {mine}}}]\n")
    rep = None
    try:
        other.wait_ready(lambda: (_spool(root / "a.db") / OWNER_FILE).exists(), 30,
                         "the other process holds a.db")
        rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep.log")

        def status() -> dict[str, object] | None:
            r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
            return json.loads(r.stdout) if r.returncode == 0 else None

        def settled() -> bool:
            doc = status()
            return doc is not None and doc["databases"]["failed"] == 1  # type: ignore[index]

        rep.wait_ready(settled, 60, "a.db fails")
        doc = status()
        assert doc is not None
        failed = doc["databases"]["failed_files"]  # type: ignore[index]
        assert list(failed) == [str(root / "a.db")]
        assert "another process is replicating this database" in failed[str(root / "a.db")]
        rep.wait_ready(lambda: _has_objects(mine / "b.db"), 30, "b.db replicates")
        commit(root / "b.db", 4)
        # a.db changes as its own replicator and application go on (checkpoints write the
        # file itself): not tried again at every change, nor logged again
        for _ in range(3):
            commit(root / "a.db", 20)
            with sqlite3.connect(root / "a.db") as c:
                c.execute("PRAGMA wal_checkpoint(PASSIVE)")
        rep.wait_ready(lambda: _has_objects(mine / "b.db", ".seg"), 30, "b.db replicates")
        assert rep.text().count(f"{root / 'a.db'}: cannot replicate: ") == 1, rep.text()
        assert status()["databases"]["failed"] == 1  # type: ignore[index]
        assert not (mine / "a.db").exists()
        assert other.running and rep.running
    finally:
        if rep is not None:
            assert rep.stop() == 0
        assert other.stop() == 0
    out = tmp_path / "b.out"
    assert util.cli("restore", "--config", str(cfg), "-o", str(out),
                    str(root / "b.db")).returncode == 0
    assert seqs(out) == seqs(root / "b.db") == list(range(1, 5))


def test_spool_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    first, second = Spool(str(root)), Spool(str(root))
    first.claim("app.db")
    assert first.claimed
    assert (root / OWNER_FILE).read_text() == f"pid {os.getpid()} on {os.uname().nodename}\n"
    with pytest.raises(SpoolBusyError, match=f"app.db: another process .*pid {os.getpid()}"):
        second.claim("app.db")
    assert not second.claimed
    first.claim("app.db")  # held already: nothing
    first.release()
    assert not first.claimed
    second.claim("app.db")
    assert second.claimed
    second.release()
    second.release()


async def test_every_spool_lock_counts_against_the_descriptors() -> None:
    """An open database holds its connections' descriptors and its spool's lock; a parked one
    the lock alone. Room to open one more needs its connections and its lock on top of all."""
    per = FDS_PER_OPEN_DB + 1  # an open database with its lock
    rt = Runtime(workers=1)
    try:
        rt.max_open = 10
        rt.open_dbs, rt.claimed = 2, 2
        rt.fds = 3 * per
        assert rt.room_to_open()
        rt.fds = 3 * per - 1  # the connections of three fit, the third lock does not
        assert not rt.room_to_open()
        rt.fds = 3 * per + 5
        rt.claimed = 2 + 5  # five parked databases hold their spools: one descriptor each
        assert rt.room_to_open()
        rt.claimed = 2 + 6
        assert not rt.room_to_open()
        rt.open_dbs, rt.claimed = 10, 10
        rt.fds = 1 << 20
        assert not rt.room_to_open()  # max_open still bounds it
    finally:
        await rt.aclose()


def test_the_owner_file_is_not_part_of_the_replica(tmp_path: Path) -> None:
    """A spool can be read as a file replica (the same layout): its owner file, held or not,
    changes nothing of what a restore or a listing finds."""
    db, root = tmp_path / "app.db", tmp_path / "spool"
    init_db(str(db))
    spool = Spool(str(root))
    spool.claim(str(db))
    d = Database(str(db), spool)
    d.open()
    d.step()
    commit(db, 2)
    d.step()
    out = tmp_path / "out.db"
    assert util.restore(str(root), out).returncode == 0  # while it is held
    assert seqs(out) == [1, 2]
    listed = util.cli("generations", str(root))
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.strip().splitlines()[1:]
    assert len(rows) == 1 and rows[0].split()[-2] == "True", listed.stdout  # one, restorable
    d.close()
    spool.release()
    assert (root / OWNER_FILE).exists()
    assert util.restore(str(root), out, "--force").returncode == 0
    with sqlite3.connect(out) as c:
        assert c.execute("PRAGMA quick_check").fetchone() == ("ok",)
    assert seqs(out) == [1, 2]
