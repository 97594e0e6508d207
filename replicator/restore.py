"""Restore: plan from object keys and headers (pure, testable), then apply the plan to a file.

``plan_restore`` picks a generation, the newest snapshot at or before the target and the chain of
WAL segments after it, and resolves the exact last transaction. It refuses, with the restorable
range in the message, a target before the earliest restorable point, inside a gap between
generations, or behind a missing segment: a restore never silently stops short.
``apply_plan`` writes the pages to a temp file beside the output, verifies every object's checksum
and every WAL frame's chained checksum and link to its predecessor, checks the result against the
content hash recorded where it stops, runs ``PRAGMA quick_check`` (the content hash proved the
file is the application's, page for page) or ``PRAGMA integrity_check`` (no hash to prove it, or
asked for), then renames the file into place.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import sqlite3
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .contenthash import CATCHUP_PGNO_SIZE, file_content_hash, hash_hex
from .errors import CorruptObjectError, NotFoundError, ReplicatorError, RestoreError, WalError
from .format import decode_stream, read_header
from .fsutil import fsync_dir, lock_owned, owned_temp_dir, remove_stale_temps, temp_path
from .headers import (
    CatchupHeader,
    DiffHeader,
    Reason,
    SegmentHeader,
    SegmentPart,
    SnapshotHeader,
    Txn,
)
from .pos import ObjectInfo, WalPos
from .storage.base import DEFAULT_CHUNK_SIZE, StorageClient
from .wal import FRAME_HEADER_SIZE, parse_wal_header, verify_frames

DEFAULT_PREFETCH = 4
CHECK_MMAP = 1 << 30  # bytes of the restored file integrity_check reads through a map
CHECK_CACHE_KIB = 64 << 10  # its page cache
# WAL segments (stored bytes) up to which a restore checks frames in plain Python: for this
# little WAL that is quicker than importing numpy for the vectorised check
PLAIN_WAL_BYTES = 1 << 20
WRITE_BATCH = 4 << 20  # bytes of WAL pages a restore writes in one worker call
# small objects (at most SMALL_OBJECT stored bytes) are read SMALL_BATCH at a time, in one call
SMALL_OBJECT = 1 << 20
SMALL_BATCH = 32
REPLANS = 5

log = logging.getLogger("replicator.restore")


# compiled on first use (a restore of the newest state parses no time)
_FRACTION = r"^(.*T\d\d:\d\d:\d\d)[.,](\d+)(.*)$"


def fmt_ns(ns: int) -> str:
    """An RFC 3339 UTC time with nanoseconds; ``parse_time`` gives back exactly ``ns``."""
    secs, frac = divmod(ns, 1_000_000_000)
    t = dt.datetime.fromtimestamp(secs, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch from RFC 3339 / ISO 8601 (up to nine fractional digits, all
    kept); a time without an offset is UTC."""
    s = text.strip().replace("z", "Z")
    frac_ns = 0
    m = re.match(_FRACTION, s)
    if m and len(m[2]) <= 9:
        frac_ns = int(m[2].ljust(9, "0"))
        s = m[1] + m[3]
    try:
        t = dt.datetime.fromisoformat(s)
    except ValueError:
        t = None
    if t is None or (m and len(m[2]) > 9):
        raise RestoreError(
            f"invalid time {text!r}: use RFC 3339, e.g. 2026-11-27T10:30:00Z or "
            "2026-11-27T19:30:00.5+09:00"
        )
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + frac_ns


@dataclass
class GenerationSummary:
    """What one generation of a replica can restore, from its keys."""

    generation: str
    snapshots: list[ObjectInfo]
    segments: list[ObjectInfo]

    @property
    def start_ms(self) -> int:
        """Observation time of the earliest snapshot (ms)."""
        return min(s.last_ms for s in self.snapshots) if self.snapshots else 0

    @property
    def end_ms(self) -> int:
        """Observation time of the last transaction (ms)."""
        times = [o.last_ms for o in self.snapshots + self.segments]
        return max(times) if times else 0

    @property
    def end_txid(self) -> int:
        """The last txid in the generation."""
        ids = [o.end_txid for o in self.snapshots + self.segments]
        return max(ids) if ids else 0

    @property
    def size(self) -> int:
        """Total bytes of its objects."""
        return sum(o.size for o in self.snapshots + self.segments + self.diffs)

    start_ns: int = 0
    end_ns: int = 0
    diffs: list[ObjectInfo] = field(default_factory=list)
    """Its differential snapshots (each needs the full snapshot of its ``start_txid``)."""

    async def refine(self, client: StorageClient) -> GenerationSummary:
        """Read the exact (nanosecond) start and end times from the object headers; keys carry
        only milliseconds."""
        if self.snapshots and not self.start_ns:
            self.start_ns = await _snapshot_ns(client, self.snapshots[0])
            last = max(self.snapshots + self.segments, key=lambda o: (o.end_txid, o.kind_order))
            if last.kind == "snapshot":
                self.end_ns = await _snapshot_ns(client, last)
            else:
                self.end_ns = (await _segment_txns(client, last))[-1].observed_ns
        return self

    @property
    def start(self) -> int:
        """Start time in ns (exact after ``refine``)."""
        return self.start_ns or self.start_ms * 1_000_000

    @property
    def end(self) -> int:
        """End time in ns (exact after ``refine``)."""
        return self.end_ns or self.end_ms * 1_000_000

    async def unobserved(self, client: StorageClient) -> list[tuple[int, int]]:
        """The intervals (ns) the replicator did not observe, from its catch-ups' headers."""
        out = []
        for o in self.segments:
            if o.kind == "catchup":
                h = await _catchup_header(client, o)
                out.append((h.unobserved_from_ns, h.ts_ns))
        return out

    def describe(self) -> str:
        """One line: id, time range and txid range."""
        if not self.snapshots:
            return f"{self.generation}: no snapshot (not restorable)"
        return (
            f"{self.generation}: {fmt_ns(self.start)} .. {fmt_ns(self.end)} "
            f"(txid {min(s.end_txid for s in self.snapshots)}..{self.end_txid})"
        )


