"""Tests for replicator.wal: real SQLite WALs, both byte orders, damage never yields bad frames."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import wal as wal_module
from replicator.errors import WalError
from replicator.wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    WAL_VERSION,
    Frame,
    ReadBuffers,
    ScanResult,
    WalHeader,
    frame_offset,
    frame_size,
    page_offsets,
    parse_wal_header,
    read_wal_header,
    scan_bytes,
    scan_frames,
    verify_frames,
    wal_checksum,
)

MASK = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------
# Pure-Python reference and WAL builders


def ref_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's walChecksumBytes, word by word."""
    assert len(data) % 8 == 0
    fmt = ">" if big_endian else "<"
    words = struct.unpack(f"{fmt}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & MASK
        s1 = (s1 + words[i + 1] + s0) & MASK
    return s0, s1


def make_header(
    *,
    big_endian: bool = False,
    page_size: int = 512,
    salts: tuple[int, int] = (0x11223344, 0x55667788),
    ckpt: int = 7,
    magic: int | None = None,
    version: int = WAL_VERSION,
) -> bytes:
    """A 32-byte WAL header with a correct checksum (for the byte order of ``magic``)."""
    if magic is None:
        magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    body = struct.pack(">6I", magic, version, page_size, ckpt, salts[0], salts[1])
    ck = ref_checksum(body, bool(magic & 1))
    return body + struct.pack(">2I", *ck)


def encode_frames(
    specs: list[tuple[int, int, bytes]],
    big_endian: bool,
    salts: tuple[int, int],
    start: tuple[int, int],
) -> bytes:
    """Frames (pgno, commit_size, page) chained from ``start`` with the reference checksum."""
    out = bytearray()
    ck = start
    for pgno, commit, page in specs:
        head8 = struct.pack(">2I", pgno, commit)
        ck = ref_checksum(page, big_endian, *ref_checksum(head8, big_endian, *ck))
        out += head8 + struct.pack(">4I", salts[0], salts[1], *ck) + page
    return bytes(out)


@dataclass
class SynthWal:
    data: bytes
    page_size: int
    txns: list[tuple[int, int, int]]  # (first, commit, commit_size) of each committed txn
    n_frames: int  # including the uncommitted tail

    def frame_end(self, index: int) -> int:
        return frame_offset(index, self.page_size) + frame_size(self.page_size)


def build_wal(
    txn_sizes: list[int],
    *,
    tail: int = 0,
    big_endian: bool = False,
    page_size: int = 512,
    salts: tuple[int, int] = (0x0BADF00D, 0x12345678),
    seed: int = 0,
) -> SynthWal:
    """A synthetic WAL: one committed transaction per entry of ``txn_sizes`` (its frame count),
    then ``tail`` valid but uncommitted frames."""
    rng = random.Random(seed)
    hdr = make_header(big_endian=big_endian, page_size=page_size, salts=salts)
    specs: list[tuple[int, int, bytes]] = []
    txns = []
    db_size = 0
    for n in txn_sizes:
        first = len(specs) + 1
        for j in range(n):
            pgno = rng.randint(1, 50)
            db_size = max(db_size, pgno)
            commit = db_size if j == n - 1 else 0
            specs.append((pgno, commit, rng.randbytes(page_size)))
        txns.append((first, len(specs), db_size))
    for _ in range(tail):
        specs.append((rng.randint(1, 50), 0, rng.randbytes(page_size)))
    start = struct.unpack(">2I", hdr[24:32])
    body = encode_frames(specs, big_endian, salts, (start[0], start[1]))
    return SynthWal(hdr + body, page_size, txns, len(specs))


def reencode(wal: bytes, big_endian: bool) -> bytes:
    """Rewrite a (valid, whole-frame) WAL with the other magic and recomputed checksums."""
    h = parse_wal_header(wal)
    hdr = make_header(
        big_endian=big_endian, page_size=h.page_size, salts=h.salts, ckpt=h.checkpoint_seq
    )
    fs = frame_size(h.page_size)
    specs = []
    for off in range(WAL_HEADER_SIZE, len(wal) - fs + 1, fs):
        pgno, commit = struct.unpack(">2I", wal[off : off + 8])
        specs.append((pgno, commit, wal[off + FRAME_HEADER_SIZE : off + fs]))
    start = struct.unpack(">2I", hdr[24:32])
    return hdr + encode_frames(specs, big_endian, h.salts, (start[0], start[1]))


def stored_checksum(wal: bytes, index: int, page_size: int) -> tuple[int, int]:
    off = frame_offset(index, page_size)
    a, b = struct.unpack(">2I", wal[off + 16 : off + 24])
    return a, b


def scan_file(data: bytes, **kw: Any) -> tuple[WalHeader, ScanResult]:
    """Write ``data`` to a temporary file and scan it from slot 1."""
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        h = read_wal_header(f.fileno())
        assert h is not None
        return h, scan_frames(f.fileno(), h, 1, h.checksum, **kw)


def test_last_only_needs_frames_dropped() -> None:
    h = parse_wal_header(make_header())
    assert h is not None
    with pytest.raises(ValueError, match="last_only"):
        scan_frames(0, h, 1, h.checksum, last_only=True)


def assert_well_formed(res: ScanResult, start_index: int = 1) -> None:
    """Frames are contiguous from start_index, end at a commit, and match the transactions."""
    idx = [f.index for f in res.frames]
    assert idx == list(range(start_index, start_index + len(idx)))
    assert res.end_index == start_index + len(idx) - 1
    if res.frames:
        assert res.frames[-1].commit_size
        assert res.end_checksum == res.frames[-1].checksum
    commits = [(f.index, f.commit_size) for f in res.frames if f.commit_size]
    assert commits == [(c, size) for _, c, size in res.transactions]
    firsts = [start_index] + [c + 1 for _, c, _ in res.transactions]
    firsts = firsts[: len(res.transactions)]
    assert [t[0] for t in res.transactions] == firsts
    assert res.valid_end_index >= res.end_index
    assert res.commit_checksums == [f.checksum for f in res.frames if f.commit_size]


def assert_lean_scan_agrees(data: bytes, res: ScanResult) -> None:
    """A scan that keeps no frames finds the same transactions, checksums and stop."""
    _, lean = scan_file(data, keep_frames=False)
    assert lean.frames == []
    assert (lean.end_index, lean.end_checksum, lean.transactions, lean.commit_checksums) == (
        res.end_index, res.end_checksum, res.transactions, res.commit_checksums
    )
    assert (lean.valid_end_index, lean.valid_checksum, lean.stop_reason) == (
        res.valid_end_index, res.valid_checksum, res.stop_reason
    )
    # keeping only the last transaction: the same last one and end, whatever the chunking
    # (one frame a chunk, a few, many: commits within a chunk and across chunks)
    h, _ = scan_file(data, keep_frames=False)
    for chunk in (1, 3 * frame_size(h.page_size), 4 << 20):
        _, last = scan_file(data, keep_frames=False, last_only=True, chunk_bytes=chunk)
        assert (last.transactions, last.commit_checksums) == (
            res.transactions[-1:], res.commit_checksums[-1:]
        )
        assert (last.end_index, last.end_checksum, last.valid_end_index, last.valid_checksum,
                last.stop_reason) == (res.end_index, res.end_checksum, res.valid_end_index,
                                      res.valid_checksum, res.stop_reason)


# ------------------------------------------------------------------------------------------
# Real SQLite WALs


@dataclass
class RealWal:
    data: bytes
    commit_sizes: list[int]  # page_count after each transaction, in order
    old_header: bytes = b""  # with reset_after: the WAL header just before the reset


def make_real_wal(
    tmp: Path, page_size: int, n_txns: int, *, reset_after: int | None = None
) -> RealWal:
    """Run transactions against a WAL-mode database and copy its -wal file while it is open.

    With ``reset_after`` the WAL is checkpointed (RESTART) after that many inserts, so the next
    write starts a new WAL epoch over the old frames.
    """
    db = tmp / f"db-{page_size}.sqlite"
    con = sqlite3.connect(db, isolation_level=None)
    try:
        con.execute(f"PRAGMA page_size={page_size}")
        assert con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
        sizes = [con.execute("PRAGMA page_count").fetchone()[0]]
        rng = random.Random(page_size)
        old_header = b""
        for i in range(n_txns):
            if reset_after is not None and i == reset_after:
                old_header = Path(str(db) + "-wal").read_bytes()[:WAL_HEADER_SIZE]
                busy, _, _ = con.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                assert busy == 0
                sizes = []
            con.execute("BEGIN")
            for _ in range(1 + i % 3):
                con.execute("INSERT INTO t(v) VALUES (?)", (rng.randbytes(rng.randint(10, 3000)),))
            con.execute("COMMIT")
            sizes.append(con.execute("PRAGMA page_count").fetchone()[0])
        copy = tmp / "copy.wal"
        shutil.copyfile(str(db) + "-wal", copy)
        return RealWal(copy.read_bytes(), sizes, old_header)
    finally:
        con.close()


@pytest.mark.parametrize("page_size", [512, 4096, 65536])
def test_real_wal_scan(tmp_path: Path, page_size: int) -> None:
    real = make_real_wal(tmp_path, page_size, 12)
    h, res = scan_file(real.data)
    assert h.page_size == page_size
    assert h.version == WAL_VERSION
    assert h.big_endian == (sys.byteorder == "big")  # SQLite writes native-order checksums
    fs = frame_size(page_size)
    n = (len(real.data) - WAL_HEADER_SIZE) // fs
    assert (len(real.data) - WAL_HEADER_SIZE) % fs == 0
    assert res.stop_reason == "eof"
    assert res.end_index == res.valid_end_index == n
    assert len(res.transactions) == 1 + 12  # CREATE TABLE, then the inserts
    assert [size for _, _, size in res.transactions] == real.commit_sizes
    assert_well_formed(res)
    # every frame's running checksum is the one SQLite stored, and the reference agrees
    ck = h.checksum
    for f in res.frames:
        off = frame_offset(f.index, page_size)
        assert f.checksum == stored_checksum(real.data, f.index, page_size)
        assert f.pgno == struct.unpack(">I", real.data[off : off + 4])[0]
        ck = ref_checksum(real.data[off : off + 8], False, *ck)
        ck = ref_checksum(real.data[off + FRAME_HEADER_SIZE : off + fs], False, *ck)
        assert f.checksum == ck
    assert res.end_checksum == stored_checksum(real.data, n, page_size)


def test_real_wal_big_endian(tmp_path: Path) -> None:
    real = make_real_wal(tmp_path, 1024, 8)
    be = reencode(real.data, big_endian=True)
    h_le, res_le = scan_file(real.data)
    h_be, res_be = scan_file(be)
    assert h_be.magic == WAL_MAGIC_BE and h_be.big_endian
    assert h_le.magic == WAL_MAGIC_LE and not h_le.big_endian
    assert h_be.checksum != h_le.checksum
    assert res_be.transactions == res_le.transactions
    assert [(f.index, f.pgno, f.commit_size) for f in res_be.frames] == [
        (f.index, f.pgno, f.commit_size) for f in res_le.frames
    ]
    assert res_be.end_checksum == stored_checksum(be, res_be.end_index, 1024)
    assert res_be.end_checksum != res_le.end_checksum
    # the re-encoding helper round-trips to SQLite's own bytes
    assert reencode(be, big_endian=h_le.big_endian) == real.data


def test_real_wal_reset_stops_at_stale_frames(tmp_path: Path) -> None:
    real = make_real_wal(tmp_path, 4096, 7, reset_after=6)
    h, res = scan_file(real.data)
    old = parse_wal_header(real.old_header)
    assert h.salt1 == (old.salt1 + 1) & MASK
    assert h.checkpoint_seq == old.checkpoint_seq + 1
    assert len(res.transactions) == 1
    assert [t[2] for t in res.transactions] == real.commit_sizes
    assert res.stop_reason == "salt"  # the old epoch's frames follow, with the old salts
    assert res.valid_end_index == res.end_index
    assert len(real.data) > frame_offset(res.end_index + 1, 4096)


# ------------------------------------------------------------------------------------------
# Checksum


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=4096),
    big_endian=st.booleans(),
    s0=st.integers(0, MASK),
    s1=st.integers(0, MASK),
)
def test_checksum_matches_reference(data: bytes, big_endian: bool, s0: int, s1: int) -> None:
    data = data[: len(data) // 8 * 8]
    assert wal_checksum(data, big_endian, s0, s1) == ref_checksum(data, big_endian, s0, s1)
    assert wal_checksum(memoryview(data), big_endian, s0, s1) == ref_checksum(
        data, big_endian, s0, s1
    )


@pytest.mark.parametrize("big_endian", [False, True])
def test_checksum_multi_block_matches_reference(big_endian: bool) -> None:
    data = random.Random(1).randbytes(3 * 32768 + 8 * 13)
    s = (0xDEADBEEF, 0xFEEDFACE)
    assert wal_checksum(data, big_endian, *s) == ref_checksum(data, big_endian, *s)


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(0, 5 << 17), max_size=4), big_endian=st.booleans())
def test_checksum_chains_across_splits(cuts: list[int], big_endian: bool) -> None:
    """Checksumming in pieces equals checksumming the whole (covers batch boundaries)."""
    data = random.Random(2).randbytes(5 << 20)
    points = sorted({0, len(data), *(c * 8 for c in cuts)})
    ck = (1, 2)
    for a, b in zip(points, points[1:], strict=False):
        ck = wal_checksum(data[a:b], big_endian, *ck)
    assert ck == wal_checksum(data, big_endian, 1, 2)


