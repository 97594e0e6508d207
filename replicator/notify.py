"""Notifications when a health check or the replication changes state: e-mail (SMTP) and webhooks
(JSON POST).

A :class:`Notifier` fans one :class:`Notification` out to every channel it was given
(:class:`SmtpNotifier`, :class:`WebhookNotifier`, or anything with the :class:`Channel` shape).
It rate-limits per ``(db, check)`` key:

* a ``failing`` notification is sent when no ``failing`` one was sent for the key within
  ``min_interval``; otherwise it is held back and :meth:`Notifier.flush` sends it once the
  interval has passed, if the check is still failing (so a persistent failure is never hidden);
* a ``recovered`` notification is always sent when the last notification *sent* for the key was
  ``failing``. A recovery from a failure that was held back is dropped: the receiver's last word
  was already "recovered", which is true again (flapping checks do not flood the inbox).

Delivery runs the blocking stdlib clients (``smtplib``, ``urllib``) in a thread. A channel that
fails is logged (one line, without credentials) and counted in ``replicator_errors_total`` with
``operation="notify"``; it never raises into the caller.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Literal, Protocol

from .metrics import Metrics

DEFAULT_MIN_INTERVAL = 600.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_SMTP_PORT = 25
DEFAULT_SENDER = "replicator@localhost"
NOTIFY_OPERATION = "notify"
SUBJECT_PREFIX = "[replicator]"

State = Literal["failing", "recovered", "notice"]
FAILING: State = "failing"
RECOVERED: State = "recovered"
NOTICE: State = "notice"
"""An event with no "recovered" to follow (a new generation), de-duplicated like ``failing``."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notification:
    """One state change of one health check of one database, as delivered to every channel."""

    db: str
    check: str
    state: State
    reason: str
    time: float
    """When the check changed state (unix seconds)."""
    hostname: str
    value: float | None = None
    suppressed: int = 0
    """State changes of this key not notified (rate limit) since the last notification sent."""

    @property
    def iso_time(self) -> str:
        """``time`` as an ISO-8601 UTC timestamp."""
        return dt.datetime.fromtimestamp(self.time, dt.UTC).isoformat(timespec="seconds")

    @property
    def subject(self) -> str:
        """A one-line summary, used as the e-mail subject and the webhook ``text``."""
        return f"{SUBJECT_PREFIX} {self.state.upper()}: {self.check} on {self.db} ({self.hostname})"

    def body(self) -> str:
        """The plain-text message body: one ``key: value`` line per field."""
        lines = [
            f"state: {self.state}",
            f"db: {self.db}",
            f"check: {self.check}",
            f"reason: {self.reason}",
            f"value: {'' if self.value is None else self.value}",
            f"time: {self.iso_time}",
            f"hostname: {self.hostname}",
        ]
        if self.suppressed:
            lines.append(f"suppressed: {self.suppressed} earlier state change(s) (rate limit)")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        """The webhook payload."""
        return {
            "text": self.subject,
            "db": self.db,
            "check": self.check,
            "state": self.state,
            "reason": self.reason,
            "value": self.value,
            "time": self.iso_time,
            "timestamp": self.time,
            "hostname": self.hostname,
            "suppressed": self.suppressed,
        }


class Channel(Protocol):
    """Something that delivers a notification, raising on failure."""

    @property
    def name(self) -> str:
        """A short name for logs, without secrets (e.g. ``smtp mail.example.com:587``)."""
        ...

    async def send(self, notification: Notification) -> None:
        """Deliver ``notification``; raise on failure."""
        ...


