"""Differential snapshots: the pages of a captured state that differ from the last full snapshot.

A full snapshot is the whole database; a differential snapshot (docs/format.md, "Differential
snapshots") holds only the pages of the state after one txid that differ from the state of the
generation's last full snapshot, found by comparing the capture's page index with a copy of the
index taken with that full snapshot (16 bytes per page, as the index itself). A restore of the
newest state then reads one full snapshot, at most one differential snapshot and the WAL captured
since it, which the service keeps below a fraction of the database (see
``SnapshotSchedule.if_due``): its cost no longer grows with the time since the last full
snapshot.

Each page written is read from the state as of the capture's position and checked against the
hash the index records for it, so a differential snapshot is exactly the captured state or it is
not written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .contenthash import CATCHUP_PGNO_SIZE, page_hash
from .dbstate import DbState
from .headers import DiffHeader
from .pageindex import Hashes, PageIndex
from .pos import ObjectInfo, WalPos, diff_info
from .spool import Spool

log = logging.getLogger("replicator.diffsnap")

DEFAULT_DIFF_MAX = 0.5
"""A differential snapshot of more than this fraction of the database's pages is not written:
a full snapshot is taken instead (it costs little more and starts a new base)."""
_BODY_CHUNK = 1 << 20


@dataclass(frozen=True)
class DiffBase:
    """The state of a full snapshot, as differential snapshots compare against it."""

    generation: str
    txid: int
    pages: int
    content: int
    hashes: Hashes

    @classmethod
    def of(cls, generation: str, txid: int, index: PageIndex) -> DiffBase:
        """The base described by ``index`` (copied: the index moves on)."""
        return cls(generation, txid, index.pages, index.content,
                   index.hashes[: index.pages].copy())


def changed_pages(base: DiffBase, index: PageIndex) -> list[int]:
    """The pages (1-based) of ``index``'s state that differ from ``base``'s, ascending."""
    n = index.pages
    old = np.zeros((n, 2), dtype=np.uint64)
    m = min(n, base.pages)
    old[:m] = base.hashes[:m]
    differ = (index.hashes[:n] != old).any(axis=1)
    return [int(k) + 1 for k in np.flatnonzero(differ)]


class StateMoved(Exception):
    """A page read for a differential snapshot is not the one the index records."""


def _body(state: DbState, index: PageIndex, pgnos: list[int]) -> Iterator[bytes]:
    """Records of (page number, page), each page checked against the index."""
    out = bytearray()
    for pgno in pgnos:
        page = state.page(pgno)
        if page_hash(pgno, page) != index.entry(pgno):
            raise StateMoved(pgno)
        out += pgno.to_bytes(CATCHUP_PGNO_SIZE, "big")
        out += page
        if len(out) >= _BODY_CHUNK:
            yield bytes(out)
            out.clear()
    if out:
        yield bytes(out)


def write_diff(
    spool: Spool, state: DbState, index: PageIndex, base: DiffBase, txid: int,
    position: WalPos | None, max_fraction: float = DEFAULT_DIFF_MAX,
) -> ObjectInfo | None:
    """Write the differential snapshot of ``state`` (the captured state after ``txid``, which
    ``index`` describes, recorded at ``position``) over ``base``. None if it would hold more
    than ``max_fraction`` of the pages (take a full snapshot instead), or if the state moved
    under the read (try later)."""
    if state.pages != index.pages or state.page_size != index.page_size:
        return None
    pgnos = changed_pages(base, index)
    if len(pgnos) > max_fraction * max(index.pages, 1):
        return None
    observed = time.time_ns()
    header = DiffHeader(
        generation=base.generation, txid=txid, base_txid=base.txid,
        base_content_hash=base.content, ts_ns=observed, page_size=state.page_size,
        pages=state.pages, big_endian=state.hdr.big_endian if state.hdr else False,
        position=position, changed=len(pgnos), content_hash=index.content,
    )
    info = diff_info(base.generation, txid, base.txid, observed // 1_000_000)
    try:
        info = spool.write(info, header, _body(state, index, pgnos))
    except StateMoved:
        return None
    if not state.still_valid():
        spool.delete([info])
        return None
    log.debug("differential snapshot at txid %d: %d of %d pages", txid, len(pgnos), state.pages)
    return info
