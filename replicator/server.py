"""The HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` (process alive) and ``/readyz``
(every replica syncing and within its lag limit). Served from a thread; binds only where asked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import ConfigError

if TYPE_CHECKING:
    from .replicator import Replicator

DEFAULT_READY_MAX_LAG = 60.0


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


def readiness(rep: Replicator, max_lag: float = DEFAULT_READY_MAX_LAG) -> tuple[bool, Any]:
    """Whether every replica is up and within ``max_lag`` seconds, with the details."""
    detail = []
    ok = True
    for s in rep.services:
        for r in s.replicas:
            good = r.healthy and r.lag <= max_lag
            ok = ok and good
            detail.append({"db": s.cfg.name, "replica": r.name, "healthy": r.healthy,
                           "lag_seconds": round(r.lag, 3), "error": r.last_error})
    return ok, detail


async def start_server(addr: str, rep: Replicator) -> MetricsServer:
    """Serve the endpoints on ``HOST:PORT`` in a background thread."""
    host, _, port_s = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    registry = rep.metrics.registry

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = generate_latest(registry)
                self._send(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif path == "/readyz":
                ok, detail = readiness(rep)
                body = json.dumps({"ready": ok, "replicas": detail}).encode() + b"\n"
                self._send(200 if ok else 503, body, "application/json")
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
