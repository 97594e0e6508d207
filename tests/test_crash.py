"""Crashes and faults: kill -9 of the replicator, a writer killed mid-transaction, the
application's own TRUNCATE checkpoints with the replicator up and down."""

from __future__ import annotations

import random
import re
import sqlite3
import time
from pathlib import Path

import pytest
import util
from writer import init_db

from replicator.restore import fmt_ns


@pytest.mark.slow
def test_kill9_cycles_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--duration", "600", "--rate", "300", "--ops", "mixed")
    rnd = random.Random(11)
    try:
        for cycle, _ in util.kill9_cycles(db, [dest], tmp_path, 20, rnd, up=(0.2, 1.2)):
            if any(Path(dest).glob("generations/*/snapshots/*.snap")):
                out = tmp_path / f"r{cycle}.db"
                util.restore(dest, out)
                util.assert_prefix_of(out, log)
                out.unlink()
        rep = util.Replicate(str(db), dest, log=tmp_path / "final.log")
        # a restart continues its generation (no new snapshot): wait until it replicates
        rep.wait_ready(lambda: "replicating " in rep.text(), 60, "the final replicator")
        time.sleep(0.5)
    finally:
        w.terminate()
        w.communicate(timeout=60)
    assert w.returncode == 0
    assert rep.stop() == 0, rep.text()
    out = tmp_path / "final.db"
    util.restore(dest, out)
    util.assert_every_commit(out, log)
    assert util.dump(out) == util.dump(db)


def test_torn_transaction_is_never_shipped(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    rep = util.Replicate(str(db), dest, log=tmp_path / "rep.log")
    util.wait_for_snapshot(Path(dest))
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--count", "100", "--rate", "500")
    w.communicate(timeout=60)
    wal_before = (tmp_path / "app.db-wal").stat().st_size
    torn = util.start_writer(db, log, "--torn")
    assert torn.stdout is not None
    assert torn.stdout.readline().strip() == "torn"
    # the uncommitted pages are in the WAL now, and the replicator has looked at them
    assert (tmp_path / "app.db-wal").stat().st_size > wal_before + 1_000_000
    time.sleep(1.5)
    torn.kill()
    torn.communicate(timeout=30)
    w = util.start_writer(db, log, "--count", "50", "--rate", "500")
    w.communicate(timeout=60)
    assert rep.stop() == 0, rep.text()
    out = tmp_path / "out.db"
    util.restore(dest, out)
    assert util.seqs(out) == list(range(1, 151))
    c = sqlite3.connect(out)
    assert c.execute("SELECT COUNT(*) FROM data WHERE k = -1").fetchone()[0] == 0
    c.close()
    for body in util.segment_bodies(dest):
        assert b"U" * 1000 not in body, "an uncommitted page was shipped"
    assert util.dump(out) == util.dump(db)


def test_application_truncate_with_replicator_up(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    rep = util.Replicate(str(db), dest, "--checkpoint-pages", "64", log=tmp_path / "rep.log")
    util.wait_for_snapshot(Path(dest))
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--duration", "4", "--rate", "300", "--truncate-every", "40")
    mid = None
    while w.poll() is None:
        time.sleep(0.5)
        mid = mid or time.time_ns()
    w.communicate(timeout=30)
    assert w.returncode == 0
    assert rep.stop() == 0, rep.text()
    out = tmp_path / "out.db"
    util.restore(dest, out)
    assert util.seqs(out) == [c[0] for c in util.commit_log(log)]
    assert util.dump(out) == util.dump(db)
    assert mid is not None
    util.restore(dest, tmp_path / "mid.db", "--to-time", fmt_ns(mid))
    k = util.assert_prefix(util.seqs(tmp_path / "mid.db"))
    assert 0 < k < len(util.commit_log(log))


def test_application_truncate_with_replicator_down_catches_up(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    log = tmp_path / "commits.log"
    rep = util.Replicate(str(db), dest, log=tmp_path / "rep1.log")
    util.wait_for_snapshot(Path(dest))
    w = util.start_writer(db, log, "--count", "200", "--rate", "400")
    w.communicate(timeout=60)
    time.sleep(0.3)
    t_first = time.time_ns()
    assert rep.stop() == 0
    first = len(util.commit_log(log))
    # while the replicator is down the application writes and truncates its WAL
    w = util.start_writer(db, log, "--count", "100", "--rate", "400", "--truncate-every", "50")
    w.communicate(timeout=60)
    time.sleep(0.3)
    t_gap = time.time_ns()
    time.sleep(0.3)
    rep = util.Replicate(str(db), dest, log=tmp_path / "rep2.log")
    util.wait_until(lambda: any(Path(dest).glob("generations/*/wal/*.cu")), 30,
                    what="catch-up")
    w = util.start_writer(db, log, "--count", "100", "--rate", "400")
    w.communicate(timeout=60)
    assert rep.stop() == 0
    assert re.search(r"WAL changed while the replicator was stopped; caught up in generation",
                     rep.text())
    assert len(list(Path(dest).glob("generations/*"))) == 1
    out = tmp_path / "latest.db"
    util.restore(dest, out)
    assert util.seqs(out) == list(range(1, 401))
    assert util.dump(out) == util.dump(db)
    before = tmp_path / "before.db"
    util.restore(dest, before, "--to-time", fmt_ns(t_first))
    assert util.seqs(before) == list(range(1, first + 1))
    # stopped: the newest state captured before, said on stderr; --exact refuses
    r = util.cli("restore", dest, "-o", str(tmp_path / "gap.db"), "--to-time", fmt_ns(t_gap))
    assert r.returncode == 0, r.stderr
    assert "replicator stopped from " in r.stderr and "before the time asked for" in r.stderr
    assert util.seqs(tmp_path / "gap.db") == list(range(1, first + 1))
    r = util.cli("restore", dest, "-o", str(tmp_path / "exact.db"), "--to-time", fmt_ns(t_gap),
                 "--exact")
    assert r.returncode == 1
    assert "did not observe" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "exact.db").exists()
