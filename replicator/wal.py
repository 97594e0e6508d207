"""SQLite WAL parsing: the header, frames, and the WAL checksum.

This module is pure: it decodes bytes it is given or reads with ``os.pread`` from a file descriptor
it is given, and decides nothing about copying, locking or checkpoints. The format is the one in
sqlite.org/fileformat2.html ("The WAL file format"):

* a 32-byte header (magic, version, page size, checkpoint sequence, two salts, two checksums), all
  fields big-endian;
* then frames, each a 24-byte frame header (page number, database size after commit or 0, the two
  salts, the two cumulative checksums) followed by one page.

A frame is valid when its salts equal the header's, its page number is nonzero and its stored
checksum equals the checksum over its first 8 header bytes and its page, chained from the previous
frame (the first frame chains from the header checksum). Only frames up to and including the last
valid commit frame are committed; scanners here never return frames past it.

The checksum is a linear recurrence over Z/2^32. For each pair ``(a, b)`` of 32-bit words::

    s0 += a + s1;  s1 += b + s0

i.e. ``v' = M v + (a, a + b)`` with ``M = [[1, 1], [1, 2]]``. ``M`` is the square of the Fibonacci
matrix, so ``M^j = [[F(2j-1), F(2j)], [F(2j), F(2j+1)]]`` and after ``n`` pairs (``2n`` words
``x[0..2n-1]``)::

    s0 = F(2n-1) s0 + F(2n) s1 + sum_i F(2n-1-i) x[i]
    s1 = F(2n)   s0 + F(2n+1) s1 + sum_i F(2n-i) x[i]

(all mod 2^32). The sums are one ``uint32`` matrix product (``uint32`` arithmetic wraps mod 2^32,
which is exactly the arithmetic wanted), done for every frame of a chunk at once.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import WalError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# numpy is imported where the vectorised checksum first needs it: a few frames (a WAL header, a
# restore that replays little WAL) are checked in plain Python without paying for its import.

__all__ = [
    "FRAME_HEADER_SIZE",
    "WAL_HEADER_SIZE",
    "WAL_MAGIC_BE",
    "WAL_MAGIC_LE",
    "WAL_VERSION",
    "Frame",
    "ScanResult",
    "WalHeader",
    "frame_offset",
    "frame_size",
    "parse_wal_header",
    "read_wal_header",
    "scan_bytes",
    "scan_frames",
    "verify_frames",
    "wal_checksum",
]

WAL_HEADER_SIZE = 32
"""Size in bytes of the WAL file header."""
FRAME_HEADER_SIZE = 24
"""Size in bytes of the header in front of each page in the WAL."""
WAL_MAGIC_LE = 0x377F0682
"""WAL magic number whose checksum words are little-endian."""
WAL_MAGIC_BE = 0x377F0683
"""WAL magic number whose checksum words are big-endian."""
WAL_VERSION = 3007000
"""The only WAL format version SQLite writes (and accepts)."""

_MASK = 0xFFFFFFFF
_LE_WORDS = "<u4"
_BE_WORDS = ">u4"
# wal_checksum works on blocks of this many word pairs (32 KiB); batches of blocks are bounded too.
_BLOCK_PAIRS = 4096
_BATCH_BLOCKS = 128

# checksums over fewer bytes than this are computed in plain Python (no numpy)
_PLAIN_BYTES = 4096
if TYPE_CHECKING:
    _U32Array = npt.NDArray[np.uint32]
    _U64Array = npt.NDArray[np.uint64]


# --------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class WalHeader:
    """The decoded 32-byte WAL file header."""

    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum1: int
    checksum2: int
    raw: bytes

    @property
    def big_endian(self) -> bool:
        """Whether the checksum words are big-endian (the low bit of the magic)."""
        return bool(self.magic & 1)

    @property
    def salts(self) -> tuple[int, int]:
        """The two salts ``(salt1, salt2)`` every valid frame of this WAL epoch carries."""
        return (self.salt1, self.salt2)

    @property
    def checksum(self) -> tuple[int, int]:
        """The header checksum ``(checksum1, checksum2)``; the first frame chains from it."""
        return (self.checksum1, self.checksum2)


def _valid_page_size(page_size: int) -> bool:
    return 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0


def parse_wal_header(buf: bytes | memoryview) -> WalHeader:
    """The WAL header decoded from the first 32 bytes of ``buf``, checksum verified.

    Raises WalError on a short buffer, a bad magic number, an unknown version, an invalid page
    size (a power of two from 512 to 65536) or a header checksum mismatch.
    """
    raw = bytes(buf[:WAL_HEADER_SIZE])
    if len(raw) < WAL_HEADER_SIZE:
        raise WalError(f"WAL header too short: {len(raw)} bytes, need {WAL_HEADER_SIZE}")
    f = [int.from_bytes(raw[i : i + 4], "big") for i in range(0, WAL_HEADER_SIZE, 4)]
    magic, version, page_size, ckpt, salt1, salt2, ck1, ck2 = f
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise WalError(
            f"bad WAL magic 0x{magic:08x} (want 0x{WAL_MAGIC_LE:08x} or 0x{WAL_MAGIC_BE:08x})"
        )
    if version != WAL_VERSION:
        raise WalError(f"unsupported WAL format version {version} (want {WAL_VERSION})")
    if not _valid_page_size(page_size):
        raise WalError(f"invalid WAL page size {page_size} (want a power of two from 512 to 65536)")
    want = wal_checksum(raw[:24], bool(magic & 1))
    if want != (ck1, ck2):
        raise WalError(
            f"WAL header checksum mismatch: stored {ck1:08x}:{ck2:08x}, "
            f"computed {want[0]:08x}:{want[1]:08x}"
        )
    return WalHeader(magic, version, page_size, ckpt, salt1, salt2, ck1, ck2, raw)


def read_wal_header(fd: int, last: WalHeader | None = None) -> WalHeader | None:
    """The header of the WAL open at ``fd``, or None if it has none that is valid.

    None covers a file shorter than 32 bytes (e.g. truncated by a TRUNCATE checkpoint), a zeroed
    header and any header ``parse_wal_header`` rejects. ``last``, a header read before, is
    returned as it is when the bytes are still the same (nothing to decode or check again).
    """
    raw = pread_full(fd, WAL_HEADER_SIZE, 0)
    if len(raw) < WAL_HEADER_SIZE:
        return None
    if last is not None and raw == last.raw:
        return last
    try:
        return parse_wal_header(raw)
    except WalError:
        return None


def frame_size(page_size: int) -> int:
    """The size in bytes of one WAL frame (frame header plus page) for ``page_size``."""
    return FRAME_HEADER_SIZE + page_size


def frame_offset(index: int, page_size: int) -> int:
    """The byte offset in the WAL file of frame slot ``index`` (1-based)."""
    if index < 1:
        raise ValueError(f"frame index must be >= 1, got {index}")
    return WAL_HEADER_SIZE + (index - 1) * frame_size(page_size)


# --------------------------------------------------------------------------------------------
# Checksum


_fib_table: _U64Array | None = None


def _fib(n: int) -> _U64Array:
    """Fibonacci numbers ``F(0..n)`` mod 2^32, from a table grown by doubling."""
    import numpy as np

    global _fib_table
    t = _fib_table if _fib_table is not None else np.array([0, 1], dtype=np.uint64)
    while len(t) < n + 1:
        last = len(t) - 1  # t holds F(0..last)
        f_next = (int(t[last]) + int(t[last - 1])) & _MASK  # F(last + 1)
        # F(last + m) = F(m) F(last + 1) + F(m - 1) F(last), for m = 1..last
        ext = (t[1:] * np.uint64(f_next) + t[:-1] * t[last]) & np.uint64(_MASK)
        t = np.concatenate([t, ext])
    _fib_table = t
    return t[: n + 1]


def _power(n_pairs: int) -> tuple[int, int, int]:
    """``M^n = [[p, q], [q, r]]`` mod 2^32, as ``(p, q, r)``."""
    if n_pairs == 0:
        return (1, 0, 1)
    f = _fib(2 * n_pairs + 1)
    return (int(f[2 * n_pairs - 1]), int(f[2 * n_pairs]), int(f[2 * n_pairs + 1]))


def _word_coefs(n_pairs: int) -> _U32Array:
    """The ``(2, 2n)`` coefficients of the ``2n`` words in the contribution of ``n`` pairs:
    row 0 for ``s0``, row 1 for ``s1``."""
    f = _fib(2 * n_pairs)
    k0 = f[: 2 * n_pairs][::-1]  # word i -> F(2n-1-i)
    k1 = f[1 : 2 * n_pairs + 1][::-1]  # word i -> F(2n-i)
    import numpy as np

    return np.stack([k0, k1]).astype(np.uint32)


def _products(words: _U32Array, coefs: _U32Array) -> _U32Array:
    """Each row of ``words`` (``(n, w)``, or one row ``(w,)``) dotted with both rows of
    ``coefs`` (``(2, w)``), mod 2^32: ``(n, 2)`` (or ``(2,)``). ``einsum``'s vectorised
    multiply-and-add: about three times as fast per byte as ``@``, which numpy does for integers
    with a plain loop."""
    import numpy as np

    spec = "ij,kj->ik" if words.ndim == 2 else "j,kj->k"
    out: _U32Array = np.einsum(spec, words, coefs)
    return out


@functools.lru_cache(maxsize=256)
def _plain_tables(n_pairs: int) -> tuple[_U32Array, tuple[int, int, int]]:
    """Word coefficients and ``M^n`` for a run of ``n`` contiguous pairs (cached per length)."""
    coefs = _word_coefs(n_pairs)
    coefs.flags.writeable = False
    return coefs, _power(n_pairs)


@functools.lru_cache(maxsize=16)
def _frame_tables(page_size: int) -> tuple[_U32Array, tuple[int, int, int]]:
    """Coefficients for a whole frame, laid out as the frame is: the 4 words at frame-header
    offsets 8..23 (salts, stored checksum) get 0 so they drop out without copying."""
    n_pairs = 1 + page_size // 8
    k = _word_coefs(n_pairs)
    words = frame_size(page_size) // 4
    import numpy as np

    out = np.zeros((2, words), dtype=np.uint32)
    out[:, :2] = k[:, :2]
    out[:, 6:] = k[:, 2:]
    out.flags.writeable = False
    return out, _power(n_pairs)


def _as_words(data: bytes | memoryview, big_endian: bool, count: int) -> _U32Array:
    """``count`` 32-bit checksum words of ``data`` in native order (a view when possible)."""
    import numpy as np

    w: _U32Array = np.frombuffer(data, dtype=_BE_WORDS if big_endian else _LE_WORDS, count=count)
    if not w.dtype.isnative:
        w = w.astype(np.uint32)
    return w


def _chain(v: tuple[int, int], m: tuple[int, int, int], c0: int, c1: int) -> tuple[int, int]:
    """``M^n v + c`` mod 2^32, with ``m = (p, q, r)`` from ``_power(n)``."""
    p, q, r = m
    return ((p * v[0] + q * v[1] + c0) & _MASK, (q * v[0] + r * v[1] + c1) & _MASK)


def wal_checksum(
    data: bytes | memoryview, big_endian: bool, s0: int = 0, s1: int = 0
) -> tuple[int, int]:
    """SQLite's WAL checksum ``(s0, s1)`` over ``data``, continuing from ``(s0, s1)``.

    ``len(data)`` must be a multiple of 8. ``big_endian`` selects the byte order of the 32-bit
    words (the low bit of the WAL magic). Vectorised: the buffer is reduced in 32 KiB blocks by one
    matrix product per batch of blocks; Python only chains the per-block results.
    """
    mv = memoryview(data).cast("B")
    n = len(mv)
    if n % 8:
        raise ValueError(f"WAL checksum needs a multiple of 8 bytes, got {n}")
    v = (s0 & _MASK, s1 & _MASK)
    if n < _PLAIN_BYTES:
        return _plain_checksum(_words(mv, big_endian), v)
    block_bytes = _BLOCK_PAIRS * 8
    n_blocks = n // block_bytes
    if n_blocks:
        coefs, m = _plain_tables(_BLOCK_PAIRS)
        for first in range(0, n_blocks, _BATCH_BLOCKS):
            k = min(_BATCH_BLOCKS, n_blocks - first)
            part = mv[first * block_bytes : (first + k) * block_bytes]
            words = _as_words(part, big_endian, k * 2 * _BLOCK_PAIRS).reshape(k, -1)
            for c0, c1 in _products(words, coefs).tolist():
                v = _chain(v, m, c0, c1)
    rest = mv[n_blocks * block_bytes :]
    if len(rest):
        coefs, m = _plain_tables(len(rest) // 8)
        c0, c1 = _products(_as_words(rest, big_endian, len(rest) // 4), coefs).tolist()
        v = _chain(v, m, c0, c1)
    return v


def _words(data: bytes | memoryview, big_endian: bool) -> tuple[int, ...]:
    """The 32-bit checksum words of ``data`` (a multiple of 4 bytes) as integers."""
    return struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)


def _plain_checksum(words: Iterable[int], v: tuple[int, int]) -> tuple[int, int]:
    """The checksum recurrence over ``words`` (an even number), from ``v``, in plain Python."""
    s0, s1 = v
    it = iter(words)
    for a, b in zip(it, it, strict=True):
        s0 = (s0 + a + s1) & _MASK
        s1 = (s1 + b + s0) & _MASK
    return (s0, s1)


def _verify_plain(
    mv: memoryview, n: int, page_size: int, big_endian: bool, salts: tuple[int, int],
    ck: tuple[int, int],
) -> tuple[tuple[int, int], int, str]:
    """``_check_block``'s verdict on ``n`` whole frames, frame by frame in plain Python:
    (running checksum after the valid ones, how many are valid, why the next one is not)."""
    fs = frame_size(page_size)
    for i in range(n):
        frame = mv[i * fs : (i + 1) * fs]
        pgno, _commit, salt1, salt2, c0, c1 = struct.unpack_from(">6I", frame)
        if (salt1, salt2) != salts:
            return ck, i, "salt mismatch"
        if pgno == 0:
            return ck, i, "page number 0"
        words = _words(frame, big_endian)
        got = _plain_checksum(itertools.chain(words[:2], words[6:]), ck)
        if got != (c0, c1):
            return ck, i, "checksum mismatch"
        ck = got
    return ck, n, ""


# --------------------------------------------------------------------------------------------
# Frames


@dataclass(frozen=True)
class Frame:
    """One valid WAL frame's metadata (the page itself is not kept); a commit frame (the end of
    a transaction) has a nonzero ``commit_size``."""

    index: int
    pgno: int
    commit_size: int
    checksum: tuple[int, int]


@dataclass
class ScanResult:
    """What a scan of WAL frames found: the committed frames and where and why it stopped.

    ``frames`` holds the valid committed frames in order (up to and including the last commit
    frame); ``end_index``/``end_checksum`` are the index and running checksum after the last of
    them (``start_index - 1`` and the start checksum if none). ``transactions`` lists
    ``(first_index, commit_index, commit_size)`` per committed transaction. ``valid_end_index`` is
    the last valid frame, committed or not; ``stop_reason`` is ``"eof"`` (the data ended on a
    frame boundary), ``"short"`` (it ended inside a frame, or for ``scan_frames`` the file ends
    before the start slot), ``"salt"`` (a frame had other salts, e.g. a stale frame after a WAL
    reset), ``"checksum"`` (a frame's checksum did not chain, or its page number was 0), or
    ``"limit"`` (``max_frames`` frames were examined). ``valid_checksum`` is the running checksum
    after ``valid_end_index``: a scan stopped by ``"limit"`` in the middle of a transaction
    continues from there. ``commit_checksums`` holds the running checksum after each commit frame,
    one per transaction. A scan asked not to keep frames leaves ``frames`` empty (and costs no
    Python object per frame); everything else is the same.
    """

    frames: list[Frame]
    end_index: int
    end_checksum: tuple[int, int]
    transactions: list[tuple[int, int, int]]
    valid_end_index: int
    stop_reason: str
    valid_checksum: tuple[int, int] = (0, 0)
    commit_checksums: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _BlockCheck:
    """What checking one block of frames found."""

    n_valid: int
    reason: str | None
    detail: str | None
    # of the valid frames only
    pgno: list[int]
    commit: list[int]
    ck0: list[int]
    ck1: list[int]


_FRAME_HEAD = struct.Struct(">6I")
SMALL_BLOCK_FRAMES = 16
"""A block of at most this many frames is checked frame by frame in Python once numpy has
summed its pages: a commit of a frame or two then costs a few array operations instead of a
score of them, each with a fixed cost that no page amortises."""


def _check_block(
    data: bytes | memoryview,
    n_frames: int,
    page_size: int,
    big_endian: bool,
    salts: tuple[int, int],
    prev: tuple[int, int],
) -> _BlockCheck:
    """Validate ``n_frames`` whole frames at the start of ``data``, chained from ``prev``.

    All frames are checked at once: frame f is valid iff its stored checksum equals
    ``M^n stored[f-1] + contribution[f]`` (with ``stored[-1] = prev``) and its salts and page
    number are right; the valid prefix ends at the first frame that is not.
    """
    import numpy as np

    n_words = frame_size(page_size) // 4
    coefs, (p, q, r) = _frame_tables(page_size)
    words = _as_words(data, big_endian, n_frames * n_words).reshape(n_frames, n_words)
    if n_frames <= SMALL_BLOCK_FRAMES:
        return _check_small(data, _products(words, coefs).tolist(), page_size, salts, prev,
                            (p, q, r))
    contrib = _products(words, coefs).astype(np.uint64)
    hdr_view: npt.NDArray[np.uint32] = np.frombuffer(
        data, dtype=_BE_WORDS, count=n_frames * n_words
    ).reshape(n_frames, n_words)
    hdr = hdr_view[:, :6].astype(np.uint64)
    stored0, stored1 = hdr[:, 4], hdr[:, 5]
    prev0 = np.empty(n_frames, dtype=np.uint64)
    prev1 = np.empty(n_frames, dtype=np.uint64)
    prev0[0], prev1[0] = prev
    prev0[1:], prev1[1:] = stored0[:-1], stored1[:-1]
    mask = np.uint64(_MASK)
    # uint64 products of values < 2^32 fit; sums wrap mod 2^64, which preserves mod 2^32.
    want0 = (np.uint64(p) * prev0 + np.uint64(q) * prev1 + contrib[:, 0]) & mask
    want1 = (np.uint64(q) * prev0 + np.uint64(r) * prev1 + contrib[:, 1]) & mask
    salt_bad = (hdr[:, 2] != np.uint64(salts[0])) | (hdr[:, 3] != np.uint64(salts[1]))
    ck_bad = (want0 != stored0) | (want1 != stored1) | (hdr[:, 0] == 0)
    bad = np.flatnonzero(salt_bad | ck_bad)
    n_valid = int(bad[0]) if bad.size else n_frames
    reason = detail = None
    if bad.size:
        if salt_bad[n_valid]:
            reason, detail = "salt", "salt mismatch"
        elif hdr[n_valid, 0] == 0:
            reason, detail = "checksum", "page number 0"
        else:
            reason, detail = "checksum", "checksum mismatch"
    ok = hdr[:n_valid]
    return _BlockCheck(n_valid, reason, detail, ok[:, 0].tolist(), ok[:, 1].tolist(),
                       ok[:, 4].tolist(), ok[:, 5].tolist())


def _check_small(
    data: bytes | memoryview,
    contrib: list[list[int]],
    page_size: int,
    salts: tuple[int, int],
    prev: tuple[int, int],
    m: tuple[int, int, int],
) -> _BlockCheck:
    """``_check_block``'s verdict on a few frames whose contributions (``contrib``: one pair
    per frame) are summed: the same rules, frame by frame."""
    fs = frame_size(page_size)
    p, q, r = m
    v0, v1 = prev
    out = _BlockCheck(0, None, None, [], [], [], [])
    for i, (c0, c1) in enumerate(contrib):
        pgno, commit, salt1, salt2, s0, s1 = _FRAME_HEAD.unpack_from(data, i * fs)
        if salt1 != salts[0] or salt2 != salts[1]:
            out.reason, out.detail = "salt", "salt mismatch"
            break
        if pgno == 0:
            out.reason, out.detail = "checksum", "page number 0"
            break
        if (p * v0 + q * v1 + c0) & _MASK != s0 or (q * v0 + r * v1 + c1) & _MASK != s1:
            out.reason, out.detail = "checksum", "checksum mismatch"
            break
        out.pgno.append(pgno)
        out.commit.append(commit)
        out.ck0.append(s0)
        out.ck1.append(s1)
        out.n_valid += 1
        v0, v1 = s0, s1
    return out


# read(first, count): the bytes of `count` frame slots starting `first` frames after the start
# (fewer bytes at the end of the data).
_Reader = Callable[[int, int], bytes | memoryview]


@dataclass
class _Scan:
    """The running state of a scan over the frames."""

    result: ScanResult
    valid_checksum: tuple[int, int]  # running checksum after the last valid frame
    detail: str  # why the first invalid frame is invalid ("" if none was)


def _scan_wal(
    read: _Reader,
    header: WalHeader,
    start_index: int,
    start_checksum: tuple[int, int],
    max_frames: int | None,
    chunk_bytes: int,
    keep_frames: bool,
    last_only: bool = False,
) -> ScanResult:
    """:func:`_scan` over frames of the WAL that ``header`` describes."""
    return _scan(read, header.page_size, header.big_endian, header.salts, start_index,
                 start_checksum, max_frames, chunk_bytes, keep_frames, last_only).result


def _check_scan_args(
    page_size: int, start_index: int, max_frames: int | None, chunk_bytes: int
) -> None:
    if start_index < 1:
        raise ValueError(f"start_index must be >= 1, got {start_index}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if not _valid_page_size(page_size):
        raise ValueError(f"invalid page size {page_size}")


class _Scanner:
    """The state of one scan: frames examined so far, transactions found, running checksums."""

    def __init__(self, start_index: int, start_checksum: tuple[int, int], keep_frames: bool,
                 last_only: bool = False):
        self.start_index = start_index
        self.keep_frames = keep_frames
        self.last_only = last_only
        self.frames: list[Frame] = []  # valid frames; the uncommitted tail is cut off at the end
        self.txns: list[tuple[int, int, int]] = []
        self.commit_cks: list[tuple[int, int]] = []
        self.txn_first = start_index
        self.valid_checksum = (start_checksum[0] & _MASK, start_checksum[1] & _MASK)
        self.examined = 0
        self.reason = "limit"
        self.detail = ""

    def add(self, chk: _BlockCheck) -> bool:
        """Take in the checked frames of one chunk; False once an invalid frame ended the scan."""
        base = self.start_index + self.examined
        if self.keep_frames:
            self.frames += [
                Frame(base + i, pgno, commit, (c0, c1))
                for i, (pgno, commit, c0, c1) in enumerate(
                    zip(chk.pgno, chk.commit, chk.ck0, chk.ck1, strict=True)
                )
            ]
        commits = [i for i, c in enumerate(chk.commit) if c]
        if self.last_only and commits:
            # only the last transaction is kept: memory stays the same however long the WAL
            first = base + commits[-2] + 1 if len(commits) > 1 else self.txn_first
            self.txns = []
            self.commit_cks = []
            self.txn_first = first
            commits = commits[-1:]
        for i in commits:
            self.txns.append((self.txn_first, base + i, chk.commit[i]))
            self.commit_cks.append((chk.ck0[i], chk.ck1[i]))
            self.txn_first = base + i + 1
        if chk.n_valid:
            self.valid_checksum = (chk.ck0[-1], chk.ck1[-1])
        self.examined += chk.n_valid
        if chk.reason is not None:
            self.reason = chk.reason
            self.detail = chk.detail or ""
            return False
        return True

    def result(self, start_checksum: tuple[int, int]) -> _Scan:
        del self.frames[self.txn_first - self.start_index :]
        txns = self.txns
        end_checksum = self.commit_cks[-1] if txns else (
            start_checksum[0] & _MASK, start_checksum[1] & _MASK)
        result = ScanResult(
            frames=self.frames,
            end_index=txns[-1][1] if txns else self.start_index - 1,
            end_checksum=end_checksum,
            transactions=txns,
            valid_end_index=self.start_index + self.examined - 1,
            stop_reason=self.reason,
            valid_checksum=self.valid_checksum,
            commit_checksums=self.commit_cks,
        )
        return _Scan(result, self.valid_checksum, self.detail)


def _scan(
    read: _Reader,
    page_size: int,
    big_endian: bool,
    salts: tuple[int, int],
    start_index: int,
    start_checksum: tuple[int, int],
    max_frames: int | None,
    chunk_bytes: int,
    keep_frames: bool = True,
    last_only: bool = False,
) -> _Scan:
    """The scan shared by scan_frames, scan_bytes and verify_frames."""
    _check_scan_args(page_size, start_index, max_frames, chunk_bytes)
    fs = frame_size(page_size)
    per_chunk = max(1, chunk_bytes // fs)
    st = _Scanner(start_index, start_checksum, keep_frames, last_only)
    while max_frames is None or st.examined < max_frames:
        count = per_chunk if max_frames is None else min(per_chunk, max_frames - st.examined)
        data = read(st.examined, count)
        whole = min(len(data) // fs, count)
        if whole:
            chk = _check_block(data, whole, page_size, big_endian, salts, st.valid_checksum)
            if not st.add(chk):
                break
        if whole < count:
            st.reason = "short" if len(data) > whole * fs else "eof"
            break
    return st.result(start_checksum)


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """Up to ``length`` bytes at ``offset``; fewer only at end of file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class Lent:
    """A buffer lent by :class:`ReadBuffers`. What :meth:`pread` returns stays valid until the
    next read into it or the end of the loan."""

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf

    def pread(self, fd: int, length: int, offset: int) -> memoryview:
        """Up to ``length`` bytes at ``offset`` (fewer only at end of file), read into the buffer
        (made larger first when it is too small)."""
        if len(self.buf) < length:
            self.buf = bytearray(length)
        return _pread_into(fd, self.buf, length, offset)


