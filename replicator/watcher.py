"""File-change wake-ups: a watchdog observer on the database's directory sets an asyncio.Event.

Events only wake the sync loop; they carry no data. The loop also has a timer backstop, so a
missed event costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import os

from watchdog.events import (
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

_WAKE_TYPES = {"modified", "created", "deleted", "moved"}


class _Handler(FileSystemEventHandler):
    def __init__(self, paths: set[str], loop: asyncio.AbstractEventLoop, event: asyncio.Event):
        self._paths = paths
        self._loop = loop
        self._event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _WAKE_TYPES:
            return
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(getattr(event, "dest_path", b"") or b"")
        if src in self._paths or dest in self._paths:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # loop closed during shutdown
                pass


class Watcher:
    """Watches a database's ``-wal`` file (and the database file for replacement)."""

    def __init__(self, db_path: str, event: asyncio.Event) -> None:
        self.db_path = os.path.abspath(db_path)
        self.event = event
        self._observer: object | None = None

    def start(self) -> None:
        """Start the observer thread."""
        loop = asyncio.get_running_loop()
        paths = {self.db_path + "-wal", self.db_path}
        observer = Observer()
        observer.daemon = True
        observer.schedule(
            _Handler(paths, loop, self.event), os.path.dirname(self.db_path), recursive=False
        )
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        observer = self._observer
        self._observer = None
        if observer is not None:
            observer.stop()  # type: ignore[attr-defined]
            observer.join(timeout=5)  # type: ignore[attr-defined]
