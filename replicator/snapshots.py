"""Snapshots: the database's whole state as of the pin, written to the spool as a generation's
first object or periodically within it, with the page index rebuilt from the pages written."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .contenthash import page_hash
from .dbstate import DbState, pages_of, read_state
from .diffsnap import DEFAULT_DIFF_MAX, DiffBase, write_diff
from .errors import DatabaseError
from .handles import file_sig
from .headers import Reason, SnapshotHeader
from .pageindex import PageIndex, Stamp
from .pos import ObjectInfo, WalPos, new_generation_id, snapshot_info
from .progress import CaptureResult, Part, Shared

log = logging.getLogger("replicator.db")


@dataclass(frozen=True)
class Lineage:
    """Why a snapshot is taken and, for a generation's first, where the previous one ended."""

    reason: Reason
    generation: str | None = None
    txid: int | None = None
    confirmed_ns: int | None = None


class Snapshots(Part):
    """Reads the state under the pin and writes it whole: a new generation's first snapshot, or
    a periodic one inside the current generation."""

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        # the database file's (inode, size, mtime) before the last state read
        self._state_sig: tuple[int, int, int] | None = None

    def stamp(self) -> Stamp:
        """What the page index of the captured state belongs to."""
        assert self.progress.generation is not None
        return Stamp(self.progress.generation, self.progress.txid, self.handles.db_dev,
                     self.handles.db_ino or 0)

    def start_generation(self, reason: Reason, res: CaptureResult) -> None:
        """Start a new generation with a snapshot of the state as of the pin."""
        p = self.progress
        prev_gen, prev_txid = p.generation, p.txid
        gen = new_generation_id()
        p.generation = gen
        p.txid = 0
        info, pos = self.write(
            gen, 0, None, Lineage(reason, prev_gen, prev_txid if prev_gen else None,
                                  p.confirmed_ns or None),
        )
        self.set_position(pos)
        self.handles.learn_reset_bound()
        res.objects.append(info)
        res.new_generation = reason
        level = logging.INFO if reason == Reason.NO_POSITION else logging.WARNING
        log.log(level, "%s: new generation %s: %s", self.name, gen, reason.text)

    def read_state(self, upto: WalPos | None = None) -> DbState:
        """The state as of the pin (up to ``upto`` in the current epoch, or all of it). Up to
        the captured position, the frames the capture verified are not scanned again."""
        h = self.handles
        assert h.db_fd is not None
        self._state_sig = file_sig(h.db_fd)  # before the read: a later write changes it
        verified = upto is not None and upto == self.progress.pos and h.pinned
        return read_state(h.path, h.db_fd, h.wal(), self.progress.page_size, upto, verified)

    def set_position(self, pos: WalPos | None) -> None:
        """Capture continues from ``pos``, the position of the state just read. Without a WAL
        (None) the database file alone is that state: remember it, so that a change reaching
        the file without frames this capture saw (written and checkpointed while no pin was
        held) is caught up rather than missed."""
        self.progress.pos = pos
        self.progress.last_end = pos
        self.progress.nowal_sig = self._state_sig if pos is None else None

    def write(
        self, gen: str, txid: int, upto: WalPos | None, lineage: Lineage
    ) -> tuple[ObjectInfo, WalPos | None]:
        """Write the state as of the pin (up to ``upto`` in the current epoch, or all of it)
        and make its page index the capture's. Its content hash comes from the capture's index
        when the snapshot continues a generation (and is checked against the pages written),
        else from a first reading of the pages."""
        p = self.progress
        for _ in range(5):
            state = self.read_state(upto)
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
                position=(p.position_of(state.pos) if lineage.reason == Reason.INTERVAL
                          else state.pos),
                reason=lineage.reason, db=self.name,
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
                    raise DatabaseError(f"{self.handles.path}: the snapshot differs from the "
                                        "captured state (the WAL moved on); it is taken again "
                                        "later")
                continue
            self.keeper.index = fresh
            p.diff_base = DiffBase.of(gen, txid, fresh)
            p.page_size = state.page_size
            if state.hdr is not None:
                p.big_endian = state.hdr.big_endian
            p.last_snapshot_ns = observed
            p.last_snapshot_txid = txid
            p.last_snapshot_seconds = time.monotonic() - started
            p.last_snapshot_size = info.size
            p.last_observed_ns = max(p.last_observed_ns, observed)
            self.keeper.save(Stamp(gen, txid, self.handles.db_dev, self.handles.db_ino or 0))
            return info, state.pos
        raise DatabaseError(f"{self.handles.path}: the WAL kept resetting during the snapshot")

    def diff(self, max_fraction: float = DEFAULT_DIFF_MAX) -> ObjectInfo | None:
        """Write a differential snapshot of the captured state (the pin is held, capture just
        ran) over the last full snapshot taken in this generation; None when there is none to
        compare with, nothing changed, more than ``max_fraction`` of the pages did (take a full
        one), or the WAL moved."""
        p = self.progress
        base, ix = p.diff_base, self.keeper.index
        if base is None or ix is None or base.generation != p.generation or p.txid <= base.txid:
            return None
        state = self.read_state(p.pos)
        if state.pos != p.pos:
            return None
        info = write_diff(self.spool, state, ix, base, p.txid, p.position_of(state.pos),
                          max_fraction)
        if info is not None:
            p.last_snapshot_txid = p.txid
        return info

    def content_hash(self) -> tuple[str, int, str]:
        """See :meth:`Database.content_hash` (the pin is held)."""
        p, path = self.progress, self.handles.path
        if p.generation is None:
            raise DatabaseError(f"{path}: nothing captured yet")
        state = self.read_state(p.pos)
        frames = state.pos.frame if state.pos is not None else 0
        captured = p.pos.frame if p.pos is not None else 0
        if (frames or captured) and state.pos != p.pos:
            raise DatabaseError(f"{path}: the WAL moved on since the capture")
        digest = hashlib.sha256()
        for _, chunk in state.chunks():
            digest.update(chunk)
        return p.generation, p.txid, digest.hexdigest()


def content_hash_of(state: DbState) -> int:
    """The content hash of a state (one reading of every page)."""
    h = 0
    for first, buf in state.chunks():
        for k, page in enumerate(pages_of(buf, state.page_size)):
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
