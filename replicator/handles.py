"""The watched database's connections and open files: the checkpointing connection, the two
read-only connections that take turns holding the pin, and descriptors on the database, the
``-wal`` and the wal-index (``-shm``).

See :mod:`replicator.db` for why a pin keeps every committed frame readable. Closing any other
descriptor on the database or ``-shm`` drops every POSIX lock this process holds on them, so
the descriptors here close only after every connection has.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from .dbstate import read_db_header
from .errors import DatabaseError
from .progress import Progress
from .sightings import Sightings, WalIndex, read_walindex, salt_bytes
from .wal import WAL_HEADER_SIZE

PIN_RETRY = 0.00005
NO_RESET = -1
"""``Handles.reset_end`` when no reset can happen while the pin is held."""


def file_sig(fd: int) -> tuple[int, int, int]:
    """(inode, size, mtime) of an open file: it changes with every write."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _short_of_backfill(before: WalIndex | None, after: WalIndex | None) -> bool:
    """Whether the WAL was never wholly backfilled between two reads of the wal-index (a read
    transaction begun in between then took a read mark other than 0): the same epoch at both,
    and nBackfill at the second below mxFrame at the first. Within an epoch both only grow, so
    nBackfill stayed below mxFrame throughout."""
    return before is not None and after is not None and (
        before[0] == after[0] and after[2] < before[1]
    )


