"""The proof that a WAL reset lost no committed frame: the old epoch's tail, read and checked.

See :mod:`replicator.db` for when a reset counts as continuous.
"""

from __future__ import annotations

import logging
import os
import struct

from .handles import Handles
from .pos import WalPos
from .progress import Progress
from .wal import (
    FRAME_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    WAL_VERSION,
    ScanResult,
    WalHeader,
    frame_offset,
    frame_size,
    pread_full,
    scan_bytes,
    scan_frames,
)

log = logging.getLogger("replicator.db")

RESCUE_MAX_BYTES = 8 << 20
RESCUE_FIRST_READ = 256 << 10
_MASK32 = 0xFFFFFFFF

Rescued = tuple[ScanResult, memoryview | None]
"""A proven tail of an old epoch, and its frames when they were read into memory."""


def pseudo_header(pos: WalPos, page_size: int, big_endian: bool) -> WalHeader:
    """A WAL header for the epoch ``pos`` is in (to scan its frames after a reset)."""
    magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    return WalHeader(
        magic, WAL_VERSION, page_size, 0, pos.salt1, pos.salt2, pos.checksum[0], pos.checksum[1],
        b"",
    )


def frame_is(fd: int, pos: WalPos, page_size: int) -> bool:
    """Whether the WAL's frame ``pos.frame`` still has the salts and checksum of ``pos``."""
    raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(pos.frame, page_size))
    if len(raw) < FRAME_HEADER_SIZE:
        return False
    return struct.unpack(">IIII", raw[8:24]) == (*pos.salts, *pos.checksum)


def _read_tail(fd: int, old: WalHeader, pos: WalPos, fs: int, off: int) -> Rescued | None:
    """The old epoch's tail from ``off``, read into memory and scanned, when it is at most
    RESCUE_MAX_BYTES; else None. The file past a reset still holds older epochs' frames (its
    size is the largest the WAL ever was), so the read grows from RESCUE_FIRST_READ until the
    scan stops inside it or it covers the file: reading the file to its end instead would
    push a long file to the slow path, whose second read can find the tail already
    overwritten by the new epoch."""
    length = max(0, os.fstat(fd).st_size - off)
    cap = max(1, RESCUE_MAX_BYTES // fs) * fs  # whole frames: the largest read
    want = min(length, max(1, RESCUE_FIRST_READ // fs) * fs, cap)
    while True:
        buf = pread_full(fd, want, off)
        tail = scan_bytes(buf, old, pos.frame + 1, pos.checksum, keep_frames=False)
        if tail.stop_reason in ("salt", "checksum") or len(buf) < want or want >= length:
            return tail, memoryview(buf)[: (tail.end_index - pos.frame) * fs]
        if want >= cap:
            return None
        want = min(length, want * 4, cap)


def rescue(
    fd: int, new: WalHeader, progress: Progress, handles: Handles, name: str
) -> Rescued | None:
    """After a WAL reset: read the old epoch's tail and prove it is complete, or None.

    The tail is read once into memory when it is at most RESCUE_MAX_BYTES (always, after a
    rotation, however large the file), so the frames written to the spool are the ones the
    proof was made on, however soon the new epoch overwrites them; a longer one is read again
    while copying, verified."""
    pos, page_size = progress.pos, progress.page_size
    assert pos is not None
    if new.salt1 != (pos.salt1 + 1) & _MASK32 or new.page_size != page_size:
        log.debug("%s: reset not proven: WAL reset %d times since frame %d, page size %d",
                  name, (new.salt1 - pos.salt1) & _MASK32, pos.frame, new.page_size)
        return None
    fs = frame_size(page_size)
    off = frame_offset(pos.frame + 1, page_size)
    before = os.pread(fd, fs, off)
    old = pseudo_header(pos, page_size, progress.big_endian)
    in_memory = _read_tail(fd, old, pos, fs, off)
    if in_memory is not None:
        tail, data = in_memory
    else:
        tail, data = scan_frames(fd, old, pos.frame + 1, pos.checksum, keep_frames=False), None
    after = os.pread(fd, fs, off)
    size = os.fstat(fd).st_size  # once the tail was read: has the file shrunk since?
    bound = handles.reset_end if handles.reset_salts == pos.salts else None
    if bound is not None and bound == tail.end_index:
        return tail, data
    untouched = len(before) == fs and before == after and after[8:16] != new.raw[16:24]
    # the tail must end on a frame that is there, or exactly at a frame boundary of a file
    # that has not shrunk: a journal_size_limit truncation at the new epoch's first commit
    # cuts the file at the limit (a partial frame) and could otherwise pass for the end
    ended = tail.stop_reason in ("salt", "checksum") or (
        tail.stop_reason == "eof" and size >= handles.wal_size_seen
    )
    if untouched and ended:
        return tail, data
    # the capture had reached the old epoch's last frame, which was the file's last: the
    # file still ends right after it, has not shrunk, and that frame is still ours
    if (
        pos.frame > 0 and not before and not after and size == off
        and size >= handles.wal_size_seen and not tail.transactions
        and frame_is(fd, pos, page_size)
    ):
        return tail, data
    log.debug(
        "%s: reset not proven: tail from %d stopped (%s) at %d, reset bound %s, "
        "slot untouched %s", name, pos.frame + 1, tail.stop_reason, tail.end_index,
        bound, untouched,
    )
    return None
