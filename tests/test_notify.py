"""Notifications: e-mail to a real SMTP server (aiosmtpd, with STARTTLS and AUTH), JSON to a real
HTTP receiver, rate limiting per (db, check), and delivery failures that never raise.
"""

from __future__ import annotations

import logging

import pytest
from fakeservers import (
    SMTP_PASSWORD,
    SmtpTestServer,
    WebhookTestServer,
    body_of,
    smtp_for,
)
from util import free_port

from replicator.metrics import Metrics
from replicator.notify import (
    FAILING,
    RECOVERED,
    Channel,
    Notification,
    Notifier,
    SmtpNotifier,
    WebhookNotifier,
)


def notify_errors(metrics: Metrics, db: str) -> float:
    v = metrics.registry.get_sample_value(
        "replicator_errors_total", {"db": db, "replica": "", "operation": "notify"}
    )
    return 0.0 if v is None else v


async def test_webhook_posts_json_with_every_field(
    webhook: WebhookTestServer, metrics: Metrics
) -> None:
    hook = WebhookNotifier(webhook.url, headers={"Authorization": "Bearer xyz"}, timeout=5)
    n = Notifier([hook], metrics=metrics, hostname="host-a")
    sent = await n.notify(
        "/data/app.db", "freshness", FAILING, "stale: age 26.0h > max 25.0h", value=93600.0,
        now=1_700_000_000.0,
    )
    assert sent
    [(path, headers, body)] = webhook.requests
    assert path == "/hooks/T0KEN"
    assert headers["Authorization"] == "Bearer xyz"
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "text": "[replicator] FAILING: freshness on /data/app.db (host-a)",
        "db": "/data/app.db",
        "check": "freshness",
        "state": "failing",
        "reason": "stale: age 26.0h > max 25.0h",
        "value": 93600.0,
        "time": "2023-11-14T22:13:20+00:00",
        "timestamp": 1_700_000_000.0,
        "hostname": "host-a",
        "suppressed": 0,
    }
    assert notify_errors(metrics, "/data/app.db") == 0


async def test_smtp_auth_plain_on_loopback(smtp_plain: SmtpTestServer, metrics: Metrics) -> None:
    n = Notifier([smtp_for(smtp_plain)], metrics=metrics, hostname="host-b")
    assert await n.notify("app.db", "overdue", FAILING, "value 150 > 100", value=150, now=100.0)
    [(sender, rcpts, msg)] = smtp_plain.messages
    assert sender == "replicator@example.test"
    assert rcpts == ["dba@example.test", "oncall@example.test"]
    assert msg["Subject"] == "[replicator] FAILING: overdue on app.db (host-b)"
    assert msg["X-Replicator-State"] == "failing"
    body = body_of(msg)
    assert "state: failing\n" in body
    assert "reason: value 150 > 100\n" in body
    assert "db: app.db\n" in body
    assert "hostname: host-b\n" in body
    assert "time: 1970-01-01T00:01:40+00:00\n" in body
    assert notify_errors(metrics, "app.db") == 0


async def test_smtp_starttls_then_auth(smtp_tls: SmtpTestServer, metrics: Metrics) -> None:
    assert smtp_tls.client_context is not None
    smtp = smtp_for(smtp_tls, starttls=True, ssl_context=smtp_tls.client_context)
    n = Notifier([smtp], metrics=metrics, hostname="host-c")
    assert await n.notify("app.db", "size", FAILING, "too large", now=5.0)
    assert await n.notify("app.db", "size", RECOVERED, "db 1.0 MiB", now=65.0)
    states = [m["X-Replicator-State"] for _, _, m in smtp_tls.messages]
    assert states == ["failing", "recovered"]
    assert "reason: db 1.0 MiB\n" in body_of(smtp_tls.messages[1][2])
    assert notify_errors(metrics, "app.db") == 0


