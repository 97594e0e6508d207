"""Compaction: consecutive WAL segments of a destination merged into larger ones, on levels.

A *level* is a time interval (defaults ``DEFAULT_LEVELS``: 1 s, 10 s, 5 min, 1 h). At level ``I``,
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

A step lists a generation of the destination once; later steps plan from that listing, from
what was shipped since and from their own merges and deletions (nothing else writes there: the
lease), keeping in memory only the objects whose windows are still open (``_View``), and they
go only through the generations with a window still open. A retention pass (which deletes)
makes the next step list again, as does a failed step or ``RELIST_EVERY``. So a step costs the
same for a generation of a day and one of a year.

Bodies are read from local copies where they hold the same transactions: the spool (the first
level runs within seconds of shipping) and any destination that is a local directory (a remote
destination's later levels merge what a local one holds under the same keys, since both merge
the same windows); only what no local copy holds is downloaded. A merge's blocking work runs in
a few calls on the compaction's own thread (``executor``), never on the threads the capture
uses, so that neither waits behind the other's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

import aiofiles

from .crc import crc32
from .errors import CorruptObjectError
from .format import (
    DEFAULT_LEVEL,
    HEADER_START,
    KIND_WAL,
    ObjectDecoder,
    ObjectWriter,
    header_end,
    parse_header,
)
from .fsutil import temp_path
from .headers import SegmentHeader, SegmentPart
from .pos import ObjectInfo, segment_info
from .spool import Spool
from .storage.base import StorageClient
from .storage.file import FileStorage, stream_file
from .wal import FRAME_HEADER_SIZE

log = logging.getLogger("replicator.compact")
T = TypeVar("T")

DEFAULT_LEVELS: tuple[float, ...] = (1.0, 10.0, 300.0, 3600.0)
DEFAULT_DELETE_GRACE = 30.0  # seconds a replaced object stays readable after its merge
DUE_SPREAD = 0.5
"""A destination's merges of a window start up to this fraction of the level's interval after
the window closes, at a point of its own (:func:`due_phase`): windows close at the same moment
for every database, and a thousand of them merging at once would take the CPU their captures
need. Less than one, so that the first level still finds its segments in the spool (pruning
keeps two of its intervals)."""
MAX_BYTES = 256 << 20  # stored bytes of the inputs of one merge
LARGE_BYTES = 1 << 20
"""A segment of at least this many stored bytes is never merged again: a restore or a listing
pays for it about what it would pay for its share of a larger one, and a merge would rewrite
(and upload again) every byte of it. A full batch of the capture (2,048 frames: 8 MiB of 4 KiB
pages, as under a flat-out writer or a bulk load; 1-3 MiB compressed, 8 MiB stored as they
are) is this large: merging those would double the bytes written for each byte of WAL."""
EARLY_RUN = 4
"""A level other than the last merges a window's run only from this many segments: two or three
are left to the next level, which merges them with the rest of its window anyway (a database
that commits every second or so would otherwise pay a merge, written, fsynced, linked and its
parts deleted, for every two or three commits)."""
# a merge is compressed when its sources take less than this fraction of their frames' size
COMPRESSED_BELOW = 0.75
WORK_DIR = "compact"
_READ = 1 << 20
REMOTE_COST = 1 << 20  # a downloaded object, against 1 for a local one, when choosing sources


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
    downloaded: int = 0  # objects read back from the destination (no local copy held them)
    cut_short: bool = False  # stopped between merges (see Compactor.yield_to); more is due


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


def copy_body(w: ObjectWriter, path: str | BinaryIO, key: str, *, head: bytes = b"",
              header_read: bool = False) -> None:
    """Append the verified body of the WAL segment file ``path`` (named ``key``; or the file
    itself, open) to ``w``. ``head``: the file's first bytes, already read (an open file is
    then read on from where it is; else from its start). ``header_read``: the caller has the
    header already, parsed or from memory (its bytes are still summed for the checksum)."""
    dec = ObjectDecoder(key, parse_header=not header_read)
    with open(path, "rb", buffering=0) if isinstance(path, str) else \
            contextlib.nullcontext(path) as f:
        left = os.fstat(f.fileno()).st_size
        if head and not isinstance(path, str):
            left -= len(head)
            body = dec.feed(head)
            if body:
                w.write(body)
        else:
            f.seek(0)
        # reads no larger than what is left: a read allocates what it asks for
        while left > 0 and (chunk := f.read(min(_READ, left))):
            left -= len(chunk)
            body = dec.feed(chunk)
            if body:
                w.write(body)
    dec.finish()
    if dec.kind != KIND_WAL:
        raise CorruptObjectError(f"{key}: corrupt object (not a WAL segment)")


@dataclass
class _Source:
    """A segment file a merge reads: its header and size, read once, and the file kept open
    for its body with its first bytes (or opened again when there are too many to keep)."""

    path: str
    key: str
    header: SegmentHeader
    size: int
    file: BinaryIO | None
    head: bytes = b""

    def copy_to(self, w: ObjectWriter) -> None:
        """Append this segment's verified body to ``w``."""
        if self.file is not None:
            copy_body(w, self.file, self.key, head=self.head, header_read=True)
        else:
            copy_body(w, self.path, self.key, header_read=True)