async def summarize(client: StorageClient) -> list[GenerationSummary]:
    """Every generation of a replica, oldest first."""
    out = []
    for gen in await client.generations():
        objs = await client.objects(gen)
        out.append(
            GenerationSummary(
                gen,
                [o for o in objs if o.kind == "snapshot"],
                [o for o in objs if o.kind in ("wal", "catchup")],
                diffs=[o for o in objs if o.kind == "diff"],
            )
        )
    return out


@dataclass
class RestorePlan:
    """What a restore will read and where it stops."""

    source: str
    generation: str
    snapshot: ObjectInfo
    segments: list[ObjectInfo]
    txid: int
    ts_ns: int
    notes: list[str] = field(default_factory=list)
    # the state restored is older than the time asked for, and why (printed on stderr)
    warnings: list[str] = field(default_factory=list)
    # a differential snapshot over ``snapshot`` applied before the segments
    diff: ObjectInfo | None = None

    @property
    def objects(self) -> list[ObjectInfo]:
        """Every object the restore reads, in the order it applies them."""
        return [self.snapshot, *([self.diff] if self.diff else []), *self.segments]

    def describe(self) -> str:
        """The plan as lines for people (``--dry-run``)."""
        lines = [
            f"source:     {self.source}",
            f"generation: {self.generation}",
            f"snapshot:   {self.snapshot.key} (txid {self.snapshot.end_txid}, "
            f"{fmt_ns(self.snapshot.last_ms * 1_000_000)})",
        ]
        if self.diff is not None:
            lines.append(f"diff:       {self.diff.key} (txid {self.diff.end_txid}, "
                         f"{fmt_ns(self.diff.last_ms * 1_000_000)})")
        lines.append(f"segments:   {len(self.segments)}")
        lines += [f"  {s.key}" for s in self.segments]
        lines.append(f"stops at:   txid {self.txid}, committed (observed) at {fmt_ns(self.ts_ns)}")
        lines += [f"unobserved: {fmt_ns(s.first_ms * 1_000_000)} .. "
                  f"{fmt_ns(s.last_ms * 1_000_000)} ({s.key})"
                  for s in self.segments if s.kind == "catchup"]
        lines += [f"note:       {n}" for n in self.notes]
        lines += [f"warning:    {w}" for w in self.warnings]
        return "\n".join(lines)


async def _range_text(client: StorageClient, gens: list[GenerationSummary]) -> str:
    usable = [await g.refine(client) for g in gens if g.snapshots]
    if not usable:
        return "the replica has no restorable generation"
    return "restorable: " + "; ".join(g.describe() for g in usable)


def _chain(
    gen: GenerationSummary, snap: ObjectInfo, upto_txid: int | None
) -> tuple[list[ObjectInfo], int | None]:
    """The fewest segments continuing from ``snap`` up to ``upto_txid`` (None: as far as they
    go). Segments may overlap (a compaction writes its merged object before it deletes the
    ones it replaces): any chain of them is the same transactions.

    Returns the chain and, if it broke before reaching the target, the first missing txid.
    """
    origin = snap.end_txid + 1
    # best[n]: (segments, bytes, last segment) of the cheapest chain reaching txid n
    best: dict[int, tuple[int, int, ObjectInfo | None]] = {origin: (0, 0, None)}
    ends: list[ObjectInfo] = []  # segments that can end a chain to upto_txid
    for s in sorted(gen.segments, key=lambda o: (o.start_txid, -o.end_txid)):
        at = best.get(s.start_txid)
        if at is None or (upto_txid is not None and s.start_txid > upto_txid):
            continue
        cost = (at[0] + 1, at[1] + s.size, s)
        nxt = s.end_txid + 1
        cur = best.get(nxt)
        if cur is None or cost[:2] < cur[:2]:
            best[nxt] = cost
        if upto_txid is not None and s.end_txid >= upto_txid:
            ends.append(s)
    if upto_txid is None:
        far = max(best)
        if any(s.start_txid > far for s in gen.segments):
            return _walk(best, far), far
        return _walk(best, far), None
    if upto_txid < origin:
        return [], None
    if not ends:
        return _walk(best, max(best)), max(best)
    last = min(ends, key=lambda s: (best[s.start_txid][0], best[s.start_txid][1] + s.size))
    return [*_walk(best, last.start_txid), last], None


def _shorten(gen: GenerationSummary, plan: RestorePlan) -> RestorePlan:
    """Start ``plan`` from the newest differential snapshot of ``gen`` that lies between its
    snapshot and its target, whose full snapshot is there, and from which the segments reach
    the target; the plan as it is if there is none. The state restored is the same: a
    differential snapshot is the state after its txid, however it was found."""
    fulls = {s.end_txid: s for s in sorted(gen.snapshots)}
    for d in sorted(gen.diffs, key=lambda o: (o.end_txid, o.last_ms), reverse=True):
        base = fulls.get(d.start_txid)
        if base is None or not plan.snapshot.end_txid < d.end_txid <= plan.txid:
            continue
        chain, missing = _chain(gen, d, plan.txid)
        if missing is None:
            plan.snapshot, plan.diff, plan.segments = base, d, chain
            return plan
    return plan


def _walk(best: dict[int, tuple[int, int, ObjectInfo | None]], node: int) -> list[ObjectInfo]:
    """The chain of segments that reaches ``node`` in ``best``."""
    out: list[ObjectInfo] = []
    seg = best[node][2]
    while seg is not None:
        out.append(seg)
        seg = best[seg.start_txid][2]
    out.reverse()
    return out


async def _segment_header(client: StorageClient, seg: ObjectInfo) -> SegmentHeader:
    raw = await read_header(client.read_object(seg), seg.key)
    return SegmentHeader.from_json(raw, seg.key)


async def _snapshot_header(client: StorageClient, snap: ObjectInfo) -> SnapshotHeader:
    raw = await read_header(client.read_object(snap), snap.key)
    return SnapshotHeader.from_json(raw, snap.key)


async def _catchup_header(client: StorageClient, obj: ObjectInfo) -> CatchupHeader:
    raw = await read_header(client.read_object(obj), obj.key)
    return CatchupHeader.from_json(raw, obj.key)


