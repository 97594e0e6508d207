"""Replication problems as notifications: a destination failing for longer than a threshold, a
replica lagging more than a threshold (each sent when it starts and when it is over), and a new
generation (sent once, with its reason). They go through the same :class:`~replicator.notify.
Notifier` as health checks, with its per-key de-duplication (``min-interval``); the ``check`` of
a notification is ``destination:NAME``, ``lag:NAME`` or ``generation``.

:meth:`ReplicaNotices.step` is one look at the replicas at a given time (tests call it with the
time they choose); :meth:`ReplicaNotices.run` calls it every :data:`NOTICE_POLL` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .aio import wait_event
from .headers import Reason
from .notify import FAILING, NOTICE, RECOVERED, Notifier

DEFAULT_FAILING_AFTER = 300.0
DEFAULT_LAG_ABOVE = 300.0
NOTICE_POLL = 5.0
GENERATION_CHECK = "generation"


@dataclass(frozen=True)
class NoticeThresholds:
    """``notify: {destination-failing-after: 5m, lag-above: 5m}``."""

    failing_after: float = DEFAULT_FAILING_AFTER
    lag_above: float = DEFAULT_LAG_ABOVE


class _Watched(Protocol):
    name: str
    lag: float
    failing_since: float
    last_error: str | None

    @property
    def url(self) -> str: ...


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ReplicaNotices:
    """Watches one database's replicas and notifies when a threshold is crossed either way."""

    def __init__(self, db_name: str, replicas: Sequence[_Watched], notifier: Notifier,
                 thresholds: NoticeThresholds) -> None:
        self.db_name = db_name
        self.replicas = list(replicas)
        self.notifier = notifier
        self.thresholds = thresholds
        self._bad: dict[str, bool] = {}

    async def _edge(self, check: str, bad: bool, reason: str, now: float,
                    value: float | None) -> None:
        if bad == self._bad.get(check, False):
            return
        self._bad[check] = bad
        await self.notifier.notify(self.db_name, check, FAILING if bad else RECOVERED, reason,
                                   value=value, now=now)

    async def step(self, now: float | None = None) -> None:
        """Look at every replica once; notify the changes."""
        t = time.time() if now is None else now
        th = self.thresholds
        for r in self.replicas:
            down_for = t - r.failing_since if r.failing_since else 0.0
            failing = bool(r.failing_since) and down_for >= th.failing_after
            reason = (f"destination {r.name} ({r.url}) failing for {_duration(down_for)}: "
                      f"{r.last_error}" if failing else f"destination {r.name} ({r.url}) is back")
            await self._edge(f"destination:{r.name}", failing, reason, t, down_for)
            lagging = r.lag > th.lag_above
            reason = (f"replica {r.name} ({r.url}) lags {_duration(r.lag)} (threshold "
                      f"{_duration(th.lag_above)})" if lagging
                      else f"replica {r.name} ({r.url}) caught up")
            await self._edge(f"lag:{r.name}", lagging, reason, t, r.lag)
        await self.notifier.flush(t)

    async def new_generation(self, generation: str, reason: str,
                             now: float | None = None) -> None:
        """A new generation started (a full snapshot; earlier points stay restorable)."""
        try:
            text = Reason(reason).text
        except ValueError:
            text = reason
        await self.notifier.notify(self.db_name, GENERATION_CHECK, NOTICE,
                                   f"new generation {generation}: {text} ({reason})", now=now)

    async def run(self, stop: asyncio.Event) -> None:
        """:meth:`step` every :data:`NOTICE_POLL` seconds until ``stop`` is set."""
        while not stop.is_set():
            await self.step()
            await wait_event(stop, NOTICE_POLL)
