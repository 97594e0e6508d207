"""An S3 backend (AWS S3 or any S3-compatible server), built on aiobotocore.

Objects live under ``<prefix>/<key>`` where ``<key>`` comes from :mod:`replicator.pos`; an empty
prefix puts ``generations/`` at the root of the bucket. Credentials come only from the standard AWS
chain (environment, shared config/credentials files, web identity, instance metadata); this module
never sees, logs or stores them.

Writes stream: up to ``part_size`` bytes are buffered; a stream that fits in one part is stored
with a single PutObject, a longer one with a multipart upload (aborted on any failure, so a failed
write leaves nothing visible). At most one part is buffered while the previous one uploads, so
memory stays near ``2 * part_size`` whatever the object size.

Failures are retried on two levels: botocore retries each HTTP request (``retry_mode``,
``request_attempts``), and every operation is wrapped in a second loop that retries throttling,
5xx, timeouts and dropped connections with exponential backoff and jitter, at most
``max_retries`` times and never past ``retry_timeout`` seconds. A read that breaks mid-body resumes
with a ranged GET from the last byte delivered. Every botocore exception leaves this module as a
one-line :class:`StorageError` (or :class:`NotFoundError`) naming the replica, operation and key.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import random
import re
import socket
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.loaders import create_loader
from botocore.utils import determine_content_length

from ..errors import ConfigError, NotFoundError, StorageError
from ..pos import GENERATIONS_DIR, ObjectInfo, generation_prefix, is_generation_id, parse_key
from .base import DEFAULT_CHUNK_SIZE, LEASE_KEY

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MIB
DEFAULT_MAX_RETRIES = 5
DEFAULT_REQUEST_ATTEMPTS = 1  # the loop below retries; botocore's own waits would hide a recovery
DEFAULT_RETRY_MODE = "standard"
DEFAULT_RETRY_TIMEOUT = 120.0
DEFAULT_BACKOFF_BASE = 0.25
DEFAULT_BACKOFF_MAX = 1.0  # a server that is back is noticed within about this
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0
# A request that moves a body may take this long per byte on top of its timeouts before the
# attempt is abandoned: aiohttp has no write timeout, and a peer that stops reading would hang.
MIN_THROUGHPUT = 64 * 1024
BOTOCORE_MAX_BACKOFF = 20.0  # botocore's cap on the wait between its own attempts
DELETE_BATCH = 1000  # the most DeleteObjects accepts
LIST_PAGE_SIZE = 1000  # the most ListObjectsV2 returns
PROBE_CONCURRENCY = 8
ABORT_TIMEOUT = 10.0

RETRY_MODES = ("standard", "adaptive")
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "GLACIER_IR",
    "SNOW",
    "EXPRESS_ONEZONE",
)
SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")
URL_PARAMS = (
    "endpoint",
    "region",
    "force_path_style",
    "storage_class",
    "sse",
    "sse_kms_key_id",
    "part_size",
    "max_retries",
    "request_attempts",
    "retry_mode",
    "retry_timeout",
    "connect_timeout",
    "read_timeout",
)

_BUCKET_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,61}[a-zA-Z0-9]$")
_SIZE_RE = re.compile(r"^(\d+)\s*(?:([kmg])(?:i?b)?)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_THROTTLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
    }
)
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "invalid access key id (check credentials)",
    "SignatureDoesNotMatch": "signature does not match (check the secret access key)",
    "ExpiredToken": "credentials have expired (refresh them)",
    "InvalidToken": "invalid session token (check credentials)",
    "TokenRefreshRequired": "credentials have expired (refresh them)",
}

T = TypeVar("T")


_loader: Any = None


def _shared_loader(session: Any) -> Any:
    """One botocore data loader for every client: it caches the parsed service model and
    endpoint rules (megabytes of JSON), while each client still gets its own session and so
    resolves credentials afresh."""
    global _loader
    if _loader is None:
        _loader = create_loader(session.get_config_variable("data_path"))
    return _loader


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost error under botocore's and aiohttp's wrappers."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner: BaseException | None = None
        kwargs = getattr(exc, "kwargs", None)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("error"), BaseException):
            inner = kwargs["error"]
        elif isinstance(exc, aiohttp.ClientConnectorError):
            inner = exc.os_error
        elif exc.__cause__ is not None:
            inner = exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def _describe_network(exc: BaseException) -> str:
    root = _root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(root, socket.gaierror):
        return "host not found"
    if isinstance(root, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    if isinstance(root, TimeoutError):
        return "timed out"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror.lower()
    text = _one_line(str(root)) or type(root).__name__
    return text


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or status == 429 or code in _THROTTLE_CODES
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return False
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | IncompleteReadError
        | TimeoutError
        | aiohttp.ClientError
        | OSError,
    )


def _parse_bool(name: str, value: str, where: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{where}: invalid {name} {value!r} (expected true or false)")


def _parse_int(name: str, value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: invalid {name} {value!r} (expected an integer)") from None


def _parse_float(name: str, value: str, where: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: invalid {name} {value!r} (expected seconds)") from None


def _parse_size(name: str, value: str, where: str) -> int:
    m = _SIZE_RE.match(value.strip())
    if not m:
        raise ConfigError(f"{where}: invalid {name} {value!r} (expected bytes, e.g. 8MiB)")
    return int(m[1]) * _SIZE_UNITS[(m[2] or "").lower()]


def _check_endpoint(endpoint: str, where: str) -> str:
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        # Never echo the value: it holds credentials.
        raise ConfigError(f"{where}: endpoint must not contain credentials")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: invalid endpoint {endpoint!r} (expected http://host:port or https://host)"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{where}: invalid endpoint {endpoint!r} (bad port)") from None
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigError(
            f"{where}: invalid endpoint {endpoint!r} (expected http://host:port or https://host)"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _parse_params(query: str, where: str) -> dict[str, Any]:
    """The constructor keyword arguments given by an s3:// URL's query string."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(
            f"{where}: malformed query string (expected name=value pairs joined by &)"
        ) from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in URL_PARAMS:
            raise ConfigError(
                f"{where}: unknown parameter {name!r} (known: {', '.join(URL_PARAMS)})"
            )
        if name in params:
            raise ConfigError(f"{where}: parameter {name!r} given twice")
        params[name] = value
    if params.get("endpoint") == "":
        raise ConfigError(f"{where}: invalid endpoint '' (leave it out to use AWS)")
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name == "force_path_style":
            kwargs[name] = _parse_bool(name, value, where)
        elif name == "part_size":
            kwargs[name] = _parse_size(name, value, where)
        elif name in ("max_retries", "request_attempts"):
            kwargs[name] = _parse_int(name, value, where)
        elif name in ("retry_timeout", "connect_timeout", "read_timeout"):
            kwargs[name] = _parse_float(name, value, where)
        else:
            kwargs[name] = value
    return kwargs