def test_checksum_rejects_partial_word_pair() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        wal_checksum(b"\0" * 12, False)


def test_checksum_empty_is_identity() -> None:
    assert wal_checksum(b"", True, 5, 6) == (5, 6)


# ------------------------------------------------------------------------------------------
# Header


def test_parse_header_fields() -> None:
    raw = make_header(big_endian=True, page_size=65536, salts=(1, 0xFFFFFFFF), ckpt=42)
    h = parse_wal_header(raw + b"trailing bytes are ignored")
    assert (h.magic, h.version, h.page_size, h.checkpoint_seq) == (
        WAL_MAGIC_BE,
        WAL_VERSION,
        65536,
        42,
    )
    assert h.salts == (1, 0xFFFFFFFF)
    assert h.big_endian
    assert h.raw == raw
    assert h.checksum == struct.unpack(">2I", raw[24:])
    assert h.checksum == ref_checksum(raw[:24], True)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (make_header()[:31], "too short"),
        (b"", "too short"),
        (make_header(magic=0x377F0684), "bad WAL magic"),
        (b"\0" * 32, "bad WAL magic"),
        (make_header(version=3007001), "version"),
        (make_header(page_size=256), "page size"),
        (make_header(page_size=1000), "page size"),
        (make_header(page_size=131072), "page size"),
        (make_header(page_size=0), "page size"),
        (make_header()[:24] + b"\0" * 8, "checksum mismatch"),
        (make_header(big_endian=True)[:3] + b"\x82" + make_header(big_endian=True)[4:], "checksum"),
    ],
)
def test_bad_header(raw: bytes, match: str) -> None:
    with pytest.raises(WalError, match=match) as err:
        parse_wal_header(raw)
    assert "\n" not in str(err.value)
    with tempfile.TemporaryFile() as f:
        f.write(raw)
        f.flush()
        assert read_wal_header(f.fileno()) is None


