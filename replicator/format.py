"""Encoding of replica objects (snapshots, WAL segments, catch-ups, differential snapshots),
format version 3.

An object is::

    preamble   8 bytes   magic b"\\x89RPL", version u16 BE, kind u16 BE (1 snapshot, 2 wal,
                         3 catch-up, 4 differential snapshot)
    hlen       4 bytes   u32 BE length of the header
    header     hlen      UTF-8 JSON (fields in docs/format.md)
    body       ...       one zstd frame: snapshot = pages 1..n; segment = raw WAL frames
                         (compressed, or stored in raw zstd blocks: see ObjectWriter)
    trailer    8 bytes   b"RPLT" + CRC-32 (big-endian) of (header bytes + uncompressed body)

The header comes first so a reader can plan from it without the body; the checksum comes last so
a writer can stream the body without holding it.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, BinaryIO, Protocol

import zstandard

from .crc import crc32
from .errors import CorruptObjectError, FormatError

MAGIC = b"\x89RPL"
FORMAT_VERSION = 2
# Version 3 added differential snapshots, which carry it; objects of the other kinds did not
# change and still carry 2, so a version-2 reader (which ignores the keys it does not know)
# restores a version-3 replica from its full snapshots and segments.
DIFF_VERSION = 3
READ_VERSIONS = (1, 2, 3)  # version 1: no content hashes, no catch-up objects
KIND_SNAPSHOT = 1
KIND_WAL = 2
KIND_CATCHUP = 3
KIND_DIFF = 4
TRAILER_MAGIC = b"RPLT"
DEFAULT_LEVEL = 1
_PREAMBLE = struct.Struct(">4sHHI")
_HEADER_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
"""How a header is written: compact, keys sorted (one encoder for every object: ``json.dumps``
with options builds one a call)."""
HEADER_START = _PREAMBLE.size  # where an object's header begins
_TRAILER_SIZE = 4 + 4
_MAX_HEADER = 64 << 20
_KIND_NAMES = {KIND_SNAPSHOT: "snapshot", KIND_WAL: "wal", KIND_CATCHUP: "catchup",
               KIND_DIFF: "diff"}
# the versions each kind is written with (version 3 changed nothing but add differential
# snapshots): a preamble's version, which the trailer's digest does not cover, is checked
# against its kind
_KIND_VERSIONS = {KIND_SNAPSHOT: (1, 2), KIND_WAL: (1, 2), KIND_CATCHUP: (2,),
                  KIND_DIFF: (DIFF_VERSION,)}


class _Crc:
    """CRC-32 of everything passed to ``update`` (fast: the WAL frames inside carry SQLite's own
    chained checksums as well)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = crc32(data, self.value)

    def digest(self) -> bytes:
        return struct.pack(">I", self.value)


def _digest() -> _Crc:
    return _Crc()


class _StoredFrame:
    """A zstd frame made of raw (stored) blocks, written at memory speed: what any zstd decoder
    reads back unchanged (RFC 8878: frame header with a 128 KiB window, no content size, no
    checksum; raw blocks of at most 128 KiB; an empty last block)."""

    HEADER = struct.pack("<I", 0xFD2FB528) + bytes([0x00, 0x38])  # window 2^(10+7)
    BLOCK = 128 << 10
    LAST = (1).to_bytes(3, "little")  # last block, raw, size 0

    def __init__(self, out: Callable[[bytes | memoryview], object]) -> None:
        self._f = out
        out(self.HEADER)

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data).cast("B")
        for off in range(0, len(mv), self.BLOCK):
            block = mv[off : off + self.BLOCK]
            self._f((len(block) << 3).to_bytes(3, "little"))
            self._f(block)

    def close(self) -> None:
        self._f(self.LAST)


