"""Requests to one S3 bucket: the aiobotocore client, the retry loop around every request, and
the translation of every failure into a one-line :class:`StorageError`.

Failures are retried on two levels: botocore retries each HTTP request (``retry_mode``,
``request_attempts``), and every operation is wrapped in a second loop that retries throttling,
5xx, timeouts and dropped connections with the project's backoff (:class:`replicator.retry.Backoff`:
exponential, full jitter, capped at ``backoff_max``), at most ``max_retries`` times and never past
``retry_timeout`` seconds. :func:`is_retryable` is the one place that decides what is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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
from botocore.loaders import JSONFileLoader, create_loader
from botocore.utils import determine_content_length

from ..errors import NotFoundError, StorageError
from ..retry import Backoff
from .s3_options import S3Options

log = logging.getLogger(__name__)

# A request that moves a body may take this long per byte on top of its timeouts before the
# attempt is abandoned: aiohttp has no write timeout, and a peer that stops reading would hang.
MIN_THROUGHPUT = 64 * 1024
BOTOCORE_MAX_BACKOFF = 20.0  # botocore's cap on the wait between its own attempts
# botocore asks for "Expect: 100-continue" on every upload (it makes any body file-like), which
# costs a round trip before the body goes out; a body this small is simply sent.
SMALL_BODY = 1 << 20

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
# errors of the connection rather than of the request
_NETWORK_ERRORS = (
    BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientError, OSError
)

T = TypeVar("T")

_loader: Any = None


def _plain(value: Any) -> Any:
    """``value`` with every mapping in it a plain dict (insertion-ordered, as the JSON was)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class _PlainJSONFileLoader(JSONFileLoader):  # type: ignore[misc]
    """botocore's JSON file loader, whose data holds plain dicts rather than OrderedDicts:
    the S3 model and the endpoint data it keeps for the life of the process take 4 MiB less
    (an OrderedDict is about twice a dict's size; nothing botocore does with them needs
    more than a dict, which keeps its order)."""

    def load_file(self, file_path: str) -> Any:
        return _plain(super().load_file(file_path))


def _shared_loader(session: Any) -> Any:
    """One botocore data loader for every client: it caches the parsed service model and
    endpoint rules (megabytes of JSON), while each client still gets its own session and so
    resolves credentials afresh."""
    global _loader
    if _loader is None:
        _loader = create_loader(session.get_config_variable("data_path"))
        _loader.file_loader = _PlainJSONFileLoader()
    return _loader


def _warm_up(loader: Any) -> None:
    """Load into ``loader``'s caches what creating an S3 client reads from disk, called as
    botocore calls it (the cache keys include how the arguments were passed). Run on a worker,
    so the event loop never waits for those files. aiobotocore's own warm-up would load every
    model of the service (paginators, waiters, documentation examples): twice the time."""
    for name in ("_retry", "endpoints", "partitions", "sdk-default-configuration"):
        loader.load_data_with_path(name)
    loader.load_service_model("s3", type_name="service-2", api_version=None)
    loader.load_service_model("s3", "service-2", api_version=None)
    loader.load_service_model("s3", "endpoint-rule-set-1", api_version=None)


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line, at most ``limit`` characters."""
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
    return one_line(str(root)) or type(root).__name__


def _code_status(exc: ClientError) -> tuple[str, int]:
    """The error code and HTTP status of a service error."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return code, status


