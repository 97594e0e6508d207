"""Streaming a large object to S3 as a multipart upload, and the request bodies of every upload.

At most one part is in flight while the next one fills, so memory stays near two parts whatever
the object size; any failure aborts the upload, so a failed write leaves nothing visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from typing import Any

from botocore.exceptions import ClientError

from .s3_requests import S3Requests

log = logging.getLogger(__name__)

ABORT_TIMEOUT = 10.0


def release(data: bytearray) -> None:
    """Free a sent body now: the HTTP stack can keep a reference to it for a while."""
    with contextlib.suppress(BufferError):
        data.clear()


class BodyReader(io.RawIOBase):
    """A seekable file over a request body that reads it without copying it whole.

    Given ``bytes``, botocore makes a BytesIO and aiohttp then copies its entire buffer; a plain
    file object is instead streamed in small chunks. Each attempt gets a fresh reader.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._data) if size is None or size < 0 else self._pos + size
        with memoryview(self._data) as view:
            out = bytes(view[self._pos : end])
        self._pos += len(out)
        return out

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        out = self.read(len(buffer))
        buffer[: len(out)] = out
        return len(out)


class MultipartUpload:
    """One multipart upload in progress: at most one part in flight while the next is read.
    ``rel_key`` is the object's key below the replica's prefix."""

    def __init__(self, requests: S3Requests, client: Any, rel_key: str, upload_id: str) -> None:
        self.requests = requests
        self.client = client
        self.rel_key = rel_key
        self.key = requests.key(rel_key)
        self.upload_id = upload_id
        self.parts: list[dict[str, Any]] = []
        self.pending: asyncio.Task[dict[str, Any]] | None = None

    @classmethod
    async def create(cls, requests: S3Requests, rel_key: str) -> MultipartUpload:
        """Start a multipart upload of ``rel_key``."""
        client = await requests.client()
        resp: dict[str, Any] = await requests.call(
            "CreateMultipartUpload",
            rel_key,
            lambda: client.create_multipart_upload(
                Bucket=requests.bucket, Key=requests.key(rel_key), **requests.put_args()
            ),
        )
        return cls(requests, client, rel_key, str(resp["UploadId"]))

    async def _upload(self, number: int, data: bytearray) -> dict[str, Any]:
        try:
            resp: dict[str, Any] = await self.requests.call(
                "UploadPart",
                f"{self.rel_key} part {number}",
                lambda: self.client.upload_part(
                    Bucket=self.requests.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=BodyReader(data),
                ),
                body_size=len(data),
            )
        finally:
            release(data)
        return {"ETag": resp["ETag"], "PartNumber": number}

    async def wait(self) -> None:
        """Wait for the part in flight, if any; raise its error."""
        if self.pending is not None:
            task, self.pending = self.pending, None
            self.parts.append(await task)

    def start(self, data: bytearray) -> None:
        """Start uploading ``data`` as the next part (call ``wait`` first; ``data`` must not
        change afterwards)."""
        assert self.pending is None
        self.pending = asyncio.create_task(self._upload(len(self.parts) + 1, data))

    async def complete(self, total: int) -> None:
        """Wait for the last part and complete the upload."""
        await self.wait()
        r = self.requests
        try:
            await r.call(
                "CompleteMultipartUpload",
                self.rel_key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=r.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},
                ),
                translate=False,
            )
        except ClientError as exc:
            # A retried Complete whose first attempt succeeded finds the upload gone.
            code = exc.response.get("Error", {}).get("Code")
            if code != "NoSuchUpload" or not await self._exists(total):
                raise r.error("CompleteMultipartUpload", self.rel_key, exc) from exc
        except Exception as exc:
            raise r.error("CompleteMultipartUpload", self.rel_key, exc) from exc

    async def _exists(self, size: int) -> bool:
        try:
            head = await self.client.head_object(Bucket=self.requests.bucket, Key=self.key)
        except Exception:
            return False
        return int(head.get("ContentLength", -1)) == size

    async def abort(self) -> None:
        """Stop the part in flight and abort the upload, best effort (never raises)."""
        if self.pending is not None:
            task, self.pending = self.pending, None
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        try:
            async with asyncio.timeout(ABORT_TIMEOUT):
                await self.client.abort_multipart_upload(
                    Bucket=self.requests.bucket, Key=self.key, UploadId=self.upload_id
                )
        except Exception as exc:
            log.warning(
                "%s: upload %s left incomplete (a lifecycle rule can expire it)",
                self.requests.error("AbortMultipartUpload", self.rel_key, exc),
                self.upload_id,
            )
