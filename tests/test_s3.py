"""S3-specific behaviour: URL parsing, key layout, storage options, credentials and failure
handling (through a fault-injecting proxy), and the memory bound of multipart uploads.

The shared behaviour of every backend is in test_storage_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from faultproxy import Fault, FaultProxy
from s3fixtures import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, S3Server
from util import closing_all, free_port

from replicator.errors import ConfigError, NotFoundError, StorageError
from replicator.pos import ObjectInfo, new_generation_id, segment_info, snapshot_info
from replicator.storage import open_storage
from replicator.storage.s3 import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PART_SIZE,
    DEFAULT_REQUEST_ATTEMPTS,
    URL_PARAMS,
    S3Options,
    S3Storage,
    parse_s3_url,
)
from replicator.storage.s3_options import STORAGE_CLASSES

MIB = 1 << 20
PART = 5 * MIB
KNOWN = ", ".join(URL_PARAMS)


# -- helpers ------------------------------------------------------------------------------------


async def chunks(data: bytes, size: int = MIB) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def read_all(storage: S3Storage, info: ObjectInfo) -> bytes:
    return b"".join([c async for c in storage.read_object(info)])


@pytest.fixture
def weed_bucket(s3_url_factory: Callable[..., str]) -> str:
    """A fresh bucket on SeaweedFS."""
    return S3Storage.from_url(s3_url_factory("seaweedfs")).bucket


@pytest.fixture
async def open_s3(s3_env: dict[str, str]) -> AsyncIterator[Callable[..., S3Storage]]:
    """``open_s3(server, bucket, prefix="replica", endpoint=None, **kwargs)``, closed afterwards."""

    def make(server: S3Server, bucket: str, prefix: str = "replica",
             endpoint: str | None = None, **kwargs: Any) -> S3Storage:
        return S3Storage(S3Options(bucket, prefix, endpoint=endpoint or server.endpoint,
                                   region=TEST_REGION, force_path_style=True, **kwargs))

    async with closing_all(make) as tracked:
        yield tracked


@pytest.fixture
def proxy(seaweedfs_server: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of SeaweedFS."""
    with FaultProxy((seaweedfs_server.host, seaweedfs_server.port)) as p:
        yield p


# Retry settings that make fault tests quick: no botocore retries, short backoff.
FAST = {"request_attempts": 1, "backoff_base": 0.01, "backoff_max": 0.05}


# -- URL parsing --------------------------------------------------------------------------------


def test_from_url_with_every_parameter() -> None:
    s = parse_s3_url(
        "s3://my-bucket/some/prefix/?endpoint=http://127.0.0.1:8333&region=eu-west-1"
        "&force_path_style=true&storage_class=STANDARD_IA&sse=aws:kms"
        "&sse_kms_key_id=arn:aws:kms:eu-west-1:111122223333:key/abc&part_size=16MiB"
        "&max_retries=3&request_attempts=2&retry_mode=adaptive&retry_timeout=30"
        "&connect_timeout=2&read_timeout=10.5"
    )
    assert (s.bucket, s.prefix, s.url) == ("my-bucket", "some/prefix", "s3://my-bucket/some/prefix")
    assert s.endpoint == "http://127.0.0.1:8333"
    assert s.region == "eu-west-1"
    assert s.force_path_style is True
    assert (s.storage_class, s.sse) == ("STANDARD_IA", "aws:kms")
    assert s.sse_kms_key_id == "arn:aws:kms:eu-west-1:111122223333:key/abc"
    assert s.part_size == 16 * MIB
    assert (s.max_retries, s.request_attempts, s.retry_mode) == (3, 2, "adaptive")
    assert (s.retry_timeout, s.connect_timeout, s.read_timeout) == (30.0, 2.0, 10.5)


def test_from_url_defaults() -> None:
    s = parse_s3_url("s3://bucket")
    assert (s.bucket, s.prefix, s.url) == ("bucket", "", "s3://bucket")
    assert s.endpoint is None and s.region is None and s.force_path_style is False
    assert s.storage_class is None and s.sse is None and s.sse_kms_key_id is None
    assert s.part_size == DEFAULT_PART_SIZE
    assert s.max_retries == DEFAULT_MAX_RETRIES
    assert s.request_attempts == DEFAULT_REQUEST_ATTEMPTS
    assert S3Storage.from_url("s3://bucket/").url == "s3://bucket"
    assert S3Storage.from_url("s3://bucket/a%20b").prefix == "a b"
    assert S3Storage.from_url("s3://bucket/p?part_size=5242880").part_size == PART
    assert parse_s3_url("s3://bucket/p?force_path_style=0").force_path_style is False


