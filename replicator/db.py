"""The watched database: read pins, checkpoints and change capture.

How frames are kept safe without ever blocking the application
---------------------------------------------------------------
SQLite overwrites WAL frames only when a writer *resets* the WAL, and it resets only when every
frame has been backfilled into the database file and no reader holds a read mark >= 1. The
replicator keeps one read transaction (a *pin*) open at all times on one of its two connections:

* a pin taken while the WAL holds unbackfilled frames has a read mark >= 1: no reset can happen;
* a pin taken while the WAL is fully backfilled uses read mark 0, which blocks all backfill: the
  WAL can then reset at most once, and only at the frame it had when the pin was taken.

So while pinned, every committed frame stays readable until captured. To keep the WAL small the
replicator *rotates*: when caught up and the epoch holds ``checkpoint_pages`` frames it releases
the pin, runs a PASSIVE checkpoint (never waits, never blocks a writer) and pins again on the other
connection. In that short window the application may reset the WAL. A reset is accepted as
continuous only when it is *proven* that no committed frame was lost:

* the wal-index (``-shm``) showed, when the pin was taken, that the epoch could only end at frame X
  and everything up to X was captured; or
* the slot after the last captured frame still holds the same pre-reset bytes before and after the
  old epoch's tail was read (the new epoch writes from slot 1 upwards, so it never reached the
  tail), the new epoch's salt-1 is exactly one more than the old one, and the tail ends on a
  frame that is there (older salts or a broken chain) or at a frame boundary of a WAL file that
  has not shrunk (a ``journal_size_limit`` truncation at the new epoch's first commit leaves a
  partial frame at the limit, which proves nothing).

Anything else (the replicator was down, the file was replaced, two resets, the tail overwritten)
starts a new generation with a snapshot. Nothing here takes a write lock or runs a checkpoint mode
that waits; SQLite work runs on the database's own worker thread, never on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dbstate import DbState, read_db_header, read_state
from .errors import DatabaseError, WalError
from .format import DEFAULT_LEVEL
from .fsutil import atomic_writer
from .headers import CatchupHeader, Reason, SegmentHeader, SnapshotHeader, Txn
from .pageindex import (
    CATCHUP_PGNO_SIZE,
    IndexKeeper,
    IndexUnusable,
    PageIndex,
    Stamp,
    page_hash,
)
from .pos import (
    ObjectInfo,
    WalPos,
    catchup_info,
    new_generation_id,
    segment_info,
    snapshot_info,
)
from .spool import Spool
from .wal import (
    FRAME_HEADER_SIZE,
    WAL_HEADER_SIZE,
    WAL_MAGIC_BE,
    WAL_MAGIC_LE,
    WAL_VERSION,
    ScanResult,
    WalHeader,
    frame_offset,
    frame_size,
    pread_full,
    read_wal_header,
    scan_bytes,
    scan_frames,
    verify_frames,
)

log = logging.getLogger("replicator.db")

DEFAULT_CHECKPOINT_PAGES = 1000
DEFAULT_BUSY_TIMEOUT = 1.0
CATCH_UP_REASONS = (Reason.RESUME_FAILED, Reason.WAL_RESET, Reason.WAL_SHRUNK)
"""Why a catch-up is written: the intervals the capture did not observe."""
SEGMENT_MAX_FRAMES = 2048
STEP_BATCHES = 16
SNAPSHOT_LOG_EVERY = 5.0  # a long snapshot logs its progress this often (INFO)
COPY_CHUNK_FRAMES = 256
ROTATE_WAIT = 0.02
# Segments are zstd-compressed up to this many bytes of frames per second (a few percent of a
# CPU core); past it (a write burst), and whenever the capture is behind, they are stored as they
# are: compression must not cost the application its CPU, nor keep the WAL from resetting.
COMPRESS_BUDGET = 8 << 20
RESCUE_MAX_BYTES = 8 << 20
ROTATE_POLL = 0.0002
PIN_RETRY = 0.00005
_MASK32 = 0xFFFFFFFF
_SHM_READ = 136
_NO_RESET = -1

# a proven tail of an old epoch, and its frames when they were read into memory
_Rescued = tuple[ScanResult, memoryview | None]



@dataclass(frozen=True, slots=True)
class TxnSpan:
    """One committed transaction in the WAL: its first and commit frame, the database size
    after it (pages) and the running checksum after its commit frame."""

    first: int
    commit: int
    db_size: int
    checksum: tuple[int, int]

    @property
    def frames(self) -> int:
        """How many frames it wrote."""
        return self.commit - self.first + 1


@dataclass
class ScanBatch:
    """What ``Database._scan_batch`` found: whole transactions, whether more may follow, why
    the scan stopped, and the frames as read and verified (None when they were not kept)."""

    txns: list[TxnSpan]
    more: bool
    stop: str
    data: memoryview | None


def _spans(first: int, scan: ScanResult) -> list[TxnSpan]:
    """The transactions of a scan that started at frame ``first``."""
    out = []
    for (_, commit, size), ck in zip(scan.transactions, scan.commit_checksums, strict=True):
        out.append(TxnSpan(first, commit, size, ck))
        first = commit + 1
    return out


@dataclass(frozen=True)
class Tuning:
    """How capture trades latency, memory and CPU; the defaults are the module constants of the
    same names (tests shrink them to reach edge cases quickly)."""

    segment_max_frames: int = SEGMENT_MAX_FRAMES
    step_batches: int = STEP_BATCHES
    compress_budget: int = COMPRESS_BUDGET
    snapshot_log_every: float = SNAPSHOT_LOG_EVERY


DEFAULT_TUNING = Tuning()


@dataclass
class CaptureResult:
    """What one capture step produced."""

    objects: list[ObjectInfo] = field(default_factory=list)
    transactions: int = 0
    frames: int = 0
    new_generation: str | None = None
    catch_up: Reason | None = None  # a catch-up object was written, and why
    rotated: bool = False
    more: bool = False  # the step stopped with committed frames still to capture


@dataclass(frozen=True)
class _Lineage:
    """Why a snapshot is taken and, for a generation's first, where the previous one ended."""

    reason: Reason
    generation: str | None = None
    txid: int | None = None
    confirmed_ns: int | None = None


