"""File-change wake-ups: one file watcher for every database and watched directory.

Events only wake the sync loops; they carry no data. The loops also have a timer backstop, so a
missed event costs latency, never correctness. A busy writer makes two file events per WAL frame;
while commits keep coming a loop follows the WAL on its own and :meth:`Watcher.pause` drops its
events (they would only cost CPU; for a database alone in its directory the kernel stops queueing
them at all), then :meth:`Watcher.resume` takes them again once it is quiet.

:class:`FileEvents` is the one watcher of a process: one watch per directory, whatever the number
of databases in it. On Linux it is inotify read by the event loop itself (:class:`InotifyEvents`:
no thread at all, and a recursive directory entry watches only the directories that can hold its
databases, not the hidden spools beside them, so the spools' own writes cost nothing); elsewhere
a watchdog observer (:class:`WatchdogEvents`: one thread per watch, one watch per tree).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import inotify as ino
from .aio import file_event

if TYPE_CHECKING:  # watchdog is imported only where there is no inotify
    from watchdog.events import FileSystemEvent

# watchdog's recursive inotify watch adds a directory made inside a new one twice (once walking
# the new one, once for its own event) and warns that the second callback replaces the first,
# which is the same callback: nothing to tell anyone
warnings.filterwarnings("ignore", message=r"Callback with id .* already exists",
                        category=RuntimeWarning)

log = logging.getLogger(__name__)

_WAKE_TYPES = {"modified", "created", "deleted", "moved"}
DIR_GONE = "dir-gone"
"""The kind a tree is told for a directory below it deleted or moved away."""
# what a directory listener is told: (path, event type), on the event loop
TreeCallback = Callable[[str, str], None]
# which file paths of a tree its listener wants
TreeMatch = Callable[[str], bool]


class _Target:
    """One database's wake-up: an event set on the loop, at most one call on its way."""

    __slots__ = ("db_path", "event", "paused", "pending")

    def __init__(self, db_path: str, event: asyncio.Event) -> None:
        self.db_path = db_path
        self.event = event
        self.paused = False
        self.pending = False

    def fire(self) -> None:
        self.pending = False
        file_event(self.event)


class FileEvents:
    """The process's one file watcher: databases register their paths, directory entries their
    trees. Every method is called on the event loop; wake-ups and listeners run there too."""

    def __init__(self) -> None:
        self._targets: dict[str, _Target] = {}

    def start(self) -> None:
        """Start watching (from the event loop; again after :meth:`stop` is fine)."""

    def stop(self) -> None:
        """Stop watching and forget every watch."""

    def add_db(self, db_path: str, event: asyncio.Event) -> _Target:
        """Wake ``event`` when ``db_path`` or its ``-wal`` changes."""
        target = _Target(db_path, event)
        self._targets[db_path] = target
        self._targets[db_path + "-wal"] = target
        return target

    def remove_db(self, db_path: str) -> None:
        """Forget ``db_path`` (its directory's watch goes with its last user)."""
        self._targets.pop(db_path, None)
        self._targets.pop(db_path + "-wal", None)

    def watching(self, db_path: str) -> bool:
        """Whether file events report changes to ``db_path`` (its directory is watched)."""
        raise NotImplementedError

    def set_paused(self, target: _Target, paused: bool) -> None:
        """Drop (or deliver again) ``target``'s events."""
        target.paused = paused

    def add_tree(self, root: str, recursive: bool, match: TreeMatch,
                 callback: TreeCallback) -> None:
        """Tell ``callback`` about every created, modified, deleted or moved file under ``root``
        (below its hidden directories: never) that ``match`` accepts and no database is
        registered for, and about the deletion of those that are; and, as ``(directory,
        DIR_GONE)``, about a directory below ``root`` deleted or moved away (whatever was below
        it is gone: a move reports nothing about the files it took)."""
        raise NotImplementedError

    def remove_tree(self, root: str) -> None:
        """Stop telling about ``root``."""
        raise NotImplementedError


def file_events() -> FileEvents:
    """The best watcher this system has: inotify on the event loop, else watchdog."""
    inotify = ino.open_inotify()
    return InotifyEvents(inotify) if inotify is not None else WatchdogEvents()


class _Dir:
    """A watched directory: its watch, how many databases in it are registered, and the trees
    it belongs to."""

    __slots__ = ("path", "quiet", "trees", "users", "wd")

    def __init__(self, path: str, wd: int) -> None:
        self.path = path
        self.wd = wd
        self.users = 0
        self.quiet = False  # the watch leaves out IN_MODIFY
        self.trees: set[str] = set()