@dataclass
class SmtpNotifier:
    """Sends e-mail through an SMTP server with the stdlib ``smtplib`` (in a thread).

    ``starttls`` upgrades the connection with STARTTLS before ``username``/``password`` are used
    (verified against ``ssl_context``, the system CAs by default). Without ``starttls``, AUTH is
    sent in the clear: only use that on loopback.
    """

    host: str
    port: int = DEFAULT_SMTP_PORT
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sender: str = DEFAULT_SENDER
    recipients: Sequence[str] = ()
    timeout: float = DEFAULT_TIMEOUT
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """``smtp host:port``."""
        return f"smtp {self.host}:{self.port}"

    def build_message(self, notification: Notification) -> EmailMessage:
        """The e-mail for ``notification``."""
        msg = EmailMessage()
        msg["Subject"] = notification.subject
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.recipients)
        msg["Date"] = formatdate(notification.time, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=notification.hostname or None)
        msg["X-Replicator-State"] = notification.state
        msg.set_content(notification.body())
        return msg

    async def send(self, notification: Notification) -> None:
        """Deliver ``notification`` to every recipient."""
        if not self.recipients:
            raise ValueError("smtp notifier has no recipients")
        await asyncio.to_thread(self._send_sync, self.build_message(notification))

    def _send_sync(self, msg: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
            smtp.ehlo()
            if self.starttls:
                context = self.ssl_context or ssl.create_default_context()
                smtp.starttls(context=context)
                smtp.ehlo()
            if self.username is not None:
                smtp.login(self.username, self.password or "")
            smtp.send_message(msg, from_addr=self.sender, to_addrs=list(self.recipients))


@dataclass
class WebhookNotifier:
    """POSTs the notification as JSON to ``url`` with the stdlib ``urllib`` (in a thread).

    ``headers`` (e.g. ``Authorization``) are sent as given and never logged; the URL is logged by
    host only, since webhook URLs often embed a token.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def name(self) -> str:
        """``webhook host[:port]`` (no path or query: they may hold a token)."""
        return f"webhook {urllib.parse.urlsplit(self.url).netloc.rpartition('@')[2]}"

    async def send(self, notification: Notification) -> None:
        """POST ``notification`` as JSON; a non-2xx answer is an error."""
        await asyncio.to_thread(self._send_sync, notification.to_json())

    def _send_sync(self, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "replicator"}
        headers.update(self.headers)
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as e:
            e.close()  # it holds the open response
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        if not 200 <= status < 300:
            raise OSError(f"HTTP {status}")


@dataclass
class _KeyState:
    last_sent: State | None = None
    last_failing_sent_at: float | None = None
    pending: Notification | None = None
    suppressed: int = 0


class Notifier:
    """Fans state changes out to ``channels``, rate-limited per ``(db, check)``.

    ``metrics`` (optional) receives ``errors{operation="notify"}`` for each failed delivery.
    """

    def __init__(
        self,
        channels: Sequence[Channel],
        *,
        metrics: Metrics | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        hostname: str | None = None,
    ) -> None:
        self.channels = list(channels)
        self.metrics = metrics
        self.min_interval = min_interval
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self._keys: dict[tuple[str, str], _KeyState] = {}
        # the keys with a held-back notification: what flush() looks at (every database's
        # checks call it, so it must not go through every key of every database)
        self._held: set[tuple[str, str]] = set()

    async def notify(self, db: str, check: str, state: State, reason: str, *,
                     value: float | None = None, now: float | None = None) -> bool:
        """Report that ``check`` on ``db`` became ``state``; return True if it was sent.

        Delivery errors are logged and counted, never raised.
        """
        t = time.time() if now is None else now
        key = self._keys.setdefault((db, check), _KeyState())
        n = Notification(db, check, state, reason, t, self.hostname, value)
        if state == RECOVERED:
            key.pending = None
            self._held.discard((db, check))
            if key.last_sent != FAILING:
                # the failure was held back: the receiver already believes "recovered"
                key.suppressed += 1
                return False
            await self._deliver(key, n, sent_at=t)
            return True
        if key.last_failing_sent_at is not None and t - key.last_failing_sent_at < (
            self.min_interval
        ):
            key.pending = n
            self._held.add((db, check))
            key.suppressed += 1
            log.info("%s: health check %s: %s notification held back (rate limit)",
                     db, check, state)
            return False
        await self._deliver(key, replace(n, suppressed=key.suppressed), sent_at=t)
        return True

    async def flush(self, now: float | None = None) -> int:
        """Send the held-back failing notifications whose interval has passed; return how many."""
        t = time.time() if now is None else now
        sent = 0
        for k in list(self._held):
            key = self._keys.get(k)  # None: forgotten while an earlier one was sent
            n = key.pending if key is not None else None
            if key is None or n is None or key.last_failing_sent_at is None:
                self._held.discard(k)
                continue
            if t - key.last_failing_sent_at < self.min_interval:
                continue
            # the held-back notification itself is no longer suppressed once sent
            await self._deliver(key, replace(n, suppressed=key.suppressed - 1), sent_at=t)
            sent += 1
        return sent

    def forget(self, db: str) -> None:
        """Drop the state of ``db``'s checks (the database is no longer replicated)."""
        for k in [k for k in self._keys if k[0] == db]:
            del self._keys[k]
            self._held.discard(k)

    async def _deliver(self, key: _KeyState, n: Notification, *, sent_at: float) -> None:
        key.last_sent = n.state
        key.pending = None
        self._held.discard((n.db, n.check))
        key.suppressed = 0
        if n.state != RECOVERED:
            key.last_failing_sent_at = sent_at
        if self.channels:
            await asyncio.gather(*(self._send_one(c, n) for c in self.channels))

    async def _send_one(self, channel: Channel, n: Notification) -> None:
        try:
            await channel.send(n)
        except Exception as e:  # a channel must never break the caller
            log.warning(
                "%s: health check %s: %s notification via %s failed: %s: %s",
                n.db, n.check, n.state, channel.name, type(e).__name__,
                " ".join(str(e).split()),  # one line, whatever the server answered
            )
            if self.metrics is not None:
                self.metrics.errors.labels(db=n.db, replica="", operation=NOTIFY_OPERATION).inc()
        else:
            log.info("%s: health check %s: %s notification sent via %s",
                     n.db, n.check, n.state, channel.name)