KEEP_OPEN = 64
"""A merge of up to this many files keeps each open from its header to its body (one open
each); a larger one opens each file again for its body."""
_HEAD = 64 << 10
"""Bytes of a kept file read with its header (a small segment's whole file: one read)."""


def _read_head(f: BinaryIO, size: int, key: str,
               known: bool) -> tuple[bytes, dict[str, Any] | None]:
    """The first bytes of an object file (all of a small one, at least its whole header), and
    its parsed header (None when ``known``: the caller has it)."""
    head = _read_upto(f, min(size, _HEAD))
    kind, end = header_end(head, key)
    if kind != KIND_WAL:
        raise CorruptObjectError(f"{key}: corrupt object (not a WAL segment)")
    if len(head) < end:
        head += _read_upto(f, end - len(head))
        if len(head) < end:
            raise CorruptObjectError(f"{key}: corrupt object (truncated header)")
    return head, None if known else parse_header(head[HEADER_START:end], key)


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes of an unbuffered file (fewer only at its end)."""
    out = f.read(n)
    while len(out) < n and (more := f.read(n - len(out))):
        out += more
    return out


def _open_sources(stack: contextlib.ExitStack, paths: Sequence[str], keys: Sequence[str],
                  known: Mapping[str, SegmentHeader],
                  opened: Mapping[str, BinaryIO] | None = None) -> list[_Source]:
    """Each file's header and size, each file opened once (closed by ``stack``); a header in
    ``known`` (by key: from the spool's memory, of the very file) is not parsed again. A path
    in ``opened`` is read from that file (open, at its start) rather than opened again."""
    keep = len(paths) <= KEEP_OPEN
    opened = opened or {}
    out = []
    for path, key in zip(paths, keys, strict=True):
        f = opened.get(path) or open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
        if keep:
            stack.enter_context(f)
        try:
            size = os.fstat(f.fileno()).st_size
            cached = known.get(key)
            head, doc = _read_head(f, size, key, cached is not None)
            header = cached if cached is not None else SegmentHeader.from_json(doc, key)
        finally:
            if not keep:
                f.close()
        out.append(_Source(path, key, header, size, f if keep else None, head if keep else b""))
    return out


def _compressed(sources: list[_Source]) -> bool:
    """Whether the segments were mostly stored compressed: the capture compresses frames only
    within its CPU budget (a flat-out writer's are stored as they are), and a merge follows
    it, so that compaction never spends more on compression than the capture chose to."""
    stored = sum(s.size for s in sources)
    body = sum(s.header.frames * (FRAME_HEADER_SIZE + s.header.page_size) for s in sources)
    return stored < body * COMPRESSED_BELOW


def write_merged(path: str, sources: list[_Source]) -> tuple[SegmentHeader, int]:
    """Write the merge of the segment files ``sources`` (in order, their headers read) to
    ``path``; returns its header and size. Each source is verified (trailer checksum) as it is
    read. The merge is compressed when its sources mostly were (see :func:`_compressed`).
    Blocking."""
    headers = [s.header for s in sources]
    for i in range(1, len(headers)):
        a, b = headers[i - 1], headers[i]
        if b.start_txid != a.end_txid + 1 or b.prev != a.end:
            raise CorruptObjectError(f"{sources[i].key}: does not continue {sources[i - 1].key}")
    header = merged_header(headers)
    level = DEFAULT_LEVEL if _compressed(sources) else None
    with open(path, "wb") as f:
        w = ObjectWriter(f, KIND_WAL, header.to_json(), level)
        for src in sources:
            src.copy_to(w)
        w.close()
        f.flush()
        os.fsync(f.fileno())
    return header, w.size


# ------------------------------------------------------------------------------------ planning


def _covered(segs: list[ObjectInfo]) -> list[ObjectInfo]:
    """Segments wholly inside another one (the other is kept: of two alike, the first by key).
    In order of (start, -end, key) a segment is covered by one before it exactly when one
    before it ends at or after its end."""
    out = []
    reach = -1
    for s in sorted(segs, key=lambda o: (o.start_txid, -o.end_txid, o.key)):
        if s.end_txid <= reach:
            out.append(s)
        reach = max(reach, s.end_txid)
    return out


Source = tuple[ObjectInfo, str | None]
"""An object a merge reads, with the local file holding it (None: to be downloaded)."""


def choose_sources(run: list[ObjectInfo], local: Iterable[tuple[ObjectInfo, str]]
                   ) -> list[Source] | None:
    """The objects a merge of ``run`` (consecutive segments) reads, in order: a chain of
    consecutive segments from its first txid to its last, each local (with its file) or one of
    ``run`` itself (to download), the fewest downloads first, then the fewest objects; None
    if there is none (a hole)."""
    start, end = run[0].start_txid, run[-1].end_txid
    edges: dict[int, list[tuple[int, ObjectInfo, str | None]]] = {}
    for o, file in local:
        if o.kind == "wal" and start <= o.start_txid and o.end_txid <= end:
            edges.setdefault(o.start_txid, []).append((1, o, file))
    for o in run:
        edges.setdefault(o.start_txid, []).append((REMOTE_COST, o, None))
    best: dict[int, int] = {start: 0}
    came: dict[int, tuple[int, Source]] = {}
    heap = [(0, start)]
    while heap:
        cost, at = heapq.heappop(heap)
        if at == end + 1:
            break
        if cost > best.get(at, cost):
            continue
        for c, o, path in edges.get(at, []):
            nxt = o.end_txid + 1
            if cost + c < best.get(nxt, cost + c + 1):
                best[nxt] = cost + c
                came[nxt] = (at, (o, path))
                heapq.heappush(heap, (cost + c, nxt))
    if end + 1 not in came:
        return None
    out: list[Source] = []
    at = end + 1
    while at != start:
        at, src = came[at]
        out.append(src)
    return out[::-1]


def window_ms(interval: float) -> int:
    """The width in milliseconds of a level's windows (at least 1)."""
    return max(1, int(interval * 1000))


def plan_level(
    objects: list[ObjectInfo], interval: float, now_ms: int, breaks: Iterable[int] = (),
    min_run: int = 2,
) -> list[list[ObjectInfo]]:
    """Runs of consecutive segments of one generation to merge at a level of ``interval``
    seconds: each run lies in one closed window, breaks at holes and at snapshot txids (those
    of ``objects``, and ``breaks``), has at least ``min_run`` segments (see EARLY_RUN) and none
    of ``LARGE_BYTES`` or more. Segments covered by another must be left out first."""
    width = window_ms(interval)
    need = max(min_run, 2)
    breaks = {*breaks, *(o.end_txid for o in objects if o.kind in ("snapshot", "diff"))}
    runs: list[list[ObjectInfo]] = []
    run: list[ObjectInfo] = []
    window = -1
    size = 0
    for s in sorted((o for o in objects if o.kind == "wal"), key=lambda o: o.start_txid):
        w = s.first_ms // width
        inside = (s.last_ms // width == w and (w + 1) * width <= now_ms
                  and s.size < LARGE_BYTES)
        if (inside and run and w == window and s.start_txid == run[-1].end_txid + 1
                and run[-1].end_txid not in breaks and size + s.size <= MAX_BYTES):
            run.append(s)
            size += s.size
            continue
        if len(run) >= need:
            runs.append(run)
        run, window, size = ([s], w, s.size) if inside else ([], -1, 0)
    if len(run) >= need:
        runs.append(run)
    return runs


def min_run(level: int, levels: int) -> int:
    """The fewest segments a run of level ``level`` (of ``levels``) merges: EARLY_RUN, or two
    at the last level."""
    return 2 if level == levels - 1 else EARLY_RUN


def thin_diffs(objects: list[ObjectInfo], interval: float, now_ms: int) -> list[ObjectInfo]:
    """The differential snapshots a level of ``interval`` seconds lets go: in each closed
    window of a generation, every one but the newest."""
    width = window_ms(interval)
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


FINAL_AFTER = 60.0
"""Seconds after a top-level window closed before steps stop keeping its objects at hand (one
shipped that late, a backlog's, still merges with them; one later stays apart)."""
RELIST_EVERY = 6 * 3600.0
"""Seconds after which a step lists a generation again rather than plan from what it knows of
it (nothing else writes there; this only bounds how long a difference could last)."""


@dataclass
class _View:
    """What steps know of one generation of the destination, so that a step need not list it:
    after one listing, what was shipped and what steps merged and deleted since. Only the
    objects that can still take part in a merge or a thinning are kept (``live``); the others
    (every window holding them closed before a step went through them) are only counted, with
    the txids of their snapshots that a live segment may still border (``breaks``). The
    memory and the work of a step so stay bounded by the newest top-level window, however old
    the generation."""

    live: list[ObjectInfo] = field(default_factory=list)
    listed_at: float = 0.0  # monotonic
    fresh: list[ObjectInfo] = field(default_factory=list)  # shipped since the last step took
    final_count: int = 0
    final_bytes: int = 0
    final_end: int = -1  # the newest txid of the final segments
    breaks: set[int] = field(default_factory=set)
    # when the last of the windows holding what it knows of closes (wall-clock seconds), and
    # when a step last went through it (the step's time; None: none since it was listed)
    open_until: float = 0.0
    stepped_at: float | None = None

    def take(self) -> list[ObjectInfo]:
        """The live objects with what was shipped since (once)."""
        known = {o.key for o in self.live}
        self.live += [o for o in self.fresh if o.key not in known]
        self.fresh = []
        return self.live

    def keep(self, horizon_ms: int) -> None:
        """After a step: the live objects last observed before ``horizon_ms`` (every window
        holding them has closed and was gone through) become final."""
        live: list[ObjectInfo] = []
        final: list[ObjectInfo] = []
        for o in self.live:
            (final if o.last_ms < horizon_ms else live).append(o)
        self.live = live
        self.final_count += len(final)
        self.final_bytes += sum(o.size for o in final)
        ends = [o.end_txid for o in final if o.kind == "wal"]
        if ends:
            self.final_end = max(self.final_end, *ends)
        self.breaks |= {o.end_txid for o in final if o.kind in ("snapshot", "diff")}
        self.breaks = {t for t in self.breaks if t >= self.final_end}

    def totals(self) -> tuple[int, int]:
        """The generation's objects and bytes."""
        return (self.final_count + len(self.live),
                self.final_bytes + sum(o.size for o in self.live))


def due_phase(name: str) -> float:
    """Where in ``[0, 1)`` the merges of the database named ``name`` fall after a window
    closes (see ``DUE_SPREAD``): the same for it at every start, spread evenly over many."""
    return crc32(name.encode()) / 2**32


class DueTimes:
    """The wall-clock times at which compaction of one destination is due: when a window
    holding shipped objects closes, at every level (and only then: an idle destination costs
    no listing), ``phase`` × ``DUE_SPREAD`` of the level's interval later, or when a retry or a
    deletion is due. Due once at start.

    A first-level window is due only once a second segment wholly inside it was shipped: one
    segment has nothing to merge at that level (a database committing about once a window, as
    each of a directory of tenant databases may, lists nothing each time). What was shipped
    before a start is merged by the pass at start or at the next level."""

    def __init__(self, levels: tuple[float, ...], phase: float = 0.0) -> None:
        self.levels = levels
        self.phase = phase
        self.times: set[float] = {0.0}
        self._first: dict[int, int] = {}  # first-level window -> segments shipped inside it

    def shipped(self, info: ObjectInfo) -> None:
        """Due when the windows holding the shipped segment ``info`` close, at every level (at
        the first only once it holds as many as that level merges: EARLY_RUN, or two when it
        is the only level)."""
        if info.kind != "wal":
            return
        phase = self.phase
        for li, interval in enumerate(self.levels):
            width = window_ms(interval)
            w = info.last_ms // width
            if li == 0:
                if info.first_ms // width != w:
                    continue  # not inside one window: not merged at this level
                n = self._first[w] = self._first.get(w, 0) + 1
                if n != min_run(0, len(self.levels)):
                    continue
            self.times.add((w + 1 + phase * DUE_SPREAD) * width / 1000)

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
        if self._first and self.levels:
            width = window_ms(self.levels[0])
            now_ms = now * 1000
            self._first = {w: n for w, n in self._first.items() if (w + 1) * width > now_ms}
        return bool(due)

    def next(self) -> float | None:
        """The earliest time something is due (None: nothing is)."""
        return min(self.times) if self.times else None


class Compactor:
    """Compaction of one destination, reading bodies from local copies where it can: the
    spool and ``local``, directories holding objects of the same database (a destination that
    is a local directory, this one among them). Blocking work runs on ``executor`` (default:
    asyncio's)."""

    def __init__(self, client: StorageClient, spool: Spool | None,
                 levels: Iterable[float] = DEFAULT_LEVELS,
                 grace: float = DEFAULT_DELETE_GRACE, *,
                 local: Sequence[FileStorage] = (), executor: Executor | None = None,
                 phase: float = 0.0) -> None:
        self.client = client
        self.spool = spool
        self.levels = tuple(levels)
        self.grace = grace
        self.local = tuple(local)
        self.executor = executor
        root = spool.root if spool is not None else None
        self.workdir = os.path.join(root, WORK_DIR) if root else None
        # replaced objects, deleted by the first step ``grace`` seconds (monotonic) after their
        # merge: a restore that planned with them meanwhile can still read them
        self._doomed: dict[str, tuple[float, ObjectInfo]] = {}
        self.due = DueTimes(self.levels, phase)
        # the destination's generations: listed by the first step, then kept up to date from
        # what is shipped (a new generation's first segment) and what a step finds empty (one
        # retention deleted), since nothing else writes there (the lease): a step lists only
        # the generations it merges in
        self._gens: list[str] | None = None
        # what steps know of each generation (see _View): once a step has gone through a
        # generation after all its windows closed, nothing there can merge any more until
        # something is shipped to it, and steps skip it (a destination keeps the generations
        # of every restore and page-size change; going through each of them every step would
        # cost more the older the destination)
        self._views: dict[str, _View] = {}
        self.yield_to: Callable[[], bool] = lambda: False
        """Asked before each merge: True stops the step there (the capture fell behind its
        writer; merging would take the disk and CPU it needs). The rest is merged later."""

    def shipped(self, info: ObjectInfo) -> None:
        """``info`` was shipped to the destination: compaction falls due when its windows
        close (see :class:`DueTimes`)."""
        if self._gens is not None and info.generation not in self._gens:
            self._gens.append(info.generation)
        self.due.shipped(info)
        view = self._views.get(info.generation)
        if view is not None:  # else the generation is listed by the next step
            view.fresh.append(info)
            self._note_open(view, [info])

    def _note_open(self, view: _View, objs: Iterable[ObjectInfo]) -> None:
        """``objs`` are in the generation of ``view``: it is not settled before a step went
        through them after their windows closed (one shipped late, in windows a step already
        went through, needs another)."""
        last = max((o.last_ms for o in objs), default=None)
        if last is None or not self.levels:
            return
        width = window_ms(self.levels[-1])
        closes = (last // width + 1) * width / 1000
        view.open_until = max(view.open_until, closes)
        if view.stepped_at is not None and view.stepped_at >= closes:
            view.stepped_at = None

    def relist(self) -> None:
        """List every generation again at its next step (objects were deleted: retention)."""
        self._views.clear()

    def settled(self, generation: str) -> bool:
        """Whether a step went through ``generation`` after every window holding what is
        known of it had closed (one not listed since the start or a relist is not)."""
        view = self._views.get(generation)
        return (view is not None and view.stepped_at is not None
                and view.stepped_at >= view.open_until)

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking ``fn(*args)`` on the compaction's executor."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

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

    async def delete_replaced(self) -> int:
        """Delete every replaced object now, without waiting for its grace period (at a clean
        shutdown: a restore that planned with one plans again, as after a crash, when the next
        start deletes them as covered); returns how many."""
        doomed = [o for _, o in self._doomed.values()]
        if doomed:
            await self.client.delete_objects(doomed)
            for o in doomed:
                self._doomed.pop(o.key, None)
        return len(doomed)

    async def step(self, now: float | None = None,
                   generations: Iterable[str] | None = None) -> CompactResult:
        """One compaction pass over the given generations (default: all but the settled ones,
        see :meth:`settled`), every level in turn, with windows closed at ``now`` (default:
        the wall clock); returns what it did. A failure leaves the destination valid: nothing
        is deleted before its merge is durable."""
        t0 = time.monotonic()
        step_at = time.time() if now is None else now
        now_ms = int(step_at * 1000)
        res = CompactResult()
        await self._delete_due(res)
        if generations is not None:
            gens = list(generations)
        else:
            if self._gens is None:
                self._gens = await self.client.generations()
            gens = [g for g in self._gens if not self.settled(g)]
        top = window_ms(self.levels[-1]) if self.levels else 1
        for gen in gens:
            try:
                await self._step_generation(gen, now_ms, res)
            except BaseException:
                self._views.pop(gen, None)  # listed again by the next step
                raise
            if res.cut_short:
                break
            view = self._views.get(gen)
            if view is not None:
                view.stepped_at = step_at
                view.keep((now_ms - int(FINAL_AFTER * 1000)) // top * top)
        # the destination's totals (a settled generation's as its last step left them)
        for gen in gens if generations is not None else self._gens or ():
            view = self._views.get(gen)
            objects, size = view.totals() if view is not None else (0, 0)
            res.objects += objects
            res.bytes += size
        if res.merged:
            log.debug("%s: compacted in %.3f s: %d merges, %d objects downloaded, %d objects "
                      "left", self.client.url, time.monotonic() - t0, res.merged,
                      res.downloaded, res.objects)
        return res

    async def _known(self, gen: str) -> list[ObjectInfo]:
        """What the generation holds that a step may still merge or thin (see :class:`_View`):
        listed when the step knows nothing of it yet (or long ago), else as known."""
        view = self._views.get(gen)
        if view is None or time.monotonic() - view.listed_at >= RELIST_EVERY:
            # made first: what is shipped while the listing runs is kept for the step
            view = self._views[gen] = _View()
            listed = await self.client.objects(gen)
            view.live, view.listed_at = listed, time.monotonic()
            self._note_open(view, listed)  # left by an earlier run, in windows still open
            if not listed and self._gens is not None and gen in self._gens:
                self._gens.remove(gen)  # deleted (retention): listed again if it comes back
                del self._views[gen]
                return []
        return [o for o in view.take() if o.key not in self._doomed]

    async def _step_generation(self, gen: str, now_ms: int, res: CompactResult) -> None:
        """One generation's part of a step: crash leftovers deleted, then every level."""
        held = await self._known(gen)
        view = self._views.get(gen)
        breaks = view.breaks if view is not None else set()
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
            runs = plan_level(held, interval, now_ms, breaks, min_run(li, len(self.levels)))
            for run in runs:
                if self.yield_to():
                    res.cut_short = True
                    break
                for parts, info in await self._merge(run, res):
                    await self._replaced(parts, res)
                    res.written.append(info)
                    res.merged += 1
                    res.levels[li] = res.levels.get(li, 0) + 1
                    drop = {o.key for o in parts}
                    held = [o for o in held if o.key not in drop] + [info]
            if res.cut_short:
                break
        if view is not None and self._views.get(gen) is view:
            view.live = held

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
        self, run: list[ObjectInfo], res: CompactResult
    ) -> list[tuple[list[ObjectInfo], ObjectInfo]]:
        """Write the merge of ``run`` to the destination (durably); returns each merged object
        with the objects it replaces. The run is cut before any segment that records an
        unobserved interval (the first after a restart that resumed from the WAL), so that its
        record stays on a segment's first transaction; pieces of one segment are left alone."""
        workdir = self.workdir or tempfile.gettempdir()
        temps: list[str] = []
        out = []
        try:
            chain, known, pieces, damaged = await self._call(self._merge_local, run, workdir,
                                                             temps)
            if pieces is None and damaged is None:
                files = await self._fetch(chain, workdir, temps, res)
                try:
                    pieces = await self._call(write_pieces, run, files, workdir, temps, known)
                except CorruptObjectError as exc:
                    if all(path is None for _, path in chain):
                        raise
                    damaged = exc
            if damaged is not None:
                # a damaged local copy never blocks a merge: read the destination's own
                log.warning("%s: %s; merging from the destination's objects instead",
                            self.client.url, damaged)
                files = await self._fetch([(o, None) for o in run], workdir, temps, res)
                pieces = await self._call(write_pieces, run, files, workdir, temps)
            assert pieces is not None
            for a, b, path, size in pieces:
                out.append((run[a:b], await self._put(run[a:b], path, size)))
        finally:
            await self._call(unlink_all, temps)
        return out

    def _merge_local(self, run: list[ObjectInfo], workdir: str, temps: list[str]
                     ) -> tuple[list[Source], dict[str, SegmentHeader],
                                list[tuple[int, int, str, int]] | None,
                                CorruptObjectError | None]:
        """The sources of ``run`` (see :meth:`_local_sources`) and, when every one of them is
        a local file kept open, their merge (see :func:`write_pieces`), written in this call:
        its files stay open no longer than it (one compaction thread: at most ``KEEP_OPEN``
        descriptors, however many merges wait for it). Else (a source to download) no merge
        yet. A damaged local file is returned, not raised. Blocking."""
        opened: dict[str, BinaryIO] = {}
        try:
            chain, known = self._local_sources(run, workdir, temps, opened)
            if not opened:
                return chain, known, None, None
            files = [(o, path) for o, path in chain if path is not None]
            try:
                return chain, known, write_pieces(run, files, workdir, temps, known,
                                                  opened), None
            except CorruptObjectError as exc:
                return chain, known, None, exc
        finally:
            for f in opened.values():
                f.close()

    async def _fetch(self, chain: list[Source], workdir: str, temps: list[str],
                     res: CompactResult) -> list[tuple[ObjectInfo, str]]:
        """The local files of ``chain``, downloading the objects no local copy holds."""
        files = []
        for o, path in chain:
            if path is None:
                path = temp_path(os.path.join(workdir, o.name))
                temps.append(path)
                await download(self.client, o, path)
                res.downloaded += 1
            files.append((o, path))
        return files

    async def _put(self, run: list[ObjectInfo], path: str, size: int) -> ObjectInfo:
        """Put the merge of ``run``, written durably to ``path``, in the destination."""
        first, last = run[0], run[-1]
        info = segment_info(first.generation, first.start_txid, last.end_txid, first.first_ms,
                            last.last_ms)
        # a directory on the spool's file system links the (fsynced) file into place
        linked = await self.client.link_object(info, path) if self.client.can_link else None
        if linked is None:
            await self.client.write_object(info, stream_file(path))
        return dataclasses.replace(info, size=size)

    def _local_sources(self, run: list[ObjectInfo], workdir: str, temps: list[str],
                       opened: dict[str, BinaryIO]
                       ) -> tuple[list[Source], dict[str, SegmentHeader]]:
        """The objects to read for ``run`` (see :func:`choose_sources`), the local ones kept
        from a deletion meanwhile (a pruning, a merge that replaced them): when every one is
        local and there are at most ``KEEP_OPEN``, opened, each put in ``opened`` by its path
        (for :meth:`_merge_local`); else linked (or copied) into ``workdir``, each file made
        appended to ``temps``. With them, the headers of those read from the spool that it
        still holds in memory (by key). Blocking."""
        os.makedirs(workdir, exist_ok=True)
        gen, start, end = run[0].generation, run[0].start_txid, run[-1].end_txid
        local: list[tuple[ObjectInfo, str]] = []
        for store in self.local:
            try:
                local += [(o, store.object_path(o))
                          for o in store.scan_segments(gen, start, end)]
            except OSError:
                continue  # unreadable now: download instead
        spooled: set[str] = set()
        if self.spool is not None:
            for o in self.spool.objects(gen):
                if o.kind == "wal" and start <= o.start_txid and o.end_txid <= end:
                    spath = self.spool.path(o)
                    spooled.add(spath)
                    local.append((o, spath))
        while True:
            chain = choose_sources(run, local)
            if chain is None:
                raise CorruptObjectError(f"{run[0].key}: segments to merge are not consecutive")
            out: list[Source] = []
            known: dict[str, SegmentHeader] = {}
            # kept open only when the merge is written in the same call (see _merge_local)
            keep = len(chain) <= KEEP_OPEN and all(path is not None for _, path in chain)
            for f in opened.values():
                f.close()  # of a chain chosen before
            opened.clear()
            for o, path in chain:
                if path is None:
                    out.append((o, None))
                    continue
                try:
                    if keep:
                        # an open file outlives its deletion: no link, nor its removal later
                        opened[path] = open(path, "rb", buffering=0)  # noqa: SIM115
                        out.append((o, path))
                    else:
                        copy = temp_path(os.path.join(workdir, o.name))
                        link_or_copy(path, copy)
                        temps.append(copy)
                        out.append((o, copy))
                except FileNotFoundError:
                    # deleted meanwhile (pruned, or replaced by a merge): choose again
                    local = [x for x in local if x[1] != path]
                    break
                if self.spool is not None and path in spooled:
                    header = self.spool.cached_header(o)
                    if isinstance(header, SegmentHeader):
                        known[o.key] = header
            else:
                return out, known


def write_pieces(run: list[ObjectInfo], files: list[tuple[ObjectInfo, str]], workdir: str,
                 temps: list[str], known: Mapping[str, SegmentHeader] | None = None,
                 opened: Mapping[str, BinaryIO] | None = None,
                 ) -> list[tuple[int, int, str, int]]:
    """Write the merges of ``run`` from ``files`` (the objects holding its transactions, in
    order, with their local files), cut before every segment of the run whose first file
    records an unobserved interval; returns (first index, end index, path, size) of each
    piece of more than one segment. Each file made is appended to ``temps``. Each file is
    opened once (up to ``KEEP_OPEN`` of them; one in ``opened`` is read from there, and closed)
    and its header read once, or not at all when ``known`` has it (by key: the header of that
    very file). Blocking."""
    with contextlib.ExitStack() as stack:
        sources = _open_sources(stack, [p for _, p in files], [o.key for o, _ in files],
                                known or {}, opened)
        at = {o.start_txid: i for i, (o, _) in enumerate(files)}
        cuts = [0]
        for i in range(1, len(run)):
            j = at.get(run[i].start_txid)
            if j is not None and sources[j].header.unobserved_from_ns is not None:
                cuts.append(i)
        cuts.append(len(run))
        out = []
        for a, b in zip(cuts, cuts[1:], strict=False):
            if b - a < 2:
                continue
            lo, hi = run[a].start_txid, run[b - 1].end_txid
            part = [s for (o, _), s in zip(files, sources, strict=True)
                    if lo <= o.start_txid and o.end_txid <= hi]
            path = temp_path(os.path.join(workdir, segment_info(
                run[a].generation, lo, hi, run[a].first_ms, run[b - 1].last_ms).name))
            temps.append(path)
            _, size = write_merged(path, part)
            out.append((a, b, path, size))
        return out


def link_or_copy(src: str, dst: str) -> None:
    """Make ``dst`` a hard link to ``src``, or a copy where the file system cannot link
    (FileNotFoundError when ``src`` is gone)."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        raise
    except OSError:
        shutil.copyfile(src, dst)


def unlink_all(paths: Iterable[str]) -> None:
    """Remove files that may already be gone."""
    for p in paths:
        unlink_quiet(p)


def unlink_quiet(path: str) -> None:
    """Remove a file that may already be gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def download(client: StorageClient, info: ObjectInfo, path: str) -> None:
    """Copy an object of ``client`` to a new local file."""
    async with aiofiles.open(path, "xb") as f:
        async for chunk in client.read_object(info):
            await f.write(chunk)
