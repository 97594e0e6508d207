"""The watched database: read pins, checkpoints and change capture.

How frames are kept safe without ever blocking the application
---------------------------------------------------------------
SQLite overwrites WAL frames only when a writer *resets* the WAL, and it resets only when every
frame has been backfilled into the database file and no reader holds a read mark >= 1. The
replicator keeps one read transaction (a *pin*) open on one of its two connections at all times
but while idle (see below):

* a pin taken while the WAL holds unbackfilled frames has a read mark >= 1: no reset can happen;
* a pin taken while the WAL is fully backfilled uses read mark 0, which blocks all backfill: the
  WAL can then reset at most once, and only at the frame it had when the pin was taken. Held
  while the application writes on, it would make each of the application's autocheckpoints
  sort the whole WAL and fail, so the first step that finds frames of the new epoch moves the
  pin to a read mark >= 1 (a handover, see ``Handles.leave_mark0``): backfill then stops at the
  pin's frame, and the application's checkpoints end at once. While the database is idle such a
  pin is released altogether (``release_idle_pin``), so that a replicator paused or hung then
  holds nothing back; the next step pins again, and an unchanged database file proves that
  nothing was backfilled, hence nothing overwritten, in between.

So while pinned, every committed frame stays readable until captured. To keep the WAL small the
replicator *rotates*: when caught up and the epoch holds ``checkpoint_pages`` frames it releases
the pin, runs a PASSIVE checkpoint (never waits, never blocks a writer) and pins again on the
other connection. (Sooner is better for the application: while its WAL holds
``wal_autocheckpoint`` frames or more, each of its commits runs a checkpoint of its own.)
In that short window the application may reset the WAL. A reset is accepted as continuous only
when it is *proven* that no committed frame was lost:

* the wal-index (``-shm``) showed, when the pin was taken, that the epoch could only end at frame X
  and everything up to X was captured; or
* the slot after the last captured frame still holds the same pre-reset bytes before and after the
  old epoch's tail was read (the new epoch writes from slot 1 upwards, so it never reached the
  tail), the new epoch's salt-1 is exactly one more than the old one, and the tail ends on a
  frame that is there (older salts or a broken chain) or at a frame boundary of a WAL file that
  has not shrunk (a ``journal_size_limit`` truncation at the new epoch's first commit leaves a
  partial frame at the limit, which proves nothing).

A restart (or a parked database opening again) continues from the spool's last position when the
WAL still holds that frame. When the WAL was restarted, truncated or removed meanwhile, one more
proof applies: at a clean close the replicator records the database file's signature (inode,
size, modification and change times) when every committed frame was captured and the file was
last written over a second before (so any later write changes the signature). If the file still
has that signature when it opens again, nothing was backfilled into it in between, and a WAL
restart or removal needs every frame backfilled first: the old epoch ended where the capture
did, the database file holds the captured state, and the current WAL epoch, if any, holds
everything committed since; capture continues from its first frame.

Anything else (the replicator was down, two resets, the tail overwritten) is bridged in the same
generation by a catch-up: the pages that changed, found against the page index (see
:mod:`replicator.catchup`); a replaced file, a page-size change or a page index that cannot be
trusted starts a new generation with a snapshot. Nothing here takes a write lock or runs a
checkpoint mode that waits; SQLite work runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from .capture import Capture
from .catchup import CatchUp
from .dbstate import read_db_header
from .diffsnap import DEFAULT_DIFF_MAX
from .errors import DatabaseError
from .fsutil import atomic_writer, stat_or_none
from .handles import Handles, file_sig
from .headers import Reason, SegmentHeader
from .pageindex import IndexKeeper, IndexUnusable
from .pos import ObjectInfo, WalPos
from .progress import DEFAULT_TUNING as DEFAULT_TUNING
from .progress import CaptureResult as CaptureResult
from .progress import Progress, Shared, files_sig, stat_sig
from .progress import Tuning as Tuning
from .rescue import frame_is
from .retry import Deferral
from .sightings import SIGHTER, salt_bytes
from .snapshots import Lineage, Snapshots
from .spool import Spool
from .wal import FRAME_HEADER_SIZE, WAL_HEADER_SIZE, frame_offset, read_wal_header

log = logging.getLogger("replicator.db")

DEFAULT_CHECKPOINT_PAGES = 1000
DEFAULT_BUSY_TIMEOUT = 1.0
INDEX_SAVE_DEFER = 10.0
"""The periodic save of the page index waits at most this long (seconds) for a capture step
that found no commits (see :class:`replicator.retry.Deferral`)."""
CATCH_UP_REASONS = (Reason.RESUME_FAILED, Reason.WAL_RESET, Reason.WAL_SHRUNK)
"""Why a catch-up is written: the intervals the capture did not observe."""

T = TypeVar("T")
# a database file signature, the wal-index salts and mxFrame (see Database.step)
_Quiet = tuple[tuple[int, int, int], bytes, int]


class _InProgress(Generic[T]):
    """An attribute of :class:`Database` kept in its :class:`Progress` (read and written)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _InProgress[T]: ...
    @overload
    def __get__(self, obj: Database, objtype: type | None = None) -> T: ...
    def __get__(self, obj: Database | None, objtype: type | None = None) -> T | _InProgress[T]:
        if obj is None:
            return self
        value: T = getattr(obj.progress, self.name)
        return value

    def __set__(self, obj: Database, value: T) -> None:
        setattr(obj.progress, self.name, value)


