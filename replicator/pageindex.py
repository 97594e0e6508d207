"""The per-page index that keeps a database's content hash current.

The content hash itself (``H(p)`` per page, XORed over pages 1..n) is defined in
:mod:`replicator.contenthash`.

The capture keeps ``H(p)`` for every page of the state it has captured (the *page index*): 16
bytes per page in memory (4 MiB for a 1 GiB database of 4 KiB pages), and the same again on
disk in the spool, where it is saved (temp name, fsync, rename) stamped with the generation and
txid it describes. On a restart it is brought up to date by replaying the spooled objects after
that txid. With it, a restart finds the pages that differ from what was captured by hashing the
database once, and ships only those.

The state the index describes is the one a restore rebuilds: after every commit the pages past
its database size are gone (a restore truncates there), and a page that comes back later without
being written again reads as zeros.
"""

from __future__ import annotations

import functools
import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from .contenthash import CATCHUP_PGNO_SIZE, page_hash
from .crc import crc32
from .errors import CorruptObjectError, ReplicatorError
from .format import ObjectDecoder
from .fsutil import atomic_writer
from .headers import CatchupHeader, ObjectHeader, SnapshotHeader, header_from_json
from .retry import TokenBucket
from .spool import Spool
from .wal import FRAME_HEADER_SIZE

INDEX_FILE = "pages.idx"
INDEX_SAVE_SECONDS = 10.0
INDEX_SAVES_PER_SECOND = 10.0
"""Periodic saves of all the databases of a process together, at most (each costs two fsyncs:
with a thousand databases committing, saving each every ``INDEX_SAVE_SECONDS`` would cost more
fsyncs than their commits; a save put off only keeps a few more objects in the spool)."""
SAVES = TokenBucket(INDEX_SAVES_PER_SECOND)
_READ = 1 << 20
_MAGIC = b"RPLIDX01"
# magic, generation (16 ascii), txid, page size, pages, device, inode, content hash (16 bytes)
_HEAD = struct.Struct(">8s16sQIIQQ16s")
_MASK64 = (1 << 64) - 1
_PGNO_COMMIT = struct.Struct(">II")  # a frame header's page number and commit size
SMALL_RUN_FRAMES = 16
"""A run of at most this many frames is applied in plain Python: a commit of a frame or two
then costs no array operations (each has a fixed cost that no page amortises)."""

Hashes = npt.NDArray[np.uint64]  # shape (n, 2): the high and low 64 bits of H(p)


@functools.cache
def _zeros(page_size: int) -> bytes:
    return bytes(page_size)


class IndexUnusable(Exception):
    """The saved index cannot be used (missing, damaged, or of another database)."""