def test_part_size_uses_the_project_size_units() -> None:
    """One size parser everywhere: MB is 10**6 bytes, MiB 2**20, in a URL as in YAML."""
    from replicator.units import parse_size

    for text, size in (("8MB", 8_000_000), ("8MiB", 8 * MIB), ("8mb", 8_000_000),
                       ("6000kB", 6_000_000), ("1GiB", 1 << 30), ("5242880", 5 * MIB)):
        assert parse_s3_url(f"s3://bkt/p?part_size={text}").part_size == size
        assert parse_size(text, "x") == size
    with pytest.raises(ConfigError, match=r"invalid part_size 5000000 \(must be between"):
        parse_s3_url("s3://bkt/p?part_size=5MB")  # 5 MB is less than S3's 5 MiB minimum


def test_options_round_trip_through_their_url() -> None:
    opts = S3Options("bkt", "/a/b/", region="eu-west-1", endpoint="http://127.0.0.1:9000",
                     force_path_style=True, part_size=16 * MIB, retry_timeout=30)
    assert opts.to_url() == (
        "s3://bkt/a/b?endpoint=http://127.0.0.1:9000&region=eu-west-1&force_path_style=true"
        "&part_size=16777216&retry_timeout=30.0"
    )
    assert parse_s3_url(opts.to_url()) == opts
    assert S3Options("bkt").to_url() == "s3://bkt"


def test_open_storage_dispatches_s3() -> None:
    s = open_storage("s3://bucket/p?region=us-east-1")
    assert isinstance(s, S3Storage)
    assert s.url == "s3://bucket/p"


BAD_URLS = [
    ("s3://", "s3://: missing bucket name (expected s3://bucket/prefix)"),
    ("s3:///p", "s3:///p: missing bucket name (expected s3://bucket/prefix)"),
    ("gs://bkt/p", "gs://bkt/p: not an s3:// URL"),
    ("s3://bkt/p?foo=1", f"s3://bkt/p: unknown parameter 'foo' (known: {KNOWN})"),
    (
        "s3://bkt/p?region",
        "s3://bkt/p: malformed query string (expected name=value pairs joined by &)",
    ),
    ("s3://bkt/p?region=a&region=b", "s3://bkt/p: parameter 'region' given twice"),
    ("s3://bkt:9000/p", "s3://bkt:9000/p: a bucket name has no port (use ?endpoint=host:port)"),
    ("s3://bkt/p#x", "s3://bkt/p: unexpected fragment '#x'"),
    (
        "s3://b/p",
        "s3://b: invalid bucket name 'b' (3-63 letters, digits, dots, hyphens or underscores)",
    ),
    (
        "s3://bad!bucket/p",
        "s3://bad!bucket: invalid bucket name 'bad!bucket' (3-63 letters, "
        "digits, dots, hyphens or underscores)",
    ),
    ("s3://bkt/a//b", "s3://bkt/a//b: invalid prefix 'a//b' (empty path segment)"),
    (
        "s3://bkt/p?part_size=abc",
        "s3://bkt/p: part_size: expected a size like 500MiB or 1GB, got 'abc'",
    ),
    (
        "s3://bkt/p?part_size=1MiB",
        "s3://bkt/p: invalid part_size 1048576 (must be between 5MiB and 5GiB)",
    ),
    (
        "s3://bkt/p?force_path_style=maybe",
        "s3://bkt/p: invalid force_path_style 'maybe' (expected true or false)",
    ),
    (
        "s3://bkt/p?storage_class=COLD",
        "s3://bkt/p: invalid storage_class 'COLD' (expected "
        f"one of {', '.join(STORAGE_CLASSES)})",
    ),
    (
        "s3://bkt/p?sse=rot13",
        "s3://bkt/p: invalid sse 'rot13' (expected one of AES256, aws:kms, aws:kms:dsse)",
    ),
    (
        "s3://bkt/p?sse=AES256&sse_kms_key_id=k",
        "s3://bkt/p: sse_kms_key_id requires sse=aws:kms or sse=aws:kms:dsse",
    ),
    ("s3://bkt/p?endpoint=", "s3://bkt/p: invalid endpoint '' (leave it out to use AWS)"),
    (
        "s3://bkt/p?endpoint=ftp://host",
        "s3://bkt/p: invalid endpoint 'ftp://host' (expected http://host:port or https://host)",
    ),
    (
        "s3://bkt/p?endpoint=http://host:port",
        "s3://bkt/p: invalid endpoint 'http://host:port' (bad port)",
    ),
    (
        "s3://bkt/p?endpoint=http://host/path",
        "s3://bkt/p: invalid endpoint "
        "'http://host/path' (expected http://host:port or https://host)",
    ),
    ("s3://bkt/p?region=", "s3://bkt/p: invalid region '' (leave it out to use the default)"),
    ("s3://bkt/p?max_retries=x", "s3://bkt/p: invalid max_retries 'x' (expected an integer)"),
    ("s3://bkt/p?max_retries=-1", "s3://bkt/p: invalid max_retries -1 (must be 0-100)"),
    ("s3://bkt/p?request_attempts=0", "s3://bkt/p: invalid request_attempts 0 (must be 1-20)"),
    (
        "s3://bkt/p?retry_mode=legacy",
        "s3://bkt/p: invalid retry_mode 'legacy' (expected standard or adaptive)",
    ),
    (
        "s3://bkt/p?read_timeout=soon",
        "s3://bkt/p: invalid read_timeout 'soon' (expected seconds)",
    ),
    (
        "s3://bkt/p?connect_timeout=0",
        "s3://bkt/p: invalid connect_timeout 0.0 (must be positive)",
    ),
]


