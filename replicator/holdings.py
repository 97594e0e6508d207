"""What one destination is known to hold: per generation, the keys of its objects and the txids
they end at (as listed once, and as shipped or written since), so that shipping asks the
destination for a listing only once per generation.

Only what the spool still holds is asked about, so :meth:`Holdings.trim` forgets the rest after
each prune of the spool: the memory stays bounded by the spool's size, however long a generation
runs (a key for every object shipped would grow by about 150 bytes a commit)."""

from __future__ import annotations

from collections.abc import Iterable

from .pos import ObjectInfo, parse_key


class Holdings:
    """The keys a destination holds, and the txids they end at, per generation."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = {}  # generation -> keys the destination holds
        self._ends: dict[str, set[int]] = {}  # generation -> end txids of those
        self._newest: dict[str, int] = {}  # generation -> the newest of those

    def clear(self) -> None:
        """Forget everything (the destination is listed again)."""
        self.keys.clear()
        self._ends.clear()
        self._newest.clear()

    def remember(self, generation: str, keys: Iterable[str]) -> None:
        """Record keys the destination holds (and the txids they end at)."""
        known = self.keys.setdefault(generation, set())
        ends = self._ends.setdefault(generation, set())
        for key in keys:
            if key not in known:
                known.add(key)
                info = parse_key(key)
                if info is not None:
                    ends.add(info.end_txid)
                    if info.end_txid > self._newest.get(generation, -1):
                        self._newest[generation] = info.end_txid

    def holds(self, info: ObjectInfo) -> bool:
        """Whether the destination holds ``info`` (as last known)."""
        return info.key in self.keys.get(info.generation, ())

    def newest_txid(self, generation: str) -> int | None:
        """The newest txid of ``generation`` the destination is known to hold."""
        return self._newest.get(generation)

    def trim(self, spooled: dict[str, list[ObjectInfo]]) -> None:
        """Forget what no spooled object is asked about (``spooled``: each generation's objects
        in the spool now): the keys of objects no longer spooled, the end txids below the
        base of the oldest spooled one, and generations no longer spooled (their newest txid
        stays). What :meth:`holds` and :meth:`has_base` answer for the spooled objects does not
        change, nor does a generation still spooled need a new listing."""
        for gen in list(self.keys):
            objs = spooled.get(gen)
            if not objs:
                del self.keys[gen]
                self._ends.pop(gen, None)
                continue
            self.keys[gen].intersection_update([o.key for o in objs])
            floor = min(o.start_txid for o in objs) - 1
            ends = self._ends.get(gen)
            if ends:
                self._ends[gen] = {e for e in ends if e >= floor}

    def has_base(self, first: ObjectInfo) -> bool:
        """Whether the destination holds what ``first`` continues from."""
        if first.kind == "snapshot":
            return True
        ends = self._ends.get(first.generation, set())
        if first.kind == "diff":  # the segments after it continue from its own txid
            return first.end_txid in ends
        return first.start_txid - 1 in ends


def covered(spooled: list[ObjectInfo], remote: list[ObjectInfo]) -> set[str]:
    """Keys of spooled segments the destination holds inside a merged segment."""
    ranges = [(o.start_txid, o.end_txid) for o in remote if o.kind == "wal"]
    return {
        o.key for o in spooled
        if o.kind == "wal" and any(a <= o.start_txid and o.end_txid <= b for a, b in ranges)
    }
