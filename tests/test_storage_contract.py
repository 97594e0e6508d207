"""One contract for every storage backend: memory, file, and S3 (SeaweedFS and moto).

It covers the objects, the lease record beside them, and the fencing built on the lease. Each test
gets a fresh, empty destination. S3 backends use a 5 MiB part size, so the large
objects here go through multipart uploads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from util import closing_all

from replicator.errors import NotFoundError, StorageError
from replicator.headers import ObjectHeader, Reason, SegmentHeader, SnapshotHeader, Txn
from replicator.lease import DEFAULT_LEASE_TTL, Lease, LeaseError, LeaseLostError
from replicator.metrics import create_metrics
from replicator.pos import ObjectInfo, WalPos, new_generation_id, segment_info, snapshot_info
from replicator.replica import Replica
from replicator.spool import Spool
from replicator.storage import FileStorage, MemoryStorage, StorageClient
from replicator.storage.s3 import S3Storage

MIB = 1 << 20
PART = 5 * MIB

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("file", id="file"),
    pytest.param("seaweedfs", id="s3-seaweedfs", marks=pytest.mark.s3),
    pytest.param("moto", id="s3-moto", marks=pytest.mark.s3),
]

Factory = Callable[[str], StorageClient]


@pytest.fixture(params=BACKENDS)
async def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """``make(prefix)``: a client for location ``prefix`` of one fresh destination per test."""
    kind: str = request.param
    bucket: str | None = None
    if kind in ("seaweedfs", "moto"):
        factory = request.getfixturevalue("s3_url_factory")
        bucket = S3Storage.from_url(factory(kind, prefix="")).bucket

    def make(prefix: str = "replica") -> StorageClient:
        if kind == "memory":
            return MemoryStorage()
        if kind == "file":
            return FileStorage(str(tmp_path / "dest" / prefix))
        url = factory(kind, prefix=prefix, bucket=bucket, part_size=PART, max_retries=2)
        return S3Storage.from_url(url)

    async with closing_all(make) as tracked:
        yield tracked


@pytest.fixture
async def storage(make_storage: Factory) -> StorageClient:
    """An initialised client at prefix ``replica``."""
    client = make_storage("replica")
    await client.init()
    return client


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


async def chunks(data: bytes, size: int = MIB) -> AsyncIterator[bytes]:
    """Yield ``data`` in pieces of ``size`` bytes."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(storage: StorageClient, info: ObjectInfo) -> bytes:
    """Read a whole object."""
    return b"".join([chunk async for chunk in storage.read_object(info)])


async def write(storage: StorageClient, info: ObjectInfo, data: bytes) -> ObjectInfo:
    """Write ``data`` and return ``info`` with its size, as listings report it."""
    assert await storage.write_object(info, chunks(data)) == len(data)
    return dataclasses.replace(info, size=len(data))


class Boom(Exception):
    """Raised by a failing data stream."""


async def failing(data: bytes, chunk: int = MIB) -> AsyncIterator[bytes]:
    """Yield ``data`` then fail."""
    async for piece in chunks(data, chunk):
        yield piece
    raise Boom("the source failed")


@pytest.fixture
def gen() -> str:
    """A generation id."""
    return new_generation_id()


async def test_init_and_empty_listing(storage: StorageClient, gen: str) -> None:
    await storage.init()  # idempotent
    assert await storage.generations() == []
    assert await storage.objects(gen) == []
    assert isinstance(storage, StorageClient)
    assert storage.url


@pytest.mark.parametrize(
    "size",
    [0, 1000, PART, PART + 1, 4 * PART + 123],
    ids=["empty", "small", "one-part", "part-plus-one", "multipart"],
)
async def test_round_trip(storage: StorageClient, gen: str, size: int) -> None:
    info = snapshot_info(gen, 42, 1_700_000_000_000)
    data = payload(size, seed=size)
    expected = await write(storage, info, data)
    got = await read_all(storage, info)
    assert len(got) == size
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert await storage.objects(gen) == [expected]


