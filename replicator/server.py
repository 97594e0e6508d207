"""The HTTP endpoints: ``/metrics`` (Prometheus), ``/healthz`` (process alive), ``/readyz``
(every replica syncing and within its database's ``ready-max-lag``) and ``/status`` (the state of
every database, replica and health check, as JSON; ``replicator status`` reads it). Served from a
thread; binds only where asked. Every answer is redacted (``replicator.redact``): no metric label
or status field shows a credential.

Control (POST, answered only to clients on the loopback interface, whatever address the server
listens on; others get 403): ``/snapshot?db=D`` takes a snapshot now, ``/sync?db=D&timeout=S``
returns once every destination holds everything committed so far, ``/verify?db=D`` runs a
restore drill. ``db`` is a database's name or path; each answers JSON with ``ok``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import os
import socketserver
import threading
import urllib.parse
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import ConfigError, ReplicatorError
from .fsutil import TMP_SUFFIX
from .redact import redact, redact_tree
from .threads import named

if TYPE_CHECKING:
    from .replicator import DatabaseService, Replicator

T = TypeVar("T")
# how long /status waits for the event loop to answer
STATUS_TIMEOUT = 5.0


class MetricsServer:
    """A running HTTP server (TCP, or a Unix socket at ``path``); ``close()`` stops it."""

    def __init__(self, httpd: socketserver.BaseServer, thread: threading.Thread,
                 path: str | None = None) -> None:
        self.httpd = httpd
        self.thread = thread
        self.path = path

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        addr = self.httpd.server_address
        assert isinstance(addr, tuple)
        return int(addr[1])

    def close(self) -> None:
        """Stop serving and join the thread."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


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


CONTROL_PATHS = ("/snapshot", "/sync", "/verify")
DEFAULT_SYNC_TIMEOUT = 60.0


def control(
    loop: asyncio.AbstractEventLoop, rep: Replicator, path: str, params: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """Run one control request on the event loop; ``(HTTP status, JSON document)``."""
    svc = rep.service(params.get("db"))
    if svc is None:
        names = ", ".join(s.cfg.name for s in rep.services)
        return 404, {"ok": False, "error": f"no database {params.get('db')!r} (have: {names})"}
    try:
        within = float(params.get("timeout", DEFAULT_SYNC_TIMEOUT))
    except ValueError:
        return 400, {"ok": False, "error": f"timeout: not a number: {params['timeout']!r}"}
    if path == "/snapshot":
        coro: Coroutine[Any, Any, dict[str, Any]] = _snapshot(svc)
    elif path == "/sync":
        coro = _sync(svc, within, params.get("wait", "1") != "0")
    else:
        coro = _verify(svc)
    try:
        doc = asyncio.run_coroutine_threadsafe(coro, loop).result()
    except TimeoutError as exc:
        return 504, {"ok": False, "db": svc.cfg.name, "error": str(exc)}
    except ReplicatorError as exc:
        return 500, {"ok": False, "db": svc.cfg.name, "error": str(exc)}
    return 200, doc


async def _snapshot(svc: DatabaseService) -> dict[str, Any]:
    info = await svc.snapshot_now()
    return {"ok": True, "db": svc.cfg.name, "generation": info.generation, "txid": info.end_txid,
            "key": info.key}


async def _sync(svc: DatabaseService, within: float, wait: bool) -> dict[str, Any]:
    gen, txid = await svc.sync_wait(within, wait=wait)
    return {"ok": True, "db": svc.cfg.name, "generation": gen, "txid": txid,
            "replicas": [r.name for r in svc.replicas]}


async def _verify(svc: DatabaseService) -> dict[str, Any]:
    result = await svc.driller.run_once()
    return {"db": svc.cfg.name, **result.to_json()}


class _Quiet(BaseHTTPRequestHandler):
    """A request handler that answers with one whole body and logs nothing."""

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return


class _Endpoints(_Quiet):
    """The HTTP endpoints of one replicator (set ``rep`` and ``loop`` in a subclass)."""

    rep: Replicator
    loop: asyncio.AbstractEventLoop

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path, rep = self.path.split("?", 1)[0], self.rep
        if path == "/metrics":
            body = redact(generate_latest(rep.metrics.registry).decode()).encode()
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
                doc = _in_loop(self.loop, lambda: status(rep), STATUS_TIMEOUT)
            except (TimeoutError, RuntimeError):  # busy, or shutting down
                self._send(503, b"status unavailable\n", "text/plain")
                return
            body = json.dumps(redact_tree(doc), indent=2).encode() + b"\n"
            self._send(200, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        path, _, query = self.path.partition("?")
        if path not in CONTROL_PATHS:
            self._send(404, b"not found\n", "text/plain")
            return
        if not ipaddress.ip_address(self.client_address[0]).is_loopback:
            self._send(403, b"control is only answered on loopback\n", "text/plain")
            return
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        code, doc = control(self.loop, self.rep, path, params)
        self._send(code, json.dumps(doc).encode() + b"\n", "application/json")


async def start_server(addr: str, rep: Replicator) -> MetricsServer:
    """Serve the endpoints on ``HOST:PORT`` in a background thread."""
    host, _, port_s = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    handler = type("Handler", (_Endpoints,), {"rep": rep, "loop": asyncio.get_running_loop()})
    try:
        httpd = ThreadingHTTPServer((host, int(port_s)), handler)
    except OSError as exc:
        raise ConfigError(f"metrics-addr {addr}: cannot listen: {exc.strerror}") from None
    httpd.daemon_threads = True
    t = threading.Thread(target=named(httpd.serve_forever), name="replicator-http",
                         daemon=True)
    t.start()
    return MetricsServer(httpd, t)


CONTROL_SOCKET = "control.sock"


def control_socket_path(spool_dir: str) -> str:
    """Where a database's control socket lives: in its spool directory."""
    return os.path.join(spool_dir, CONTROL_SOCKET)


class _UnixHTTPServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def start_control_socket(
    loop: asyncio.AbstractEventLoop, rep: Replicator, svc: DatabaseService
) -> MetricsServer:
    """Serve the control requests of one database on a Unix socket in its spool directory,
    readable and writable by this user only (bound at a temp name, then renamed)."""
    path = control_socket_path(svc.cfg.spool_dir)
    name = svc.cfg.name

    class Handler(_Quiet):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            req, _, query = self.path.partition("?")
            if req not in CONTROL_PATHS:
                self._reply(404, {"ok": False, "error": "not found"})
                return
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
            params["db"] = name
            self._reply(*control(loop, rep, req, params))

        def _reply(self, code: int, doc: dict[str, Any]) -> None:
            self._send(code, json.dumps(doc).encode() + b"\n", "application/json")

        def address_string(self) -> str:
            return path

    os.makedirs(svc.cfg.spool_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}{TMP_SUFFIX}"  # short: a socket path has ~100 bytes at most
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        httpd = _UnixHTTPServer(tmp, Handler)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ReplicatorError(f"control socket {path}: {exc.strerror or exc}") from None
    t = threading.Thread(target=named(httpd.serve_forever), name="replicator-control",
                         daemon=True)
    t.start()
    return MetricsServer(httpd, t, path)
