"""One contract for every storage backend: memory, file, and S3 (SeaweedFS and moto).

Each test gets a fresh, empty destination. S3 backends use a 5 MiB part size, so the large
objects here go through multipart uploads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from replicator.errors import NotFoundError
from replicator.pos import ObjectInfo, new_generation_id, segment_info, snapshot_info
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
    opened: list[StorageClient] = []
    bucket: str | None = None
    if kind in ("seaweedfs", "moto"):
        factory = request.getfixturevalue("s3_url_factory")
        bucket = S3Storage.from_url(factory(kind, prefix="")).bucket

    def make(prefix: str = "replica") -> StorageClient:
        client: StorageClient
        if kind == "memory":
            client = MemoryStorage()
        elif kind == "file":
            client = FileStorage(str(tmp_path / "dest" / prefix))
        else:
            url = factory(kind, prefix=prefix, bucket=bucket, part_size=PART, max_retries=2)
            client = S3Storage.from_url(url)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.aclose()


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


async def test_concurrent_writes(storage: StorageClient, gen: str) -> None:
    infos = [segment_info(gen, i, i, i, i) for i in range(1, 21)]
    await asyncio.gather(
        *(write(storage, info, payload(100, seed=i)) for i, info in enumerate(infos))
    )
    assert [o.size for o in await storage.objects(gen)] == [100] * 20