async def _segment_txns(client: StorageClient, seg: ObjectInfo) -> tuple[Txn, ...]:
    """The transactions of a segment, or a catch-up's one."""
    if seg.kind == "catchup":
        return ((await _catchup_header(client, seg)).txn,)
    return (await _segment_header(client, seg)).txns


async def _snapshot_ns(client: StorageClient, snap: ObjectInfo) -> int:
    return (await _snapshot_header(client, snap)).ts_ns


async def _plan_txid(
    client: StorageClient, gens: list[GenerationSummary], gen: GenerationSummary, txid: int,
    notes: list[str],
) -> RestorePlan:
    """The plan to ``txid`` of ``gen`` (the newest restorable generation)."""
    snaps = [s for s in gen.snapshots if s.end_txid <= txid]
    if not snaps or txid > gen.end_txid:
        raise RestoreError(
            f"txid {txid} is not in generation {gen.generation}; {gen.describe()}"
        )
    snap = snaps[-1]
    chain, missing = _chain(gen, snap, txid)
    if missing is not None:
        raise RestoreError(
            f"missing WAL segment for txid {missing} in generation {gen.generation} on "
            f"{client.url}; {await _range_text(client, gens)}"
        )
    ts = await _txn_time(client, snap, chain, txid)
    return _shorten(gen, RestorePlan(client.url, gen.generation, snap, chain, txid, ts, notes))


async def plan_restore(
    client: StorageClient,
    *,
    to_time_ns: int | None = None,
    txid: int | None = None,
    generation: str | None = None,
    exact: bool = False,
    gens: list[GenerationSummary] | None = None,
) -> RestorePlan:
    """Plan a restore to a time, a txid, or (neither) the latest point, from ``gens`` (what
    ``summarize`` says, listed again if not given).

    A time in an interval the replicator did not observe, or in a gap between generations,
    gets the newest state captured before it, with a warning saying how far before and why;
    ``exact`` refuses it instead.

    An object listed but gone when its header is read (a compaction or retention pass replaced
    it meanwhile) makes the plan start again from a new listing, at most ``REPLANS`` times."""
    for attempt in range(REPLANS + 1):
        try:
            return await _plan(client, to_time_ns, txid, generation, exact, gens)
        except NotFoundError:
            if attempt == REPLANS:
                raise
            gens = None
    raise AssertionError("unreachable")


async def _plan(
    client: StorageClient,
    to_time_ns: int | None,
    txid: int | None,
    generation: str | None,
    exact: bool,
    gens: list[GenerationSummary] | None,
) -> RestorePlan:
    gens = gens if gens is not None else await summarize(client)
    if generation is not None:
        gens_sel = [g for g in gens if g.generation == generation]
        if not gens_sel:
            raise RestoreError(f"generation {generation} not found on {client.url}")
    else:
        gens_sel = gens
    usable = [g for g in gens_sel if g.snapshots]
    if not usable:
        raise RestoreError(f"no restorable generation on {client.url}")
    if to_time_ns is not None:
        return await _plan_time(client, gens, usable, to_time_ns, exact)
    gen = usable[-1]
    # a newer generation without a snapshot cannot be restored: say so rather than silently
    # restoring an older point
    notes = [
        f"generation {g.generation} is newer but has no snapshot; it cannot be restored"
        for g in gens_sel
        if not g.snapshots and g.generation > gen.generation
    ]
    if txid is not None:
        return await _plan_txid(client, gens, gen, txid, notes)
    snap = gen.snapshots[-1]
    chain, missing = _chain(gen, snap, None)
    if missing is not None:
        raise RestoreError(
            f"missing WAL segment for txid {missing} in generation {gen.generation} on "
            f"{client.url}: the latest point cannot be reached; {await _range_text(client, gens)}"
        )
    end = chain[-1].end_txid if chain else snap.end_txid
    ts = await _txn_time(client, snap, chain, end)
    return _shorten(gen, RestorePlan(client.url, gen.generation, snap, chain, end, ts, notes))


async def _txn_time(
    client: StorageClient, snap: ObjectInfo, chain: list[ObjectInfo], txid: int
) -> int:
    if not chain or txid == snap.end_txid:
        return await _snapshot_ns(client, snap)
    for t in await _segment_txns(client, chain[-1]):  # the target may be mid-segment
        if t.txid == txid:
            return t.observed_ns
    raise CorruptObjectError(f"{chain[-1].key}: corrupt object (txid {txid} not listed)")


async def _watched_until(
    client: StorageClient, gen: GenerationSummary, nxt: GenerationSummary, t_ns: int
) -> bool:
    """Whether the generation after ``gen`` records that ``gen`` was watched, unchanged, past
    ``t_ns`` (a clean shutdown, or a break detected while running)."""
    header = await _snapshot_header(client, nxt.snapshots[0])
    return (
        header.previous_generation == gen.generation
        and header.previous_txid == gen.end_txid
        and (header.previous_confirmed_ns or 0) >= t_ns
    )


async def _pick_snapshot(
    client: StorageClient, usable: list[GenerationSummary], t_ns: int
) -> tuple[GenerationSummary, ObjectInfo] | None:
    """The newest generation and snapshot observed at or before ``t_ns``."""
    t_ms = t_ns // 1_000_000
    for g in reversed([g for g in usable if g.start_ms <= t_ms]):
        for s in reversed(g.snapshots):
            # a snapshot observed in the same millisecond as T may still be after T
            if s.last_ms < t_ms or (s.last_ms == t_ms and await _snapshot_ns(client, s) <= t_ns):
                return g, s
    return None


