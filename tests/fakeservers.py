"""Fake notification receivers for tests: a real SMTP server (aiosmtpd, optional STARTTLS and
AUTH) and a real HTTP server that records webhook POSTs, both on 127.0.0.1 in threads, with
fixtures for them (shared through conftest.py)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from util import free_port

from replicator.notify import SmtpNotifier

__all__ = [
    "SMTP_PASSWORD",
    "SMTP_USER",
    "SmtpTestServer",
    "WebhookTestServer",
    "body_of",
    "self_signed_cert",
    "smtp_for",
    "smtp_plain",
    "smtp_tls",
    "webhook",
]

SMTP_USER = "alerts"
SMTP_PASSWORD = "s3cret-Pa55word"


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 (and ``localhost``): (cert.pem, key.pem)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replicator-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Handler:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        msg = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append((str(envelope.mail_from), list(envelope.rcpt_tos), msg))
        return "250 OK"


def _authenticator(
    server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == SMTP_USER.encode()
        and auth_data.password == SMTP_PASSWORD.encode()
    )
    # handled=False: let aiosmtpd answer "535" itself (True means "already answered")
    return AuthResult(success=ok, handled=False)


class SmtpTestServer:
    """A real SMTP server on 127.0.0.1 (aiosmtpd in its own thread) offering AUTH; with
    ``tls_dir`` it requires STARTTLS (self-signed certificate) and then AUTH."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        self.handler = _Handler()
        self.port = free_port()
        self.client_context: ssl.SSLContext | None = None
        kwargs: dict[str, Any] = {
            "authenticator": _authenticator,
            # aiosmtpd warns (an error here) about requiring AUTH without TLS: on the plain
            # server AUTH is offered but optional
            "auth_required": tls_dir is not None,
            "auth_require_tls": tls_dir is not None,
        }
        if tls_dir is not None:
            cert, key = self_signed_cert(tls_dir)
            server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server_ctx.load_cert_chain(cert, key)
            kwargs.update(tls_context=server_ctx, require_starttls=True)
            self.client_context = ssl.create_default_context(cafile=str(cert))
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, **kwargs)

    @property
    def messages(self) -> list[tuple[str, list[str], EmailMessage]]:
        """(envelope sender, envelope recipients, parsed message) per delivered mail."""
        return self.handler.messages

    def __enter__(self) -> SmtpTestServer:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


class WebhookTestServer:
    """A real HTTP server on 127.0.0.1 (in a thread) that records JSON POSTs and answers
    ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.requests.append((self.path, dict(self.headers.items()), json.loads(body)))
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        """The URL to POST to (with a path that stands for a secret token)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN"

    @property
    def payloads(self) -> list[Any]:
        """The JSON bodies received, in order."""
        return [r[2] for r in self.requests]

    def __enter__(self) -> WebhookTestServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook() -> Iterator[WebhookTestServer]:
    with WebhookTestServer() as w:
        yield w


@pytest.fixture
def smtp_plain() -> Iterator[SmtpTestServer]:
    with SmtpTestServer() as s:
        yield s


@pytest.fixture
def smtp_tls(tmp_path: Path) -> Iterator[SmtpTestServer]:
    with SmtpTestServer(tls_dir=tmp_path) as s:
        yield s


def body_of(msg: EmailMessage) -> str:
    """The text body with SMTP's CRLF line ends made LF."""
    return str(msg.get_content()).replace("\r\n", "\n")


def smtp_for(server: SmtpTestServer, **kw: Any) -> SmtpNotifier:
    args: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": server.port,
        "username": SMTP_USER,
        "password": SMTP_PASSWORD,
        "sender": "replicator@example.test",
        "recipients": ["dba@example.test", "oncall@example.test"],
        "timeout": 5.0,
    }
    args.update(kw)
    return SmtpNotifier(**args)
