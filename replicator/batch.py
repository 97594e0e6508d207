"""Batching: consecutive spooled WAL segments of one WAL epoch shipped as one object.

Capture writes one segment per step: many small ones per second under a steady trickle of
commits, and a backlog of them while a destination is down. A remote destination pays per
request, so a replica ships each run of consecutive segments it lacks as one object. The merged
object is an ordinary segment (docs/format.md): the same header fields, the parts' frames back to
back in one zstd frame, the parts' transactions and observed times; restore cannot tell it from
a captured one. Runs break where a WAL epoch ends (a segment starting at frame 0), at a snapshot,
at MAX_PARTS / MAX_BYTES, and, for a destination that compacts, where a window of its first
level ends: every object it holds then lies in one window (or is a single captured segment),
as a local directory's do, so that its merges are a local directory's merges, under the same
keys, and compaction reads them locally instead of downloading them. Parts are verified
(trailer checksum) as they are read.
"""

from __future__ import annotations

import dataclasses
import os

from .compact import copy_body, window_ms
from .format import DEFAULT_LEVEL, KIND_WAL, ObjectWriter
from .fsutil import temp_path
from .headers import SegmentHeader
from .pos import ObjectInfo, segment_info
from .spool import Spool
from .wal import frame_size

MAX_PARTS = 4096
MAX_BYTES = 32 << 20  # spooled bytes in one merged object
OUTGOING_DIR = "outgoing"


Group = tuple[list[ObjectInfo], list[SegmentHeader]]


def plan(spool: Spool, pending: list[ObjectInfo], window: float | None = None) -> list[Group]:
    """Group ``pending`` (in shipping order) into runs to ship as one object each, with the
    parts' headers (none for a snapshot), none spanning two windows of ``window`` seconds
    (None: no such break). Sizes come from the spool's index."""
    width = window_ms(window) if window else None
    groups: list[Group] = []
    size = 0
    for info in pending:
        if info.kind != "wal":
            groups.append(([info], []))
            continue
        header = spool.read_header(info)
        assert isinstance(header, SegmentHeader), info.key
        if groups:
            parts, headers = groups[-1]
            last = parts[-1]
            if (
                headers
                and last.generation == info.generation
                and len(parts) < MAX_PARTS
                and size + info.size <= MAX_BYTES
                and header.follows(headers[-1])
                and (width is None or info.last_ms // width == parts[0].first_ms // width)
            ):
                parts.append(info)
                headers.append(header)
                size += info.size
                continue
        groups.append(([info], [header]))
        size = info.size
    return groups


def _stored(info: ObjectInfo, header: SegmentHeader) -> bool:
    """Whether a spooled segment's body was stored uncompressed (a write burst)."""
    raw = header.frames * frame_size(header.page_size)
    return info.size >= raw > 0


def merge(
    spool: Spool, parts: list[ObjectInfo], headers: list[SegmentHeader]
) -> tuple[ObjectInfo, str]:
    """Write the merged object of ``parts`` (as planned: sizes known) to a temp file under the
    spool; returns its info and path (the caller removes the file). Stored uncompressed when any
    part was. Runs in a worker thread: it decompresses and compresses."""
    first, last = headers[0], headers[-1]
    header = dataclasses.replace(
        first,
        end_txid=last.end_txid,
        end=last.end,
        frames=sum(h.frames for h in headers),
        txns=tuple(t for h in headers for t in h.txns),
        content_hash=last.content_hash,
        unobserved_from_ns=first.unobserved_from_ns,
        unobserved_to_ns=first.unobserved_to_ns,
    )
    info = segment_info(parts[0].generation, parts[0].start_txid, parts[-1].end_txid,
                        parts[0].first_ms, parts[-1].last_ms)
    stored = any(_stored(p, h) for p, h in zip(parts, headers, strict=True))
    level = None if stored else DEFAULT_LEVEL
    outdir = os.path.join(spool.root, OUTGOING_DIR)
    os.makedirs(outdir, exist_ok=True)
    path = temp_path(os.path.join(outdir, f"{info.generation}-{info.start_txid}-{info.end_txid}"))
    try:
        with open(path, "wb") as f:
            w = ObjectWriter(f, KIND_WAL, header.to_json(), level)
            for part in parts:
                copy_body(w, spool.path(part), part.key, header_read=True)
            w.close()
            size = w.size
    except BaseException:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    return dataclasses.replace(info, size=size), path
