"""Following a busy writer: the pace of a database service's capture loop while commits keep
coming.

While they do, the loop follows the WAL itself, looking every FOLLOW_POLL seconds, with file
events off (a busy writer makes two per WAL frame); after FOLLOW_QUIET seconds with nothing new,
events wake it again. The commits of one poll interval go into one segment: the interval trades a
few milliseconds of lag for far fewer objects (each a file written, fsynced and linked) under a
busy writer. Meanwhile the shippers' compaction yields to the capture, and the wal-index is read
every few milliseconds between the loop's looks too (see :mod:`replicator.sightings`).
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from .progress import CaptureResult
from .sightings import SIGHTER
from .wal import FRAME_HEADER_SIZE
from .watcher import Watcher

if TYPE_CHECKING:
    from .replicator import DatabaseService

FOLLOW_POLL = 0.005
FOLLOW_QUIET = 0.05
# While each look finds at least FOLLOW_BULK bytes of new frames (a writer far faster than
# commits one at a time: two looks in a row, so a backlog caught up once does not count), the
# loop looks every FOLLOW_POLL_BULK seconds instead: the same bytes in fewer, larger segments,
# each one fsync, rename and link fewer for the application's disk and the capture's CPU.
# Single commits in quick succession stay at FOLLOW_POLL.
FOLLOW_BULK = 256 << 10
FOLLOW_POLL_BULK = 0.02


class Follower:
    """Whether the capture loop of one database service follows a busy writer (its
    ``following``), and how often it looks meanwhile."""

    def __init__(self, service: DatabaseService) -> None:
        self.service = service
        self.bulk_looks = 0  # capture steps in a row that found FOLLOW_BULK bytes or more
        self._sighting: contextlib.ExitStack | None = None  # readings while following

    def looked(self, res: CaptureResult) -> None:
        """Count a capture step that found FOLLOW_BULK bytes of frames or more (any other
        starts the count again)."""
        bulk = res.frames * (self.service.db.page_size + FRAME_HEADER_SIZE) >= FOLLOW_BULK
        self.bulk_looks = self.bulk_looks + 1 if bulk else 0
        for r in self.service.replicas:
            r.source_bulk = self.bulk_looks >= 2

    def poll(self) -> float:
        """How long the loop waits between its looks while it follows."""
        return FOLLOW_POLL_BULK if self.bulk_looks >= 2 else FOLLOW_POLL

    def captured(self, res: CaptureResult, watcher: Watcher, last_change: float) -> float:
        """After a capture step the loop was woken for: follow the writer on a second change
        within FOLLOW_QUIET (a database committing now and then only costs its file events),
        stop after FOLLOW_QUIET without one, and capture again at once after a step that left a
        backlog. Returns the monotonic time of the last change (``last_change``: before it)."""
        s = self.service
        now = time.monotonic()
        if res.transactions or res.more:
            if res.more or now - last_change < FOLLOW_QUIET:
                self.follow(True, watcher)
            last_change = now
        elif watcher.paused and now - last_change >= FOLLOW_QUIET:
            self.follow(False, watcher)
            s.wake.set()  # what changed before the events were back has none
        if res.more:
            s.wake.set()  # a backlog: capture again at once
        return last_change

    def follow(self, on: bool, watcher: Watcher | None) -> None:
        """Follow a busy writer (``watcher``'s file events off), or stop; tell the shippers,
        whose compaction yields to the capture while it follows. Meanwhile the wal-index is read
        every few milliseconds between capture steps too: a commit is stamped when it was first
        seen, however long the loop waits before its next look."""
        s = self.service
        s.following = on
        if on and self._sighting is None:
            self._sighting = contextlib.ExitStack()
            self._sighting.enter_context(SIGHTER.watching(s.db.handles.sightings))
        elif not on and self._sighting is not None:
            self.close()
        if watcher is None:
            return
        if on:
            watcher.pause()
        else:
            watcher.resume()
        for r in s.replicas:
            r.source_busy = on
            if not on:
                r.source_bulk = False
                r.wake.set()  # a compaction put off may start now

    def close(self) -> None:
        """Stop reading the wal-index between looks (the loop ended)."""
        if self._sighting is not None:
            self._sighting.close()
            self._sighting = None