def _server_trouble(code: str, status: int) -> bool:
    """Whether a service error is the server's (throttling, 5xx): the request may succeed later."""
    return status >= 500 or status == 429 or code in _THROTTLE_CODES


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed request may succeed if sent again: throttling, 5xx, timeouts and
    dropped connections; never missing credentials or a request the server refused."""
    if isinstance(exc, ClientError):
        return _server_trouble(*_code_status(exc))
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return False
    return isinstance(exc, TimeoutError) or isinstance(exc, _NETWORK_ERRORS)


def _no_expect_for_small_bodies(params: dict[str, Any], **kwargs: Any) -> None:
    """botocore ``before-call`` handler: drop ``Expect: 100-continue`` for small bodies."""
    headers = params.get("headers") or {}
    if "Expect" not in headers:
        return
    size = determine_content_length(params.get("body"))
    if size is not None and size <= SMALL_BODY:
        del headers["Expect"]


_Clients = dict[tuple[object, ...], tuple[Any, contextlib.AsyncExitStack, int]]


class _SharedClients:
    """The process's aiobotocore clients by settings, each with its users counted; clients and
    locks belong to one event loop each (and go with it)."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Lock, _Clients]] = weakref.WeakKeyDictionary()

    def _mine(self) -> tuple[asyncio.Lock, _Clients]:
        loop = asyncio.get_running_loop()
        if loop not in self._loops:
            self._loops[loop] = (asyncio.Lock(), {})
        return self._loops[loop]

    async def acquire(self, key: tuple[object, ...], create: Any) -> Any:
        lock, clients = self._mine()
        async with lock:
            entry = clients.get(key)
            if entry is None:
                stack = contextlib.AsyncExitStack()
                entry = (await create(stack), stack, 0)
            client, stack, users = entry
            clients[key] = (client, stack, users + 1)
            return client

    async def release(self, key: tuple[object, ...]) -> None:
        lock, clients = self._mine()
        async with lock:
            entry = clients.get(key)
            if entry is None:
                return
            client, stack, users = entry
            if users > 1:
                clients[key] = (client, stack, users - 1)
                return
            del clients[key]
        await stack.aclose()


_SHARED = _SharedClients()


