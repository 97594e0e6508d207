"""End to end: a writer process commits while ``replicator replicate`` runs as a subprocess."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import util
from writer import init_db

from replicator.restore import fmt_ns
from replicator.sightings import read_walindex


def test_replicate_restore_equals_source(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    rep = util.Replicate(str(db), dest, "--checkpoint-pages", "200", log=tmp_path / "rep.log")
    util.wait_for_snapshot(tmp_path / "replica")
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--ops", "mixed", "--duration", "6", "--rate", "400")
    instants: list[int] = []
    rnd = random.Random(7)
    while w.poll() is None:
        time.sleep(rnd.uniform(0.3, 0.6))
        instants.append(time.time_ns())
    out, err = w.communicate()
    assert w.returncode == 0, err
    assert rep.stop() == 0, rep.text()
    assert "Traceback" not in rep.text()
    commits = util.commit_log(log)
    assert len(commits) > 500

    restored = tmp_path / "restored.db"
    util.restore(dest, restored)
    assert util.integrity(restored) == "ok"
    assert util.seqs(restored) == [c[0] for c in commits]
    assert util.dump(restored) == util.dump(db)
    # page for page: fold the source's WAL into its file, then compare bytes
    util.checkpoint_truncate(db)
    assert restored.read_bytes() == db.read_bytes()

    # point in time: every instant yields exactly what was observed by then
    times = util.observed_times(dest)
    by_seq = {c[0]: c for c in commits}
    assert len(instants) >= 10
    for i, t in enumerate(instants):
        out_db = tmp_path / f"pitr{i}.db"
        r = util.restore(dest, out_db, "--to-time", fmt_ns(t))
        m = re.search(r"generation (\w+), txid (\d+)", r.stdout)
        assert m, r.stdout
        gen, txid = m[1], int(m[2])
        assert times[(gen, txid)] <= t
        nxt = times.get((gen, txid + 1))
        assert nxt is None or nxt > t, "a transaction observed before T is missing"
        k = util.assert_prefix(util.seqs(out_db))
        assert util.integrity(out_db) == "ok"
        if k:
            assert by_seq[k][1] <= t, "restored a commit that started after T"
        if k + 1 in by_seq:
            # the next commit was not observed by T; it cannot have finished long before T
            assert by_seq[k + 1][2] > t - 5_000_000_000


def test_restore_to_time_outside_range(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    before = time.time_ns() - 3_600_000_000_000
    rep = util.Replicate(str(db), dest, log=tmp_path / "rep.log")
    util.wait_for_snapshot(tmp_path / "replica")
    w = util.start_writer(db, tmp_path / "c.log", "--count", "50", "--rate", "200")
    w.communicate(timeout=60)
    assert w.returncode == 0
    assert rep.stop() == 0
    r = util.cli("restore", dest, "-o", str(tmp_path / "x.db"), "--to-time", fmt_ns(before))
    assert r.returncode == 1
    assert "before the earliest restorable point" in r.stderr
    assert "restorable:" in r.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_no_busy_for_application_without_timeout(tmp_path: Path) -> None:
    """Flat out, no busy timeout, big and small transactions, VACUUM, DROP, big DELETEs."""
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    rep = util.Replicate(str(db), dest, "--checkpoint-pages", "64", log=tmp_path / "rep.log")
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--ops", "mixed", "--duration", "8", "--busy-timeout", "0")
    out, err = w.communicate(timeout=120)
    assert w.returncode == 0, f"writer saw SQLITE_BUSY: {err[-2000:]}"
    assert "busy=0" in out
    assert rep.stop() == 0, rep.text()
    restored = tmp_path / "restored.db"
    util.restore(dest, restored)
    assert util.seqs(restored) == [c[0] for c in util.commit_log(log)]
    assert util.dump(restored) == util.dump(db)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("idle", [True, False])
def test_a_paused_replicator_holds_back_no_checkpoint(tmp_path: Path, idle: bool) -> None:
    """The replicator is paused (SIGSTOP) while the application writes on, after a rotation:
    its read transaction must not keep the application's automatic checkpoints from
    backfilling. Idle before the pause, it released its pin (the log says so), and the WAL
    resets as if no replicator were there; busy, it holds a pin past which backfill stops (the
    WAL grows, the application's checkpoints end at once, as beside Litestream). Resumed, it
    ships everything: the replica restores equal."""
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    rep = util.Replicate(str(db), dest, "--checkpoint-pages", "64", log=tmp_path / "rep.log")
    try:
        util.wait_for_snapshot(tmp_path / "replica")
        util.commit(db, 60, payload=2000)  # past checkpoint-pages: the replicator rotates
        if idle:
            rep.wait_ready(lambda: "pin released while idle" in rep.text(), 30, "an idle release")
        else:
            time.sleep(0.5)
            util.commit(db, 3, payload=500)
            # the step that captures them moves the pin to a read mark >= 1 (bytes 124-127 of -shm)
            rep.wait_ready(lambda: read_marks(rep.proc.pid, db) not in (set(), {0}), 30,
                           "a pin on a read mark other than 0")
            assert 0 not in read_marks(rep.proc.pid, db)
        salts = walindex(db)[0]
        os.kill(rep.proc.pid, signal.SIGSTOP)
        try:
            seqs = util.commit(db, 400, payload=8000)  # over 1,000 frames
            now, mx, backfilled = walindex(db)
            if idle:  # wholly backfilled and reset: the WAL holds only what came after
                assert now != salts, "the paused replicator held back every checkpoint"
                assert mx < 1000
            else:  # backfilled up to the pin, not beyond: the WAL grows
                assert now == salts and mx > 1000
                assert 0 < backfilled < 100, "the paused replicator held back every checkpoint"
        finally:
            os.kill(rep.proc.pid, signal.SIGCONT)
        util.commit(db, 2, payload=500)
        assert rep.stop() == 0, rep.text()
    finally:
        rep.kill()
    assert "Traceback" not in rep.text()
    restored = tmp_path / "restored.db"
    util.restore(dest, restored)
    assert util.seqs(restored)[-402:-2] == seqs
    assert util.dump(restored) == util.dump(db)


def walindex(db: Path) -> tuple[bytes, int, int]:
    """The wal-index's (salts, mxFrame, nBackfill)."""
    fd = os.open(f"{db}-shm", os.O_RDONLY)
    try:
        got = read_walindex(fd)
    finally:
        os.close(fd)
    assert got is not None
    return got


def read_marks(pid: int, db: Path) -> set[int]:
    """The wal-index read marks (0-4) process ``pid`` holds a lock on (``/proc/locks``)."""
    ino = os.stat(f"{db}-shm").st_ino
    marks = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "->" in f:
            continue  # a blocked request, not a lock held
        if len(f) >= 8 and f[4] == str(pid) and f[5].rsplit(":", 1)[-1] == str(ino):
            start = int(f[6])
            if 123 <= start <= 127:
                marks.add(start - 123)
    return marks