def test_read_wal_header(tmp_path: Path) -> None:
    p = tmp_path / "w"
    for content in (b"", make_header()[:20]):
        p.write_bytes(content)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert read_wal_header(fd) is None
        finally:
            os.close(fd)
    p.write_bytes(make_header(page_size=8192) + b"\0" * 100)
    fd = os.open(p, os.O_RDONLY)
    try:
        h = read_wal_header(fd)
        assert h is not None and h.page_size == 8192
    finally:
        os.close(fd)


def test_frame_geometry() -> None:
    assert frame_size(4096) == 4120
    assert frame_offset(1, 4096) == 32
    assert frame_offset(3, 512) == 32 + 2 * 536
    with pytest.raises(ValueError):
        frame_offset(0, 4096)


# ------------------------------------------------------------------------------------------
# Scanning synthetic WALs


wal_shapes = st.fixed_dictionaries(
    {
        "txn_sizes": st.lists(st.integers(1, 3), max_size=5),
        "tail": st.integers(0, 2),
        "big_endian": st.booleans(),
        "seed": st.integers(0, 1000),
    }
)


def expected_txns(w: SynthWal, limit_offset: int) -> list[tuple[int, int, int]]:
    """The transactions whose commit frame ends at or before ``limit_offset``."""
    return [t for t in w.txns if w.frame_end(t[1]) <= limit_offset]


