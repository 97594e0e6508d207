"""``replicate --restore-if-db-not-exists``: database present or absent x replica present or
absent, a corrupt replica, and the same rule as ``restore --if-db-not-exists
--if-replica-exists``; all through the real CLI."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from util import cli, dump, integrity, restore, seqs
from writer import init_db


def make_db(path: Path, rows: int) -> None:
    init_db(str(path))
    c = sqlite3.connect(path)
    c.executemany("INSERT INTO log(seq, t_ns) VALUES (?, 0)", [(i,) for i in range(1, rows + 1)])
    c.commit()
    c.close()


def make_replica(tmp_path: Path, rows: int) -> list[str]:
    """A replica of a database with ``rows`` rows, made by replicating it once; returns the
    database's dump. The database and its spool are gone afterwards, as in a fresh pod."""
    src = tmp_path / "src" / "app.db"
    src.parent.mkdir()
    make_db(src, rows)
    r = cli("replicate", str(src), str(tmp_path / "replica"), "--exec", "true")
    assert r.returncode == 0, r.stderr
    want = dump(src)
    shutil.rmtree(src.parent)
    return want


def start(tmp_path: Path, marker: Path, *extra: str) -> tuple[int, str]:
    """``replicate --restore-if-db-not-exists DB REPLICA --exec 'touch MARKER'``."""
    r = cli("replicate", "--restore-if-db-not-exists", str(tmp_path / "app.db"),
            str(tmp_path / "replica"), "--exec", f"touch {marker}", *extra)
    return r.returncode, r.stderr


def test_db_absent_replica_present_restores_the_newest_state(tmp_path: Path) -> None:
    want = make_replica(tmp_path, 50)
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 0, err
    assert "restored " in err and "quick_check ok" in err  # content hash matched
    assert (tmp_path / "started").exists()
    assert dump(tmp_path / "app.db") == want
    assert integrity(tmp_path / "app.db") == "ok"


def test_db_present_replica_present_leaves_the_database_alone(tmp_path: Path) -> None:
    make_replica(tmp_path, 50)
    make_db(tmp_path / "app.db", 3)
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 0, err
    assert "exists: not restored" in err
    assert seqs(tmp_path / "app.db") == [1, 2, 3]
    assert (tmp_path / "started").exists()


def test_db_present_replica_absent_replicates_the_database(tmp_path: Path) -> None:
    make_db(tmp_path / "app.db", 3)
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 0, err
    assert seqs(tmp_path / "app.db") == [1, 2, 3]
    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    assert seqs(tmp_path / "out.db") == [1, 2, 3]


def test_db_absent_replica_absent_starts_with_an_empty_wal_database(tmp_path: Path) -> None:
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 0, err
    assert "no replica to restore from: starting with an empty database" in err
    assert (tmp_path / "started").exists()
    c = sqlite3.connect(tmp_path / "app.db")
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    c.close()
    # and it is replicated from the start
    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    assert integrity(tmp_path / "out.db") == "ok"


def corrupt_snapshot(replica: Path) -> str:
    (snap,) = replica.glob("generations/*/snapshots/*.snap")
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.write_bytes(bytes(data))
    return snap.name


def test_a_corrupt_replica_is_a_one_line_error_and_nothing_starts(tmp_path: Path) -> None:
    make_replica(tmp_path, 50)
    before = sorted(os.listdir(tmp_path / "replica"))
    name = corrupt_snapshot(tmp_path / "replica")
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("replicator: error: ") and name in last, err
    assert "Traceback" not in err
    assert not (tmp_path / "started").exists(), "the child must not start"
    assert not (tmp_path / "app.db").exists()
    assert sorted(os.listdir(tmp_path / "replica")) == before, "nothing new on the replica"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replica"]
    # the init-container form says the same
    r = cli("restore", "--if-db-not-exists", "--if-replica-exists", str(tmp_path / "replica"),
            "-o", str(tmp_path / "app.db"))
    assert r.returncode == 1 and name in r.stderr


def test_a_wal_left_without_its_database_is_refused(tmp_path: Path) -> None:
    make_replica(tmp_path, 5)
    (tmp_path / "app.db-wal").write_bytes(b"stale")
    code, err = start(tmp_path, tmp_path / "started")
    assert code == 1
    assert err == (f"replicator: error: database {tmp_path / 'app.db'} is missing but "
                   f"{tmp_path / 'app.db-wal'} exists; move it away before restoring\n")
    assert not (tmp_path / "app.db").exists() and not (tmp_path / "started").exists()


@pytest.mark.parametrize("replica", [True, False])
def test_config_flag_matches_the_init_container_restore(tmp_path: Path, replica: bool) -> None:
    """``restore-if-db-not-exists: true`` in the config and ``restore --if-db-not-exists
    --if-replica-exists`` leave the same database behind."""
    if replica:
        make_replica(tmp_path, 20)
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"exec: 'true'\ndbs:\n  - path: {tmp_path / 'app.db'}\n"
                   f"    restore-if-db-not-exists: true\n    replicas: [{tmp_path / 'replica'}]\n")
    init = cli("restore", "--if-db-not-exists", "--if-replica-exists",
               str(tmp_path / "replica"), "-o", str(tmp_path / "init.db"))
    assert init.returncode == 0, init.stderr
    r = cli("replicate", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    if replica:
        assert dump(tmp_path / "app.db") == dump(tmp_path / "init.db")
    else:
        assert not (tmp_path / "init.db").exists()
        assert "CREATE" not in "".join(dump(tmp_path / "app.db"))


@pytest.mark.parametrize(("line", "message"), [
    ("    restore-if-db-not-exists: maybe",
     "dbs[0].restore-if-db-not-exists: expected true or false"),
    ("exec: 5", "exec: expected a command string or a list of strings"),
    ("exec: []", "exec: empty command"),
])
def test_bad_config_values_are_named(tmp_path: Path, line: str, message: str) -> None:
    make_db(tmp_path / "app.db", 1)
    body = f"dbs:\n  - path: {tmp_path / 'app.db'}\n    replicas: [{tmp_path / 'replica'}]\n"
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(body + line + "\n" if line.startswith(" ") else line + "\n" + body)
    r = cli("replicate", "--config", str(cfg))
    assert (r.returncode, r.stderr) == (1, f"replicator: error: {message}\n")
    assert not (tmp_path / "replica").exists()
