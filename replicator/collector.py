"""Python's full garbage collections in a long-running ``replicate`` process.

CPython collects its oldest generation whenever the objects promoted into it since its last full
collection reach a quarter of those it holds, and a full collection goes through every object of
the process with the GIL held: nothing else in the process moves meanwhile. A replicator's
commits keep promoting objects that live a while (a segment's record in its spool's index until
the spool is pruned, a window's objects until its compaction) and then die of their reference
counts, which the collector does not count. At a thousand databases each committing once a
second, each of two processes made a full collection about every 9 s, of 200-400 ms each with
nearly nothing to collect (none in nine of ten), and each paused the capture of all its
databases.

:class:`FullCollections` takes the oldest generation over: CPython's automatic full collections
are turned off, and the process makes one itself at most every ``FULL_EVERY`` seconds, only
when at least ``MIN_YOUNG`` collections of the younger generations ran since the last one (an
idle process makes none), or sooner once the oldest generation holds ``GROWTH`` times the
objects the last full collection left (looked at every ``LOOK_EVERY`` seconds): cyclic garbage
that piles up there, or a heap that grows as databases are added, is collected at once. The
younger generations are collected as CPython does by default, so a reference cycle that dies
young is freed as soon as before. The CLI applies this to ``replicate`` only: code that embeds
the library keeps the interpreter's own policy.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("replicator.collector")

FULL_EVERY = 300.0
"""Seconds between two full collections, at least, unless the oldest generation grows
``GROWTH`` times."""
MIN_YOUNG = 10
"""Collections of the middle generation since the last full one that make another due (the
default threshold of CPython's own oldest generation)."""
GROWTH = 2.0
"""The oldest generation's growth (in objects, over what the last full collection left) that
makes a full collection due at once."""
LOOK_EVERY = 30.0
"""Seconds between two looks at the oldest generation's size (a look lists its objects: a few
milliseconds for a few hundred thousand)."""
_NEVER = 1_000_000_000
"""An oldest-generation threshold that CPython's automatic collections never reach."""


def _oldest() -> int:
    """How many objects the oldest generation holds."""
    return len(gc.get_objects(generation=2))


def _young_collections() -> int:
    """How many times the process collected the middle generation so far."""
    return int(gc.get_stats()[1]["collections"])


class FullCollections:
    """The process's full collections, made by :meth:`step` (see the module text). Use from
    one thread: :meth:`start`, then :meth:`step` whenever it asks, then :meth:`stop`."""

    def __init__(self, every: float = FULL_EVERY, min_young: int = MIN_YOUNG,
                 growth: float = GROWTH, look_every: float = LOOK_EVERY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.min_young = min_young
        self.growth = growth
        self.look_every = look_every
        self._clock = clock
        self._saved: tuple[int, int, int] | None = None
        self._last = 0.0  # when a full collection was last made (or considered)
        self._young = 0  # the younger generations' collections then
        self._looked = 0.0  # when the oldest generation's size was last looked at
        self._base = 0  # its size after the last full collection (or at start)
        self.collections = 0
        """Full collections made by :meth:`step`."""

    def start(self) -> None:
        """Turn CPython's automatic full collections off (the younger generations keep their
        thresholds); the first full collection is due ``every`` seconds from now, or once the
        oldest generation has grown ``growth`` times."""
        if self._saved is not None:
            return
        self._saved = gc.get_threshold()
        young, middle, _ = self._saved
        gc.set_threshold(young, middle, _NEVER)
        self._last = self._looked = self._clock()
        self._young = _young_collections()
        self._base = _oldest()

    def step(self) -> float:
        """Make a full collection if one is due; seconds until the next look."""
        now = self._clock()
        grown = False
        if now - self._looked >= self.look_every:
            self._looked = now
            grown = _oldest() > self.growth * max(self._base, 1)
        if grown or now - self._last >= self.every:
            young = _young_collections()
            if grown or young - self._young >= self.min_young:
                started = time.perf_counter()
                found = gc.collect()
                self.collections += 1
                self._base = _oldest()
                log.debug("full collection%s: %d unreachable objects in %.0f ms, %d left",
                          " (grown)" if grown else "", found,
                          1000 * (time.perf_counter() - started), self._base)
                young = _young_collections()
            self._last, self._young = now, young
        return max(0.0, min(self._last + self.every, self._looked + self.look_every) - now)

    def stop(self) -> None:
        """Give full collections back to CPython (its thresholds as they were)."""
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None
