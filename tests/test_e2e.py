"""End to end: a writer process commits while ``replicator replicate`` runs as a subprocess."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import util
from writer import init_db

from replicator.restore import fmt_ns


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
