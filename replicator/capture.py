"""Change capture: the committed transactions of the WAL, shipped to the spool as segments, and
the rotation of the pin that lets the WAL reset (see :mod:`replicator.db`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .catchup import CatchUp
from .coding import Coding
from .errors import WalError
from .handles import NO_RESET, file_sig
from .headers import Reason, SegmentHeader, Txn
from .pos import WalPos, segment_info
from .progress import CaptureResult, Part, Shared
from .rescue import Rescued, pseudo_header, rescue
from .sightings import salt_bytes
from .snapshots import Snapshots
from .wal import (
    FRAME_HEADER_SIZE,
    READ_BUFFERS,
    WAL_HEADER_SIZE,
    Lent,
    ScanResult,
    WalHeader,
    frame_offset,
    frame_size,
    read_wal_header,
    scan_bytes,
    verify_frames,
)

log = logging.getLogger("replicator.db")

COPY_CHUNK_FRAMES = 256
ROTATE_WAIT = 0.02
ROTATE_POLL = 0.0002
ROTATE_GRACE = 0.001
"""Seconds a rotation that finds the WAL wholly backfilled, or reset with no commit of the new
epoch in the wal-index yet, still waits for that commit before it pins again (see
Capture.rotate): at most a microsecond per frame captured in the epoch."""
ROTATE_TAIL = 1 << 20
"""Bytes of frames the application may append past the captured end while a rotation has the
pin released, without a reset, when that is more than half the frames captured in the epoch:
past that the pin is taken again at once (see Capture.rotate)."""


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
    """What ``Capture._scan_batch`` found: whole transactions, whether more may follow, why
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


