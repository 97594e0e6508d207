"""An S3 backend (AWS S3 or any S3-compatible server), built on aiobotocore.

Objects live under ``<prefix>/<key>`` where ``<key>`` comes from :mod:`replicator.pos`; an empty
prefix puts ``generations/`` at the root of the bucket. Credentials come only from the standard AWS
chain (environment, shared config/credentials files, web identity, instance metadata); this module
never sees, logs or stores them.

Writes stream: up to ``part_size`` bytes are buffered; a stream that fits in one part is stored
with a single PutObject, a longer one with a multipart upload (:mod:`.s3_multipart`). Options and
their validation live in :mod:`.s3_options`; requests, retries and error translation in
:mod:`.s3_requests`. A read that breaks mid-body resumes with a ranged GET from the last byte
delivered. Every botocore exception leaves this module as a one-line :class:`StorageError` (or
:class:`NotFoundError`) naming the replica, operation and key.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from types import TracebackType
from typing import Any

from ..errors import NotFoundError, StorageError
from ..pos import (
    GENERATIONS_DIR,
    LEASE_KEY,
    ObjectInfo,
    generation_prefix,
    is_generation_id,
    parse_key,
    sort_objects,
)
from .base import DEFAULT_CHUNK_SIZE
from .s3_multipart import BodyReader, MultipartUpload, release
from .s3_options import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_PART_SIZE,
    DEFAULT_REQUEST_ATTEMPTS,
    URL_PARAMS,
    S3Options,
    parse_s3_url,
)
from .s3_requests import S3Requests, one_line

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_PART_SIZE",
    "DEFAULT_REQUEST_ATTEMPTS",
    "URL_PARAMS",
    "S3Options",
    "S3Storage",
    "parse_s3_url",
]

log = logging.getLogger(__name__)

DELETE_BATCH = 1000  # the most DeleteObjects accepts
LIST_PAGE_SIZE = 1000  # the most ListObjectsV2 returns
PROBE_CONCURRENCY = 8


class S3Storage:
    """A replica in an S3 bucket, below an optional key prefix."""

    local = False
    can_link = False
    list_page_size = LIST_PAGE_SIZE
    delete_batch = DELETE_BATCH

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.bucket = options.bucket
        self.prefix = options.prefix
        self.url = options.url
        self.part_size = options.part_size
        self.requests = S3Requests(options)

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """Open ``s3://bucket/prefix?param=value&...``; see ``URL_PARAMS`` for the parameters."""
        return cls(parse_s3_url(url))

    def __repr__(self) -> str:
        o = self.options
        return f"S3Storage(url={self.url!r}, endpoint={o.endpoint!r}, region={o.region!r})"

    async def __aenter__(self) -> S3Storage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _list(
        self, prefix: str, delimiter: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Pages of ListObjectsV2 below ``prefix`` (a full key prefix)."""
        r = self.requests
        client = await r.client()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                      "MaxKeys": self.list_page_size}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = await r.call(
                "ListObjectsV2",
                prefix[len(r.root) :],
                functools.partial(client.list_objects_v2, **kwargs),
            )
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # -- the StorageClient Protocol -------------------------------------------------------------

    async def init(self) -> None:
        """Check that the bucket exists and the credentials may use it (HeadBucket)."""
        r = self.requests
        client = await r.client()
        try:
            await r.call(
                "HeadBucket", None, lambda: client.head_bucket(Bucket=self.bucket), translate=False
            )
        except Exception as exc:
            raise r.error(None, None, exc) from exc

    async def children(self, sub: str = "") -> list[str]:
        """The prefixes one level below ``sub`` (ListObjectsV2 with a delimiter), sorted."""
        base = self.requests.key(f"{sub.strip('/')}/" if sub.strip("/") else "")
        out: set[str] = set()
        async for page in self._list(base, delimiter="/"):
            for cp in page.get("CommonPrefixes", ()):
                name = str(cp.get("Prefix", ""))[len(base):].rstrip("/")
                if name:
                    out.add(name)
        return sorted(out)

    async def generations(self) -> list[str]:
        """Generation ids present (holding at least one object), oldest first."""
        r = self.requests
        candidates = [n for n in await self.children(GENERATIONS_DIR) if is_generation_id(n)]
        # Servers backed by a file system (SeaweedFS, ...) keep listing a "directory" after its
        # last object is deleted, so each candidate is checked for an object.
        client = await r.client()
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def has_objects(gen: str) -> bool:
            async with limit:
                page: dict[str, Any] = await r.call(
                    "ListObjectsV2",
                    generation_prefix(gen),
                    functools.partial(
                        client.list_objects_v2,
                        Bucket=self.bucket,
                        Prefix=r.key(generation_prefix(gen)),
                        MaxKeys=1,
                    ),
                )
            return bool(page.get("Contents"))

        present = await asyncio.gather(*(has_objects(g) for g in candidates))
        return [g for g, ok in zip(candidates, present, strict=True) if ok]

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation, sorted; keys that are not objects are skipped."""
        root = self.requests.root
        out: list[ObjectInfo] = []
        async for page in self._list(self.requests.key(generation_prefix(generation))):
            for item in page.get("Contents", ()):
                info = parse_key(str(item["Key"])[len(root) :], int(item.get("Size", 0)))
                if info is not None and info.generation == generation:
                    out.append(info)
        return sort_objects(out)

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Stream ``data`` to ``info.key``: one PutObject if it fits in a part, else multipart."""
        part = bytearray()
        total = 0
        upload: MultipartUpload | None = None
        try:
            async for chunk in data:
                total += len(chunk)
                rest = memoryview(chunk)
                while len(rest) > self.part_size - len(part):
                    # A full part with more to come: the object needs a multipart upload.
                    room = self.part_size - len(part)
                    part += rest[:room]
                    rest = rest[room:]
                    if upload is None:
                        upload = await MultipartUpload.create(self.requests, info.key)
                    # Wait for the part in flight first: memory stays at one part in flight
                    # plus the one filling. A full part is handed over, never copied.
                    await upload.wait()
                    upload.start(part)
                    part = bytearray()
                part += rest
            if upload is None:
                await self._put(info.key, part)
                return total
            await upload.wait()
            if part:
                upload.start(part)
            await upload.complete(total)
            upload = None
            return total
        finally:
            if upload is not None:
                await upload.abort()

    async def _put(self, rel_key: str, body: bytearray, **extra: str) -> None:
        """Store ``body`` with one PutObject (the body is released afterwards)."""
        r = self.requests
        client = await r.client()
        try:
            await r.call(
                "PutObject",
                rel_key,
                lambda: client.put_object(
                    Bucket=self.bucket, Key=r.key(rel_key), Body=BodyReader(body),
                    **extra, **r.put_args(),
                ),
                body_size=len(body),
            )
        finally:
            release(body)

    async def link_object(self, info: ObjectInfo, source: str) -> int | None:
        """Not supported: None (the caller writes the object instead)."""
        return None

    async def link_objects(self, items: Sequence[tuple[ObjectInfo, str]]) -> list[int] | None:
        """Not supported: None (the caller writes the objects instead)."""
        return None

    def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream an object; a connection that breaks mid-body is resumed with a ranged GET."""
        return self._read(info.key)

    async def read_objects(self, infos: Sequence[ObjectInfo]) -> list[bytes]:
        """Each object's bytes, the GETs concurrent (as many at once as the client's
        connection pool allows); the first failure cancels the others."""

        async def whole(info: ObjectInfo) -> bytes:
            return b"".join([chunk async for chunk in self._read(info.key)])

        tasks = [asyncio.ensure_future(whole(info)) for info in infos]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, rel_key: str) -> AsyncIterator[bytes]:
        r = self.requests
        client = await r.client()
        offset = 0
        etag: str | None = None
        deadline = r.deadline()
        attempt = 0
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": r.key(rel_key)}
            if offset:
                kwargs["Range"] = f"bytes={offset}-"
                if etag:
                    kwargs["IfMatch"] = etag
            resp: dict[str, Any] = await r.call(
                "GetObject", rel_key, functools.partial(client.get_object, **kwargs)
            )
            etag = etag or resp.get("ETag")
            try:
                async with resp["Body"] as body:
                    while chunk := await body.read(DEFAULT_CHUNK_SIZE):
                        offset += len(chunk)
                        # Progress renews the retry budget: only consecutive failures count.
                        attempt = 0
                        deadline = r.deadline()
                        yield chunk
                    return
            except Exception as exc:
                attempt += 1
                delay = r.retry_delay(exc, attempt, deadline)
                if delay is None:
                    raise r.error("GetObject", rel_key, exc, attempt) from exc
                log.warning("%s: resuming at byte %d in %.2fs",
                            r.error("GetObject", rel_key, exc, attempt), offset, delay)
                await asyncio.sleep(delay)

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        """Delete objects in batches of 1000; absent ones are ignored."""
        await self._delete_keys([self.requests.key(i.key) for i in infos])

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        r = self.requests
        client = await r.client()
        for i in range(0, len(keys), self.delete_batch):
            batch = keys[i : i + self.delete_batch]
            what = batch[0][len(r.root) :] + (f" and {len(batch) - 1} more" if batch[1:] else "")
            resp: dict[str, Any] = await r.call(
                "DeleteObjects",
                what,
                functools.partial(
                    client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                ),
            )
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise StorageError(
                    f"{self.url}: DeleteObjects {str(first.get('Key', ''))[len(r.root) :]}: "
                    f"{first.get('Code', 'error')}: {one_line(str(first.get('Message', '')))}"
                    + (f" ({len(errors)} objects not deleted)" if len(errors) > 1 else "")
                )

    async def delete_generation(self, generation: str) -> None:
        """Delete every object below a generation's prefix; an absent generation is ignored."""
        base = self.requests.key(generation_prefix(generation))
        async for page in self._list(base):
            await self._delete_keys([str(item["Key"]) for item in page.get("Contents", ())])
        # S3 has no directories, but servers backed by a file system (SeaweedFS, ...) keep
        # listing empty ones until their "dir/" key is deleted. Only delete such keys when they
        # are listed: on a versioned bucket deleting an absent key would add a delete marker.
        dirs = [
            str(cp["Prefix"])
            async for page in self._list(base, delimiter="/")
            for cp in page.get("CommonPrefixes", ())
        ]
        if dirs:
            await self._delete_keys([*dirs, base])

    async def read_lease(self) -> bytes | None:
        """The object ``<prefix>/lease.json``, or None if it does not exist."""
        try:
            return b"".join([chunk async for chunk in self._read(LEASE_KEY)])
        except NotFoundError:
            return None

    async def write_lease(self, data: bytes) -> None:
        """Store ``<prefix>/lease.json`` with one PutObject (atomic on S3)."""
        await self._put(LEASE_KEY, bytearray(data), ContentType="application/json")

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        await self.requests.aclose()
