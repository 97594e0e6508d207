"""Typed object headers: what the JSON header of each replica object holds (docs/format.md).

Every module that writes or reads a header goes through these classes; the JSON form exists
only here. ``from_json`` validates every field and raises CorruptObjectError naming the object
and the bad key, so a damaged or foreign header never reaches the code that plans or applies a
restore.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

from .errors import CorruptObjectError
from .pos import WalPos

T = TypeVar("T")


class Reason(StrEnum):
    """Why a snapshot or catch-up was taken. A snapshot for any reason but ``interval`` starts a
    new generation; a catch-up (``resume_failed``, ``wal_reset``, ``wal_shrunk``) continues one."""

    NO_POSITION = "no_position"
    RESUME_FAILED = "resume_failed"
    WAL_RESET = "wal_reset"
    DB_REPLACED = "db_replaced"
    PAGE_SIZE = "page_size"
    WAL_SHRUNK = "wal_shrunk"
    INTERVAL = "interval"
    NO_INDEX = "no_index"

    @property
    def text(self) -> str:
        """The reason in words, for logs."""
        return _REASON_TEXT[self]


_REASON_TEXT = {
    Reason.NO_POSITION: "no previous position",
    Reason.RESUME_FAILED: "WAL changed while the replicator was stopped",
    Reason.WAL_RESET: "WAL reset by a checkpoint the replicator could not prove continuous",
    Reason.DB_REPLACED: "database file replaced",
    Reason.PAGE_SIZE: "page size changed",
    Reason.WAL_SHRUNK: "WAL shorter than the last captured frame",
    Reason.INTERVAL: "snapshot interval",
    Reason.NO_INDEX: "no trustworthy page index",
}


class _Fields:
    """Typed access to a header's JSON object; any bad value names the object and the key."""

    def __init__(self, obj: object, key: str) -> None:
        if not isinstance(obj, dict):
            raise CorruptObjectError(f"{key}: corrupt object (bad header)")
        self.obj: dict[str, Any] = obj
        self.key = key

    def bad(self, name: str) -> CorruptObjectError:
        """The error for a missing or malformed field."""
        return CorruptObjectError(f"{self.key}: corrupt object (bad header field {name!r})")

    def get(self, name: str, conv: Callable[[Any], T]) -> T:
        """``conv(value)`` of a field that must be there."""
        value = self.opt(name, conv)
        if value is None:
            raise self.bad(name)
        return value

    def opt(self, name: str, conv: Callable[[Any], T]) -> T | None:
        """``conv(value)``, or None for a null or absent field."""
        value = self.obj.get(name)
        if value is None:
            return None
        try:
            return conv(value)
        except (TypeError, ValueError, KeyError, IndexError):
            raise self.bad(name) from None

    def int(self, name: str) -> int:
        """An integer field (booleans are not integers here)."""
        return self.get(name, _int)


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("not an integer")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("not a string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("not a boolean")
    return v


def _hex(v: Any) -> bytes:
    return bytes.fromhex(_str(v))


def _pos(v: Any) -> WalPos:
    pos = WalPos.from_json(v)
    if pos is None:
        raise ValueError("null position")
    return pos


def _opt_pos_json(pos: WalPos | None) -> dict[str, object] | None:
    return pos.to_json() if pos is not None else None


def _hash(v: Any) -> int:
    text = _str(v)
    if len(text) != 32 or text != text.lower():
        raise ValueError("not a content hash")
    return int(text, 16)


def _opt_hash_json(value: int | None) -> str | None:
    return f"{value:032x}" if value is not None else None


@dataclass(frozen=True, slots=True)
class Txn:
    """One captured transaction: its txid, when it was observed (ns since the epoch), how many
    WAL frames it wrote and the database size in pages after it."""

    txid: int
    observed_ns: int
    frames: int
    db_size_pages: int

    def to_json(self) -> list[int]:
        """The JSON form: ``[txid, observed_ns, frames, db_size_pages]``."""
        return [self.txid, self.observed_ns, self.frames, self.db_size_pages]

    @classmethod
    def from_json(cls, v: Any) -> Txn:
        """Parse the JSON form; raises ValueError/TypeError on a malformed value."""
        if not isinstance(v, list) or len(v) != 4:
            raise ValueError("not a transaction record")
        return cls(*(_int(x) for x in v))


def _txns(v: Any) -> tuple[Txn, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError("not a transaction list")
    return tuple(Txn.from_json(t) for t in v)


@dataclass(frozen=True)
class SnapshotHeader:
    """The header of a snapshot: the database's pages 1..``pages`` as of ``txid``."""

    generation: str
    txid: int
    ts_ns: int
    page_size: int
    pages: int
    big_endian: bool
    position: WalPos | None
    reason: Reason
    db: str | None = None
    previous_generation: str | None = None
    previous_txid: int | None = None
    previous_confirmed_ns: int | None = None
    content_hash: int | None = None

    kind: ClassVar[str] = "snapshot"

    def to_json(self) -> dict[str, object]:
        """The JSON object written into the object."""
        return {
            "kind": self.kind,
            "generation": self.generation,
            "txid": self.txid,
            "ts_ns": self.ts_ns,
            "page_size": self.page_size,
            "pages": self.pages,
            "big_endian": self.big_endian,
            "position": _opt_pos_json(self.position),
            "reason": self.reason.value,
            "db": self.db,
            "previous_generation": self.previous_generation,
            "previous_txid": self.previous_txid,
            "previous_confirmed_ns": self.previous_confirmed_ns,
            "content_hash": _opt_hash_json(self.content_hash),
        }

    @classmethod
    def from_json(cls, obj: object, key: str) -> SnapshotHeader:
        """Parse and validate; raises CorruptObjectError naming ``key`` and the bad field."""
        f = _Fields(obj, key)
        _check_kind(f, cls.kind)
        return cls(
            generation=f.get("generation", _str),
            txid=f.int("txid"),
            ts_ns=f.int("ts_ns"),
            page_size=f.int("page_size"),
            pages=f.int("pages"),
            big_endian=f.get("big_endian", _bool),
            position=f.opt("position", _pos),
            reason=f.get("reason", Reason),
            db=f.opt("db", _str),
            previous_generation=f.opt("previous_generation", _str),
            previous_txid=f.opt("previous_txid", _int),
            previous_confirmed_ns=f.opt("previous_confirmed_ns", _int),
            content_hash=f.opt("content_hash", _hash),
        )


@dataclass(frozen=True)
class SegmentPart:
    """The frames of one WAL epoch inside a segment: transactions ``start_txid..end_txid``,
    ``frames`` frames from position ``start`` (continuing ``prev``) to ``end``."""

    start_txid: int
    end_txid: int
    big_endian: bool
    prev: WalPos | None
    start: WalPos
    end: WalPos
    wal_header: bytes | None
    frames: int

    def to_json(self) -> dict[str, object]:
        """The JSON object of one entry of ``parts``."""
        return {
            "start_txid": self.start_txid,
            "end_txid": self.end_txid,
            "big_endian": self.big_endian,
            "prev": _opt_pos_json(self.prev),
            "start": self.start.to_json(),
            "end": self.end.to_json(),
            "wal_header": self.wal_header.hex() if self.wal_header is not None else None,
            "frames": self.frames,
        }

    @classmethod
    def from_json(cls, obj: object, key: str) -> SegmentPart:
        """Parse and validate one entry of ``parts``."""
        f = _Fields(obj, key)
        return cls(
            start_txid=f.int("start_txid"),
            end_txid=f.int("end_txid"),
            big_endian=f.get("big_endian", _bool),
            prev=f.opt("prev", _pos),
            start=f.get("start", _pos),
            end=f.get("end", _pos),
            wal_header=f.opt("wal_header", _hex),
            frames=f.int("frames"),
        )

    def continues(self, prev: SegmentPart) -> bool:
        """Whether this part continues ``prev`` inside the same WAL epoch."""
        return (
            self.start == prev.end
            and self.prev == prev.end
            and self.start.frame > 0
            and self.big_endian == prev.big_endian
            and self.start_txid == prev.end_txid + 1
        )


@dataclass(frozen=True)
class SegmentHeader:
    """The header of a WAL segment: whole committed transactions ``start_txid..end_txid``."""

    generation: str
    start_txid: int
    end_txid: int
    page_size: int
    big_endian: bool
    prev: WalPos | None
    start: WalPos
    end: WalPos
    wal_header: bytes | None
    frames: int
    txns: tuple[Txn, ...]
    content_hash: int | None = None
    # the first segment after a restart that resumed from the WAL: the interval the replicator
    # did not observe it (transactions committed then were observed when it came back)
    unobserved_from_ns: int | None = None
    unobserved_to_ns: int | None = None
    parts: tuple[SegmentPart, ...] | None = None

    kind: ClassVar[str] = "wal"

    def to_json(self) -> dict[str, object]:
        """The JSON object written into the object."""
        return {
            "kind": self.kind,
            "generation": self.generation,
            "start_txid": self.start_txid,
            "end_txid": self.end_txid,
            "page_size": self.page_size,
            "big_endian": self.big_endian,
            "prev": _opt_pos_json(self.prev),
            "start": self.start.to_json(),
            "end": self.end.to_json(),
            "wal_header": self.wal_header.hex() if self.wal_header is not None else None,
            "frames": self.frames,
            "txns": [t.to_json() for t in self.txns],
            "content_hash": _opt_hash_json(self.content_hash),
            "unobserved_from_ns": self.unobserved_from_ns,
            "unobserved_to_ns": self.unobserved_to_ns,
            "parts": [p.to_json() for p in self.parts] if self.parts is not None else None,
        }

    @classmethod
    def from_json(cls, obj: object, key: str) -> SegmentHeader:
        """Parse and validate; raises CorruptObjectError naming ``key`` and the bad field."""
        f = _Fields(obj, key)
        _check_kind(f, cls.kind)
        header = cls(
            generation=f.get("generation", _str),
            start_txid=f.int("start_txid"),
            end_txid=f.int("end_txid"),
            page_size=f.int("page_size"),
            big_endian=f.get("big_endian", _bool),
            prev=f.opt("prev", _pos),
            start=f.get("start", _pos),
            end=f.get("end", _pos),
            wal_header=f.opt("wal_header", _hex),
            frames=f.int("frames"),
            txns=f.get("txns", _txns),
            content_hash=f.opt("content_hash", _hash),
            unobserved_from_ns=f.opt("unobserved_from_ns", _int),
            unobserved_to_ns=f.opt("unobserved_to_ns", _int),
            parts=f.opt("parts", lambda v: _parts(v, key)),
        )
        if header.parts is not None and not _parts_fit(header, header.parts):
            raise f.bad("parts")
        if len(header.txns) != header.end_txid - header.start_txid + 1 or any(
            t.txid != header.start_txid + i for i, t in enumerate(header.txns)
        ):
            raise f.bad("txns")
        return header

    def follows(self, prev: SegmentHeader) -> bool:
        """Whether this segment continues ``prev`` inside the same WAL epoch."""
        return (
            self.unobserved_from_ns is None
            and self.start == prev.end
            and self.prev == prev.end
            and self.start.frame > 0
            and self.start_txid == prev.end_txid + 1
            and self.parts is None
            and prev.parts is None
        )

    def epochs(self) -> tuple[SegmentPart, ...]:
        """The segment's parts: ``parts``, or the whole segment as one part (one WAL epoch)."""
        if self.parts is not None:
            return self.parts
        return (SegmentPart(self.start_txid, self.end_txid, self.big_endian, self.prev,
                            self.start, self.end, self.wal_header, self.frames),)


def _parts(v: Any, key: str) -> tuple[SegmentPart, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError("not a part list")
    try:
        return tuple(SegmentPart.from_json(p, key) for p in v)
    except CorruptObjectError:
        raise ValueError("bad part") from None


def _parts_fit(h: SegmentHeader, parts: tuple[SegmentPart, ...]) -> bool:
    """Whether parts tile the segment: contiguous txids, its ends, its frame count."""
    return (
        parts[0].start_txid == h.start_txid
        and parts[-1].end_txid == h.end_txid
        and parts[0].prev == h.prev
        and parts[0].start == h.start
        and parts[-1].end == h.end
        and sum(p.frames for p in parts) == h.frames
        and all(b.start_txid == a.end_txid + 1 and b.prev == a.end
                for a, b in zip(parts, parts[1:], strict=False))
    )


@dataclass(frozen=True)
class CatchupHeader:
    """The header of a catch-up object: the pages that differ between the state after txid - 1
    and the database as found at ``ts_ns``, after an interval the replicator did not observe."""

    generation: str
    txid: int
    ts_ns: int
    unobserved_from_ns: int
    page_size: int
    pages: int
    big_endian: bool
    prev: WalPos | None
    position: WalPos | None
    changed: int
    content_hash: int
    reason: Reason

    kind: ClassVar[str] = "catchup"

    def to_json(self) -> dict[str, object]:
        """The JSON object written into the object."""
        return {
            "kind": self.kind,
            "generation": self.generation,
            "txid": self.txid,
            "ts_ns": self.ts_ns,
            "unobserved_from_ns": self.unobserved_from_ns,
            "page_size": self.page_size,
            "pages": self.pages,
            "big_endian": self.big_endian,
            "prev": _opt_pos_json(self.prev),
            "position": _opt_pos_json(self.position),
            "changed": self.changed,
            "content_hash": _opt_hash_json(self.content_hash),
            "reason": self.reason.value,
        }

    @classmethod
    def from_json(cls, obj: object, key: str) -> CatchupHeader:
        """Parse and validate; raises CorruptObjectError naming ``key`` and the bad field."""
        f = _Fields(obj, key)
        _check_kind(f, cls.kind)
        return cls(
            generation=f.get("generation", _str),
            txid=f.int("txid"),
            ts_ns=f.int("ts_ns"),
            unobserved_from_ns=f.int("unobserved_from_ns"),
            page_size=f.int("page_size"),
            pages=f.int("pages"),
            big_endian=f.get("big_endian", _bool),
            prev=f.opt("prev", _pos),
            position=f.opt("position", _pos),
            changed=f.int("changed"),
            content_hash=f.get("content_hash", _hash),
            reason=f.get("reason", Reason),
        )

    @property
    def txn(self) -> Txn:
        """The catch-up as one transaction (observed when it was taken)."""
        return Txn(self.txid, self.ts_ns, self.changed, self.pages)


@dataclass(frozen=True)
class DiffHeader:
    """The header of a differential snapshot: the pages of the state after ``txid`` that differ
    from the full snapshot of ``base_txid`` (whose content hash is ``base_content_hash``)."""

    generation: str
    txid: int
    base_txid: int
    base_content_hash: int
    ts_ns: int
    page_size: int
    pages: int
    big_endian: bool
    position: WalPos | None
    changed: int
    content_hash: int

    kind: ClassVar[str] = "diff"

    def to_json(self) -> dict[str, object]:
        """The JSON object written into the object."""
        return {
            "kind": self.kind,
            "generation": self.generation,
            "txid": self.txid,
            "base_txid": self.base_txid,
            "base_content_hash": _opt_hash_json(self.base_content_hash),
            "ts_ns": self.ts_ns,
            "page_size": self.page_size,
            "pages": self.pages,
            "big_endian": self.big_endian,
            "position": _opt_pos_json(self.position),
            "changed": self.changed,
            "content_hash": _opt_hash_json(self.content_hash),
        }

    @classmethod
    def from_json(cls, obj: object, key: str) -> DiffHeader:
        """Parse and validate; raises CorruptObjectError naming ``key`` and the bad field."""
        f = _Fields(obj, key)
        _check_kind(f, cls.kind)
        return cls(
            generation=f.get("generation", _str),
            txid=f.int("txid"),
            base_txid=f.int("base_txid"),
            base_content_hash=f.get("base_content_hash", _hash),
            ts_ns=f.int("ts_ns"),
            page_size=f.int("page_size"),
            pages=f.int("pages"),
            big_endian=f.get("big_endian", _bool),
            position=f.opt("position", _pos),
            changed=f.int("changed"),
            content_hash=f.get("content_hash", _hash),
        )


ObjectHeader = SnapshotHeader | SegmentHeader | CatchupHeader | DiffHeader
ChangeHeader = SegmentHeader | CatchupHeader


def _check_kind(f: _Fields, kind: str) -> None:
    if f.obj.get("kind") != kind:
        raise f.bad("kind")


def header_from_json(obj: object, key: str) -> ObjectHeader:
    """The typed header of any object (by its ``kind``)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == SnapshotHeader.kind:
        return SnapshotHeader.from_json(obj, key)
    if kind == SegmentHeader.kind:
        return SegmentHeader.from_json(obj, key)
    if kind == CatchupHeader.kind:
        return CatchupHeader.from_json(obj, key)
    if kind == DiffHeader.kind:
        return DiffHeader.from_json(obj, key)
    raise _Fields(obj, key).bad("kind")