@pytest.mark.parametrize("chunk", [1, 4096, 20 * MIB], ids=["byte", "4k", "one-chunk"])
async def test_write_any_chunking(storage: StorageClient, gen: str, chunk: int) -> None:
    size = 3000 if chunk == 1 else 2 * PART + 7
    data = payload(size, seed=chunk)
    info = segment_info(gen, 1, 9, 100, 200)
    assert await storage.write_object(info, chunks(data, chunk)) == size
    assert await read_all(storage, info) == data


async def test_listing_sorted_with_sizes(storage: StorageClient, gen: str) -> None:
    infos = [
        snapshot_info(gen, 0, 1000),
        segment_info(gen, 1, 5, 1001, 1005),
        segment_info(gen, 6, 10, 1006, 1010),
        snapshot_info(gen, 10, 1011),  # same end_txid as the segment: sorts after it
        segment_info(gen, 11, 11, 1012, 1012),
        segment_info(gen, 12, 0x1_0000_0000, 1013, 1020),  # hex keys must sort numerically
    ]
    order = list(range(len(infos)))
    random.Random(7).shuffle(order)
    written = {}
    for i in order:
        written[i] = await write(storage, infos[i], payload(10 + i, seed=i))
    listed = await storage.objects(gen)
    assert listed == [written[i] for i in range(len(infos))]
    assert [(o.end_txid, o.kind) for o in listed] == [
        (0, "snapshot"),
        (5, "wal"),
        (10, "wal"),
        (10, "snapshot"),
        (11, "wal"),
        (0x1_0000_0000, "wal"),
    ]
    assert [o.size for o in listed] == [10 + i for i in range(len(infos))]


async def test_generations_listing(storage: StorageClient) -> None:
    gens = [new_generation_id(now_ns=t * 1_000_000_000) for t in (1_700_000_300, 1_700_000_100)]
    gens.append(new_generation_id(now_ns=1_700_000_200 * 1_000_000_000))
    for i, g in enumerate(gens):
        await write(storage, snapshot_info(g, 0, 1), b"snap")
        await write(storage, segment_info(g, 1, 1 + i, 2, 3), b"wal")
    assert await storage.generations() == sorted(gens)
    for g in gens:
        assert {o.generation for o in await storage.objects(g)} == {g}
        assert len(await storage.objects(g)) == 2


async def test_read_missing_raises_not_found(storage: StorageClient, gen: str) -> None:
    info = segment_info(gen, 1, 2, 3, 4)
    with pytest.raises(NotFoundError) as excinfo:
        await read_all(storage, info)
    assert info.key in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    # missing next to a present object, and in an absent generation
    await write(storage, snapshot_info(gen, 0, 1), b"x")
    with pytest.raises(NotFoundError):
        await read_all(storage, info)
    with pytest.raises(NotFoundError):
        await read_all(storage, snapshot_info(new_generation_id(), 0, 1))


async def test_read_objects_reads_several_whole_in_order(storage: StorageClient,
                                                         gen: str) -> None:
    """Several small objects read together come back whole and in the order asked (not the
    order they were written or finish); one that is absent fails the call, naming it."""
    infos = [await write(storage, segment_info(gen, i, i, i, i), payload(1000 + 97 * i, seed=i))
             for i in range(1, 13)]
    order = infos[::-1][:6] + infos[:6]
    got = await storage.read_objects(order)
    assert got == [payload(1000 + 97 * o.start_txid, seed=o.start_txid) for o in order]
    assert await storage.read_objects([]) == []
    missing = segment_info(gen, 99, 99, 99, 99)
    with pytest.raises(NotFoundError) as excinfo:
        await storage.read_objects([infos[0], missing, infos[1]])
    assert missing.key in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert await storage.read_objects(infos[:2]) == [await read_all(storage, o)
                                                     for o in infos[:2]]


async def test_delete_objects(storage: StorageClient, gen: str) -> None:
    a = await write(storage, snapshot_info(gen, 0, 1), b"a")
    b = await write(storage, segment_info(gen, 1, 2, 3, 4), b"bb")
    c = await write(storage, segment_info(gen, 3, 4, 5, 6), b"ccc")
    absent = segment_info(gen, 5, 6, 7, 8)
    await storage.delete_objects([a, c, absent])
    assert await storage.objects(gen) == [b]
    await storage.delete_objects([])
    await storage.delete_objects([a, absent])  # deleting again is fine
    assert await storage.objects(gen) == [b]
    with pytest.raises(NotFoundError):
        await read_all(storage, a)
    assert await read_all(storage, b) == b"bb"


