"""Compaction: a real application connection, the capture engine stepped in-process, replicas
shipped and compacted one step at a time with a clock the test sets; every restore is compared
with the source's content at the same txid."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import shutil
import sqlite3
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path

import pytest
from writer import init_db

from replicator import compact
from replicator.compact import (
    COMPRESSED_BELOW,
    DEFAULT_LEVELS,
    EARLY_RUN,
    LARGE_BYTES,
    Compactor,
    CompactResult,
    min_run,
    plan_level,
    write_pieces,
)
from replicator.config import DbConfig, ReplicaConfig
from replicator.db import Database
from replicator.errors import CorruptObjectError, StorageError
from replicator.format import KIND_WAL, ObjectDecoder, ObjectWriter, read_header
from replicator.headers import SegmentHeader
from replicator.pos import ObjectInfo
from replicator.replica import COMPACT_SPACING, Replica
from replicator.replicator import DatabaseService
from replicator.restore import apply_plan, plan_restore
from replicator.retention import apply_retention
from replicator.spool import Spool
from replicator.storage.base import StorageClient
from replicator.storage.file import FileStorage

LEVELS = (0.05, 0.4, 2.0)  # seconds: short, so thousands of commits span many windows


@dataclass
class History:
    """A replicated run: where it is, and the observed time of every txid."""

    app: Path
    spool: Spool
    dest: FileStorage
    replica: Replica
    times: dict[int, int]  # txid -> observed ns
    end_ns: int


def commit(conn: sqlite3.Connection, seq: int, rnd: random.Random) -> None:
    conn.execute("BEGIN")
    conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)", (seq, rnd.randbytes(200)))
    if seq % 7 == 0:  # some transactions rewrite older pages too
        conn.execute("UPDATE data SET payload = ? WHERE k = ?", (rnd.randbytes(200), seq // 2))
    conn.execute("INSERT INTO log(seq, t_ns) VALUES (?, 0)", (seq,))
    conn.execute("COMMIT")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> History:
    """2,000 commits, captured one by one (one segment each), many WAL epochs (a checkpoint
    every 128 pages), a snapshot every 400 txids, shipped to a directory; built once."""
    return asyncio.run(build(tmp_path_factory.mktemp("history"), commits=2000, seed=5))


@pytest.fixture
def history(built: History, tmp_path: Path) -> Iterator[History]:
    """A copy of the built history's replica (and spool) for one test to change."""
    shutil.copytree(built.dest.root, tmp_path / "replica")
    shutil.copytree(built.spool.root, tmp_path / "spool")
    (tmp_path / "replica" / "lease.json").unlink()  # the copy gets a lease of its own
    spool = Spool(str(tmp_path / "spool"))
    dest = FileStorage(str(tmp_path / "replica"))
    replica = Replica("dir", dest, spool, "app")
    replica.set_levels(LEVELS, grace=0)
    asyncio.run(replica.init())
    yield History(built.app, spool, dest, replica, built.times, built.end_ns)


@dataclass
class Rig:
    """An application database captured into a spool and shipped to a directory whose
    compaction levels are LEVELS."""

    app: Path
    conn: sqlite3.Connection
    spool: Spool
    db: Database
    dest: FileStorage
    replica: Replica


@contextlib.asynccontextmanager
async def rig(tmp: Path) -> AsyncIterator[Rig]:
    """A :class:`Rig` in ``tmp`` (a checkpoint every 128 pages); closed at the end."""
    app = tmp / "app.db"
    init_db(str(app))
    conn = sqlite3.connect(app, isolation_level=None, timeout=0)
    conn.execute("PRAGMA synchronous=OFF")  # the test's own speed; capture is unaffected
    spool = Spool(str(tmp / "spool"))
    db = Database(str(app), spool, checkpoint_pages=128)
    db.open()
    dest = FileStorage(str(tmp / "replica"))
    replica = Replica("dir", dest, spool, "app")
    replica.set_levels(LEVELS, grace=0)
    await replica.init()
    try:
        yield Rig(app, conn, spool, db, dest, replica)
    finally:
        db.close()
        conn.close()


def wal_snapshot_service(app: Path, replica: Path, factor: float = 0.5,
                         duty: float = 1.0) -> DatabaseService:
    """A service left to its own snapshot policy (a 1 h interval, so only the WAL triggers
    snapshots) that counts a small test database as what it is (no size floor) and takes a WAL
    snapshot as soon as due, or after ``duty`` of the time spent on the last one."""
    cfg = DbConfig(path=str(app), replicas=[ReplicaConfig("local", str(replica))],
                   snapshot_interval=3600.0, snapshot_wal_factor=factor)
    s = DatabaseService(cfg)
    s.schedule.wal_snapshot_min = 0
    s.schedule.wal_snapshot_duty = duty
    return s


def full_every_400(db: Database, seq: int) -> None:
    """A full snapshot every 400 txids."""
    if seq % 400 == 0:
        db.snapshot()


async def build(tmp: Path, commits: int, seed: int,
                snapshots: Callable[[Database, int], None] = full_every_400,
                compact_every: int = 0) -> History:
    """``commits`` commits captured one by one (one segment each), ``snapshots(db, seq)`` after
    each, shipped every 50 and compacted every ``compact_every`` (0: never)."""
    async with rig(tmp) as r:
        rnd = random.Random(seed)
        r.db.step()
        for seq in range(1, commits + 1):
            commit(r.conn, seq, rnd)
            r.db.step()
            snapshots(r.db, seq)
            if seq % 50 == 0:
                await r.replica.sync()
            if compact_every and seq % compact_every == 0:
                await r.replica.compact()
        r.db.step()
        await r.replica.sync()
    times = await txn_times(r.dest)
    return History(r.app, r.spool, r.dest, r.replica, times, max(times.values()))


async def all_objects(dest: StorageClient) -> list[ObjectInfo]:
    """Every object ``dest`` holds, generation by generation."""
    return [o for g in await dest.generations() for o in await dest.objects(g)]


async def txn_times(dest: FileStorage) -> dict[int, int]:
    """The observed time (ns) of every txid in ``dest``'s segments."""
    times: dict[int, int] = {}
    for o in await all_objects(dest):
        if o.kind == "wal":
            h = SegmentHeader.from_json(await read_header(dest.read_object(o), o.key), o.key)
            times.update((t.txid, t.observed_ns) for t in h.txns)
    return times


async def restore_at(client: StorageClient, out: Path, **kw: int) -> tuple[int, list[int]]:
    plan = await plan_restore(client, **kw)
    res = await apply_plan(client, plan, str(out), force=True, check=False)
    c = sqlite3.connect(out)
    try:
        seqs = [int(s) for (s,) in c.execute("SELECT seq FROM log ORDER BY seq")]
    finally:
        c.close()
    return res.txid, seqs


def expected_txid(times: dict[int, int], t_ns: int) -> int:
    return max((txid for txid, ns in times.items() if ns <= t_ns), default=0)


def objects(h: History) -> list[ObjectInfo]:
    async def go() -> list[ObjectInfo]:
        return [o for g in await h.dest.generations() for o in await h.dest.objects(g)]

    return asyncio.run(go())


def content(db: Path) -> list[tuple[int, bytes]]:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(int(k), bytes(p)) for k, p in c.execute("SELECT k, payload FROM data ORDER BY k")]
    finally:
        c.close()


async def restores_exactly(client: StorageClient, h: History, tmp: Path, seed: int) -> None:
    """The newest state, and five instants of ``h`` picked with ``seed``, restored from
    ``client`` exactly as the source had them."""
    plan = await plan_restore(client)
    assert plan.txid == max(h.times)
    await apply_plan(client, plan, str(tmp / "out.db"), force=True)
    assert content(tmp / "out.db") == content(h.app)
    for t in random.Random(seed).sample(sorted(h.times), 5):
        txid, seqs = await restore_at(client, tmp / "t.db", to_time_ns=h.times[t])
        assert txid == t and seqs == list(range(1, t + 1))