async def _check_end(
    client: StorageClient,
    gens: list[GenerationSummary],
    usable: list[GenerationSummary],
    gen: GenerationSummary,
    ts: int,
    t_ns: int,
    plan: RestorePlan,
    exact: bool,
) -> None:
    """T is at or past the end of ``gen``: in a gap before the next generation, warn (or refuse,
    if ``exact``), or note that the latest point is what T gets."""
    # the generation's last point to the nanosecond (key times are only milliseconds): its last
    # transaction, or a snapshot of that transaction observed later
    end_ns = ts
    last_snaps = [s for s in gen.snapshots if s.end_txid == gen.end_txid]
    if last_snaps:
        end_ns = max(end_ns, await _snapshot_ns(client, last_snaps[-1]))
    later = [g for g in usable if g.start_ms > gen.start_ms]
    if later and end_ns < t_ns and not await _watched_until(client, gen, later[0], t_ns):
        nxt = later[0]
        gap = (f"{fmt_ns(t_ns)} falls in a gap between generations: {gen.generation} ends at "
               f"{fmt_ns(end_ns)} and {nxt.generation} starts at "
               f"{fmt_ns((await nxt.refine(client)).start)}")
        if exact:
            raise RestoreError(f"{gap}; {await _range_text(client, gens)}")
        plan.warnings.append(f"{gap}; restored the newest state captured before it, "
                             f"{_before(ts, t_ns)}")
        return
    if ts < t_ns:
        plan.notes.append(
            f"{fmt_ns(t_ns)} is after the last replicated transaction; restoring the latest "
            f"point ({fmt_ns(ts)})"
        )


def _before(ts: int, t_ns: int) -> str:
    return f"txid observed at {fmt_ns(ts)}, {(t_ns - ts) / 1e9:.3f} s before the time asked for"


def _what(reason: Reason) -> str:
    if reason == Reason.RESUME_FAILED:
        return "replicator stopped"
    return f"replicator could not follow the WAL ({reason.text})"


def _unobserved(start: int, end: int, what: str, t_ns: int) -> str:
    return (f"{fmt_ns(t_ns)} falls in an interval the replicator did not observe: {what} from "
            f"{fmt_ns(start)} to {fmt_ns(end)}")


async def _resumed_after(
    client: StorageClient, seg: ObjectInfo, t_ns: int
) -> tuple[int, int, str] | None:
    """The unobserved interval before ``seg`` that T falls in, if ``seg`` is the first segment
    after a restart that resumed from the WAL."""
    if seg.kind != "wal":
        return None
    header = await _segment_header(client, seg)
    start, end = header.unobserved_from_ns, header.unobserved_to_ns
    if start is None or end is None or not start < t_ns < end:
        return None
    return start, end, "replicator stopped"


async def _plan_time(
    client: StorageClient,
    gens: list[GenerationSummary],
    usable: list[GenerationSummary],
    t_ns: int,
    exact: bool = False,
) -> RestorePlan:
    picked = await _pick_snapshot(client, usable, t_ns)
    if picked is None:
        ranges = await _range_text(client, gens)
        raise RestoreError(f"{fmt_ns(t_ns)} is before the earliest restorable point; {ranges}")
    gen, snap = picked
    t_ms = t_ns // 1_000_000
    chain_all, missing = _chain(gen, snap, None)
    chain: list[ObjectInfo] = []
    target = snap.end_txid
    ts = await _snapshot_ns(client, snap)
    unobserved: tuple[int, int, str] | None = None  # from, to, what
    for seg in chain_all:
        if seg.first_ms > t_ms:
            unobserved = await _resumed_after(client, seg, t_ns)
            break
        if seg.last_ms < t_ms:
            chain.append(seg)
            target = seg.end_txid
            continue
        included = [t for t in await _segment_txns(client, seg) if t.observed_ns <= t_ns]
        if included:
            chain.append(seg)
            target = included[-1].txid
        if len(included) < seg.end_txid - seg.start_txid + 1:
            if seg.kind == "catchup":
                cu = await _catchup_header(client, seg)
                if cu.unobserved_from_ns < t_ns:
                    unobserved = (cu.unobserved_from_ns, cu.ts_ns, _what(cu.reason))
            elif not included:
                unobserved = await _resumed_after(client, seg, t_ns)
            break
    else:
        if missing is not None:
            raise RestoreError(
                f"missing WAL segment for txid {missing} in generation {gen.generation} on "
                f"{client.url}: cannot restore to {fmt_ns(t_ns)}; {await _range_text(client, gens)}"
            )
    if chain:
        # the fewest objects up to the target (the walk above went towards the latest point)
        chain, _ = _chain(gen, snap, target)
        ts = await _txn_time(client, snap, chain, target)
    plan = RestorePlan(client.url, gen.generation, snap, chain, target, ts)
    if unobserved is not None:
        text = _unobserved(*unobserved, t_ns)
        if exact:
            raise RestoreError(f"{text}; {await _range_text(client, gens)}")
        plan.warnings.append(f"{text}; restored the newest state captured before it, "
                             f"{_before(ts, t_ns)}")
    if target == gen.end_txid:
        await _check_end(client, gens, usable, gen, ts, t_ns, plan, exact)
    return _shorten(gen, plan)


@dataclass
class RestoreResult:
    """What a restore wrote."""

    output: str
    txid: int
    pages: int
    page_size: int
    integrity: str
    # the object whose recorded content hash the restored file matched (None: the restore
    # stopped inside a segment, or at an object of a version-1 replica, which records none)
    verified: str | None = None
    # the check ``integrity`` is the answer of: "quick_check" or "integrity_check"
    check: str = "integrity_check"