FileSig = tuple[int, int, int, int]
"""(inode, size, modification time, change time) of the database file, times in ns."""

QUIET_AFTER_NS = 1_000_000_000
"""A file last written (or changed) this long ago gets another signature from any later write:
file systems keep these times at the granularity of a clock tick, a few milliseconds."""


@dataclass(frozen=True, slots=True)
class ClosedState:
    """What a clean close records in the spool's ``state.json``: the spool's last object then
    (generation, txid), how far the database was watched, and the database file's signature
    when it held every captured frame (:meth:`Database.close`)."""

    generation: str
    txid: int
    confirmed_ns: int
    db_sig: FileSig | None = None

    def encode(self) -> bytes:
        """The record as ``state.json`` holds it."""
        raw: dict[str, Any] = {"generation": self.generation, "txid": self.txid,
                               "confirmed_ns": self.confirmed_ns}
        if self.db_sig is not None:
            raw["db_sig"] = list(self.db_sig)
        return json.dumps(raw).encode()

    @classmethod
    def decode(cls, data: bytes) -> ClosedState:
        """Parse a stored record; raises ValueError, KeyError or TypeError if it is not one."""
        raw = json.loads(data)
        db_sig: FileSig | None = None
        if "db_sig" in raw:
            ino, size, mtime, ctime = (int(v) for v in raw["db_sig"])
            db_sig = (ino, size, mtime, ctime)
        return cls(str(raw["generation"]), int(raw["txid"]), int(raw["confirmed_ns"]), db_sig)


def _sig(st: os.stat_result) -> FileSig:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _quiet_sig(path: str) -> FileSig | None:
    """The file's signature, when it was last written over QUIET_AFTER_NS ago; else None."""
    st = stat_or_none(path)
    if st is None:
        return None
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < QUIET_AFTER_NS:
        return None
    return _sig(st)


