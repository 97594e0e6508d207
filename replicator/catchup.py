"""Catch-ups: after an interval the capture could not observe, the pages that differ from the
captured state (found by hashing the state as of the pin against the page index), shipped as
one object in the same generation."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from .contenthash import CATCHUP_PGNO_SIZE, page_hash
from .dbstate import DbState, pages_of
from .errors import DatabaseError
from .headers import CatchupHeader, Reason
from .pos import ObjectInfo, catchup_info
from .progress import CaptureResult, Part, Shared
from .snapshots import Snapshots

log = logging.getLogger("replicator.db")


class CatchUp(Part):
    """Writes catch-up objects and keeps the page index in step."""

    def __init__(self, shared: Shared, snapshots: Snapshots) -> None:
        super().__init__(shared)
        self.snapshots = snapshots

    def run(self, reason: Reason, res: CaptureResult) -> None:
        """After an interval the capture could not observe (a restart, a reset it could not
        prove continuous): ship the pages that differ from the captured state, found by hashing
        the state as of the pin against the page index, as one catch-up object in the same
        generation; capture continues from the WAL position that state corresponds to."""
        ix = self.keeper.index
        if ix is None or self.progress.generation is None:
            self.snapshots.start_generation(Reason.NO_INDEX, res)
            return
        for _ in range(5):
            state = self.snapshots.read_state()
            if state.page_size != self.progress.page_size:
                self.snapshots.start_generation(Reason.PAGE_SIZE, res)
                return
            changed: list[tuple[int, int]] = []
            for first, buf in state.chunks():
                changed += ix.diff(first, pages_of(buf, state.page_size))
            info = self._write(reason, state, changed)
            if info is not None:
                res.objects.append(info)
                res.catch_up = reason
                return
        raise DatabaseError(f"{self.handles.path}: the WAL kept resetting during the catch-up")

    def _write(
        self, reason: Reason, state: DbState, changed: list[tuple[int, int]]
    ) -> ObjectInfo | None:
        """Write the catch-up of ``changed`` pages (None if the state moved under the read)."""
        p = self.progress
        ix = self.keeper.index
        assert ix is not None and p.generation is not None
        observed = time.time_ns()
        since = max(p.last_observed_ns, p.confirmed_ns) or observed
        ix.begin()
        try:
            for pgno, value in changed:
                ix.set_hash(pgno, value)
            ix.resize(state.pages)
            header = CatchupHeader(
                generation=p.generation, txid=p.txid + 1, ts_ns=observed,
                unobserved_from_ns=since, page_size=state.page_size, pages=state.pages,
                big_endian=state.hdr.big_endian if state.hdr else p.big_endian,
                prev=p.last_end, position=state.pos, changed=len(changed),
                content_hash=ix.content, reason=reason,
            )
            info = catchup_info(p.generation, p.txid + 1, since // 1_000_000,
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
        p.txid += 1
        self.snapshots.set_position(state.pos)
        if state.hdr is not None:
            p.big_endian = state.hdr.big_endian
        p.last_observed_ns = observed
        p.resumed = None
        self.handles.learn_reset_bound()
        self.keeper.save(self.snapshots.stamp())
        log.warning(
            "%s: %s; caught up in generation %s at txid %d: %d of %d pages changed, unobserved "
            "for %.3f s", self.name, reason.text, p.generation, p.txid, len(changed),
            state.pages, (observed - since) / 1e9,
        )
        return info


class _StateMoved(Exception):
    """A page changed between the two readings of a catch-up (the WAL was reset meanwhile)."""


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