class _Applier:
    """Applies decoded snapshot pages and WAL frames to an open output file."""

    def __init__(self, fd: int, plain: bool = False) -> None:
        self.fd = fd
        self.plain = plain  # check WAL frames in plain Python (see PLAIN_WAL_BYTES)
        self.pages = 0
        self.page_size = 0
        self.end: WalPos | None = None
        self.big_endian = False
        self.extent = 0  # pages the output file may hold (past ``pages`` after a shrink)
        # the content hash recorded where the restore stands, if it stands at an object's end
        self.expect: tuple[int, str] | None = None
        # WAL pages not written yet, in order: written together, one worker call for many
        # small segments
        self.queued: list[tuple[bytes, int]] = []
        self.queued_bytes = 0
        # the WAL frames those pages came from, checked before they are written: the frames of
        # many small segments of one WAL epoch in one check
        self.unchecked: list[_Unchecked] = []

    def queue(self, writes: list[tuple[bytes, int]]) -> None:
        """Write these (data, offset) pages later, after those queued before."""
        self.queued += writes
        self.queued_bytes += sum(len(d) for d, _ in writes)

    def check_later(self, frames: _Unchecked) -> None:
        """Check these frames before the pages queued from them are written."""
        self.unchecked.append(frames)

    async def flush(self, force: bool = True) -> None:
        """Check the frames not checked yet and write the queued pages (unless ``force`` is
        off and they are fewer than ``WRITE_BATCH`` bytes)."""
        if not (force or self.queued_bytes >= WRITE_BATCH):
            return
        self.check()
        if self.queued:
            writes, self.queued, self.queued_bytes = self.queued, [], 0
            await asyncio.to_thread(_write_all, self, writes)

    def check(self) -> None:
        """Check the frames not checked yet: each run that continues one WAL epoch at once
        (see :func:`_check_run`)."""
        todo, self.unchecked = self.unchecked, []
        start = 0
        for i in range(1, len(todo) + 1):
            if i == len(todo) or not todo[i].follows(todo[i - 1]):
                _check_run(todo[start:i], self.plain)
                start = i

    def truncate(self, pages: int) -> None:
        """Drop the pages past ``pages`` (a commit shrank the database)."""
        os.ftruncate(self.fd, pages * self.page_size)
        self.extent = pages

    def write(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)


Reader = Callable[[ObjectInfo], AsyncIterator[bytes]]
# progress(bytes, objects): called with the stored bytes of each chunk read, and with (0, 1) as
# each object has been read to its end
Progress = Callable[[int, int], None]


def _counted(read: Reader, progress: Progress) -> Reader:
    async def counted(info: ObjectInfo) -> AsyncIterator[bytes]:
        async for chunk in read(info):
            progress(len(chunk), 0)
            yield chunk
        progress(0, 1)

    return counted


async def _apply_snapshot(read: Reader, snap: ObjectInfo, ap: _Applier) -> None:
    raw, body = await decode_stream(read(snap), snap.key)
    header = SnapshotHeader.from_json(raw, snap.key)
    if header.txid != snap.end_txid:
        raise CorruptObjectError(f"{snap.key}: corrupt object (header does not match its key)")
    ap.page_size = header.page_size
    ap.pages = header.pages
    ap.end = header.position
    ap.big_endian = header.big_endian
    ap.extent = header.pages
    ap.expect = (header.content_hash, snap.key) if header.content_hash is not None else None
    offset = 0
    async for chunk in body:
        await asyncio.to_thread(ap.write, chunk, offset)
        offset += len(chunk)
    if offset != ap.pages * ap.page_size:
        raise CorruptObjectError(
            f"{snap.key}: corrupt object ({offset} bytes, expected {ap.pages * ap.page_size})"
        )


@dataclass
class _Unchecked:
    """Whole WAL frames of one segment, applied but not checked yet."""

    key: str
    frames: bytes
    page_size: int
    big_endian: bool
    salts: tuple[int, int]
    start: tuple[int, int]  # the running checksum before the first frame
    end: tuple[int, int]  # the checksum the last frame records

    def follows(self, prev: _Unchecked) -> bool:
        """Whether these frames continue ``prev``'s in the same WAL epoch."""
        return (self.salts, self.big_endian, self.start) == (prev.salts, prev.big_endian,
                                                             prev.end)


def _check_run(run: list[_Unchecked], plain: bool) -> None:
    """Check the frames of consecutive segments of one WAL epoch in one pass (each must chain
    from the one before); a failure names the segment holding the first frame that fails."""
    first = run[0]
    frames = b"".join(u.frames for u in run) if len(run) > 1 else first.frames
    try:
        verify_frames(frames, first.page_size, first.big_endian, first.salts, first.start,
                      plain=plain)
    except WalError as exc:
        if len(run) > 1:
            for u in run:  # which one: each on its own
                _check_run([u], plain)
        raise CorruptObjectError(f"{first.key}: corrupt object ({exc})") from None


def _check_key(seg: ObjectInfo, header: SegmentHeader, ap: _Applier) -> None:
    if (header.start_txid, header.end_txid) != (seg.start_txid, seg.end_txid):
        raise CorruptObjectError(f"{seg.key}: corrupt object (header does not match its key)")
    if header.page_size != ap.page_size:
        raise CorruptObjectError(f"{seg.key}: page size differs from the snapshot's")


def _check_link(seg: ObjectInfo, part: SegmentPart, ap: _Applier) -> WalPos:
    """The start of a part (a whole segment, or one WAL epoch of a compacted one), which must
    continue from where the previous one ended. A snapshot may stand at the header of an epoch
    none of whose frames it holds (earlier writers recorded that position rather than the end
    of the previous epoch): the segment opening that epoch continues it, its start proving the
    same salts and header checksum."""
    prev, start = part.prev, part.start
    opens = ap.end is not None and ap.end.frame == 0 and start == ap.end
    if prev != ap.end and not opens:
        raise CorruptObjectError(
            f"{seg.key}: does not continue from the previous object (broken chain)"
        )
    if start.frame == 0:
        if part.wal_header is None:
            raise CorruptObjectError(f"{seg.key}: corrupt object (missing WAL header)")
        try:
            wh = parse_wal_header(part.wal_header)
        except WalError:
            raise CorruptObjectError(f"{seg.key}: corrupt object (bad WAL header)") from None
        if wh.salts != start.salts or wh.checksum != start.checksum:
            raise CorruptObjectError(f"{seg.key}: corrupt object (WAL header mismatch)")
    elif start != prev:
        raise CorruptObjectError(f"{seg.key}: does not continue from the previous object")
    return start


