"""File-change wake-ups: one watchdog observer for every database and watched directory.

Events only wake the sync loops; they carry no data. The loops also have a timer backstop, so a
missed event costs latency, never correctness. A busy writer makes two file events per WAL frame;
while commits keep coming a loop follows the WAL on its own and :meth:`Watcher.pause` drops its
events (they would only cost CPU), then :meth:`Watcher.resume` takes them again once it is quiet.

:class:`FileEvents` is the one observer of a process: one inotify watch per directory, whatever
the number of databases in it (one per tree for a recursive directory entry), and one thread per
watch, so thousands of databases do not mean thousands of threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

_WAKE_TYPES = {"modified", "created", "deleted", "moved"}
# what a directory listener is told: (path, event type), on the event loop
TreeCallback = Callable[[str, str], None]


class _Target:
    """One database's wake-up: an event set on the loop, at most one call on its way."""

    __slots__ = ("event", "paused", "pending")

    def __init__(self, event: asyncio.Event) -> None:
        self.event = event
        self.paused = False
        self.pending = False

    def fire(self) -> None:
        self.pending = False
        self.event.set()


class FileEvents(FileSystemEventHandler):
    """The process's one file watcher: databases register their paths, directory entries their
    trees; events are handed to the event loop thread-safely."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Any = None
        self._lock = threading.Lock()
        self._targets: dict[str, _Target] = {}
        self._dirs: dict[str, tuple[Any, int]] = {}  # directory -> (watch, users)
        # root -> (watch, which paths it wants, callback)
        self._trees: dict[str, tuple[Any, Callable[[str], bool], TreeCallback]] = {}

    def start(self) -> None:
        """Start the observer (from the event loop; again after :meth:`stop` is fine)."""
        if self._observer is not None:
            return
        self._loop = asyncio.get_running_loop()
        observer = Observer()
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        """Stop the observer thread and wait for it."""
        observer, self._observer = self._observer, None
        self._dirs.clear()
        self._trees.clear()
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _covered(self, directory: str) -> bool:
        return any(directory == root or directory.startswith(root + os.sep)
                   for root in self._trees)

    def add_db(self, db_path: str, event: asyncio.Event) -> _Target:
        """Wake ``event`` when ``db_path`` or its ``-wal`` changes."""
        self.start()
        target = _Target(event)
        with self._lock:
            self._targets[db_path] = target
            self._targets[db_path + "-wal"] = target
        directory = os.path.dirname(db_path)
        if self._covered(directory):
            return target
        watch, users = self._dirs.get(directory, (None, 0))
        if watch is None:
            try:
                watch = self._observer.schedule(self, directory, recursive=False)
            except OSError as exc:  # the timer backstop still applies
                log.warning("cannot watch %s for changes: %s", db_path, exc)
                return target
        self._dirs[directory] = (watch, users + 1)
        return target

    def remove_db(self, db_path: str) -> None:
        """Forget ``db_path`` (its directory's watch goes with its last database)."""
        with self._lock:
            self._targets.pop(db_path, None)
            self._targets.pop(db_path + "-wal", None)
        directory = os.path.dirname(db_path)
        watch, users = self._dirs.get(directory, (None, 0))
        if watch is None:
            return
        if users > 1:
            self._dirs[directory] = (watch, users - 1)
            return
        del self._dirs[directory]
        self._unschedule(watch)

    def add_tree(self, root: str, recursive: bool, match: Callable[[str], bool],
                 callback: TreeCallback) -> None:
        """Tell ``callback`` about every created, modified, deleted or moved path under
        ``root`` that ``match`` accepts (called in the observer's thread) and no database is
        registered for, and about the deletion of those that are."""
        self.start()
        watch = self._observer.schedule(self, root, recursive=recursive)
        self._trees[root] = (watch, match, callback)

    def remove_tree(self, root: str) -> None:
        """Stop telling about ``root``."""
        entry = self._trees.pop(root, None)
        if entry is not None:
            self._unschedule(entry[0])

    def _unschedule(self, watch: Any) -> None:
        if self._observer is None:
            return
        try:
            self._observer.unschedule(watch)
        except (KeyError, OSError) as exc:
            log.debug("unwatching %s: %s", watch.path, exc)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Dispatch one event (in the observer's thread)."""
        kind = event.event_type
        if kind not in _WAKE_TYPES or event.is_directory:
            return
        paths = [os.fsdecode(event.src_path)]
        dest = getattr(event, "dest_path", None)
        if dest:
            paths.append(os.fsdecode(dest))
        for i, path in enumerate(paths):
            target = self._targets.get(path)
            if target is not None and not target.paused and not target.pending:
                target.pending = True
                self._call(target.fire)
            if self._trees and (target is None or kind in ("deleted", "moved")):
                self._tell_trees(path, "created" if i else kind)

    def _tell_trees(self, path: str, kind: str) -> None:
        for root, (_, match, callback) in list(self._trees.items()):
            if path.startswith(root + os.sep) and match(path):
                self._call(callback, path, kind)


class Watcher:
    """Watches a database's ``-wal`` file (and the database file for replacement) through a
    :class:`FileEvents` (its own, if none is given)."""

    def __init__(self, db_path: str, event: asyncio.Event,
                 events: FileEvents | None = None) -> None:
        self.db_path = os.path.abspath(db_path)
        self.event = event
        self._own = events is None
        self._events = events if events is not None else FileEvents()
        self._target: _Target | None = None

    @property
    def paused(self) -> bool:
        """Whether events are off (:meth:`pause`)."""
        return self._target is not None and self._target.paused

    def start(self) -> None:
        """Register with the observer (started on first use)."""
        self._target = self._events.add_db(self.db_path, self.event)

    def pause(self) -> None:
        """Stop delivering events until :meth:`resume`."""
        if self._target is not None:
            self._target.paused = True

    def resume(self) -> None:
        """Deliver events again. Changes made while paused have no event: look once more."""
        if self._target is not None:
            self._target.paused = False

    def stop(self) -> None:
        """Unregister (and stop the observer if it is this watcher's own)."""
        if self._target is not None:
            self._target = None
            self._events.remove_db(self.db_path)
        if self._own:
            self._events.stop()