class S3Requests:
    """The requests of one S3 replica: a lazily created client and :meth:`call`, which retries
    and translates failures. Keys given to it are relative to the replica's prefix."""

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self.url = options.url
        self.bucket = options.bucket
        self.root = f"{options.prefix}/" if options.prefix else ""
        self.backoff = Backoff(options.backoff_base, options.backoff_max)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def key(self, key: str) -> str:
        """The full object key of a key relative to the prefix."""
        return self.root + key

    def put_args(self) -> dict[str, str]:
        """The PutObject / CreateMultipartUpload arguments every write carries."""
        o = self.options
        args: dict[str, str] = {}
        if o.storage_class:
            args["StorageClass"] = o.storage_class
        if o.sse:
            args["ServerSideEncryption"] = o.sse
        if o.sse_kms_key_id:
            args["SSEKMSKeyId"] = o.sse_kms_key_id
        return args

    @property
    def _endpoint_text(self) -> str:
        if self.options.endpoint:
            return self.options.endpoint
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return "the S3 endpoint"

    async def client(self) -> Any:
        """The aiobotocore client (created on first use): one shared by every replica of the
        process with the same endpoint, region and client settings, so that a thousand
        databases do not hold a thousand clients and connection pools."""
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await _SHARED.acquire(self._shared_key(), self._create_client)
        return self._client

    def _shared_key(self) -> tuple[object, ...]:
        o = self.options
        return (o.region, o.endpoint, o.force_path_style,
                o.connect_timeout, o.read_timeout, o.retry_mode, o.request_attempts)

    async def _create_client(self, stack: contextlib.AsyncExitStack) -> Any:
        o = self.options
        config = AioConfig(
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            retries={"mode": o.retry_mode, "total_max_attempts": o.request_attempts},
            s3={"addressing_style": "path" if o.force_path_style else "auto"},
        )
        session = get_session()
        loader = _shared_loader(session)
        session.register_component("data_loader", loader)
        await asyncio.to_thread(_warm_up, loader)
        # timestamps (LastModified of every listed object) stay text: nothing here reads them,
        # and parsing them with dateutil is most of the cost of a long listing
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=str
        )
        client = await stack.enter_async_context(
            session.create_client(
                "s3", region_name=o.region, endpoint_url=o.endpoint, config=config
            )
        )
        # registered after botocore's own handler, so it runs after it
        client.meta.events.register("before-call.s3", _no_expect_for_small_bodies)
        return client

    async def aclose(self) -> None:
        """Let go of the client (closed, with its connection pool, by the last replica that
        used it)."""
        if self._client is not None:
            self._client = None
            await _SHARED.release(self._shared_key())
        await self._stack.aclose()

    def _attempt_timeout(self, body_size: int) -> float:
        """How long one attempt (botocore's requests and its backoff between them) may take.

        aiohttp starts its read timeout only once a body is sent, so a server that never
        answers ``Expect: 100-continue`` or stops reading the body would otherwise hang forever.
        """
        o = self.options
        per_request = o.connect_timeout + o.read_timeout + body_size / MIN_THROUGHPUT
        backoff = sum(min(2.0**i, BOTOCORE_MAX_BACKOFF) for i in range(o.request_attempts - 1))
        return per_request * o.request_attempts + backoff

    def retry_delay(self, exc: BaseException, attempt: int, deadline: float) -> float | None:
        """Seconds to wait before retry number ``attempt`` after ``exc``, or None to give up
        (not retryable, out of retries, or past ``deadline`` on the loop's clock)."""
        if not is_retryable(exc) or attempt > self.options.max_retries:
            return None
        delay = self.backoff.delay(attempt)
        if asyncio.get_running_loop().time() + delay > deadline:
            return None
        return delay

    def deadline(self) -> float:
        """When a retry loop starting now must give up, on the loop's clock."""
        return asyncio.get_running_loop().time() + self.options.retry_timeout

    async def call(
        self,
        op: str,
        key: str | None,
        fn: Callable[[], Awaitable[T]],
        *,
        body_size: int = 0,
        translate: bool = True,
    ) -> T:
        """Run one S3 request with the retry loop; raise a StorageError when it gives up (the
        original error with ``translate=False``)."""
        deadline = self.deadline()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self._attempt_timeout(body_size)):
                    return await fn()
            except Exception as exc:
                delay = self.retry_delay(exc, attempt, deadline)
                if delay is None:
                    if not translate:
                        raise
                    raise self.error(op, key, exc, attempt) from exc
                log.warning("%s: retrying in %.2fs", self.error(op, key, exc, attempt), delay)
                await asyncio.sleep(delay)

    def error(
        self, op: str | None, key: str | None, exc: BaseException, attempts: int = 1
    ) -> StorageError:
        """Translate any failure into a one-line StorageError naming the operation and key."""
        where = self.url
        if op:
            where += f": {op}" + (f" {key}" if key else "")
        after = f" (after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(exc, ClientError):
            return self._service_error(exc, where, op, key, after)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"{where}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)"
            )
        endpoint = self._endpoint_text
        if isinstance(exc, ConnectTimeoutError):
            return StorageError(f"{where}: cannot connect to {endpoint}: timed out{after}")
        if isinstance(exc, EndpointConnectionError | BotoConnectionError) and not isinstance(
            _root_cause(exc), ConnectionResetError | aiohttp.ServerDisconnectedError
        ):
            return StorageError(
                f"{where}: cannot connect to {endpoint}: {_describe_network(exc)}{after}"
            )
        if isinstance(exc, ReadTimeoutError | TimeoutError):
            return StorageError(f"{where}: timed out waiting for {endpoint}{after}")
        if isinstance(exc, _NETWORK_ERRORS):
            return StorageError(
                f"{where}: connection to {endpoint} failed: {_describe_network(exc)}{after}"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{where}: {one_line(str(exc))}")
        return StorageError(f"{where}: {type(exc).__name__}: {one_line(str(exc))}")

    def _service_error(
        self, exc: ClientError, where: str, op: str | None, key: str | None, after: str
    ) -> StorageError:
        """The StorageError for an error the server answered with."""
        code, status = _code_status(exc)
        message = one_line(str(exc.response.get("Error", {}).get("Message", "")))
        if code == "NoSuchKey" or (status == 404 and op in ("GetObject", "HeadObject")):
            return NotFoundError(f"{self.url}: {key}: object not found")
        if code == "NoSuchBucket" or (status == 404 and op is None):
            return StorageError(f"{self.url}: bucket {self.bucket!r} does not exist")
        if code in _CREDENTIAL_CODES:
            return StorageError(f"{where}: {_CREDENTIAL_CODES[code]}")
        if code == "AccessDenied" or status == 403:
            return StorageError(f"{where}: access denied (check credentials)")
        if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            return StorageError(
                f"{where}: bucket {self.bucket!r} is in another region (set region=)"
            )
        detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
        if _server_trouble(code, status):
            return StorageError(f"{where}: server error {detail}{after}")
        return StorageError(f"{where}: {detail}")