class _Frames:
    """Whole WAL frames from a body stream, at most a given number at a time."""

    def __init__(self, body: AsyncIterator[bytes], frame_size: int) -> None:
        self.body = body
        self.fs = frame_size
        self.pending = b""
        self.eof = False

    async def take(self, most: int) -> bytes:
        """Up to ``most`` whole frames (fewer only at the end of the stream: maybe none). A
        chunk that holds them is not copied."""
        want = most * self.fs
        parts = [self.pending] if self.pending else []
        have = len(self.pending)
        while have < want and not self.eof:
            try:
                chunk = await self.body.__anext__()
            except StopAsyncIteration:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        n = min(want, len(data) // self.fs * self.fs)
        if n == len(data):
            self.pending = b""
            return data
        self.pending = data[n:]
        return data[:n]

    async def drain(self) -> int:
        """Read the rest (the object's checksum is verified at its end); bytes left over."""
        left = len(self.pending)
        async for chunk in self.body:
            left += len(chunk)
        self.eof = True
        return left


_FRAMES_AT_ONCE = 256


async def _apply_segment(read: Reader, seg: ObjectInfo, ap: _Applier, stop_txid: int) -> bool:
    """Apply a segment's frames up to ``stop_txid``; True if the stop point was reached."""
    raw, body = await decode_stream(read(seg), seg.key)
    header = SegmentHeader.from_json(raw, seg.key)
    _check_key(seg, header, ap)
    src = _Frames(body, FRAME_HEADER_SIZE + ap.page_size)
    txid = seg.start_txid - 1
    stopped = False
    for part in header.epochs():
        txid, stopped = await _apply_part(seg, part, src, ap, txid, stop_txid)
        if stopped:
            break
        if part.end != ap.end or txid != part.end_txid:
            raise CorruptObjectError(f"{seg.key}: corrupt object (ends at the wrong frame)")
    left = await src.drain()
    if not stopped and (left or txid != seg.end_txid):
        raise CorruptObjectError(f"{seg.key}: corrupt object (ends at the wrong frame)")
    at_end = txid == seg.end_txid and header.content_hash is not None
    ap.expect = (header.content_hash, seg.key) if at_end and header.content_hash else None
    return stopped


async def _apply_part(
    seg: ObjectInfo, part: SegmentPart, src: _Frames, ap: _Applier, txid: int, stop_txid: int
) -> tuple[int, bool]:
    """Apply the frames of one part (one WAL epoch); (last txid applied, stop point reached)."""
    start = _check_link(seg, part, ap)
    ps = ap.page_size
    fs = FRAME_HEADER_SIZE + ps
    ck = start.checksum
    frame_no = start.frame
    left = part.frames
    while left > 0:
        buf = await src.take(min(left, _FRAMES_AT_ONCE))
        if not buf:
            raise CorruptObjectError(f"{seg.key}: corrupt object (partial frame at the end)")
        n = len(buf) // fs
        left -= n
        end = struct.unpack_from(">II", buf, len(buf) - fs + 16)
        ap.check_later(_Unchecked(seg.key, buf, ps, part.big_endian, start.salts, ck, end))
        ck = end
        writes = []
        stopped = False
        for k in range(n):
            off = k * fs
            pgno, commit = struct.unpack_from(">II", buf, off)
            writes.append((buf[off + FRAME_HEADER_SIZE : off + fs], (pgno - 1) * ps))
            ap.extent = max(ap.extent, pgno)
            frame_no += 1
            if commit:
                txid += 1
                ap.pages = commit
                if commit < ap.extent:  # pages past a commit's size are gone
                    ap.queue(writes)
                    writes = []
                    await ap.flush()
                    ap.truncate(commit)
                ck_here = struct.unpack_from(">II", buf, off + 16)
                ap.end = WalPos(start.salt1, start.salt2, frame_no, (ck_here[0], ck_here[1]))
                if txid >= stop_txid:
                    stopped = True
                    break
        ap.queue(writes)
        await ap.flush(force=False)
        if stopped:
            return txid, True
    return txid, False


async def _apply_catchup(read: Reader, obj: ObjectInfo, ap: _Applier) -> None:
    """Apply a catch-up: its pages, then its database size."""
    raw, body = await decode_stream(read(obj), obj.key)
    header = CatchupHeader.from_json(raw, obj.key)
    if header.txid != obj.end_txid:
        raise CorruptObjectError(f"{obj.key}: corrupt object (header does not match its key)")
    if header.page_size != ap.page_size:
        raise CorruptObjectError(f"{obj.key}: page size differs from the snapshot's")
    if header.prev != ap.end:
        raise CorruptObjectError(
            f"{obj.key}: does not continue from the previous object (broken chain)"
        )
    await ap.flush()  # the segments' pages before the catch-up's
    await _apply_pages(obj, body, header, ap)


async def _apply_diff(read: Reader, obj: ObjectInfo, ap: _Applier) -> None:
    """Apply a differential snapshot over the full snapshot just applied."""
    raw, body = await decode_stream(read(obj), obj.key)
    header = DiffHeader.from_json(raw, obj.key)
    if (header.txid, header.base_txid) != (obj.end_txid, obj.start_txid):
        raise CorruptObjectError(f"{obj.key}: corrupt object (header does not match its key)")
    if header.page_size != ap.page_size:
        raise CorruptObjectError(f"{obj.key}: page size differs from the snapshot's")
    if ap.expect is not None and ap.expect[0] != header.base_content_hash:
        raise CorruptObjectError(
            f"{obj.key}: not based on {ap.expect[1]} (its base content hash differs)"
        )
    await _apply_pages(obj, body, header, ap)


async def _apply_pages(
    obj: ObjectInfo, body: AsyncIterator[bytes], header: CatchupHeader | DiffHeader,
    ap: _Applier,
) -> None:
    """Write a body of (page number, page) records, then set the database size to the
    header's ``pages`` (pages past it are gone); the output then stands at its position."""
    pages, changed = header.pages, header.changed
    rec = CATCHUP_PGNO_SIZE + ap.page_size
    pending = bytearray()
    count = 0
    async for chunk in body:
        pending += chunk
        n = len(pending) // rec
        writes = []
        for k in range(n):
            pgno = int.from_bytes(pending[k * rec : k * rec + CATCHUP_PGNO_SIZE], "big")
            if not 1 <= pgno <= pages:
                raise CorruptObjectError(f"{obj.key}: corrupt object (page {pgno})")
            page = bytes(pending[k * rec + CATCHUP_PGNO_SIZE : (k + 1) * rec])
            writes.append((page, (pgno - 1) * ap.page_size))
        del pending[: n * rec]
        count += n
        await asyncio.to_thread(_write_all, ap, writes)
    if pending or count != changed:
        raise CorruptObjectError(f"{obj.key}: corrupt object ({count} pages, expected "
                                 f"{changed})")
    ap.pages = pages
    if pages < max(ap.extent, pages):
        ap.truncate(pages)
    ap.extent = max(ap.extent, pages)
    ap.end = header.position
    ap.big_endian = header.big_endian
    ap.expect = (header.content_hash, obj.key)


def _verify_content(ap: _Applier) -> str | None:
    """Check the output against the content hash recorded where the restore stopped; returns
    the key of the object that recorded it, or None if none did."""
    if ap.expect is None:
        return None
    want, key = ap.expect
    got = file_content_hash(ap.fd, ap.page_size, ap.pages)
    if got != want:
        raise RestoreError(
            f"restored database differs from {key}: content hash {hash_hex(got)}, recorded "
            f"{hash_hex(want)}"
        )
    return key


def _write_all(ap: _Applier, writes: list[tuple[bytes, int]]) -> None:
    for data, off in writes:
        os.pwrite(ap.fd, data, off)


def integrity_check(path: str, quick: bool = False) -> str:
    """``PRAGMA integrity_check`` (``quick``: ``PRAGMA quick_check``, which skips comparing
    every index with its table) on a closed database file without creating -wal/-shm files;
    returns "ok" or the first problems reported."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        # the check looks every index entry up in its table: pages read from a map and a
        # larger cache instead of a system call each time (bounded, whatever the size)
        conn.execute(f"PRAGMA mmap_size = {CHECK_MMAP}")
        conn.execute(f"PRAGMA cache_size = -{CHECK_CACHE_KIB}")
        rows = conn.execute(f"PRAGMA {'quick_check' if quick else 'integrity_check'}").fetchall()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    finally:
        conn.close()
    text = "; ".join(str(r[0]) for r in rows[:5])
    return text


def check_output(output: str, force: bool) -> str:
    """The absolute path of a restore's output; RestoreError if its directory is missing or it
    exists and ``force`` is not set."""
    output = os.path.abspath(output)
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise RestoreError(f"output directory {parent} does not exist")
    if os.path.exists(output) and not force:
        raise RestoreError(f"output {output} already exists; pass --force to overwrite it")
    return output


class _Download:
    """One object being fetched into a temp file, readable while it arrives."""

    def __init__(self, client: StorageClient, info: ObjectInfo, path: str) -> None:
        self.info = info
        self.path = path
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self.progress = asyncio.Event()
        self._wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._rfd = os.open(path, os.O_RDONLY)
        self.task = asyncio.create_task(self._fetch(client))

    async def _fetch(self, client: StorageClient) -> None:
        try:
            async for chunk in client.read_object(self.info):
                await asyncio.to_thread(_pwrite_all, self._wfd, chunk, self.size)
                self.size += len(chunk)
                self.progress.set()
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self.error = exc
        finally:
            self.done = True
            self.progress.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The object's bytes in order, as they arrive; raises the download's error."""
        pos = 0
        while True:
            if pos < self.size:
                n = min(DEFAULT_CHUNK_SIZE, self.size - pos)
                data = await asyncio.to_thread(os.pread, self._rfd, n, pos)
                pos += len(data)
                yield data
                continue
            if self.error is not None:
                if isinstance(self.error, ReplicatorError):
                    raise self.error
                if isinstance(self.error, OSError):
                    raise RestoreError(
                        f"{self.info.key}: cannot write temp file {self.path}: "
                        f"{self.error.strerror or self.error}"
                    )
                raise RestoreError(f"{self.info.key}: download failed: {self.error!r}")
            if self.done:
                return
            self.progress.clear()
            await self.progress.wait()

    async def aclose(self) -> None:
        """Stop the download, close the files and remove the temp file."""
        self.task.cancel()  # a no-op if it finished
        try:
            await asyncio.wait({self.task})  # never raises the download's own error
        finally:
            for fd in (self._wfd, self._rfd):
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _Prefetcher:
    """Reads a restore's objects strictly in order while the next ``depth`` objects download
    concurrently into temp files in ``directory``.

    The first object (the snapshot) streams straight from the destination; every later one is
    read from its temp file as it arrives, and its file is removed once applied. Memory holds a
    chunk per download; the disk holds at most ``depth`` objects.
    """

    def __init__(self, client: StorageClient, infos: list[ObjectInfo], directory: str,
                 depth: int) -> None:
        self.client = client
        self.infos = infos
        self.index = {info.key: i for i, info in enumerate(infos)}
        self.directory = directory
        self.depth = depth
        self.downloads: dict[int, _Download] = {}
        self._next = 1  # the first object is never downloaded ahead

    def _fill(self, upto: int) -> None:
        while self._next < min(upto, len(self.infos)):
            i = self._next
            path = os.path.join(self.directory, f"{i:08d}.obj")
            self.downloads[i] = _Download(self.client, self.infos[i], path)
            self._next += 1

    async def read(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """The bytes of ``info`` (which must be read in plan order)."""
        i = self.index[info.key]
        self._fill(i + 1 + self.depth)
        d = self.downloads.get(i)
        if d is None:
            async for chunk in self.client.read_object(info):
                yield chunk
            return
        async for chunk in d.chunks():
            yield chunk
        del self.downloads[i]
        await d.aclose()

    async def aclose(self) -> None:
        """Cancel every download and remove every temp file."""
        downloads, self.downloads = list(self.downloads.values()), {}
        for d in downloads:
            await d.aclose()


class _Batches:
    """Reads a restore's small objects from a local destination in batches: where the plan has
    consecutive objects of at most ``SMALL_OBJECT`` stored bytes, up to ``SMALL_BATCH`` of them
    are read with one :meth:`~replicator.storage.base.StorageClient.read_objects` call when the
    first one's turn comes, so a history's tail of small segments does not pay a worker call
    each. Other objects (and any of unknown size) stream when their turn comes. Memory holds
    one batch."""

    def __init__(self, client: StorageClient, infos: list[ObjectInfo]) -> None:
        self.client = client
        self.infos = infos
        self.index = {info.key: i for i, info in enumerate(infos)}
        self.held: dict[int, bytes] = {}

    def _run(self, i: int) -> list[ObjectInfo]:
        run: list[ObjectInfo] = []
        for info in self.infos[i : i + SMALL_BATCH]:
            if not 0 < info.size <= SMALL_OBJECT:
                break
            run.append(info)
        return run

    async def read(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """The bytes of ``info`` (which must be read in plan order)."""
        i = self.index[info.key]
        if i not in self.held:
            run = self._run(i)
            if run:
                self.held = dict(enumerate(await self.client.read_objects(run), start=i))
        data = self.held.pop(i, None)
        if data is None:
            async for chunk in self.client.read_object(info):
                yield chunk
            return
        for k in range(0, len(data), DEFAULT_CHUNK_SIZE):
            yield data[k : k + DEFAULT_CHUNK_SIZE]


async def apply_plan(
    client: StorageClient,
    plan: RestorePlan,
    output: str,
    *,
    force: bool = False,
    check: bool = True,
    prefetch: int | None = None,
    progress: Progress | None = None,
    full_check: bool = False,
) -> RestoreResult:
    """Write the planned database to ``output`` (temp file, fsync, checks, rename).

    ``check``: compare the result with the content hash recorded where the restore stops, then
    run ``PRAGMA quick_check`` if it matched, ``PRAGMA integrity_check`` if there was none (or
    ``full_check``); False skips all three.

    From a remote destination the next ``prefetch`` objects (default ``DEFAULT_PREFETCH``; 0 for
    a local directory or memory) download concurrently into a temp directory beside the output
    while the objects are applied strictly in order; the directory is removed either way. From
    a local one, consecutive small objects are read a batch at a time (see ``_Batches``).
    Temp files and directories that a killed restore left beside ``output`` are removed first
    (see ``remove_stale_temps``). ``progress`` hears of every chunk and object read.

    An object of the plan that is gone when it is read (a compaction replaced it, after writing
    the merged object) makes the restore plan the same txid of the same generation again, at
    most ``REPLANS`` times: the result is the same database."""
    for attempt in range(REPLANS + 1):
        try:
            return await _apply_plan(client, plan, output, force, (check, full_check),
                                     prefetch, progress)
        except NotFoundError:
            if attempt == REPLANS:
                raise
            plan = await plan_restore(client, txid=plan.txid, generation=plan.generation)
    raise AssertionError("unreachable")


async def _apply_plan(
    client: StorageClient,
    plan: RestorePlan,
    output: str,
    force: bool,
    check: tuple[bool, bool],
    prefetch: int | None,
    progress: Progress | None,
) -> RestoreResult:
    output = await asyncio.to_thread(check_output, output, force)
    for stale in await asyncio.to_thread(remove_stale_temps, output):
        log.info("removed %s, left by a restore that was killed", stale)
    parent = os.path.dirname(output)
    if prefetch is None:
        prefetch = 0 if client.local else DEFAULT_PREFETCH
    objects = plan.objects
    pf: _Prefetcher | None = None
    tmpdir: str | None = None
    dir_fd = -1
    if prefetch > 0 and len(objects) > 1:
        try:
            tmpdir = await asyncio.to_thread(owned_temp_dir, output)
            dir_fd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY)
            lock_owned(dir_fd)
        except OSError as exc:
            raise RestoreError(f"cannot create a temp directory in {parent}: "
                               f"{exc.strerror}") from None
        pf = _Prefetcher(client, objects, tmpdir, prefetch)
    read: Reader = client.read_object
    if pf is not None:
        read = pf.read
    elif client.local:
        read = _Batches(client, objects).read
    if progress is not None:
        read = _counted(read, progress)
    try:
        return await _apply(read, plan, output, check)
    finally:
        if pf is not None:
            await pf.aclose()
        if tmpdir is not None:
            await asyncio.to_thread(shutil.rmtree, tmpdir, True)
        if dir_fd >= 0:
            os.close(dir_fd)


async def _apply(
    read: Reader, plan: RestorePlan, output: str, checks: tuple[bool, bool]
) -> RestoreResult:
    check, full_check = checks
    parent = os.path.dirname(output)
    tmp = temp_path(output)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise RestoreError(f"cannot write {tmp}: {exc.strerror}") from None
    ok = False
    try:
        lock_owned(fd)
        wal_bytes = sum(s.size for s in plan.segments if s.kind == "wal")
        ap = _Applier(fd, plain=wal_bytes <= PLAIN_WAL_BYTES)
        await _apply_snapshot(read, plan.snapshot, ap)
        if plan.diff is not None:
            await _apply_diff(read, plan.diff, ap)
        try:
            for seg in plan.segments:
                if seg.kind == "catchup":
                    await _apply_catchup(read, seg, ap)
                    if seg.end_txid >= plan.txid:
                        break
                elif await _apply_segment(read, seg, ap, plan.txid):
                    break
        except ReplicatorError:
            ap.check()  # a bad frame before the failing object is the first problem: named
            raise
        await ap.flush()
        os.ftruncate(fd, ap.pages * ap.page_size)
        os.fsync(fd)
        verified = await asyncio.to_thread(_verify_content, ap) if check else None
        os.close(fd)
        fd = -1
        pragma = ("quick_check" if verified is not None and not full_check
                  else "integrity_check")
        result = (await asyncio.to_thread(integrity_check, tmp, pragma == "quick_check")
                  if check else "skipped")
        if check and result != "ok":
            raise RestoreError(f"restored database failed {pragma}: {result}")
        os.replace(tmp, output)
        fsync_dir(parent)
        ok = True
        return RestoreResult(output, plan.txid, ap.pages, ap.page_size, result, verified,
                             pragma if check else "integrity_check")
    except OSError as exc:
        raise RestoreError(f"cannot write {tmp}: {exc.strerror}") from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