class Capture(Part):
    """Ships committed WAL frames as segments and rotates the pin."""

    def __init__(self, shared: Shared, snapshots: Snapshots, catchup: CatchUp) -> None:
        super().__init__(shared)
        self.snapshots = snapshots
        self.catchup = catchup
        self.checkpoints: dict[str, int] = {}
        # a tail read right after a reset seen while rotating: (new salts, rescue's result)
        self._early_tail: tuple[tuple[int, int], Rescued | None] | None = None
        self.coding = Coding(self.tuning.compress_budget)
        self._wal_hdr: WalHeader | None = None  # the WAL header read last

    @property
    def proof_pending(self) -> bool:
        """Whether a WAL reset seen while rotating still has to be proven lossless."""
        return self._early_tail is not None

    def capture(self, res: CaptureResult) -> bool:
        """Capture one batch of committed transactions; True if more are waiting."""
        p = self.progress
        fd = self.handles.wal()
        hdr = self._wal_hdr = read_wal_header(fd, self._wal_hdr) if fd is not None else None
        if p.pos is None and self.nowal_changed():
            # the state had no WAL, and the file changed since: frames were written and
            # checkpointed (the WAL perhaps gone or restarted) in a moment no pin was held
            self.catchup.run(Reason.WAL_SHRUNK, res)
            return False
        if hdr is None or fd is None:
            if p.pos is not None and p.pos.frame > 0 and (
                fd is None or os.fstat(fd).st_size < WAL_HEADER_SIZE
            ):
                # truncated (wal_checkpoint(TRUNCATE)) in a moment the pin was not held: what
                # was committed after the captured position is in the database file only now
                self.catchup.run(Reason.WAL_SHRUNK, res)
            return False
        if hdr.page_size != p.page_size:
            self.snapshots.start_generation(Reason.PAGE_SIZE, res)
            return False
        if p.pos is None:
            return self.ship(fd, hdr, WalPos(hdr.salt1, hdr.salt2, 0, hdr.checksum), res)
        if hdr.salts == p.pos.salts:
            return self.ship(fd, hdr, p.pos, res)
        early, self._early_tail = self._early_tail, None
        if early is not None and early[0] == hdr.salts:
            rescued = early[1]
        else:
            rescued = rescue(fd, hdr, p, self.handles, self.name)
        if rescued is None:
            self.catchup.run(Reason.WAL_RESET, res)
            return False
        tail, data = rescued
        old_hdr = pseudo_header(p.pos, p.page_size, p.big_endian)
        if tail.transactions:
            self._emit_runs(fd, old_hdr, _spans(p.pos.frame + 1, tail), res, data)
        log.debug(
            "%s: WAL restarted (checkpoint seq %d); continuity proven at frame %d",
            self.name, hdr.checkpoint_seq, tail.end_index,
        )
        p.big_endian = hdr.big_endian
        p.pos = WalPos(hdr.salt1, hdr.salt2, 0, hdr.checksum)
        self.handles.learn_reset_bound()
        return self.ship(fd, hdr, p.pos, res)

    def nowal_changed(self) -> bool:
        """Whether the database file changed since the state without a WAL was read."""
        sig, fd = self.progress.nowal_sig, self.handles.db_fd
        return sig is not None and fd is not None and file_sig(fd) != sig

    def ship(self, fd: int, hdr: WalHeader, start: WalPos, res: CaptureResult) -> bool:
        """Capture the next batch of committed transactions after ``start`` in this epoch as one
        segment (memory stays bounded by the batch size, however long the WAL). True if more
        are waiting."""
        p = self.progress
        if p.pos is None or p.pos.salts != start.salts:
            p.pos = start
            p.big_endian = hdr.big_endian
        with READ_BUFFERS.lend() as buf:
            batch = self._scan_batch(fd, hdr, p.pos, buf)
            txns = batch.txns
            if not txns and batch.stop == "short" and p.pos.frame > 0 and self.handles.pinned:
                if os.fstat(fd).st_size < frame_offset(p.pos.frame + 1, p.page_size):
                    self.catchup.run(Reason.WAL_SHRUNK, res)
                    return False
            self.handles.wal_size_seen = os.fstat(fd).st_size
            if not txns:
                return False
            try:
                self._emit(fd, hdr, p.pos, txns, res, data=batch.data)
            except WalError as exc:
                # the frames changed under the copy: the WAL was reset meanwhile; the next
                # capture sees the new epoch and proves (or not) that nothing was lost
                log.debug("%s: %s", self.name, exc)
                return True
            return batch.more

    def _scan_batch(self, fd: int, hdr: WalHeader, start: WalPos, lent: Lent) -> ScanBatch:
        """Whole committed transactions after ``start``: about ``segment_max_frames`` frames of them
        (more only for a single larger transaction). The frames are kept as read (into ``lent``:
        valid while it is lent) and verified, except for a transaction longer than one batch
        (``data`` None), which is copied again in bounded chunks."""
        ps = self.progress.page_size
        fs = frame_size(ps)
        idx, ck = start.frame + 1, start.checksum
        txn_first = idx
        txns: list[TxnSpan] = []
        window = True  # every transaction so far lies inside the one buffer read
        end = self._committed_end(fd, hdr)
        while True:
            # no further than the file's end (a read sized for a whole batch would cost an
            # allocation of that size for every commit), nor past the last committed frame
            off = frame_offset(idx, ps)
            size = os.fstat(fd).st_size
            want = min(self.tuning.segment_max_frames * fs, size - off)
            if end is not None:
                want = min(want, frame_offset(end + 1, ps) - off)
            buf = lent.pread(fd, want, off) if want > 0 else memoryview(b"")
            r = scan_bytes(buf, hdr, idx, ck, keep_frames=False)
            reason = r.stop_reason
            if r.valid_end_index - idx + 1 == self.tuning.segment_max_frames:
                reason = "limit"
            elif not buf and size < off:
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

    def _emit_runs(self, fd: int, hdr: WalHeader, txns: list[TxnSpan], res: CaptureResult,
                   data: memoryview | None) -> None:
        """Transactions right after the captured position (a rescued tail, which may be long)
        as segments of about ``segment_max_frames`` frames each, as a step ships them (more
        only for a single larger transaction): a segment's header lists its transactions, so
        one segment for a tail of 100,000 would cost megabytes of memory to write and to
        read. ``data``: the frames of all of ``txns``, already read and verified."""
        fs = frame_size(self.progress.page_size)
        limit = self.tuning.segment_max_frames
        base = txns[0].first if txns else 0
        i = 0
        while i < len(txns):
            j = i + 1
            while j < len(txns) and txns[j].commit - txns[i].first + 1 <= limit:
                j += 1
            piece = None if data is None else data[
                (txns[i].first - base) * fs:(txns[j - 1].commit - base + 1) * fs]
            start = self.progress.pos
            assert start is not None
            self._emit(fd, hdr, start, txns[i:j], res, data=piece)
            i = j

    def _committed_end(self, fd: int, hdr: WalHeader) -> int | None:
        """The last committed frame of the epoch of ``hdr``, as the wal-index shows it now (the
        reading is also a sighting), when the slot after it holds no frame of this epoch; else
        None (the file's end is the limit). Past a WAL reset the file keeps the older epochs'
        frames beyond the new one's end: without this limit every step would read and check
        them all (up to a whole batch) only to find their salts wrong. A frame of this epoch
        after the limit belongs to a commit the wal-index does not show yet, or to one in
        progress: the scan then reads on, as without a limit."""
        try:
            shm = self.handles.sightings.take()
        except OSError:
            return None
        salts = salt_bytes(hdr.salts)
        if shm is None or shm[0] != salts:
            return None
        nxt = os.pread(fd, FRAME_HEADER_SIZE, frame_offset(shm[1] + 1, hdr.page_size))
        if len(nxt) == FRAME_HEADER_SIZE and nxt[8:16] == salts:
            return None
        return shm[1]

    def _emit(
        self,
        fd: int,
        hdr: WalHeader,
        start: WalPos,
        txns: list[TxnSpan],
        res: CaptureResult,
        data: memoryview | None = None,
    ) -> None:
        """Write transactions (consecutive, starting right after ``start``) to the spool as one
        segment (zstd-compressed, or stored as they are: see :mod:`replicator.coding`).
        ``data``: their frames, already read and verified; otherwise they are read again from
        the WAL. Each transaction is stamped with the moment its commit was first seen (see
        :mod:`replicator.sightings`)."""
        p = self.progress
        assert p.generation is not None
        first, last = txns[0].first, txns[-1].commit
        nbytes = (last - first + 1) * frame_size(p.page_size)
        level = self.coding.level(nbytes)
        end = WalPos(start.salt1, start.salt2, last, txns[-1].checksum)
        end_txid = p.txid + len(txns)
        salts = salt_bytes(start.salts)
        stamps = self._stamps(salts, txns)
        info = segment_info(p.generation, p.txid + 1, end_txid, stamps[0] // 1_000_000,
                            stamps[-1] // 1_000_000)
        # while pinned where no reset can happen, the frames cannot change under the copy;
        # otherwise (a reset is possible, or this is a rescued tail) verify them again
        h = self.handles
        verify = not (h.reset_end == NO_RESET and h.reset_salts == start.salts)

        assert data is None or len(data) == nbytes

        def body() -> Iterable[bytes | memoryview]:
            if data is not None:
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
            header = self._segment_header(hdr, start, end, txns, stamps,
                                          ix.content if ix is not None else None)
            # frames in hand are one buffer: compressed in one pass
            info = self.spool.write(info, header, data if data is not None else body(), level)
            if level is not None:
                self.coding.record(nbytes, info.size)
        except BaseException:
            if ix is not None:
                ix.rollback()
            raise
        if ix is not None:
            ix.commit()
        self.handles.sightings.forget(salts, last)
        p.last_observed_ns = stamps[-1]
        p.resumed = None
        p.txid = end_txid
        p.pos = end
        p.last_end = end
        res.objects.append(info)
        res.transactions += len(txns)
        res.frames += last - first + 1

    def _stamps(self, salts: bytes, txns: list[TxnSpan]) -> list[int]:
        """When each of ``txns`` was first seen (ns), never earlier than the one before."""
        return self.handles.sightings.stamps(salts, [t.commit for t in txns],
                                             self.progress.last_observed_ns)

    def _segment_header(
        self, hdr: WalHeader, start: WalPos, end: WalPos, txns: list[TxnSpan],
        stamps: list[int], content: int | None,
    ) -> SegmentHeader:
        p = self.progress
        assert p.generation is not None
        start_txid = p.txid + 1
        return SegmentHeader(
            generation=p.generation,
            start_txid=start_txid,
            end_txid=p.txid + len(txns),
            page_size=p.page_size,
            big_endian=hdr.big_endian,
            prev=p.last_end,
            start=start,
            end=end,
            wal_header=hdr.raw if start.frame == 0 else None,
            frames=txns[-1].commit - txns[0].first + 1,
            txns=tuple(
                Txn(start_txid + k, ns, t.frames, t.db_size)
                for k, (t, ns) in enumerate(zip(txns, stamps, strict=True))
            ),
            content_hash=content,
            unobserved_from_ns=p.resumed[0] if p.resumed else None,
            unobserved_to_ns=p.resumed[1] if p.resumed else None,
        )

    def _frames_body(
        self, fd: int, hdr: WalHeader, start: WalPos, first: int, last: int, verify: bool
    ) -> Iterator[bytes]:
        """Re-read frames first..last (verifying the chain again while copying, if asked)."""
        ps = self.progress.page_size
        fs = frame_size(ps)
        ck = start.checksum
        idx = first
        while idx <= last:
            n = min(COPY_CHUNK_FRAMES, last - idx + 1)
            buf = os.pread(fd, n * fs, frame_offset(idx, ps))
            if len(buf) != n * fs:
                raise WalError(f"{self.handles.wal_path}: frames {idx}.. vanished while copying")
            if verify:
                ck = verify_frames(buf, ps, hdr.big_endian, start.salts, ck)
            yield buf
            idx += n

    def backlog_small(self) -> bool:
        """Whether the uncaptured part of the epoch is at most half of what is captured: then a
        reset in the rotation window is safe to prove, since reading the tail back is much faster
        than the application can write the half of a new epoch that would overtake it."""
        fd, pos, ps = self.handles.wal_fd, self.progress.pos, self.progress.page_size
        if fd is None or pos is None:
            return False
        backlog = max(0, os.fstat(fd).st_size - frame_offset(pos.frame + 1, ps))
        return backlog // frame_size(ps) <= pos.frame // 2

    def rotate(self, res: CaptureResult) -> None:
        """Let the WAL reset: backfill while pinned, then release the pin only briefly.

        1. Pinned on the newest commit (a handover; it keeps the older pin if the new one could
           let a reset through), a PASSIVE checkpoint backfills what the pin covers. It never
           waits for anyone, and pinned it may take as long as the disk needs (it ends with an
           fsync of the database). Then everything up to the end of the WAL is
           captured, still pinned: while a pin is held no reset can happen.
        2. Unpinned, the replicator only watches the wal-index, with nothing in between that can
           block (no checkpoint, no spool write). The application's next autocheckpoint
           backfills the rest and its next write resets the WAL. As soon as the WAL was reset
           and the new epoch's first commit is in the wal-index, or ``ROTATE_GRACE`` after the
           WAL was first seen reset or wholly backfilled (a pin taken on a wholly backfilled
           WAL reads the database file alone and lets the reset through at exactly that
           frame), or after ``ROTATE_WAIT``, it pins again on the other connection. (Waiting
           that moment for a busy writer's commit lands the pin off read mark 0; a pin that
           may hold read mark 0 needs a handover of its own at the next step, see
           ``Handles.leave_mark0``, and each read transaction begun beside a busy writer is a
           small risk to a writer without a busy timeout: see the README. The moment is at
           most a microsecond per frame captured in the epoch: to reach the old epoch's
           captured end meanwhile, a new epoch would have to be written at a frame a
           microsecond, 4 GiB/s with 4 KiB pages.)
           It also pins again as soon as the application has appended more
           than half the frames captured in the epoch (at least ``ROTATE_TAIL`` bytes) past the
           captured end without a reset (its checkpoints did not complete: another reader
           holds the backfill back, say): those frames are the old epoch's tail, which must be
           read before a new epoch that starts once they are backfilled reaches them (at 25k
           commits a second it overwrites a 1,000-frame epoch in about 13 ms), and a pin taken
           while they are not all backfilled blocks the reset. (The same half bounds the
           backlog a rotation starts with; see ``backlog_small``.) The application cannot fill
           a new epoch up to the frames written in that window and reset it again that fast;
           ``rescue`` proves the old epoch's tail was read in full, or the capture catches up.
        """
        p, h = self.progress, self.handles
        assert p.pos is not None and h.ckpt is not None
        h.handover()
        result = h.checkpoint_passive()
        self.checkpoints[result] = self.checkpoints.get(result, 0) + 1
        fd = h.wal()
        old_salts = p.pos.salts
        for _ in range(self.tuning.step_batches):
            hdr = read_wal_header(fd) if fd is not None else None
            if hdr is None or fd is None or hdr.salts != old_salts:
                return  # cannot happen while pinned; the next capture sorts it out
            if not self.ship(fd, hdr, p.pos, res):
                break
        else:
            return  # the writer outpaces the capture: no reset now (see backlog_small)
        other = 1 - h.active
        tail_max = p.pos.frame + max(p.pos.frame // 2, ROTATE_TAIL // frame_size(p.page_size))
        h.unpin()
        deadline = time.monotonic() + ROTATE_WAIT
        grace = min(ROTATE_GRACE, p.pos.frame * 1e-6)
        reset: WalHeader | None = None
        settling: float | None = None  # when the WAL was first seen reset or wholly backfilled
        while (now := time.monotonic()) < deadline:
            hdr = read_wal_header(fd) if fd is not None else None
            if hdr is None or fd is None:
                break
            shm = h.read_shm()
            if hdr.salts != old_salts:
                reset = hdr
                if shm is not None and shm[0] == salt_bytes(hdr.salts) and shm[1] > shm[2]:
                    break  # the new epoch's first commit is in: a pin now is off read mark 0
                settles = True
            elif shm is not None and shm[0] == salt_bytes(old_salts) and shm[1] > tail_max:
                break
            else:
                settles = shm is not None and shm[1] == shm[2]
            if settles:
                settling = now if settling is None else settling
                if now + ROTATE_POLL > settling + grace:  # another poll would outlast the grace
                    break
            time.sleep(ROTATE_POLL)
        h.pin(other)
        if reset is not None and fd is not None:
            # pinned first (no second reset can follow while the pin is held), then the old
            # epoch's tail is read at once, before the new epoch can reach it
            self._early_tail = (reset.salts, rescue(fd, reset, p, h, self.name))
