"""The service layer in-process: one-step capture and shipping, periodic snapshots, spool
pruning, restart."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from writer import init_db

from replicator.config import DbConfig, ReplicaConfig
from replicator.replicator import DatabaseService


def service(tmp_path: Path, **kw: float) -> DatabaseService:
    cfg = DbConfig(path=str(tmp_path / "app.db"),
                   replicas=[ReplicaConfig("local", str(tmp_path / "replica"))], **kw)
    return DatabaseService(cfg)


def commit(db: Path, n: int) -> None:
    c = sqlite3.connect(db)
    for i in range(n):
        c.execute("INSERT INTO log(seq, t_ns) VALUES ((SELECT COALESCE(MAX(seq),0)+1 FROM log), ?)",
                  (i,))
        c.commit()
    c.close()


def test_periodic_snapshot_only_when_something_changed(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))

    async def go() -> list[bool]:
        s = service(tmp_path, snapshot_interval=0.05)
        await s.open()
        out = []
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())  # nothing changed since the first snapshot
        commit(tmp_path / "app.db", 3)
        await s.sync()
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())  # idle again
        await s.close(5)
        return out

    assert asyncio.run(go()) == [False, True, False]
    snaps = sorted((tmp_path / "replica").glob("generations/*/snapshots/*.snap"))
    assert len(snaps) == 2


def test_spool_is_pruned_once_shipped_and_restart_resumes(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))

    async def run_once(n: int) -> tuple[str | None, int]:
        s = service(tmp_path, snapshot_interval=3600)
        await s.open()
        commit(tmp_path / "app.db", n)
        await s.sync()
        for r in s.replicas:
            await r.sync()
        await s.prune_spool()
        gen = s.db.generation
        await s.close(5)
        return gen, s.db.txid

    gen1, txid1 = asyncio.run(run_once(5))
    spool = tmp_path / ".app.db-replicator" / "generations"
    left = list(spool.glob("*/*/*"))
    assert len(left) == 1, "only the resume point stays in the spool"
    gen2, txid2 = asyncio.run(run_once(4))
    assert gen2 == gen1 and txid2 == txid1 + 4
    # the restart found the generation's snapshot on the replica: no second snapshot
    assert len(list((tmp_path / "replica").glob("generations/*/snapshots/*.snap"))) == 1


def test_final_sync_drains_a_backlog(tmp_path: Path, monkeypatch) -> None:
    import replicator.db as dbmod

    monkeypatch.setattr(dbmod, "SEGMENT_MAX_FRAMES", 8)
    monkeypatch.setattr(dbmod, "STEP_BATCHES", 2)
    init_db(str(tmp_path / "app.db"))

    async def go() -> int:
        s = service(tmp_path)
        await s.open()
        commit(tmp_path / "app.db", 200)  # far more than one step captures
        await s.close(30)
        return s.db.txid

    assert asyncio.run(go()) == 200
    out = tmp_path / "out.db"
    from util import restore, seqs

    restore(str(tmp_path / "replica"), out)
    assert seqs(out) == list(range(1, 201))
