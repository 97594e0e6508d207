"""A recording HTTP/1.1 reverse proxy for bench/s3.py: sits between the tools and the S3 server,
forwards every byte unchanged (the Host header too, so SigV4 signatures stay valid) and prints one
line per request/response pair on stdout.

    python bench/_s3proxy.py --upstream 127.0.0.1:PORT

The first line is ``LISTEN <port>`` (127.0.0.1, a free port); then, per exchange, tab-separated:
``t_req t_resp t_done method kind status bucket key req_bytes resp_bytes interim`` where the times
are
``time.perf_counter()`` (CLOCK_MONOTONIC, the same clock in every process on the machine):
``t_req`` when the request head arrived, ``t_resp`` when the server's response head arrived (the
moment the server said it is done: it is forwarded at once), ``t_done`` when the response body was
forwarded. ``key`` is percent-decoded (path-style addressing: /bucket/key); ``-`` when empty.
``interim`` counts the 1xx answers before the final one (``100 Continue`` to a request that sent
``Expect: 100-continue`` and waited for it before sending its body).

Each client connection gets its own upstream connection; two tasks pump the two directions, so
``Expect: 100-continue`` and pipelining work as they would without the proxy. Requests and
responses are matched in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import deque
from urllib.parse import parse_qsl, unquote, urlsplit

CHUNK = 1 << 18
HEAD_LIMIT = 1 << 20


def classify(method: str, target: str) -> tuple[str, str, str]:
    """(kind, bucket, key) of an S3 request in path style."""
    parts = urlsplit(target)
    path = unquote(parts.path)
    q = dict(parse_qsl(parts.query, keep_blank_values=True))
    bucket, _, key = path.lstrip("/").partition("/")
    if method == "PUT":
        if "partNumber" in q and "uploadId" in q:
            return "PART", bucket, key
        return ("PUT" if key else "PUT-BUCKET"), bucket, key
    if method == "POST":
        if "uploads" in q:
            return "MPU-CREATE", bucket, key
        if "uploadId" in q:
            return "MPU-COMPLETE", bucket, key
        if "delete" in q:
            return "DELETE-MULTI", bucket, key
        return "POST", bucket, key
    if method == "DELETE":
        return ("MPU-ABORT" if "uploadId" in q else "DELETE"), bucket, key
    if method == "GET":
        if not key:
            return ("LIST-MPU" if "uploads" in q else "LIST"), bucket, q.get("prefix", "")
        return ("LIST-PARTS" if "uploadId" in q else "GET"), bucket, key
    return method, bucket, key


def parse_head(raw: bytes) -> tuple[str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


async def relay_exact(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> int:
    left = n
    while left:
        buf = await r.read(min(CHUNK, left))
        if not buf:
            raise ConnectionError("peer closed inside a body")
        w.write(buf)
        left -= len(buf)
        if w.transport.get_write_buffer_size() > CHUNK:
            await w.drain()
    return n


async def relay_chunked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> int:
    total = 0
    while True:
        line = await r.readuntil(b"\r\n")
        w.write(line)
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, then the empty line
                t = await r.readuntil(b"\r\n")
                w.write(t)
                if t == b"\r\n":
                    return total
        total += await relay_exact(r, w, size + 2) - 2


async def relay_body(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                     headers: dict[str, str]) -> int:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await relay_chunked(r, w)
    n = int(headers.get("content-length", "0") or 0)
    return await relay_exact(r, w, n) if n else 0


class Exchange:
    __slots__ = ("t_req", "method", "kind", "bucket", "key", "req_bytes", "interim")

    def __init__(self, t_req: float, method: str, kind: str, bucket: str, key: str) -> None:
        self.t_req = t_req
        self.method = method
        self.kind = kind
        self.bucket = bucket
        self.key = key
        self.req_bytes = 0
        self.interim = 0


def emit(x: Exchange, t_resp: float, t_done: float, status: int, resp_bytes: int) -> None:
    sys.stdout.write(f"{x.t_req:.6f}\t{t_resp:.6f}\t{t_done:.6f}\t{x.method}\t{x.kind}\t{status}"
                     f"\t{x.bucket or '-'}\t{x.key or '-'}\t{x.req_bytes}\t{resp_bytes}"
                     f"\t{x.interim}\n")
    sys.stdout.flush()


class Conn:
    """One client connection and its upstream connection."""

    def __init__(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 ur: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.pending: deque[Exchange] = deque()
        self.arrived = asyncio.Event()

    async def requests(self) -> None:
        while True:
            try:
                raw = await self.cr.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            t = time.perf_counter()
            line, headers = parse_head(raw)
            method, target = line.split(" ", 2)[:2]
            x = Exchange(t, method, *classify(method, target))
            self.pending.append(x)
            self.arrived.set()
            self.uw.write(raw)
            x.req_bytes = await relay_body(self.cr, self.uw, headers)
            await self.uw.drain()

    async def next_exchange(self) -> Exchange:
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        return self.pending.popleft()

    async def responses(self) -> None:
        ur, cw = self.ur, self.cw
        while True:
            try:
                raw = await ur.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            t_resp = time.perf_counter()
            line, headers = parse_head(raw)
            status = int(line.split(" ", 2)[1])
            cw.write(raw)
            if 100 <= status < 200:  # interim (100 Continue): the request goes on
                if self.pending:
                    self.pending[0].interim += 1
                await cw.drain()
                continue
            x = await self.next_exchange()
            if x.method == "HEAD" or status in (204, 304):
                n = 0
            elif "content-length" in headers or "chunked" in headers.get(
                    "transfer-encoding", "").lower():
                n = await relay_body(ur, cw, headers)
            else:  # until the server closes
                n = 0
                while buf := await ur.read(CHUNK):
                    cw.write(buf)
                    n += len(buf)
                    await cw.drain()
            await cw.drain()
            emit(x, t_resp, time.perf_counter(), status, n)
            if headers.get("connection", "").lower() == "close":
                return


async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter, upstream: tuple[str, int]
                 ) -> None:
    try:
        ur, uw = await asyncio.open_connection(*upstream, limit=HEAD_LIMIT)
    except OSError:
        cw.close()
        return
    conn = Conn(cr, cw, ur, uw)
    tasks = [asyncio.create_task(conn.requests()), asyncio.create_task(conn.responses())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for w in (uw, cw):
            with contextlib.suppress(Exception):
                w.close()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    upstream = (host, int(port))
    server = await asyncio.start_server(lambda r, w: handle(r, w, upstream), "127.0.0.1", 0,
                                        limit=HEAD_LIMIT)
    sys.stdout.write(f"LISTEN {server.sockets[0].getsockname()[1]}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