@pytest.mark.parametrize(("url", "message"), BAD_URLS, ids=[u for u, _ in BAD_URLS])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        S3Storage.from_url(url)
    assert str(excinfo.value) == message


def test_credentials_in_urls_are_rejected_without_echo() -> None:
    with pytest.raises(ConfigError) as excinfo:
        S3Storage.from_url("s3://AKIAEXAMPLE:s3cr3t-value@bkt/p?region=us-east-1")
    assert str(excinfo.value) == (
        "s3://bkt/p: credentials in the URL are not supported "
        "(use the AWS environment variables, a profile or an instance role)"
    )
    with pytest.raises(ConfigError) as excinfo:
        S3Storage.from_url("s3://bkt/p?endpoint=http://AKIAEXAMPLE:s3cr3t-value@host:9000")
    assert str(excinfo.value) == "s3://bkt/p: endpoint must not contain credentials"
    for text in (str(excinfo.value), repr(excinfo.value)):
        assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text


def test_constructor_validates_like_from_url() -> None:
    with pytest.raises(ConfigError, match=r"^s3://bkt/p: invalid part_size 100 "):
        S3Options("bkt", "p", part_size=100)
    with pytest.raises(ConfigError, match=r"^s3://bkt: invalid backoff_base 0 "):
        S3Options("bkt", backoff_base=0)


# -- layout and options -------------------------------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("server_name", ["seaweedfs", "moto"])
async def test_key_layout_and_stray_keys(
    request: pytest.FixtureRequest,
    s3_url_factory: Callable[..., str],
    open_s3: Callable[..., S3Storage],
    server_name: str,
) -> None:
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    bucket = S3Storage.from_url(s3_url_factory(server_name)).bucket
    gen = new_generation_id()
    snap, seg = snapshot_info(gen, 0, 1), segment_info(gen, 1, 2, 3, 4)
    nested, root = open_s3(server, bucket, "a/b/"), open_s3(server, bucket, "")
    for s in (nested, root):
        await s.write_object(snap, chunks(b"snap"))
        await s.write_object(seg, chunks(b"seg"))
    assert sorted(server.keys(bucket)) == sorted(
        [f"a/b/{snap.key}", f"a/b/{seg.key}", snap.key, seg.key]
    )
    # keys that are not objects are skipped by listings
    client = server.client()
    for key in (
        f"a/b/generations/{gen}/wal/junk.txt",
        f"a/b/generations/{gen}/other/{seg.name}",
        "a/b/generations/not-a-generation/wal/x.seg",
        "a/b/generations/README",
    ):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert await nested.generations() == [gen]
    assert [o.key for o in await nested.objects(gen)] == [snap.key, seg.key]


