"""Tests for replicator.format: objects round trip, and every kind of damage is detected."""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator import crc
from replicator.errors import CorruptObjectError, FormatError
from replicator.format import (
    FORMAT_VERSION,
    KIND_SNAPSHOT,
    KIND_WAL,
    MAGIC,
    READ_VERSIONS,
    TRAILER_MAGIC,
    ObjectDecoder,
    ObjectWriter,
    decode_stream,
    read_header,
    read_header_file,
)

KEY = (
    "generations/0123456789abcdef/wal/"
    "0000000000000001-0000000000000002-000000000001-000000000002.seg"
)
PREAMBLE = 12  # magic, version, kind, header length
TRAILER = 8


def encode(
    kind: int, header: dict[str, Any], chunks: Iterable[bytes] = (), level: int | None = 1
) -> bytes:
    buf = io.BytesIO()
    w = ObjectWriter(buf, kind, header, level=level)
    for c in chunks:
        w.write(c)
    w.close()
    assert w.size == len(buf.getvalue())  # what the spool records as the object's size
    return buf.getvalue()


def decode(raw: bytes, chunk_sizes: Iterable[int] | None = None, key: str = KEY) -> tuple[
    dict[str, Any], int, bytes
]:
    """Feed ``raw`` (in chunks of the given sizes, cycling; default: all at once) and finish."""
    dec = ObjectDecoder(key)
    out = bytearray()
    if chunk_sizes is None:
        out += dec.feed(raw)
    else:
        sizes = list(chunk_sizes)
        pos = i = 0
        while pos < len(raw):
            n = sizes[i % len(sizes)]
            out += dec.feed(raw[pos : pos + n])
            pos += n
            i += 1
    dec.finish()
    assert dec.header is not None
    return dec.header, dec.kind, bytes(out)


def layout(raw: bytes) -> tuple[int, int]:
    """(offset of the body, offset of the trailer)."""
    hlen = struct.unpack_from(">I", raw, 8)[0]
    return PREAMBLE + hlen, len(raw) - TRAILER


def flip(raw: bytes, offset: int, xor: int = 0xFF) -> bytes:
    b = bytearray(raw)
    b[offset] ^= xor
    return bytes(b)


def snapshot_header() -> dict[str, Any]:
    return {"kind": "snapshot", "generation": "0123456789abcdef", "txid": 7,
            "ts_ns": 1_700_000_000_123_456_789, "page_size": 4096, "pages": 3,
            "big_endian": False, "position": None, "db": "/x/app.db"}


def wal_header() -> dict[str, Any]:
    return {"kind": "wal", "generation": "0123456789abcdef", "start_txid": 1, "end_txid": 2,
            "page_size": 4096, "big_endian": False, "prev": None,
            "start": {"salt1": 1, "salt2": 2, "frame": 0, "checksum": [3, 4]},
            "end": {"salt1": 1, "salt2": 2, "frame": 2, "checksum": [5, 6]},
            "wal_header": None, "frames": 2,
            "txns": [[1, 1_700_000_000_000_000_001, 1, 3], [2, 1_700_000_000_000_000_002, 1, 3]]}


def sample_body(n: int, seed: int = 0) -> bytes:
    """Half compressible, half random, like database pages."""
    rng = random.Random(seed)
    parts = []
    while sum(map(len, parts)) < n:
        parts.append(rng.randbytes(512))
        parts.append(bytes([rng.randrange(4)]) * 512)
    return b"".join(parts)[:n]


SNAP_OBJ = encode(KIND_SNAPSHOT, snapshot_header(), [sample_body(3 * 4096, 1)])
WAL_OBJ = encode(KIND_WAL, wal_header(), [sample_body(2 * 4120, 2)])


# ------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    ("kind", "header"), [(KIND_SNAPSHOT, snapshot_header()), (KIND_WAL, wal_header())]
)
def test_round_trip(kind: int, header: dict[str, Any]) -> None:
    body = sample_body(20_000)
    raw = encode(kind, header, [body[:5000], body[5000:5001], body[5001:]])
    assert raw.startswith(MAGIC)
    assert raw[-TRAILER:].startswith(TRAILER_MAGIC)
    assert struct.unpack_from(">HH", raw, 4) == (FORMAT_VERSION, kind)
    got_header, got_kind, got_body = decode(raw)
    assert got_header == header
    assert got_kind == kind
    assert got_body == body