async def test_delete_generation(storage: StorageClient) -> None:
    g1, g2 = sorted(new_generation_id(now_ns=t * 10**9) for t in (1_700_000_000, 1_700_000_001))
    await write(storage, snapshot_info(g1, 0, 1), b"1")
    await write(storage, segment_info(g1, 1, 2, 3, 4), b"1")
    kept = await write(storage, snapshot_info(g2, 0, 1), b"2")
    await storage.delete_generation(g1)
    assert await storage.generations() == [g2]
    assert await storage.objects(g1) == []
    assert await storage.objects(g2) == [kept]
    await storage.delete_generation(g1)  # absent: ignored
    await storage.delete_generation(new_generation_id())


async def test_overwrite_same_key(storage: StorageClient, gen: str) -> None:
    info = snapshot_info(gen, 5, 1)
    await write(storage, info, payload(PART + 100, seed=1))
    second = await write(storage, info, b"short")
    assert await read_all(storage, info) == b"short"
    assert await storage.objects(gen) == [second]


@pytest.mark.parametrize("size", [1000, 2 * PART + 1], ids=["single-part", "multipart"])
async def test_failed_write_leaves_nothing(storage: StorageClient, gen: str, size: int) -> None:
    info = segment_info(gen, 1, 2, 3, 4)
    with pytest.raises(Boom):
        await storage.write_object(info, failing(payload(size)))
    assert await storage.objects(gen) == []
    with pytest.raises(NotFoundError):
        await read_all(storage, info)
    # a failed overwrite keeps the old object whole
    old = await write(storage, info, b"old contents")
    with pytest.raises(Boom):
        await storage.write_object(info, failing(payload(size)))
    assert await read_all(storage, info) == b"old contents"
    assert await storage.objects(gen) == [old]


async def test_prefixes_are_isolated(make_storage: Factory, gen: str) -> None:
    root, nested, sibling = make_storage(""), make_storage("a/b"), make_storage("a/c")
    info = snapshot_info(gen, 0, 1)
    for i, client in enumerate((root, nested, sibling)):
        await client.init()
        await write(client, info, f"contents {i}".encode())
    for i, client in enumerate((root, nested, sibling)):
        assert await read_all(client, info) == f"contents {i}".encode()
        assert await client.generations() == [gen]
        assert [o.size for o in await client.objects(gen)] == [10]
    await nested.delete_generation(gen)
    assert await nested.generations() == []
    assert await root.generations() == [gen]
    assert await sibling.generations() == [gen]


async def test_children_are_the_directories_below(make_storage: Factory, gen: str) -> None:
    top = make_storage("t")
    await top.init()
    assert await top.children() == []
    await write(top, snapshot_info(gen, 0, 1), b"x")
    await top.write_lease(b"lease")
    assert await top.children() == ["generations"]  # the lease is an object, not a directory
    assert await top.children("generations") == [gen]
    assert await top.children("generations/") == [gen]
    assert await top.children("no/such/place") == []
    if isinstance(top, MemoryStorage):
        return  # a client of its own for every prefix: nothing else is below it
    for sub in ("a.db", "g1/b.db", "g1/c.db", "g1/deeper/d.db"):
        client = make_storage(f"t/{sub}")
        await client.init()
        await write(client, snapshot_info(gen, 0, 1), b"y")
    assert await top.children() == ["a.db", "g1", "generations"]
    assert await top.children("g1") == ["b.db", "c.db", "deeper"]
    assert await top.children("g1/b.db") == ["generations"]
    assert await make_storage("t/g1").children() == ["b.db", "c.db", "deeper"]


async def test_concurrent_writes(storage: StorageClient, gen: str) -> None:
    infos = [segment_info(gen, i, i, i, i) for i in range(1, 21)]
    await asyncio.gather(
        *(write(storage, info, payload(100, seed=i)) for i, info in enumerate(infos))
    )
    assert [o.size for o in await storage.objects(gen)] == [100] * 20


# -- the lease record: one well-known key beside generations/ -----------------------------------


