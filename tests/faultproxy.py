"""A TCP proxy on 127.0.0.1 with switchable faults, for testing clients against a flaky server.

The proxy runs its own asyncio loop in a thread, so it serves sync tests, async tests and
subprocesses alike. Faults::

    PASS    forward bytes both ways
    RESET   accept, then close with a TCP reset before any byte is exchanged
    STALL   accept and read the request, never answer
    SLOW    forward, but trickle the server's bytes (``slow_chunk`` bytes every ``slow_delay`` s)
    CUT     forward ``cut_after`` bytes of the server's answer, then reset
    HTTP    answer every request with ``http_status``/``error_code`` (an S3 XML error) and close
    DOWN    stop listening: new connections are refused

``set(fault, count=n)`` applies a fault to the next ``n`` new connections and then reverts to PASS
(``count=None``: until changed). Switching to a fault resets the connections already open, so a
client's pooled keep-alive connections see it too. ``faulted`` counts connections that got a fault;
``connections`` counts every connection accepted and ``client_bytes`` every byte a client sent
(zero growth of both means the client made no request).

    with FaultProxy(("127.0.0.1", 8333)) as proxy:
        proxy.set(Fault.RESET, count=3)
        ... connect to proxy.endpoint ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class Fault(enum.Enum):
    """What the proxy does with a connection."""

    PASS = "pass"
    RESET = "reset"
    STALL = "stall"
    SLOW = "slow"
    CUT = "cut"
    HTTP = "http"
    DOWN = "down"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A threaded TCP proxy from ``127.0.0.1:<port>`` to ``target``."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.port = port
        self.fault = Fault.PASS
        self.count: int | None = None
        self.slow_chunk = 512
        self.slow_delay = 0.001
        self.cut_after = 0
        self.http_status = 503
        self.error_code = "SlowDown"
        self.connections = 0
        self.faulted = 0
        self.client_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Start the loop thread and listen."""
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait()
        self._run(self._listen)
        return self

    def stop(self) -> None:
        """Close every connection, stop listening and end the thread."""
        if self._loop is None or self._thread is None:
            return
        self._run(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function on the proxy's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _shutdown(self) -> None:
        await self._unlisten()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _drop_all(self) -> None:
        for w in list(self._writers):
            _reset(w)
        self._writers.clear()

    # -- control --------------------------------------------------------------------------------

    def set(self, fault: Fault, count: int | None = None, *, drop_existing: bool = True) -> None:
        """Apply ``fault`` to the next ``count`` connections (None: until changed)."""

        async def apply() -> None:
            self.fault = fault
            self.count = count
            if fault is not Fault.PASS and drop_existing:
                self._drop_all()
            if fault is Fault.DOWN:
                await self._unlisten()
            elif self._server is None:
                await self._listen()

        self._run(apply)

    def _take_fault(self) -> Fault:
        fault = self.fault
        if fault is Fault.PASS:
            return fault
        self.faulted += 1
        if self.count is not None:
            self.count -= 1
            if self.count <= 0:
                self.fault, self.count = Fault.PASS, None
        return fault

    # -- connections ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        fault = self._take_fault()
        upstream: asyncio.StreamWriter | None = None
        try:
            if fault is Fault.RESET:
                _reset(writer)
                return
            if fault is Fault.STALL:
                while data := await reader.read(65536):
                    self.client_bytes += len(data)
                return
            if fault is Fault.HTTP:
                await self._http_error(reader, writer)
                return
            up_reader, upstream = await asyncio.open_connection(*self.target)
            self._writers.add(upstream)
            limit = self.cut_after if fault is Fault.CUT else None
            await asyncio.gather(
                self._pipe(reader, upstream, slow=False, limit=None, count=True),
                self._pipe(up_reader, writer, slow=fault is Fault.SLOW, limit=limit),
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        *,
        slow: bool,
        limit: int | None,
        count: bool = False,
    ) -> None:
        sent = 0
        try:
            while data := await src.read(65536):
                if count:
                    self.client_bytes += len(data)
                if limit is not None and sent + len(data) >= limit:
                    dst.write(data[: limit - sent])
                    await dst.drain()
                    _reset(dst)
                    return
                if slow:
                    for i in range(0, len(data), self.slow_chunk):
                        dst.write(data[i : i + self.slow_chunk])
                        await dst.drain()
                        await asyncio.sleep(self.slow_delay)
                else:
                    dst.write(data)
                    await dst.drain()
                sent += len(data)
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            _reset(dst)

    async def _http_error(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read one request head (and its body, if it says how long), answer with an error."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.client_bytes += len(head)
        length = 0
        expect_continue = False
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"expect" and value.strip().lower() == b"100-continue":
                expect_continue = True  # the body only follows a 100: answer at once
        if length and not expect_continue:
            await reader.readexactly(length)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.error_code}</Code><Message>injected by faultproxy</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        writer.write(
            f"HTTP/1.1 {self.http_status} Injected\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
