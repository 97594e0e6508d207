"""Positions and object keys.

A replica is a tree of *generations*. A generation is one unbroken lineage of the database: it
starts with a snapshot at txid 0 and continues with WAL segments, each holding whole committed
transactions ``start_txid..end_txid``. Periodic snapshots inside a generation are taken at the txid
of the last transaction they contain. Every key is built and parsed here and nowhere else::

    generations/<gen>/snapshots/<txid:016x>-<ts_ms:012x>.snap
    generations/<gen>/wal/<start:016x>-<end:016x>-<first_ms:012x>-<last_ms:012x>.seg
    generations/<gen>/wal/<txid:016x>-<txid:016x>-<from_ms:012x>-<ts_ms:012x>.cu
    generations/<gen>/snapshots/<txid:016x>-<base:016x>-<ts_ms:012x>.dsnap
    lease.json                                     (the fencing record, see replicator.lease)

A ``.cu`` object is a *catch-up*: the pages that changed while the replicator could not observe
the WAL (from ``from_ms`` to ``ts_ms``), as one pseudo-transaction ``txid``. A ``.dsnap``
object is a *differential snapshot*: the pages of the state after ``txid`` that differ from the
full snapshot at txid ``base`` of the same generation.

``ts_ms`` values are the wall-clock times (ms since the Unix epoch) at which the replicator observed
the transactions; the object header carries the same times in nanoseconds, per transaction.
"""

from __future__ import annotations

import functools
import operator
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

GENERATIONS_DIR = "generations"
# The one key outside generations/: the fencing record (see replicator.lease and docs/format.md).
LEASE_KEY = "lease.json"
_GEN_RE = re.compile(r"^[0-9a-f]{16}$")
_SNAP_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{12})\.snap$")
_DIFF_RE = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{12})\.dsnap$")
_SEG_RE = re.compile(
    r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{12})-([0-9a-f]{12})\.(seg|cu)$"
)

Kind = Literal["snapshot", "wal", "catchup", "diff"]
_KINDS: tuple[Kind, ...] = ("wal", "catchup", "snapshot", "diff")  # by kind_order


def new_generation_id(now_ns: int | None = None) -> str:
    """A new generation id: 12 hex digits of milliseconds since the epoch, 4 random hex digits.

    Ids sort in creation order, so the newest generation is the greatest.
    """
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    return f"{ms & 0xFFFFFFFFFFFF:012x}{int.from_bytes(os.urandom(2), 'big'):04x}"


def is_generation_id(name: str) -> bool:
    """Whether ``name`` has the form of a generation id."""
    return bool(_GEN_RE.fullmatch(name))


def generation_time_ms(gen: str) -> int:
    """The creation time (ms since the epoch) encoded in a generation id."""
    return int(gen[:12], 16)


@dataclass(frozen=True, order=True)
class ObjectInfo:
    """One snapshot or WAL segment, as named by its key.

    For a snapshot ``start_txid == end_txid`` is the txid of the last transaction it contains and
    ``first_ms == last_ms`` its observation time. For a differential snapshot ``end_txid`` is
    the txid of its state and ``start_txid`` the txid of the full snapshot it is based on.
    """

    generation: str
    end_txid: int
    # 0 = wal, 1 = catch-up, 2 = snapshot, 3 = differential snapshot: at equal end_txid the
    # snapshots sort last
    kind_order: int
    start_txid: int
    first_ms: int
    last_ms: int
    size: int = 0

    @property
    def kind(self) -> Kind:
        """``"snapshot"``, ``"wal"``, ``"catchup"`` or ``"diff"``."""
        return _KINDS[self.kind_order]

    @functools.cached_property
    def key(self) -> str:
        """The object's key relative to the replica root."""
        if self.kind == "snapshot":
            return snapshot_key(self.generation, self.end_txid, self.last_ms)
        if self.kind == "diff":
            return diff_key(self.generation, self.end_txid, self.start_txid, self.last_ms)
        if self.kind == "catchup":
            return catchup_key(self.generation, self.end_txid, self.first_ms, self.last_ms)
        return segment_key(
            self.generation, self.start_txid, self.end_txid, self.first_ms, self.last_ms
        )

    @property
    def name(self) -> str:
        """The last path component of the key."""
        return self.key.rsplit("/", 1)[1]


# ObjectInfo's fields in order: the key that sorts as the dataclass compares, in C
_ORDER = operator.attrgetter(
    "generation", "end_txid", "kind_order", "start_txid", "first_ms", "last_ms", "size"
)


def sort_objects(infos: Iterable[ObjectInfo]) -> list[ObjectInfo]:
    """``sorted(infos)``, without a Python-level comparison per pair (a listing of thousands of
    objects sorts several times faster)."""
    return sorted(infos, key=_ORDER)


