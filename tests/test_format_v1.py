"""Replicas written in format version 1 (no content hashes, no catch-up objects) still restore.

``tests/data/v1-replica`` was written by the version-1 writer: one generation, txids 1..22, where
transaction k inserted row ``seq = k``; a snapshot at txid 0 and one at txid 10."""

from __future__ import annotations

import shutil
import sqlite3
import struct
from pathlib import Path

from replicator.restore import apply_plan, plan_restore
from replicator.storage.file import FileStorage

DATA = Path(__file__).resolve().parent / "data" / "v1-replica"


def seqs(path: Path) -> list[int]:
    c = sqlite3.connect(path)
    try:
        return [r[0] for r in c.execute("SELECT seq FROM log ORDER BY seq")]
    finally:
        c.close()


def test_fixture_is_version_1() -> None:
    objs = list(DATA.glob("generations/*/*/*"))
    assert len(objs) == 11
    for p in objs:
        assert struct.unpack(">4sH", p.read_bytes()[:6]) == (b"\x89RPL", 1)


async def test_version_1_replica_restores(tmp_path: Path) -> None:
    shutil.copytree(DATA, tmp_path / "replica")
    client = FileStorage(str(tmp_path / "replica"))
    plan = await plan_restore(client)
    result = await apply_plan(client, plan, str(tmp_path / "latest.db"))
    assert (plan.txid, result.integrity, result.verified) == (22, "ok", None)
    assert seqs(tmp_path / "latest.db") == list(range(1, 23))
    for txid in (0, 5, 6, 10, 11, 13, 21):
        plan = await plan_restore(client, txid=txid)
        await apply_plan(client, plan, str(tmp_path / f"t{txid}.db"))
        assert seqs(tmp_path / f"t{txid}.db") == list(range(1, txid + 1))
        if txid in (0, 6, 10, 13):  # the last transaction of a captured segment
            again = await plan_restore(client, to_time_ns=plan.ts_ns)
            assert again.txid == txid