class S3Storage:
    """A replica in an S3 bucket, below an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint: str | None = None,
        force_path_style: bool = False,
        storage_class: str | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        max_retries: int = DEFAULT_MAX_RETRIES,
        request_attempts: int = DEFAULT_REQUEST_ATTEMPTS,
        retry_mode: str = DEFAULT_RETRY_MODE,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
    ) -> None:
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        where = self.url
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ConfigError(
                f"s3://{bucket}: invalid bucket name {bucket!r} "
                "(3-63 letters, digits, dots, hyphens or underscores)"
            )
        if "//" in prefix:
            raise ConfigError(f"{where}: invalid prefix {prefix!r} (empty path segment)")
        if region is not None and not region.strip():
            raise ConfigError(f"{where}: invalid region '' (leave it out to use the default)")
        self.region = region
        self.endpoint = _check_endpoint(endpoint, where) if endpoint else None
        self.force_path_style = force_path_style
        if storage_class is not None and storage_class not in STORAGE_CLASSES:
            raise ConfigError(
                f"{where}: invalid storage_class {storage_class!r} "
                f"(expected one of {', '.join(STORAGE_CLASSES)})"
            )
        self.storage_class = storage_class
        if sse is not None and sse not in SSE_MODES:
            raise ConfigError(
                f"{where}: invalid sse {sse!r} (expected one of {', '.join(SSE_MODES)})"
            )
        if sse_kms_key_id is not None and (sse is None or not sse.startswith("aws:kms")):
            raise ConfigError(f"{where}: sse_kms_key_id requires sse=aws:kms or sse=aws:kms:dsse")
        self.sse = sse
        self.sse_kms_key_id = sse_kms_key_id
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ConfigError(
                f"{where}: invalid part_size {part_size} (must be between 5MiB and 5GiB)"
            )
        self.part_size = part_size
        if not 0 <= max_retries <= 100:
            raise ConfigError(f"{where}: invalid max_retries {max_retries} (must be 0-100)")
        self.max_retries = max_retries
        if not 1 <= request_attempts <= 20:
            raise ConfigError(
                f"{where}: invalid request_attempts {request_attempts} (must be 1-20)"
            )
        self.request_attempts = request_attempts
        if retry_mode not in RETRY_MODES:
            raise ConfigError(
                f"{where}: invalid retry_mode {retry_mode!r} (expected standard or adaptive)"
            )
        self.retry_mode = retry_mode
        for name, value in (
            ("retry_timeout", retry_timeout),
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
        ):
            if not value > 0:
                raise ConfigError(f"{where}: invalid {name} {value} (must be positive)")
        self.retry_timeout = float(retry_timeout)
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self._root = f"{prefix}/" if prefix else ""
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> S3Storage:
        """Open ``s3://bucket/prefix?param=value&...``; see ``URL_PARAMS`` for the parameters."""
        parts = urlsplit(url)
        netloc = parts.netloc
        host = netloc.rpartition("@")[2]
        path = unquote(parts.path)
        where = f"{parts.scheme}://{host}{path.rstrip('/')}"
        if parts.scheme.lower() != "s3":
            raise ConfigError(f"{where}: not an s3:// URL")
        if "@" in netloc:
            # Never echo the userinfo: it would be an access key and secret.
            raise ConfigError(
                f"{where}: credentials in the URL are not supported "
                "(use the AWS environment variables, a profile or an instance role)"
            )
        if not host:
            raise ConfigError(f"{url}: missing bucket name (expected s3://bucket/prefix)")
        if ":" in host:
            raise ConfigError(f"{where}: a bucket name has no port (use ?endpoint=host:port)")
        if parts.fragment:
            raise ConfigError(f"{where}: unexpected fragment '#{parts.fragment}'")
        kwargs = _parse_params(parts.query, where)
        return cls(host, path, **kwargs)

    def __repr__(self) -> str:
        return f"S3Storage(url={self.url!r}, endpoint={self.endpoint!r}, region={self.region!r})"

    async def __aenter__(self) -> S3Storage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- plumbing -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self._root + key

    @property
    def _endpoint_text(self) -> str:
        if self.endpoint:
            return self.endpoint
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return "the S3 endpoint"

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    config = AioConfig(
                        connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout,
                        retries={
                            "mode": self.retry_mode,
                            "total_max_attempts": self.request_attempts,
                        },
                        s3={"addressing_style": "path" if self.force_path_style else "auto"},
                        warm_up_loader_caches=True,
                    )
                    session = get_session()
                    session.register_component("data_loader", _shared_loader(session))
                    client = await self._stack.enter_async_context(
                        session.create_client(
                            "s3",
                            region_name=self.region,
                            endpoint_url=self.endpoint,
                            config=config,
                        )
                    )
                    # registered after botocore's own handler, so it runs after it
                    client.meta.events.register("before-call.s3", _no_expect_for_small_bodies)
                    self._client = client
        return self._client

    def _attempt_timeout(self, body_size: int) -> float:
        """How long one attempt (botocore's requests and its backoff between them) may take.

        aiohttp starts its read timeout only once a body is sent, so a server that never
        answers ``Expect: 100-continue`` or stops reading the body would otherwise hang forever.
        """
        per_request = self.connect_timeout + self.read_timeout + body_size / MIN_THROUGHPUT
        backoff = sum(min(2.0**i, BOTOCORE_MAX_BACKOFF) for i in range(self.request_attempts - 1))
        return per_request * self.request_attempts + backoff

    def _error(
        self, op: str | None, key: str | None, exc: BaseException, attempts: int = 1
    ) -> StorageError:
        """Translate any failure into a one-line StorageError naming the operation and key."""
        where = self.url
        if op:
            where += f": {op}" + (f" {key}" if key else "")
        after = f" (after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            message = _one_line(str(err.get("Message", "")))
            if code in ("NoSuchKey",) or (status == 404 and op in ("GetObject", "HeadObject")):
                return NotFoundError(f"{self.url}: {key}: object not found")
            if code == "NoSuchBucket" or (status == 404 and op is None):
                return StorageError(f"{self.url}: bucket {self.bucket!r} does not exist")
            if code in _CREDENTIAL_CODES:
                return StorageError(f"{where}: {_CREDENTIAL_CODES[code]}")
            if code == "AccessDenied" or status == 403:
                return StorageError(f"{where}: access denied (check credentials)")
            if status in (301, 307) or code in (
                "PermanentRedirect",
                "AuthorizationHeaderMalformed",
            ):
                return StorageError(
                    f"{where}: bucket {self.bucket!r} is in another region (set region=)"
                )
            detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
            if status >= 500 or status == 429 or code in _THROTTLE_CODES:
                return StorageError(f"{where}: server error {detail}{after}")
            return StorageError(f"{where}: {detail}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"{where}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)"
            )
        if isinstance(exc, ConnectTimeoutError):
            return StorageError(
                f"{where}: cannot connect to {self._endpoint_text}: timed out{after}"
            )
        if isinstance(exc, EndpointConnectionError | BotoConnectionError) and not isinstance(
            _root_cause(exc), ConnectionResetError | aiohttp.ServerDisconnectedError
        ):
            return StorageError(
                f"{where}: cannot connect to {self._endpoint_text}: {_describe_network(exc)}{after}"
            )
        if isinstance(exc, ReadTimeoutError | TimeoutError):
            return StorageError(f"{where}: timed out waiting for {self._endpoint_text}{after}")
        if isinstance(
            exc,
            BotoConnectionError
            | HTTPClientError
            | IncompleteReadError
            | aiohttp.ClientError
            | OSError,
        ):
            return StorageError(
                f"{where}: connection to {self._endpoint_text} failed: "
                f"{_describe_network(exc)}{after}"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{where}: {_one_line(str(exc))}")
        return StorageError(f"{where}: {type(exc).__name__}: {_one_line(str(exc))}")

    def _backoff(self, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retry number ``attempt``, or None to give up."""
        if attempt > self.max_retries:
            return None
        cap = min(self.backoff_max, self.backoff_base * 2.0 ** (attempt - 1))
        delay = cap / 2 + random.uniform(0, cap / 2)
        if asyncio.get_running_loop().time() + delay > deadline:
            return None
        return delay

    async def _call(
        self,
        op: str,
        key: str | None,
        fn: Callable[[], Awaitable[T]],
        *,
        body_size: int = 0,
        translate: bool = True,
    ) -> T:
        """Run one S3 request with the outer retry loop; raise a StorageError when it gives up."""
        deadline = asyncio.get_running_loop().time() + self.retry_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self._attempt_timeout(body_size)):
                    return await fn()
            except Exception as exc:
                delay = self._backoff(attempt, deadline) if _is_retryable(exc) else None
                if delay is None:
                    if not translate:
                        raise
                    raise self._error(op, key, exc, attempt) from exc
                log.warning(
                    "%s: retrying in %.2fs",
                    self._error(op, key, exc, attempt),
                    delay,
                )
                await asyncio.sleep(delay)

    def _put_args(self) -> dict[str, str]:
        args: dict[str, str] = {}
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args

    async def _list(
        self, prefix: str, delimiter: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Pages of ListObjectsV2 below ``prefix`` (a full key prefix)."""
        client = await self._get_client()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": LIST_PAGE_SIZE,
            }
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = await self._call(
                "ListObjectsV2",
                prefix[len(self._root) :],
                functools.partial(client.list_objects_v2, **kwargs),
            )
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    # -- the StorageClient Protocol -------------------------------------------------------------

    async def init(self) -> None:
        """Check that the bucket exists and the credentials may use it (HeadBucket)."""
        client = await self._get_client()
        try:
            await self._call(
                "HeadBucket", None, lambda: client.head_bucket(Bucket=self.bucket), translate=False
            )
        except Exception as exc:
            raise self._error(None, None, exc) from exc

    async def generations(self) -> list[str]:
        """Generation ids present (holding at least one object), oldest first."""
        base = self._key(GENERATIONS_DIR + "/")
        candidates: set[str] = set()
        async for page in self._list(base, delimiter="/"):
            for cp in page.get("CommonPrefixes", ()):
                name = str(cp.get("Prefix", ""))[len(base) :].rstrip("/")
                if is_generation_id(name):
                    candidates.add(name)
        # Servers backed by a file system (SeaweedFS, ...) keep listing a "directory" after its
        # last object is deleted, so each candidate is checked for an object.
        client = await self._get_client()
        limit = asyncio.Semaphore(PROBE_CONCURRENCY)

        async def has_objects(gen: str) -> bool:
            async with limit:
                page: dict[str, Any] = await self._call(
                    "ListObjectsV2",
                    generation_prefix(gen),
                    functools.partial(
                        client.list_objects_v2,
                        Bucket=self.bucket,
                        Prefix=self._key(generation_prefix(gen)),
                        MaxKeys=1,
                    ),
                )
            return bool(page.get("Contents"))

        gens = sorted(candidates)
        present = await asyncio.gather(*(has_objects(g) for g in gens))
        return [g for g, ok in zip(gens, present, strict=True) if ok]

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation, sorted; keys that are not objects are skipped."""
        out: list[ObjectInfo] = []
        async for page in self._list(self._key(generation_prefix(generation))):
            for item in page.get("Contents", ()):
                info = parse_key(str(item["Key"])[len(self._root) :], int(item.get("Size", 0)))
                if info is not None and info.generation == generation:
                    out.append(info)
        return sorted(out)

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Stream ``data`` to ``info.key``: one PutObject if it fits in a part, else multipart."""
        client = await self._get_client()
        key = self._key(info.key)
        part = bytearray()
        total = 0
        upload: _MultipartUpload | None = None
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
                        upload = await _MultipartUpload.create(self, client, info.key, key)
                    # Wait for the part in flight first: memory stays at one part in flight
                    # plus the one filling. A full part is handed over, never copied.
                    await upload.wait()
                    upload.start(part)
                    part = bytearray()
                part += rest
            if upload is None:
                body = part
                try:
                    await self._call(
                        "PutObject",
                        info.key,
                        lambda: client.put_object(
                            Bucket=self.bucket, Key=key, Body=_BodyReader(body), **self._put_args()
                        ),
                        body_size=len(body),
                    )
                finally:
                    _release(body)
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

    def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream an object; a connection that breaks mid-body is resumed with a ranged GET."""
        return self._read(info.key)

    async def _read(self, rel_key: str) -> AsyncIterator[bytes]:
        client = await self._get_client()
        key = self._key(rel_key)
        offset = 0
        etag: str | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_timeout
        attempt = 0
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if offset:
                kwargs["Range"] = f"bytes={offset}-"
                if etag:
                    kwargs["IfMatch"] = etag
            resp: dict[str, Any] = await self._call(
                "GetObject", rel_key, functools.partial(client.get_object, **kwargs)
            )
            etag = etag or resp.get("ETag")
            try:
                async with resp["Body"] as body:
                    while True:
                        chunk = await body.read(DEFAULT_CHUNK_SIZE)
                        if not chunk:
                            return
                        offset += len(chunk)
                        # Progress renews the retry budget: only consecutive failures count.
                        attempt = 0
                        deadline = loop.time() + self.retry_timeout
                        yield chunk
            except Exception as exc:
                attempt += 1
                delay = self._backoff(attempt, deadline) if _is_retryable(exc) else None
                if delay is None:
                    raise self._error("GetObject", rel_key, exc, attempt) from exc
                log.warning(
                    "%s: resuming at byte %d in %.2fs",
                    self._error("GetObject", rel_key, exc, attempt),
                    offset,
                    delay,
                )
                await asyncio.sleep(delay)

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        """Delete objects in batches of 1000; absent ones are ignored."""
        await self._delete_keys([self._key(i.key) for i in infos])

    async def _delete_keys(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        client = await self._get_client()
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i : i + DELETE_BATCH]
            what = batch[0][len(self._root) :] + (
                f" and {len(batch) - 1} more" if batch[1:] else ""
            )
            resp: dict[str, Any] = await self._call(
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
                    f"{self.url}: DeleteObjects {str(first.get('Key', ''))[len(self._root) :]}: "
                    f"{first.get('Code', 'error')}: {_one_line(str(first.get('Message', '')))}"
                    + (f" ({len(errors)} objects not deleted)" if len(errors) > 1 else "")
                )

    async def delete_generation(self, generation: str) -> None:
        """Delete every object below a generation's prefix; an absent generation is ignored."""
        base = self._key(generation_prefix(generation))
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
        client = await self._get_client()
        body = bytes(data)
        await self._call(
            "PutObject",
            LEASE_KEY,
            lambda: client.put_object(
                Bucket=self.bucket,
                Key=self._key(LEASE_KEY),
                Body=_BodyReader(body),
                ContentType="application/json",
                **self._put_args(),
            ),
            body_size=len(body),
        )

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        self._client = None
        await self._stack.aclose()


def _release(data: bytearray) -> None:
    """Free a sent body now: the HTTP stack can keep a reference to it for a while."""
    with contextlib.suppress(BufferError):
        data.clear()


# botocore asks for "Expect: 100-continue" on every upload (it makes any body file-like), which
# costs a round trip before the body goes out; a body this small is simply sent.
SMALL_BODY = 1 << 20


def _no_expect_for_small_bodies(params: dict[str, Any], **kwargs: Any) -> None:
    """botocore ``before-call`` handler: drop ``Expect: 100-continue`` for small bodies."""
    headers = params.get("headers") or {}
    if "Expect" not in headers:
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size <= SMALL_BODY:
        del headers["Expect"]


class _BodyReader(io.RawIOBase):
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


class _MultipartUpload:
    """One multipart upload in progress: at most one part in flight while the next is read."""

    def __init__(self, storage: S3Storage, client: Any, rel_key: str, key: str, upload_id: str):
        self.storage = storage
        self.client = client
        self.rel_key = rel_key
        self.key = key
        self.upload_id = upload_id
        self.parts: list[dict[str, Any]] = []
        self.pending: asyncio.Task[dict[str, Any]] | None = None

    @classmethod
    async def create(
        cls, storage: S3Storage, client: Any, rel_key: str, key: str
    ) -> _MultipartUpload:
        resp: dict[str, Any] = await storage._call(
            "CreateMultipartUpload",
            rel_key,
            lambda: client.create_multipart_upload(
                Bucket=storage.bucket, Key=key, **storage._put_args()
            ),
        )
        return cls(storage, client, rel_key, key, str(resp["UploadId"]))

    async def _upload(self, number: int, data: bytearray) -> dict[str, Any]:
        try:
            resp: dict[str, Any] = await self.storage._call(
                "UploadPart",
                f"{self.rel_key} part {number}",
                lambda: self.client.upload_part(
                    Bucket=self.storage.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=_BodyReader(data),
                ),
                body_size=len(data),
            )
        finally:
            _release(data)
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
        s = self.storage
        try:
            await s._call(
                "CompleteMultipartUpload",
                self.rel_key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=s.bucket,
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
                raise s._error("CompleteMultipartUpload", self.rel_key, exc) from exc
        except Exception as exc:
            raise s._error("CompleteMultipartUpload", self.rel_key, exc) from exc

    async def _exists(self, size: int) -> bool:
        try:
            head = await self.client.head_object(Bucket=self.storage.bucket, Key=self.key)
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
                    Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id
                )
        except Exception as exc:
            log.warning(
                "%s: upload %s left incomplete (a lifecycle rule can expire it)",
                self.storage._error("AbortMultipartUpload", self.rel_key, exc),
                self.upload_id,
            )
