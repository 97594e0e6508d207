"""How the capture stores a segment's frames: compressed within the budget, and past it unless
frames lately did not compress (at a faster level); then compression is tried again every few
large writes."""

from __future__ import annotations

from replicator.coding import FAST_LEVEL, MEASURE_MIN, PROBE_EVERY, USEFUL, Coding
from replicator.format import DEFAULT_LEVEL

BIG = MEASURE_MIN * 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_within_the_budget_everything_is_compressed_and_the_budget_refills() -> None:
    clock = Clock()
    c = Coding(1000, clock)
    c.ratio = 1.0  # frames lately did not compress, but the budget holds
    assert c.level(600) == c.level(400) == DEFAULT_LEVEL
    assert c.level(1) is None  # spent
    clock.now += 0.5
    assert c.level(500) == DEFAULT_LEVEL  # half a second refills half the budget
    assert c.level(1) is None
    clock.now += 60
    assert c.level(1000) == DEFAULT_LEVEL and c.level(1) is None  # one second's worth at most


def test_past_the_budget_frames_are_compressed_while_they_compress() -> None:
    c = Coding(0, Clock())
    assert c.level(BIG) == FAST_LEVEL  # nothing measured yet
    c.record(BIG, BIG // 3)
    assert c.ratio is not None and abs(c.ratio - 1 / 3) < 0.01
    assert all(c.level(BIG) == FAST_LEVEL for _ in range(3 * PROBE_EVERY))
    c.record(MEASURE_MIN - 1, MEASURE_MIN)  # too small to tell: a header mostly
    assert abs(c.ratio - 1 / 3) < 0.01


def test_frames_that_do_not_compress_are_stored_and_compression_is_tried_again() -> None:
    c = Coding(0, Clock())
    for _ in range(10):
        c.record(BIG, BIG + 100)  # random blobs: compression only adds its framing
    assert c.ratio is not None and c.ratio > USEFUL
    ways = [c.level(BIG) for _ in range(3 * PROBE_EVERY)]
    assert [i for i, w in enumerate(ways) if w == FAST_LEVEL] == [
        PROBE_EVERY - 1, 2 * PROBE_EVERY - 1, 3 * PROBE_EVERY - 1]
    # small writes are not tries (their size would tell nothing)
    assert all(c.level(MEASURE_MIN - 1) is None for _ in range(3 * PROBE_EVERY))
    c.record(BIG, BIG // 4)  # a try finds the data compressing again
    assert c.ratio <= USEFUL and c.level(BIG) == FAST_LEVEL