class PageIndex:
    """``H(p)`` for every page of a captured state, and their XOR (the content hash).

    An entry of zero means "no page": a page past the end of the database (a real hash is zero
    with probability 2^-128)."""

    def __init__(self, page_size: int, pages: int = 0) -> None:
        self.page_size = page_size
        self.pages = pages
        self.hashes = np.zeros((max(pages, 1), 2), dtype=np.uint64)
        self.content = 0
        self.high = pages  # no entry past this page is set
        self._zero = _zeros(page_size)  # one per page size, shared by every index
        # while a change is pending (begin .. commit/rollback): what to put back, as
        # (page number, old entry) or (first index, old entries)
        self._undo: list[tuple[int, int | Hashes]] | None = None
        self._undo_scalars = (0, 0, 0)

    @property
    def hashes(self) -> Hashes:
        """The entries: row ``p - 1`` holds the high and low 64 bits of ``H(p)``."""
        return self._hashes

    @hashes.setter
    def hashes(self, value: Hashes) -> None:
        self._hashes = value
        # the same memory as plain words: a Python int in and out without numpy's overhead
        self._words = value.data.cast("B").cast("Q")

    def begin(self) -> None:
        """Start a change that ``rollback`` can undo (until ``commit``)."""
        self._undo = []
        self._undo_scalars = (self.pages, self.content, self.high)

    def commit(self) -> None:
        """Keep the pending change."""
        self._undo = None

    def rollback(self) -> None:
        """Undo the pending change."""
        if self._undo is None:
            return
        w = self._words
        for where, old in reversed(self._undo):
            if isinstance(old, int):
                w[2 * where - 2], w[2 * where - 1] = old >> 64, old & _MASK64
            else:
                self.hashes[where : where + len(old)] = old
        self.pages, self.content, self.high = self._undo_scalars
        self._undo = None

    def _save(self, first: int, last: int) -> None:
        """Record entries first..last (0-based, exclusive end) before they change."""
        if self._undo is not None and last > first:
            self._undo.append((first, self.hashes[first:last].copy()))

    def entry(self, pgno: int) -> int:
        """``H(p)`` of page ``pgno`` as recorded (0: no page)."""
        if pgno > len(self._hashes):
            return 0
        return self._entry(pgno)

    def _entry(self, pgno: int) -> int:
        w = self._words
        return int((w[2 * pgno - 2] << 64) | w[2 * pgno - 1])

    def _grow(self, pages: int) -> None:
        if pages > len(self.hashes):
            cap = max(pages, len(self.hashes) * 5 // 4 + 16)
            extra = np.zeros((cap - len(self.hashes), 2), dtype=np.uint64)
            self.hashes = np.concatenate([self.hashes, extra])

    def _store(self, pgno: int, value: int) -> None:
        w = self._words
        if self._undo is not None:
            self._undo.append((pgno, int((w[2 * pgno - 2] << 64) | w[2 * pgno - 1])))
        w[2 * pgno - 2] = value >> 64
        w[2 * pgno - 1] = value & _MASK64
        if pgno > self.high:
            self.high = pgno

    def set_page(self, pgno: int, page: bytes | memoryview) -> None:
        """Page ``pgno`` now holds ``page`` (the database size is set by ``resize``)."""
        if pgno > len(self._hashes):
            self._grow(pgno)
        new = int(xxhash.xxh3_128_intdigest(page, seed=pgno))
        if pgno <= self.pages:
            self.content ^= self._entry(pgno) ^ new
        self._store(pgno, new)

    def set_pages(self, first: int, run: bytes | bytearray | memoryview) -> None:
        """Pages ``first, first + 1, ...`` now hold the consecutive pages in ``run``."""
        mv = memoryview(run).cast("B")
        ps = self.page_size
        for k in range(len(mv) // ps):
            self.set_page(first + k, mv[k * ps : (k + 1) * ps])

    def set_hash(self, pgno: int, value: int) -> None:
        """Page ``pgno`` of the database (within its size) now hashes to ``value``."""
        self._grow(pgno)
        if pgno <= self.pages:
            self.content ^= self._entry(pgno) ^ value
        self._store(pgno, value)

    def _xor(self, first: int, last: int) -> int:
        """The XOR of the entries of pages first..last."""
        if last < first:
            return 0
        part = self.hashes[first - 1 : last]
        hi, lo = np.bitwise_xor.reduce(part, axis=0).tolist()
        return (int(hi) << 64) | int(lo)

    def resize(self, pages: int) -> None:
        """A commit left the database with ``pages`` pages: pages past the end are gone; pages
        that come back without having been written since are zeros."""
        if pages == self.pages == self.high:
            return  # nothing to cut off or bring back: the usual commit
        self._grow(pages)
        if pages < self.pages:
            self.content ^= self._xor(pages + 1, self.pages)
        elif pages > self.pages:
            part = self.hashes[self.pages : pages]
            for k in np.flatnonzero((part[:, 0] == 0) & (part[:, 1] == 0)).tolist():
                pgno = self.pages + 1 + int(k)
                self._store(pgno, page_hash(pgno, self._zero))
            self.content ^= self._xor(self.pages + 1, pages)
        self._save(pages, max(self.high, pages))
        self.hashes[pages : max(self.high, pages)] = 0
        self.high = pages
        self.pages = pages

    def apply_frames(self, frames: bytes | memoryview) -> None:
        """Apply whole WAL frames (frame header + page each) in order: each commit frame sets the
        database size. The last frame must be a commit frame.

        Only the last write of each page is hashed, and only if no later commit cut the page
        off: the same result as applying frame by frame (pages past a commit's size gone, pages
        that come back unwritten zeros), at the cost of the pages the frames end with."""
        fs = FRAME_HEADER_SIZE + self.page_size
        mv = memoryview(frames).cast("B")
        if len(mv) % fs:
            raise ValueError("partial WAL frame")
        n = len(mv) // fs
        if n <= SMALL_RUN_FRAMES:
            self._apply_few(mv, n)
            return
        # the page numbers and commit sizes of every frame at once (a frame is a whole number
        # of big-endian words)
        heads = np.frombuffer(mv, dtype=">u4").reshape(n, fs // 4)[:, :2].astype(np.int64)
        if not n or not heads[-1, 1]:
            raise ValueError("WAL frames must end with a commit frame")
        # the smallest database size committed from each frame on
        sizes = np.where(heads[:, 1] > 0, heads[:, 1], np.iinfo(np.int64).max)
        low = np.minimum.accumulate(sizes[::-1])[::-1]
        # the last frame of each page, in page order
        pgnos, from_end = np.unique(heads[::-1, 0], return_index=True)
        last = n - 1 - from_end
        keep = pgnos <= low[last]
        # every page past the smallest size is cut off at some commit; a page written after its
        # last cut survives with that write, any other past the end comes back as zeros
        self.resize(int(low[0]))
        for pgno, k in zip(pgnos[keep].tolist(), last[keep].tolist(), strict=True):
            off = k * fs + FRAME_HEADER_SIZE
            self.set_page(pgno, mv[off : off + self.page_size])
        self.resize(int(heads[-1, 1]))

    def _apply_few(self, mv: memoryview, n: int) -> None:
        """:meth:`apply_frames` for a few frames, in plain Python (the same result)."""
        fs = FRAME_HEADER_SIZE + self.page_size
        heads = [_PGNO_COMMIT.unpack_from(mv, k * fs) for k in range(n)]
        if not n or not heads[-1][1]:
            raise ValueError("WAL frames must end with a commit frame")
        low = [0] * n  # the smallest database size committed from each frame on
        smallest = heads[-1][1]
        for k in range(n - 1, -1, -1):
            size = heads[k][1]
            if size and size < smallest:
                smallest = size
            low[k] = smallest
        last = {pgno: k for k, (pgno, _) in enumerate(heads)}  # the last frame of each page
        self.resize(low[0])
        for pgno in sorted(last):
            k = last[pgno]
            if pgno <= low[k]:
                off = k * fs + FRAME_HEADER_SIZE
                self.set_page(pgno, mv[off : off + self.page_size])
        self.resize(heads[-1][1])

    def apply_stream(self, chunks: Iterable[bytes | memoryview]) -> None:
        """Apply a run of whole committed transactions given in chunks cut anywhere."""
        fs = FRAME_HEADER_SIZE + self.page_size
        pending = bytearray()
        for chunk in chunks:
            if not pending and _ends_committed(chunk, fs):
                self.apply_frames(chunk)  # the usual case: no copy
                continue
            pending += chunk
            end = len(pending) // fs * fs
            while end and not int.from_bytes(pending[end - fs + 4 : end - fs + 8], "big"):
                end -= fs  # back to the last commit frame
            if end:
                run = bytes(pending[:end])
                del pending[:end]
                self.apply_frames(run)
        if pending:
            raise ValueError("WAL frames must end with a commit frame")

    def diff(self, first: int, pages: Sequence[bytes | memoryview]) -> list[tuple[int, int]]:
        """``(pgno, H)`` of the pages ``first, first+1, ...`` that differ from the index."""
        out = []
        for k, page in enumerate(pages):
            pgno = first + k
            value = page_hash(pgno, page)
            if pgno > self.pages or pgno > len(self.hashes) or self._entry(pgno) != value:
                out.append((pgno, value))
        return out

    def copy(self) -> PageIndex:
        """An independent copy."""
        other = PageIndex(self.page_size)
        other.pages = self.pages
        other.hashes = self.hashes.copy()
        other.content = self.content
        other.high = self.high
        return other

    # -------------------------------------------------------------------- persistence

    def save(self, path: str, generation: str, txid: int, dev: int, ino: int) -> None:
        """Write the index durably, stamped with the state it describes."""
        head = _HEAD.pack(_MAGIC, generation.encode(), txid, self.page_size, self.pages,
                          dev, ino, self.content.to_bytes(16, "big"))
        body = self.hashes[: self.pages].astype(">u8").tobytes()
        crc = crc32(body, crc32(head))
        with atomic_writer(path) as f:
            f.write(head)
            f.write(body)
            f.write(struct.pack(">I", crc))


class SavedIndex:
    """A page index read back from the spool with its stamp."""

    def __init__(self, index: PageIndex, generation: str, txid: int, dev: int, ino: int) -> None:
        self.index = index
        self.generation = generation
        self.txid = txid
        self.dev = dev
        self.ino = ino

    @classmethod
    def load(cls, path: str) -> SavedIndex:
        """Read and check a saved index; raises IndexUnusable saying why it cannot be used."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise IndexUnusable("no page index") from None
        except OSError as exc:
            raise IndexUnusable(f"page index unreadable: {exc.strerror}") from None
        if len(raw) < _HEAD.size + 4:
            raise IndexUnusable("page index truncated")
        magic, gen, txid, ps, pages, dev, ino, content = _HEAD.unpack_from(raw)
        if magic != _MAGIC or len(raw) != _HEAD.size + 16 * pages + 4:
            raise IndexUnusable("page index damaged (bad size or magic)")
        if crc32(raw[:-4]) != struct.unpack(">I", raw[-4:])[0]:
            raise IndexUnusable("page index damaged (checksum mismatch)")
        index = PageIndex(ps, pages)
        index.hashes[:pages] = np.frombuffer(raw, dtype=">u8", count=2 * pages,
                                             offset=_HEAD.size).reshape(pages, 2)
        index.content = int.from_bytes(content, "big")
        check = 0
        for hi, lo in index.hashes[:pages].tolist():
            check ^= (hi << 64) | lo
        if check != index.content:
            raise IndexUnusable("page index damaged (content hash does not match its pages)")
        return cls(index, gen.decode("ascii", "replace"), txid, dev, ino)


def _ends_committed(chunk: bytes | memoryview, fs: int) -> bool:
    """Whether ``chunk`` is whole frames, the last a commit frame."""
    n = len(chunk)
    return n > 0 and n % fs == 0 and bytes(chunk[n - fs + 4 : n - fs + 8]) != bytes(4)


def _records(body: Iterable[bytes | memoryview], size: int) -> Iterator[memoryview]:
    """Runs of whole ``size``-byte records from a stream of byte chunks; raises ValueError if
    the stream ends inside a record."""
    pending = bytearray()
    for chunk in body:
        pending += chunk
        n = len(pending) // size * size
        if n:
            yield memoryview(bytes(pending[:n]))
            del pending[:n]
    if pending:
        raise ValueError("object body ends inside a record")


def index_from_pages(page_size: int, pages: int,
                     body: Iterable[bytes | memoryview]) -> PageIndex:
    """The index of a snapshot body (pages 1..``pages`` in order)."""
    index = PageIndex(page_size, 0)
    pgno = 1
    for run in _records(body, page_size):
        index.set_pages(pgno, run)
        pgno += len(run) // page_size
    if pgno != pages + 1:
        raise ValueError(f"snapshot body holds {pgno - 1} pages, not {pages}")
    index.resize(pages)
    return index


def apply_catchup(index: PageIndex, pages: int, body: Iterable[bytes | memoryview]) -> None:
    """Apply a catch-up body (records of page number + page) and its database size."""
    rec = CATCHUP_PGNO_SIZE + index.page_size
    for run in _records(body, rec):
        for off in range(0, len(run), rec):
            pgno = int.from_bytes(run[off : off + CATCHUP_PGNO_SIZE], "big")
            index.set_page(pgno, run[off + CATCHUP_PGNO_SIZE : off + rec])
    index.resize(pages)


def apply_segment(index: PageIndex, body: Iterable[bytes | memoryview]) -> None:
    """Apply a WAL segment body (whole frames ending with a commit frame)."""
    index.apply_stream(body)


def _object_body(path: str, key: str) -> tuple[ObjectHeader, Iterator[bytes]]:
    """The typed header of a spooled object and an iterator over its verified body."""
    dec = ObjectDecoder(key)
    f = open(path, "rb")  # noqa: SIM115 - closed by the generator
    first = b""
    while dec.header is None:
        chunk = f.read(_READ)
        if not chunk:
            f.close()
            raise CorruptObjectError(f"{key}: corrupt object (truncated header)")
        first = dec.feed(chunk)
    header = header_from_json(dec.header, key)

    def body() -> Iterator[bytes]:
        with f:
            if first:
                yield first
            while chunk := f.read(_READ):
                out = dec.feed(chunk)
                if out:
                    yield out
            dec.finish()

    return header, body()


def replay(index: PageIndex | None, path: str, key: str) -> PageIndex:
    """Bring ``index`` (the state before a spooled object) to the state after it; a snapshot
    replaces it. Raises CorruptObjectError or ValueError on an object that does not fit."""
    header, body = _object_body(path, key)
    if isinstance(header, SnapshotHeader):
        return index_from_pages(header.page_size, header.pages, body)
    if index is None or header.page_size != index.page_size:
        raise ValueError(f"{key}: page size differs from the index's")
    if isinstance(header, CatchupHeader):
        apply_catchup(index, header.pages, body)
    else:
        apply_segment(index, body)
    if header.content_hash is not None and header.content_hash != index.content:
        raise ValueError(f"{key}: content hash differs from the index's")
    return index


@dataclass(frozen=True)
class Stamp:
    """What a saved index describes: a state of a generation, of one database file."""

    generation: str
    txid: int
    dev: int
    ino: int


class IndexKeeper:
    """The capture's page index and its copy in the spool (saved at most every
    ``INDEX_SAVE_SECONDS`` while transactions come, as the process's ``SAVES`` allow, and
    whenever asked). Spooled objects after the saved txid must stay in the spool: a restart
    replays them."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.path = os.path.join(spool.root, INDEX_FILE)
        self.index: PageIndex | None = None
        self.saved: Stamp | None = None
        self._saved_at = 0.0

    def load(self, generation: str, txid: int, dev: int, ino: int) -> PageIndex:
        """The saved index brought up to ``txid`` of ``generation`` by replaying the spooled
        objects after its own txid; raises IndexUnusable saying why it cannot be."""
        saved = SavedIndex.load(self.path)
        if saved.generation != generation:
            raise IndexUnusable(f"page index is of generation {saved.generation}")
        if (saved.dev, saved.ino) != (dev, ino):
            raise IndexUnusable("page index is of another database file")
        index: PageIndex | None = saved.index
        at = saved.txid
        try:
            for info in self.spool.objects(generation):
                if info.end_txid <= at or info.kind == "diff":
                    continue  # a differential snapshot repeats a state the others reach
                if info.kind != "snapshot" and info.start_txid != at + 1:
                    raise IndexUnusable(f"spooled txid {at + 1} missing")
                index = replay(index, self.spool.path(info), info.key)
                at = info.end_txid
        except (ReplicatorError, ValueError, OSError) as exc:
            raise IndexUnusable(f"cannot replay the spool: {exc}") from None
        if at != txid or index is None:
            raise IndexUnusable(f"page index reaches txid {at}, not {txid}")
        self.saved = Stamp(generation, saved.txid, dev, ino)
        self.index = index
        return index

    def save(self, stamp: Stamp) -> None:
        """Save the index as describing ``stamp`` (nothing if the saved one already does: the
        same stamp is the same state)."""
        if self.index is None or self.saved == stamp:
            return
        self.index.save(self.path, stamp.generation, stamp.txid, stamp.dev, stamp.ino)
        self.saved = stamp
        self._saved_at = time.monotonic()

    def save_if_due(self, stamp: Stamp) -> bool:
        """Save when the state moved on, the last save is old enough and the process's budget of
        periodic saves allows one now (else a later step saves); True if it saved."""
        if self.saved == stamp or time.monotonic() - self._saved_at < INDEX_SAVE_SECONDS:
            return False
        if SAVES.take():
            self.save(stamp)
            return True
        return False

    def keep_from(self, generation: str) -> int | None:
        """Spooled objects of ``generation`` past this txid must stay (None: keep none)."""
        if self.saved is None or self.saved.generation != generation:
            return None
        return self.saved.txid