@pytest.mark.s3
async def test_botocore_data_is_kept_as_plain_dicts(
    seaweedfs_server: S3Server, weed_bucket: str, open_s3: Callable[..., S3Storage]
) -> None:
    """The S3 model and endpoint data the process keeps are plain dicts (half the memory of
    the OrderedDicts botocore parses into), and requests, listings and errors work with them."""
    from collections import OrderedDict

    from replicator.storage import s3_requests

    s = open_s3(seaweedfs_server, weed_bucket)
    gen = new_generation_id()
    info = segment_info(gen, 1, 1, 2, 2)
    await s.write_object(info, chunks(b"body"))
    assert await read_all(s, info) == b"body"
    assert [o.key for o in await s.objects(gen)] == [info.key]
    with pytest.raises(NotFoundError):
        await read_all(s, segment_info(gen, 2, 2, 3, 3))

    def ordered(value: object) -> int:
        if isinstance(value, OrderedDict):
            return 1
        if isinstance(value, dict):
            return sum(ordered(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(ordered(v) for v in value)
        return 0

    cache = s3_requests._loader._cache
    assert any(k[:2] == ("load_data_with_path", "endpoints") for k in cache)
    assert ordered(list(cache.values())) == 0


@pytest.mark.s3
async def test_storage_class_and_encryption_applied(
    moto_server: S3Server, s3_url_factory: Callable[..., str]
) -> None:
    url = s3_url_factory("moto", storage_class="STANDARD_IA", sse="AES256", part_size="5MiB")
    gen = new_generation_id()
    small, large = snapshot_info(gen, 0, 1), snapshot_info(gen, 9, 2)
    async with S3Storage.from_url(url) as s:
        await s.write_object(small, chunks(b"x" * 100))
        await s.write_object(large, chunks(random.randbytes(PART + 1)))
        for info in (small, large):
            head = moto_server.client().head_object(Bucket=s.bucket, Key=f"replica/{info.key}")
            assert head["StorageClass"] == "STANDARD_IA"
            assert head["ServerSideEncryption"] == "AES256"


@pytest.mark.s3
async def test_listing_paginates_and_deletes_batch(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket)
    s.list_page_size, s.delete_batch = 3, 4
    gens = sorted(new_generation_id(now_ns=(1_700_000_000 + i) * 10**9) for i in range(5))
    infos = [segment_info(gens[0], i, i, i, i) for i in range(1, 11)]
    await asyncio.gather(*(s.write_object(i, chunks(b"w")) for i in infos))
    for g in gens[1:]:
        await s.write_object(snapshot_info(g, 0, 0), chunks(b"s"))
    assert await s.generations() == gens
    assert await s.objects(gens[0]) == [
        segment_info(gens[0], i, i, i, i, size=1) for i in range(1, 11)
    ]
    batches: list[int] = []
    (await s.requests.client()).meta.events.register(
        "before-parameter-build.s3.DeleteObjects",
        lambda params, **_: batches.append(len(params["Delete"]["Objects"])),
    )
    await s.delete_objects(infos[:9])
    assert batches == [4, 4, 1]
    assert [o.end_txid for o in await s.objects(gens[0])] == [10]
    # a generation emptied object by object is no longer listed (SeaweedFS keeps the directory)
    await s.delete_objects(infos[9:])
    assert await s.generations() == gens[1:]


@pytest.mark.s3
async def test_delete_generation_leaves_no_directories(
    seaweedfs_server: S3Server, weed_bucket: str, open_s3: Callable[..., S3Storage]
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket)
    gen = new_generation_id()
    await s.write_object(snapshot_info(gen, 0, 1), chunks(b"s"))
    await s.write_object(segment_info(gen, 1, 1, 2, 2), chunks(b"w"))
    await s.delete_generation(gen)
    listed = seaweedfs_server.client().list_objects_v2(
        Bucket=weed_bucket, Prefix="replica/generations/", Delimiter="/"
    )
    assert listed.get("CommonPrefixes", []) == []
    assert [o["Key"] for o in listed.get("Contents", []) if gen in o["Key"]] == []


@pytest.mark.s3
@pytest.mark.parametrize("server_name", ["seaweedfs", "moto"])
async def test_failed_multipart_write_is_aborted(
    request: pytest.FixtureRequest,
    s3_url_factory: Callable[..., str],
    server_name: str,
) -> None:
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    url = s3_url_factory(server_name, part_size="5MiB")
    reached, gate = asyncio.Event(), asyncio.Event()

    async def stuck() -> AsyncIterator[bytes]:
        for _ in range(12):  # two parts go out, the third waits
            yield b"z" * MIB
        reached.set()
        await gate.wait()
        yield b"never"

    info = snapshot_info(new_generation_id(), 1, 1)
    async with S3Storage.from_url(url) as s:

        async def failing() -> AsyncIterator[bytes]:
            yield b"y" * (3 * PART)
            raise RuntimeError("source failed")

        with pytest.raises(RuntimeError, match="source failed"):
            await s.write_object(info, failing())
        task = asyncio.create_task(s.write_object(info, stuck()))
        await reached.wait()
        assert len(server.client().list_multipart_uploads(Bucket=s.bucket)["Uploads"]) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert server.client().list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []
        assert server.keys(s.bucket) == []


# -- configuration and credential errors --------------------------------------------------------


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert TEST_SECRET_KEY not in text
        assert "wrong-secret" not in text
        assert "\n" not in text


@pytest.mark.s3
async def test_wrong_secret_key(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    open_s3: Callable[..., S3Storage],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    s = open_s3(seaweedfs_server, weed_bucket, max_retries=0)
    with pytest.raises(StorageError) as init_err:
        await s.init()
    assert str(init_err.value) == f"s3://{weed_bucket}/replica: access denied (check credentials)"
    info = snapshot_info(new_generation_id(), 0, 1)
    with pytest.raises(StorageError) as put_err:
        await s.write_object(info, chunks(b"data"))
    assert str(put_err.value) == (
        f"s3://{weed_bucket}/replica: PutObject {info.key}: "
        "signature does not match (check the secret access key)"
    )
    assert_no_secrets(str(init_err.value), str(put_err.value), repr(s), s.url, caplog.text)


@pytest.mark.s3
async def test_wrong_access_key(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    open_s3: Callable[..., S3Storage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOTKNOWNHERE0000")
    s = open_s3(seaweedfs_server, weed_bucket, max_retries=0)
    with pytest.raises(StorageError) as init_err:
        await s.init()
    assert str(init_err.value) == f"s3://{weed_bucket}/replica: access denied (check credentials)"
    with pytest.raises(StorageError) as list_err:
        await s.generations()
    assert str(list_err.value) == (
        f"s3://{weed_bucket}/replica: ListObjectsV2 generations/: "
        "invalid access key id (check credentials)"
    )
    assert_no_secrets(str(init_err.value), str(list_err.value))


@pytest.mark.s3
async def test_no_credentials(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    open_s3: Callable[..., S3Storage],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s = open_s3(seaweedfs_server, weed_bucket)
    with pytest.raises(StorageError) as excinfo:
        await s.init()
    assert str(excinfo.value) == (
        f"s3://{weed_bucket}/replica: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)"
    )


@pytest.mark.s3
@pytest.mark.parametrize("server_name", ["seaweedfs", "moto"])
async def test_missing_bucket(
    request: pytest.FixtureRequest,
    s3_env: dict[str, str],
    open_s3: Callable[..., S3Storage],
    server_name: str,
) -> None:
    server: S3Server = request.getfixturevalue(f"{server_name}_server")
    s = open_s3(server, "no-such-bucket-here")
    expected = "s3://no-such-bucket-here/replica: bucket 'no-such-bucket-here' does not exist"
    with pytest.raises(StorageError) as excinfo:
        await s.init()
    assert str(excinfo.value) == expected
    with pytest.raises(StorageError) as excinfo:
        await s.objects(new_generation_id())
    assert str(excinfo.value) == expected


@pytest.mark.s3
async def test_unreachable_endpoint(
    s3_env: dict[str, str], open_s3: Callable[..., S3Storage], moto_server: S3Server
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    s = open_s3(moto_server, "bkt", endpoint=endpoint, max_retries=0, request_attempts=1)
    with pytest.raises(StorageError) as excinfo:
        await s.init()
    assert (
        str(excinfo.value) == f"s3://bkt/replica: cannot connect to {endpoint}: connection refused"
    )
    info = segment_info(new_generation_id(), 1, 2, 3, 4)
    with pytest.raises(StorageError) as excinfo:
        await s.write_object(info, chunks(b"abc"))
    assert str(excinfo.value) == (
        f"s3://bkt/replica: PutObject {info.key}: cannot connect to {endpoint}: connection refused"
    )
    retried = open_s3(moto_server, "bkt", endpoint=endpoint, max_retries=2, **FAST)
    with pytest.raises(StorageError) as excinfo:
        await read_all(retried, info)
    assert str(excinfo.value) == (
        f"s3://bkt/replica: GetObject {info.key}: cannot connect to {endpoint}: "
        "connection refused (after 3 attempts)"
    )


# -- faults through the proxy -------------------------------------------------------------------


@pytest.mark.s3
async def test_connection_resets_are_retried(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="replicator.storage")
    s = open_s3(seaweedfs_server, weed_bucket, endpoint=proxy.endpoint, max_retries=8, **FAST)
    await s.init()
    gen = new_generation_id()
    small = snapshot_info(gen, 0, 1)
    proxy.set(Fault.RESET, count=3)
    assert await s.write_object(small, chunks(b"small object")) == 12
    assert proxy.faulted == 3
    assert await read_all(s, small) == b"small object"

    # resets in the middle of a multipart upload
    data = random.randbytes(3 * PART + 17)

    async def flaky() -> AsyncIterator[bytes]:
        n = 0
        async for piece in chunks(data):
            n += 1
            if n == 7:  # the first part is on its way
                proxy.set(Fault.RESET, count=2)
            yield piece

    s.part_size = PART
    large = segment_info(gen, 1, 5, 2, 3)
    assert await s.write_object(large, flaky()) == len(data)
    assert proxy.faulted == 5
    assert await read_all(s, large) == data
    retries = [r.getMessage() for r in caplog.records
               if r.name.startswith("replicator.storage.s3")]
    assert retries and all("retrying in" in m for m in retries)
    assert_no_secrets(*retries)


@pytest.mark.s3
async def test_read_resumes_after_broken_body(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket, endpoint=proxy.endpoint, max_retries=4, **FAST)
    info = snapshot_info(new_generation_id(), 7, 1)
    data = random.randbytes(3 * MIB + 5)
    await s.write_object(info, chunks(data))
    proxy.cut_after = MIB
    proxy.set(Fault.CUT, count=2)
    assert await read_all(s, info) == data
    assert proxy.faulted == 2


@pytest.mark.s3
async def test_stalled_server_times_out(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(
        seaweedfs_server,
        weed_bucket,
        endpoint=proxy.endpoint,
        max_retries=1,
        # long enough for a real answer on a busy machine: the same client must get one once
        # the stall ends
        connect_timeout=1.0,
        read_timeout=1.0,
        **FAST,
    )
    await s.init()
    info = snapshot_info(new_generation_id(), 0, 1)
    proxy.set(Fault.STALL)
    with pytest.raises(StorageError) as excinfo:
        await s.write_object(info, chunks(b"never acknowledged"))
    assert str(excinfo.value) == (
        f"s3://{weed_bucket}/replica: PutObject {info.key}: "
        f"timed out waiting for {proxy.endpoint} (after 2 attempts)"
    )
    with pytest.raises(StorageError, match=r"GetObject .*: timed out waiting for"):
        await read_all(s, info)
    proxy.set(Fault.PASS)
    await s.write_object(info, chunks(b"now it works"))
    assert await read_all(s, info) == b"now it works"


@pytest.mark.s3
async def test_slow_server_still_works(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket, endpoint=proxy.endpoint, **FAST)
    info = snapshot_info(new_generation_id(), 0, 1)
    data = random.randbytes(256 * 1024)
    await s.write_object(info, chunks(data))
    proxy.slow_chunk, proxy.slow_delay = 4096, 0.001
    proxy.set(Fault.SLOW)
    assert await read_all(s, info) == data
    assert await s.objects(info.generation) == [snapshot_info(info.generation, 0, 1, len(data))]


@pytest.mark.s3
async def test_server_down_then_back(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket, endpoint=proxy.endpoint, max_retries=1, **FAST)
    await s.init()
    proxy.set(Fault.DOWN)
    # (one retry: the pooled connection may fail first, with a reset)
    with pytest.raises(StorageError) as excinfo:
        await s.generations()
    assert str(excinfo.value) == (
        f"s3://{weed_bucket}/replica: ListObjectsV2 generations/: cannot connect to "
        f"{proxy.endpoint}: connection refused (after 2 attempts)"
    )
    proxy.set(Fault.PASS)
    await s.init()
    assert await s.generations() == []


@pytest.mark.s3
@pytest.mark.parametrize(
    ("request_attempts", "max_retries", "errors"),
    [(1, 3, 2), (2, 0, 1)],
    ids=["our-retries", "botocore-retries"],
)
async def test_throttling_is_retried(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
    request_attempts: int,
    max_retries: int,
    errors: int,
) -> None:
    s = open_s3(
        seaweedfs_server,
        weed_bucket,
        endpoint=proxy.endpoint,
        request_attempts=request_attempts,
        max_retries=max_retries,
        backoff_base=0.01,
    )
    info = snapshot_info(new_generation_id(), 0, 1)
    proxy.http_status, proxy.error_code = 503, "SlowDown"
    proxy.set(Fault.HTTP, count=errors)
    assert await s.write_object(info, chunks(b"eventually")) == 10
    assert proxy.faulted == errors
    assert await read_all(s, info) == b"eventually"


@pytest.mark.s3
async def test_persistent_server_errors_give_up(
    seaweedfs_server: S3Server,
    weed_bucket: str,
    proxy: FaultProxy,
    open_s3: Callable[..., S3Storage],
) -> None:
    s = open_s3(seaweedfs_server, weed_bucket, endpoint=proxy.endpoint, max_retries=2, **FAST)
    info = segment_info(new_generation_id(), 3, 4, 5, 6)
    proxy.http_status, proxy.error_code = 500, "InternalError"
    proxy.set(Fault.HTTP)
    with pytest.raises(StorageError) as excinfo:
        await s.write_object(info, chunks(b"data"))
    assert str(excinfo.value) == (
        f"s3://{weed_bucket}/replica: PutObject {info.key}: server error InternalError "
        "(HTTP 500): injected by faultproxy (after 3 attempts)"
    )
    assert proxy.faulted == 3
    proxy.set(Fault.PASS)
    with pytest.raises(NotFoundError):
        await read_all(s, info)


# -- resources ----------------------------------------------------------------------------------


@pytest.mark.s3
async def test_multipart_memory_is_bounded(
    seaweedfs_server: S3Server, weed_bucket: str, open_s3: Callable[..., S3Storage]
) -> None:
    size = 64 * MIB
    block = random.randbytes(MIB)

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(size // MIB):
            yield block  # the same block: the source itself allocates nothing

    s = open_s3(seaweedfs_server, weed_bucket, part_size=PART)
    await s.init()
    info = snapshot_info(new_generation_id(), 0, 1)
    tracemalloc.start()
    try:
        assert await s.write_object(info, stream()) == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * PART, f"peak {peak / MIB:.1f} MiB for a {size // MIB} MiB object"
    assert [o.size for o in await s.objects(info.generation)] == [size]


@pytest.mark.s3
async def test_client_lifecycle(
    seaweedfs_server: S3Server, weed_bucket: str, s3_env: dict[str, str]
) -> None:
    s = S3Storage.from_url(seaweedfs_server.url(weed_bucket, "p"))
    await s.aclose()  # never opened: fine
    async with s:
        await s.init()
    await s.aclose()  # twice: fine
    await s.init()  # reopens lazily
    await s.aclose()
    assert TEST_ACCESS_KEY not in repr(s) and TEST_SECRET_KEY not in repr(s)


async def test_small_uploads_skip_the_expect_continue_round_trip(
    seaweedfs_server: S3Server, weed_bucket: str, open_s3: Callable[..., S3Storage]
) -> None:
    """botocore asks for ``Expect: 100-continue`` on every upload, a round trip before the body
    goes out; a small object (a segment, the lease) is sent at once. Large ones keep it."""
    s = open_s3(seaweedfs_server, weed_bucket)
    client = await s.requests.client()
    sent: list[tuple[int, str | None]] = []

    def record(request: Any, **kwargs: Any) -> None:
        if request.method == "PUT":
            body = request.body
            size = len(body) if isinstance(body, bytes | bytearray) else -1
            expect = request.headers.get("Expect")
            sent.append((size, expect.decode() if isinstance(expect, bytes) else expect))

    client.meta.events.register("before-send.s3", record)
    gen = new_generation_id()
    small, big = b"s" * 1000, os.urandom((1 << 20) + 1)
    await s.write_object(segment_info(gen, 1, 1, 1, 1), chunks(small))
    await s.write_lease(b'{"version": 1}')
    await s.write_object(segment_info(gen, 2, 2, 2, 2), chunks(big))
    assert [e for _, e in sent] == [None, None, "100-continue"]
    assert await read_all(s, segment_info(gen, 1, 1, 1, 1)) == small
    assert await read_all(s, segment_info(gen, 2, 2, 2, 2)) == big