def test_header_is_plain_json_before_the_body() -> None:
    raw = encode(KIND_WAL, wal_header(), [b"x" * 100])
    body_at, _ = layout(raw)
    assert json.loads(raw[PREAMBLE:body_at]) == wal_header()


def test_the_trailer_is_zlibs_crc32_of_header_and_body_whichever_crc_runs() -> None:
    """The trailer's checksum is CRC-32 with zlib's polynomial over the header's JSON and the
    uncompressed body, chained over the pieces as they were written: the faster
    implementation used where it is installed gives zlib's values (chained, from any buffer
    type), so objects do not depend on which one wrote them."""
    rnd = random.Random(7)
    pieces = [rnd.randbytes(n) for n in (0, 1, 7, 4096, 70_000, 1 << 20)]
    buf = bytearray(b"".join(pieces))
    value = 0
    for p in pieces:
        value = crc.crc32(memoryview(p), value)
    assert value == zlib.crc32(buf)
    assert crc.crc32(memoryview(buf)[3:5000], 12345) == zlib.crc32(buf[3:5000], 12345)
    raw = encode(KIND_WAL, wal_header(), pieces)
    body_at, _ = layout(raw)
    assert raw[-4:] == struct.pack(">I", zlib.crc32(raw[PREAMBLE:body_at] + bytes(buf)))


def test_writer_counts_body_bytes() -> None:
    w = ObjectWriter(io.BytesIO(), KIND_WAL, {})
    w.write(b"abc")
    w.write(memoryview(b"defgh"))
    w.close()
    assert w.body_bytes == 8


@pytest.mark.parametrize("kind", [KIND_SNAPSHOT, KIND_WAL])
def test_empty_body(kind: int) -> None:
    raw = encode(kind, {"kind": "snapshot" if kind == KIND_SNAPSHOT else "wal"})
    header, got_kind, body = decode(raw)
    assert body == b""
    assert got_kind == kind
    assert header["kind"] in ("snapshot", "wal")
    # byte by byte too
    assert decode(raw, [1])[2] == b""


def test_multi_megabyte_body_in_odd_chunks() -> None:
    body = sample_body(3 * 1024 * 1024 + 17, seed=3)
    # written in odd pieces as well
    cuts = [0, 1, 4093, 65_537, 1_000_003, 2_222_223, len(body)]
    raw = encode(KIND_SNAPSHOT, snapshot_header(), [body[a:b] for a, b in itertools.pairwise(cuts)])
    assert len(raw) < len(body)  # it is compressed
    for sizes in ([7, 4093, 1, 65_537, 131], [len(raw)]):
        header, _, got = decode(raw, sizes)
        assert header == snapshot_header()
        assert got == body


def test_unicode_header_round_trips() -> None:
    header = {"kind": "snapshot", "db": "/données/数据.db"}
    assert decode(encode(KIND_SNAPSHOT, header, [b"z"]))[0] == header


async def _chunks(raw: bytes, size: int, closed: list[bool]) -> AsyncIterator[bytes]:
    try:
        for i in range(0, len(raw), size):
            yield raw[i : i + size]
    finally:
        closed.append(True)


@pytest.mark.parametrize("size", [1, 5, 100, 1 << 20])
async def test_decode_stream_and_read_header(size: int) -> None:
    body = sample_body(70_000, seed=5)
    raw = encode(KIND_WAL, wal_header(), [body])
    closed: list[bool] = []
    assert await read_header(_chunks(raw, size, closed), KEY) == wal_header()
    assert closed == [True]  # the stream is closed after the header
    header, it = await decode_stream(_chunks(raw, size, []), KEY)
    assert header == wal_header()
    assert b"".join([c async for c in it]) == body


async def test_decode_stream_raises_at_the_end_of_a_corrupt_body() -> None:
    body_at, trailer_at = layout(WAL_OBJ)
    raw = flip(WAL_OBJ, trailer_at + 6)  # the checksum: only detectable at the end
    header, it = await decode_stream(_chunks(raw, 1000, []), KEY)
    assert header == wal_header()
    with pytest.raises(CorruptObjectError, match="checksum mismatch") as ei:
        async for _ in it:
            pass
    assert KEY in str(ei.value)


async def test_stream_helpers_reject_truncated_headers() -> None:
    for cut in (0, 5, PREAMBLE, PREAMBLE + 10):
        with pytest.raises(CorruptObjectError, match="truncated header") as ei:
            await read_header(_chunks(WAL_OBJ[:cut], 3, []), KEY)
        assert KEY in str(ei.value)
        with pytest.raises(CorruptObjectError, match="truncated header"):
            await decode_stream(_chunks(WAL_OBJ[:cut], 3, []), KEY)


