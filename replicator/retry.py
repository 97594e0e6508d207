"""The one retry policy of every loop that retries (capture, shipping, S3 requests, health
checks, maintenance), and the one way a repeating error is logged.

:class:`Backoff` is exponential backoff with full jitter and a cap: before retry number ``n`` wait
a random time in ``[0, min(cap, base * 2 ** (n - 1))]``. The jitter keeps many sidecars that lost
the same destination at the same moment from coming back as a herd; the cap bounds how long a
destination that is back goes unnoticed.

:class:`ErrorLog` logs an error when its text changes and otherwise at most once every
``every`` seconds, so a destination that stays down does not flood the log.

:class:`TokenBucket` paces work that many databases share: at most ``rate`` a second on
average, ``burst`` at once.

:class:`Deferral` makes housekeeping (snapshots taken for WAL volume, compaction, spool pruning)
yield to the capture while it follows a busy writer, for a bounded time.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_LOG_EVERY = 60.0


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: ``base`` seconds doubling per retry, capped at
    ``cap`` seconds."""

    base: float
    cap: float

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (1 for the first retry)."""
        return min(self.cap, self.base * 2.0 ** max(0, attempt - 1))

    def delay(self, attempt: int) -> float:
        """A random wait before retry number ``attempt`` (1 for the first retry)."""
        return random.uniform(0, self.ceiling(attempt))


CHORE_RETRY = Backoff(base=1.0, cap=60.0)
"""A chore run on a timer (health checks, maintenance) whose run failed (a bug, not a failing
check: those are results) is run again after this backoff."""


class ErrorLog:
    """Logs errors to ``logger``: a new message at once, the same one again only after
    ``every`` seconds."""

    def __init__(self, logger: logging.Logger, every: float = DEFAULT_LOG_EVERY) -> None:
        self.logger = logger
        self.every = every
        self.last: str | None = None
        self._last_at = 0.0

    def error(self, msg: str, context: str = "") -> bool:
        """Log ``context + msg`` at ERROR unless ``msg`` repeats the last one within ``every``
        seconds (whatever the context: the same failure seen by another step is the same
        error); return whether it was logged."""
        now = time.monotonic()
        if msg == self.last and now - self._last_at < self.every:
            return False
        self.last = msg
        self._last_at = now
        self.logger.error("%s%s", context, msg)
        return True

    def reset(self) -> None:
        """Forget the last error (it was resolved): the next one is logged at once."""
        self.last = None


class TokenBucket:
    """At most ``rate`` units a second on average and ``burst`` at once (thread-safe: the
    workers of every database take from one bucket)."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = rate if burst is None else burst
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` units if the bucket holds them now; False (nothing taken) otherwise."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if n > self._tokens:
                return False
            self._tokens -= n
            return True


class Deferral:
    """Housekeeping that yields to a busy capture: :meth:`defers` says to wait while the capture
    is busy, but never for longer than ``limit`` seconds in a row (a writer that never pauses
    still gets its snapshots, merges and prunes, only later)."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._since: float | None = None  # monotonic time of the first deferral in a row

    def defers(self, busy: bool, now: float | None = None) -> bool:
        """Whether work due now waits: ``busy`` and deferred for less than ``limit``."""
        now = time.monotonic() if now is None else now
        if not busy:
            self._since = None
            return False
        if self._since is None:
            self._since = now
        return now - self._since < self.limit

    def left(self, now: float | None = None) -> float:
        """Seconds until a deferral in progress ends (0: none is): work it put off is looked
        at again then, even if nothing else wakes its loop."""
        if self._since is None:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, self._since + self.limit - now)

    def done(self) -> None:
        """The work ran: the next deferral counts from scratch."""
        self._since = None
