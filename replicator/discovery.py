"""Directories of databases: which files of a ``dir:`` entry are databases, where each one's
replicas and spool go, and the watch that picks up new databases and drops removed ones.

A database ``DIR/sub/a.db`` of the entry ``{dir: DIR, pattern: "*.db", recursive: true}`` is
replicated below each destination of the entry at ``sub/a.db`` (``/backups/t`` becomes
``/backups/t/sub/a.db``; ``s3://b/t?region=x`` becomes ``s3://b/t/sub/a.db?region=x``), with the
entry's settings. Hidden directories (a spool ``.a.db-replicator`` among them) are not searched,
and ``-wal``, ``-shm`` and ``-journal`` files are never databases. A matching file that is not a
SQLite database in WAL mode is reported once (again only if the reason changes) and skipped;
an empty file is a database being created and is looked at again on its next change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import os
import urllib.parse
from collections.abc import Callable

from .config import Config, DbConfig, DirConfig, ReplicaConfig, Shard
from .pos import GENERATIONS_DIR
from .runtime import Runtime
from .storage import FileDestination, S3Options, StorageClient, parse_destination
from .watcher import DIR_GONE

log = logging.getLogger("replicator.discovery")

_NOT_DBS = ("-wal", "-shm", "-journal")
SQLITE_MAGIC = b"SQLite format 3\x00"
# classify()'s answers for an empty file (a database being created, looked at again later) and
# for a file that is gone
EMPTY = "empty"
MISSING = "missing"


def sub_url(url: str, rel: str) -> str:
    """``url`` with ``rel`` (a relative path, '/'-separated) appended to its path or prefix."""
    rel = rel.replace(os.sep, "/").strip("/")
    if "://" not in url:
        return os.path.join(url, rel)
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(path=f"{path}/{rel}"))


def sub_replica(rc: ReplicaConfig, rel: str) -> ReplicaConfig:
    """``rc`` for the database at ``rel`` (relative to its directory entry)."""
    dest = rc.destination if rc.destination is not None else parse_destination(rc.url)
    rel = rel.replace(os.sep, "/")
    if isinstance(dest, S3Options):
        prefix = f"{dest.prefix.strip('/')}/{rel}".lstrip("/")
        opts = dataclasses.replace(dest, prefix=prefix)
        return dataclasses.replace(rc, url=opts.to_url(), destination=opts)
    if isinstance(dest, FileDestination):
        return dataclasses.replace(rc, url=sub_url(rc.url, rel),
                                   destination=FileDestination(os.path.join(dest.path, rel)))
    return dataclasses.replace(rc, url=sub_url(rc.url, rel), destination=None)


def matches(d: DirConfig, path: str) -> bool:
    """Whether ``path`` is a candidate database of ``d`` (by name and place, not contents)."""
    if not path.startswith(d.dir + os.sep):
        return False
    rel = path[len(d.dir) + 1:]
    parts = rel.split(os.sep)
    if len(parts) > 1 and (not d.recursive or any(p.startswith(".") for p in parts[:-1])):
        return False
    name = parts[-1]
    return not name.endswith(_NOT_DBS) and fnmatch.fnmatchcase(name, d.pattern)


def shard_key(d: DirConfig, path: str) -> str:
    """What decides the part (:class:`~replicator.config.Shard`) of the database at ``path``
    (below ``d.dir``): its path relative to the directory, '/'-separated."""
    return os.path.relpath(path, d.dir).replace(os.sep, "/")


def db_config(d: DirConfig, path: str) -> DbConfig:
    """The configuration of the database at ``path`` (absolute, below ``d.dir``)."""
    rel = os.path.relpath(path, d.dir)
    spool = os.path.join(d.spool_root, rel) if d.spool_root else ""
    return dataclasses.replace(
        d.template, path=path, name=path, spool_dir=spool,
        replicas=[sub_replica(r, rel) for r in d.template.replicas],
    )


def find_db(cfg: Config, target: str) -> DbConfig | None:
    """The database ``target`` (a path or a listed database's name): a listed one, or one that
    a ``dir:`` entry would replicate (whether or not the file exists now)."""
    path = os.path.abspath(target)
    for db in cfg.dbs:
        if db.path == path or db.name == target:
            return db
    for d in cfg.dirs:
        if matches(d, path):
            return db_config(d, path)
    return None


LIST_CONCURRENCY = 8
"""Listings at a time while looking for a ``dir:`` entry's databases in its destinations."""


async def replicated(d: DirConfig) -> list[str]:
    """The databases of ``d`` that one of its destinations holds, whether or not they are on
    this machine: each one's path below ``d.dir``, sorted. A database is a place below the
    entry's destination with a ``generations`` directory in it, whose path relative to the
    destination ``d`` would replicate (its pattern, ``recursive``, no hidden directories)."""
    found: set[str] = set()
    for rc in d.template.replicas:
        client = rc.open()
        try:
            found.update(await _held_by(d, client))
        finally:
            await client.aclose()
    return sorted(found)


async def _held_by(d: DirConfig, client: StorageClient) -> set[str]:
    """:func:`replicated` for one destination, looked through ``LIST_CONCURRENCY`` listings
    at a time."""
    found: set[str] = set()
    limit = asyncio.Semaphore(LIST_CONCURRENCY)

    async def walk(rel: str) -> None:
        async with limit:
            names = await client.children(rel)
        path = os.path.join(d.dir, *rel.split("/")) if rel else d.dir
        if rel and GENERATIONS_DIR in names and matches(d, path):
            found.add(path)
        if rel and not d.recursive:
            return
        await asyncio.gather(*(walk(f"{rel}/{n}" if rel else n) for n in names
                               if n != GENERATIONS_DIR and not n.startswith(".")))

    await walk("")
    return found


def classify(path: str) -> str | None:
    """None for a SQLite database in WAL mode; :data:`EMPTY` for an empty file; otherwise why
    the file is not replicated."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not head:
        return EMPTY
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        return "not a SQLite database"
    if head[18] != 2 or head[19] != 2:
        return "not in WAL mode (PRAGMA journal_mode=WAL enables it)"
    return None


def scan(d: DirConfig) -> list[tuple[str, float]]:
    """Every candidate database of ``d`` with its newest change time (database or ``-wal``),
    newest first."""
    found: list[tuple[str, float]] = []
    for top, dirs, files in os.walk(d.dir):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".")) if d.recursive else []
        for name in files:
            path = os.path.join(top, name)
            if matches(d, path):
                found.append((path, changed_at(path)))
    found.sort(key=lambda x: -x[1])
    return found


def changed_at(path: str) -> float:
    """When the database at ``path`` last changed (its file or its ``-wal``), 0 if unknown."""
    best = 0.0
    for p in (path, path + "-wal"):
        try:
            best = max(best, os.stat(p).st_mtime)
        except OSError:
            pass
    return best


class DirWatch:
    """One ``dir:`` entry at run time: the first scan, then file events. ``add(cfg, changed)``
    is called for every database found (again for one found again), ``remove(path)`` for every
    candidate that disappeared and every directory that did (all below it is gone); both on
    the event loop. With a ``shard``, candidates of the other parts are left alone: not looked
    at, not reported."""

    def __init__(self, d: DirConfig, runtime: Runtime,
                 add: Callable[[DbConfig, float], None], remove: Callable[[str], None],
                 shard: Shard | None = None) -> None:
        self.cfg = d
        self.shard = shard
        self.runtime = runtime
        self._add = add
        self._remove = remove
        self.skipped: dict[str, str] = {}
        """Matching files that are not replicated, and why."""
        self._checking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Watch the directory, then scan it (a database created in between is seen twice,
        which is harmless). A missing directory is reported and watched for nothing."""
        if not await self.runtime.call(os.path.isdir, self.cfg.dir):
            log.error("%s: not a directory; no database of it is replicated", self.cfg.dir)
            return
        self.runtime.events.add_tree(self.cfg.dir, self.cfg.recursive, self.mine,
                                     self.on_event)
        every = await self.runtime.call(scan, self.cfg)
        found = [(p, c) for p, c in every if self._held(p)]
        reasons = await self.runtime.call(lambda: [classify(p) for p, _ in found])
        for (path, changed), reason in zip(found, reasons, strict=True):
            self._found(path, changed, reason)
        part = (f", {len(every) - len(found)} candidates of the other parts of shard {self.shard}"
                if self.shard is not None else "")
        log.info("%s: %d databases found (%d skipped%s)", self.cfg.dir,
                 sum(r is None for r in reasons), len(self.skipped), part)

    def mine(self, path: str) -> bool:
        """Whether ``path`` is a candidate database of this entry and of this part."""
        return matches(self.cfg, path) and self._held(path)

    def _held(self, path: str) -> bool:
        return self.shard is None or self.shard.holds(shard_key(self.cfg, path))

    def stop(self) -> None:
        """Stop watching."""
        self.runtime.events.remove_tree(self.cfg.dir)
        for t in self._tasks:
            t.cancel()

    def on_event(self, path: str, kind: str) -> None:
        """A file event for a candidate ``path``, or a directory gone (on the event loop)."""
        if kind in ("deleted", "moved", DIR_GONE):
            self.skipped.pop(path, None)
            if kind == DIR_GONE:
                prefix = path + os.sep
                for p in [p for p in self.skipped if p.startswith(prefix)]:
                    del self.skipped[p]
            self._remove(path)
            return
        if path in self._checking:
            return
        self._checking.add(path)
        task = asyncio.ensure_future(self._check(path))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, path: str) -> None:
        try:
            reason = await self.runtime.call(classify, path)
            changed = await self.runtime.call(changed_at, path)
        finally:
            self._checking.discard(path)
        if reason == MISSING:
            self._remove(path)  # created and gone again
            return
        self._found(path, changed, reason)

    def _found(self, path: str, changed: float, reason: str | None) -> None:
        if reason is None:
            self.skipped.pop(path, None)
            self._add(db_config(self.cfg, path), changed)
        elif reason not in (EMPTY, MISSING) and self.skipped.get(path) != reason:
            self.skipped[path] = reason
            log.warning("%s: %s; skipped", path, reason)
