"""File-change wake-ups: a watchdog observer on the database's directory sets an asyncio.Event.

Events only wake the sync loop; they carry no data. The loop also has a timer backstop, so a
missed event costs latency, never correctness. A busy writer makes two file events per WAL frame;
while commits keep coming the loop follows the WAL on its own and :meth:`Watcher.pause` stops the
events (they would only cost CPU), then :meth:`Watcher.resume` re-arms them once it is quiet.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from watchdog.events import (
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

_WAKE_TYPES = {"modified", "created", "deleted", "moved"}


class _Handler(FileSystemEventHandler):
    def __init__(self, paths: set[str], loop: asyncio.AbstractEventLoop, event: asyncio.Event):
        self._paths = paths
        self._loop = loop
        self._event = event
        self._pending = False  # a wake-up is on its way to the loop: later events add nothing

    def _fire(self) -> None:
        self._pending = False
        self._event.set()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _WAKE_TYPES:
            return
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", b"") or b"")
        if (src in self._paths or dest in self._paths) and not self._pending:
            self._pending = True
            try:
                self._loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # loop closed during shutdown
                pass


class Watcher:
    """Watches a database's ``-wal`` file (and the database file for replacement)."""

    def __init__(self, db_path: str, event: asyncio.Event) -> None:
        self.db_path = os.path.abspath(db_path)
        self.event = event
        self._observer: Any = None
        self._handler: _Handler | None = None
        self._watch: Any = None

    @property
    def paused(self) -> bool:
        """Whether events are off (:meth:`pause`)."""
        return self._observer is not None and self._watch is None

    def start(self) -> None:
        """Start the observer thread."""
        loop = asyncio.get_running_loop()
        paths = {self.db_path + "-wal", self.db_path}
        observer = Observer()
        observer.daemon = True
        self._handler = _Handler(paths, loop, self.event)
        self._observer = observer
        self.resume()
        observer.start()

    def pause(self) -> None:
        """Stop delivering events until :meth:`resume`."""
        if self._observer is not None and self._watch is not None:
            watch, self._watch = self._watch, None
            try:
                self._observer.unschedule(watch)
            except (KeyError, OSError) as exc:
                log.debug("unwatching %s: %s", self.db_path, exc)

    def resume(self) -> None:
        """Deliver events again. Changes made while paused have no event: look once more."""
        if self._observer is not None and self._watch is None:
            try:
                self._watch = self._observer.schedule(
                    self._handler, os.path.dirname(self.db_path), recursive=False
                )
            except OSError as exc:  # the timer backstop still applies
                log.warning("cannot watch %s for changes: %s", self.db_path, exc)

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        observer = self._observer
        self._observer = None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)
