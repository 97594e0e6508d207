"""The HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` (process alive), ``/readyz``
(every replica syncing and within its database's ``ready-max-lag``) and ``/status`` (the state of
every database, replica and health check, as JSON; ``replicator status`` reads it). Served from a
thread; binds only where asked. Every answer is redacted (``replicator.redact``): no metric label
or status field shows a credential."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import ConfigError
from .redact import redact, redact_tree

if TYPE_CHECKING:
    from .replicator import Replicator

T = TypeVar("T")
# how long /status waits for the event loop to answer
STATUS_TIMEOUT = 5.0


class MetricsServer:
    """A running HTTP server; ``close()`` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self.httpd.server_address[1])

    def close(self) -> None:
        """Stop serving and join the thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def readiness(rep: Replicator) -> tuple[bool, Any]:
    """Whether every replica is up and within its database's ``ready_max_lag`` seconds, with
    the details."""
    detail = []
    ok = True
    for s in rep.services:
        max_lag = s.cfg.ready_max_lag
        for r in s.replicas:
            good = r.healthy and r.lag <= max_lag
            ok = ok and good
            detail.append({"db": s.cfg.name, "replica": r.name, "healthy": r.healthy,
                           "lag_seconds": round(r.lag, 3), "max_lag_seconds": max_lag,
                           "error": r.last_error})
    return ok, detail


def status(rep: Replicator) -> dict[str, Any]:
    """The ``/status`` document: readiness plus :meth:`Replicator.status`."""
    ok, _ = readiness(rep)
    return {"ready": ok, **rep.status()}


def _in_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` on the event loop (where the state it reads changes) and wait for it."""
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return fut.result(timeout)


async def start_server(addr: str, rep: Replicator) -> MetricsServer:
    """Serve the endpoints on ``HOST:PORT`` in a background thread."""
    host, _, port_s = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    registry = rep.metrics.registry
    loop = asyncio.get_running_loop()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = redact(generate_latest(registry).decode()).encode()
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok, detail = readiness(rep)
                doc = redact_tree({"ready": ok, "replicas": detail})
                body = json.dumps(doc).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")
            elif path == "/status":
                try:
                    doc = _in_loop(loop, lambda: status(rep), STATUS_TIMEOUT)
                except (TimeoutError, RuntimeError):  # busy, or shutting down
                    self._send(503, b"status unavailable\n", "text/plain")
                    return
                body = json.dumps(redact_tree(doc), indent=2).encode() + b"\n"
                self._send(200, body, "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

    try:
        httpd = ThreadingHTTPServer((host, int(port_s)), Handler)
    except OSError as exc:
        raise ConfigError(f"metrics-addr {addr}: cannot listen: {exc.strerror}") from None
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, name="replicator-http", daemon=True)
    t.start()
    return MetricsServer(httpd, t)