def _pseudo_header(pos: WalPos, page_size: int, big_endian: bool) -> WalHeader:
    magic = WAL_MAGIC_BE if big_endian else WAL_MAGIC_LE
    return WalHeader(
        magic, WAL_VERSION, page_size, 0, pos.salt1, pos.salt2, pos.checksum[0], pos.checksum[1],
        b"",
    )


class Database:
    """One watched database. Its methods are blocking: call them from one worker thread."""

    def __init__(
        self,
        path: str,
        spool: Spool,
        *,
        name: str | None = None,
        checkpoint_pages: int = DEFAULT_CHECKPOINT_PAGES,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> None:
        self.path = os.path.abspath(path)
        self.name = name or path
        self.spool = spool
        self.checkpoint_pages = checkpoint_pages
        self.busy_timeout = busy_timeout
        self.tuning = tuning
        self.generation: str | None = None
        self.txid = 0
        self.pos: WalPos | None = None
        self.page_size = 0
        self.big_endian = False
        self.last_snapshot_ns = 0
        self.last_snapshot_txid = -1
        self.last_snapshot_seconds = 0.0
        self.last_snapshot_size = 0
        # every transaction committed before this time has been captured (0: unknown)
        self.confirmed_ns = 0
        self.checkpoints: dict[str, int] = {}
        self._last_end: WalPos | None = None
        self._conns: list[sqlite3.Connection] = []
        self._ckpt: sqlite3.Connection | None = None
        self._active = 0
        self._pinned = False
        self._reset_end: int | None = None  # see _learn_reset_bound
        self._reset_salts: tuple[int, int] | None = None
        self._wal_fd: int | None = None
        self._wal_ino: int | None = None
        self._wal_size_seen = 0  # WAL size at the last capture (for the shrink check)
        self._shm_fd: int | None = None
        self._db_fd: int | None = None
        self._db_ino: int | None = None
        self._pending: Reason | None = None
        self._catchup: Reason | None = None  # a catch-up is due (a restart that cannot resume)
        # the database file's (inode, size, mtime) before the last state read, and when
        # capture continues from a state without a WAL, that state's (see _set_position)
        self._state_sig: tuple[int, int, int] | None = None
        self._nowal_sig: tuple[int, int, int] | None = None
        self._db_dev = 0
        self.keeper = IndexKeeper(spool)
        self._last_observed_ns = 0  # when the last captured state was observed
        # resumed from the WAL: (watched until, watching again since), for the next segment
        self._resumed: tuple[int, int] | None = None
        # a tail read right after a reset seen while rotating: (new salts, _rescue's result)
        self._early_tail: tuple[tuple[int, int], _Rescued | None] | None = None
        self._compress_tokens = float(tuning.compress_budget)
        self._compress_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    @property
    def wal_path(self) -> str:
        """The ``-wal`` file."""
        return self.path + "-wal"

    def open(self) -> None:
        """Check the database, open the connections, take the first pin and resume (or plan a
        new generation) from the spool."""
        self._check_file()
        self._connect()
        self._pin(0)
        self.spool.remove_temp_files()
        self._resume()

    @property
    def state_path(self) -> str:
        """Where a clean shutdown records how far the database was watched."""
        return os.path.join(self.spool.root, "state.json")

    def close(self, tidy: bool = True) -> None:
        """Release the pin, close connections and files; record how far the database was
        watched, so a later generation can tell that nothing happened in between. With
        ``tidy`` false the read-write connection always closes first, so that the WAL stays
        as it is (a parked database opens again from it)."""
        if self._conns and self.generation is not None and self.confirmed_ns:
            state = {"generation": self.generation, "txid": self.txid,
                     "confirmed_ns": self.confirmed_ns}
            try:
                with atomic_writer(self.state_path) as f:
                    f.write(json.dumps(state).encode())
            except OSError as exc:
                log.warning("%s: cannot record the shutdown position: %s", self.name, exc)
        if self._conns and self.generation is not None:
            try:
                self.keeper.save(self._stamp())
            except OSError as exc:
                log.warning("%s: cannot save the page index: %s", self.name, exc)
        ckpt = [self._ckpt] if self._ckpt is not None else []
        try:
            has_frames = os.stat(self.wal_path).st_size > WAL_HEADER_SIZE
        except OSError:
            has_frames = False
        # with frames in the WAL the read-write connection closes first, so that closing last
        # cannot checkpoint and delete the WAL a restart resumes from; with none, it closes
        # last and SQLite tidies the empty -wal/-shm away if nobody else has the database open
        for c in (ckpt + self._conns) if has_frames or not tidy else (self._conns + ckpt):
            try:
                if c.in_transaction:
                    c.execute("COMMIT")
                c.close()
            except sqlite3.Error:
                pass
        self._conns = []
        self._ckpt = None
        self._pinned = False
        # only now, with every connection closed, may this process close its other descriptors
        # on the database and -shm files (closing one drops all the process's POSIX locks)
        for attr in ("_wal_fd", "_shm_fd", "_db_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)

    def _check_file(self) -> None:
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseError(f"database {self.path} does not exist") from None
        except OSError as exc:
            raise DatabaseError(f"database {self.path}: {exc.strerror}") from None
        if not os.path.isfile(self.path):
            raise DatabaseError(f"database {self.path} is not a regular file")
        try:
            self._db_fd = os.open(self.path, os.O_RDONLY)
        except PermissionError:
            raise DatabaseError(f"database {self.path}: permission denied") from None
        hdr = read_db_header(self.path, self._db_fd)
        if hdr is not None and not hdr.wal_mode:
            os.close(self._db_fd)
            self._db_fd = None
            raise DatabaseError(
                f"database {self.path} is not in WAL mode; enable it once with "
                f"sqlite3 {self.path} 'PRAGMA journal_mode=WAL' (the setting is persistent)"
            )
        st = os.fstat(self._db_fd)
        self._db_ino, self._db_dev = st.st_ino, st.st_dev

    def _open_conn(self, mode: str) -> sqlite3.Connection:
        return sqlite3.connect(
            f"file:{self.path}?mode={mode}", uri=True, isolation_level=None,
            check_same_thread=False, timeout=self.busy_timeout if mode == "rw" else 0,
        )

    def _connect(self) -> None:
        """One read-write connection, used only for PASSIVE checkpoints, and two read-only ones
        for the pins. At shutdown the read-write one closes first: a read-only connection that
        closes last cannot checkpoint and delete the WAL, so a restart can still prove
        continuity from it."""
        try:
            self._ckpt = self._open_conn("rw")
            mode = self._ckpt.execute("PRAGMA journal_mode").fetchone()[0]
            # the first read creates -wal and -shm, which read-only connections need
            self._ckpt.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            self._conns = [self._open_conn("ro") for _ in range(2)]
        except sqlite3.Error as exc:
            raise DatabaseError(f"database {self.path}: {exc}") from None
        if str(mode).lower() != "wal":
            raise DatabaseError(
                f"database {self.path} is in journal_mode={mode}, not WAL; enable it once with "
                f"sqlite3 {self.path} 'PRAGMA journal_mode=WAL' (the setting is persistent)"
            )
        if self.page_size == 0:
            self.page_size = int(self._ckpt.execute("PRAGMA page_size").fetchone()[0])

    # ------------------------------------------------------------------ pins

    def _begin_read(self, c: sqlite3.Connection) -> None:
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

    def _pin(self, idx: int) -> None:
        self._begin_read(self._conns[idx])
        self._active = idx
        self._pinned = True
        self._learn_reset_bound()

    def _unpin(self) -> None:
        self._conns[self._active].execute("COMMIT")
        self._pinned = False
        self._reset_end = None
        self._reset_salts = None

    def _read_shm(self) -> tuple[bytes, int, int] | None:
        """(salt bytes, mxFrame, nBackfill) from a consistent read of the wal-index, or None."""
        if self._shm_fd is None:
            try:
                self._shm_fd = os.open(self.path + "-shm", os.O_RDONLY)
            except OSError:
                return None
        for _ in range(8):
            raw = os.pread(self._shm_fd, _SHM_READ, 0)
            if len(raw) < _SHM_READ:
                return None
            if raw[:48] == raw[48:96] and raw[12] == 1:
                mx = int.from_bytes(raw[16:20], sys.byteorder)
                nb = int.from_bytes(raw[96:100], sys.byteorder)
                return raw[32:40], mx, nb
        return None

    def _learn_reset_bound(self) -> None:
        """Right after pinning: where can the current epoch still be reset?

        With salts unchanged and the WAL fully backfilled (mxFrame == nBackfill == X) the epoch can
        only reset at exactly X (any append would need a backfill our pin blocks). With
        nBackfill < mxFrame no reset can happen while this pin is held.
        """
        self._reset_end = None
        self._reset_salts = None
        if self.pos is None:
            return
        shm = self._read_shm()
        if shm is None:
            return
        salts, mx, nb = shm
        if salts != struct.pack(">II", self.pos.salt1, self.pos.salt2):
            return
        self._reset_salts = self.pos.salts
        self._reset_end = mx if nb == mx else _NO_RESET

    # ------------------------------------------------------------------ files

    def _wal(self) -> int | None:
        """An open fd on the current -wal file (reopened if it was replaced), or None."""
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            return None
        if self._wal_fd is not None and st.st_ino != self._wal_ino:
            os.close(self._wal_fd)
            self._wal_fd = None
        if self._wal_fd is None:
            self._wal_fd = os.open(self.wal_path, os.O_RDONLY)
            self._wal_ino = os.fstat(self._wal_fd).st_ino
            self._wal_size_seen = 0
        return self._wal_fd

    def sizes(self) -> tuple[int, int]:
        """(database file size, WAL file size) in bytes."""
        out = []
        for p in (self.path, self.wal_path):
            try:
                out.append(os.stat(p).st_size)
            except OSError:
                out.append(0)
        return out[0], out[1]

    def _check_identity(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseError(f"database {self.path} disappeared") from None
        if st.st_ino != self._db_ino:
            log.warning("%s: database file was replaced; reopening", self.name)
            self.close()
            self._check_file()
            self._connect()
            self._pin(0)
            self._pending = Reason.DB_REPLACED
            return
        hdr = read_db_header(self.path, self._db_fd)
        if hdr is not None and not hdr.wal_mode:
            raise DatabaseError(f"database {self.path} left WAL mode; replication is paused")

    # ------------------------------------------------------------------ resume

    def watched_while_closed(self) -> None:
        """Its file was watched while it was closed (parked), so the transactions a resume from
        the WAL finds were not missed: the next segment records no unobserved interval."""
        self._resumed = None

    def _stamp(self) -> Stamp:
        assert self.generation is not None
        return Stamp(self.generation, self.txid, self._db_dev, self._db_ino or 0)

    def _resume(self) -> None:
        """Continue the spool's generation: from its last position if the WAL still holds it,
        else with a catch-up of the pages that changed. A new generation starts only without a
        trustworthy page index or with another database file."""
        latest = self.spool.latest()
        if latest is None:
            self._pending = Reason.NO_POSITION
            return
        info, header = latest
        try:
            with open(self.state_path, "rb") as f:
                state = json.loads(f.read())
            if (state.get("generation"), state.get("txid")) == (info.generation, info.end_txid):
                self.confirmed_ns = int(state["confirmed_ns"])
            os.unlink(self.state_path)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.generation = info.generation
        self.txid = info.end_txid
        try:
            self.keeper.load(info.generation, info.end_txid, self._db_dev, self._db_ino or 0)
        except IndexUnusable as exc:
            replaced = "another database file" in str(exc)
            log.warning("%s: cannot continue generation %s: %s", self.name, info.generation, exc)
            self._pending = Reason.DB_REPLACED if replaced else Reason.NO_INDEX
            return
        pos: WalPos | None
        if isinstance(header, SegmentHeader):
            pos, observed = header.end, header.txns[-1].observed_ns
        else:
            pos, observed = header.position, header.ts_ns
        self._last_observed_ns = max(observed, self.confirmed_ns)
        self.pos = pos
        self._last_end = pos
        self.page_size = header.page_size
        self.big_endian = header.big_endian
        for obj in reversed(self.spool.objects(info.generation)):
            if obj.kind == "snapshot":
                self.last_snapshot_ns = obj.last_ms * 1_000_000
                self.last_snapshot_txid = obj.end_txid
                break
        if self._continues(pos, header.page_size):
            self._resumed = (self._last_observed_ns, time.time_ns())
            self._learn_reset_bound()
            log.info(
                "%s: resuming generation %s at txid %d", self.name, self.generation, self.txid
            )
        else:
            self._catchup = Reason.RESUME_FAILED

    def _continues(self, pos: WalPos | None, page_size: int) -> bool:
        """Whether the WAL still holds the frame the spool ends at (same salts and checksum)."""
        if pos is None:
            return False
        fd = self._wal()
        hdr = read_wal_header(fd) if fd is not None else None
        if hdr is None or hdr.salts != pos.salts or hdr.page_size != page_size:
            return False
        if pos.frame == 0:
            return hdr.checksum == pos.checksum
        raw = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(pos.frame, page_size))  # type: ignore[arg-type]
        if len(raw) < FRAME_HEADER_SIZE:
            return False
        return struct.unpack(">IIII", raw[8:24]) == (*pos.salts, *pos.checksum)

    # ------------------------------------------------------------------ the step

    def step(self) -> CaptureResult:
        """Capture committed transactions not yet captured (a bounded number of batches:
        ``more`` in the result says whether some are still waiting); start a generation or rotate
        the pin when needed. Safe to call at any time; does nothing when nothing changed."""
        res = CaptureResult()
        started = time.time_ns()
        self._check_identity()
        if not self._pinned:
            self._pin(self._active)
        if self._pending is not None:
            reason, self._pending = self._pending, None
            self._catchup = None
            self._start_generation(reason, res)
        if self._catchup is not None:
            reason, self._catchup = self._catchup, None
            self._catch_up(reason, res)
        more = self._capture(res)
        for _ in range(self.tuning.step_batches):
            due = self.pos is not None and self.pos.frame >= self.checkpoint_pages
            if due and not res.rotated and (not more or self._backlog_small()):
                self._rotate(res)
                res.rotated = True
            elif more:
                # behind a writer faster than the capture: no reset is safe now (the new epoch
                # could overtake the uncaptured tail), but a fresh pin lets the application's
                # own checkpoints backfill everything already captured
                self._handover()
            else:
                break
            more = self._capture(res)
        res.more = more
        if not more:
            self.confirmed_ns = started
        if self.generation is not None:
            self.keeper.save_if_due(self._stamp())
        return res

    def _capture(self, res: CaptureResult) -> bool:
        """Capture one batch of committed transactions; True if more are waiting."""
        fd = self._wal()
        hdr = read_wal_header(fd) if fd is not None else None
        if self.pos is None and self._nowal_changed():
            # the state had no WAL, and the file changed since: frames were written and
            # checkpointed (the WAL perhaps gone or restarted) in a moment no pin was held
            self._catch_up(Reason.WAL_SHRUNK, res)
            return False
        if hdr is None or fd is None:
            if self.pos is not None and self.pos.frame > 0 and (
                fd is None or os.fstat(fd).st_size < WAL_HEADER_SIZE
            ):
                # truncated (wal_checkpoint(TRUNCATE)) in a moment the pin was not held: what
                # was committed after the captured position is in the database file only now
                self._catch_up(Reason.WAL_SHRUNK, res)
            return False
        if hdr.page_size != self.page_size:
            self._start_generation(Reason.PAGE_SIZE, res)
            return False
        if self.pos is None:
            return self._ship(fd, hdr, WalPos(hdr.salt1, hdr.salt2, 0, hdr.checksum), res)
        if hdr.salts == self.pos.salts:
            return self._ship(fd, hdr, self.pos, res)
        early, self._early_tail = self._early_tail, None
        if early is not None and early[0] == hdr.salts:
            rescued = early[1]
        else:
            rescued = self._rescue(fd, hdr)
        if rescued is None:
            self._catch_up(Reason.WAL_RESET, res)
            return False
        tail, data = rescued
        old_hdr = _pseudo_header(self.pos, self.page_size, self.big_endian)
        if tail.transactions:
            txns = _spans(self.pos.frame + 1, tail)
            n = (tail.end_index - self.pos.frame) * frame_size(self.page_size)
            self._emit(fd, old_hdr, self.pos, txns, res, compress=self._may_compress(n),
                       data=data)
        log.info(
            "%s: WAL restarted (checkpoint seq %d); continuity proven at frame %d",
            self.name, hdr.checkpoint_seq, tail.end_index,
        )
        self.big_endian = hdr.big_endian
        self.pos = WalPos(hdr.salt1, hdr.salt2, 0, hdr.checksum)
        self._learn_reset_bound()
        return self._ship(fd, hdr, self.pos, res)

    def _nowal_changed(self) -> bool:
        """Whether the database file changed since the state without a WAL was read."""
        return (self._nowal_sig is not None and self._db_fd is not None
                and _file_sig(self._db_fd) != self._nowal_sig)

    def _rescue(self, fd: int, new: WalHeader) -> _Rescued | None:
        """After a WAL reset: read the old epoch's tail and prove it is complete, or None.

        The tail is read once into memory when it is at most RESCUE_MAX_BYTES (always, after a
        rotation), so the frames written to the spool are the ones the proof was made on, however
        soon the new epoch overwrites them; a longer one is read again while copying, verified."""
        pos = self.pos
        assert pos is not None
        if new.salt1 != (pos.salt1 + 1) & _MASK32 or new.page_size != self.page_size:
            log.debug("%s: reset not proven: WAL reset %d times since frame %d, page size %d",
                      self.name, (new.salt1 - pos.salt1) & _MASK32, pos.frame, new.page_size)
            return None
        fs = frame_size(self.page_size)
        off = frame_offset(pos.frame + 1, self.page_size)
        before = os.pread(fd, fs, off)
        old = _pseudo_header(pos, self.page_size, self.big_endian)
        length = os.fstat(fd).st_size - off
        data: memoryview | None = None
        if length <= RESCUE_MAX_BYTES:
            buf = pread_full(fd, max(0, length), off)
            tail = scan_bytes(buf, old, pos.frame + 1, pos.checksum, keep_frames=False)
            data = memoryview(buf)[: (tail.end_index - pos.frame) * fs]
        else:
            tail = scan_frames(fd, old, pos.frame + 1, pos.checksum, keep_frames=False)
        after = os.pread(fd, fs, off)
        size = os.fstat(fd).st_size  # once the tail was read: has the file shrunk since?
        if self._reset_salts == pos.salts and self._reset_end is not None:
            if self._reset_end == tail.end_index:
                return tail, data
        untouched = len(before) == fs and before == after and after[8:16] != new.raw[16:24]
        # the tail must end on a frame that is there, or exactly at a frame boundary of a file
        # that has not shrunk: a journal_size_limit truncation at the new epoch's first commit
        # cuts the file at the limit (a partial frame) and could otherwise pass for the end
        ended = tail.stop_reason in ("salt", "checksum") or (
            tail.stop_reason == "eof" and size >= self._wal_size_seen
        )
        if untouched and ended:
            return tail, data
        # the capture had reached the old epoch's last frame, which was the file's last: the
        # file still ends right after it, has not shrunk, and that frame is still ours
        if (
            pos.frame > 0 and not before and not after and size == off
            and size >= self._wal_size_seen and not tail.transactions
        ):
            last = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(pos.frame, self.page_size))
            if len(last) == FRAME_HEADER_SIZE and struct.unpack(">IIII", last[8:24]) == (
                *pos.salts, *pos.checksum
            ):
                return tail, data
        log.debug(
            "%s: reset not proven: tail from %d stopped (%s) at %d, reset bound %s, "
            "slot untouched %s", self.name, pos.frame + 1, tail.stop_reason, tail.end_index,
            self._reset_end if self._reset_salts == pos.salts else None, untouched,
        )
        return None

    def _ship(self, fd: int, hdr: WalHeader, start: WalPos, res: CaptureResult) -> bool:
        """Capture the next batch of committed transactions after ``start`` in this epoch as one
        segment (memory stays bounded by the batch size, however long the WAL). True if more
        are waiting."""
        if self.pos is None or self.pos.salts != start.salts:
            self.pos = start
            self.big_endian = hdr.big_endian
        batch = self._scan_batch(fd, hdr, self.pos)
        txns = batch.txns
        if not txns and batch.stop == "short" and self.pos.frame > 0 and self._pinned:
            if os.fstat(fd).st_size < frame_offset(self.pos.frame + 1, self.page_size):
                self._catch_up(Reason.WAL_SHRUNK, res)
                return False
        self._wal_size_seen = os.fstat(fd).st_size
        if not txns:
            return False
        try:
            # behind the writer, compression would keep the capture behind (and the WAL from
            # resetting): store the frames as they are; they are compressed when it keeps up
            n = (txns[-1].commit - txns[0].first + 1) * frame_size(self.page_size)
            self._emit(fd, hdr, self.pos, txns, res,
                       compress=not batch.more and self._may_compress(n), data=batch.data)
        except WalError as exc:
            # the frames changed under the copy: the WAL was reset meanwhile; the next capture
            # sees the new epoch and proves (or not) that nothing was lost
            log.debug("%s: %s", self.name, exc)
            return True
        return batch.more

    def _scan_batch(self, fd: int, hdr: WalHeader, start: WalPos) -> ScanBatch:
        """Whole committed transactions after ``start``: about ``segment_max_frames`` frames of them
        (more only for a single larger transaction). The frames are kept as read and verified,
        except for a transaction longer than one batch (``data`` None), which is copied again
        in bounded chunks."""
        ps = self.page_size
        fs = frame_size(ps)
        idx, ck = start.frame + 1, start.checksum
        txn_first = idx
        txns: list[TxnSpan] = []
        window = True  # every transaction so far lies inside the one buffer read
        while True:
            buf = pread_full(fd, self.tuning.segment_max_frames * fs, frame_offset(idx, ps))
            r = scan_bytes(buf, hdr, idx, ck, keep_frames=False)
            reason = r.stop_reason
            if r.valid_end_index - idx + 1 == self.tuning.segment_max_frames:
                reason = "limit"
            elif not buf and os.fstat(fd).st_size < frame_offset(idx, ps):
                reason = "short"  # the file ends before the start slot: it shrank
            spans = _spans(txn_first, r)
            txns += spans
            txn_first = spans[-1].commit + 1 if spans else txn_first
            data = memoryview(buf)[: (r.end_index - idx + 1) * fs] if window else None
            if reason != "limit":
                return ScanBatch(txns, False, reason, data)
            if txns:
                return ScanBatch(txns, True, reason, data)
            # one transaction longer than the window: follow its chain, keeping nothing
            window = False
            idx, ck = r.valid_end_index + 1, r.valid_checksum

    def _emit(
        self,
        fd: int,
        hdr: WalHeader,
        start: WalPos,
        txns: list[TxnSpan],
        res: CaptureResult,
        compress: bool = True,
        data: memoryview | None = None,
    ) -> None:
        """Write transactions (consecutive, starting right after ``start``) to the spool as one
        segment (zstd-compressed, or stored as they are). ``data``: their frames, already read
        and verified; otherwise they are read again from the WAL."""
        observed = time.time_ns()
        assert self.generation is not None
        first, last = txns[0].first, txns[-1].commit
        end = WalPos(start.salt1, start.salt2, last, txns[-1].checksum)
        start_txid = self.txid + 1
        end_txid = self.txid + len(txns)
        ms = observed // 1_000_000
        info = segment_info(self.generation, start_txid, end_txid, ms, ms)
        # while pinned where no reset can happen, the frames cannot change under the copy;
        # otherwise (a reset is possible, or this is a rescued tail) verify them again
        verify = not (self._reset_end == _NO_RESET and self._reset_salts == start.salts)

        def body() -> Iterable[bytes | memoryview]:
            if data is not None:
                assert len(data) == (last - first + 1) * frame_size(self.page_size)
                return [data]
            return self._frames_body(fd, hdr, start, first, last, verify)

        # the page index follows the frames (read once more first for a long transaction):
        # the content hash after them goes into the header, which precedes them
        ix = self.keeper.index
        if ix is not None:
            ix.begin()
        try:
            if ix is not None:
                ix.apply_stream(body())
            header = self._segment_header(hdr, start, end, txns, observed,
                                          ix.content if ix is not None else None)
            info = self.spool.write(info, header, body(), DEFAULT_LEVEL if compress else None)
        except BaseException:
            if ix is not None:
                ix.rollback()
            raise
        if ix is not None:
            ix.commit()
        self._last_observed_ns = observed
        self._resumed = None
        self.txid = end_txid
        self.pos = end
        self._last_end = end
        res.objects.append(info)
        res.transactions += len(txns)
        res.frames += last - first + 1

    def _segment_header(
        self, hdr: WalHeader, start: WalPos, end: WalPos, txns: list[TxnSpan], observed: int,
        content: int | None,
    ) -> SegmentHeader:
        assert self.generation is not None
        start_txid = self.txid + 1
        return SegmentHeader(
            generation=self.generation,
            start_txid=start_txid,
            end_txid=self.txid + len(txns),
            page_size=self.page_size,
            big_endian=hdr.big_endian,
            prev=self._last_end,
            start=start,
            end=end,
            wal_header=hdr.raw if start.frame == 0 else None,
            frames=txns[-1].commit - txns[0].first + 1,
            txns=tuple(
                Txn(start_txid + k, observed, t.frames, t.db_size) for k, t in enumerate(txns)
            ),
            content_hash=content,
            unobserved_from_ns=self._resumed[0] if self._resumed else None,
            unobserved_to_ns=self._resumed[1] if self._resumed else None,
        )

    def _frames_body(
        self, fd: int, hdr: WalHeader, start: WalPos, first: int, last: int, verify: bool
    ) -> Iterator[bytes]:
        """Re-read frames first..last (verifying the chain again while copying, if asked)."""
        fs = frame_size(self.page_size)
        ck = start.checksum
        idx = first
        while idx <= last:
            n = min(COPY_CHUNK_FRAMES, last - idx + 1)
            buf = os.pread(fd, n * fs, frame_offset(idx, self.page_size))
            if len(buf) != n * fs:
                raise WalError(f"{self.wal_path}: frames {idx}.. vanished while copying")
            if verify:
                ck = verify_frames(buf, self.page_size, hdr.big_endian, start.salts, ck)
            yield buf
            idx += n

    def _may_compress(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of frames fit in the compression budget (a token bucket)."""
        now = time.monotonic()
        self._compress_tokens = min(
            self.tuning.compress_budget,
            self._compress_tokens + (now - self._compress_at) * self.tuning.compress_budget,
        )
        self._compress_at = now
        if nbytes > self._compress_tokens:
            return False
        self._compress_tokens -= nbytes
        return True

    def _backlog_small(self) -> bool:
        """Whether the uncaptured part of the epoch is at most half of what is captured: then a
        reset in the rotation window is safe to prove, since reading the tail back is much faster
        than the application can write the half of a new epoch that would overtake it."""
        fd = self._wal_fd
        if fd is None or self.pos is None:
            return False
        fs = frame_size(self.page_size)
        backlog = max(0, os.fstat(fd).st_size - frame_offset(self.pos.frame + 1, self.page_size))
        return backlog // fs <= self.pos.frame // 2

    def _handover(self) -> None:
        """Pin the newest snapshot on the other connection, then release the old pin: frames
        stay protected throughout."""
        other = 1 - self._active
        old = self._active
        self._begin_read(self._conns[other])
        self._conns[old].execute("COMMIT")
        self._active = other
        self._learn_reset_bound()

    def _rotate(self, res: CaptureResult) -> None:
        """Let the WAL reset: backfill while pinned, then release the pin only briefly.

        1. Pinned on the newest commit (a handover), a PASSIVE checkpoint backfills what the pin
           covers. It never waits for anyone, and pinned it may take as long as the disk needs
           (it ends with an fsync of the database). Then everything up to the end of the WAL is
           captured, still pinned: while a pin is held no reset can happen.
        2. Unpinned, the replicator only watches the wal-index, with nothing in between that can
           block (no checkpoint, no spool write). The application's next autocheckpoint
           backfills the rest and its next write resets the WAL. As soon as the WAL was reset,
           or is wholly backfilled (a pin taken then reads the database file alone and lets the
           reset through at exactly that frame), or after ``ROTATE_WAIT``, it pins again on the
           other connection. The application cannot fill a new epoch up to the frames written
           in that window and reset it again that fast; ``_rescue`` proves the old epoch's tail
           was read in full, or a new generation starts.
        """
        assert self.pos is not None and self._ckpt is not None
        self._handover()
        result = "error"
        try:
            row = self._ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            row = None
        if row is not None:
            # busy: the application is checkpointing right now, which serves as well
            result = "busy" if row[0] else "ok" if row[1] == row[2] else "partial"
        self.checkpoints[result] = self.checkpoints.get(result, 0) + 1
        fd = self._wal()
        old_salts = self.pos.salts
        for _ in range(self.tuning.step_batches):
            hdr = read_wal_header(fd) if fd is not None else None
            if hdr is None or fd is None or hdr.salts != old_salts:
                return  # cannot happen while pinned; the next capture sorts it out
            if not self._ship(fd, hdr, self.pos, res):
                break
        else:
            return  # the writer outpaces the capture: no reset now (see _backlog_small)
        other = 1 - self._active
        self._unpin()
        deadline = time.monotonic() + ROTATE_WAIT
        while time.monotonic() < deadline:
            hdr = read_wal_header(fd) if fd is not None else None
            if hdr is None or fd is None:
                break
            if hdr.salts != old_salts:
                # read the old epoch's tail at once, before the new epoch can reach it
                self._early_tail = (hdr.salts, self._rescue(fd, hdr))
                break
            shm = self._read_shm()
            if shm is not None and shm[1] == shm[2]:
                break
            time.sleep(ROTATE_POLL)
        self._pin(other)

    # ------------------------------------------------------------------ snapshots, catch-ups

    def _start_generation(self, reason: Reason, res: CaptureResult) -> None:
        prev_gen, prev_txid = self.generation, self.txid
        gen = new_generation_id()
        self.generation = gen
        self.txid = 0
        info, pos = self._write_snapshot(
            gen, 0, None, _Lineage(reason, prev_gen, prev_txid if prev_gen else None,
                                   self.confirmed_ns or None),
        )
        self._set_position(pos)
        self._learn_reset_bound()
        res.objects.append(info)
        res.new_generation = reason
        level = logging.INFO if reason == Reason.NO_POSITION else logging.WARNING
        log.log(level, "%s: new generation %s: %s", self.name, gen, reason.text)

    def snapshot(self) -> ObjectInfo:
        """Take a snapshot of the current position inside the current generation."""
        if not self._pinned:
            self._pin(self._active)
        assert self.generation is not None
        res = CaptureResult()
        self._capture(res)
        info, _ = self._write_snapshot(self.generation, self.txid, self.pos,
                                       _Lineage(Reason.INTERVAL))
        return info

    def _read_state(self, upto: WalPos | None = None) -> DbState:
        assert self._db_fd is not None
        self._state_sig = _file_sig(self._db_fd)  # before the read: a later write changes it
        return read_state(self.path, self._db_fd, self._wal(), self.page_size, upto)

    def _set_position(self, pos: WalPos | None) -> None:
        """Capture continues from ``pos``, the position of the state just read. Without a WAL
        (None) the database file alone is that state: remember it, so that a change reaching
        the file without frames this capture saw (written and checkpointed while no pin was
        held) is caught up rather than missed."""
        self.pos = pos
        self._last_end = pos
        self._nowal_sig = self._state_sig if pos is None else None

    def _write_snapshot(
        self, gen: str, txid: int, upto: WalPos | None, lineage: _Lineage
    ) -> tuple[ObjectInfo, WalPos | None]:
        """Write the state as of the pin (up to ``upto`` in the current epoch, or all of it)
        and make its page index the capture's. Its content hash comes from the capture's index
        when the snapshot continues a generation (and is checked against the pages written),
        else from a first reading of the pages."""
        for _ in range(5):
            state = self._read_state(upto)
            expect: int | None = None
            ix = self.keeper.index
            if lineage.reason == Reason.INTERVAL and ix is not None:
                expect = ix.content
            else:
                expect = content_hash_of(state)
            observed = time.time_ns()
            header = SnapshotHeader(
                generation=gen, txid=txid, ts_ns=observed, page_size=state.page_size,
                pages=state.pages, big_endian=state.hdr.big_endian if state.hdr else False,
                position=state.pos, reason=lineage.reason, db=self.name,
                previous_generation=lineage.generation, previous_txid=lineage.txid,
                previous_confirmed_ns=lineage.confirmed_ns, content_hash=expect,
            )
            started = time.monotonic()
            fresh = PageIndex(state.page_size)
            info = snapshot_info(gen, txid, observed // 1_000_000)
            info = self.spool.write(info, header, _indexed(state, fresh, self.name,
                                                           self.tuning.snapshot_log_every))
            fresh.resize(state.pages)
            moved = lineage.reason == Reason.INTERVAL and state.pos != upto
            if not state.still_valid() or fresh.content != expect or moved:
                self.spool.delete([info])
                if lineage.reason == Reason.INTERVAL and state.still_valid():
                    raise DatabaseError(f"{self.path}: the snapshot differs from the captured "
                                        "state (the WAL moved on); it is taken again later")
                continue
            self.keeper.index = fresh
            self.page_size = state.page_size
            if state.hdr is not None:
                self.big_endian = state.hdr.big_endian
            self.last_snapshot_ns = observed
            self.last_snapshot_txid = txid
            self.last_snapshot_seconds = time.monotonic() - started
            self.last_snapshot_size = info.size
            self._last_observed_ns = max(self._last_observed_ns, observed)
            self.keeper.save(Stamp(gen, txid, self._db_dev, self._db_ino or 0))
            return info, state.pos
        raise DatabaseError(f"{self.path}: the WAL kept resetting during the snapshot")

    def read_captured(self, sqls: Sequence[str]) -> list[list[tuple[Any, ...]]] | None:
        """The rows of each query, read in one transaction of a connection of its own that sees
        exactly the captured state (txid ``self.txid``); None if the application committed
        since the capture (capture again and retry)."""
        conn = self._open_conn("ro")
        try:
            conn.execute("PRAGMA query_only = ON")
            self._begin_read(conn)
            shm = self._read_shm()
            pos = self.pos
            if pos is None or shm is None or shm[1] != pos.frame or (
                shm[0] != struct.pack(">II", pos.salt1, pos.salt2)
            ):
                return None
            return [[tuple(r) for r in conn.execute(sql).fetchall()] for sql in sqls]
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
            conn.close()

    def checkpoint_truncate(self, timeout: float) -> tuple[int, int, int]:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` with the pin released (a blocking checkpoint:
        it holds the write lock while it waits up to ``timeout`` seconds for readers); returns
        SQLite's (busy, log, checkpointed). Capture first; the next step proves the WAL's
        continuity or starts a new generation."""
        if self._pinned:
            self._unpin()
        assert self._ckpt is not None
        ckpt = self._ckpt
        ckpt.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        try:
            row = ckpt.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            ckpt.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return int(row[0]), int(row[1]), int(row[2])

    def content_hash(self) -> tuple[str, int, str]:
        """``(generation, txid, SHA-256 of pages 1..n)`` of the captured state: the database
        file overlaid with the captured frames of the current epoch, read under the pin (what
        a restore to ``txid`` rebuilds, page for page). Call after a capture step."""
        if not self._pinned:
            self._pin(self._active)
        if self.generation is None:
            raise DatabaseError(f"{self.path}: nothing captured yet")
        state = self._read_state(self.pos)
        frames = state.pos.frame if state.pos is not None else 0
        captured = self.pos.frame if self.pos is not None else 0
        if (frames or captured) and state.pos != self.pos:
            raise DatabaseError(f"{self.path}: the WAL moved on since the capture")
        digest = hashlib.sha256()
        for _, chunk in state.chunks():
            digest.update(chunk)
        return self.generation, self.txid, digest.hexdigest()

    def _catch_up(self, reason: Reason, res: CaptureResult) -> None:
        """After an interval the capture could not observe (a restart, a reset it could not
        prove continuous): ship the pages that differ from the captured state, found by hashing
        the state as of the pin against the page index, as one catch-up object in the same
        generation; capture continues from the WAL position that state corresponds to."""
        ix = self.keeper.index
        if ix is None or self.generation is None:
            self._start_generation(Reason.NO_INDEX, res)
            return
        for _ in range(5):
            state = self._read_state()
            if state.page_size != self.page_size:
                self._start_generation(Reason.PAGE_SIZE, res)
                return
            changed: list[tuple[int, int]] = []
            for first, buf in state.chunks():
                changed += ix.diff(first, _pages_of(buf, state.page_size))
            info = self._write_catchup(reason, state, changed)
            if info is not None:
                res.objects.append(info)
                res.catch_up = reason
                return
        raise DatabaseError(f"{self.path}: the WAL kept resetting during the catch-up")

    def _write_catchup(
        self, reason: Reason, state: DbState, changed: list[tuple[int, int]]
    ) -> ObjectInfo | None:
        """Write the catch-up of ``changed`` pages (None if the state moved under the read)."""
        ix = self.keeper.index
        assert ix is not None and self.generation is not None
        observed = time.time_ns()
        since = max(self._last_observed_ns, self.confirmed_ns) or observed
        ix.begin()
        try:
            for pgno, value in changed:
                ix.set_hash(pgno, value)
            ix.resize(state.pages)
            header = CatchupHeader(
                generation=self.generation, txid=self.txid + 1, ts_ns=observed,
                unobserved_from_ns=since, page_size=state.page_size, pages=state.pages,
                big_endian=state.hdr.big_endian if state.hdr else self.big_endian,
                prev=self._last_end, position=state.pos, changed=len(changed),
                content_hash=ix.content, reason=reason,
            )
            info = catchup_info(self.generation, self.txid + 1, since // 1_000_000,
                                observed // 1_000_000)
            try:
                info = self.spool.write(info, header, _changed_body(state, changed))
            except _StateMoved:
                ix.rollback()
                return None
            if not state.still_valid():
                self.spool.delete([info])
                ix.rollback()
                return None
        except BaseException:
            ix.rollback()
            raise
        ix.commit()
        self.txid += 1
        self._set_position(state.pos)
        if state.hdr is not None:
            self.big_endian = state.hdr.big_endian
        self._last_observed_ns = observed
        self._resumed = None
        self._learn_reset_bound()
        self.keeper.save(self._stamp())
        log.warning(
            "%s: %s; caught up in generation %s at txid %d: %d of %d pages changed, unobserved "
            "for %.3f s", self.name, reason.text, self.generation, self.txid, len(changed),
            state.pages, (observed - since) / 1e9,
        )
        return info


def _file_sig(fd: int) -> tuple[int, int, int]:
    """(inode, size, mtime) of an open file: it changes with every write."""
    st = os.fstat(fd)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _StateMoved(Exception):
    """A page changed between the two readings of a catch-up (the WAL was reset meanwhile)."""


def _pages_of(buf: bytes | bytearray, page_size: int) -> list[memoryview]:
    mv = memoryview(buf)
    return [mv[k * page_size : (k + 1) * page_size] for k in range(len(buf) // page_size)]


def content_hash_of(state: DbState) -> int:
    """The content hash of a state (one reading of every page)."""
    h = 0
    for first, buf in state.chunks():
        for k, page in enumerate(_pages_of(buf, state.page_size)):
            h ^= page_hash(first + k, page)
    return h


def _indexed(state: DbState, index: PageIndex, name: str, every: float) -> Iterator[bytes]:
    """The state's pages as a snapshot body, entered into ``index`` as they go (a long one
    logs its progress every ``every`` seconds)."""
    logged = time.monotonic()
    for first, buf in state.chunks():
        if time.monotonic() - logged >= every:
            logged = time.monotonic()
            log.info("%s: snapshot %d%% (%d of %d pages)", name,
                     100 * (first - 1) // state.pages, first - 1, state.pages)
        index.set_pages(first, buf)
        yield bytes(buf)


def _changed_body(state: DbState, changed: list[tuple[int, int]]) -> Iterator[bytes]:
    """A catch-up body: each changed page with its number, read again and checked against the
    hash the first reading gave (raises _StateMoved if it differs)."""
    out = bytearray()
    for pgno, value in changed:
        page = state.page(pgno)
        if page_hash(pgno, page) != value:
            raise _StateMoved(pgno)
        out += pgno.to_bytes(CATCHUP_PGNO_SIZE, "big")
        out += page
        if len(out) >= 1 << 20:
            yield bytes(out)
            out.clear()
    if out:
        yield bytes(out)