class Handles:
    """The connections and files of one database, and the pin. Blocking: one worker thread."""

    def __init__(self, path: str, progress: Progress, busy_timeout: float) -> None:
        self.path = path
        self.progress = progress
        self.busy_timeout = busy_timeout
        self.conns: list[sqlite3.Connection] = []
        self.ckpt: sqlite3.Connection | None = None
        self.active = 0
        self.pinned = False
        self.reset_end: int | None = None  # see learn_reset_bound
        self.reset_salts: tuple[int, int] | None = None
        # whether the pin may hold read mark 0 (see leave_mark0), and the wal-index's (salts,
        # mxFrame) read right after it began: a bound on the frames it lets be backfilled
        self.mark0 = True
        self._pin_seen: tuple[bytes, int] | None = None
        self.pins = 0  # pins taken with no other pin held
        self.wal_fd: int | None = None
        self._wal_ino: int | None = None
        self.wal_size_seen = 0  # WAL size at the last capture (for the shrink check)
        self._shm_fd: int | None = None
        self.db_fd: int | None = None
        self.db_ino: int | None = None
        self.db_dev = 0
        # when committed frames were first seen (transactions are stamped with it); its own
        # descriptor on -shm, closed last like the others
        self.sightings = Sightings(path + "-shm")

    @property
    def wal_path(self) -> str:
        """The ``-wal`` file."""
        return self.path + "-wal"

    # ------------------------------------------------------------------ open, close

    def check_file(self) -> None:
        """Check the database is a regular file in WAL mode and keep a descriptor on it."""
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseError(f"database {self.path} does not exist") from None
        except OSError as exc:
            raise DatabaseError(f"database {self.path}: {exc.strerror}") from None
        if not os.path.isfile(self.path):
            raise DatabaseError(f"database {self.path} is not a regular file")
        try:
            self.db_fd = os.open(self.path, os.O_RDONLY)
        except PermissionError:
            raise DatabaseError(f"database {self.path}: permission denied") from None
        hdr = read_db_header(self.path, self.db_fd)
        if hdr is not None and not hdr.wal_mode:
            os.close(self.db_fd)
            self.db_fd = None
            raise DatabaseError(
                f"database {self.path} is not in WAL mode; enable it once with "
                f"sqlite3 {self.path} 'PRAGMA journal_mode=WAL' (the setting is persistent)"
            )
        st = os.fstat(self.db_fd)
        self.db_ino, self.db_dev = st.st_ino, st.st_dev

    def open_conn(self, mode: str) -> sqlite3.Connection:
        """A new connection to the database (``ro`` ones have no busy timeout)."""
        return sqlite3.connect(
            f"file:{self.path}?mode={mode}", uri=True, isolation_level=None,
            check_same_thread=False, timeout=self.busy_timeout if mode == "rw" else 0,
        )

    def connect(self) -> None:
        """One read-write connection, used only for PASSIVE checkpoints, and two read-only ones
        for the pins. At shutdown the read-write one closes first: a read-only connection that
        closes last cannot checkpoint and delete the WAL, so a restart can still prove
        continuity from it."""
        try:
            self.ckpt = self.open_conn("rw")
            mode = self.ckpt.execute("PRAGMA journal_mode").fetchone()[0]
            # the first read creates -wal and -shm, which read-only connections need
            self.ckpt.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            self.conns = [self.open_conn("ro") for _ in range(2)]
        except sqlite3.Error as exc:
            raise DatabaseError(f"database {self.path}: {exc}") from None
        if str(mode).lower() != "wal":
            raise DatabaseError(
                f"database {self.path} is in journal_mode={mode}, not WAL; enable it once with "
                f"sqlite3 {self.path} 'PRAGMA journal_mode=WAL' (the setting is persistent)"
            )
        if self.progress.page_size == 0:
            self.progress.page_size = int(self.ckpt.execute("PRAGMA page_size").fetchone()[0])

    def close(self, tidy: bool) -> None:
        """Close the connections, then the files (see :meth:`Database.close` for ``tidy``)."""
        ckpt = [self.ckpt] if self.ckpt is not None else []
        try:
            has_frames = os.stat(self.wal_path).st_size > WAL_HEADER_SIZE
        except OSError:
            has_frames = False
        # with frames in the WAL the read-write connection closes first, so that closing last
        # cannot checkpoint and delete the WAL a restart resumes from; with none, it closes
        # last and SQLite tidies the empty -wal/-shm away if nobody else has the database open
        for c in (ckpt + self.conns) if has_frames or not tidy else (self.conns + ckpt):
            try:
                if c.in_transaction:
                    c.execute("COMMIT")
                c.close()
            except sqlite3.Error:
                pass
        self.conns = []
        self.ckpt = None
        self.pinned = False
        # only now, with every connection closed, may this process close its other descriptors
        # on the database and -shm files (closing one drops all the process's POSIX locks)
        for attr in ("wal_fd", "_shm_fd", "db_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)
        self.sightings.close()

    # ------------------------------------------------------------------ pins

    def begin_read(self, c: sqlite3.Connection) -> None:
        """Start a read transaction on a pin connection. These have no busy handler (it sleeps
        for milliseconds, during which a busy writer could get far): a transient SQLITE_BUSY is
        retried at once, up to the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                c.execute("BEGIN")
                c.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
                return
            except sqlite3.OperationalError as exc:
                if c.in_transaction:
                    c.execute("COMMIT")
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or (
                    time.monotonic() >= deadline
                ):
                    raise
                time.sleep(PIN_RETRY)

    def pin(self, idx: int) -> None:
        """Hold the pin on connection ``idx``. With no other pin held, it may take read mark 0,
        unless the wal-index read around its begin proves otherwise (see ``_short_of_backfill``;
        then no handover has to move it, see ``leave_mark0``)."""
        before = self.read_shm()
        self.begin_read(self.conns[idx])
        after = self.read_shm()
        self.active = idx
        self.pinned = True
        self.pins += 1
        self.mark0 = not _short_of_backfill(before, after)
        self._began(after)

    def unpin(self) -> None:
        """Release the pin."""
        self.conns[self.active].execute("COMMIT")
        self.pinned = False
        self._pin_seen = None
        self.reset_end = None
        self.reset_salts = None

    def handover(self) -> None:
        """Pin the newest snapshot on the other connection, then release the old pin: frames
        stay protected throughout.

        It does not move when the new pin would let the WAL reset while frames of this epoch
        are not captured yet: a pin taken while the WAL is wholly backfilled reads the database
        file alone (read mark 0), and the application's next write could then restart the
        WAL and overwrite those frames before the capture reads them. The old pin stays until
        a later handover finds frames appended since (then the new pin blocks backfill, so no
        reset can follow) or the capture has caught up."""
        other = 1 - self.active
        old = self.active
        before = self.read_shm()
        self.begin_read(self.conns[other])
        after = self.read_shm()
        if self._would_expose_uncaptured(after):
            self.conns[other].execute("COMMIT")
            return
        self.conns[old].execute("COMMIT")
        self.active = other
        self.mark0 = not self._past_backfill(before)
        self._began(after)

    def leave_mark0(self) -> bool:
        """Move a pin that may hold read mark 0 to one that cannot, once the WAL has frames
        past what the pin lets be backfilled; True if it moved.

        A pin on read mark 0 (taken while the WAL was wholly backfilled) blocks every backfill,
        and the application's autocheckpoint, which sorts every frame not yet backfilled before
        it finds out, then fails on each commit past the threshold: the longer the WAL, the
        slower each commit. On any other mark, backfill stops at the pin's frame, and later
        autocheckpoints end at once. The pin rotation takes read mark 0 when it lets the WAL
        reset; this moves it off at the first capture of the new epoch's frames."""
        if not self.pinned or not self.mark0 or not self._past_backfill(self.read_shm()):
            return False
        self.handover()
        return not self.mark0

    def _past_backfill(self, shm: WalIndex | None) -> bool:
        """Whether ``shm``, read while the current pin is held, proves that a read beginning
        after it takes a read mark other than 0: the WAL has frames not backfilled, past the
        mxFrame seen when the current pin began. The pin bounds backfill by its own read mark,
        which is at most that mxFrame, or, on read mark 0, stops it at what it was (a reset
        in between, which only read mark 0 lets through, restarts it from 0): either way
        nBackfill stays below this mxFrame, so the read cannot find the WAL wholly
        backfilled."""
        seen = self._pin_seen
        if shm is None or seen is None or not self.pinned:
            return False
        salts, mx, nb = shm
        return nb < mx and (salts != seen[0] or mx > seen[1])

    def _began(self, shm: WalIndex | None) -> None:
        """Note the wal-index as read right after the pin began."""
        self._pin_seen = (shm[0], shm[1]) if shm is not None else None
        self.learn_reset_bound(shm)

    def _would_expose_uncaptured(self, shm: WalIndex | None) -> bool:
        """Right after a read began: whether the wal-index shows the WAL wholly backfilled
        (so the read may have taken read mark 0, which lets a reset through) beyond the
        captured position. Read after the read began, so a frame appended in between shows
        (the pin then blocks backfill: safe); a backfill that completed in between makes this
        answer yes when it need not, which only keeps the old pin a little longer."""
        pos = self.progress.pos
        if shm is None:
            return False
        salts, mx, nb = shm
        if pos is None:  # nothing of the WAL captured yet
            return nb == mx > 0
        return salts == salt_bytes(pos.salts) and nb == mx > pos.frame

    def read_shm(self) -> WalIndex | None:
        """(salt bytes, mxFrame, nBackfill) from a consistent read of the wal-index, or None."""
        if self._shm_fd is None:
            try:
                self._shm_fd = os.open(self.path + "-shm", os.O_RDONLY)
            except OSError:
                return None
        return read_walindex(self._shm_fd)

    def learn_reset_bound(self, shm: WalIndex | None = None) -> None:
        """Right after pinning (``shm``: the wal-index read since, or read now): where can the
        current epoch still be reset?

        With salts unchanged and the WAL fully backfilled (mxFrame == nBackfill == X) the epoch can
        only reset at exactly X (any append would need a backfill our pin blocks). With
        nBackfill < mxFrame no reset can happen while this pin is held.
        """
        self.reset_end = None
        self.reset_salts = None
        pos = self.progress.pos
        if pos is None:
            return
        if shm is None:
            shm = self.read_shm()
        if shm is None:
            return
        salts, mx, nb = shm
        if salts != salt_bytes(pos.salts):
            return
        self.reset_salts = pos.salts
        self.reset_end = mx if nb == mx else NO_RESET

    # ------------------------------------------------------------------ files

    def wal(self) -> int | None:
        """An open fd on the current -wal file (reopened if it was replaced), or None."""
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            if self.wal_fd is not None:
                os.close(self.wal_fd)
                self.wal_fd = None
            return None
        if self.wal_fd is not None and st.st_ino != self._wal_ino:
            os.close(self.wal_fd)
            self.wal_fd = None
        if self.wal_fd is None:
            self.wal_fd = os.open(self.wal_path, os.O_RDONLY)
            self._wal_ino = os.fstat(self.wal_fd).st_ino
            self.wal_size_seen = 0
        return self.wal_fd

    def sizes(self) -> tuple[int, int]:
        """(database file size, WAL file size) in bytes."""
        out = []
        for p in (self.path, self.wal_path):
            try:
                out.append(os.stat(p).st_size)
            except OSError:
                out.append(0)
        return out[0], out[1]

    # ------------------------------------------------------------------ checkpoints, reads

    def checkpoint_passive(self) -> str:
        """A PASSIVE checkpoint (never waits): ``ok``, ``partial``, ``busy`` or ``error``."""
        assert self.ckpt is not None
        result = "error"
        try:
            row = self.ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            row = None
        if row is not None:
            # busy: the application is checkpointing right now, which serves as well
            result = "busy" if row[0] else "ok" if row[1] == row[2] else "partial"
        return result

    def checkpoint_truncate(self, timeout: float) -> tuple[int, int, int]:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` with the pin released (see
        :meth:`Database.checkpoint_truncate`); returns SQLite's (busy, log, checkpointed)."""
        if self.pinned:
            self.unpin()
        assert self.ckpt is not None
        ckpt = self.ckpt
        ckpt.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        try:
            row = ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            ckpt.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return int(row[0]), int(row[1]), int(row[2])

    def read_captured(self, sqls: Sequence[str]) -> list[list[tuple[Any, ...]]] | None:
        """The rows of each query, read in one transaction of a connection of its own that sees
        exactly the captured state (see :meth:`Database.read_captured`)."""
        conn = self.open_conn("ro")
        try:
            conn.execute("PRAGMA query_only = ON")
            self.begin_read(conn)
            shm = self.read_shm()
            pos = self.progress.pos
            if pos is None or shm is None or shm[1] != pos.frame or (
                shm[0] != salt_bytes(pos.salts)
            ):
                return None
            return [[tuple(r) for r in conn.execute(sql).fetchall()] for sql in sqls]
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
            conn.close()
