"""The real CLI, as a subprocess, given bad input: a non-zero exit, exactly one ``replicator:
error:`` line on stderr naming the bad thing, no traceback, and nothing created or overwritten."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from util import Replicate, cli, commit, integrity, seqs, tree, wait_until
from writer import init_db

from replicator.db import Database
from replicator.spool import Spool

ERR = "replicator: error: "


def fails(*args: str, env: dict[str, str] | None = None, only_line: bool = True) -> str:
    """Run the CLI, check it failed cleanly, return the error line."""
    r = cli(*args, env=env, timeout=60)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(ERR)]
    assert len(lines) == 1, r.stderr
    if only_line:
        assert r.stderr.splitlines() == lines, r.stderr
    assert r.stdout == ""
    return lines[0]


@pytest.fixture
def wal_db(tmp_path: Path) -> Path:
    p = tmp_path / "app.db"
    init_db(str(p))
    return p


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A replica written by the capture engine (the spool layout is the file replica layout):
    txid 0 snapshot, then txids 1..5 in five segments."""
    root = tmp_path_factory.mktemp("replica")
    db = root / "src.db"
    init_db(str(db))
    rep = root / "rep"
    d = Database(str(db), Spool(str(rep)))
    d.open()
    try:
        d.step()
        for _ in range(5):
            time.sleep(0.003)
            commit(db)
            d.step()
    finally:
        d.close()
    return rep


def generation_of(rep: Path) -> str:
    return os.listdir(rep / "generations")[0]


# ------------------------------------------------------------------------------------------
# replicate


def test_missing_db(tmp_path: Path) -> None:
    line = fails("replicate", str(tmp_path / "nope.db"), str(tmp_path / "rep"))
    assert line == f"{ERR}database {tmp_path / 'nope.db'} does not exist"
    assert tree(tmp_path) == {}


def test_db_not_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "rollback.db"
    init_db(str(db), wal=False)
    before = tree(tmp_path)
    line = fails("replicate", str(db), str(tmp_path / "rep"))
    assert f"database {db} is not in WAL mode" in line
    assert "PRAGMA journal_mode=WAL" in line  # how to enable it
    assert tree(tmp_path) == before


def test_db_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d.db").mkdir()
    line = fails("replicate", str(tmp_path / "d.db"), str(tmp_path / "rep"))
    assert line == f"{ERR}database {tmp_path / 'd.db'} is not a regular file"
    assert tree(tmp_path) == {"d.db": "dir"}


def test_db_that_is_not_sqlite(tmp_path: Path) -> None:
    (tmp_path / "x.db").write_bytes(b"hello, world" * 20)
    line = fails("replicate", str(tmp_path / "x.db"), str(tmp_path / "rep"))
    assert f"{tmp_path / 'x.db'}: not a SQLite database" in line
    assert sorted(tree(tmp_path)) == ["x.db"]


def test_replica_destination_is_a_regular_file(tmp_path: Path, wal_db: Path) -> None:
    dest = tmp_path / "dest"
    dest.write_bytes(b"a file")
    before = tree(tmp_path)
    # the failing replica is also logged as it is retried; the final error line is the one
    line = fails("replicate", str(wal_db), str(dest), only_line=False)
    assert str(dest) in line
    assert "not a directory" in line.lower()
    assert tree(tmp_path) == before


def test_unsupported_scheme(tmp_path: Path, wal_db: Path) -> None:
    before = tree(tmp_path)
    line = fails("replicate", str(wal_db), "ftp://x")
    assert "ftp://x" in line and "unsupported replica scheme 'ftp'" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("addr", ["garbage", "127.0.0.1:99999"])
def test_metrics_addr_garbage(tmp_path: Path, wal_db: Path, addr: str) -> None:
    before = tree(tmp_path)
    line = fails("replicate", str(wal_db), str(tmp_path / "rep"), "--metrics-addr", addr)
    assert line.startswith(f"{ERR}--metrics-addr: ")
    assert repr(addr) in line
    assert tree(tmp_path) == before


