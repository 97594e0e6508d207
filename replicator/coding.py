"""How the capture stores a segment's frames: zstd-compressed, or as they are (raw zstd blocks).

Compressing costs CPU; storing the frames as they are costs writing them: every byte goes into
fresh pages of a new file, written back to the disk (and uploaded) by the kernel's threads
beside the application's own WAL and checkpoints. Beside a flat-out writer on 2 CPUs (about
240 MiB of WAL a second) storing its frames as they are kept the writer to 0.76 of its rate
alone; compressing them kept 0.89, and the replica took 40 % of the space. So segments are
compressed: within ``budget`` bytes of frames a second always, at the default level; past it
at ``FAST_LEVEL`` (about 2.5:1 on those frames, against 3:1 at level 1, for 10 % less CPU per
byte all told), unless the frames lately did not compress (blobs already compressed, random
data): while compressed segments keep more than ``USEFUL`` of their frames' size, they are
stored as they are, and compression is tried again every ``PROBE_EVERY`` large writes so that
a change of data is seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .format import DEFAULT_LEVEL
from .retry import TokenBucket

FAST_LEVEL = -3
"""The zstd level past the budget."""
USEFUL = 0.9
"""Compression past the budget is worth its CPU while compressed segments take at most this
fraction of their frames' size."""
PROBE_EVERY = 16
"""Large writes past the budget, stored as they are, between two tries of compression."""
MEASURE_MIN = 256 << 10
"""Bytes of frames a compressed segment needs for its size to count: a smaller one is mostly
its header."""
_WEIGHT = 0.3  # of a new measurement in the running ratio


class Coding:
    """Chooses, segment by segment, whether the capture compresses its frames (see the module
    text). Not thread-safe: one per database, used by its capture step only."""

    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._budget = TokenBucket(budget, clock=clock)
        self.ratio: float | None = None
        """Stored size over frames' size of the large compressed segments lately (None: none
        yet)."""
        self._since_probe = 0

    def level(self, nbytes: int) -> int | None:
        """The zstd level for a segment of ``nbytes`` bytes of frames (None: stored as they
        are)."""
        if self._budget.take(nbytes):
            return DEFAULT_LEVEL
        if self.ratio is None or self.ratio <= USEFUL:
            return FAST_LEVEL
        if nbytes < MEASURE_MIN:
            return None
        self._since_probe += 1
        if self._since_probe >= PROBE_EVERY:
            self._since_probe = 0
            return FAST_LEVEL
        return None

    def record(self, nbytes: int, stored: int) -> None:
        """A segment of ``nbytes`` bytes of frames was compressed into ``stored`` bytes."""
        if nbytes < MEASURE_MIN:
            return
        r = stored / nbytes
        self.ratio = r if self.ratio is None else self.ratio + _WEIGHT * (r - self.ratio)