@settings(max_examples=150, deadline=None)
@given(shape=wal_shapes, cut=st.floats(0, 1))
def test_truncation_never_yields_frames_past_cut(shape: dict[str, object], cut: float) -> None:
    w = build_wal(**shape)  # type: ignore[arg-type]
    n = int(cut * len(w.data))
    data = w.data[:n]
    if n < WAL_HEADER_SIZE:
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            assert read_wal_header(f.fileno()) is None
        return
    _, res = scan_file(data)
    assert all(w.frame_end(f.index) <= n for f in res.frames)
    assert res.transactions == expected_txns(w, n)
    assert_well_formed(res)
    assert res.stop_reason == ("eof" if (n - WAL_HEADER_SIZE) % frame_size(512) == 0 else "short")
    assert_lean_scan_agrees(data, res)


@settings(max_examples=200, deadline=None)
@given(shape=wal_shapes, where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_corruption_never_yields_frames_at_or_past_damage(
    shape: dict[str, object], where: float, xor: int
) -> None:
    w = build_wal(**shape)  # type: ignore[arg-type]
    off = int(where * len(w.data))
    bad = bytearray(w.data)
    bad[off] ^= xor
    if off < WAL_HEADER_SIZE:
        with pytest.raises(WalError):
            parse_wal_header(bytes(bad))
        return
    _, res = scan_file(bytes(bad))
    damaged = (off - WAL_HEADER_SIZE) // frame_size(512) + 1
    assert all(w.frame_end(f.index) <= off for f in res.frames)
    assert all(f.index < damaged for f in res.frames)
    assert res.transactions == expected_txns(w, frame_offset(damaged, 512))
    assert res.valid_end_index == damaged - 1
    in_frame = (off - WAL_HEADER_SIZE) % frame_size(512)
    assert res.stop_reason == ("salt" if 8 <= in_frame < 16 else "checksum")
    assert_well_formed(res)
    assert_lean_scan_agrees(bytes(bad), res)


@settings(max_examples=100, deadline=None)
@given(
    shape=wal_shapes,
    pick=st.floats(0, 1, exclude_max=True),
    which=st.sampled_from([0, 1]),
    value=st.integers(0, MASK),
)
def test_foreign_salt_stops_scan(
    shape: dict[str, object], pick: float, which: int, value: int
) -> None:
    w = build_wal(**shape)  # type: ignore[arg-type]
    if w.n_frames == 0:
        return
    k = 1 + int(pick * w.n_frames)
    h = parse_wal_header(w.data)
    if value == h.salts[which]:
        value ^= 1
    bad = bytearray(w.data)
    pos = frame_offset(k, 512) + 8 + 4 * which
    bad[pos : pos + 4] = struct.pack(">I", value)
    _, res = scan_file(bytes(bad))
    assert res.stop_reason == "salt"
    assert res.valid_end_index == k - 1
    assert res.transactions == expected_txns(w, frame_offset(k, 512))
    assert all(f.index < k for f in res.frames)


@settings(max_examples=150, deadline=None)
@given(shape=wal_shapes, where=st.none() | st.floats(0, 1, exclude_max=True),
       xor=st.integers(1, 255), keep=st.booleans())
def test_a_few_frames_are_judged_as_a_block_of_many_is(
    shape: dict[str, object], where: float | None, xor: int, keep: bool
) -> None:
    """Frame by frame (a small block) and all at once (numpy): the same frames, transactions,
    checksums and stop, whether the WAL is whole, torn or damaged anywhere."""
    w = build_wal(**shape)  # type: ignore[arg-type]
    data = bytearray(w.data)
    if where is not None and len(data) > WAL_HEADER_SIZE:
        data[WAL_HEADER_SIZE + int(where * (len(data) - WAL_HEADER_SIZE))] ^= xor
    results = []
    for small in (0, 1 << 20):
        with mock.patch.object(wal_module, "SMALL_BLOCK_FRAMES", small):
            _, res = scan_file(bytes(data), keep_frames=keep)
        results.append(res)
    assert results[0] == results[1]


@pytest.mark.parametrize("big_endian", [False, True])
def test_torn_tail_is_not_returned(big_endian: bool) -> None:
    w = build_wal([2, 1, 3], tail=4, big_endian=big_endian)
    h, res = scan_file(w.data)
    assert res.transactions == w.txns
    assert res.end_index == 6
    assert res.valid_end_index == 10
    assert res.stop_reason == "eof"
    assert [f.index for f in res.frames] == list(range(1, 7))
    assert res.end_checksum == stored_checksum(w.data, 6, 512)
    assert scan_bytes(w.data[WAL_HEADER_SIZE:], h, 1, h.checksum) == res


def test_no_commit_returns_nothing() -> None:
    w = build_wal([], tail=3)
    h, res = scan_file(w.data)
    assert res.frames == [] and res.transactions == []
    assert res.end_index == 0
    assert res.end_checksum == h.checksum
    assert res.valid_end_index == 3


def test_empty_wal_and_page_number_zero() -> None:
    w = build_wal([])
    h, res = scan_file(w.data)
    assert (res.frames, res.end_index, res.stop_reason) == ([], 0, "eof")
    # a frame with page number 0 is invalid even with a correct checksum (SQLite rejects it)
    body = encode_frames([(3, 3, b"\1" * 512), (0, 3, b"\2" * 512)], False, h.salts, h.checksum)
    res = scan_bytes(body, h, 1, h.checksum)
    assert (res.end_index, res.valid_end_index, res.stop_reason) == (1, 1, "checksum")


def test_max_frames_limits_and_stays_committed() -> None:
    w = build_wal([2, 1, 3, 2], tail=1, seed=3)
    for m in range(0, w.n_frames + 2):
        _, res = scan_file(w.data, max_frames=m)
        assert res.stop_reason == ("limit" if m <= w.n_frames else "eof")
        assert res.valid_end_index == min(m, w.n_frames)
        assert res.transactions == [t for t in w.txns if t[1] <= m]
        assert_well_formed(res)


@settings(max_examples=60, deadline=None)
@given(shape=wal_shapes, step=st.integers(1, 4), chunk=st.integers(1, 5 * 536))
def test_resume_and_chunking_give_the_same_frames(
    shape: dict[str, object], step: int, chunk: int
) -> None:
    """Scanning in pieces (resuming at end_index + 1 with end_checksum), with any chunk size,
    gives the same frames as one scan."""
    w = build_wal(**shape)  # type: ignore[arg-type]
    h, whole = scan_file(w.data)
    frames: list[Frame] = []
    txns: list[tuple[int, int, int]] = []
    with tempfile.TemporaryFile() as f:
        f.write(w.data)
        f.flush()
        idx, ck = 1, h.checksum
        for _ in range(100):
            res = scan_frames(f.fileno(), h, idx, ck, max_frames=step, chunk_bytes=chunk)
            assert_well_formed(res, idx)
            frames += res.frames
            txns += res.transactions
            if res.stop_reason == "limit" and res.end_index < idx:
                # a transaction longer than `step`: widen the window, as a caller would
                step += 1
                continue
            if res.stop_reason != "limit":
                break
            idx, ck = res.end_index + 1, res.end_checksum
    assert frames == whole.frames
    assert txns == whole.transactions == w.txns


def test_scan_bytes_of_a_segment_body_matches_file_scan() -> None:
    w = build_wal([1, 2, 2, 1, 3], tail=2, big_endian=True, seed=9)
    h, whole = scan_file(w.data)
    start = 4  # first frame of the third transaction
    body = w.data[frame_offset(start, 512) :]
    res = scan_bytes(memoryview(body), h, start, whole.frames[start - 2].checksum)
    assert res.frames == whole.frames[start - 1 :]
    assert res.transactions == whole.transactions[2:]
    assert (res.valid_end_index, res.stop_reason) == (whole.valid_end_index, "eof")
    # the same body chained from a wrong checksum yields nothing
    res = scan_bytes(body, h, start, (0, 0))
    assert (res.frames, res.end_index, res.stop_reason) == ([], start - 1, "checksum")


# ------------------------------------------------------------------------------------------
# verify_frames


@pytest.mark.parametrize("plain", [False, True], ids=["numpy", "plain"])
@pytest.mark.parametrize("big_endian", [False, True])
def test_verify_frames(big_endian: bool, plain: bool) -> None:
    w = build_wal([2, 3], tail=1, big_endian=big_endian, seed=5)
    h = parse_wal_header(w.data)
    body = w.data[WAL_HEADER_SIZE:]

    def verify(buf: bytes, ck: tuple[int, int], *, salts: tuple[int, int] = h.salts,
               be: bool = big_endian) -> tuple[int, int]:
        return verify_frames(buf, 512, be, salts, ck, plain=plain)

    final = verify(body, h.checksum)
    assert final == stored_checksum(w.data, 6, 512)  # uncommitted frames are fine here
    assert verify(b"", (3, 4)) == (3, 4)
    fs = frame_size(512)
    part = body[2 * fs : 4 * fs]
    assert verify(part, stored_checksum(w.data, 2, 512)) == stored_checksum(w.data, 4, 512)

    bad = bytearray(body)
    bad[3 * fs + 100] ^= 0x40
    with pytest.raises(WalError, match=r"frame 4 of 6 .*checksum mismatch"):
        verify(bytes(bad), h.checksum)
    with pytest.raises(WalError, match=r"frame 1 of 6 .*salt mismatch"):
        verify(body, h.checksum, salts=(h.salt1 + 1, h.salt2))
    with pytest.raises(WalError, match="frame 1 of 6"):
        verify(body, h.checksum, be=not big_endian)
    with pytest.raises(WalError, match="whole number"):
        verify(body[:-1], h.checksum)
    zero = encode_frames([(3, 0, bytes(512)), (0, 1, bytes(512))], big_endian, h.salts,
                         h.checksum)
    with pytest.raises(WalError, match=r"frame 2 of 2 .*page number 0"):
        verify(zero, h.checksum)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5), big_endian=st.booleans(),
       flip=st.none() | st.integers(0, 20 * 536 * 8 - 1), seed=st.integers(0, 99))