class InotifyEvents(FileEvents):
    """inotify, read by the event loop when its descriptor is readable: no thread, no hand-over
    between threads, one watch per directory that holds a database or may hold one."""

    def __init__(self, inotify: ino.Inotify) -> None:
        super().__init__()
        self._ino: ino.Inotify | None = inotify
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirs: dict[str, _Dir] = {}
        self._wds: dict[int, _Dir] = {}
        self._trees: dict[str, tuple[bool, TreeMatch, TreeCallback]] = {}

    def start(self) -> None:
        """Start reading events on the running loop."""
        if self._loop is not None:
            return
        if self._ino is None:
            self._ino = ino.open_inotify()
            if self._ino is None:
                raise OSError("inotify is no longer available")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._ino.fd, self._on_readable)

    def stop(self) -> None:
        """Stop reading and close the descriptor (every watch goes with it)."""
        loop, self._loop = self._loop, None
        inotify, self._ino = self._ino, None
        if loop is not None and inotify is not None and not loop.is_closed():
            loop.remove_reader(inotify.fd)
        if inotify is not None:
            inotify.close()
        self._dirs.clear()
        self._wds.clear()
        self._trees.clear()

    def _watch(self, directory: str) -> _Dir | None:
        d = self._dirs.get(directory)
        if d is not None:
            return d
        assert self._ino is not None
        try:
            wd = self._ino.add_watch(directory)
        except OSError as exc:  # the timer backstop still applies
            log.warning("cannot watch %s for changes: %s", directory, exc.strerror)
            return None
        d = self._wds.get(wd)  # the same directory under another name
        if d is None:
            d = self._wds[wd] = _Dir(directory, wd)
        self._dirs[directory] = d
        return d

    def _release(self, d: _Dir) -> None:
        if d.users > 0 or d.trees:
            return
        self._forget(d)
        if self._ino is not None:
            self._ino.rm_watch(d.wd)

    def _forget(self, d: _Dir) -> None:
        self._wds.pop(d.wd, None)
        for path in [p for p, x in self._dirs.items() if x is d]:
            del self._dirs[path]

    def add_db(self, db_path: str, event: asyncio.Event) -> _Target:
        """Wake ``event`` when ``db_path`` or its ``-wal`` changes."""
        self.start()
        target = super().add_db(db_path, event)
        d = self._watch(os.path.dirname(db_path))
        if d is not None:
            d.users += 1
            self._tune(d, False)  # its other database may be paused: this one is not
        return target

    def remove_db(self, db_path: str) -> None:
        """Forget ``db_path`` (its directory's watch goes with its last user)."""
        if db_path not in self._targets:
            return
        super().remove_db(db_path)
        d = self._dirs.get(os.path.dirname(db_path))
        if d is not None:
            d.users -= 1
            self._release(d)

    def set_paused(self, target: _Target, paused: bool) -> None:
        """Drop (or deliver again) ``target``'s events. While the only database of a directory
        that no tree watches is paused, the directory's watch leaves out modifications: a busy
        writer's events (one or two a WAL frame) then cost nothing at all, not even a wake-up."""
        target.paused = paused
        d = self._dirs.get(os.path.dirname(target.db_path))
        if d is not None:
            self._tune(d, paused and d.users == 1 and not d.trees)

    def _tune(self, d: _Dir, quiet: bool) -> None:
        """Leave modifications out of ``d``'s watch (``quiet``), or take them again."""
        if quiet == d.quiet or self._ino is None:
            return
        try:
            wd = self._ino.add_watch(d.path, _mask(quiet))
            if wd != d.wd:  # another directory by that name now: put its watch back
                other = self._wds.get(wd)
                if other is None:
                    self._ino.rm_watch(wd)
                else:
                    self._ino.add_watch(other.path, _mask(other.quiet))
                return
        except OSError as exc:  # gone: its IN_IGNORED follows; a paused loop polls anyway
            log.debug("cannot change the watch of %s: %s", d.path, exc.strerror)
            return
        d.quiet = quiet

    def watching(self, db_path: str) -> bool:
        """Whether file events report changes to ``db_path`` (its directory is watched)."""
        return os.path.dirname(db_path) in self._dirs

    def add_tree(self, root: str, recursive: bool, match: TreeMatch,
                 callback: TreeCallback) -> None:
        """See :meth:`FileEvents.add_tree` (the directories are watched one by one)."""
        self.start()
        self._trees[root] = (recursive, match, callback)
        self._grow(root, root, report=False)

    def remove_tree(self, root: str) -> None:
        """Stop telling about ``root``."""
        if self._trees.pop(root, None) is None:
            return
        for d in list(self._wds.values()):
            if root in d.trees:
                d.trees.discard(root)
                self._release(d)

    def _grow(self, root: str, top: str, report: bool) -> None:
        """Watch ``top`` and (for a recursive tree) its directories below, as part of the tree
        ``root``; with ``report``, tell the files already in them as created (they may have been
        written before the watch was there)."""
        recursive, match, callback = self._trees[root]
        todo = [top]
        while todo:
            path = todo.pop()
            # the watch first, then the listing: a file made in between is in the listing or
            # has its event, never neither (a directory made and filled at once)
            d = self._watch(path)
            if d is not None:
                d.trees.add(root)
                self._tune(d, False)
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue  # gone meanwhile (its parent's event tells)
            for e in entries:
                if _is_dir(e):
                    if recursive and not e.name.startswith(".") and not e.is_symlink():
                        todo.append(e.path)
                elif report and match(e.path):
                    callback(e.path, "created")

    def _on_readable(self) -> None:
        if self._ino is None:
            return
        for ev in self._ino.read():
            try:
                self._dispatch(ev)
            except Exception:  # a listener's bug must not stop the watcher
                log.exception("file event %s dispatch failed", ev)

    def _dispatch(self, ev: ino.InotifyEvent) -> None:
        if ev.mask & ino.IN_Q_OVERFLOW:
            self._overflow()
            return
        d = self._wds.get(ev.wd)
        if d is None:
            return
        if ev.mask & ino.IN_IGNORED:
            self._forget(d)  # the directory is gone
            return
        if not ev.name:
            return
        path = os.path.join(d.path, ev.name)
        if ev.mask & ino.IN_ISDIR:
            self._dir_event(d, path, ev.mask)
            return
        kind = _kind(ev.mask)
        target = self._targets.get(path)
        if target is not None and not target.paused:
            file_event(target.event)
        if d.trees and (target is None or kind in ("deleted", "moved")):
            for root in list(d.trees):
                _, match, callback = self._trees[root]
                if match(path):
                    callback(path, kind)

    def _dir_event(self, d: _Dir, path: str, mask: int) -> None:
        """A directory created or moved in (watched, if a recursive tree wants it) or moved
        away."""
        if mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
            if not os.path.basename(path).startswith("."):
                for root in list(d.trees):
                    if self._trees[root][0]:
                        self._grow(root, path, report=True)
        elif mask & ino.IN_MOVED_FROM:
            self._moved_away(d, path)
        elif mask & ino.IN_DELETE:
            self._tell_gone(d, path)

    def _moved_away(self, parent: _Dir, directory: str) -> None:
        """A directory moved away: its watches would report under a wrong name; the files in it
        are gone from here (and its new place, if watched, reports them as created)."""
        prefix = directory + os.sep
        for d in list(self._wds.values()):
            if d.path == directory or d.path.startswith(prefix):
                d.users, d.trees = 0, set()
                self._release(d)
        self._tell_gone(parent, directory)

    def _tell_gone(self, parent: _Dir, directory: str) -> None:
        """Tell the recursive trees ``parent`` belongs to that ``directory`` is gone."""
        if os.path.basename(directory).startswith("."):
            return
        for root in list(parent.trees):
            recursive, _, callback = self._trees[root]
            if recursive:
                callback(directory, DIR_GONE)

    def _overflow(self) -> None:
        """Events were lost: wake every database, tell every tree's files as modified and its
        databases that are no longer there as deleted."""
        log.warning("file events were lost (inotify queue overflow); looking at every database")
        for target in list(self._targets.values()):
            if not target.paused:
                target.event.set()
        for root in list(self._trees):
            recursive, match, callback = self._trees[root]
            present = set()
            for path, dirs, files in os.walk(root):
                dirs[:] = [x for x in dirs if not x.startswith(".")] if recursive else []
                for name in files:
                    file = os.path.join(path, name)
                    if match(file):
                        present.add(file)
                        if file not in self._targets:
                            callback(file, "modified")
            for db in list(self._targets):
                inside = (db.startswith(root + os.sep) and not _hidden(root, db)
                          if recursive else os.path.dirname(db) == root)
                if inside and db not in present and match(db):
                    callback(db, "deleted")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _mask(quiet: bool) -> int:
    """A directory watch's events: without modifications while ``quiet``."""
    return ino.DIR_MASK & ~ino.IN_MODIFY if quiet else ino.DIR_MASK


