"""How spooled objects reach one destination: grouped into runs shipped as one object each (a
remote destination, see :mod:`replicator.batch`), linked in rounds (a directory on the spool's
file system) or written one by one; what to ship and when stays with
:class:`~replicator.replica.Replica`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import batch
from .compact import unlink_quiet
from .errors import ReplicatorError
from .headers import SegmentHeader
from .logs import RateLimit
from .pos import ObjectInfo
from .spool import Spool
from .storage.base import StorageClient
from .storage.file import FileStorage, stream_file
from .threads import off_loop

log = logging.getLogger("replicator.replica")

SHIP_CONCURRENCY = 4
LINK_BATCH = 256  # spooled objects linked into a local destination in one go (one dir fsync)

Shipped = tuple[ObjectInfo, int, int]
"""What one shipped group became: the object written, its size and its WAL frames."""


class Courier:
    """Writes groups of spooled objects to one storage client, a round at a time."""

    def __init__(self, client: StorageClient, spool: Spool, label: str, debug: RateLimit, *,
                 count_frames: bool) -> None:
        self.client = client
        self.spool = spool
        self.label = label  # "<db>: replica <name>", for log lines
        self.debug = debug
        self.count_frames = count_frames  # WAL frames are counted only for metrics
        # a directory on the spool's file system: the capture's worker links what it wrote
        # (see :meth:`link_now`) until a link is refused (another file system)
        self.direct = isinstance(client, FileStorage)

    async def plan(self, missing: list[ObjectInfo], merge: bool,
                   window: float | None) -> list[batch.Group]:
        """``missing`` (in shipping order) as groups to ship as one object each: runs of
        consecutive segments, none spanning two windows of ``window`` seconds, when ``merge``
        (a remote destination pays per request), else one group per object."""
        if merge:
            return await off_loop(batch.plan, self.spool, missing, window)
        return [([o], []) for o in missing]

    def width(self, merge: bool) -> int:
        """How many groups one round ships: a remote destination takes several objects at once
        (a backlog after an outage is shipped in rounds of SHIP_CONCURRENCY); a local one links
        what it lacks in rounds of LINK_BATCH, one directory fsync each."""
        return SHIP_CONCURRENCY if merge else LINK_BATCH if self.links(merge) else 1

    def links(self, merge: bool) -> bool:
        """Whether single spooled objects are linked into the destination rather than sent."""
        return not merge and self.client.can_link

    async def send(self, window: list[batch.Group], merge: bool) -> list[Shipped]:
        """Ship one round of groups (linked at once where the destination can)."""
        results = await self._link(window) if self.links(merge) else None
        if results is None:
            results = await asyncio.gather(*(self._ship(p, h) for p, h in window))
        return results

    def link_now(self, objs: list[ObjectInfo], generation: str,
                 after: int) -> list[Shipped] | None:
        """Link ``objs``, segments just spooled, into the destination in the calling thread (the
        capture step's worker) if they continue what it holds (``generation`` up to txid
        ``after``, as the loop found before the step); None when they do not, or the link
        failed: the destination's next round then ships them, and reports what fails."""
        if not self.direct or not objs:
            return None
        for o in objs:
            if o.kind != "wal" or o.generation != generation or o.start_txid != after + 1:
                return None
            after = o.end_txid
        assert isinstance(self.client, FileStorage)
        try:
            sizes = self.client.link_now([(o, self.spool.path(o)) for o in objs])
            if sizes is None:
                self.direct = False
                return None
            return [(o, size, self._frames_now(o)) for o, size in zip(objs, sizes, strict=True)]
        except (OSError, ReplicatorError):
            return None  # the round reports it

    def _frames_now(self, info: ObjectInfo) -> int:
        """:meth:`frames` in the calling thread."""
        if not self.count_frames:
            return 0
        header = self.spool.read_header(info)
        return header.frames if isinstance(header, SegmentHeader) else 0

    async def frames(self, info: ObjectInfo) -> int:
        """How many WAL frames a spooled object holds (for metrics; from the spool's memory
        when it wrote the object lately)."""
        if info.kind != "wal" or not self.count_frames:
            return 0
        header = self.spool.cached_header(info) or await off_loop(
            self.spool.read_header, info)
        return header.frames if isinstance(header, SegmentHeader) else 0

    async def _link(self, window: list[batch.Group]) -> list[Shipped] | None:
        """Link single spooled objects into the destination at once; None if it cannot link."""
        infos = [parts[0] for parts, _ in window]
        sizes = await self.client.link_objects([(i, self.spool.path(i)) for i in infos])
        if sizes is None:
            return None
        return [(i, size, await self.frames(i)) for i, size in zip(infos, sizes, strict=True)]

    async def _ship(self, parts: list[ObjectInfo], headers: list[SegmentHeader]) -> Shipped:
        """Write one spooled object, or the merge of several, to the destination; returns what
        was written, its size and how many WAL frames it holds."""
        t0 = time.monotonic()
        if len(parts) > 1:
            info, path = await off_loop(batch.merge, self.spool, parts, headers)
            try:
                merged = await self.client.write_object(info, stream_file(path))
            finally:
                await off_loop(unlink_quiet, path)
            if self.debug.ready():
                log.debug("%s: wrote %s (%d spooled objects, %d bytes) in %.3f s", self.label,
                          info.key, len(parts), merged, time.monotonic() - t0)
            return info, merged, sum(h.frames for h in headers)
        info = parts[0]
        frames = headers[0].frames if headers else await self.frames(info)
        # a destination on the spool's file system links the spooled file instead of copying it
        linked = await self.client.link_object(info, self.spool.path(info))
        if linked is not None:
            return info, linked, frames
        size = await self.client.write_object(info, self.spool.storage.read_object(info))
        return info, size, frames
