"""Replication problems reach people: a destination failing past its threshold, a lagging
replica and a new generation, through a real SMTP server and a real webhook receiver, with the
clock set by the test; then a real destination that breaks under a running replicator."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import util
from fakeservers import SmtpTestServer, WebhookTestServer, body_of, smtp_for
from obsutil import Reaper, reaper
from writer import init_db

from replicator.notices import NoticeThresholds, ReplicaNotices
from replicator.notify import Notifier, WebhookNotifier


@dataclass
class FakeReplica:
    """The state ReplicaNotices reads from a replica (set by the test)."""

    name: str
    url: str
    lag: float = 0.0
    failing_since: float = 0.0
    last_error: str | None = None


def states(hook: WebhookTestServer) -> list[tuple[str, str]]:
    return [(p["check"], p["state"]) for p in hook.payloads]


async def test_failing_destination_lag_and_generation_are_notified_once_each() -> None:
    s3 = FakeReplica("s3", "s3://bucket/app")
    local = FakeReplica("local", "/backups/app")
    with WebhookTestServer() as hook, SmtpTestServer() as smtp:
        notifier = Notifier([WebhookNotifier(hook.url), smtp_for(smtp)], min_interval=600,
                            hostname="host1")
        notices = ReplicaNotices("app", [s3, local], notifier,
                                 NoticeThresholds(failing_after=300, lag_above=60))
        t = 10_000.0
        s3.failing_since, s3.last_error = t, "HTTP 403 AccessDenied"
        await notices.step(now=t + 299)  # not long enough yet
        assert states(hook) == []
        await notices.step(now=t + 301)
        assert states(hook) == [("destination:s3", "failing")]
        reason = hook.payloads[0]["reason"]
        assert "s3://bucket/app" in reason and "AccessDenied" in reason and "5m" in reason
        await notices.step(now=t + 400)  # still failing: nothing new
        assert len(hook.payloads) == 1

        local.lag = 90
        await notices.step(now=t + 410)
        assert states(hook)[-1] == ("lag:local", "failing")
        assert "lags 90s" in hook.payloads[-1]["reason"]

        s3.failing_since, s3.last_error = 0.0, None
        local.lag = 0.0
        await notices.step(now=t + 420)
        assert set(states(hook)[-2:]) == {("destination:s3", "recovered"),
                                          ("lag:local", "recovered")}

        # failing again within min-interval: held back, then sent by a later step
        s3.failing_since = t + 430
        await notices.step(now=t + 740)
        assert states(hook).count(("destination:s3", "failing")) == 1
        await notices.step(now=t + 902)
        assert states(hook).count(("destination:s3", "failing")) == 2

        await notices.new_generation("01a22b86ed204c7b", "wal_reset", now=t + 950)
        assert states(hook)[-1] == ("generation", "notice")
        assert "could not prove continuous (wal_reset)" in hook.payloads[-1]["reason"]

        util.wait_until(lambda: len(smtp.messages) == len(hook.payloads), 10, what="e-mails")
        subjects = [m["Subject"] for _, _, m in smtp.messages]
        assert "[replicator] FAILING: destination:s3 on app (host1)" in subjects
        assert "[replicator] NOTICE: generation on app (host1)" in subjects
        failing_mail = next(m for _, _, m in smtp.messages
                            if "FAILING: destination" in m["Subject"])
        assert "AccessDenied" in body_of(failing_mail)


@pytest.fixture
def procs() -> Iterator[Reaper]:
    with reaper() as r:
        yield r


def test_a_destination_that_breaks_under_a_running_replicator_is_notified(
    tmp_path: Path, procs: Reaper
) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    broken = tmp_path / "broken"
    with WebhookTestServer() as hook:
        cfg = tmp_path / "r.yml"
        cfg.write_text(f"""
notify:
  destination-failing-after: 1s
  webhooks: [{{url: "{hook.url}"}}]
dbs:
  - path: {db}
    replicas:
      - {{name: good, path: {tmp_path / "good"}}}
      - {{name: broken, path: {broken}}}
""")
        rep = procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "r.log"))
        util.wait_until(lambda: ("generation", "notice") in states(hook), 60,
                        what="the first generation announced")
        # the replicator may still be linking the first objects in, making their directories
        # again as they go: until a file stands in the directory's place
        for _ in range(100):
            try:
                shutil.rmtree(broken)
                broken.write_text("not a directory")
                break
            except OSError:
                time.sleep(0.05)
        assert broken.is_file()
        w = util.start_writer(db, tmp_path / "c.log", "--count", "5")
        w.communicate(timeout=60)
        util.wait_until(lambda: ("destination:broken", "failing") in states(hook), 60,
                        what="the broken destination notified")
        assert ("destination:good", "failing") not in states(hook)
        # sync --wait times out naming the destination that is behind
        r = util.cli("sync", "--wait", str(db), "--timeout", "2s", "--config", str(cfg))
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "not on every destination within 2s: broken" in r.stderr
        broken.unlink()
        util.wait_until(lambda: ("destination:broken", "recovered") in states(hook), 60,
                        what="its recovery notified")
        assert rep.stop() == 0


def test_thresholds_from_the_config(tmp_path: Path) -> None:
    from replicator.config import load_config

    p = tmp_path / "r.yml"
    p.write_text("notify:\n  destination-failing-after: 2m\n  lag-above: 30s\n"
                 "dbs:\n  - {path: /d/a.db, replicas: [/b]}\n")
    assert load_config(str(p)).notify.thresholds == NoticeThresholds(120.0, 30.0)