def test_metrics_addr_in_use(tmp_path: Path, wal_db: Path) -> None:
    """The listen error comes before any database or replica is touched."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        before = tree(tmp_path)
        line = fails("replicate", str(wal_db), str(tmp_path / "rep"), "--metrics-addr", addr)
    finally:
        s.close()
    assert addr in line and "cannot listen" in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--snapshot-interval", "often"], "--snapshot-interval: expected a duration"),
        (["--checkpoint-pages", "3"], "--checkpoint-pages: expected an integer >= 16"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_replicate_flags(tmp_path: Path, wal_db: Path, flags: list[str], needle: str) -> None:
    before = tree(tmp_path)
    line = fails("replicate", str(wal_db), str(tmp_path / "rep"), *flags)
    assert needle in line
    assert tree(tmp_path) == before


def test_replicate_config_and_db_together(tmp_path: Path, wal_db: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"dbs:\n  - path: {wal_db}\n    replicas: [{tmp_path / 'rep'}]\n")
    before = tree(tmp_path)
    assert "either --config or DB" in fails("replicate", "-c", str(cfg), str(wal_db))
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------------------
# config files


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dbs:\n  - path: {db}\n    replicas: [/b, /c\n", "line 4, column 1"),
        ("dbs:\n  - path: {db}\n    replicas:\n      - path: {rep}\n        bogus: 1\n",
         "dbs[0].replicas[0].bogus: unknown field"),
        ("dbs:\n  - path: ${{RPL_TEST_UNSET_VAR}}/app.db\n    replicas: [{rep}]\n",
         "dbs[0].path: environment variable RPL_TEST_UNSET_VAR is not set"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
    ],
    ids=["malformed-yaml", "unknown-field", "missing-env", "not-a-mapping"],
)
def test_bad_config(tmp_path: Path, wal_db: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(text.format(db=wal_db, rep=tmp_path / "rep"))
    env = {k: v for k, v in os.environ.items() if k != "RPL_TEST_UNSET_VAR"}
    before = tree(tmp_path)
    line = fails("replicate", "-c", str(cfg), env=env)
    assert needle in line
    if needle.startswith("line"):
        assert str(cfg) in line
    assert tree(tmp_path) == before


def test_bad_config_is_refused_by_every_command(tmp_path: Path, wal_db: Path) -> None:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"dbs:\n  - path: {wal_db}\n    replicas:\n      - path: {tmp_path}/r\n"
                   "        bogus: 1\n")
    before = tree(tmp_path)
    needle = "dbs[0].replicas[0].bogus: unknown field"
    assert needle in fails("restore", "-c", str(cfg), str(wal_db), "-o", str(tmp_path / "o.db"))
    assert needle in fails("snapshots", "-c", str(cfg), str(wal_db))
    assert tree(tmp_path) == before


def test_missing_config_file(tmp_path: Path) -> None:
    line = fails("replicate", "-c", str(tmp_path / "none.yml"))
    assert line == f"{ERR}config file {tmp_path / 'none.yml'} does not exist"


# ------------------------------------------------------------------------------------------
# restore


def test_restore_bad_time(tmp_path: Path, replica: Path) -> None:
    for bad in ("yesterday", "2026-13-01T00:00:00Z"):
        line = fails("restore", str(replica), "-o", str(tmp_path / "o.db"), "--to-time", bad)
        assert f"invalid time {bad!r}" in line
        assert "RFC 3339" in line
    assert tree(tmp_path) == {}


def test_restore_time_and_txid_together(tmp_path: Path, replica: Path) -> None:
    line = fails("restore", str(replica), "-o", str(tmp_path / "o.db"), "--txid", "1",
                 "--to-time", "2026-01-01T00:00:00Z")
    assert "not allowed with argument" in line
    assert "--txid: expected a non-negative integer" in fails(
        "restore", str(replica), "-o", str(tmp_path / "o.db"), "--txid=-1")
    assert tree(tmp_path) == {}


def test_restore_output_exists(tmp_path: Path, replica: Path) -> None:
    out = tmp_path / "exists.db"
    out.write_bytes(b"keep me")
    before = tree(tmp_path)
    line = fails("restore", str(replica), "-o", str(out))
    assert str(out) in line and "already exists" in line and "--force" in line
    assert out.read_bytes() == b"keep me"
    assert tree(tmp_path) == before


def test_restore_output_exists_if_db_not_exists(tmp_path: Path, replica: Path) -> None:
    out = tmp_path / "exists.db"
    out.write_bytes(b"keep me")
    r = cli("restore", str(replica), "-o", str(out), "--if-db-not-exists")
    assert r.returncode == 0, r.stderr
    assert "nothing restored" in r.stdout
    assert r.stderr == ""
    assert out.read_bytes() == b"keep me"
    assert tree(tmp_path) == {"exists.db": tree(tmp_path)["exists.db"]}


def test_restore_output_directory_missing(tmp_path: Path, replica: Path) -> None:
    out = tmp_path / "no" / "dir" / "o.db"
    line = fails("restore", str(replica), "-o", str(out))
    assert f"output directory {out.parent} does not exist" in line
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("kind", ["nonexistent", "empty", "no-snapshot"])
def test_restore_from_empty_replica(tmp_path: Path, replica: Path, kind: str) -> None:
    src = tmp_path / "src"
    if kind == "empty":
        src.mkdir()
    elif kind == "no-snapshot":
        shutil.copytree(replica, src)
        gen = generation_of(src)
        shutil.rmtree(src / "generations" / gen / "snapshots")
    before = tree(tmp_path)
    out = tmp_path / "o.db"
    line = fails("restore", str(src), "-o", str(out))
    assert line == f"{ERR}no restorable generation on file://{src}"
    assert tree(tmp_path) == before

    r = cli("restore", str(src), "-o", str(out), "--if-replica-exists")
    assert r.returncode == 0, r.stderr
    assert "nothing restored" in r.stdout
    assert r.stderr == ""
    assert tree(tmp_path) == before


def test_restore_txid_beyond_the_end(tmp_path: Path, replica: Path) -> None:
    gen = generation_of(replica)
    line = fails("restore", str(replica), "-o", str(tmp_path / "o.db"), "--txid", "6")
    assert f"txid 6 is not in generation {gen}" in line
    assert "(txid 0..5)" in line
    assert tree(tmp_path) == {}


def test_restore_time_before_the_earliest_point(tmp_path: Path, replica: Path) -> None:
    gen = generation_of(replica)
    line = fails("restore", str(replica), "-o", str(tmp_path / "o.db"),
                 "--to-time", "2001-09-09T01:46:40Z")
    assert "2001-09-09T01:46:40.000000000Z is before the earliest restorable point" in line
    assert f"restorable: {gen}: " in line
    assert "(txid 0..5)" in line
    assert tree(tmp_path) == {}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_restore_corrupt_object(tmp_path: Path, replica: Path, damage: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(replica, src)
    gen = generation_of(src)
    segs = sorted(os.listdir(src / "generations" / gen / "wal"))
    victim = src / "generations" / gen / "wal" / segs[2]
    raw = bytearray(victim.read_bytes())
    if damage == "flip":
        raw[len(raw) - 40] ^= 0x10
    else:
        del raw[-10:]
    victim.write_bytes(bytes(raw))
    out = tmp_path / "o.db"
    line = fails("restore", str(src), "-o", str(out))
    assert f"generations/{gen}/wal/{segs[2]}" in line
    assert "corrupt object" in line
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_restore_success_for_comparison(tmp_path: Path, replica: Path) -> None:
    """The control for the failures above: the same replica restores fine."""
    r = cli("restore", str(replica), "-o", str(tmp_path / "o.db"))
    assert r.returncode == 0, r.stderr
    assert seqs(tmp_path / "o.db") == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------
# A full replica file system


@pytest.fixture
def small_fs(tmp_path: Path) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the file system is full (4 KiB blocks, then single bytes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for size in (4096, 1):
            while True:
                try:
                    os.write(fd, b"\xff" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


def test_full_replica_file_system(tmp_path: Path, wal_db: Path, small_fs: Path) -> None:
    rep = small_fs / "rep"
    log = tmp_path / "replicate.log"
    proc = Replicate(str(wal_db), str(rep), "--monitor-interval", "100ms", log=log)
    try:
        wait_until(lambda: (rep / "generations").is_dir()
                   and any((rep / "generations").glob("*/snapshots/*.snap")),
                   what="the first snapshot")
        commit(wal_db, 3)
        wait_until(lambda: len(list((rep / "generations").glob("*/wal/*.seg"))) >= 1,
                   what="a segment")

        filler = small_fs / "filler"
        fill(filler)
        for _ in range(4, 10):
            commit(wal_db)
            time.sleep(0.05)
        wait_until(lambda: "no space left on device" in proc.text(), what="the ENOSPC error")
        time.sleep(0.5)
        assert proc.proc.poll() is None, proc.text()  # still running

        lines = [ln for ln in proc.text().splitlines() if "no space left on device" in ln]
        assert lines
        for ln in lines:
            assert " ERROR " in ln
            assert "replica replica1" in ln
            assert str(rep) in ln
        assert "Traceback" not in proc.text()

        filler.unlink()
        commit(wal_db)  # seq 10: wakes the shipper now rather than after its backoff
        out = tmp_path / "probe.db"

        def caught_up() -> bool:
            r = cli("restore", str(rep), "-o", str(out), "--force")
            return r.returncode == 0 and seqs(out) == list(range(1, 11))

        wait_until(caught_up, timeout=60, interval=0.3, what="the replica to catch up")
        assert proc.proc.poll() is None
    finally:
        rc = proc.stop()
    assert rc == 0, proc.text()
    assert "Traceback" not in proc.text()
    final = tmp_path / "final.db"
    r = cli("restore", str(rep), "-o", str(final))
    assert r.returncode == 0, r.stderr
    assert seqs(final) == list(range(1, 11))
    assert integrity(final) == "ok"
    gens = json.loads(cli("generations", str(rep), "--json").stdout)
    assert len(gens) == 1  # no new generation was needed
