"""Restore planning and applying, on replica histories made by the real capture engine.

Each history is a WAL database written by a connection in this process and captured by
``Database.step()`` into a spool, which ``Replica.sync()`` copies to a FileStorage or MemoryStorage.
Expectations come from the objects themselves: the ``txns`` list ``[txid, ts_ns, frames, pages]``
of each segment header and the ``ts_ns`` of each snapshot.
"""

from __future__ import annotations

import io
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from util import commit, dump, integrity, seqs
from writer import init_db

from replicator.db import Database
from replicator.errors import CorruptObjectError, FormatError, RestoreError
from replicator.format import KIND_WAL, ObjectDecoder, ObjectWriter, read_header
from replicator.pos import ObjectInfo
from replicator.replica import Replica
from replicator.restore import apply_plan, fmt_ns, integrity_check, parse_time, plan_restore
from replicator.spool import Spool
from replicator.storage import FileStorage, MemoryStorage
from replicator.storage.base import StorageClient
from replicator.wal import FRAME_HEADER_SIZE

# ------------------------------------------------------------------------------------------
# Building histories


class History:
    """A WAL database, an application connection and the capture engine, all in this process.

    Every application transaction inserts the next ``seq`` into ``log`` (and, when asked, a large
    row into ``data``), so inside one generation txid ``k`` is exactly rows ``1..k``.
    """

    def __init__(self, root: Path, name: str = "app") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / f"{name}.db"
        init_db(str(self.path))
        self.spool = Spool(str(root / f"{name}-spool"))
        self.app = sqlite3.connect(self.path, isolation_level=None)
        self.seq = 0
        self.db = Database(str(self.path), self.spool)
        self.db.open()
        self.step()

    def commit(self, n: int = 1, big: bool = False) -> None:
        """``n`` transactions (with a large row each if ``big``)."""
        self.seq = commit(self.app, n, payload=20000 if big else 0)[-1]

    def step(self) -> list[ObjectInfo]:
        """Capture; then wait for the clock to move on so the next object has a later ms."""
        objs = self.db.step().objects
        time.sleep(0.003)
        return objs

    def snapshot(self) -> ObjectInfo:
        info = self.db.snapshot()
        time.sleep(0.003)
        return info

    def restart(self, n: int, *, keep_index: bool) -> None:
        """Stop capturing, let the application commit ``n`` transactions and reset the WAL
        (TRUNCATE checkpoint) behind the replicator's back, then capture again. With the local
        state intact (``keep_index``) the generation continues with a catch-up object holding
        those transactions; without the page index (lost with the local state) a new
        generation starts whose first snapshot holds them."""
        self.db.close()
        if not keep_index:
            os.unlink(self.spool.root + "/pages.idx")
        self.commit(n)
        busy = self.app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0
        self.commit(1)
        self.db = Database(str(self.path), self.spool)
        self.db.open()
        res = self.db.step()
        if keep_index:
            assert res.catch_up == "resume_failed" and res.new_generation is None
        else:
            assert res.new_generation == "no_index"
        time.sleep(0.003)

    def close(self) -> None:
        self.db.close()
        self.app.close()

    async def ship(self, client: StorageClient) -> StorageClient:
        await client.init()
        # one object per captured segment, so that tests can pick, drop or damage one
        await Replica("r", client, self.spool, "app", batch=False).sync()
        return client


async def timeline(client: StorageClient, gen: str) -> dict[int, int]:
    """txid -> observed ns of every transaction of a generation, from the segment headers (and
    snapshot times for txids only a snapshot shows)."""
    out: dict[int, int] = {}
    for o in await client.objects(gen):
        h = await read_header(client.read_object(o), o.key)
        if o.kind == "wal":
            for txid, ts, _frames, _pages in h["txns"]:
                out[int(txid)] = int(ts)
        else:
            out.setdefault(o.end_txid, int(h["ts_ns"]))
    return dict(sorted(out.items()))


async def snapshot_ns(client: StorageClient, info: ObjectInfo) -> int:
    return int((await read_header(client.read_object(info), info.key))["ts_ns"])


async def restore(client: StorageClient, out: Path, **kw: Any) -> tuple[Any, list[int]]:
    plan = await plan_restore(client, **kw)
    result = await apply_plan(client, plan, str(out), force=True)
    assert result.integrity == "ok"
    assert result.txid == plan.txid
    return plan, seqs(out)