async def test_read_header_rejects_bad_magic() -> None:
    with pytest.raises(FormatError, match="bad magic"):
        await read_header(_chunks(b"SQLite format 3\x00" + bytes(200), 7, []), KEY)


# ------------------------------------------------------------------------------------------
# Each class of damage, detected and naming the key


def assert_rejected(raw: bytes, match: str, exc: type[FormatError] = CorruptObjectError,
                    chunk_sizes: Iterable[int] | None = None) -> None:
    with pytest.raises(exc, match=match) as ei:
        decode(raw, chunk_sizes)
    assert str(ei.value).startswith(f"{KEY}: ")


@pytest.mark.parametrize("obj", [SNAP_OBJ, WAL_OBJ], ids=["snapshot", "wal"])
@pytest.mark.parametrize("chunks", [None, [1], [3, 17]], ids=["whole", "bytewise", "odd"])
class TestDamage:
    def test_bad_magic(self, obj: bytes, chunks: list[int] | None) -> None:
        for i in range(4):
            assert_rejected(flip(obj, i), "bad magic", FormatError, chunks)
        assert_rejected(b"PK\x03\x04" + obj[4:], "not a replica object", FormatError, chunks)

    def test_unsupported_version(self, obj: bytes, chunks: list[int] | None) -> None:
        newer = max(READ_VERSIONS) + 1
        raw = obj[:4] + struct.pack(">H", newer) + obj[6:]
        assert_rejected(raw, f"unsupported format version {newer}", FormatError,
                        chunks)
        assert_rejected(flip(obj, 4), "unsupported format version", FormatError, chunks)

    def test_bad_kind(self, obj: bytes, chunks: list[int] | None) -> None:
        # the preamble kind is not covered by the checksum: it must be checked on its own
        for off, xor in ((6, 0xFF), (6, 0x01), (7, 0xFF), (7, 0x03), (7, 0x01)):
            with pytest.raises(FormatError) as ei:
                decode(flip(obj, off, xor), chunks)
            assert str(ei.value).startswith(f"{KEY}: ")

    def test_header_length_damage(self, obj: bytes, chunks: list[int] | None) -> None:
        assert_rejected(flip(obj, 8), "corrupt object", CorruptObjectError, chunks)  # huge
        for off in (9, 10, 11):
            with pytest.raises(CorruptObjectError) as ei:
                decode(flip(obj, off, 0x01), chunks)
            assert str(ei.value).startswith(f"{KEY}: ")

    def test_header_json_damage(self, obj: bytes, chunks: list[int] | None) -> None:
        body_at, _ = layout(obj)
        assert obj[PREAMBLE : PREAMBLE + 1] == b"{"
        assert_rejected(flip(obj, PREAMBLE, 0x20), "bad header", CorruptObjectError, chunks)
        assert_rejected(flip(obj, body_at - 1), "bad header", CorruptObjectError, chunks)
        # an invalid UTF-8 byte in the middle of the JSON
        mid = PREAMBLE + (body_at - PREAMBLE) // 2
        assert_rejected(obj[:mid] + b"\xff" + obj[mid + 1 :], "bad header", CorruptObjectError,
                        chunks)

    def test_header_damage_that_stays_valid_json(self, obj: bytes,
                                                 chunks: list[int] | None) -> None:
        body_at, _ = layout(obj)
        text = obj[PREAMBLE:body_at]
        i = text.index(b'"page_size":4096') + len(b'"page_size":')
        raw = obj[: PREAMBLE + i] + b"8" + obj[PREAMBLE + i + 1 :]  # 4096 -> 8096
        json.loads(raw[PREAMBLE:body_at])  # still a valid header
        assert_rejected(raw, "checksum mismatch", CorruptObjectError, chunks)

    def test_body_byte_flips(self, obj: bytes, chunks: list[int] | None) -> None:
        body_at, trailer_at = layout(obj)
        for off in (body_at, body_at + 4, (body_at + trailer_at) // 2, trailer_at - 1):
            with pytest.raises(CorruptObjectError) as ei:
                decode(flip(obj, off), chunks)
            assert str(ei.value).startswith(f"{KEY}: corrupt object")

    def test_truncated_body(self, obj: bytes, chunks: list[int] | None) -> None:
        body_at, trailer_at = layout(obj)
        for cut in (body_at, body_at + 1, (body_at + trailer_at) // 2, trailer_at - 1):
            assert_rejected(obj[:cut], "truncated body", CorruptObjectError, chunks)

    def test_truncated_header(self, obj: bytes, chunks: list[int] | None) -> None:
        body_at, _ = layout(obj)
        for cut in (0, 1, PREAMBLE - 1, PREAMBLE, body_at - 1):
            assert_rejected(obj[:cut], "truncated header", CorruptObjectError, chunks)

    def test_truncated_or_missing_trailer(self, obj: bytes, chunks: list[int] | None) -> None:
        _, trailer_at = layout(obj)
        for cut in (trailer_at, trailer_at + 1, trailer_at + 4, len(obj) - 1):
            assert_rejected(obj[:cut], "bad trailer", CorruptObjectError, chunks)

    def test_trailer_damage(self, obj: bytes, chunks: list[int] | None) -> None:
        _, trailer_at = layout(obj)
        assert_rejected(flip(obj, trailer_at), "bad trailer", CorruptObjectError, chunks)
        assert_rejected(flip(obj, trailer_at + 4), "checksum mismatch", CorruptObjectError,
                        chunks)
        assert_rejected(flip(obj, len(obj) - 1), "checksum mismatch", CorruptObjectError, chunks)

    def test_trailing_garbage(self, obj: bytes, chunks: list[int] | None) -> None:
        assert_rejected(obj + b"\x00", "bad trailer", CorruptObjectError, chunks)
        assert_rejected(obj + obj, "bad trailer", CorruptObjectError, chunks)

    def test_intact_object_decodes(self, obj: bytes, chunks: list[int] | None) -> None:
        decode(obj, chunks)  # the control: every failure above is caused by the damage


def test_header_that_is_not_an_object() -> None:
    raw = bytearray(SNAP_OBJ)
    body_at, _ = layout(SNAP_OBJ)
    hlen = body_at - PREAMBLE
    fake = b"[" + b"1," * ((hlen - 2) // 2) + b"1]"
    fake = fake.ljust(hlen, b" ")
    raw[PREAMBLE:body_at] = fake
    assert_rejected(bytes(raw), "bad header")


def test_kind_must_match_the_header() -> None:
    """A snapshot header in a wal-kind object (or the reverse) is not a valid object."""
    raw = encode(KIND_WAL, snapshot_header(), [b"x"])
    with pytest.raises(CorruptObjectError) as ei:
        decode(raw)
    assert KEY in str(ei.value)


# ------------------------------------------------------------------------------------------
# Properties: no truncation and no single-byte change ever decodes


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from(["snapshot", "wal"]),
    where=st.floats(0, 1, exclude_max=True),
    chunk=st.integers(1, 5000),
)
def test_any_truncation_is_detected(which: str, where: float, chunk: int) -> None:
    obj = SNAP_OBJ if which == "snapshot" else WAL_OBJ
    cut = int(where * len(obj))
    with pytest.raises(FormatError) as ei:
        decode(obj[:cut], [chunk])
    assert KEY in str(ei.value)


@pytest.mark.parametrize("obj", [SNAP_OBJ, WAL_OBJ], ids=["snapshot", "wal"])
def test_a_version_its_kind_is_never_written_with_is_corrupt(obj: bytes) -> None:
    with pytest.raises(FormatError, match="corrupt object") as ei:
        decode(flip(obj, 5, 2 ^ 3), [7])  # version 2 turned into 3 (differential snapshots')
    assert KEY in str(ei.value)


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from(["snapshot", "wal"]),
    where=st.floats(0, 1, exclude_max=True),
    xor=st.integers(1, 255),
    chunk=st.integers(1, 5000),
)
def test_any_flipped_byte_is_detected(which: str, where: float, xor: int, chunk: int) -> None:
    obj = SNAP_OBJ if which == "snapshot" else WAL_OBJ
    off = int(where * len(obj))
    try:
        got = decode(flip(obj, off, xor), [chunk])
    except FormatError as exc:
        assert KEY in str(exc)
        return
    # the one byte the trailer's digest does not cover and no check can: the preamble's
    # version turned into another that objects of this kind are written with (2 into 1); the
    # object then reads exactly the same
    assert off == 5 and obj[off] ^ xor == 1, (off, xor)
    assert got == decode(obj)


@settings(max_examples=100, deadline=None)
@given(
    body=st.binary(max_size=3000),
    header=st.dictionaries(
        st.text(max_size=8).filter(lambda k: k != "kind"),
        st.integers() | st.text(max_size=20),
        max_size=5,
    ),
    chunk=st.integers(1, 4000),
)
def test_round_trip_property(body: bytes, header: dict[str, Any], chunk: int) -> None:
    raw = encode(KIND_WAL, header, [body[:7], body[7:]])
    got_header, kind, got_body = decode(raw, [chunk])
    assert (got_header, kind, got_body) == (header, KIND_WAL, body)


@pytest.mark.parametrize(
    "sizes", [[], [0], [1], [128 << 10], [(128 << 10) + 1, 5], [3 << 20, 7, 256 << 10]]
)
def test_stored_body_is_plain_zstd_and_round_trips(sizes: list[int]) -> None:
    """level=None stores the body in raw zstd blocks: any zstd decoder reads it, the object
    decodes like a compressed one, and it costs only a few bytes per 128 KiB over the body."""
    rnd = random.Random(len(sizes))
    chunks = [bytes(rnd.getrandbits(8) for _ in range(min(n, 64))) * (n // 64 + 1) for n in sizes]
    chunks = [c[:n] for c, n in zip(chunks, sizes, strict=True)]
    body = b"".join(chunks)
    raw = encode(KIND_WAL, {"n": 1}, chunks, level=None)
    got_header, kind, got_body = decode(raw, [4099])
    assert (got_header, kind, got_body) == ({"n": 1}, KIND_WAL, body)
    hlen = struct.unpack(">I", raw[8:12])[0]
    frame = raw[PREAMBLE + hlen : -TRAILER]
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == body
    blocks = sum(-(-len(c) // (128 << 10)) for c in chunks)  # each write is cut into blocks
    assert len(frame) == 6 + 3 * blocks + len(body) + 3
    # a compressed object of the same (repetitive) body is smaller, and decodes the same
    if len(body) > 1000:
        packed = encode(KIND_WAL, {"n": 1}, chunks)
        assert len(packed) < len(raw)
        assert decode(packed)[2] == body


@pytest.mark.parametrize("size", [0, 1, 8_256, (3 << 20) + 17])
@pytest.mark.parametrize("level", [1, -7, None])
def test_a_body_written_whole_decodes_as_one_written_in_pieces(size: int,
                                                               level: int | None) -> None:
    """write_whole compresses in one pass: the object decodes to the same header and body,
    with the same trailer, as one streamed in pieces, and is a zstd frame any decoder reads; a
    writer that was written to already streams the rest."""
    body = sample_body(size, seed=size)
    streamed = encode(KIND_WAL, {"n": 1}, [body[: size // 3], body[size // 3 :]], level=level)
    buf = io.BytesIO()
    w = ObjectWriter(buf, KIND_WAL, {"n": 1}, level=level)
    w.write_whole(memoryview(body))
    whole = buf.getvalue()
    assert w.size == len(whole) and w.body_bytes == size
    assert decode(whole, [4099]) == decode(streamed) == ({"n": 1}, KIND_WAL, body)
    assert whole[-TRAILER:] == streamed[-TRAILER:]
    hlen = struct.unpack(">I", whole[8:12])[0]
    frame = whole[PREAMBLE + hlen : -TRAILER]
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == body
    if size > 1000 and level is not None:
        assert len(whole) < size  # compressed
    buf = io.BytesIO()
    w = ObjectWriter(buf, KIND_WAL, {"n": 1}, level=level)
    w.write(body[:5])
    w.write_whole(body[5:])
    assert decode(buf.getvalue()) == ({"n": 1}, KIND_WAL, body)


def test_stored_body_damage_is_detected() -> None:
    raw = bytearray(encode(KIND_WAL, {"n": 1}, [b"x" * 300_000], level=None))
    raw[len(raw) // 2] ^= 1
    with pytest.raises(CorruptObjectError):
        decode(bytes(raw))


def test_read_header_file_reads_only_the_header() -> None:
    raw = encode(KIND_WAL, {"n": 7}, [b"x" * 100_000])
    f = io.BytesIO(raw)
    assert read_header_file(f, KEY) == {"n": 7}
    assert f.tell() == PREAMBLE + struct.unpack(">I", raw[8:12])[0]  # the body was not read
    for bad, error in [(raw[:5], CorruptObjectError), (raw[:PREAMBLE + 3], CorruptObjectError),
                       (b"XXXX" + raw[4:], FormatError)]:
        with pytest.raises(error, match=KEY):
            read_header_file(io.BytesIO(bad), KEY)