@pytest.mark.timeout(900)  # thousands of commits, hundreds of restores; slow on a busy machine
def test_compaction_bounds_objects_and_keeps_every_instant_exact(
    history: History, tmp_path: Path
) -> None:
    h = history
    before = objects(h)
    assert sum(o.kind == "wal" for o in before) >= 1900
    instants = sorted(random.Random(11).randrange(min(h.times.values()), h.end_ns + 1)
                      for _ in range(200))
    instants += [h.times[t] for t in random.Random(12).sample(sorted(h.times), 20)]

    async def plans(tag: str) -> list[int]:
        out = []
        for t in instants:
            plan = await plan_restore(h.dest, to_time_ns=t)
            assert plan.txid == expected_txid(h.times, t), (tag, t)
            out.append(plan.txid)
        return out

    async def check(tag: str, which: list[int]) -> dict[int, list[tuple[int, bytes]]]:
        seen: dict[int, list[tuple[int, bytes]]] = {}
        for i in which:
            t = instants[i]
            txid, seqs = await restore_at(h.dest, tmp_path / f"{tag}.db", to_time_ns=t)
            want = expected_txid(h.times, t)
            assert txid == want, (tag, i, t)
            assert seqs == list(range(1, want + 1)), (tag, i, t)
            seen[txid] = content(tmp_path / f"{tag}.db")
        return seen

    # before: every instant planned to its exact txid, a sample restored (each restore reads up
    # to 400 small objects; after compaction every instant is restored)
    planned = asyncio.run(plans("pre"))
    pre = asyncio.run(check("pre", list(range(0, len(instants), 10))))
    # compaction with every window closed: all three levels in one step each
    end_s = h.end_ns / 1e9
    res = asyncio.run(h.replica.compact(now=end_s + 10 * LEVELS[-1]))
    assert res is not None and res.merged > 0 and set(res.levels) == {0, 1, 2}
    after = objects(h)
    snaps = sum(o.kind == "snapshot" for o in after)
    segs = [o for o in after if o.kind == "wal"]
    start_s = min(h.times.values()) / 1e9
    windows = int(end_s // LEVELS[-1]) - int(start_s // LEVELS[-1]) + 1
    # one per window of the longest level, one straddling each boundary between them, one more
    # per snapshot (a merge never crosses a snapshot's txid)
    assert len(segs) <= 2 * windows + snaps, (len(segs), windows, snaps)
    assert any(len(_header(h, o).epochs()) > 1 for o in segs)  # several WAL epochs in one
    assert asyncio.run(plans("post")) == planned
    post = asyncio.run(check("post", list(range(len(instants)))))
    for txid in pre:
        assert pre[txid] == post[txid], txid
    # the newest state: fewest objects, the source's content
    latest, _ = asyncio.run(restore_at(h.dest, tmp_path / "latest.db"))
    assert latest == max(h.times)
    assert content(tmp_path / "latest.db") == content(h.app)


def _header(h: History, o: ObjectInfo) -> SegmentHeader:
    async def go() -> SegmentHeader:
        return SegmentHeader.from_json(await read_header(h.dest.read_object(o), o.key), o.key)

    return asyncio.run(go())


def test_compaction_while_replicating_stays_within_the_levels(tmp_path: Path) -> None:
    """Compaction steps on the real clock between shipments: the merged objects are merged
    again at the next levels, and the count stays within what the levels allow."""
    h = asyncio.run(build(tmp_path, commits=1500, seed=5, compact_every=100))
    asyncio.run(h.replica.compact())
    segs = [o for o in objects(h) if o.kind == "wal"]
    start_s, end_s = min(h.times.values()) / 1e9, h.end_ns / 1e9
    top = int(end_s // LEVELS[-1]) - int(start_s // LEVELS[-1]) + 1
    mid = int(LEVELS[-1] / LEVELS[1]) + 1
    low = int(LEVELS[1] / LEVELS[0]) + 1
    # closed windows of each level inside the open one above it, their boundary straddlers,
    # the snapshots' breaks, and what the open shortest window holds (objects shipped since)
    recent = sum(1 for o in segs if o.last_ms >= (end_s - LEVELS[0]) * 1000)
    assert len(segs) <= 2 * (top + mid + low) + 2 + recent, len(segs)
    _, seqs = asyncio.run(restore_at(h.dest, tmp_path / "out.db"))
    assert seqs == list(range(1, 1501))
    assert content(tmp_path / "out.db") == content(h.app)


class FlakyDeletes:
    """A FileStorage whose next ``fail`` delete calls fail (a crash between a merge's write
    and its deletes, as far as the replica can tell)."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner
        self.url = inner.url
        self.fail = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        return await self.inner.write_object(info, data)

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        if self.fail:
            self.fail -= 1
            raise StorageError(f"{self.url}: cannot delete objects: injected")
        await self.inner.delete_objects(infos)


def test_a_merge_left_beside_its_parts_restores_and_is_cleaned_up(
    history: History, tmp_path: Path
) -> None:
    h = history
    flaky = FlakyDeletes(h.dest)
    comp = Compactor(flaky, h.spool, LEVELS, grace=0)  # type: ignore[arg-type]
    flaky.fail = 1
    with pytest.raises(StorageError, match="injected"):
        asyncio.run(comp.step(now=h.end_ns / 1e9 + 100))
    objs = [o for o in objects(h) if o.kind == "wal"]
    overlapping = [o for o in objs for p in objs
                   if p is not o and p.start_txid <= o.start_txid and o.end_txid <= p.end_txid]
    assert overlapping  # the merged object and its parts, side by side
    txid, seqs = asyncio.run(restore_at(h.dest, tmp_path / "a.db"))
    assert seqs == list(range(1, txid + 1)) and txid == max(h.times)
    plan = asyncio.run(plan_restore(h.dest))
    assert not set(plan.segments) & set(overlapping)  # the chain skips what is covered
    res = asyncio.run(comp.step(now=h.end_ns / 1e9 + 100))
    assert res.replaced >= len(overlapping)
    objs = [o for o in objects(h) if o.kind == "wal"]
    assert not [o for o in objs for p in objs
                if p is not o and p.start_txid <= o.start_txid and o.end_txid <= p.end_txid]


@pytest.mark.timeout(900)
def test_restores_racing_compaction_and_retention_never_fail_or_differ(
    history: History, tmp_path: Path
) -> None:
    h = history
    # replaced objects stay a moment (as in production, where it is 30 s): restores that
    # planned with them finish, and any that take longer plan again
    h.replica.set_levels(LEVELS, grace=0.3)
    snaps = sorted((o for o in objects(h) if o.kind == "snapshot"), key=lambda o: o.end_txid)
    keep = snaps[-2]  # retention keeps this snapshot and everything after it
    targets = [t for t in sorted(h.times) if t > keep.end_txid]
    rnd = random.Random(3)
    start_s = min(h.times.values()) / 1e9
    end_s = h.end_ns / 1e9
    results: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def compact_gradually() -> None:
        now = start_s
        while now < end_s + 3 * LEVELS[-1]:
            now += LEVELS[0] * 3
            await h.replica.compact(now=now)
            await asyncio.sleep(0)
        await asyncio.sleep(0.4)
        await h.replica.compact(now=now)  # the last replaced objects go
        done.set()

    async def retain() -> None:
        while not done.is_set():
            await apply_retention(h.dest, 1.0, now=keep.last_ms / 1000 + 1.0005)
            await asyncio.sleep(0.01)

    async def restore_loop(worker: int) -> None:
        i = 0
        while not done.is_set() or i < 10:
            txid = rnd.choice(targets)
            got, seqs = await restore_at(h.dest, tmp_path / f"r{worker}.db", txid=txid)
            assert got == txid and seqs == list(range(1, txid + 1))
            results.append((txid, len(seqs)))
            i += 1

    async def race() -> None:
        await asyncio.gather(compact_gradually(), retain(), *(restore_loop(w) for w in range(3)))

    asyncio.run(race())
    assert len(results) >= 30
    assert sum(o.kind == "snapshot" for o in objects(h)) == 2  # retention did run
    for txid in rnd.sample(targets, 5):
        got, _ = asyncio.run(restore_at(h.dest, tmp_path / "final.db", txid=txid))
        assert got == txid


class CompactsBeforeFirstSegmentRead(FileStorage):
    """A directory in which a compaction (grace 0: replaced objects deleted at once) runs just
    after a restore listed it and before the restore reads its first segment header."""

    def __init__(self, root: Path, compact: Callable[[], Awaitable[object]]) -> None:
        super().__init__(str(root))
        self.compact: Callable[[], Awaitable[object]] | None = compact

    async def _before(self, infos: Sequence[ObjectInfo]) -> None:
        if self.compact is not None and any(info.kind == "wal" for info in infos):
            compact, self.compact = self.compact, None
            await compact()

    async def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        await self._before([info])
        async with contextlib.aclosing(super().read_object(info)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def read_objects(self, infos: Sequence[ObjectInfo]) -> list[bytes]:
        await self._before(infos)
        return await super().read_objects(infos)


def test_a_plan_whose_objects_a_compaction_replaced_plans_again(history: History) -> None:
    """Planning a time reads segment headers after listing; when a compaction replaced those
    segments in between, the plan starts again from a new listing and lands on the same
    transaction."""
    h = history
    txids = sorted(h.times)
    target = txids[len(txids) * 9 // 10]
    t_ns = h.times[target]

    async def go() -> tuple[int, int]:
        racing = CompactsBeforeFirstSegmentRead(
            h.dest.root, lambda: h.replica.compact(now=h.end_ns / 1e9 + 3 * LEVELS[-1]))
        before = len(await h.dest.objects((await h.dest.generations())[-1]))
        plan = await plan_restore(racing, to_time_ns=t_ns)
        assert racing.compact is None, "the compaction ran during planning"
        after = len(await h.dest.objects((await h.dest.generations())[-1]))
        assert after < before  # segments were replaced
        return plan.txid, before

    got, _ = asyncio.run(go())
    assert got == expected_txid(h.times, t_ns) == target


def test_levels_plan_only_closed_windows_and_never_cross_a_snapshot() -> None:
    from replicator.pos import segment_info, snapshot_info

    gen = "0123456789abcdef"
    segs = [segment_info(gen, i, i, 1000 + 10 * i, 1000 + 10 * i, 100) for i in range(1, 21)]
    snap = snapshot_info(gen, 5, 1050)
    runs = plan_level([*segs, snap], 0.1, now_ms=1200)
    # windows of 100 ms: [1000, 1100) holds txids 1..9 (but 5 is a snapshot's), [1100, 1200)
    # 10..19; [1200, 1300) is still open
    assert [[o.start_txid for o in r] for r in runs] == [
        [1, 2, 3, 4, 5], [6, 7, 8, 9], list(range(10, 20))]
    holed = [s for s in segs if s.start_txid != 13]
    runs = plan_level(holed, 0.1, now_ms=1200)
    assert [[o.start_txid for o in r] for r in runs] == [
        list(range(1, 10)), [10, 11, 12], [14, 15, 16, 17, 18, 19]]
    # a segment as large as merges need to make it stays apart: runs break around it
    large = [dataclasses.replace(s, size=LARGE_BYTES) if s.start_txid in (3, 12, 13) else s
             for s in segs]
    runs = plan_level(large, 0.1, now_ms=1200)
    assert [[o.start_txid for o in r] for r in runs] == [
        [1, 2], list(range(4, 10)), [10, 11], list(range(14, 20))]
    below = [dataclasses.replace(s, size=LARGE_BYTES - 1) if s.start_txid == 3 else s
             for s in segs]
    assert [[o.start_txid for o in r] for r in plan_level(below, 0.1, now_ms=1200)] == [
        list(range(1, 10)), list(range(10, 20))]


def test_full_batches_of_a_bulk_load_are_never_merged(tmp_path: Path) -> None:
    """A bulk load fills the capture's segments (2,048 frames each, stored as they are): they
    are large enough as they are, and no level merges them (a merge would write every byte of
    the load once more); the small segment after them may still be merged."""
    app = tmp_path / "app.db"
    init_db(str(app))
    spool = Spool(str(tmp_path / "spool"))
    db = Database(str(app), spool, checkpoint_pages=100_000)
    db.open()
    conn = sqlite3.connect(app, isolation_level=None, timeout=0)
    try:
        db.step()
        for _ in range(24):  # 24 MiB of random rows, 1 MiB a transaction
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO data(k, payload) VALUES (?, randomblob(4000))",
                             [(i,) for i in range(256)])
            conn.execute("COMMIT")
        conn.execute("INSERT INTO data(k, payload) VALUES (0, x'00')")
        while db.step().more:
            pass
    finally:
        conn.close()
        db.close()
    gen = spool.generations()[-1]
    segs = [o for o in spool.objects(gen) if o.kind == "wal"]
    full = [o for o in segs if o.size >= LARGE_BYTES]
    assert len(full) >= 2, [o.size for o in segs]
    far = max(o.last_ms for o in segs) + 10_000_000
    for level in DEFAULT_LEVELS:
        merged = {o.key for run in plan_level(segs, level, now_ms=far) for o in run}
        assert not merged & {o.key for o in full}


def test_compaction_levels_config() -> None:
    from replicator.config import parse_config
    from replicator.errors import ConfigError

    cfg = parse_config({"dbs": [{"path": "/x/a.db", "replicas": ["/r"],
                                 "compaction-levels": ["30s", "10m"]}]})
    assert cfg.dbs[0].compaction_levels == (30.0, 600.0)
    assert parse_config({"dbs": [{"path": "/x/a.db", "replicas": ["/r"],
                                  "compaction-levels": []}]}).dbs[0].compaction_levels == ()
    with pytest.raises(ConfigError, match=r"compaction-levels\[1\]: must be longer"):
        parse_config({"dbs": [{"path": "/x/a.db", "replicas": ["/r"],
                               "compaction-levels": ["1m", "30s"]}]})
    with pytest.raises(ConfigError, match=r"compaction-levels\[0\]"):
        parse_config({"dbs": [{"path": "/x/a.db", "replicas": ["/r"],
                               "compaction-levels": ["soon"]}]})



def test_a_snapshot_once_the_wal_outgrows_the_database(tmp_path: Path) -> None:
    """With a long snapshot interval, the WAL captured since the last snapshot still triggers
    one when it exceeds ``snapshot-wal-factor`` times the database: the newest state never
    needs more than that replayed."""
    app = tmp_path / "app.db"
    init_db(str(app))

    async def go(factor: float, base: int) -> int:
        s = wal_snapshot_service(app, tmp_path / "r", factor)
        await s.open()
        conn = sqlite3.connect(app, isolation_level=None)
        rnd = random.Random(1)
        taken = 0
        try:
            for seq in range(base + 1, base + 3001):
                commit(conn, seq, rnd)
                if seq % 100 == 0:
                    await s.sync()
                    taken += await s.snapshot_if_due()
        finally:
            conn.close()
            await s.close(10)
        return taken

    assert asyncio.run(go(0.0, 0)) == 0  # off: only the interval would take one
    shutil.rmtree(tmp_path / "r")
    shutil.rmtree(tmp_path / ".app.db-replicator")
    assert asyncio.run(go(1.0, 3000)) >= 2
    assert asyncio.run(go(1.0, 6000)) >= 1
    with pytest.raises(Exception, match="snapshot-wal-factor"):
        from replicator.config import parse_config

        parse_config({"dbs": [{"path": "/x/a.db", "replicas": ["/r"],
                               "snapshot-wal-factor": -1}]})


def test_compaction_is_due_only_when_a_window_with_shipped_objects_closes(
    history: History,
) -> None:
    """An idle destination is not even listed: compaction runs once at start (the only
    listing), then a step runs only when a window holding something shipped since has
    closed."""
    h = history
    listed: list[str] = []
    steps: list[float | None] = []
    inner = h.dest.objects
    assert h.replica.compactor is not None
    step = h.replica.compactor.step

    async def counted(gen: str) -> list[ObjectInfo]:
        listed.append(gen)
        return await inner(gen)

    async def counted_step(now: float | None = None) -> CompactResult:
        steps.append(now)
        return await step(now)

    h.dest.objects = counted  # type: ignore[method-assign]
    h.replica.compactor.step = counted_step  # type: ignore[method-assign]
    asyncio.run(h.replica.compact_if_due())  # the pass at start
    after_start = len(listed)
    assert after_start >= 1 and len(steps) == 1
    for _ in range(3):
        asyncio.run(h.replica.compact_if_due())
    assert len(listed) == after_start and len(steps) == 1  # idle: nothing due, nothing listed
    gen = asyncio.run(h.dest.generations())[-1]
    import time

    from replicator.pos import segment_info

    now_ms = int(time.time() * 1000)
    assert h.replica.compactor is not None
    comp = h.replica.compactor
    due = comp.due

    def end(level: float) -> float:
        return (now_ms // int(level * 1000) + 1) * int(level * 1000) / 1000

    comp.shipped(segment_info(gen, 1, 1, now_ms, now_ms))
    # one segment in its first-level window: nothing to merge there, so only the later levels'
    # windows holding it are due (two levels' may coincide)
    assert sorted(due.times) == sorted({end(i) for i in LEVELS[1:]})
    for i in range(2, EARLY_RUN):
        comp.shipped(segment_info(gen, i, i, now_ms, now_ms))
    # fewer than the first level merges: still only the later levels'
    assert sorted(due.times) == sorted({end(i) for i in LEVELS[1:]})
    comp.shipped(segment_info(gen, EARLY_RUN, EARLY_RUN, now_ms, now_ms))
    ends = sorted(due.times)
    # as many as it merges in the same window: the end of the window holding them, at each
    # level
    assert ends == sorted({end(i) for i in LEVELS})
    time.sleep(max(0.0, ends[0] - time.time()) + 0.01)
    asyncio.run(h.replica.compact_if_due())
    assert len(steps) == 2  # the shortest window closed: one pass
    assert len(listed) == after_start  # planned from what the first listing and shipping told
    assert sorted(h.replica.compactor.due.times) == ends[1:]


def test_compaction_waits_while_the_capture_is_behind(history: History) -> None:
    """A replica whose capture is behind a faster writer does not start compacting; it does
    once the capture caught up."""
    h = history

    due = h.replica.compactor.due if h.replica.compactor is not None else None
    assert due is not None and due.is_due(0.0)  # the pass at start is due

    async def go() -> None:
        h.replica.source_behind = True
        h.replica._compact_beside()
        assert h.replica._compacting.task is None and due.is_due(0.0)
        h.replica.source_behind = False
        h.replica._compact_beside()
        assert h.replica._compacting.task is not None
        await h.replica._compacting.task
        assert 0.0 not in due.times

    asyncio.run(go())


def test_a_step_stops_between_merges_once_the_capture_falls_behind(
    history: History, tmp_path: Path
) -> None:
    """A step under way stops before its next merge when the capture falls behind its writer
    (each merge done is whole); compaction is due again, and a later step merges the rest.
    Every instant still restores exactly."""
    h = history
    comp = h.replica.compactor
    assert comp is not None
    end_s = h.end_ns / 1e9

    async def go() -> None:
        merges = 0
        real = comp._merge

        async def counted(run: list[ObjectInfo], res: CompactResult
                          ) -> list[tuple[list[ObjectInfo], ObjectInfo]]:
            nonlocal merges
            out = await real(run, res)
            merges += 1
            h.replica.source_behind = True  # the writer outpaced the capture meanwhile
            return out

        comp._merge = counted  # type: ignore[method-assign]
        comp.due.times = {0.0}
        await h.replica.compact_if_due()
        assert merges == 1 and comp.due.is_due(time.time() + LEVELS[0])  # the rest is due
        first = len(await all_objects(h.dest))
        h.replica.source_behind = False
        comp._merge = real  # type: ignore[method-assign]
        res = await h.replica.compact(now=end_s + 5 * LEVELS[-1])
        assert res is not None and not res.cut_short and res.merged > 1
        assert len(await all_objects(h.dest)) < first
        await restores_exactly(h.dest, h, tmp_path, seed=7)

    asyncio.run(go())


def test_compaction_waits_while_the_capture_follows_a_busy_writer(history: History) -> None:
    """While the capture follows a busy writer a due compaction step waits for its pause, but
    not longer than one first-level window (COMPACT_SPACING while it writes in bulk)."""
    h = history
    due = h.replica.compactor.due if h.replica.compactor is not None else None
    assert due is not None and due.is_due(0.0)

    async def go() -> None:
        h.replica.source_busy = True
        h.replica._compact_beside()
        assert h.replica._compacting.task is None
        h.replica._busy.limit = 0.0  # put off for as long as it may be
        h.replica._compact_beside()
        assert h.replica._compacting.task is not None
        await h.replica._compacting.task
        h.replica._busy.limit = LEVELS[0]
        h.replica._compacting.task = None
        h.replica._compact_after = 0.0
        h.replica.compactor.due.at(0.0)
        h.replica._compact_beside()
        assert h.replica._compacting.task is None
        h.replica.source_busy = False  # the writer paused
        h.replica._compact_beside()
        assert h.replica._compacting.task is not None
        await h.replica._compacting.task
        # writing in bulk: put off for longer than a first-level window (COMPACT_SPACING)
        assert h.replica._bulk.limit == max(COMPACT_SPACING, LEVELS[0])
        h.replica.source_busy = h.replica.source_bulk = True
        h.replica._compacting.task = None
        h.replica._compact_after = 0.0
        h.replica.compactor.due.at(0.0)
        h.replica._compact_beside()
        h.replica._busy.limit = 0.0  # a first-level window has passed
        h.replica._compact_beside()
        assert h.replica._compacting.task is None
        h.replica._bulk.limit = 0.0  # and so has COMPACT_SPACING
        h.replica._compact_beside()
        assert h.replica._compacting.task is not None
        await h.replica._compacting.task

    asyncio.run(go())


async def test_an_idle_shipper_wakes_when_a_compaction_window_closes(tmp_path: Path) -> None:
    """Between objects the shipping loop waits for the backstop, or for the close of the next
    compaction window if that comes first (so a step starts in the writer's pause)."""
    r = Replica("dir", FileStorage(str(tmp_path / "r")), Spool(str(tmp_path / "s")), "app")
    r.set_levels(LEVELS)
    assert r.compactor is not None
    r.compactor.due.times = {time.time() + 2.0}
    wait = r._idle_wait(5.0)
    assert wait is not None and 1.0 < wait <= 2.0
    r.compactor.due.times = {time.time() + 9.0}
    assert r._idle_wait(5.0) == 5.0
    r.compactor.due.times = {time.time() - 1.0}  # due, but put off: no spinning
    assert r._idle_wait(5.0) == 5.0
    r._compact_after = time.monotonic() + 1.5  # spaced after the last step: until it ends
    wait = r._idle_wait(5.0)
    assert wait is not None and 1.0 < wait <= 1.5
    r._compact_after = time.monotonic() + 9.0
    assert r._idle_wait(5.0) == 5.0
    r.quiet = True  # parked: no backstop, only the spacing's end or a wake-up
    wait = r._idle_wait(5.0)
    assert wait is not None and 8.0 < wait <= 9.0
    r._compact_after = 0.0
    assert r._idle_wait(5.0) is None
    # a step put off for a busy capture: looked at again when the deferral ends, even if
    # nothing wakes the loop (the capture's pause may not)
    r._busy.limit = 3.0
    assert r._busy.defers(True)
    wait = r._idle_wait(5.0)
    assert wait is not None and 2.5 < wait <= 3.0
    r.quiet = False
    wait = r._idle_wait(60.0)
    assert wait is not None and 2.5 < wait <= 3.0
    r._busy.done()
    r._bulk.limit = 10.0
    assert r._bulk.defers(True)
    wait = r._idle_wait(60.0)
    assert wait is not None and 9.5 < wait <= 10.0
    assert not r._bulk.defers(False)  # the capture calmed down: no deferral left to wait for
    assert r._idle_wait(60.0) == 60.0


async def test_the_newest_windows_are_merged_soon_after_the_writer_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window that closes while the steps are spaced out (COMPACT_DUTY) is merged once the
    spacing ends, without another commit or the backstop: what a restore of the newest state
    reads stays small when the writer stops (or the host dies) right after a burst."""
    import replicator.replica

    monkeypatch.setattr(replicator.replica, "COMPACT_DUTY", 0.01)  # steps spaced ~100x
    async with rig(tmp_path) as r:
        stop = asyncio.Event()
        loop = asyncio.create_task(r.replica.run(stop, backstop=3600.0))
        rnd = random.Random(3)
        r.db.step()
        started_ms = time.time() * 1000
        end = time.monotonic() + 1.5
        seq = 0
        while time.monotonic() < end:
            seq += 1
            commit(r.conn, seq, rnd)
            r.db.step()
            r.replica.wake.set()
            await asyncio.sleep(0.005)
        stopped_ms = time.time() * 1000

        async def tail() -> list[ObjectInfo]:
            return [o for o in await all_objects(r.dest)
                    if o.kind == "wal" and o.last_ms >= started_ms]

        # every window of the last level the burst touched, merged to one object (or two,
        # where a segment straddles a boundary)
        windows = int(stopped_ms // (LEVELS[-1] * 1000)) - int(started_ms // (LEVELS[-1] * 1000))
        for _ in range(200):  # up to 40 s: the spacing is at most COMPACT_SPACING
            left = await tail()
            if len(left) <= 2 * (windows + 1):
                break
            await asyncio.sleep(0.2)
        stop.set()
        await loop
        assert seq > 50
        assert len(left) <= 2 * (windows + 1), (len(left), seq)
        _, seqs = await restore_at(r.dest, tmp_path / "out.db")
        assert seqs == list(range(1, seq + 1))


def test_a_merge_is_compressed_only_when_its_segments_were(history: History,
                                                           tmp_path: Path) -> None:
    """The capture stores a flat-out writer's frames as they are (its compression budget);
    a merge of such segments is stored too, one of compressed segments is compressed, and both
    read back as the same frames."""
    segs = [o for o in objects(history) if o.kind == "wal"][:40]
    sources = [history.dest._path(o.key) for o in segs]
    keys = [o.key for o in segs]
    stored = []
    for src, key in zip(sources, keys, strict=True):
        out = tmp_path / f"{len(stored)}.seg"
        dec = ObjectDecoder(key)
        with open(src, "rb") as f, open(out, "wb") as g:
            body = dec.feed(f.read())
            dec.finish()
            assert dec.header is not None
            w = ObjectWriter(g, KIND_WAL, dec.header, None)
            w.write(body)
            w.close()
        stored.append(str(out))
    frames = sum(_header(history, o).frames for o in segs)
    body_size = frames * (24 + 4096)

    def merge(paths: list[str], name: str) -> tuple[Path, int]:
        work = tmp_path / name
        work.mkdir()
        [(a, b, path, size)] = write_pieces(segs, list(zip(segs, paths, strict=True)),
                                            str(work), [])
        assert (a, b) == (0, len(segs))
        return Path(path), size

    packed_path, packed = merge(sources, "packed")
    raw_path, raw = merge(stored, "raw")
    assert packed < body_size * COMPRESSED_BELOW <= body_size < raw
    bodies = []
    for path in (packed_path, raw_path):
        dec = ObjectDecoder("merged")
        bodies.append(dec.feed(path.read_bytes()))
        dec.finish()
    assert bodies[0] == bodies[1] and len(bodies[0]) == body_size


def test_compaction_takes_at_most_its_share_of_the_time(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a compaction step that took d seconds the next starts (1 / COMPACT_DUTY - 1) * d
    later at the earliest, even with a window due, but never later than COMPACT_SPACING (or a
    first-level window, if longer) after it (a slow step must not space the next ones ever
    further apart)."""
    import replicator.replica

    h = history
    spacing = LEVELS[0] * 2
    monkeypatch.setattr(replicator.replica, "COMPACT_SPACING", spacing)

    async def go() -> None:
        h.replica._compact_beside()
        first = h.replica._compacting.task
        assert first is not None
        await first
        assert h.replica._compact_after > time.monotonic()
        assert h.replica.compactor is not None
        h.replica.compactor.due.at(0.0)
        h.replica._compact_beside()
        assert h.replica._compacting.task is None  # none started (the first one was let go)
        h.replica._compact_after = 0.0
        h.replica._compact_beside()
        assert h.replica._compacting.task not in (None, first)
        await h.replica._compacting.task

        async def slow_step(self: replicator.replica.Replica) -> None:
            await asyncio.sleep(LEVELS[0] * 4)  # uncapped, the next would wait 36 windows

        # a step that takes long
        monkeypatch.setattr(replicator.replica.Replica, "compact_if_due", slow_step)
        for cap, levels in ((spacing, LEVELS), (LEVELS[0] * 3, (LEVELS[0] * 3, *LEVELS[1:]))):
            h.replica.compactor.levels = levels
            h.replica._compact_after = 0.0
            h.replica.compactor.due.at(0.0)
            h.replica._compact_beside()
            await h.replica._compacting.task
            left = h.replica._compact_after - time.monotonic()
            assert cap * 0.5 < left <= cap  # the cap: COMPACT_SPACING, or a longer level

    asyncio.run(go())


class CountedReads:
    """A remote-like destination (objects in memory, nothing to link) that counts the objects
    read back from it."""

    def __init__(self) -> None:
        from replicator.storage.memory import MemoryStorage

        self.inner = MemoryStorage()
        self.url = self.inner.url
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        self.reads.append(info.key)
        return self.inner.read_object(info)


async def copy_all(src: StorageClient, dst: CountedReads) -> None:
    for o in await all_objects(src):
        await dst.inner.write_object(o, src.read_object(o))


def test_a_merge_cuts_before_a_resumed_segment_and_opens_each_file_once(
        history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose fifth segment was the first after a restart is merged in two pieces, cut
    before it; each source file is opened once (its header read once), or twice when there are
    more than ``KEEP_OPEN`` of them, and both ways write the same bytes: the concatenation of
    the sources' bodies."""
    segs = [o for o in objects(history) if o.kind == "wal"][:10]
    files = []
    bodies = []
    for i, o in enumerate(segs):
        dec = ObjectDecoder(o.key)
        with open(history.dest._path(o.key), "rb") as f:
            body = dec.feed(f.read())
        dec.finish()
        assert dec.header is not None
        header = dict(dec.header)
        if i == 4:
            header["unobserved_from_ns"] = 1
            header["unobserved_to_ns"] = 2
        out = tmp_path / f"{i}.seg"
        with open(out, "wb") as g:
            w = ObjectWriter(g, KIND_WAL, header)
            w.write(body)
            w.close()
        files.append((o, str(out)))
        bodies.append(body)
    opened: list[str] = []
    real_open = open

    def counting_open(path: str, *args: object, **kwargs: object) -> object:
        opened.append(path)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(compact, "open", counting_open, raising=False)
    results = []
    for keep in (compact.KEEP_OPEN, 2):
        monkeypatch.setattr(compact, "KEEP_OPEN", keep)
        opened.clear()
        work = tmp_path / f"work{keep}"
        work.mkdir()
        temps: list[str] = []
        pieces = write_pieces(segs, files, str(work), temps)
        assert [(a, b) for a, b, _, _ in pieces] == [(0, 4), (4, 10)]
        assert sorted(temps) == sorted(p for _, _, p, _ in pieces)
        per_source = {path: opened.count(path) for _, path in files}
        assert set(per_source.values()) == ({1} if keep >= len(files) else {2})
        merged = []
        for a, b, path, size in pieces:
            data = Path(path).read_bytes()
            assert len(data) == size
            dec = ObjectDecoder("merged")
            merged.append(dec.feed(data))
            dec.finish()
            assert dec.header is not None
            header = SegmentHeader.from_json(dec.header, "merged")
            assert (header.start_txid, header.end_txid) == (segs[a].start_txid,
                                                            segs[b - 1].end_txid)
            assert (header.unobserved_from_ns is not None) == (a == 4)
        assert merged == [b"".join(bodies[:4]), b"".join(bodies[4:])]
        results.append([Path(p).read_bytes() for _, _, p, _ in pieces])
    assert results[0] == results[1]


def test_a_merge_reads_a_known_header_from_memory_and_still_checks_its_bytes(
        history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Headers the spool still holds in memory are not parsed again from the files (each file
    is read from its first bytes once, its header included, whatever its size against the
    first read), and the merge writes the same bytes either way; the header's bytes are still
    summed, so a damaged header of a known file fails the merge as a damaged body does, and a
    file of another kind is refused."""
    segs = [o for o in objects(history) if o.kind == "wal"][:4]
    files: list[tuple[ObjectInfo, str]] = []
    known: dict[str, SegmentHeader] = {}
    for o in segs:
        path = tmp_path / o.name
        shutil.copyfile(history.dest._path(o.key), path)
        files.append((o, str(path)))
        dec = ObjectDecoder(o.key)
        dec.feed(path.read_bytes())
        dec.finish()
        assert dec.header is not None
        known[o.key] = SegmentHeader.from_json(dec.header, o.key)
    parsed: list[str] = []
    real_parse = compact.parse_header

    def counting_parse(raw: bytes, key: str) -> dict[str, object]:
        parsed.append(key)
        return real_parse(raw, key)

    monkeypatch.setattr(compact, "parse_header", counting_parse)

    def merge(name: str, headers: dict[str, SegmentHeader] | None) -> bytes:
        work = tmp_path / name
        work.mkdir()
        temps: list[str] = []
        [(a, b, path, _)] = write_pieces(segs, files, str(work), temps, headers)
        assert (a, b) == (0, len(segs))
        return Path(path).read_bytes()

    cases = {}
    for head in (compact._HEAD, 16):  # 16 bytes: the header is read on past the first read
        monkeypatch.setattr(compact, "_HEAD", head)
        parsed.clear()
        cases[head, "known"] = merge(f"known{head}", known)
        assert parsed == []
        cases[head, "read"] = merge(f"read{head}", None)
        assert parsed == [o.key for o in segs]
    assert len(set(cases.values())) == 1
    dec = ObjectDecoder("merged")
    dec.feed(cases[compact._HEAD, "known"])
    dec.finish()

    # one byte of the third file's header changed: its checksum no longer matches
    victim = Path(files[2][1])
    data = bytearray(victim.read_bytes())
    at = data.index(b'"frames"') + 1
    data[at] ^= 0x20
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match=segs[2].name):
        merge("damaged", known)
    # the same file claiming to be a snapshot in its preamble
    data[at] ^= 0x20
    data[6:8] = (1).to_bytes(2, "big")
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptObjectError, match="not a WAL segment"):
        merge("snapshot", known)
    # nor does a body copied with its header known (a batch for a remote destination)
    with open(tmp_path / "sink", "wb") as sink:
        w = ObjectWriter(sink, KIND_WAL, {})
        with pytest.raises(CorruptObjectError, match="not a WAL segment"):
            compact.copy_body(w, str(victim), segs[2].key, header_read=True)


def test_a_remote_destination_merges_what_a_local_directory_holds_without_reading_it_back(
    history: History, tmp_path: Path
) -> None:
    """A remote destination holding the same objects as a local directory, both compacted step
    by step, compacts from the directory's files (its merges, on the same windows, carry the
    keys the remote's merges read): nothing is read back. What no local copy holds is read
    back. Either way the result restores every state exactly."""
    h = history
    start_s, end_s = min(h.times.values()) / 1e9, h.end_ns / 1e9
    shutil.copytree(h.dest.root, tmp_path / "lossy")
    lossy = FileStorage(str(tmp_path / "lossy"))

    async def go() -> None:
        # without a local copy: read back
        alone = CountedReads()
        await copy_all(h.dest, alone)
        res = await Compactor(alone, None, LEVELS, grace=0).step(now=end_s + 5)  # type: ignore[arg-type]
        assert res.merged > 0 and res.downloaded > 0 and alone.reads
        # step by step beside the directory (whose replaced objects wait out a grace period)
        remote = CountedReads()
        await copy_all(h.dest, remote)
        h.replica.set_levels(LEVELS, grace=3600)
        comp = Compactor(remote, None, LEVELS, grace=0, local=[h.dest])  # type: ignore[arg-type]
        levels: set[int] = set()
        for i in range(1, 13):
            now = start_s + (end_s + 5 * LEVELS[-1] - start_s) * i / 12
            assert (await h.replica.compact(now=now)) is not None
            res = await comp.step(now=now)
            levels |= set(res.levels)
            assert res.downloaded == 0
        assert levels == {0, 1, 2} and not remote.reads
        # a local copy that lost some objects: only what it lacks is read back
        gone = [o for o in await all_objects(lossy) if o.kind == "wal"][2:4]
        more = CountedReads()
        await copy_all(lossy, more)
        await lossy.delete_objects(gone)
        comp = Compactor(more, None, (LEVELS[-1] * 100,), grace=0,  # type: ignore[arg-type]
                         local=[lossy])
        res = await comp.step(now=end_s + 1000 * LEVELS[-1])
        assert res.merged > 0 and sorted(more.reads) == sorted(o.key for o in gone)
        for dest in (remote, more):
            await restores_exactly(dest, h, tmp_path, seed=3)  # type: ignore[arg-type]

    asyncio.run(go())


def test_local_sources_deleted_during_a_merge_are_read_from_the_files_it_opened(
        history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merge reads a local directory's files through descriptors it opened when it chose
    them: deleting every one of them before the merge reads its first byte (a pruning, another
    merge) changes nothing, and nothing is linked, copied or downloaded for them. A file gone
    before it could be opened is chosen again: its object is read back instead, and the local
    files of that merge are linked (kept for the download's time without descriptors held).
    Either way the result restores every state exactly."""
    h = history
    end_s = h.end_ns / 1e9
    shutil.copytree(h.dest.root, tmp_path / "local")
    local = FileStorage(str(tmp_path / "local"))
    real_pieces = compact.write_pieces
    real_links = compact.link_or_copy
    deleted: list[str] = []

    def delete_then_merge(run: list[ObjectInfo], files: list[tuple[ObjectInfo, str]],
                          *args: object) -> object:
        for _, path in files:
            if path.startswith(local.root):
                Path(path).unlink()
                deleted.append(path)
        return real_pieces(run, files, *args)  # type: ignore[arg-type]

    def no_links(src: str, dst: str) -> None:
        raise AssertionError(f"{src} linked into {dst}")

    async def go() -> None:
        monkeypatch.setattr(compact, "write_pieces", delete_then_merge)
        monkeypatch.setattr(compact, "link_or_copy", no_links)
        # every run opened, however many commits a window holds at this machine's speed
        monkeypatch.setattr(compact, "KEEP_OPEN", len(await all_objects(h.dest)))
        remote = CountedReads()
        await copy_all(h.dest, remote)
        comp = Compactor(remote, None, (LEVELS[0],), grace=0,  # type: ignore[arg-type]
                         local=[local])
        res = await comp.step(now=end_s + 5)
        assert res.merged > 0 and res.downloaded == 0 and not remote.reads and deleted
        await restores_exactly(remote, h, tmp_path, seed=4)  # type: ignore[arg-type]
        # gone before it was opened: the merge chooses again, and reads that one back
        monkeypatch.setattr(compact, "write_pieces", real_pieces)
        again = CountedReads()
        await copy_all(h.dest, again)
        shutil.rmtree(tmp_path / "local")
        shutil.copytree(h.dest.root, tmp_path / "local")
        real_choose = compact.choose_sources
        vanished: list[str] = []

        def choose_then_delete(run: list[ObjectInfo], where: list[tuple[ObjectInfo, str]]
                               ) -> object:
            chain = real_choose(run, where)
            if not vanished and chain is not None:
                o, path = chain[1]
                assert path is not None
                Path(path).unlink()
                vanished.append(o.key)
            return chain

        monkeypatch.setattr(compact, "choose_sources", choose_then_delete)
        links: list[str] = []

        def counted_links(src: str, dst: str) -> None:
            links.append(src)
            real_links(src, dst)

        monkeypatch.setattr(compact, "link_or_copy", counted_links)
        comp = Compactor(again, None, (LEVELS[0],), grace=0,  # type: ignore[arg-type]
                         local=[local])
        res = await comp.step(now=end_s + 5)
        assert res.merged > 0 and res.downloaded == 1 and again.reads == vanished
        assert links and all(link.startswith(local.root) for link in links)
        await restores_exactly(again, h, tmp_path, seed=4)  # type: ignore[arg-type]

    asyncio.run(go())


def test_merge_sources_prefer_local_copies_then_the_fewest_objects() -> None:
    from replicator.compact import choose_sources
    from replicator.pos import segment_info

    def seg(a: int, b: int) -> ObjectInfo:
        return segment_info("0" * 16, a, b, a, b)

    run = [seg(1, 3), seg(4, 6), seg(7, 9)]
    # nothing local: the run itself, to download
    assert choose_sources(run, []) == [(o, None) for o in run]
    # one merged local object covering it all beats three local pieces
    local = [(seg(1, 3), "a"), (seg(4, 6), "b"), (seg(7, 9), "c"), (seg(1, 9), "all")]
    assert choose_sources(run, local) == [(seg(1, 9), "all")]
    # local pieces that do not line up with the run's objects still tile it
    local = [(seg(1, 2), "a"), (seg(3, 7), "b"), (seg(8, 9), "c"), (seg(1, 12), "too long")]
    assert [p for _, p in choose_sources(run, local) or []] == ["a", "b", "c"]
    # a hole in the local copies: that one object is downloaded
    local = [(seg(1, 3), "a"), (seg(7, 9), "c")]
    assert choose_sources(run, local) == [(seg(1, 3), "a"), (seg(4, 6), None), (seg(7, 9), "c")]


def test_covered_segments_are_found_as_before() -> None:
    """The sweep finds exactly the segments another one contains (one of two alike stays)."""
    from replicator.compact import _covered
    from replicator.pos import segment_info

    rnd = random.Random(4)
    for _ in range(50):
        keyed = {}
        for _ in range(rnd.randrange(1, 40)):
            a = rnd.randrange(1, 60)
            b = a + rnd.randrange(0, 10)
            o = segment_info("0" * 16, a, b, a, b + rnd.randrange(2))
            keyed[o.key] = o  # a listing holds a key once
        segs = list(keyed.values())
        brute = {s.key for s in segs for o in segs
                 if o is not s and o.start_txid <= s.start_txid and s.end_txid <= o.end_txid
                 and (o.start_txid, -o.end_txid, o.key) < (s.start_txid, -s.end_txid, s.key)}
        assert {s.key for s in _covered(segs)} == brute


def test_batches_for_a_compacting_destination_stay_in_one_window(history: History) -> None:
    """Shipping batches consecutive segments, but not across a first-level window boundary:
    each batch lies in one window or is a single segment."""
    from replicator import batch

    pending = [o for g in history.spool.generations() for o in history.spool.objects(g)]
    width = int(LEVELS[0] * 1000)
    groups = batch.plan(history.spool, pending, LEVELS[0])
    assert len(groups) < len(pending)
    for parts, _ in groups:
        assert len(parts) == 1 or parts[0].first_ms // width == parts[-1].last_ms // width
    assert len(batch.plan(history.spool, pending)) < len(groups)


def test_compaction_does_not_wait_for_the_capture_workers(tmp_path: Path) -> None:
    """A database service compacts on a pool of its own: with every capture worker busy a
    compaction step still completes (and reads the local directory destination)."""
    import threading

    from replicator.runtime import Runtime

    app = tmp_path / "app.db"
    init_db(str(app))
    cfg = DbConfig(path=str(app), replicas=[ReplicaConfig("a", str(tmp_path / "a")),
                                            ReplicaConfig("b", str(tmp_path / "b"))],
                   compaction_levels=LEVELS)

    async def go() -> None:
        runtime = Runtime(workers=1)
        s = DatabaseService(cfg, runtime=runtime)
        await s.open()
        conn = sqlite3.connect(app, isolation_level=None)
        rnd = random.Random(2)
        release = threading.Event()
        try:
            for seq in range(1, 301):
                commit(conn, seq, rnd)
                if seq % 20 == 0:
                    await s.sync()
                    for r in s.replicas:
                        await r.sync()
            b = s.replicas[1]
            assert b.compactor is not None
            assert [c.root for c in b.compactor.local] == [str(tmp_path / "a"), str(tmp_path / "b")]
            busy = asyncio.ensure_future(runtime.call(release.wait))
            res = await asyncio.wait_for(b.compact(now=time.time() + 10 * LEVELS[-1]), 120)
            assert res is not None and res.merged > 0 and res.downloaded == 0
            assert not busy.done()  # the capture's worker was held all along
        finally:
            release.set()
            conn.close()
            await s.close(10)
            await runtime.aclose()

    asyncio.run(go())


def test_a_clean_shutdown_deletes_what_merges_replaced(history: History) -> None:
    """Replaced objects wait out their grace period while the replica runs; when it stops they
    are deleted rather than left for the next start."""
    h = history
    h.replica.set_levels(LEVELS, grace=3600)

    async def go() -> None:
        res = await h.replica.compact(now=h.end_ns / 1e9 + 10 * LEVELS[-1])
        assert res is not None and res.merged > 0 and res.replaced == 0
        assert h.replica.compactor is not None and h.replica.compactor.pending_deletes()
        stop = asyncio.Event()
        stop.set()
        await h.replica.run(stop)
        assert not h.replica.compactor.pending_deletes()

    asyncio.run(go())
    segs = [o for o in objects(h) if o.kind == "wal"]
    assert not [o for o in segs for p in segs
                if p is not o and p.start_txid <= o.start_txid and o.end_txid <= p.end_txid]


def test_large_segments_stay_apart_and_restores_stay_exact(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segments as large as merges need to make them are not rewritten at any level; the
    others merge around them, and every instant restores as before."""
    h = history
    segs = [o for o in objects(h) if o.kind == "wal"]
    large = sorted(o.size for o in segs)[len(segs) * 9 // 10]
    monkeypatch.setattr("replicator.compact.LARGE_BYTES", large)
    kept = {o.key for o in segs if o.size >= large}
    assert len(kept) >= len(segs) // 20
    res = asyncio.run(h.replica.compact(now=h.end_ns / 1e9 + 10 * LEVELS[-1]))
    assert res is not None and res.merged > 0
    after = [o for o in objects(h) if o.kind == "wal"]
    assert kept <= {o.key for o in after}, "every large segment is still there, as it was"
    merged = [o for o in after if o.key not in kept]
    assert not [o for o in merged for k in after if k.key in kept
                and o.start_txid <= k.start_txid and k.end_txid <= o.end_txid]
    assert len(after) < len(segs) // 2
    instants = sorted(random.Random(3).sample(sorted(h.times.values()), 12))
    for i, t in enumerate(instants):
        txid, seqs = asyncio.run(restore_at(h.dest, tmp_path / f"at{i}.db", to_time_ns=t))
        assert txid == expected_txid(h.times, t)
        assert seqs == list(range(1, txid + 1))


def test_a_damaged_local_copy_does_not_block_a_merge(history: History, tmp_path: Path) -> None:
    """A local directory whose copy of a segment is damaged: the remote destination's merge
    reads its own objects instead, and restores stay exact."""
    h = history
    shutil.copytree(h.dest.root, tmp_path / "damaged")
    damaged = FileStorage(str(tmp_path / "damaged"))
    gen = damaged.scan_generations()[0]
    seg = [o for o in damaged.scan_objects(gen) if o.kind == "wal"][5]
    path = Path(damaged.object_path(seg))
    data = bytearray(path.read_bytes())
    data[-12] ^= 0xFF  # a body byte (the trailer is the last 8)
    path.write_bytes(bytes(data))

    async def go() -> None:
        remote = CountedReads()
        await copy_all(h.dest, remote)
        comp = Compactor(remote, None, (LEVELS[-1] * 100,), grace=0,  # type: ignore[arg-type]
                         local=[damaged])
        res = await comp.step(now=h.end_ns / 1e9 + 1000 * LEVELS[-1])
        assert res.merged > 0 and res.downloaded > 0
        plan = await plan_restore(remote)  # type: ignore[arg-type]
        await apply_plan(remote, plan, str(tmp_path / "out.db"), force=True)  # type: ignore[arg-type]
        assert content(tmp_path / "out.db") == content(h.app)

    asyncio.run(go())


def test_a_first_level_window_is_due_once_it_holds_what_that_level_merges() -> None:
    """Only a first-level window holding EARLY_RUN segments wholly inside it (two when it is the
    only level) has anything to merge at that level; one holding fewer, or only segments
    crossing its edges, is not due at that level (the later levels' windows are), and windows
    that closed are forgotten."""
    from replicator.compact import DueTimes
    from replicator.pos import segment_info, snapshot_info

    assert EARLY_RUN > 2
    due = DueTimes((1.0, 10.0))
    due.times.clear()  # not the pass at start
    gen = "0" * 16
    due.shipped(segment_info(gen, 1, 1, 20_100, 20_200))
    assert due.times == {30.0}
    due.shipped(segment_info(gen, 2, 2, 20_900, 21_100))  # crosses the edge at 21 s
    due.shipped(snapshot_info(gen, 2, 21_150))  # not a segment: no window
    assert due.times == {30.0}
    for i in range(3, EARLY_RUN + 1):  # up to one short of EARLY_RUN inside [20 s, 21 s)
        due.shipped(segment_info(gen, i, i, 20_200 + 10 * i, 20_205 + 10 * i))
    assert due.times == {30.0}
    due.shipped(segment_info(gen, 10, 10, 20_300, 20_400))
    assert due.times == {21.0, 30.0}
    due.shipped(segment_info(gen, 11, 11, 20_500, 20_600))  # one more: nothing new
    assert due.times == {21.0, 30.0}
    assert due.take(21.5) and due.times == {30.0}
    due.shipped(segment_info(gen, 12, 12, 20_700, 20_800))  # late, after its window was taken
    assert due.times == {30.0}
    only = DueTimes((1.0,))
    only.times.clear()
    only.shipped(segment_info(gen, 1, 1, 21_600, 21_700))
    assert only.times == set()
    only.shipped(segment_info(gen, 2, 2, 21_800, 21_900))
    assert only.times == {22.0}


def test_merges_fall_at_a_point_of_their_own_after_a_window_closes() -> None:
    """A destination's merges fall ``phase`` × DUE_SPREAD of each level's interval after its
    window closes; a retry and the deletions after a merge stay relative to it."""
    from replicator.compact import DUE_SPREAD, DueTimes
    from replicator.pos import segment_info

    gen = "0" * 16
    due = DueTimes((1.0, 10.0), phase=0.5)
    due.times.clear()
    due.shipped(segment_info(gen, 1, 1, 20_100, 20_200))
    assert due.times == {30.0 + 0.5 * DUE_SPREAD * 10.0}
    for i in range(2, EARLY_RUN + 1):
        due.shipped(segment_info(gen, i, i, 20_200 + 10 * i, 20_205 + 10 * i))
    assert due.times == {21.0 + 0.5 * DUE_SPREAD * 1.0, 30.0 + 0.5 * DUE_SPREAD * 10.0}
    assert not due.take(21.0)  # the window closed, its merge is not due yet
    assert due.take(21.0 + 0.5 * DUE_SPREAD) and due.next() == 30.0 + 0.5 * DUE_SPREAD * 10.0
    # the first level still merges from the spool: pruning keeps two of its intervals
    assert DUE_SPREAD < 1.0


def test_each_database_merges_at_a_point_of_its_own(tmp_path: Path) -> None:
    """Every database's destinations merge at its own stable point after a window closes
    (windows close at once for all of them), spread evenly over many databases."""
    from replicator.compact import due_phase

    phases = [due_phase(str(tmp_path / f"t{i:05d}.db")) for i in range(2000)]
    assert all(0.0 <= p < 1.0 for p in phases)
    assert phases == [due_phase(str(tmp_path / f"t{i:05d}.db")) for i in range(2000)]
    tenths = [sum(1 for p in phases if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    assert min(tenths) > 100 and max(tenths) < 300, tenths
    services = [DatabaseService(DbConfig(path=str(tmp_path / name), replicas=[
        ReplicaConfig("local", str(tmp_path / "r" / name)),
        ReplicaConfig("second", str(tmp_path / "s" / name))])) for name in ("a.db", "b.db")]
    seen = []
    for svc in services:
        comps = [r.compactor for r in svc.replicas]
        assert all(c is not None for c in comps)
        got = {c.due.phase for c in comps if c is not None}
        assert got == {due_phase(svc.cfg.path)}
        seen += got
    assert seen[0] != seen[1]


def test_a_level_below_the_last_leaves_short_runs_to_the_next() -> None:
    """A window of a level below the last holding fewer than EARLY_RUN segments is left as it
    is: the next level's window merges them with the rest; the last level merges two."""
    from replicator.pos import segment_info

    gen = "0123456789abcdef"
    # windows of 100 ms: 2 segments in [1000, 1100), EARLY_RUN in [1100, 1200), 3 in [1200, 1300)
    times = [1010, 1020] + [1110 + 10 * i for i in range(EARLY_RUN)] + [1210, 1220, 1230]
    segs = [segment_info(gen, i + 1, i + 1, t, t + 5, 100) for i, t in enumerate(times)]
    first = plan_level(segs, 0.1, now_ms=1400, min_run=min_run(0, 2))
    assert [[o.start_txid for o in r] for r in first] == [list(range(3, 3 + EARLY_RUN))]
    last = plan_level(segs, 0.1, now_ms=1400, min_run=min_run(1, 2))
    assert [len(r) for r in last] == [2, EARLY_RUN, 3]
    # at the next level (1 s) the short runs and the merge of the full one are one window
    merged = segment_info(gen, 3, 2 + EARLY_RUN, 1110, 1110 + 10 * (EARLY_RUN - 1) + 5, 100)
    rest = [s for s in segs if not 3 <= s.start_txid <= 2 + EARLY_RUN]
    runs = plan_level([*rest, merged], 1.0, now_ms=2000, min_run=min_run(1, 2))
    assert [[o.start_txid for o in r] for r in runs] == [
        [1, 2, 3, *range(3 + EARLY_RUN, 6 + EARLY_RUN)]]


def test_steps_list_each_generation_once_then_follow_what_is_shipped() -> None:
    """The first step lists the destination's generations and goes through each; later ones
    list nothing: they plan from that listing, what was shipped and what they merged, and go
    only through the generations with a window still open (one a shipped object reached, a new
    one included, until a step after its windows closed). After a retention pass everything is
    listed again; a generation found empty is dropped. The destination's totals count every
    generation, as the destination holds them."""
    from replicator.pos import new_generation_id, segment_info, snapshot_info
    from replicator.storage.memory import MemoryStorage

    class Counted(MemoryStorage):
        def __init__(self) -> None:
            super().__init__()
            self.listed: list[str] = []
            self.gen_lists = 0

        async def generations(self) -> list[str]:
            self.gen_lists += 1
            return await super().generations()

        async def objects(self, generation: str) -> list[ObjectInfo]:
            self.listed.append(generation)
            return await super().objects(generation)

    async def one() -> AsyncIterator[bytes]:
        yield b"x"

    top = LEVELS[-1]

    async def go() -> None:
        dest = Counted()
        a, b, c = new_generation_id(), new_generation_id(), new_generation_id()
        await dest.write_object(snapshot_info(a, 0, 1), one())
        await dest.write_object(snapshot_info(c, 0, 1), one())
        comp = Compactor(dest, None, LEVELS, grace=0)
        res = await comp.step(now=100.0)
        assert dest.gen_lists == 1 and sorted(dest.listed) == sorted([a, c])
        assert res.objects == 2 and res.bytes == 2
        dest.listed.clear()
        res = await comp.step(now=101.0)
        assert dest.listed == [] and comp.settled(a) and comp.settled(c)
        assert res.objects == 2 and res.bytes == 2  # as the settled ones were left
        t = 1000 * top  # after the steps above; a shipment at t: its windows close at t + top
        ms = int(t * 1000)
        snap_b = snapshot_info(b, 0, ms)
        await dest.write_object(snap_b, one())
        comp.shipped(snap_b)
        seg = segment_info(a, 1, 1, ms + 1, ms + 1)
        await dest.write_object(seg, one())
        comp.shipped(seg)
        assert not comp.settled(a) and not comp.settled(b) and comp.settled(c)
        res = await comp.step(now=t + top + 0.1)
        assert dest.listed == [b]  # the new generation only
        assert res.objects == 4 == len(await all_objects(dest))
        dest.gen_lists -= 1  # that listing was the test's
        dest.listed.clear()
        res = await comp.step(now=t + top + 0.2)
        assert dest.listed == [] and comp.settled(a) and comp.settled(b)
        assert res.objects == 4
        # shipped after a step went through its windows (a backlog; after a hole: alone)
        late = segment_info(a, 3, 3, ms + 2, ms + 2)
        await dest.write_object(late, one())
        comp.shipped(late)
        assert not comp.settled(a)
        res = await comp.step(now=t + top + 0.21)
        assert dest.listed == [] and comp.settled(a) and res.objects == 5
        await dest.delete_objects([late])
        await dest.delete_generation(a)  # as a retention pass does
        comp.relist()
        later = int((t + top + 0.25) * 1000)
        seg_a2 = segment_info(a, 2, 2, later, later)
        comp.shipped(seg_a2)  # ... with a shipment in flight meanwhile
        res = await comp.step(now=t + top + 0.3)
        assert sorted(dest.listed) == sorted([a, b, c]) and res.objects == 2  # a is dropped
        dest.listed.clear()
        await comp.step(now=t + 3 * top)
        assert dest.gen_lists == 1 and dest.listed == []

    asyncio.run(go())


def test_a_directory_gives_the_segments_of_a_txid_range_by_their_names(tmp_path: Path) -> None:
    """What a merge may read from a local directory: exactly the segments inside the run's
    txids (as a full scan filtered would give), temp files and other kinds left out."""
    from replicator.pos import catchup_info, new_generation_id, segment_info, snapshot_info

    async def one() -> AsyncIterator[bytes]:
        yield b"x"

    async def go() -> None:
        store = FileStorage(str(tmp_path / "d"))
        await store.init()
        gen = new_generation_id()
        objs = [snapshot_info(gen, 5, 10), catchup_info(gen, 12, 1, 20)]
        objs += [segment_info(gen, a, b, 10 * a, 10 * b)
                 for a, b in ((1, 4), (5, 9), (10, 11), (13, 20), (6, 7), (21, 300), (301, 301))]
        for o in objs:
            await store.write_object(o, one())
        wal = tmp_path / "d" / "generations" / gen / "wal"
        (wal / "0000000000000005-0000000000000009-x.seg.tmp").write_bytes(b"x")
        everything = store.scan_objects(gen)
        for start, end in ((1, 301), (5, 11), (6, 8), (13, 299), (302, 400), (1, 1)):
            want = [o for o in everything
                    if o.kind == "wal" and start <= o.start_txid and o.end_txid <= end]
            assert store.scan_segments(gen, start, end) == want

    asyncio.run(go())