def _kind(mask: int) -> str:
    """What an inotify event on a file is called here (watchdog's event types)."""
    if mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
        return "created"
    if mask & ino.IN_DELETE:
        return "deleted"
    if mask & ino.IN_MOVED_FROM:
        return "moved"
    return "modified"


class WatchdogEvents(FileEvents):
    """A watchdog observer (where there is no inotify): events are handed to the event loop
    thread-safely. It is the observer's event handler itself (:meth:`dispatch`)."""

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: Any = None
        self._lock = threading.Lock()
        self._dirs: dict[str, tuple[Any, int]] = {}  # directory -> (watch, users)
        # root -> (watch, which paths it wants, callback)
        self._trees: dict[str, tuple[Any, TreeMatch, TreeCallback]] = {}

    def start(self) -> None:
        """Start the observer (from the event loop; again after :meth:`stop` is fine)."""
        if self._observer is not None:
            return
        from watchdog.observers import Observer

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

    def watching(self, db_path: str) -> bool:
        """Whether file events report changes to ``db_path`` (its directory is watched)."""
        directory = os.path.dirname(db_path)
        return directory in self._dirs or self._covered(directory)

    def add_db(self, db_path: str, event: asyncio.Event) -> _Target:
        """Wake ``event`` when ``db_path`` or its ``-wal`` changes."""
        self.start()
        with self._lock:
            target = super().add_db(db_path, event)
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
            super().remove_db(db_path)
        directory = os.path.dirname(db_path)
        watch, users = self._dirs.get(directory, (None, 0))
        if watch is None:
            return
        if users > 1:
            self._dirs[directory] = (watch, users - 1)
            return
        del self._dirs[directory]
        self._unschedule(watch)

    def add_tree(self, root: str, recursive: bool, match: TreeMatch,
                 callback: TreeCallback) -> None:
        """See :meth:`FileEvents.add_tree` (``match`` is called in the observer's thread)."""
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

    def dispatch(self, event: FileSystemEvent) -> None:
        """What the observer calls for every event (in its thread)."""
        self.on_any_event(event)

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Dispatch one event (in the observer's thread)."""
        kind = event.event_type
        if kind not in _WAKE_TYPES:
            return
        if event.is_directory:
            if kind in ("deleted", "moved"):
                self._tell_gone(os.fsdecode(event.src_path))
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

    def _tell_gone(self, directory: str) -> None:
        """Tell the recursive trees below which ``directory`` was that it is gone."""
        for root, (watch, _, callback) in list(self._trees.items()):
            if directory.startswith(root + os.sep) and watch.is_recursive \
                    and not _hidden(root, os.path.join(directory, "x")):
                self._call(callback, directory, DIR_GONE)

    def _tell_trees(self, path: str, kind: str) -> None:
        for root, (_, match, callback) in list(self._trees.items()):
            if path.startswith(root + os.sep) and match(path) and not _hidden(root, path):
                self._call(callback, path, kind)


def _hidden(root: str, path: str) -> bool:
    """Whether ``path`` is below a hidden directory of ``root``."""
    parts = path[len(root) + 1:].split(os.sep)
    return any(p.startswith(".") for p in parts[:-1])


class Watcher:
    """Watches a database's ``-wal`` file (and the database file for replacement) through a
    :class:`FileEvents` (its own, if none is given)."""

    def __init__(self, db_path: str, event: asyncio.Event,
                 events: FileEvents | None = None) -> None:
        self.db_path = os.path.abspath(db_path)
        self.event = event
        self._own = events is None
        self._events = events if events is not None else file_events()
        self._target: _Target | None = None

    @property
    def paused(self) -> bool:
        """Whether events are off (:meth:`pause`)."""
        return self._target is not None and self._target.paused

    def start(self) -> None:
        """Register with the watcher (started on first use)."""
        self._target = self._events.add_db(self.db_path, self.event)

    def pause(self) -> None:
        """Stop delivering events until :meth:`resume`."""
        if self._target is not None:
            self._events.set_paused(self._target, True)

    def resume(self) -> None:
        """Deliver events again. Changes made while paused have no event: look once more."""
        if self._target is not None:
            self._events.set_paused(self._target, False)

    def stop(self) -> None:
        """Unregister (and stop the watcher if it is this watcher's own)."""
        if self._target is not None:
            self._target = None
            self._events.remove_db(self.db_path)
        if self._own:
            self._events.stop()