class ReadBuffers:
    """Buffers for reading WAL frames, kept by the process for reuse. A buffer of a few MiB
    allocated afresh for each read costs a page fault for each of its pages (in a virtual
    machine more than the copy itself); a kept one costs only the copy. At most ``keep`` are
    kept (the largest), so memory does not grow with the number of databases or threads."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._free: list[bytearray] = []

    @contextlib.contextmanager
    def lend(self) -> Iterator[Lent]:
        """A buffer for the length of a ``with`` block (given back at its end)."""
        with self._lock:
            buf = self._free.pop() if self._free else bytearray()
        lent = Lent(buf)
        try:
            yield lent
        finally:
            with self._lock:
                self._free.append(lent.buf)
                self._free.sort(key=len)
                del self._free[: max(0, len(self._free) - self.keep)]


READ_BUFFERS = ReadBuffers()


def _pread_into(fd: int, buf: bytearray, length: int, offset: int) -> memoryview:
    """Up to ``length`` bytes at ``offset``, read into ``buf``; fewer only at end of file."""
    mv = memoryview(buf)[:length]
    got = 0
    while got < length:
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            break
        got += n
    return mv[:got]


def scan_frames(
    fd: int,
    header: WalHeader,
    start_index: int,
    start_checksum: tuple[int, int],
    *,
    max_frames: int | None = None,
    chunk_bytes: int = 4 << 20,
    keep_frames: bool = True,
    last_only: bool = False,
) -> ScanResult:
    """The valid committed frames of the WAL open at ``fd``, from slot ``start_index`` on.

    The frame at ``start_index`` (1-based) must chain from ``start_checksum`` (for slot 1, the
    header checksum). Frames are read with ``os.pread`` in chunks of about ``chunk_bytes`` (at
    least one frame) and validated a chunk at a time; only frame metadata is kept. The scan stops
    at the first invalid or short frame, at end of file, or after ``max_frames`` frames, and
    returns frames only up to and including the last commit frame. A file that ends before the
    start slot (it was truncated or reset and shrank) stops with ``"short"``, not ``"eof"``.
    With ``keep_frames=False`` the result has no ``frames`` (see ScanResult); with
    ``last_only`` (and no frames kept) ``transactions`` and ``commit_checksums`` hold only the
    last transaction, so a scan of a long WAL costs the same memory as one of a short one.
    """
    if last_only and keep_frames:
        raise ValueError("last_only needs keep_frames=False")
    fs = frame_size(header.page_size)

    # one buffer for every chunk, kept by the process (see ReadBuffers): memory stays at about
    # chunk_bytes, no page faults
    with READ_BUFFERS.lend() as lent:

        def read(first: int, count: int) -> memoryview:
            return lent.pread(fd, count * fs, frame_offset(start_index + first, header.page_size))

        res = _scan_wal(read, header, start_index, start_checksum, max_frames, chunk_bytes,
                        keep_frames, last_only)
    if (
        res.stop_reason == "eof"
        and res.valid_end_index < start_index
        and os.fstat(fd).st_size < frame_offset(start_index, header.page_size)
    ):
        res.stop_reason = "short"  # the file ends before the start slot: it shrank
    return res


def page_offsets(
    fd: int, header: WalHeader, count: int, chunk_bytes: int = 4 << 20
) -> dict[int, int]:
    """For the first ``count`` frames of the WAL open at ``fd`` (already validated): page number
    -> file offset of the page in its newest frame. Memory grows with the distinct pages only;
    frames are read in chunks of about ``chunk_bytes``."""
    import numpy as np

    ps = header.page_size
    fs = frame_size(ps)
    per = max(1, chunk_bytes // fs)
    out: dict[int, int] = {}
    with READ_BUFFERS.lend() as lent:
        for first in range(1, count + 1, per):
            want = min(per, count - first + 1)
            buf = lent.pread(fd, want * fs, frame_offset(first, ps))
            n = len(buf) // fs
            if n < want:
                raise WalError(f"WAL ends at frame {first + n - 1}, before frame {count}")
            words = np.frombuffer(buf, dtype=_BE_WORDS, count=n * fs // 4)
            pgnos = words.reshape(n, fs // 4)[:, 0]
            base = frame_offset(first, ps) + FRAME_HEADER_SIZE
            out.update(zip(pgnos.tolist(), range(base, base + n * fs, fs), strict=True))
    return out


def scan_bytes(
    buf: bytes | memoryview,
    header: WalHeader,
    start_index: int,
    start_checksum: tuple[int, int],
    *,
    keep_frames: bool = True,
) -> ScanResult:
    """The valid committed frames in ``buf``, whose first byte is the start of slot ``start_index``.

    Same rules and result as ``scan_frames``, over memory instead of a file (e.g. a segment body
    being verified on restore).
    """
    mv = memoryview(buf).cast("B")
    fs = frame_size(header.page_size)

    def read(first: int, count: int) -> memoryview:
        return mv[first * fs : (first + count) * fs]

    return _scan_wal(read, header, start_index, start_checksum, None, 4 << 20, keep_frames)


def verify_frames(
    buf: bytes | memoryview,
    page_size: int,
    big_endian: bool,
    salts: tuple[int, int],
    start_checksum: tuple[int, int],
    *,
    plain: bool = False,
) -> tuple[int, int]:
    """The running checksum after the whole frames in ``buf``, all of which must be valid.

    Every frame must carry ``salts`` and chain from ``start_checksum``; commit frames are not
    required. Raises WalError naming the first failing frame (1-based within ``buf``), or if
    ``buf`` is not a whole number of frames. ``plain`` checks frame by frame in plain Python,
    without numpy: the same verdict, quicker than importing numpy for a few hundred frames,
    slower for many more.
    """
    mv = memoryview(buf).cast("B")
    if not _valid_page_size(page_size):
        raise WalError(f"invalid WAL page size {page_size}")
    fs = frame_size(page_size)
    n, extra = divmod(len(mv), fs)
    if extra:
        raise WalError(f"frame buffer of {len(mv)} bytes is not a whole number of {fs}-byte frames")

    if plain:
        ck, valid, detail = _verify_plain(
            mv, n, page_size, big_endian, salts, (start_checksum[0] & _MASK,
                                                  start_checksum[1] & _MASK))
        if valid < n:
            raise WalError(f"frame {valid + 1} of {n} in buffer is invalid: {detail}")
        return ck

    def read(first: int, count: int) -> memoryview:
        return mv[first * fs : (first + count) * fs]

    scan = _scan(read, page_size, big_endian, salts, 1, start_checksum, None, 4 << 20, False)
    valid = scan.result.valid_end_index
    if valid < n:
        raise WalError(f"frame {valid + 1} of {n} in buffer is invalid: {scan.detail}")
    return scan.valid_checksum