async def test_smtp_without_starttls_cannot_auth_when_server_requires_tls(
    smtp_tls: SmtpTestServer, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier([smtp_for(smtp_tls)], metrics=metrics)
    assert await n.notify("app.db", "size", FAILING, "too large", now=5.0)
    assert smtp_tls.messages == []
    assert notify_errors(metrics, "app.db") == 1
    assert SMTP_PASSWORD not in caplog.text


async def test_starttls_verifies_the_server_certificate(
    smtp_tls: SmtpTestServer, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    # the system CAs do not trust the self-signed test certificate
    n = Notifier([smtp_for(smtp_tls, starttls=True)], metrics=metrics)
    with caplog.at_level(logging.WARNING, logger="replicator.notify"):
        await n.notify("app.db", "size", FAILING, "too large", now=5.0)
    assert smtp_tls.messages == []
    assert notify_errors(metrics, "app.db") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_delivery_failures_are_logged_and_counted_never_raised(
    smtp_plain: SmtpTestServer, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookTestServer(status=500) as bad_hook:
        channels: list[Channel] = [
            WebhookNotifier(bad_hook.url, timeout=5),
            smtp_for(smtp_plain, password="wrong-" + SMTP_PASSWORD),
            smtp_for(smtp_plain, port=free_port()),  # nothing listens there
        ]
        n = Notifier(channels, metrics=metrics)
        with caplog.at_level(logging.INFO, logger="replicator.notify"):
            assert await n.notify("app.db", "overdue", FAILING, "value 101 > 100", now=1.0)
        assert len(bad_hook.requests) == 1
    assert smtp_plain.messages == []
    assert notify_errors(metrics, "app.db") == 3
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 3
    assert all("\n" not in r.getMessage() for r in failures)
    assert "HTTP 500" in caplog.text
    assert SMTP_PASSWORD not in caplog.text
    assert "T0KEN" not in caplog.text  # webhook URLs are logged by host only


async def test_rate_limit_per_key_and_recovery_always_follows_a_sent_failure(
    webhook: WebhookTestServer, metrics: Metrics
) -> None:
    n = Notifier([WebhookNotifier(webhook.url, timeout=5)], metrics=metrics, min_interval=600)

    def seen() -> list[tuple[str, str, str]]:
        return [(p["check"], p["state"], p["reason"]) for p in webhook.payloads]

    assert await n.notify("db", "a", FAILING, "f1", now=0)
    assert await n.notify("db", "a", RECOVERED, "r1", now=10)
    # a second failure within the interval is held back
    assert not await n.notify("db", "a", FAILING, "f2", now=20)
    assert await n.flush(now=30) == 0
    # ... and so is the recovery from it: the receiver's last word ("recovered") is true again
    assert not await n.notify("db", "a", RECOVERED, "r2", now=40)
    assert not await n.notify("db", "a", FAILING, "f3", now=50)
    # other keys are not limited by "a"
    assert await n.notify("db", "b", FAILING, "b1", now=55)
    assert await n.notify("other.db", "a", FAILING, "o1", now=56)
    assert seen() == [("a", "failing", "f1"), ("a", "recovered", "r1"), ("b", "failing", "b1"),
                      ("a", "failing", "o1")]
    # once the interval has passed, a failure still standing is sent (never hidden)
    assert await n.flush(now=599) == 0
    assert await n.flush(now=600) == 1
    assert webhook.payloads[-1]["reason"] == "f3"
    assert webhook.payloads[-1]["timestamp"] == 50  # when it started failing
    assert webhook.payloads[-1]["suppressed"] == 2  # f2 and r2 were never sent
    assert await n.flush(now=1300) == 0
    assert await n.notify("db", "a", RECOVERED, "r3", now=610)
    assert seen()[-1] == ("a", "recovered", "r3")
    # after the interval a new failure goes straight out
    assert await n.notify("db", "a", FAILING, "f4", now=1300)
    assert seen()[-1] == ("a", "failing", "f4")
    assert notify_errors(metrics, "db") == 0


async def test_no_channels_and_first_recovery_are_quiet() -> None:
    n = Notifier([], hostname="h")
    assert not await n.notify("db", "a", RECOVERED, "fine", now=0)
    assert await n.notify("db", "a", FAILING, "bad", now=1)


def test_secrets_stay_out_of_repr_and_names() -> None:
    smtp = SmtpNotifier("mail.example.test", 587, True, "u", SMTP_PASSWORD, recipients=["x@y"])
    hook = WebhookNotifier("https://user:pw@hooks.example.test/services/T0KEN",
                           headers={"Authorization": "Bearer T0KEN"})
    for text in (repr(smtp), smtp.name, repr(hook), hook.name):
        assert SMTP_PASSWORD not in text
    assert "T0KEN" not in hook.name and "pw" not in hook.name
    assert "T0KEN" not in repr(hook).replace(hook.url, "")
    assert hook.name == "webhook hooks.example.test"


async def test_smtp_without_recipients_is_a_counted_failure(metrics: Metrics) -> None:
    n = Notifier([SmtpNotifier("127.0.0.1", free_port())], metrics=metrics)
    await n.notify("db", "a", FAILING, "bad", now=1)
    assert notify_errors(metrics, "db") == 1


def test_notification_body_lists_every_field() -> None:
    n = Notification("db", "chk", "recovered", "fine again", 0.0, "h", 1.5, suppressed=3)
    assert n.body() == (
        "state: recovered\ndb: db\ncheck: chk\nreason: fine again\nvalue: 1.5\n"
        "time: 1970-01-01T00:00:00+00:00\nhostname: h\n"
        "suppressed: 3 earlier state change(s) (rate limit)\n"
    )