class Database:
    """One watched database. Its methods are blocking: call them from one worker thread.

    It is the façade over the capture's collaborators, which share its :class:`Progress`:
    :class:`Handles` (connections, pin, files), :class:`Capture` (frames into segments, the
    rotation), :class:`Snapshots` and :class:`CatchUp`."""

    generation = _InProgress[str | None]()
    txid = _InProgress[int]()
    pos = _InProgress[WalPos | None]()
    page_size = _InProgress[int]()
    big_endian = _InProgress[bool]()
    last_snapshot_ns = _InProgress[int]()
    last_snapshot_txid = _InProgress[int]()
    last_snapshot_seconds = _InProgress[float]()
    last_snapshot_size = _InProgress[int]()
    confirmed_ns = _InProgress[int]()

    def __init__(
        self,
        path: str,
        spool: Spool,
        *,
        name: str | None = None,
        checkpoint_pages: int = DEFAULT_CHECKPOINT_PAGES,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        tuning: Tuning = DEFAULT_TUNING,
        own_spool: bool = False,
    ) -> None:
        self.path = os.path.abspath(path)
        self.own_spool = own_spool
        """:meth:`open` claims the spool for this process (:meth:`Spool.claim`) once the
        database file is found good; it is released by whoever owns the spool."""
        self.name = name or path
        self.spool = spool
        self.checkpoint_pages = checkpoint_pages
        self.tuning = tuning
        self.progress = Progress()
        self.handles = Handles(self.path, self.progress, busy_timeout)
        self.keeper = IndexKeeper(spool)
        shared = Shared(self.name, self.progress, self.handles, spool, self.keeper, tuning)
        self.snapshots = Snapshots(shared)
        self.catchup = CatchUp(shared, self.snapshots)
        self.capture = Capture(shared, self.snapshots, self.catchup)
        self.checkpoints = self.capture.checkpoints
        """PASSIVE checkpoints run by rotations, by result (the caller counts and clears)."""
        self._pending: Reason | None = None  # a new generation is due
        self._catchup: Reason | None = None  # a catch-up is due (a restart that cannot resume)
        # (database file signature, wal-index salts and mxFrame) at the start or the end of the
        # last step, when that step captured everything: while all stay the same there is
        # nothing to do
        self._settled: _Quiet | None = None
        self._settled_wal_size = 0  # the WAL's size at the end of the last step
        self.settled_at = 0.0
        """``time.monotonic()`` just before the signature that showed everything captured was
        read, by the last step (0: that step did not settle): a change made before this moment
        (a file event handled before it) needs no further step."""
        self._index_wait = Deferral(INDEX_SAVE_DEFER)
        # (database file signature, captured position) when an idle pin was released
        self._released: tuple[FileSig, WalPos] | None = None
        self.closed: ClosedState | None = None
        """What the last :meth:`close` recorded (None: nothing)."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def wal_path(self) -> str:
        """The ``-wal`` file."""
        return self.handles.wal_path

    def open(self, closed_by: Database | None = None) -> None:
        """Check the database, open the connections, take the first pin and resume (or plan a
        new generation) from the spool.

        ``closed_by``: this process's earlier :class:`Database` of the same file and spool,
        closed since (a parked database opening again). The spool stayed claimed in between,
        so no crash left temp files in it, and what that close recorded is taken from memory
        rather than read back from ``state.json`` (the file stays: it describes the spool's
        last object, and a record that no longer does is ignored)."""
        self.handles.check_file()
        if self.own_spool:
            self.spool.claim(self.name)  # before anything of the spool is read or written
        self.handles.connect()
        self.handles.pin(0)
        if closed_by is None:
            self.spool.remove_temp_files()
            self.closed = None  # the record on disk is read and consumed (:meth:`_resume`)
        else:
            self.closed = closed_by.closed
        self._resume(reopened=closed_by is not None)

    @property
    def state_path(self) -> str:
        """Where a clean shutdown records how far the database was watched."""
        return os.path.join(self.spool.root, "state.json")

    def close(self, tidy: bool = True) -> None:
        """Release the pin, close connections and files; record how far the database was
        watched, so a later generation can tell that nothing happened in between. With
        ``tidy`` false the read-write connection always closes first, so that the WAL stays
        as it is (a parked database opens again from it)."""
        # the generation to record (None: nothing to record)
        gen = self.generation if self.handles.conns and self.confirmed_ns else None
        captured = self._captured_file_sig() if gen is not None else None
        if self.handles.conns and self.generation is not None:
            try:
                self.keeper.save(self.snapshots.stamp())
            except OSError as exc:
                log.warning("%s: cannot save the page index: %s", self.name, exc)
        self.handles.close(tidy)
        self._settled = None
        self.settled_at = 0.0
        if gen is None:
            return
        state = ClosedState(gen, self.txid, self.confirmed_ns,
                            captured if captured is not None
                            and _quiet_sig(self.path) == captured else None)
        if state == self.closed:
            return  # recorded by the last close, and the file still says so
        try:
            with atomic_writer(self.state_path) as f:
                f.write(state.encode())
        except OSError as exc:
            log.warning("%s: cannot record the shutdown position: %s", self.name, exc)
            return
        self.closed = state

    def all_captured(self, backfilled: bool = False) -> bool:
        """Whether every committed frame is captured: the wal-index ends at the captured frame
        (wholly backfilled if ``backfilled``), or there is no WAL and the file is the state the
        capture last read (blocking)."""
        p = self.progress
        shm = self.handles.read_shm()
        if p.pos is None:
            if p.nowal_sig is None or self.capture.nowal_changed():
                return False
            frames = shm[1] if shm is not None else self.handles.sizes()[1] - WAL_HEADER_SIZE
            return frames <= 0
        return not (shm is None or shm[0] != salt_bytes(p.pos.salts) or shm[1] != p.pos.frame
                    or (backfilled and shm[2] != shm[1]))

    def _captured_file_sig(self, backfilled: bool = False) -> FileSig | None:
        """Before closing (or releasing an idle pin): the database file's signature when every
        committed frame is captured (:meth:`all_captured`) and the file was last written long
        enough ago; else None."""
        sig = _quiet_sig(self.path)
        if sig is None or not self.all_captured(backfilled):
            return None
        return sig

    def sizes(self) -> tuple[int, int]:
        """(database file size, WAL file size) in bytes."""
        return self.handles.sizes()

    def _check_identity(self, st: os.stat_result | None) -> None:
        """Whether the file is still the one open (``st``: its stat just taken, if any)."""
        try:
            if st is None:
                st = os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseError(f"database {self.path} disappeared") from None
        if st.st_ino != self.handles.db_ino:
            log.warning("%s: database file was replaced; reopening", self.name)
            self.close()
            self.handles.check_file()
            self.handles.connect()
            self.handles.pin(0)
            self._pending = Reason.DB_REPLACED
            return
        hdr = read_db_header(self.path, self.handles.db_fd, st.st_size)
        if hdr is not None and not hdr.wal_mode:
            raise DatabaseError(f"database {self.path} left WAL mode; replication is paused")

    # ------------------------------------------------------------------ resume

    def watched_while_closed(self) -> None:
        """Its file was watched while it was closed (parked), so the transactions a resume from
        the WAL finds were not missed: the next segment records no unobserved interval."""
        self.progress.resumed = None

    def _resume(self, reopened: bool = False) -> None:
        """Continue the spool's generation: from its last position if the WAL still holds it,
        else with a catch-up of the pages that changed. A new generation starts only without a
        trustworthy page index or with another database file. ``reopened``: what the last
        close recorded is :attr:`closed` (see :meth:`open`)."""
        latest = self.spool.latest()
        if latest is None:
            self._pending = Reason.NO_POSITION
            return
        info, header = latest
        p = self.progress
        closed = self.closed if reopened else self._read_closed_state()
        closed_sig: FileSig | None = None
        if closed is not None and (closed.generation, closed.txid) == (info.generation,
                                                                      info.end_txid):
            p.confirmed_ns = closed.confirmed_ns
            closed_sig = closed.db_sig
        p.generation = info.generation
        p.txid = info.end_txid
        try:
            self.keeper.load(info.generation, info.end_txid, self.handles.db_dev,
                             self.handles.db_ino or 0)
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
        p.last_observed_ns = max(observed, p.confirmed_ns)
        p.pos = pos
        p.last_end = pos
        p.page_size = header.page_size
        p.big_endian = header.big_endian
        for obj in reversed(self.spool.objects(info.generation)):
            if obj.kind == "snapshot":
                p.last_snapshot_ns = obj.last_ms * 1_000_000
                p.last_snapshot_txid = obj.end_txid
                break
        if self._continues(pos, header.page_size):
            p.resumed = (p.last_observed_ns, time.time_ns())
            self.handles.learn_reset_bound()
            log.info("%s: resuming generation %s at txid %d", self.name, p.generation, p.txid)
        elif closed_sig is not None and self._file_as_captured(closed_sig, pos):
            # the WAL restarted (or went) while closed (module docstring)
            self._from_current_epoch()
            p.resumed = (p.last_observed_ns, time.time_ns())
            log.info("%s: resuming generation %s at txid %d (the WAL restarted while closed; "
                     "the database file is as captured)", self.name, p.generation, p.txid)
        else:
            self._catchup = Reason.RESUME_FAILED

    def _read_closed_state(self) -> ClosedState | None:
        """What a clean close recorded (None: nothing readable); the record is consumed."""
        closed: ClosedState | None = None
        try:
            with open(self.state_path, "rb") as f:
                closed = ClosedState.decode(f.read())
        except FileNotFoundError:
            return None  # no record: nothing to consume
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            os.unlink(self.state_path)
        except OSError:
            pass
        return closed

    def _from_current_epoch(self) -> None:
        """The database file is the captured state: capture continues from the current WAL
        epoch's first frame (or from the WAL the application creates next)."""
        assert self.handles.db_fd is not None
        self.progress.pos = None
        self.progress.nowal_sig = file_sig(self.handles.db_fd)

    def _file_as_captured(self, closed_sig: FileSig, pos: WalPos | None) -> bool:
        """Whether the database file still has the signature a clean close recorded, and the
        WAL is not the epoch the capture ended in (that one resumes, or is caught up)."""
        fd = self.handles.db_fd
        if fd is None or _sig(os.fstat(fd)) != closed_sig:
            return False
        wal = self.handles.wal()
        hdr = read_wal_header(wal) if wal is not None else None
        return pos is None or hdr is None or hdr.salts != pos.salts

    def _continues(self, pos: WalPos | None, page_size: int) -> bool:
        """Whether the WAL still holds the frame the spool ends at (same salts and checksum)."""
        if pos is None:
            return False
        fd = self.handles.wal()
        if fd is None:
            return False
        hdr = read_wal_header(fd)
        if hdr is None or hdr.salts != pos.salts or hdr.page_size != page_size:
            return False
        if pos.frame == 0:
            return hdr.checksum == pos.checksum
        return frame_is(fd, pos, page_size)

    # ------------------------------------------------------------------ the step

    def step(self) -> CaptureResult:
        """Capture committed transactions not yet captured (a bounded number of batches:
        ``more`` in the result says whether some are still waiting); start a generation or rotate
        the pin when needed. Safe to call at any time; does nothing when nothing changed."""
        res = CaptureResult()
        started = time.time_ns()
        look = time.monotonic()
        # one look at the database file serves the signature, the identity check and its size
        st = stat_or_none(self.path)
        seen = self._quiet_signature(st)
        if seen is not None and seen == self._settled:
            self.confirmed_ns = started  # nothing committed since a step that captured all
            self.settled_at = look
            if self.generation is not None:
                self.keeper.save_if_due(self.snapshots.stamp())
            # the file's size is in the signature; the WAL's grows only with frames of the
            # current epoch, which the signature excludes
            res.sizes = (seen[0][1], self._settled_wal_size)
            return res
        self._settled = None
        self.settled_at = 0.0
        with SIGHTER.watching(self.handles.sightings):
            self._step(res, started, st)
        fresh = False
        if not res.more:
            # the file event of a commit's last frame usually wakes the next step, which finds
            # nothing more: a signature read now, after the capture, lets that step end at once
            # (the one read first showed this commit's frames unannounced yet, so it cannot),
            # or lets the loop know it need not run (see settled_at)
            fresh = seen is None
            if fresh:
                # both files first, then the wal-index: what the stats show is captured if
                # the signature shows everything captured
                look = time.monotonic()
                st = stat_or_none(self.path)
                wal_st = stat_or_none(self.wal_path)
                seen = self._quiet_signature(st)
            self._settled = self._settles(seen)
            if self._settled is not None:
                self.settled_at = look
                if fresh:
                    res.looked = files_sig(st, wal_st)
        # here, on a worker: a stat may wait on the disk
        if fresh:
            wal_size = wal_st.st_size if wal_st is not None else 0
        else:
            wal_size = self.handles.sizes()[1]
        res.sizes = (st.st_size if st is not None else 0, wal_size)
        self._settled_wal_size = wal_size
        return res

    def unchanged(self) -> bool:
        """Whether the wal-index still shows what the last step found all captured: no commit
        since (one read of its header, noted as a sighting; no stat, no step). A cheap look for
        the loop while it follows a busy writer; anything but a commit (a replaced file, say)
        waits for the step that follows the end of following."""
        settled = self._settled
        if settled is None:
            return False
        try:
            shm = self.handles.sightings.take()
        except OSError:
            return False  # the step that follows reports what is wrong
        return shm is not None and shm[0] == settled[1] and shm[1] == settled[2]

    def _settles(self, seen: _Quiet | None) -> _Quiet | None:
        """``seen`` if the capture has everything it shows (same epoch, up to its mxFrame)."""
        pos = self.pos
        if seen is not None and pos is not None and (
            seen[1] == salt_bytes(pos.salts) and seen[2] <= pos.frame
        ):
            return seen
        return None

    def _quiet_signature(self, st: os.stat_result | None) -> _Quiet | None:
        """(database file signature from ``st``, its stat just taken; wal-index salts,
        mxFrame) now, read first (and noted as a sighting); None when a step has work
        regardless: not pinned, a generation, catch-up, rotation or proof pending, no
        wal-index, no stat, or a frame of the current epoch in the WAL slot after the captured
        end (a commit's frames are written, and file events sent,
        before the wal-index shows it)."""
        shm = self.handles.sightings.take()
        pos, fd = self.pos, self.handles.wal_fd
        if (shm is None or not self.handles.pinned or pos is None or fd is None
                or self._pending is not None or self._catchup is not None
                or self.capture.proof_pending or pos.frame >= self.checkpoint_pages
                or st is None):
            return None
        try:
            nxt = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(pos.frame + 1, self.page_size))
        except OSError:
            return None
        if len(nxt) == FRAME_HEADER_SIZE and nxt[8:16] == salt_bytes(pos.salts):
            return None
        return stat_sig(st), shm[0], shm[1]

    def _step(self, res: CaptureResult, started: int, st: os.stat_result | None) -> None:
        self._check_identity(st)
        self._ensure_pinned()
        if self._pending is not None:
            reason, self._pending = self._pending, None
            self._catchup = None
            self.snapshots.start_generation(reason, res)
        if self._catchup is not None:
            reason, self._catchup = self._catchup, None
            self.catchup.run(reason, res)
        more = self.capture.capture(res)
        for _ in range(self.tuning.step_batches):
            due = self.pos is not None and self.pos.frame >= self.checkpoint_pages
            if due and not res.rotated and (not more or self.capture.backlog_small()):
                self.capture.rotate(res)
                res.rotated = True
            elif more:
                # behind a writer faster than the capture: no reset is safe now (the new epoch
                # could overtake the uncaptured tail), but a fresh pin lets the application's
                # own checkpoints backfill everything already captured
                self.handles.handover()
            else:
                break
            more = self.capture.capture(res)
        if self.pos is not None:
            self.handles.leave_mark0()
        res.more = more
        if not more:
            self.confirmed_ns = started
        # a step that captured commits may be followed by more at once: the periodic save of
        # the page index (a write and an fsync) waits for a step without any, within bounds
        if self.generation is not None and not self._index_wait.defers(res.transactions > 0):
            if self.keeper.save_if_due(self.snapshots.stamp()):
                self._index_wait.done()

    def _ensure_pinned(self) -> None:
        if self.handles.pinned:
            return
        self.handles.pin(self.handles.active)
        released, self._released = self._released, None
        # Read under the new pin: with the database file as it was at the release, nothing was
        # backfilled since, so the epoch the capture ended in was reset, truncated or removed
        # (if at all) exactly at the captured frame, and at most once (a second reset needs the
        # first one's frames backfilled). Otherwise the capture proves continuity or catches up.
        if released is not None and self.pos == released[1] and self._file_as_captured(
            *released
        ):
            self._from_current_epoch()

    @property
    def pin_releasable(self) -> bool:
        """Whether the pin may hold read mark 0 (see :meth:`release_idle_pin`)."""
        return self.handles.pinned and self.handles.mark0

    def release_idle_pin(self) -> bool:
        """Release a pin that may hold read mark 0 while the database is idle: everything
        captured, the WAL wholly backfilled, the database file last written over a second ago.
        Returns whether it was released.

        Such a pin keeps every checkpoint from copying anything. Held by a replicator that is
        paused or hung when the application writes again, it would make each of the
        application's commits past the automatic checkpoint's threshold sort the whole WAL
        and give up. Released, nothing of the application's waits on the replicator. The next
        step pins again; if the database file has not changed since, nothing was backfilled,
        so nothing committed since can have been overwritten (see ``_ensure_pinned``);
        otherwise the reset proof or a catch-up applies, as after a rotation."""
        h, pos = self.handles, self.pos
        if (not self.pin_releasable or pos is None or self._pending is not None
                or self._catchup is not None or self.capture.proof_pending):
            return False
        sig = self._captured_file_sig(backfilled=True)
        if sig is None:
            return False
        h.unpin()
        self._released = (sig, pos)
        log.debug("%s: pin released while idle at frame %d", self.name, pos.frame)
        return True

    # ------------------------------------------------------------------ on demand

    def snapshot(self, res: CaptureResult | None = None) -> ObjectInfo:
        """Take a snapshot of the current position inside the current generation (what is
        captured first is added to ``res``). Commits are still seen meanwhile (see
        :mod:`replicator.sightings`): a snapshot of a large database holds up the capture
        for a while, but not the stamps of what the application commits in the meantime."""
        with SIGHTER.watching(self.handles.sightings):
            self._ensure_pinned()
            assert self.generation is not None
            self.capture.capture(CaptureResult() if res is None else res)
            info, _ = self.snapshots.write(self.generation, self.txid, self.pos,
                                           Lineage(Reason.INTERVAL))
        return info

    def diff_snapshot(self, max_fraction: float = DEFAULT_DIFF_MAX,
                      res: CaptureResult | None = None) -> ObjectInfo | None:
        """Take a differential snapshot of the current position (the pages changed since the
        last full snapshot); None if a full one should be taken instead (see
        ``Snapshots.diff``). What is captured first is added to ``res``; commits are still
        seen meanwhile, as in :meth:`snapshot`."""
        with SIGHTER.watching(self.handles.sightings):
            self._ensure_pinned()
            self.capture.capture(CaptureResult() if res is None else res)
            return self.snapshots.diff(max_fraction)

    def read_captured(self, sqls: Sequence[str]) -> list[list[tuple[Any, ...]]] | None:
        """The rows of each query, read in one transaction of a connection of its own that sees
        exactly the captured state (txid ``self.txid``); None if the application committed
        since the capture (capture again and retry)."""
        return self.handles.read_captured(sqls)

    def checkpoint_truncate(self, timeout: float) -> tuple[int, int, int]:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` with the pin released (a blocking checkpoint:
        it holds the write lock while it waits up to ``timeout`` seconds for readers); returns
        SQLite's (busy, log, checkpointed). Capture first; the next step proves the WAL's
        continuity or starts a new generation."""
        return self.handles.checkpoint_truncate(timeout)

    def content_hash(self) -> tuple[str, int, str]:
        """``(generation, txid, SHA-256 of pages 1..n)`` of the captured state: the database
        file overlaid with the captured frames of the current epoch, read under the pin (what
        a restore to ``txid`` rebuilds, page for page). Call after a capture step."""
        self._ensure_pinned()
        return self.snapshots.content_hash()