def snapshot_info(gen: str, txid: int, ts_ms: int, size: int = 0) -> ObjectInfo:
    """The ObjectInfo of a snapshot."""
    return ObjectInfo(gen, txid, 2, txid, ts_ms, ts_ms, size)


def segment_info(
    gen: str, start: int, end: int, first_ms: int, last_ms: int, size: int = 0
) -> ObjectInfo:
    """The ObjectInfo of a WAL segment."""
    return ObjectInfo(gen, end, 0, start, first_ms, last_ms, size)


def catchup_info(gen: str, txid: int, from_ms: int, ts_ms: int, size: int = 0) -> ObjectInfo:
    """The ObjectInfo of a catch-up object (unobserved from ``from_ms``, taken at ``ts_ms``)."""
    return ObjectInfo(gen, txid, 1, txid, from_ms, ts_ms, size)


def diff_info(gen: str, txid: int, base_txid: int, ts_ms: int, size: int = 0) -> ObjectInfo:
    """The ObjectInfo of a differential snapshot of txid ``txid`` over the full snapshot of
    ``base_txid``."""
    return ObjectInfo(gen, txid, 3, base_txid, ts_ms, ts_ms, size)


def generation_prefix(gen: str) -> str:
    """The key prefix of a generation."""
    return f"{GENERATIONS_DIR}/{gen}/"


def snapshot_key(gen: str, txid: int, ts_ms: int) -> str:
    """The key of a snapshot."""
    return f"{GENERATIONS_DIR}/{gen}/snapshots/{txid:016x}-{ts_ms:012x}.snap"


def segment_key(gen: str, start: int, end: int, first_ms: int, last_ms: int) -> str:
    """The key of a WAL segment."""
    return f"{GENERATIONS_DIR}/{gen}/wal/{start:016x}-{end:016x}-{first_ms:012x}-{last_ms:012x}.seg"


def catchup_key(gen: str, txid: int, from_ms: int, ts_ms: int) -> str:
    """The key of a catch-up object."""
    return f"{GENERATIONS_DIR}/{gen}/wal/{txid:016x}-{txid:016x}-{from_ms:012x}-{ts_ms:012x}.cu"


def diff_key(gen: str, txid: int, base_txid: int, ts_ms: int) -> str:
    """The key of a differential snapshot."""
    return f"{GENERATIONS_DIR}/{gen}/snapshots/{txid:016x}-{base_txid:016x}-{ts_ms:012x}.dsnap"


def parse_key(key: str, size: int = 0) -> ObjectInfo | None:
    """Parse a key (relative to the replica root); None for a key that is not an object."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != GENERATIONS_DIR or not is_generation_id(parts[1]):
        return None
    gen, folder, name = parts[1], parts[2], parts[3]
    if folder == "snapshots":
        m = _SNAP_RE.fullmatch(name)
        if m:
            return snapshot_info(gen, int(m[1], 16), int(m[2], 16), size)
        m = _DIFF_RE.fullmatch(name)
        if m and int(m[2], 16) < int(m[1], 16):
            return diff_info(gen, int(m[1], 16), int(m[2], 16), int(m[3], 16), size)
    elif folder == "wal":
        m = _SEG_RE.fullmatch(name)
        if m and m[5] == "cu":
            if m[1] != m[2]:
                return None
            return catchup_info(gen, int(m[1], 16), int(m[3], 16), int(m[4], 16), size)
        if m:
            return segment_info(
                gen, int(m[1], 16), int(m[2], 16), int(m[3], 16), int(m[4], 16), size
            )
    return None


@dataclass(frozen=True)
class WalPos:
    """A point in the WAL's lineage: after frame ``frame`` of the epoch with salts
    ``(salt1, salt2)``, with running checksum ``checksum`` (frame 0: the header checksum)."""

    salt1: int
    salt2: int
    frame: int
    checksum: tuple[int, int]

    @property
    def salts(self) -> tuple[int, int]:
        """The epoch's salts."""
        return (self.salt1, self.salt2)

    def to_json(self) -> dict[str, object]:
        """The JSON form used in object headers."""
        return {
            "salt1": self.salt1,
            "salt2": self.salt2,
            "frame": self.frame,
            "checksum": [self.checksum[0], self.checksum[1]],
        }

    @classmethod
    def from_json(cls, obj: object) -> WalPos | None:
        """Parse the JSON form (None stays None); raises ValueError on a malformed value."""
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise ValueError("position is not an object")
        ck = obj["checksum"]
        return cls(
            int(obj["salt1"]), int(obj["salt2"]), int(obj["frame"]), (int(ck[0]), int(ck[1]))
        )
