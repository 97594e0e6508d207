"""Compaction: consecutive WAL segments of a destination merged into larger ones, on levels.

A *level* is a time interval (defaults ``DEFAULT_LEVELS``: 10 s, 5 min, 1 h). At level ``I``,
every window ``[k*I, (k+1)*I)`` of observation time that has closed (its end is in the past)
and holds more than one segment of a generation, each wholly inside it, gets them merged into
one: a segment whose transactions are exactly theirs, with their frames and observed times, so a
restore to any instant stays exact to the commit. Segments of several WAL epochs merge into one
object with one *part* per epoch (docs/format.md). A merge never crosses a txid that a snapshot
(full or differential) holds (a restore from that snapshot must find a segment starting right
after it) nor a hole. Differential snapshots are thinned on the same levels first: in each
closed window only the newest stays (they only shorten restores; the segments hold every
transaction), so they neither pile up nor keep the segments around them apart for long.

The merged object is written (temp name, fsync, rename; or a completed S3 upload) before the
segments it replaces are deleted, so a listing at any moment sees the merged object, its parts,
or both, never a hole: restore planning picks the fewest objects when they overlap. The replaced
segments are deleted ``grace`` seconds later (``DEFAULT_DELETE_GRACE``), so a restore that
planned with them just before can still read them (one that takes longer plans again). A
segment wholly covered by another one that is not awaiting its grace (left by a crash between
the write and the deletes) is deleted.

Bodies are read from the local spool when it still holds the same transactions (the first level
runs within seconds of shipping) and downloaded only otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiofiles

from .errors import CorruptObjectError
from .format import DEFAULT_LEVEL, KIND_WAL, ObjectDecoder, ObjectWriter, read_header_file
from .fsutil import temp_path
from .headers import SegmentHeader, SegmentPart
from .pos import ObjectInfo, segment_info
from .spool import Spool
from .storage.base import StorageClient
from .storage.file import stream_file
from .wal import FRAME_HEADER_SIZE

log = logging.getLogger("replicator.compact")

DEFAULT_LEVELS: tuple[float, ...] = (10.0, 300.0, 3600.0)
DEFAULT_DELETE_GRACE = 30.0  # seconds a replaced object stays readable after its merge
MAX_BYTES = 256 << 20  # stored bytes of the inputs of one merge
# a merge is compressed when its sources take less than this fraction of their frames' size
COMPRESSED_BELOW = 0.75
WORK_DIR = "compact"
_READ = 1 << 20


@dataclass
class CompactResult:
    """What one compaction step did."""

    merged: int = 0  # objects written
    written: list[ObjectInfo] = field(default_factory=list)
    replaced: int = 0  # objects deleted (merged away, or covered by another)
    levels: dict[int, int] = field(default_factory=dict)  # level index -> merges
    objects: int = 0  # objects of the destination after the step (not counting replaced ones
    # awaiting their grace period)
    bytes: int = 0


def join_parts(headers: list[SegmentHeader]) -> list[SegmentPart]:
    """The parts of the concatenation of segments, in order: consecutive parts of one epoch
    become one."""
    out: list[SegmentPart] = []
    for h in headers:
        for p in h.epochs():
            if out and p.continues(out[-1]):
                last = out[-1]
                out[-1] = dataclasses.replace(last, end=p.end, end_txid=p.end_txid,
                                              frames=last.frames + p.frames)
            else:
                out.append(p)
    return out


def merged_header(headers: list[SegmentHeader]) -> SegmentHeader:
    """The header of the merge of consecutive segments (``parts`` only when they span more
    than one WAL epoch)."""
    first, last = headers[0], headers[-1]
    parts = join_parts(headers)
    return dataclasses.replace(
        first,
        end_txid=last.end_txid,
        end=last.end,
        frames=sum(h.frames for h in headers),
        txns=tuple(t for h in headers for t in h.txns),
        parts=tuple(parts) if len(parts) > 1 else None,
        content_hash=last.content_hash,
    )


def copy_body(w: ObjectWriter, path: str, key: str) -> None:
    """Append the verified body of the object file ``path`` (named ``key``) to ``w``."""
    dec = ObjectDecoder(key)
    with open(path, "rb") as f:
        while chunk := f.read(_READ):
            body = dec.feed(chunk)
            if body:
                w.write(body)
    dec.finish()


def _compressed(sources: list[str], headers: list[SegmentHeader]) -> bool:
    """Whether the segments were mostly stored compressed: the capture compresses frames only
    within its CPU budget (a flat-out writer's are stored as they are), and a merge follows
    it, so that compaction never spends more on compression than the capture chose to."""
    stored = sum(os.path.getsize(src) for src in sources)
    body = sum(h.frames * (FRAME_HEADER_SIZE + h.page_size) for h in headers)
    return stored < body * COMPRESSED_BELOW


def write_merged(path: str, sources: list[str], keys: list[str]) -> tuple[SegmentHeader, int]:
    """Write the merge of the segment files ``sources`` (in order) to ``path``; returns its
    header and size. Each source is verified (trailer checksum) as it is read. The merge is
    compressed when its sources mostly were (see :func:`_compressed`). Blocking."""
    headers = []
    for src, key in zip(sources, keys, strict=True):
        with open(src, "rb") as f:
            headers.append(SegmentHeader.from_json(read_header_file(f, key), key))
    for i in range(1, len(headers)):
        a, b = headers[i - 1], headers[i]
        if b.start_txid != a.end_txid + 1 or b.prev != a.end:
            raise CorruptObjectError(f"{keys[i]}: does not continue {keys[i - 1]}")
    header = merged_header(headers)
    level = DEFAULT_LEVEL if _compressed(sources, headers) else None
    with open(path, "wb") as f:
        w = ObjectWriter(f, KIND_WAL, header.to_json(), level)
        for src, key in zip(sources, keys, strict=True):
            copy_body(w, src, key)
        w.close()
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    return header, size


# ------------------------------------------------------------------------------------ planning


def _covered(segs: list[ObjectInfo]) -> list[ObjectInfo]:
    """Segments wholly inside another one (the other is kept)."""
    out = []
    for s in segs:
        for o in segs:
            if o is not s and o.start_txid <= s.start_txid and s.end_txid <= o.end_txid and (
                (o.start_txid, -o.end_txid, o.key) < (s.start_txid, -s.end_txid, s.key)
            ):
                out.append(s)
                break
    return out


def plan_level(
    objects: list[ObjectInfo], interval: float, now_ms: int
) -> list[list[ObjectInfo]]:
    """Runs of consecutive segments of one generation to merge at a level of ``interval``
    seconds: each run lies in one closed window, breaks at holes and at snapshot txids, and has
    more than one segment. Segments covered by another must be left out first."""
    width = max(1, int(interval * 1000))
    breaks = {o.end_txid for o in objects if o.kind in ("snapshot", "diff")}
    runs: list[list[ObjectInfo]] = []
    run: list[ObjectInfo] = []
    window = -1
    size = 0
    for s in sorted((o for o in objects if o.kind == "wal"), key=lambda o: o.start_txid):
        w = s.first_ms // width
        inside = s.last_ms // width == w and (w + 1) * width <= now_ms
        if (inside and run and w == window and s.start_txid == run[-1].end_txid + 1
                and run[-1].end_txid not in breaks and size + s.size <= MAX_BYTES):
            run.append(s)
            size += s.size
            continue
        if len(run) > 1:
            runs.append(run)
        run, window, size = ([s], w, s.size) if inside else ([], -1, 0)
    if len(run) > 1:
        runs.append(run)
    return runs


def thin_diffs(objects: list[ObjectInfo], interval: float, now_ms: int) -> list[ObjectInfo]:
    """The differential snapshots a level of ``interval`` seconds lets go: in each closed
    window of a generation, every one but the newest."""
    width = max(1, int(interval * 1000))
    windows: dict[tuple[str, int], list[ObjectInfo]] = {}
    for o in objects:
        w = o.last_ms // width
        if o.kind == "diff" and (w + 1) * width <= now_ms:
            windows.setdefault((o.generation, w), []).append(o)
    out: list[ObjectInfo] = []
    for diffs in windows.values():
        out += sorted(diffs, key=lambda o: (o.end_txid, o.last_ms))[:-1]
    return out


# ------------------------------------------------------------------------------------ doing


class DueTimes:
    """The wall-clock times at which compaction of one destination is due: when a window
    holding shipped objects closes, at every level (and only then: an idle destination costs
    no listing), or when a retry or a deletion is due. Due once at start."""

    def __init__(self, levels: tuple[float, ...]) -> None:
        self.levels = levels
        self.times: set[float] = {0.0}

    def shipped(self, info: ObjectInfo) -> None:
        """Due when the windows holding the shipped segment ``info`` close, at every level."""
        if info.kind == "wal":
            for interval in self.levels:
                width = max(1, int(interval * 1000))
                self.times.add((info.last_ms // width + 1) * width / 1000)

    def at(self, when: float) -> None:
        """Due (again) at ``when``."""
        self.times.add(when)

    def is_due(self, now: float) -> bool:
        """Whether something is due at ``now``."""
        return any(t <= now for t in self.times)

    def take(self, now: float) -> bool:
        """Whether something is due at ``now``, forgetting what is."""
        due = {t for t in self.times if t <= now}
        self.times -= due
        return bool(due)

    def next(self) -> float | None:
        """The earliest time something is due (None: nothing is)."""
        return min(self.times) if self.times else None


class Compactor:
    """Compaction of one destination, reading bodies from the spool where it can."""

    def __init__(self, client: StorageClient, spool: Spool | None,
                 levels: Iterable[float] = DEFAULT_LEVELS,
                 grace: float = DEFAULT_DELETE_GRACE) -> None:
        self.client = client
        self.spool = spool
        self.levels = tuple(levels)
        self.grace = grace
        root = spool.root if spool is not None else None
        self.workdir = os.path.join(root, WORK_DIR) if root else None
        # replaced objects, deleted by the first step ``grace`` seconds (monotonic) after their
        # merge: a restore that planned with them meanwhile can still read them
        self._doomed: dict[str, tuple[float, ObjectInfo]] = {}
        self.due = DueTimes(self.levels)

    async def _delete_due(self, res: CompactResult) -> None:
        now = time.monotonic()
        due = [o for t, o in self._doomed.values() if t <= now]
        if due:
            await self.client.delete_objects(due)
            for o in due:
                self._doomed.pop(o.key, None)
            res.replaced += len(due)

    def pending_deletes(self) -> int:
        """Replaced objects awaiting their grace period."""
        return len(self._doomed)

    async def step(self, now: float | None = None,
                   generations: Iterable[str] | None = None) -> CompactResult:
        """One compaction pass over the given generations (default: all), every level in turn,
        with windows closed at ``now`` (default: the wall clock); returns what it did. A failure
        leaves the destination valid: nothing is deleted before its merge is durable."""
        now_ms = int((time.time() if now is None else now) * 1000)
        res = CompactResult()
        await self._delete_due(res)
        gens = list(generations) if generations is not None else await self.client.generations()
        for gen in gens:
            held = [o for o in await self.client.objects(gen) if o.key not in self._doomed]
            # covered and not awaiting their grace: left by a crash between a merge and its
            # deletes
            covered = _covered([o for o in held if o.kind == "wal"])
            if covered:
                await self.client.delete_objects(covered)
                res.replaced += len(covered)
                gone = {o.key for o in covered}
                held = [o for o in held if o.key not in gone]
            for li, interval in enumerate(self.levels):
                thinned = thin_diffs(held, interval, now_ms)
                if thinned:
                    await self._replaced(thinned, res)
                    gone = {o.key for o in thinned}
                    held = [o for o in held if o.key not in gone]
                for run in plan_level(held, interval, now_ms):
                    for parts, info in await self._merge(run):
                        await self._replaced(parts, res)
                        res.written.append(info)
                        res.merged += 1
                        res.levels[li] = res.levels.get(li, 0) + 1
                        drop = {o.key for o in parts}
                        held = [o for o in held if o.key not in drop] + [info]
            res.objects += len(held)
            res.bytes += sum(o.size for o in held)
        return res

    async def _replaced(self, run: list[ObjectInfo], res: CompactResult) -> None:
        """Objects a durable merge replaced: deleted now, or after the grace period."""
        if self.grace <= 0:
            await self.client.delete_objects(run)
            res.replaced += len(run)
            return
        until = time.monotonic() + self.grace
        for o in run:
            self._doomed[o.key] = (until, o)

    async def _merge(
        self, run: list[ObjectInfo]
    ) -> list[tuple[list[ObjectInfo], ObjectInfo]]:
        """Write the merge of ``run`` to the destination (durably); returns each merged object
        with the objects it replaces. The run is cut before any segment that records an
        unobserved interval (the first after a restart that resumed from the WAL), so that its
        record stays on a segment's first transaction; pieces of one segment are left alone."""
        workdir = self.workdir or tempfile.gettempdir()
        await asyncio.to_thread(os.makedirs, workdir, exist_ok=True)
        temps: list[str] = []
        out = []
        try:
            sources = [await self._sources(o, workdir, temps) for o in run]
            cuts = [0, *[i for i in range(1, len(run))
                         if await asyncio.to_thread(_resumed, *sources[i][0])], len(run)]
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b - a > 1:
                    files = [f for src in sources[a:b] for f in src]
                    out.append((run[a:b], await self._write(run[a:b], files, workdir)))
        finally:
            for p in temps:
                await asyncio.to_thread(unlink_quiet, p)
        return out

    async def _write(
        self, run: list[ObjectInfo], files: list[tuple[str, str]], workdir: str
    ) -> ObjectInfo:
        """Write the merge of ``files`` (path, key), the bodies of ``run``, durably."""
        t0 = time.monotonic()
        first, last = run[0], run[-1]
        info = segment_info(first.generation, first.start_txid, last.end_txid, first.first_ms,
                            last.last_ms)
        path = temp_path(os.path.join(workdir, info.name))
        try:
            _, size = await asyncio.to_thread(write_merged, path, [p for p, _ in files],
                                              [k for _, k in files])
            # a directory on the spool's file system links the (fsynced) file into place
            linked = await self.client.link_object(info, path) if self.client.can_link else None
            if linked is None:
                await self.client.write_object(info, stream_file(path))
        finally:
            await asyncio.to_thread(unlink_quiet, path)
        log.debug("%s: merged %d objects into %s in %.3f s", self.client.url, len(run),
                  info.key, time.monotonic() - t0)
        return dataclasses.replace(info, size=size)

    async def _sources(
        self, o: ObjectInfo, workdir: str, temps: list[str]
    ) -> list[tuple[str, str]]:
        """Local files (path, key) holding the body of ``o`` in order: spooled segments with
        the same transactions where the spool has them (hard-linked, so pruning the spool
        meanwhile cannot take them away), else a download. Every file made is appended to
        ``temps``."""
        linked = await asyncio.to_thread(self._link_spooled, o, workdir, temps)
        if linked is not None:
            return linked
        path = temp_path(os.path.join(workdir, o.name))
        temps.append(path)
        await download(self.client, o, path)
        return [(path, o.key)]

    def _link_spooled(
        self, o: ObjectInfo, workdir: str, temps: list[str]
    ) -> list[tuple[str, str]] | None:
        """Hard links (path, key) to the spooled segments of ``o``, or None."""
        local = self._spooled(o)
        if local is None or self.spool is None:
            return None
        paths = []
        for s in local:
            path = temp_path(os.path.join(workdir, s.name))
            try:
                os.link(self.spool.path(s), path)
            except OSError:
                return None  # pruned meanwhile, or no hard links here: download instead
            temps.append(path)
            paths.append((path, s.key))
        return paths

    def _spooled(self, o: ObjectInfo) -> list[ObjectInfo] | None:
        """Consecutive spooled segments holding exactly the transactions of ``o``, or None."""
        if self.spool is None:
            return None
        segs = {s.start_txid: s for s in self.spool.objects(o.generation) if s.kind == "wal"}
        out = []
        nxt = o.start_txid
        while nxt <= o.end_txid:
            s = segs.get(nxt)
            if s is None or s.end_txid > o.end_txid:
                return None
            out.append(s)
            nxt = s.end_txid + 1
        return out


def _resumed(path: str, key: str) -> bool:
    """Whether the segment file records an unobserved interval before it."""
    with open(path, "rb") as f:
        header = SegmentHeader.from_json(read_header_file(f, key), key)
    return header.unobserved_from_ns is not None


def unlink_quiet(path: str) -> None:
    """Remove a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def download(client: StorageClient, info: ObjectInfo, path: str) -> None:
    """Copy an object of ``client`` to a new local file."""
    async with aiofiles.open(path, "xb") as f:
        async for chunk in client.read_object(info):
            await f.write(chunk)
