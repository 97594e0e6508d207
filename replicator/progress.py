"""How far the capture of one database got, how it is tuned, and what one capture step produced.

:class:`Progress` is the state the capture's collaborators share (the frames, the snapshots, the
catch-ups and the connections all read it; each moves it on for what it wrote); :class:`Shared`
is everything they share, and :class:`Part` the base of each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .headers import Reason
from .pos import ObjectInfo, WalPos

if TYPE_CHECKING:
    from .diffsnap import DiffBase
    from .handles import Handles
    from .pageindex import IndexKeeper
    from .spool import Spool

SEGMENT_MAX_FRAMES = 2048
STEP_BATCHES = 16
SNAPSHOT_LOG_EVERY = 5.0  # a long snapshot logs its progress this often (INFO)
# Segments are zstd-compressed up to this many bytes of frames per second (a few percent of a
# CPU core) always; past it (a write burst, a flat-out writer) unless they lately did not
# compress (see replicator.coding).
COMPRESS_BUDGET = 8 << 20


@dataclass(frozen=True)
class Tuning:
    """How capture trades latency, memory and CPU; the defaults are the module constants of the
    same names (tests shrink them to reach edge cases quickly)."""

    segment_max_frames: int = SEGMENT_MAX_FRAMES
    step_batches: int = STEP_BATCHES
    compress_budget: int = COMPRESS_BUDGET
    snapshot_log_every: float = SNAPSHOT_LOG_EVERY


DEFAULT_TUNING = Tuning()


StatSig = tuple[int, int, int]
"""(inode, size, mtime in ns) of a file: it changes with every write."""
FilesSig = tuple[StatSig | None, StatSig | None]
"""The :data:`StatSig` of a database file and of its ``-wal`` (None for a missing one)."""


def stat_sig(st: os.stat_result) -> StatSig:
    """The :data:`StatSig` of a file's stat."""
    return st.st_ino, st.st_size, st.st_mtime_ns


def files_sig(db: os.stat_result | None, wal: os.stat_result | None) -> FilesSig:
    """The :data:`FilesSig` of a database file's and its ``-wal``'s stats (None: missing)."""
    return (None if db is None else stat_sig(db)), (None if wal is None else stat_sig(wal))


@dataclass
class CaptureResult:
    """What one capture step produced."""

    objects: list[ObjectInfo] = field(default_factory=list)
    transactions: int = 0
    frames: int = 0
    new_generation: str | None = None
    catch_up: Reason | None = None  # a catch-up object was written, and why
    rotated: bool = False
    more: bool = False  # the step stopped with committed frames still to capture
    sizes: tuple[int, int] = (0, 0)  # database and WAL file sizes after the step (bytes)
    looked: FilesSig | None = None
    """The files as the step saw them just before it found everything captured (None: it did
    not find that, or took no such look): a change since shows in a later look."""


@dataclass
class Progress:
    """Where the capture stands: its generation, last transaction and WAL position, the format
    of the frames, the last snapshot, and what is known about the time in between."""

    generation: str | None = None
    txid: int = 0
    pos: WalPos | None = None
    page_size: int = 0
    big_endian: bool = False
    last_snapshot_ns: int = 0
    last_snapshot_txid: int = -1
    last_snapshot_seconds: float = 0.0
    last_snapshot_size: int = 0
    # every transaction committed before this time has been captured (0: unknown)
    confirmed_ns: int = 0
    # where the last object written ends (the ``prev`` of the next one)
    last_end: WalPos | None = None
    last_observed_ns: int = 0  # when the last captured state was observed
    # resumed from the WAL: (watched until, watching again since), for the next segment
    resumed: tuple[int, int] | None = None
    # when capture continues from a state without a WAL: the database file's (inode, size,
    # mtime) before that state was read (see Snapshots.set_position)
    nowal_sig: tuple[int, int, int] | None = None
    # what differential snapshots compare against: the last full snapshot taken here
    diff_base: DiffBase | None = None

    def position_of(self, pos: WalPos | None) -> WalPos | None:
        """The position to record for a state read at ``pos`` inside this generation (an
        interval or differential snapshot): the next object's ``prev`` must equal it. At the
        header of an epoch none of whose frames was captured yet (a reset just proven), that is
        still the end of the last object, which stands for the same state."""
        if (pos is not None and pos == self.pos and pos.frame == 0
                and self.last_end is not None):
            return self.last_end
        return pos


@dataclass(frozen=True)
class Shared:
    """What the collaborators of one database's capture share."""

    name: str
    progress: Progress
    handles: Handles
    spool: Spool
    keeper: IndexKeeper
    tuning: Tuning


class Part:
    """A collaborator of one database's capture (blocking: call it from one worker thread)."""

    def __init__(self, shared: Shared) -> None:
        self.name = shared.name
        self.progress = shared.progress
        self.handles = shared.handles
        self.spool = shared.spool
        self.keeper = shared.keeper
        self.tuning = shared.tuning