def no_temp_files(d: Path) -> bool:
    return not [p for p in os.listdir(d) if p.endswith(".tmp")]


def object_path(client: FileStorage, info: ObjectInfo) -> Path:
    return Path(client.root, *info.key.split("/"))


async def put(client: StorageClient, info: ObjectInfo, data: bytes) -> None:
    async def one() -> AsyncIterator[bytes]:
        yield data

    await client.write_object(info, one())


async def get(client: StorageClient, info: ObjectInfo) -> bytes:
    return b"".join([c async for c in client.read_object(info)])


def header_of(raw: bytes, key: str) -> dict[str, Any]:
    """The JSON header of an encoded object."""
    dec = ObjectDecoder(key)
    dec.feed(raw)
    assert dec.header is not None
    return dec.header


def reencode(raw: bytes, key: str, **changes: Any) -> bytes:
    """The same object with header fields changed (and a valid checksum)."""
    dec = ObjectDecoder(key)
    body = dec.feed(raw)
    dec.finish()
    assert dec.header is not None
    header = {**dec.header, **changes}
    buf = io.BytesIO()
    w = ObjectWriter(buf, dec.kind, header)
    w.write(body)
    w.close()
    return buf.getvalue()


@pytest.fixture(params=["file", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StorageClient:
    if request.param == "file":
        return FileStorage(str(tmp_path / "replica"))
    return MemoryStorage()


@pytest.fixture
async def simple(tmp_path: Path, backend: StorageClient) -> tuple[History, StorageClient]:
    """txid 0 snapshot; txids 1..10 in segments of 1, 2 and 3 transactions, some big."""
    h = History(tmp_path / "h")
    for n in (1, 2, 1, 3, 1, 2):
        h.commit(n, big=n == 2)
        h.step()
    assert h.seq == 10
    await h.ship(backend)
    h.close()
    return h, backend


# ------------------------------------------------------------------------------------------
# Restores that succeed


async def test_latest(simple: tuple[History, StorageClient], tmp_path: Path) -> None:
    h, client = simple
    out = tmp_path / "out.db"
    plan, got = await restore(client, out)
    assert got == list(range(1, 11))
    assert plan.txid == 10
    assert plan.notes == []
    assert plan.snapshot.end_txid == 0
    assert [s.start_txid for s in plan.segments] == [1, 2, 4, 5, 8, 9]
    assert integrity(out) == "ok"
    assert dump(out) == dump(h.path)
    tl = await timeline(client, plan.generation)
    assert plan.ts_ns == tl[10]


async def test_every_txid(simple: tuple[History, StorageClient], tmp_path: Path) -> None:
    _, client = simple
    for n in range(0, 11):
        plan, got = await restore(client, tmp_path / f"out{n}.db", txid=n)
        assert plan.txid == n
        assert got == list(range(1, n + 1))
    with pytest.raises(RestoreError) as ei:
        await plan_restore(client, txid=11)
    assert "txid 11 is not in generation" in str(ei.value)
    assert "txid 0..10" in str(ei.value)


async def test_to_time_is_exact(simple: tuple[History, StorageClient], tmp_path: Path) -> None:
    """A transaction is included iff its observed time is <= T, to the nanosecond, also when T is
    inside the millisecond of a segment's key time."""
    _, client = simple
    gen = (await client.generations())[0]
    tl = await timeline(client, gen)
    snap0 = tl[0]
    points = sorted({ts + d for ts in tl.values() for d in (-1, 0, 1)} - {snap0 - 1})
    for i, t in enumerate(points):
        expected = max(txid for txid, ts in tl.items() if ts <= t)
        plan, got = await restore(client, tmp_path / f"t{i}.db", to_time_ns=t)
        assert plan.txid == expected, (t, tl)
        assert got == list(range(1, expected + 1))
        assert plan.ts_ns == tl[expected]
        assert plan.ts_ns <= t


async def test_to_time_before_the_earliest_snapshot(
    simple: tuple[History, StorageClient],
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    snap0 = (await timeline(client, gen))[0]
    for t in (snap0 - 1, snap0 - 1_000_000, snap0 - 86_400 * 10**9):
        with pytest.raises(RestoreError) as ei:
            await plan_restore(client, to_time_ns=t)
        msg = str(ei.value)
        assert msg.startswith(f"{fmt_ns(t)} is before the earliest restorable point; restorable: ")
        assert f"{gen}: " in msg
        assert "(txid 0..10)" in msg


async def test_to_time_after_the_latest_point_restores_latest_with_a_note(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    last = (await timeline(client, gen))[10]
    plan = await plan_restore(client, to_time_ns=last)
    assert plan.txid == 10
    assert plan.notes == []
    t = last + 3_600 * 10**9
    plan, got = await restore(client, tmp_path / "o.db", to_time_ns=t)
    assert plan.txid == 10
    assert got == list(range(1, 11))
    assert len(plan.notes) == 1
    assert "after the last replicated transaction" in plan.notes[0]
    assert fmt_ns(plan.ts_ns) in plan.notes[0]


async def test_periodic_snapshots_are_used(tmp_path: Path, backend: StorageClient) -> None:
    h = History(tmp_path / "h")
    h.commit(2)
    h.step()
    mid = h.snapshot()
    assert mid.end_txid == 2
    h.commit(3)
    h.step()
    last = h.snapshot()
    assert last.end_txid == 5
    h.commit(1)
    h.step()
    await h.ship(backend)
    h.close()

    plan, got = await restore(backend, tmp_path / "latest.db")
    assert (plan.snapshot.key, plan.txid, got) == (last.key, 6, list(range(1, 7)))
    assert len(plan.segments) == 1

    plan, got = await restore(backend, tmp_path / "t4.db", txid=4)
    assert (plan.snapshot.key, got) == (mid.key, [1, 2, 3, 4])

    plan, got = await restore(backend, tmp_path / "t5.db", txid=5)
    assert (plan.snapshot.key, plan.segments, got) == (last.key, [], [1, 2, 3, 4, 5])

    tl = await timeline(backend, mid.generation)
    mid_ns = await snapshot_ns(backend, mid)
    assert tl[2] < mid_ns < tl[3]
    # just before the periodic snapshot was observed: the one before it, plus the segments
    plan, got = await restore(backend, tmp_path / "a.db", to_time_ns=mid_ns - 1)
    assert (plan.snapshot.end_txid, plan.txid, got) == (0, 2, [1, 2])
    plan, got = await restore(backend, tmp_path / "b.db", to_time_ns=mid_ns)
    assert (plan.snapshot.key, plan.txid, got) == (mid.key, 2, [1, 2])
    assert plan.ts_ns == mid_ns
    plan, got = await restore(backend, tmp_path / "c.db", to_time_ns=tl[5])
    assert (plan.snapshot.key, plan.txid) == (mid.key, 5)
    assert got == [1, 2, 3, 4, 5]


async def test_large_transactions_across_segments(tmp_path: Path) -> None:
    """Transactions of many frames, with the pin rotated (checkpoint) in between."""
    h = History(tmp_path / "h")
    h.db.checkpoint_pages = 16
    for _ in range(4):
        h.commit(2, big=True)
        h.step()
    client = await h.ship(MemoryStorage())
    h.close()
    plan, got = await restore(client, tmp_path / "o.db")
    assert got == list(range(1, 9))
    assert dump(tmp_path / "o.db") == dump(h.path)
    for n in (1, 4, 7):
        _, got = await restore(client, tmp_path / f"o{n}.db", txid=n)
        assert got == list(range(1, n + 1))


# ------------------------------------------------------------------------------------------
# Damage and missing objects


async def test_missing_middle_segment(simple: tuple[History, StorageClient],
                                      tmp_path: Path) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    tl = await timeline(client, gen)
    seg = next(o for o in await client.objects(gen) if o.kind == "wal" and o.start_txid == 5)
    await client.delete_objects([seg])

    with pytest.raises(RestoreError) as ei:
        await plan_restore(client)
    assert f"missing WAL segment for txid 5 in generation {gen}" in str(ei.value)
    assert "restorable: " in str(ei.value)
    # at or after the last time before the hole, the missing transactions may count (a
    # segment's times are unknown once it is gone): refused rather than silently short
    for kw in ({"txid": 5}, {"txid": 9}, {"to_time_ns": tl[4]}, {"to_time_ns": tl[5]},
               {"to_time_ns": tl[10] + 10**9}):
        with pytest.raises(RestoreError, match="missing WAL segment for txid 5 "):
            await plan_restore(client, **kw)
    # before the hole everything still restores
    _, got = await restore(client, tmp_path / "a.db", txid=4)
    assert got == [1, 2, 3, 4]
    _, got = await restore(client, tmp_path / "b.db", to_time_ns=tl[4] - 1)
    assert got == [1, 2, 3]


async def test_missing_last_segment_is_not_detectable_but_restores_a_prefix(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    objs = await client.objects(gen)
    await client.delete_objects([objs[-1]])
    _, got = await restore(client, tmp_path / "o.db")
    assert got == list(range(1, objs[-1].start_txid))


async def test_corrupt_segment_names_the_key_and_writes_nothing(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    seg = next(o for o in await client.objects(gen) if o.kind == "wal" and o.start_txid == 4)
    raw = bytearray(await get(client, seg))
    body_at = 12 + int.from_bytes(raw[8:12], "big")
    raw[(body_at + len(raw) - 36) // 2] ^= 0x55  # inside the compressed frames
    await put(client, seg, bytes(raw))

    plan = await plan_restore(client)  # planning reads headers only
    assert plan.txid == 10
    out = tmp_path / "out" / "new.db"
    out.parent.mkdir()
    with pytest.raises(CorruptObjectError) as ei:
        await apply_plan(client, plan, str(out))
    assert seg.key in str(ei.value)
    assert not out.exists()
    assert os.listdir(out.parent) == []

    # an existing output is left exactly as it was, even with force
    existing = tmp_path / "out" / "existing.db"
    existing.write_bytes(b"precious")
    before = os.stat(existing)
    with pytest.raises(CorruptObjectError, match=seg.key):
        await apply_plan(client, plan, str(existing), force=True)
    assert existing.read_bytes() == b"precious"
    assert os.stat(existing).st_ino == before.st_ino
    assert sorted(os.listdir(out.parent)) == ["existing.db"]

    # stopping inside the damaged segment still verifies all of it
    plan = await plan_restore(client, txid=4)
    assert plan.segments[-1] == seg
    with pytest.raises(CorruptObjectError, match=seg.key):
        await apply_plan(client, plan, str(out))
    assert not out.exists()
    # before it, fine
    _, got = await restore(client, tmp_path / "ok.db", txid=3)
    assert got == [1, 2, 3]


@pytest.mark.parametrize("where", ["snapshot", "trailer", "truncated"])
async def test_other_damage_is_detected(
    simple: tuple[History, StorageClient], tmp_path: Path, where: str
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    objs = await client.objects(gen)
    target = objs[0] if where == "snapshot" else objs[-1]
    raw = bytearray(await get(client, target))
    if where == "snapshot":
        raw[-40] ^= 0x01
    elif where == "trailer":
        raw[-1] ^= 0x01
    else:
        del raw[-50:]
    await put(client, target, bytes(raw))
    plan = await plan_restore(client)
    out = tmp_path / "o.db"
    with pytest.raises(FormatError) as ei:
        await apply_plan(client, plan, str(out))
    assert target.key in str(ei.value)
    assert not out.exists()
    assert no_temp_files(tmp_path)


async def test_segment_from_another_generation(tmp_path: Path, backend: StorageClient) -> None:
    """Same txid range, valid checksum, but the frames continue another WAL: refused."""
    a = History(tmp_path / "a", "a")
    b = History(tmp_path / "b", "b")
    for h in (a, b):
        for _ in range(4):
            h.commit()
            h.step()
    await a.ship(backend)
    other = await b.ship(MemoryStorage())
    a.close()
    b.close()
    gen_a = (await backend.generations())[0]
    gen_b = (await other.generations())[0]
    seg_a = next(o for o in await backend.objects(gen_a) if o.start_txid == 3 and o.kind == "wal")
    seg_b = next(o for o in await other.objects(gen_b) if o.start_txid == 3 and o.kind == "wal")
    await put(backend, seg_a, await get(other, seg_b))

    plan = await plan_restore(backend)
    out = tmp_path / "o.db"
    with pytest.raises(CorruptObjectError) as ei:
        await apply_plan(backend, plan, str(out))
    assert str(ei.value).startswith(f"{seg_a.key}: ")
    assert "broken chain" in str(ei.value)
    assert not out.exists()
    _, got = await restore(backend, out, txid=2)
    assert got == [1, 2]


@pytest.mark.parametrize("field", ["prev", "start", "end"])
async def test_broken_links(simple: tuple[History, StorageClient], tmp_path: Path,
                            field: str) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    seg = next(o for o in await client.objects(gen) if o.kind == "wal" and o.start_txid == 5)
    raw = await get(client, seg)
    dec = ObjectDecoder(seg.key)
    dec.feed(raw)
    assert dec.header is not None
    pos = dict(dec.header[field])
    pos["checksum"] = [pos["checksum"][0] ^ 1, pos["checksum"][1]]
    await put(client, seg, reencode(raw, seg.key, **{field: pos}))

    plan = await plan_restore(client)
    with pytest.raises(CorruptObjectError) as ei:
        await apply_plan(client, plan, str(tmp_path / "o.db"))
    assert str(ei.value).startswith(f"{seg.key}: ")
    assert not (tmp_path / "o.db").exists()


def with_body(raw: bytes, key: str, change: Callable[[bytearray], None]) -> bytes:
    """The same object with its body changed (and a valid object checksum)."""
    dec = ObjectDecoder(key)
    body = bytearray(dec.feed(raw))
    dec.finish()
    assert dec.header is not None
    change(body)
    buf = io.BytesIO()
    w = ObjectWriter(buf, dec.kind, dec.header)
    w.write(bytes(body))
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize("start_txid", [4, 7, 9])
async def test_a_bad_frame_among_many_small_segments_names_its_segment(
    tmp_path: Path, backend: StorageClient, start_txid: int
) -> None:
    """Frames whose WAL checksum fails inside an object whose own checksum holds (written so):
    the restore fails naming the segment that holds them, wherever it is among the small
    segments of the tail, even though several are checked together; nothing is written. Before
    it, the restore is fine."""
    h = History(tmp_path / "h")
    for _ in range(12):
        h.commit(1)
        h.step()
    await h.ship(backend)
    h.close()
    gen = (await backend.generations())[0]
    seg = next(o for o in await backend.objects(gen)
               if o.kind == "wal" and o.start_txid == start_txid)
    raw = await get(backend, seg)

    def flip(body: bytearray) -> None:
        body[FRAME_HEADER_SIZE + 100] ^= 0x01  # a byte of the first frame's page

    await put(backend, seg, with_body(raw, seg.key, flip))
    plan = await plan_restore(backend)
    assert plan.txid == 12 and len(plan.segments) == 12
    out = tmp_path / "o.db"
    with pytest.raises(CorruptObjectError) as ei:
        await apply_plan(backend, plan, str(out))
    assert str(ei.value).startswith(f"{seg.key}: corrupt object (frame 1 of ")
    assert "checksum mismatch" in str(ei.value)
    assert not out.exists() and no_temp_files(tmp_path)
    _, got = await restore(backend, out, txid=start_txid - 1)
    assert got == list(range(1, start_txid))


async def test_header_that_does_not_match_the_key(simple: tuple[History, StorageClient],
                                                  tmp_path: Path) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    seg = next(o for o in await client.objects(gen) if o.kind == "wal" and o.start_txid == 4)
    raw = await get(client, seg)
    txns = [[t[0] + 1, *t[1:]] for t in header_of(raw, seg.key)["txns"]]
    await put(client, seg, reencode(raw, seg.key, start_txid=seg.start_txid + 1,
                                    end_txid=seg.end_txid + 1, txns=txns))
    plan = await plan_restore(client)
    with pytest.raises(CorruptObjectError, match="header does not match its key"):
        await apply_plan(client, plan, str(tmp_path / "o.db"))


# ------------------------------------------------------------------------------------------
# Generations and gaps


@pytest.fixture
async def two_generations(tmp_path: Path, backend: StorageClient) -> tuple[History, StorageClient]:
    """Generation 1: txids 1..3 (seq 1..3); a gap (seq 4..6 never captured in it); generation 2:
    a snapshot holding seq 1..6, then txids 1..2 (seq 7..8)."""
    return await three_restart_two(tmp_path, backend, keep_index=False)


async def three_restart_two(
    tmp_path: Path, backend: StorageClient, *, keep_index: bool
) -> tuple[History, StorageClient]:
    """Three transactions, a restart while the application commits two (and a third after
    truncating its WAL; see ``History.restart``), two more transactions; shipped to
    ``backend``."""
    h = History(tmp_path / "h")
    for _ in range(3):
        h.commit()
        h.step()
    h.restart(2, keep_index=keep_index)
    for _ in range(2):
        h.commit()
        h.step()
    await h.ship(backend)
    h.close()
    return h, backend


async def test_gap_between_generations(
    two_generations: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = two_generations
    gen1, gen2 = await client.generations()
    tl1 = await timeline(client, gen1)
    tl2 = await timeline(client, gen2)
    end1, start2 = tl1[3], tl2[0]
    assert end1 < start2

    # latest: generation 2
    plan, got = await restore(client, tmp_path / "latest.db")
    assert (plan.generation, plan.txid, got) == (gen2, 2, list(range(1, 9)))

    # inside the gap: the newest state before it, with a warning; --exact refuses
    for t in (end1 + 1, (end1 + start2) // 2, start2 - 1):
        plan, got = await restore(client, tmp_path / f"gap{t}.db", to_time_ns=t)
        assert (plan.generation, plan.txid, got) == (gen1, 3, [1, 2, 3])
        [warning] = plan.warnings
        assert "falls in a gap between generations" in warning
        assert gen1 in warning and gen2 in warning
        assert f"{(t - end1) / 1e9:.3f} s before the time asked for" in warning
        with pytest.raises(RestoreError) as ei:
            await plan_restore(client, to_time_ns=t, exact=True)
        msg = str(ei.value)
        assert "falls in a gap between generations" in msg
        assert gen1 in msg and gen2 in msg
        assert "restorable: " in msg

    # the edges of the gap belong to the generations
    plan, got = await restore(client, tmp_path / "end1.db", to_time_ns=end1)
    assert (plan.generation, plan.txid, got, plan.notes) == (gen1, 3, [1, 2, 3], [])
    plan, got = await restore(client, tmp_path / "start2.db", to_time_ns=start2)
    assert (plan.generation, plan.txid, got) == (gen2, 0, list(range(1, 7)))

    # inside each generation
    plan, got = await restore(client, tmp_path / "g1.db", to_time_ns=tl1[2])
    assert (plan.generation, got) == (gen1, [1, 2])
    plan, got = await restore(client, tmp_path / "g2.db", to_time_ns=tl2[1])
    assert (plan.generation, got) == (gen2, list(range(1, 8)))

    # after the end
    plan, got = await restore(client, tmp_path / "after.db", to_time_ns=tl2[2] + 1)
    assert (plan.generation, plan.txid, got) == (gen2, 2, list(range(1, 9)))
    assert len(plan.notes) == 1 and "after the last replicated transaction" in plan.notes[0]

    # before everything
    with pytest.raises(RestoreError, match="before the earliest restorable point") as ei:
        await plan_restore(client, to_time_ns=tl1[0] - 1)
    assert gen1 in str(ei.value) and gen2 in str(ei.value)


async def test_txid_and_generation_selection(
    two_generations: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = two_generations
    gen1, gen2 = await client.generations()
    # txids count within a generation: without --generation they mean the latest one
    plan, got = await restore(client, tmp_path / "a.db", txid=1)
    assert (plan.generation, got) == (gen2, list(range(1, 8)))
    plan, got = await restore(client, tmp_path / "b.db", txid=2, generation=gen1)
    assert (plan.generation, got) == (gen1, [1, 2])
    plan, got = await restore(client, tmp_path / "c.db", generation=gen1)
    assert (plan.generation, plan.txid, got) == (gen1, 3, [1, 2, 3])
    with pytest.raises(RestoreError, match=f"txid 3 is not in generation {gen2}"):
        await plan_restore(client, txid=3)
    with pytest.raises(RestoreError, match="generation 0000000000000000 not found"):
        await plan_restore(client, generation="0000000000000000")


async def test_generation_without_snapshot_is_not_restorable(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = simple
    gen = (await client.generations())[0]
    snap = next(o for o in await client.objects(gen) if o.kind == "snapshot")
    await client.delete_objects([snap])
    with pytest.raises(RestoreError, match="no restorable generation"):
        await plan_restore(client)
    with pytest.raises(RestoreError, match="no restorable generation"):
        await plan_restore(MemoryStorage())


async def test_newer_generation_without_snapshot_is_not_skipped_silently(
    two_generations: tuple[History, StorageClient],
) -> None:
    """If the newest generation lost its snapshot, "latest" cannot silently mean the end of the
    generation before it: refuse, or at least say so in the plan."""
    _, client = two_generations
    gen1, gen2 = await client.generations()
    snap = next(o for o in await client.objects(gen2) if o.kind == "snapshot")
    await client.delete_objects([snap])
    for kw in ({}, {"txid": 2}):
        try:
            plan = await plan_restore(client, **kw)
        except RestoreError as exc:
            assert gen2 in str(exc)
        else:
            assert plan.generation == gen1
            assert any(gen2 in n for n in plan.notes), plan.notes


# ------------------------------------------------------------------------------------------
# apply_plan and the output file


async def test_output_handling(simple: tuple[History, StorageClient], tmp_path: Path) -> None:
    _, client = simple
    plan = await plan_restore(client)
    out = tmp_path / "o" / "restored.db"
    out.parent.mkdir()
    out.write_bytes(b"do not touch")
    with pytest.raises(RestoreError, match="already exists") as ei:
        await apply_plan(client, plan, str(out))
    assert str(out) in str(ei.value)
    assert out.read_bytes() == b"do not touch"
    assert os.listdir(out.parent) == ["restored.db"]

    ino = os.stat(out).st_ino
    result = await apply_plan(client, plan, str(out), force=True)
    assert result.output == str(out)
    assert result.integrity == "ok"
    assert os.stat(out).st_ino != ino  # renamed into place, not rewritten in place
    assert os.listdir(out.parent) == ["restored.db"]
    assert seqs(out) == list(range(1, 11))
    assert result.page_size == 4096
    assert result.pages * result.page_size == out.stat().st_size

    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    with pytest.raises(RestoreError, match="output directory .* does not exist") as ei:
        await apply_plan(client, plan, str(missing))
    assert str(missing.parent) in str(ei.value)
    assert not (tmp_path / "no").exists()


async def test_restore_without_integrity_check(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = simple
    plan = await plan_restore(client, txid=3)
    result = await apply_plan(client, plan, str(tmp_path / "o.db"), check=False)
    assert result.integrity == "skipped"
    assert seqs(tmp_path / "o.db") == [1, 2, 3]


async def test_which_sqlite_check_a_restore_runs(
    simple: tuple[History, StorageClient], tmp_path: Path
) -> None:
    """quick_check where the content hash proved the file, integrity_check where there was no
    hash to prove it, or when asked for."""
    _, client = simple
    latest = await plan_restore(client)
    seen = set()
    for txid in range(latest.txid + 1):
        out = tmp_path / f"{txid}.db"
        result = await apply_plan(client, await plan_restore(client, txid=txid), str(out))
        assert result.integrity == "ok"
        assert result.check == ("quick_check" if result.verified else "integrity_check")
        seen.add(result.check)
        assert seqs(out) == list(range(1, txid + 1))
    assert "quick_check" in seen
    result = await apply_plan(client, latest, str(tmp_path / "full.db"), full_check=True)
    assert (result.check, result.integrity) == ("integrity_check", "ok")
    assert result.verified is not None


def test_integrity_check_of_a_damaged_file(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (?)", [(os.urandom(300),) for _ in range(200)])
    c.commit()
    c.close()
    assert integrity_check(str(db), quick=True) == integrity_check(str(db)) == "ok"
    with open(db, "r+b") as f:  # a b-tree page of the table, overwritten
        f.seek(3 * 4096)
        f.write(b"\x0d" + bytes(4095))
    for quick in (True, False):
        assert integrity_check(str(db), quick) != "ok"


async def test_restored_file_opens_without_wal(simple: tuple[History, StorageClient],
                                               tmp_path: Path) -> None:
    _, client = simple
    out = tmp_path / "o.db"
    await apply_plan(client, await plan_restore(client), str(out))
    assert sorted(os.listdir(tmp_path)) == ["h", "o.db"] + (["replica"] if isinstance(
        client, FileStorage) else [])
    c = sqlite3.connect(out)
    try:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        c.execute("INSERT INTO log(seq, t_ns) VALUES (11, 0)")
        c.commit()
    finally:
        c.close()
    assert seqs(out)[-1] == 11


async def test_file_and_memory_replicas_hold_the_same_objects(tmp_path: Path) -> None:
    h = History(tmp_path / "h")
    h.commit(3)
    h.step()
    f = await h.ship(FileStorage(str(tmp_path / "f")))
    m = await h.ship(MemoryStorage())
    h.close()
    gen = (await f.generations())[0]
    assert await f.objects(gen) == await m.objects(gen)
    for o in await f.objects(gen):
        assert object_path(f, o).read_bytes() == await get(m, o)
    w = await m.objects(gen)
    assert [o.kind for o in w] == ["snapshot", "wal"]
    dec = ObjectDecoder(w[1].key)
    dec.feed(await get(m, w[1]))
    dec.finish()
    assert dec.kind == KIND_WAL


# ------------------------------------------------------------------------------------------
# Printed times


@pytest.mark.parametrize(
    "ns",
    [1_700_000_000_123_456_400, 1_795_753_594_256_884_705, 1_700_000_000_999_999_999,
     1_700_000_000_000_000_001],
)
def test_a_printed_time_is_never_before_the_time_it_prints(ns: int) -> None:
    """``--to-time`` with a time the tool printed (``stops at``, ranges in errors) must not land
    before the point it described, or the restore silently drops that transaction."""
    assert parse_time(fmt_ns(ns)) >= ns


async def test_printed_stop_times_restore_the_same_point(
    two_generations: tuple[History, StorageClient],
) -> None:
    """``restore --dry-run`` prints "stops at: txid N, committed (observed) at T": restoring to
    T must stop at txid N of the same generation, including at the edges of the gap."""
    _, client = two_generations
    for gen in await client.generations():
        for txid in await timeline(client, gen):
            plan = await plan_restore(client, txid=txid, generation=gen)
            again = await plan_restore(client, to_time_ns=parse_time(fmt_ns(plan.ts_ns)))
            assert (again.generation, again.txid) == (gen, txid), fmt_ns(plan.ts_ns)


# ------------------------------------------------------------------------------------------
# Catch-ups and unobserved intervals


@pytest.fixture
async def caught_up(tmp_path: Path, backend: StorageClient) -> tuple[History, StorageClient]:
    """One generation: txids 1..3 (seq 1..3); the replicator stopped while seq 4..6 were
    committed and the WAL truncated; a catch-up (txid 4) holding them; txids 5..6 (seq 7..8)."""
    return await three_restart_two(tmp_path, backend, keep_index=True)


async def catchup_header(client: StorageClient) -> tuple[ObjectInfo, dict[str, Any]]:
    [gen] = await client.generations()
    [cu] = [o for o in await client.objects(gen) if o.kind == "catchup"]
    return cu, await read_header(client.read_object(cu), cu.key)


async def test_catchup_continues_the_generation(
    caught_up: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = caught_up
    cu, header = await catchup_header(client)
    assert cu.end_txid == 4 and header["reason"] == "resume_failed"
    assert header["unobserved_from_ns"] < header["ts_ns"]
    plan, got = await restore(client, tmp_path / "latest.db")
    assert (plan.txid, got) == (6, list(range(1, 9)))
    # at the catch-up itself: its content hash is checked
    plan = await plan_restore(client, to_time_ns=header["ts_ns"])
    result = await apply_plan(client, plan, str(tmp_path / "cu.db"))
    assert (plan.txid, seqs(tmp_path / "cu.db"), result.verified) == (4, list(range(1, 7)),
                                                                       cu.key)
    assert "unobserved: " in plan.describe() and cu.key in plan.describe()


async def test_time_in_an_unobserved_interval(
    caught_up: tuple[History, StorageClient], tmp_path: Path
) -> None:
    _, client = caught_up
    cu, header = await catchup_header(client)
    tl = await timeline(client, cu.generation)
    start, end = header["unobserved_from_ns"], header["ts_ns"]
    for t in (start + 1, (start + end) // 2, end - 1):
        plan, got = await restore(client, tmp_path / f"u{t}.db", to_time_ns=t)
        assert (plan.txid, got) == (3, [1, 2, 3])
        [warning] = plan.warnings
        assert "replicator stopped from " in warning
        assert f"{(t - tl[3]) / 1e9:.3f} s before" in warning
        with pytest.raises(RestoreError, match="did not observe"):
            await plan_restore(client, to_time_ns=t, exact=True)
    # watched until then: exact
    plan = await plan_restore(client, to_time_ns=start)
    assert plan.txid == 3 and plan.warnings == []


async def test_damaged_catchup_is_refused(
    caught_up: tuple[History, StorageClient], tmp_path: Path
) -> None:
    """A catch-up whose recorded content hash does not match what it rebuilds is an error
    naming it (the pages it carries were re-encoded with the wrong hash)."""
    _, client = caught_up
    cu, header = await catchup_header(client)
    raw = await get(client, cu)
    bad = "0" * 31 + ("1" if header["content_hash"][-1] != "1" else "2")
    await put(client, cu, reencode(raw, cu.key, content_hash=bad))
    plan = await plan_restore(client, txid=4)
    with pytest.raises(RestoreError, match=f"restored database differs from {cu.key}"):
        await apply_plan(client, plan, str(tmp_path / "o.db"))
    assert not (tmp_path / "o.db").exists()