def test_plain_verify_agrees_with_numpy(
    sizes: list[int], big_endian: bool, flip: int | None, seed: int
) -> None:
    """Frame by frame in plain Python and vectorised: the same checksum, the same error."""
    w = build_wal(sizes, big_endian=big_endian, seed=seed)
    h = parse_wal_header(w.data)
    body = bytearray(w.data[WAL_HEADER_SIZE:])
    if flip is not None and flip < len(body) * 8:
        body[flip // 8] ^= 1 << (flip % 8)
    got = []
    for plain in (False, True):
        try:
            got.append(verify_frames(bytes(body), 512, big_endian, h.salts, h.checksum,
                                     plain=plain))
        except WalError as exc:
            got.append(str(exc))
    assert got[0] == got[1]


def test_file_shorter_than_start_slot_is_short(tmp_path: Path) -> None:
    w = build_wal([2, 2], seed=4)
    h = parse_wal_header(w.data)
    p = tmp_path / "w"
    p.write_bytes(w.data)
    fd = os.open(p, os.O_RDONLY)
    try:
        # nothing new after the last frame: eof
        res = scan_frames(fd, h, 5, stored_checksum(w.data, 4, 512))
        assert (res.frames, res.end_index, res.stop_reason) == ([], 4, "eof")
        # the WAL shrank below the slot we would resume at: short
        os.truncate(p, frame_offset(3, 512))
        res = scan_frames(fd, h, 5, stored_checksum(w.data, 4, 512))
        assert (res.frames, res.end_index, res.stop_reason) == ([], 4, "short")
        os.truncate(p, 0)
        assert scan_frames(fd, h, 5, (0, 0)).stop_reason == "short"
        assert read_wal_header(fd) is None
    finally:
        os.close(fd)


def test_page_offsets_point_at_each_pages_newest_frame(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    c = sqlite3.connect(db)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA wal_autocheckpoint=0")
    c.execute("CREATE TABLE t(x)")
    for i in range(300):
        c.execute("INSERT INTO t VALUES (?)", (os.urandom(200 + i),))
        c.commit()
    fd = os.open(f"{db}-wal", os.O_RDONLY)
    try:
        h = read_wal_header(fd)
        assert h is not None
        res = scan_frames(fd, h, 1, h.checksum)
        want = {f.pgno: frame_offset(f.index, h.page_size) + 24 for f in res.frames}
        for chunk in (1, 3 * frame_size(h.page_size), 4 << 20):
            assert page_offsets(fd, h, res.end_index, chunk) == want
        half = res.frames[len(res.frames) // 2].index
        assert page_offsets(fd, h, half) == {
            f.pgno: frame_offset(f.index, h.page_size) + 24 for f in res.frames if f.index <= half
        }
        with pytest.raises(WalError, match="before frame"):
            page_offsets(fd, h, res.end_index + 5)
    finally:
        os.close(fd)
        c.close()


def test_read_buffers_are_lent_grown_and_kept_at_most_two_the_largest(tmp_path: Path) -> None:
    f = tmp_path / "f"
    data = os.urandom(10_000)
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    pool = ReadBuffers(keep=2)
    try:
        with pool.lend() as a, pool.lend() as b, pool.lend() as c:
            assert bytes(a.pread(fd, 100, 0)) == data[:100]
            assert bytes(b.pread(fd, 5000, 10)) == data[10:5010]
            assert bytes(c.pread(fd, 20_000, 9_000)) == data[9_000:]  # short at the end
            assert bytes(a.pread(fd, 3000, 7000)) == data[7000:]  # grown
        kept = sorted(len(x) for x in pool._free)
        assert kept == [5000, 20_000]  # the largest two
        with pool.lend() as d:
            assert len(d.buf) == 20_000  # the largest is lent first
            assert bytes(d.pread(fd, 10, 0)) == data[:10]
    finally:
        os.close(fd)
