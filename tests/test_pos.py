"""Tests for replicator.pos: keys round trip, sort in replay order, malformed keys are refused."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.pos import (
    GENERATIONS_DIR,
    ObjectInfo,
    WalPos,
    generation_prefix,
    generation_time_ms,
    is_generation_id,
    new_generation_id,
    parse_key,
    segment_info,
    segment_key,
    snapshot_info,
    snapshot_key,
    sort_objects,
)

GEN = "018c2f5e9a3b4c7d"
txids = st.integers(0, 2**64 - 1)
times_ms = st.integers(0, 2**48 - 1)
gens = st.integers(0, 2**64 - 1).map(lambda n: f"{n:016x}")


@settings(max_examples=100, deadline=None)
@given(gen=gens, txid=txids, ts=times_ms, size=st.integers(0, 2**40))
def test_snapshot_key_round_trip(gen: str, txid: int, ts: int, size: int) -> None:
    key = snapshot_key(gen, txid, ts)
    info = parse_key(key, size)
    assert info == snapshot_info(gen, txid, ts, size)
    assert info.key == key
    assert info.kind == "snapshot"
    assert (info.generation, info.start_txid, info.end_txid) == (gen, txid, txid)
    assert info.first_ms == info.last_ms == ts
    assert info.size == size
    assert info.name == key.rsplit("/", 1)[1]
    assert key.startswith(generation_prefix(gen) + "snapshots/")


@settings(max_examples=100, deadline=None)
@given(gen=gens, a=txids, b=txids, t1=times_ms, t2=times_ms)
def test_segment_key_round_trip(gen: str, a: int, b: int, t1: int, t2: int) -> None:
    start, end = min(a, b), max(a, b)
    first, last = min(t1, t2), max(t1, t2)
    key = segment_key(gen, start, end, first, last)
    info = parse_key(key)
    assert info == segment_info(gen, start, end, first, last)
    assert info.key == key
    assert info.kind == "wal"
    assert (info.start_txid, info.end_txid, info.first_ms, info.last_ms) == (
        start, end, first, last)
    assert key.startswith(generation_prefix(gen) + "wal/")


def test_key_layout_is_fixed_width_hex() -> None:
    assert snapshot_key(GEN, 0x7B, 0x18C2F5E9A3B) == (
        f"{GENERATIONS_DIR}/{GEN}/snapshots/000000000000007b-018c2f5e9a3b.snap"
    )
    assert segment_key(GEN, 1, 0x10, 5, 6) == (
        f"{GENERATIONS_DIR}/{GEN}/wal/0000000000000001-0000000000000010-000000000005-"
        "000000000006.seg"
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(txids, txids, times_ms, times_ms), min_size=2, max_size=12))
def test_key_string_order_is_numeric_order(items: list[tuple[int, int, int, int]]) -> None:
    """Fixed-width hex: sorting keys as strings (as a bucket listing does) sorts snapshots by
    txid and segments by (start, end)."""
    snaps = [snapshot_info(GEN, a, t) for a, _, t, _ in items]
    segs = [segment_info(GEN, min(a, b), max(a, b), min(t, u), max(t, u)) for a, b, t, u in items]
    for objs, order in ((snaps, lambda i: (i.end_txid, i.last_ms)),
                        (segs, lambda i: (i.start_txid, i.end_txid, i.first_ms, i.last_ms))):
        by_key = [parse_key(k) for k in sorted(o.key for o in objs)]
        assert by_key == sorted(objs, key=order)


def test_sort_order_segment_before_snapshot_at_equal_end_txid() -> None:
    snap5 = snapshot_info(GEN, 5, 1000)
    seg4_5 = segment_info(GEN, 4, 5, 900, 990)
    seg1_3 = segment_info(GEN, 1, 3, 800, 850)
    snap0 = snapshot_info(GEN, 0, 700)
    seg6 = segment_info(GEN, 6, 6, 1001, 1001)
    objs = [seg6, snap5, snap0, seg4_5, seg1_3]
    for _ in range(10):
        random.shuffle(objs)
        assert sorted(objs) == [snap0, seg1_3, seg4_5, snap5, seg6]
    # even when the snapshot's time is earlier than the segment's
    assert sorted([snapshot_info(GEN, 5, 1), segment_info(GEN, 5, 5, 99, 99)])[0].kind == "wal"
    # generations sort first
    older = snapshot_info("0000000000000001", 99, 99)
    assert sorted([seg1_3, older])[0] == older


def test_size_does_not_change_identity_of_key() -> None:
    a = parse_key(snapshot_key(GEN, 3, 4), 10)
    b = parse_key(snapshot_key(GEN, 3, 4), 20)
    assert a is not None and b is not None
    assert a.key == b.key and a != b


@pytest.mark.parametrize(
    "key",
    [
        "",
        "generations",
        f"generations/{GEN}",
        f"generations/{GEN}/snapshots",
        f"generations/{GEN}/snapshots/",
        # wrong top directory, extra or missing levels
        f"generation/{GEN}/snapshots/0000000000000001-000000000001.snap",
        f"x/generations/{GEN}/snapshots/0000000000000001-000000000001.snap",
        f"generations/{GEN}/snapshots/x/0000000000000001-000000000001.snap",
        f"/generations/{GEN}/snapshots/0000000000000001-000000000001.snap",
        # bad generation ids
        "generations/018C2F5E9A3B4C7D/snapshots/0000000000000001-000000000001.snap",
        "generations/018c2f5e9a3b4c7/snapshots/0000000000000001-000000000001.snap",
        "generations/018c2f5e9a3b4c7dd/snapshots/0000000000000001-000000000001.snap",
        "generations/018c2f5e9a3b4c7g/snapshots/0000000000000001-000000000001.snap",
        "generations/018c2f5e9a3b4c7d\n/snapshots/0000000000000001-000000000001.snap",
        # bad snapshot names
        f"generations/{GEN}/snapshots/0000000000000001-000000000001.seg",
        f"generations/{GEN}/snapshots/0000000000000001-000000000001.snap.tmp",
        f"generations/{GEN}/snapshots/0000000000000001-000000000001.snap.123.ab12cd34.tmp",
        f"generations/{GEN}/snapshots/000000000000001-000000000001.snap",
        f"generations/{GEN}/snapshots/0000000000000001-00000000001.snap",
        f"generations/{GEN}/snapshots/000000000000000A-000000000001.snap",
        f"generations/{GEN}/snapshots/0000000000000001_000000000001.snap",
        f"generations/{GEN}/snapshots/0000000000000001-000000000001.snap\n",
        f"generations/{GEN}/snapshots/ 0000000000000001-000000000001.snap",
        # a segment name in the snapshot folder and the reverse
        f"generations/{GEN}/snapshots/0000000000000001-0000000000000002-000000000001-"
        "000000000002.seg",
        f"generations/{GEN}/wal/0000000000000001-000000000001.snap",
        # bad segment names
        f"generations/{GEN}/wal/0000000000000001-0000000000000002-000000000001.seg",
        f"generations/{GEN}/wal/0000000000000001-0000000000000002-000000000001-"
        "000000000002.snap",
        f"generations/{GEN}/wal/0000000000000001-0000000000000002-000000000001-"
        "000000000002.seg\n",
        f"generations/{GEN}/wal/0000000000000001-0000000000000002-000000000001-"
        "00000000000g.seg",
        f"generations/{GEN}/other/0000000000000001-000000000001.snap",
    ],
)
def test_malformed_keys_are_rejected(key: str) -> None:
    assert parse_key(key) is None


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=120))
def test_parse_key_never_raises_and_accepts_only_canonical_keys(key: str) -> None:
    info = parse_key(key)
    if info is not None:
        assert info.key == key


@settings(max_examples=100, deadline=None)
@given(gen=gens, txid=txids, ts=times_ms, pos=st.integers(0, 80), ch=st.characters())
def test_any_character_change_gives_another_key_or_none(
    gen: str, txid: int, ts: int, pos: int, ch: str
) -> None:
    key = snapshot_key(gen, txid, ts)
    pos %= len(key)
    mutated = key[:pos] + ch + key[pos + 1 :]
    info = parse_key(mutated)
    assert info is None or info.key == mutated


def test_generation_ids() -> None:
    g = new_generation_id(1_700_000_000_123_456_789)
    assert is_generation_id(g)
    assert len(g) == 16
    assert generation_time_ms(g) == 1_700_000_000_123
    assert is_generation_id(new_generation_id())
    assert not is_generation_id(g.upper())
    assert not is_generation_id(g[:-1])
    assert not is_generation_id(g + "0")
    assert not is_generation_id(g + "\n")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**48 - 1), min_size=2, max_size=20, unique=True))
def test_generation_ids_sort_by_time(ms_values: list[int]) -> None:
    ids = {ms: new_generation_id(ms * 1_000_000 + 999_999) for ms in ms_values}
    assert sorted(ids.values()) == [ids[ms] for ms in sorted(ms_values)]
    for ms, g in ids.items():
        assert generation_time_ms(g) == ms


def test_generation_ids_in_the_same_millisecond_differ_in_the_suffix() -> None:
    ids = {new_generation_id(5_000_000) for _ in range(50)}
    assert len(ids) > 1
    assert {i[:12] for i in ids} == {"000000000005"}


def test_walpos_json_round_trip() -> None:
    p = WalPos(0xFFFFFFFF, 7, 123, (0xDEADBEEF, 0))
    assert WalPos.from_json(p.to_json()) == p
    assert p.salts == (0xFFFFFFFF, 7)
    assert WalPos.from_json(None) is None
    with pytest.raises(ValueError):
        WalPos.from_json([1, 2])


def test_object_info_properties() -> None:
    seg = segment_info(GEN, 2, 9, 10, 20, size=5)
    assert isinstance(seg, ObjectInfo)
    assert seg.name == "0000000000000002-0000000000000009-00000000000a-000000000014.seg"
    snap = snapshot_info(GEN, 9, 30)
    assert snap.name == "0000000000000009-00000000001e.snap"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["01a22ca7f1178eea", "01a22ca7f1178eeb"]),
                          *[st.integers(0, 4)] * 6), max_size=40))
def test_sort_objects_sorts_as_the_dataclass_compares(
    rows: list[tuple[str, int, int, int, int, int, int]],
) -> None:
    infos = [ObjectInfo(g, e, k % 4, s, f, la, z) for g, e, k, s, f, la, z in rows]
    assert sort_objects(infos) == sorted(infos)
