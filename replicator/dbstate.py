"""The database's state as of the capture's pin: its pages read from the database file,
overlaid with the current WAL epoch's committed frames.

Under the pin no checkpoint can write a page to the database file unless a frame at or below
the pin's read mark holds it, and that frame is in the overlay: so the pages read are exactly
the state after the last committed frame scanned, however the application writes meanwhile, as
long as the WAL is not reset under the read (``still_valid`` checks it after).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import DatabaseError
from .pos import WalPos
from .wal import (
    FRAME_HEADER_SIZE,
    WalHeader,
    frame_offset,
    page_offsets,
    read_wal_header,
    scan_frames,
)

CHUNK_PAGES = 256


@dataclass
class DbHeader:
    """The fields of the database file header the capture needs."""

    page_size: int
    pages: int
    wal_mode: bool


def read_db_header(path: str, fd: int | None = None, size: int | None = None
                   ) -> DbHeader | None:
    """Parse the 100-byte database header; None if the file is empty.

    Pass ``fd`` while SQLite connections to the file are open in this process: opening and
    closing another descriptor on the file would drop every POSIX lock the process holds on it.
    ``size``: the file's size, from a stat just taken (else it is looked up).
    """
    if fd is None:
        with open(path, "rb") as f:
            return read_db_header(path, f.fileno(), size)
    raw = os.pread(fd, 100, 0)
    if size is None:
        size = os.fstat(fd).st_size
    if len(raw) == 0:
        return None
    if len(raw) < 100 or not raw.startswith(b"SQLite format 3\x00"):
        raise DatabaseError(f"{path}: not a SQLite database")
    ps = struct.unpack_from(">H", raw, 16)[0]
    ps = 65536 if ps == 1 else ps
    change, in_header = struct.unpack_from(">II", raw, 24)
    valid_for = struct.unpack_from(">I", raw, 92)[0]
    pages = in_header if (in_header and change == valid_for) else size // ps
    return DbHeader(ps, pages, raw[18] == 2 and raw[19] == 2)


@dataclass
class DbState:
    """Pages 1..``pages`` of the database as of WAL position ``pos`` (None: no WAL header;
    the database file alone)."""

    db_fd: int
    wal_fd: int | None
    hdr: WalHeader | None
    page_size: int
    pages: int
    pagemap: dict[int, int]  # page number -> offset of its newest frame in the WAL
    pos: WalPos | None

    def chunks(self) -> Iterator[tuple[int, bytearray]]:
        """``(first page number, pages)`` in runs of at most CHUNK_PAGES pages, in order."""
        ps = self.page_size
        pgno = 1
        while pgno <= self.pages:
            n = min(CHUNK_PAGES, self.pages - pgno + 1)
            buf = bytearray(os.pread(self.db_fd, n * ps, (pgno - 1) * ps))
            if len(buf) < n * ps:
                buf.extend(bytes(n * ps - len(buf)))
            for k in range(n):
                off = self.pagemap.get(pgno + k)
                if off is not None:
                    assert self.wal_fd is not None
                    buf[k * ps : (k + 1) * ps] = os.pread(self.wal_fd, ps, off)
            yield pgno, buf
            pgno += n

    def page(self, pgno: int) -> bytes:
        """One page (zeros past the end of the database file)."""
        ps = self.page_size
        off = self.pagemap.get(pgno)
        if off is not None:
            assert self.wal_fd is not None
            return os.pread(self.wal_fd, ps, off)
        data = os.pread(self.db_fd, ps, (pgno - 1) * ps)
        return data + bytes(ps - len(data))

    def still_valid(self) -> bool:
        """Whether the WAL epoch read is still the current one (no reset under the read)."""
        if self.hdr is None or self.wal_fd is None:
            return True
        hdr2 = read_wal_header(self.wal_fd)
        return hdr2 is not None and hdr2.salts == self.hdr.salts


def pages_of(buf: bytes | bytearray, page_size: int) -> list[memoryview]:
    """The pages of a run of pages read in one piece."""
    mv = memoryview(buf)
    return [mv[k * page_size : (k + 1) * page_size] for k in range(len(buf) // page_size)]


def read_state(
    path: str, db_fd: int, wal_fd: int | None, page_size: int, upto: WalPos | None = None,
    verified: bool = False,
) -> DbState:
    """The state after the current epoch's last committed frame, or after frame ``upto.frame``
    when ``upto`` is in the current epoch. ``verified``: ``upto`` is the end of a committed
    transaction whose frames (and checksum chain) the capture already verified in this epoch,
    so they are not scanned again (a WAL is only rewritten after a reset, which changes its
    salts; ``still_valid`` checks them after the read)."""
    hdr = read_wal_header(wal_fd) if wal_fd is not None else None
    dbh = read_db_header(path, db_fd)
    page_size = hdr.page_size if hdr else (dbh.page_size if dbh else page_size)
    pages = dbh.pages if dbh else 0
    pagemap: dict[int, int] = {}
    pos: WalPos | None = None
    if hdr is not None and wal_fd is not None:
        limit = upto.frame if upto is not None and upto.salts == hdr.salts else None
        if verified and upto is not None and limit is not None:
            end, checksum = upto.frame, upto.checksum
            if end:
                pages = _commit_size(wal_fd, hdr, end)
        else:
            scan = scan_frames(wal_fd, hdr, 1, hdr.checksum, max_frames=limit, keep_frames=False,
                               last_only=True)
            end, checksum = scan.end_index, scan.end_checksum
            if scan.transactions:
                pages = scan.transactions[-1][2]
        pagemap = page_offsets(wal_fd, hdr, end)
        pos = WalPos(hdr.salt1, hdr.salt2, end, checksum)
    return DbState(db_fd, wal_fd, hdr, page_size, pages, pagemap, pos)


def _commit_size(wal_fd: int, hdr: WalHeader, frame: int) -> int:
    """The database size (pages) recorded by commit frame ``frame``."""
    raw = os.pread(wal_fd, FRAME_HEADER_SIZE, frame_offset(frame, hdr.page_size))
    size = struct.unpack_from(">I", raw, 4)[0] if len(raw) == FRAME_HEADER_SIZE else 0
    if not size:
        raise DatabaseError(f"WAL frame {frame} is not a commit frame")
    return int(size)