async def test_lease_round_trip(storage: StorageClient, gen: str) -> None:
    assert await storage.read_lease() is None
    await storage.write_lease(b'{"owner": "a"}')
    assert await storage.read_lease() == b'{"owner": "a"}'
    await storage.write_lease(b'{"owner": "b"}')  # replaced whole
    assert await storage.read_lease() == b'{"owner": "b"}'
    # it is not an object: listings and deletions of generations never see it
    assert await storage.generations() == []
    await write(storage, snapshot_info(gen, 0, 1), b"x")
    assert await storage.generations() == [gen]
    await storage.delete_generation(gen)
    assert await storage.generations() == []
    assert await storage.read_lease() == b'{"owner": "b"}'


async def test_lease_per_prefix(make_storage: Factory) -> None:
    root, nested, sibling = make_storage(""), make_storage("a/b"), make_storage("a/c")
    for client in (root, nested, sibling):
        await client.init()
    await nested.write_lease(b"nested")
    assert await root.read_lease() is None
    assert await sibling.read_lease() is None
    await root.write_lease(b"root")
    assert await nested.read_lease() == b"nested"
    assert await root.read_lease() == b"root"


# -- fencing policy (replicator.lease, replicator.replica) on every backend ---------------------


class Clock:
    """A settable wall clock."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def lease_for(storage: StorageClient, clock: Clock, host: str, db: str, **kw: object) -> Lease:
    return Lease(storage, db, clock=clock, hostname=host, pid=4242, **kw)  # type: ignore[arg-type]


async def test_lease_claim_refuse_expire_release(storage: StorageClient) -> None:
    clock = Clock()
    a = lease_for(storage, clock, "host-a", "/data/a.db")
    b = lease_for(storage, clock, "host-b", "/data/b.db")
    await a.claim()
    rec = await a.read()
    assert rec is not None and rec.owner == a.owner and not rec.released
    assert (rec.hostname, rec.pid, rec.db) == ("host-a", 4242, "/data/a.db")
    with pytest.raises(LeaseError) as ei:
        await b.claim()
    msg = str(ei.value)
    assert "replica path in use by host host-a pid 4242 db /data/a.db" in msg
    assert "\n" not in msg
    assert not b.held
    # a lease not renewed for the TTL is free
    clock.now += DEFAULT_LEASE_TTL + 1
    await b.claim()
    assert b.held
    # a: taken over, at its next verification
    with pytest.raises(LeaseLostError, match="replica taken over by host host-b pid 4242"):
        await a.renew()
    assert not a.held
    # a clean release frees it at once
    await b.release()
    rec = await b.read()
    assert rec is not None and rec.released
    c = lease_for(storage, clock, "host-c", "/data/c.db")
    await c.claim()
    assert c.held
    await c.release()


async def test_lease_of_a_dead_process_on_this_host_is_free(storage: StorageClient) -> None:
    clock = Clock()
    # a pid that is not running (a kill -9 before a restart)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    gone = Lease(storage, "/d.db", clock=clock, hostname="here", pid=proc.pid)
    await gone.claim()
    gone.forget()  # the process died holding it
    again = Lease(storage, "/d.db", clock=clock, hostname="here", pid=os.getpid())
    await again.claim()
    # a live process on this host keeps it
    other = Lease(storage, "/d.db", clock=clock, hostname="here", pid=os.getppid())
    with pytest.raises(LeaseError, match=f"in use by host here pid {os.getpid()} db /d.db"):
        await other.claim()
    await again.release()


async def test_lease_of_unknown_version_is_not_overwritten(storage: StorageClient) -> None:
    await storage.write_lease(b'{"version": 99, "owner": "future"}')
    lease = lease_for(storage, Clock(), "host-a", "/a.db")
    with pytest.raises(LeaseError, match="unknown version 99"):
        await lease.claim()
    assert await storage.read_lease() == b'{"version": 99, "owner": "future"}'
    await storage.write_lease(b"not json")  # garbage is treated as no lease
    await lease.claim()
    assert lease.held


def spool_object(spool: Spool, info: ObjectInfo) -> ObjectInfo:
    """A spooled object with a valid header (the body is not what it describes: these tests
    ship objects, they do not restore them)."""
    pos = WalPos(1, 2, info.end_txid, (3, 4))
    header: ObjectHeader
    if info.kind == "snapshot":
        header = SnapshotHeader(info.generation, info.end_txid, info.last_ms * 1_000_000, 4096,
                                1, False, pos, Reason.INTERVAL)
    else:
        start = WalPos(1, 2, info.start_txid, (3, 4))
        txns = tuple(Txn(t, info.last_ms * 1_000_000, 1, 1)
                     for t in range(info.start_txid, info.end_txid + 1))
        header = SegmentHeader(info.generation, info.start_txid, info.end_txid, 4096, False,
                               start, start, pos, None, len(txns), txns)
    return spool.write(info, header, [payload(100, seed=info.end_txid)])


async def test_replica_fenced_when_taken_over(storage: StorageClient, tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"))
    gen = new_generation_id()
    now_ms = int(time.time() * 1000)
    spool_object(spool, snapshot_info(gen, 0, now_ms))
    metrics = create_metrics()
    r = Replica("dest", storage, spool, "/data/a.db", metrics)
    await r.init()
    assert await r.sync() == 1
    reads = 0
    real_read = storage.read_lease

    async def counting_read() -> bytes | None:
        nonlocal reads
        reads += 1
        return await real_read()

    storage.read_lease = counting_read  # type: ignore[method-assign]
    # idle (nothing to ship), even with the lease due: no lease requests
    r.lease.renew_interval = 0
    assert await r.sync() == 0
    assert reads == 0
    # another process takes the path over (say, after our lease expired)
    thief = Lease(storage, "/data/b.db", hostname="elsewhere", pid=7,
                  clock=lambda: time.time() + DEFAULT_LEASE_TTL + 1)
    await thief.claim()
    seg = spool_object(spool, segment_info(gen, 1, 3, now_ms + 1, now_ms + 2))
    assert await r.sync() == 0
    assert r.fenced is not None and "replica taken over by host elsewhere pid 7" in r.fenced
    assert not r.healthy
    labels = {"db": "/data/a.db", "replica": "dest"}
    assert metrics.registry.get_sample_value(
        "replicator_errors_total", {**labels, "operation": "lease"}) == 1
    assert metrics.registry.get_sample_value("replicator_replica_up", labels) == 0
    # the segment stays in the spool and never reaches the destination
    assert seg.key in {o.key for o in spool.objects(gen)}
    assert seg.key not in {o.key for o in await storage.objects(gen)}
    assert await r.sync() == 0
    stop = asyncio.Event()
    await asyncio.wait_for(r.run(stop, backstop=0.01), 10)  # returns: fenced for good
    rec = await thief.read()
    await r.aclose()  # does not release someone else's lease
    assert await thief.read() == rec
    await thief.release()


async def test_replica_releases_lease_on_close(make_storage: Factory, tmp_path: Path) -> None:
    storage = make_storage("replica")
    await storage.init()
    spool = Spool(str(tmp_path / "spool"))
    spool_object(spool, snapshot_info(new_generation_id(), 0, int(time.time() * 1000)))
    first = Replica("dest", storage, spool, "/data/a.db")
    await first.init()
    await first.sync()
    # a second client of the same destination (memory destinations are not shared by clients)
    other = storage if isinstance(storage, MemoryStorage) else make_storage("replica")
    second = Replica("dest", other, spool, "/data/b.db")
    with pytest.raises(LeaseError, match="replica path in use by host .* db /data/a.db"):
        await second.init()
    await first.aclose()
    rec = await second.lease.read()
    assert rec is not None and rec.released
    await second.init()  # free now
    assert second.healthy
    await second.aclose()


async def test_replica_closed_while_down_frees_its_lease_in_this_process(
    storage: StorageClient, tmp_path: Path
) -> None:
    """A replica closed while its destination fails leaves its lease record unreleased (it
    cannot write it); a replica opened again in the same process for the same database (a
    tenant's file removed and created again) takes it over at once, not after the TTL. Another
    live process still may not."""
    spool = Spool(str(tmp_path / "spool"))
    spool_object(spool, snapshot_info(new_generation_id(), 0, int(time.time() * 1000)))
    first = Replica("dest", storage, spool, "/data/a.db")
    await first.init()
    assert await first.sync() == 1
    first.record_error("sync", OSError("connection refused"))  # the destination went down
    assert not first.healthy
    rec = await storage.read_lease()
    await first.aclose()
    assert await storage.read_lease() == rec  # not released: nothing was written
    again = Replica("dest", storage, spool, "/data/a.db")
    await again.init()
    assert again.healthy and again.lease.held
    other = Lease(storage, "/data/a.db", hostname=again.lease.hostname, pid=os.getppid())
    with pytest.raises(LeaseError, match="replica path in use"):
        await other.claim()
    await again.aclose()


@pytest.mark.parametrize("link_error", [None, errno.EXDEV, errno.EPERM])
async def test_file_replica_links_spooled_objects_or_copies_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link_error: int | None
) -> None:
    """On the spool's file system a file replica hard-links each spooled object (the same bytes
    are not written twice); where linking is refused it copies. Either way the replica holds
    exactly the spooled bytes, and removing the spool's copy leaves the replica's intact."""
    spool = Spool(str(tmp_path / "spool"))
    gen = new_generation_id()
    now_ms = int(time.time() * 1000)
    infos = [spool_object(spool, snapshot_info(gen, 0, now_ms)),
             spool_object(spool, segment_info(gen, 1, 3, now_ms + 1, now_ms + 2))]
    if link_error is not None:
        def refuse(src: str, dst: str) -> None:
            raise OSError(link_error, os.strerror(link_error))

        monkeypatch.setattr(os, "link", refuse)
    storage = FileStorage(str(tmp_path / "replica"))
    r = Replica("dest", storage, spool, "/data/a.db", create_metrics())
    await r.init()
    assert await r.sync() == 2
    spooled = [check_replica_file(spool, tmp_path / "replica", i, link_error is None)
               for i in infos]
    spool.delete(infos)
    assert [await read_all(storage, i) for i in infos] == spooled
    await r.aclose()


def check_replica_file(spool: Spool, root: Path, info: ObjectInfo, linked: bool) -> bytes:
    src, dst = Path(spool.path(info)), root / info.key
    assert dst.read_bytes() == src.read_bytes()
    assert os.path.samefile(src, dst) is linked
    assert not list(root.rglob("*.tmp"))
    return src.read_bytes()


def test_file_link_over_an_existing_object_replaces_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link where the object is already (shipped again after a restart) replaces it through
    a temp name renamed over it; when that fails, the object there stays as it was and no temp
    file is left. A new object is linked at its own name (no temp name, no rename)."""
    spool = Spool(str(tmp_path / "spool"))
    info = spool_object(spool, snapshot_info(new_generation_id(), 0, int(time.time() * 1000)))
    storage = FileStorage(str(tmp_path / "replica"))
    asyncio.run(storage.init())
    renames: list[str] = []
    real_replace = os.replace

    def counted_replace(src: str, dst: str) -> None:
        renames.append(dst)
        real_replace(src, dst)

    def link(source: str) -> int | None:
        return asyncio.run(storage.link_object(info, source))

    monkeypatch.setattr(os, "replace", counted_replace)
    assert link(spool.path(info)) == info.size
    dst = tmp_path / "replica" / info.key
    assert os.path.samefile(spool.path(info), dst) and renames == []
    other = tmp_path / "other"
    other.write_bytes(Path(spool.path(info)).read_bytes())
    assert link(str(other)) == info.size
    assert os.path.samefile(other, dst) and renames == [str(dst)]
    again = tmp_path / "again"
    again.write_bytes(b"x")

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StorageError, match="no space left on device"):
        link(str(again))
    assert os.path.samefile(other, dst)
    assert not list((tmp_path / "replica").rglob("*.tmp"))


async def test_file_link_error_other_than_unsupported_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(str(tmp_path / "spool"))
    info = spool_object(spool, snapshot_info(new_generation_id(), 0, int(time.time() * 1000)))

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "link", full)
    storage = FileStorage(str(tmp_path / "replica"))
    with pytest.raises(StorageError, match=f"{info.key}: no space left on device"):
        await storage.link_object(info, spool.path(info))
