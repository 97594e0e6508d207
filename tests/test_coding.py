"""How the capture stores a segment's frames: compressed within the budget, and past it unless
frames lately did not compress; then compression is tried again every few large writes."""

from __future__ import annotations

from replicator.coding import MEASURE_MIN, PROBE_EVERY, USEFUL, Coding

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
    assert c.compress(600) and c.compress(400)
    assert not c.compress(1)  # spent
    clock.now += 0.5
    assert c.compress(500)  # half a second refills half the budget
    assert not c.compress(1)
    clock.now += 60
    assert c.compress(1000) and not c.compress(1)  # never more than one second's worth


def test_past_the_budget_frames_are_compressed_while_they_compress() -> None:
    c = Coding(0, Clock())
    assert c.compress(BIG)  # nothing measured yet
    c.record(BIG, BIG // 3)
    assert c.ratio is not None and abs(c.ratio - 1 / 3) < 0.01
    assert all(c.compress(BIG) for _ in range(3 * PROBE_EVERY))
    c.record(MEASURE_MIN - 1, MEASURE_MIN)  # too small to tell: a header mostly
    assert abs(c.ratio - 1 / 3) < 0.01


def test_frames_that_do_not_compress_are_stored_and_compression_is_tried_again() -> None:
    c = Coding(0, Clock())
    for _ in range(10):
        c.record(BIG, BIG + 100)  # random blobs: compression only adds its framing
    assert c.ratio is not None and c.ratio > USEFUL
    ways = [c.compress(BIG) for _ in range(3 * PROBE_EVERY)]
    assert [i for i, w in enumerate(ways) if w] == [
        PROBE_EVERY - 1, 2 * PROBE_EVERY - 1, 3 * PROBE_EVERY - 1]
    # small writes are not tries (their size would tell nothing)
    assert not any(c.compress(MEASURE_MIN - 1) for _ in range(3 * PROBE_EVERY))
    c.record(BIG, BIG // 4)  # a try finds the data compressing again
    assert c.ratio <= USEFUL and c.compress(BIG)