class _Codecs:
    """zstd contexts kept for reuse by the process: creating one allocates its tables and window
    each time, which costs more than coding a small object. A context is either in this pool
    or used by exactly one writer or decoder (taken when it starts, given back when it ends;
    one that ends early is simply not given back). At most ``_POOLED`` of each kind are kept,
    whatever the number of threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.compressors: dict[int, list[zstandard.ZstdCompressor]] = {}
        self.decompressors: list[zstandard.ZstdDecompressor] = []

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        with self._lock:
            free = self.compressors.get(level)
            if free:
                return free.pop()
        return zstandard.ZstdCompressor(level=level)

    def decompressor(self) -> zstandard.ZstdDecompressor:
        with self._lock:
            if self.decompressors:
                return self.decompressors.pop()
        return zstandard.ZstdDecompressor()

    def give_compressor(self, level: int, c: zstandard.ZstdCompressor) -> None:
        with self._lock:
            free = self.compressors.setdefault(level, [])
            if len(free) < _POOLED:
                free.append(c)

    def give_decompressor(self, d: zstandard.ZstdDecompressor) -> None:
        with self._lock:
            if len(self.decompressors) < _POOLED:
                self.decompressors.append(d)


_POOLED = 2  # contexts of each kind kept
_codecs = _Codecs()


class Sink(Protocol):
    """Where an :class:`ObjectWriter` writes: a binary file, or a :class:`~replicator.fsutil.
    DurableFile`."""

    def write(self, data: bytes | memoryview, /) -> object:
        """Append ``data``."""


class ObjectWriter:
    """Writes one object to a binary file: header first, then the body as it is given.

    ``level`` is the zstd level; ``None`` stores the body in raw zstd blocks instead (no
    compression, no CPU beyond a copy: for a burst of writes that compression could not keep up
    with). Both read back the same way."""

    def __init__(
        self, f: Sink, kind: int, header: dict[str, Any], level: int | None = DEFAULT_LEVEL,
        version: int | None = None,
    ):
        self._f = f
        self.size = 0
        """Bytes written to ``f`` so far (the object's size once closed)."""
        if version is None:
            version = DIFF_VERSION if kind == KIND_DIFF else FORMAT_VERSION
        raw = _HEADER_JSON.encode(header).encode()
        self._out(_PREAMBLE.pack(MAGIC, version, kind, len(raw)))
        self._out(raw)
        self._hash = _digest()
        self._hash.update(raw)
        self._stored: _StoredFrame | None = None
        self._cobj: Any = None  # the streaming compressor, from the first write
        self._whole = False  # the body was compressed by write_whole
        self._level = level
        self._cctx: zstandard.ZstdCompressor | None = None
        if level is None:
            self._stored = _StoredFrame(self._out)
        else:
            self._cctx = _codecs.compressor(level)
        self.body_bytes = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append uncompressed body bytes."""
        self._hash.update(data)
        self.body_bytes += len(data)
        if self._stored is not None:
            self._stored.write(data)
            return
        if self._cobj is None:
            assert self._cctx is not None
            self._cobj = self._cctx.compressobj()
        out = self._cobj.compress(data)
        if out:
            self._out(out)

    def write_whole(self, data: bytes | memoryview) -> None:
        """The whole body in one call, then :meth:`close`: compressed in one pass over a buffer
        zstd sees entirely (no copies into its window): about a fifth less CPU per byte than
        :meth:`write` of the same bytes. The same zstd frame for a decoder (its header also
        holds the size)."""
        if self._cctx is None or self._cobj is not None:
            self.write(data)
        else:
            self._hash.update(data)
            self.body_bytes = len(data)
            self._out(self._cctx.compress(data))
            self._whole = True
        self.close()

    def _out(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self.size += len(data)

    def close(self) -> None:
        """Finish the zstd frame and write the trailer (the file itself stays open)."""
        if self._stored is not None:
            self._stored.close()
        else:
            if self._cobj is not None:
                self._out(self._cobj.flush())
            elif not self._whole:  # an empty body: an empty frame
                assert self._cctx is not None
                self._out(self._cctx.compress(b""))
            if self._cctx is not None and self._level is not None:
                _codecs.give_compressor(self._level, self._cctx)
                self._cctx = None
        self._out(TRAILER_MAGIC + self._hash.digest())


class ObjectDecoder:
    """Incremental decoder: feed raw object bytes, get header, then uncompressed body bytes."""

    def __init__(self, key: str, *, parse_header: bool = True) -> None:
        """``parse_header`` False: the caller read the header already (the bytes are still
        summed for the trailer's checksum, and the preamble checked; :attr:`header` stays
        empty)."""
        self.key = key
        self._parse = parse_header
        self.header: dict[str, Any] | None = None
        self.kind = 0
        self._buf = bytearray()
        self._dobj: Any = None
        self._dctx: zstandard.ZstdDecompressor | None = None
        self._hash = _digest()
        self._tail = bytearray()
        self._done = False

    def feed(self, data: bytes | memoryview) -> bytes:
        """Consume raw bytes; return any body bytes they complete."""
        if self.header is None:
            data = self._header(data)
            if self.header is None:
                return b""
        if self._done:
            self._tail += data
            return b""
        try:
            out: bytes = self._dobj.decompress(data)
        except zstandard.ZstdError as exc:
            raise CorruptObjectError(f"{self.key}: corrupt object ({exc})") from None
        self._hash.update(out)
        if self._dobj.eof:
            self._done = True
            self._tail += self._dobj.unused_data
            if self._dctx is not None:
                _codecs.give_decompressor(self._dctx)
                self._dctx = None
        return out

    def _header(self, data: bytes | memoryview) -> memoryview:
        """Take in bytes of the preamble and header (parsed once complete); returns the bytes
        after them. The first chunk is not copied when it holds the whole header."""
        if self._buf:
            self._buf += data
            buf: bytes | bytearray | memoryview = self._buf
        else:
            buf = data
        if len(buf) < _PREAMBLE.size:
            return self._keep(buf)
        kind, hlen = _check_preamble(buf, self.key)
        if len(buf) < _PREAMBLE.size + hlen:
            return self._keep(buf)
        raw = bytes(buf[_PREAMBLE.size : _PREAMBLE.size + hlen])
        header = parse_header(raw, self.key) if self._parse else {}
        if header.get("kind", _KIND_NAMES[kind]) != _KIND_NAMES[kind]:
            raise CorruptObjectError(
                f"{self.key}: corrupt object (kind {_KIND_NAMES[kind]} in the preamble, "
                f"{header.get('kind')!r} in the header)"
            )
        self.header = header
        self.kind = kind
        self._hash.update(raw)
        self._dctx = _codecs.decompressor()
        self._dobj = self._dctx.decompressobj()
        self._buf = bytearray()
        return memoryview(buf)[_PREAMBLE.size + hlen :]

    def _keep(self, buf: bytes | bytearray | memoryview) -> memoryview:
        """Keep an incomplete header's bytes for the next chunk."""
        if buf is not self._buf:
            self._buf = bytearray(buf)
        return memoryview(b"")

    def finish(self) -> None:
        """Check the body ended and the trailer matches; raise CorruptObjectError if not."""
        if self.header is None:
            raise CorruptObjectError(f"{self.key}: corrupt object (truncated header)")
        if not self._done:
            raise CorruptObjectError(f"{self.key}: corrupt object (truncated body)")
        if len(self._tail) != _TRAILER_SIZE or not self._tail.startswith(TRAILER_MAGIC):
            raise CorruptObjectError(f"{self.key}: corrupt object (bad trailer)")
        if bytes(self._tail[4:]) != self._hash.digest():
            raise CorruptObjectError(f"{self.key}: corrupt object (checksum mismatch)")


def header_end(buf: bytes | memoryview, key: str) -> tuple[int, int]:
    """(kind, end) of the object whose first bytes are ``buf`` (at least the preamble's):
    its header is ``buf[HEADER_START:end]`` (checked: :func:`parse_header`)."""
    if len(buf) < _PREAMBLE.size:
        raise CorruptObjectError(f"{key}: corrupt object (truncated header)")
    kind, hlen = _check_preamble(buf, key)
    return kind, HEADER_START + hlen


def header_length(preamble: bytes, key: str) -> int:
    """The header length an object's first ``_PREAMBLE.size`` bytes announce (checked)."""
    return header_end(preamble, key)[1] - HEADER_START


def _check_preamble(buf: bytes | bytearray | memoryview, key: str) -> tuple[int, int]:
    """(kind, header length) of the preamble at the start of ``buf``, checked on its own: the
    trailer's digest does not cover it."""
    magic, version, kind, hlen = _PREAMBLE.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError(f"{key}: not a replica object (bad magic)")
    if version not in READ_VERSIONS:
        raise FormatError(f"{key}: unsupported format version {version}")
    if kind not in _KIND_NAMES:
        raise CorruptObjectError(f"{key}: corrupt object (unknown kind {kind})")
    if version not in _KIND_VERSIONS[kind]:
        raise CorruptObjectError(
            f"{key}: corrupt object ({_KIND_NAMES[kind]} of version {version})")
    if hlen > _MAX_HEADER:
        raise CorruptObjectError(f"{key}: corrupt object (header length {hlen})")
    return int(kind), int(hlen)


def read_header_file(f: BinaryIO, key: str) -> dict[str, Any]:
    """The header of an object in an open file (two small reads; the body is not touched)."""
    preamble = f.read(_PREAMBLE.size)
    hlen = header_length(preamble, key)
    raw = f.read(hlen)
    if len(raw) != hlen:
        raise CorruptObjectError(f"{key}: corrupt object (truncated header)")
    return parse_header(raw, key)


def parse_header(raw: bytes, key: str) -> dict[str, Any]:
    """An object's header from its bytes (CorruptObjectError naming ``key`` if they are not
    a JSON object)."""
    try:
        header = json.loads(raw)
    except ValueError:
        raise CorruptObjectError(f"{key}: corrupt object (bad header)") from None
    if not isinstance(header, dict):
        raise CorruptObjectError(f"{key}: corrupt object (bad header)")
    return header


async def read_header(chunks: AsyncIterator[bytes], key: str) -> dict[str, Any]:
    """Read only the header of an object from a byte stream (the stream is closed after)."""
    dec = ObjectDecoder(key)
    try:
        async for chunk in chunks:
            dec._buf += chunk
            if len(dec._buf) >= _PREAMBLE.size:
                hlen = _PREAMBLE.unpack_from(dec._buf)[3]
                if len(dec._buf) >= _PREAMBLE.size + min(hlen, _MAX_HEADER + 1):
                    break
        dec.feed(b"")
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if dec.header is None:
        raise CorruptObjectError(f"{key}: corrupt object (truncated header)")
    return dec.header


async def decode_stream(
    chunks: AsyncIterator[bytes], key: str
) -> tuple[dict[str, Any], AsyncIterator[bytes]]:
    """Split an object stream into its header and an iterator of verified body bytes.

    The body iterator raises CorruptObjectError at the end if the checksum does not match, so a
    consumer must finish it before trusting what it applied.
    """
    dec = ObjectDecoder(key)
    pending = b""
    it = chunks.__aiter__()
    while dec.header is None:
        try:
            chunk = await it.__anext__()
        except StopAsyncIteration:
            raise CorruptObjectError(f"{key}: corrupt object (truncated header)") from None
        pending = dec.feed(chunk)

    async def body() -> AsyncIterator[bytes]:
        if pending:
            yield pending
        async for chunk in it:
            out = dec.feed(chunk)
            if out:
                yield out
        dec.finish()

    assert dec.header is not None
    return dec.header, body()
