"""Retention keeps exactly what a restore inside the window needs."""

from __future__ import annotations

from replicator.pos import segment_key, snapshot_key
from replicator.restore import _chain, summarize
from replicator.retention import apply_retention, plan_retention
from replicator.storage.memory import MemoryStorage

GEN_A = "0000000000010001"
GEN_B = "0000000000020001"


def put(store: MemoryStorage, key: str) -> None:
    store.data[key] = b"x"


def history() -> MemoryStorage:
    """Generation A: snapshots at t=1s and 5s; B: snapshots at 10s and 20s, segments between."""
    s = MemoryStorage()
    put(s, snapshot_key(GEN_A, 0, 1000))
    put(s, segment_key(GEN_A, 1, 5, 2000, 3000))
    put(s, snapshot_key(GEN_A, 5, 5000))
    put(s, segment_key(GEN_A, 6, 8, 6000, 7000))
    put(s, snapshot_key(GEN_B, 0, 10_000))
    put(s, segment_key(GEN_B, 1, 4, 11_000, 14_000))
    put(s, snapshot_key(GEN_B, 4, 20_000))
    put(s, segment_key(GEN_B, 5, 9, 21_000, 25_000))
    return s


async def test_window_keeps_the_snapshot_before_the_cutoff_and_everything_after() -> None:
    s = history()
    # cutoff 15 s: generation A ended (7 s) before it and B has a snapshot: A goes whole;
    # in B the newest snapshot at or before 15 s is txid 0 at 10 s: nothing of B goes
    plan = await plan_retention(s, 15, now=30)
    assert plan.drop_generations == [GEN_A]
    assert {o.generation for o in plan.delete} == {GEN_A}
    # cutoff 22 s: B's base is the snapshot at txid 4 (20 s): txid 0 snapshot and 1..4 go
    plan = await plan_retention(s, 8, now=30)
    assert sorted(o.key for o in plan.delete if o.generation == GEN_B) == sorted(
        [snapshot_key(GEN_B, 0, 10_000), segment_key(GEN_B, 1, 4, 11_000, 14_000)]
    )
    assert await apply_retention(s, 8, now=30) == 6
    remaining = sorted(s.data)
    assert remaining == sorted(
        [snapshot_key(GEN_B, 4, 20_000), segment_key(GEN_B, 5, 9, 21_000, 25_000)]
    )


async def test_nothing_is_deleted_without_a_snapshot_before_the_cutoff() -> None:
    s = history()
    assert (await plan_retention(s, 100, now=30)).delete == []


async def test_newest_generation_is_never_dropped_whole() -> None:
    s = MemoryStorage()
    put(s, snapshot_key(GEN_A, 0, 1000))
    put(s, segment_key(GEN_A, 1, 2, 2000, 3000))
    plan = await plan_retention(s, 1, now=1000)
    assert plan.delete == [] and plan.drop_generations == []


async def test_latest_point_still_reachable_after_retention() -> None:
    s = history()
    await apply_retention(s, 8, now=30)
    (gen,) = await summarize(s)
    chain, missing = _chain(gen, gen.snapshots[-1], None)
    assert missing is None and chain[-1].end_txid == 9
