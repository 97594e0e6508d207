"""Typed object headers: what the JSON header of each replica object holds (docs/format.md).

Every module that writes or reads a header goes through these classes; the JSON form exists
only here. ``from_json`` validates every field and raises CorruptObjectError naming the object
and the bad key, so a damaged or foreign header never reaches the code that plans or applies a
restore.

A header's JSON object has its ``kind`` and then its fields in the order they are declared;
each field's JSON form follows from its type (:data:`_CODECS`, or a field's own codec) and a
field typed ``X | None`` may be null or absent.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Self, TypeVar

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


def _hash(v: Any) -> int:
    text = _str(v)
    if len(text) != 32 or text != text.lower():
        raise ValueError("not a content hash")
    return int(text, 16)


class Txn(NamedTuple):
    """One captured transaction: its txid, when it was observed (ns since the epoch), how many
    WAL frames it wrote and the database size in pages after it. A named tuple: a merged
    segment or a restore handles thousands of them, and a tuple is made and read fastest."""

    txid: int
    observed_ns: int
    frames: int
    db_size_pages: int

    def to_json(self) -> list[int]:
        """The JSON form: ``[txid, observed_ns, frames, db_size_pages]``."""
        return list(self)


def _txns(v: Any) -> tuple[Txn, ...]:
    """A non-empty list of transactions, checked in bulk: a merge or a restore reads thousands
    of these."""
    if type(v) is not list or not v:
        raise ValueError("not a transaction list")
    if not all(type(t) is list and len(t) == 4 for t in v) or not all(
        type(x) is int for t in v for x in t
    ):
        raise ValueError("not a transaction record")
    return tuple(map(Txn._make, v))


@dataclass(frozen=True)
class _Codec:
    """A field's JSON form: ``parse`` checks and converts it (raising TypeError/ValueError),
    ``dump`` makes it from a value that is not None."""

    parse: Callable[[Any], Any]
    dump: Callable[[Any], object]


def _same(v: Any) -> object:
    return v


_HASH = {"codec": _Codec(_hash, lambda v: f"{v:032x}")}
"""The metadata of a content hash field: 32 lowercase hex digits."""


class _Record:
    """A header, or a part of one, whose JSON form follows its dataclass fields (see the
    module docstring); ``kind`` (if any) is checked on parsing and written first."""

    kind: ClassVar[str] = ""

    def to_json(self) -> dict[str, object]:
        """The JSON object written into the object."""
        doc: dict[str, object] = {"kind": self.kind} if self.kind else {}
        for name, codec, _ in _layout(type(self)):
            value = getattr(self, name)
            doc[name] = None if value is None else codec.dump(value)
        return doc

    @classmethod
    def from_json(cls, obj: object, key: str) -> Self:
        """Parse and validate; raises CorruptObjectError naming ``key`` and the bad field."""
        f = _Fields(obj, key)
        if cls.kind and f.obj.get("kind") != cls.kind:
            raise f.bad("kind")
        values = {name: f.opt(name, codec.parse) if optional else f.get(name, codec.parse)
                  for name, codec, optional in _layout(cls)}
        return cls(**values)


@dataclass(frozen=True)
class SnapshotHeader(_Record):
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
    content_hash: int | None = field(default=None, metadata=_HASH)

    kind: ClassVar[str] = "snapshot"


@dataclass(frozen=True)
class SegmentPart(_Record):
    """The frames of one WAL epoch inside a segment: transactions ``start_txid..end_txid``,
    ``frames`` frames from position ``start`` (continuing ``prev``) to ``end``."""

    start_txid: int
    end_txid: int
    big_endian: bool
    prev: WalPos | None
    start: WalPos
    end: WalPos
    wal_header: bytes | None  # its epoch's WAL header, when the part starts it (frame 0)
    frames: int

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
class SegmentHeader(_Record):
    """The header of a WAL segment: whole committed transactions ``start_txid..end_txid``."""

    generation: str
    start_txid: int
    end_txid: int
    page_size: int
    big_endian: bool
    prev: WalPos | None
    start: WalPos
    end: WalPos
    wal_header: bytes | None  # the WAL header, when the segment starts an epoch (frame 0)
    frames: int
    txns: tuple[Txn, ...]
    content_hash: int | None = field(default=None, metadata=_HASH)
    # the first segment after a restart that resumed from the WAL: the interval the replicator
    # did not observe it (transactions committed then were observed when it came back)
    unobserved_from_ns: int | None = None
    unobserved_to_ns: int | None = None
    parts: tuple[SegmentPart, ...] | None = None

    kind: ClassVar[str] = "wal"

    @classmethod
    def from_json(cls, obj: object, key: str) -> Self:
        """Parse and validate (its parts and transactions must add up); raises
        CorruptObjectError naming ``key`` and the bad field."""
        header = super().from_json(obj, key)
        if header.parts is not None and not _parts_fit(header, header.parts):
            raise _Fields(obj, key).bad("parts")
        if [t.txid for t in header.txns] != list(range(header.start_txid,
                                                       header.end_txid + 1)):
            raise _Fields(obj, key).bad("txns")
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


def _parts(v: Any) -> tuple[SegmentPart, ...]:
    if not isinstance(v, list) or not v:
        raise ValueError("not a part list")
    try:
        return tuple(SegmentPart.from_json(p, "") for p in v)
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
class CatchupHeader(_Record):
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
    content_hash: int = field(metadata=_HASH)
    reason: Reason

    kind: ClassVar[str] = "catchup"

    @property
    def txn(self) -> Txn:
        """The catch-up as one transaction (observed when it was taken)."""
        return Txn(self.txid, self.ts_ns, self.changed, self.pages)


@dataclass(frozen=True)
class DiffHeader(_Record):
    """The header of a differential snapshot: the pages of the state after ``txid`` that differ
    from the full snapshot of ``base_txid`` (whose content hash is ``base_content_hash``)."""

    generation: str
    txid: int
    base_txid: int
    base_content_hash: int = field(metadata=_HASH)
    ts_ns: int
    page_size: int
    pages: int
    big_endian: bool
    position: WalPos | None
    changed: int
    content_hash: int = field(metadata=_HASH)

    kind: ClassVar[str] = "diff"


ObjectHeader = SnapshotHeader | SegmentHeader | CatchupHeader | DiffHeader
ChangeHeader = SegmentHeader | CatchupHeader

_CODECS: dict[object, _Codec] = {
    str: _Codec(_str, _same),
    int: _Codec(_int, _same),
    bool: _Codec(_bool, _same),
    bytes: _Codec(_hex, bytes.hex),
    WalPos: _Codec(_pos, WalPos.to_json),
    Reason: _Codec(Reason, lambda r: r.value),
    tuple[Txn, ...]: _Codec(_txns, lambda ts: list(map(Txn.to_json, ts))),
    tuple[SegmentPart, ...]: _Codec(_parts, lambda ps: [p.to_json() for p in ps]),
}
"""The JSON form of each field type."""


_Layout = tuple[tuple[str, _Codec, bool], ...]
_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    """(name, codec, may be null) of each field of a header class, in order."""
    if cls not in _LAYOUTS:
        _LAYOUTS[cls] = _make_layout(cls)
    return _LAYOUTS[cls]


def _make_layout(cls: type) -> _Layout:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and (
            type(None) in args)
        if optional:
            (tp,) = (a for a in args if a is not type(None))
        out.append((f.name, f.metadata.get("codec") or _CODECS[tp], optional))
    return tuple(out)


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
