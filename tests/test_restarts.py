"""Restarts continue their generation: kill -9 of the real CLI beside a continuous writer, with the
application's own TRUNCATE checkpoints while the replicator is down, ends with one generation,
an exact final restore, and every point in time restorable as a contiguous prefix (with a warning
where the replicator was not watching)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import sqlite3
import time
from pathlib import Path

import pytest
import util
from writer import init_db

from replicator.restore import apply_plan, fmt_ns, plan_restore
from replicator.storage.file import FileStorage

STARTED = re.compile(r"resuming generation|caught up in generation|new generation")


def foreign_truncate(db: Path) -> bool:
    """The application truncates its WAL (retried while a writer holds it); True if it did."""
    c = sqlite3.connect(db, timeout=0)
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                if c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                    return True
            except sqlite3.OperationalError:
                pass
            time.sleep(0.01)
        return False
    finally:
        c.close()


def kill_loop(db: Path, dest: str, tmp_path: Path, cycles: int,
              rnd: random.Random) -> tuple[list[tuple[int, int]], int]:
    """Start and kill -9 the replicator ``cycles`` times; returns the windows it was down
    (kill time, next start) and how many foreign truncates happened meanwhile."""
    down: list[tuple[int, int]] = []
    truncates = 0
    for cycle, _ in util.kill9_cycles(db, [dest], tmp_path, cycles, rnd, up=(0.05, 0.4),
                                      short_snapshots=False,
                                      started=lambda text: bool(STARTED.search(text))):
        killed = time.time_ns()
        if cycle % 4 == 1:
            truncates += foreign_truncate(db)
        time.sleep(rnd.uniform(0.05, 0.2))
        down.append((killed, time.time_ns()))
    return down, truncates


def check_points(dest: str, tmp_path: Path, log: list[tuple[int, int, int]],
                 times: list[int], down: list[tuple[int, int]]) -> None:
    """Each time restores a contiguous prefix of the commits, none begun after it, never fewer
    than an earlier time; inside a window the replicator was down, with a warning."""
    t_before = {seq: before for seq, before, _ in log}

    async def go() -> None:
        client = FileStorage(dest)
        last = 0
        for i, t in enumerate(sorted(times)):
            out = tmp_path / f"pitr{i}.db"
            plan = await plan_restore(client, to_time_ns=t)
            await apply_plan(client, plan, str(out))
            k = util.assert_prefix(util.seqs(out))
            assert k >= last
            assert k == 0 or t_before[k] <= t
            if any(a + 50_000_000 < t < b for a, b in down):
                assert any("replicator stopped from " in w for w in plan.warnings), plan
            last = k
            out.unlink()

    asyncio.run(go())


@pytest.mark.slow
def test_kill9_loop_keeps_one_generation(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = str(tmp_path / "replica")
    commits = tmp_path / "commits.log"
    # the writer waits for the foreign truncates (they lock the WAL while they reset it)
    w = util.start_writer(db, commits, "--duration", "600", "--rate", "200",
                          "--busy-timeout", "5")
    rnd = random.Random(8)
    try:
        down, truncates = kill_loop(db, dest, tmp_path, 20, rnd)
        rep = util.Replicate(str(db), dest, log=tmp_path / "final.log")
        util.wait_until(lambda: bool(STARTED.search(rep.text())), 60, what="capture started")
        time.sleep(0.5)
    finally:
        w.terminate()
        w.communicate(timeout=60)
    assert w.returncode == 0
    time.sleep(0.3)
    assert rep.stop() == 0, rep.text()
    assert truncates >= 3
    assert len(list(Path(dest).glob("generations/*"))) == 1
    logs = "".join(p.read_text() for p in [*tmp_path.glob("rep*.log"), tmp_path / "final.log"])
    assert logs.count("new generation") == 1  # the first start
    catchups = list(Path(dest).glob("generations/*/wal/*.cu"))
    assert len(catchups) >= truncates

    log = util.commit_log(commits)
    out = tmp_path / "final.db"
    r = util.restore(dest, out)
    assert "content hash matches" in r.stdout
    assert util.seqs(out) == [c[0] for c in log]
    assert util.dump(out) == util.dump(db)

    listing = json.loads(util.cli("generations", dest, "--json").stdout)
    assert len(listing) == 1 and len(listing[0]["unobserved"]) >= len(catchups)

    first_snapshot = min(int(p.name.split("-")[1].split(".")[0], 16)
                         for p in Path(dest).glob("generations/*/snapshots/*.snap"))
    start, end = first_snapshot * 1_000_000 + 1, log[-1][2]
    times = [rnd.randint(start, end) for _ in range(40)]
    times += [rnd.randint(a + 60_000_000, b - 1) for a, b in down[:-1] if b - a > 70_000_000]
    check_points(dest, tmp_path, log, times, down)

    # through the CLI: the warning on stderr, exit 0; --exact refuses
    a, b = max(down[:-1], key=lambda w: w[1] - w[0])
    t = fmt_ns((a + b) // 2)
    r = util.restore(dest, tmp_path / "stopped.db", "--to-time", t)
    assert "warning: " in r.stderr and "replicator stopped from " in r.stderr
    assert "before the time asked for" in r.stderr
    r = util.cli("restore", dest, "-o", str(tmp_path / "exact.db"), "--exact", "--to-time", t)
    assert r.returncode == 1 and "did not observe" in r.stderr
    assert not (tmp_path / "exact.db").exists()
