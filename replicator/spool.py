"""The local spool: captured objects, durable on local disk before any replica has them.

The spool has the same layout as a file replica (it *is* one, to :class:`FileStorage`), so replicas
copy objects from it unchanged. Capture writes here synchronously from the database's worker
thread; shippers read it asynchronously. It is what lets the WAL reset freely while a destination
is slow or down, and what a restart resumes from.

The spool belongs to one process (:meth:`Spool.claim`: a second one is refused), which keeps an
index of it in memory (read from the directory
once, then kept up to date by ``write`` and ``delete``, each generation's objects kept in order),
so that listing it costs nothing however many objects a slow destination leaves waiting. The
headers of the objects it wrote last are kept too (at most ``HEADER_CACHE`` transactions'
worth: a segment's header lists each of its transactions), so that shipping them never reads
and parses back what was just written.

A replica follows the spool (:meth:`Spool.follow`): each object written is also appended to the
follower's :class:`Feed`, so that finding what a destination lacks looks only at what was
written since it last looked, not at every spooled object (a destination that compacts keeps
the spool holding a few minutes of objects).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable

from .errors import SpoolBusyError
from .format import (
    DEFAULT_LEVEL,
    KIND_CATCHUP,
    KIND_DIFF,
    KIND_SNAPSHOT,
    KIND_WAL,
    ObjectWriter,
    read_header_file,
)
from .fsutil import TMP_SUFFIX, atomic_writer, makedirs_durable
from .headers import ObjectHeader, header_from_json
from .pos import GENERATIONS_DIR, ObjectInfo
from .storage.file import FileStorage

_KIND_CODES = {"snapshot": KIND_SNAPSHOT, "wal": KIND_WAL, "catchup": KIND_CATCHUP,
               "diff": KIND_DIFF}
HEADER_CACHE = 16384
"""Headers of the most recently written objects kept in memory: at most this many transactions
of theirs (a header counts one more than it lists; under a flat-out writer a segment lists
about a thousand, an idle database's a few), so memory stays bounded however large segments
are."""
FEED_MAX = 65536
"""Objects a feed holds at most: past it the feed is marked broken and emptied (a follower
that stopped taking from it walks the spool once instead, when it looks again)."""


class Feed:
    """What a spool wrote since its follower last took from it, in the order written."""

    def __init__(self) -> None:
        self.written: list[ObjectInfo] = []
        self.broken = False  # an object was dropped (FEED_MAX): the follower walks the spool

    def take(self) -> tuple[list[ObjectInfo], bool]:
        """The objects written since the last take, and whether the feed broke meanwhile
        (then the list is not complete); call with the spool's lock held."""
        out, broken = self.written, self.broken
        self.written = []
        self.broken = False
        return out, broken


OWNER_FILE = "owner"
"""The file in a spool's root that the process using the spool holds an exclusive lock on (its
text names that process, for the error another one gets)."""


class Spool:
    """A spool directory."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._owner_fd: int | None = None
        self._made = False  # the claim made the directory
        self.storage = FileStorage(self.root)
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, ObjectInfo]] | None = None  # generation -> key -> info
        self._sorted: dict[str, list[ObjectInfo]] = {}  # generation -> its objects, in order
        self._headers: OrderedDict[str, ObjectHeader] = OrderedDict()  # key -> header
        self._header_weight = 0  # what the cached headers count against HEADER_CACHE
        self._dirs: set[str] = set()  # directories this spool made (or found) durable
        self._feeds: list[Feed] = []

    def _scan(self) -> dict[str, dict[str, ObjectInfo]]:
        """The index (read from the directory the first time, sizes included); call with the
        lock held."""
        if self._index is None:
            self._index = {
                gen: {info.key: info for info in self.storage.scan_objects(gen)}
                for gen in self.storage.scan_generations()
            }
        return self._index

    def claim(self, db: str) -> None:
        """Take the spool for this process until :meth:`release` or the process ends, however
        it ends (an exclusive ``flock`` on ``OWNER_FILE``, which the kernel drops with the
        process). Two processes capturing one database into one spool would each number its
        transactions on their own; the second is refused with a :class:`SpoolBusyError` naming
        the holder (blocking; nothing else in the spool is touched)."""
        if self._owner_fd is not None:
            return
        made = not os.path.isdir(self.root)
        makedirs_durable(self.root)
        path = os.path.join(self.root, OWNER_FILE)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                finally:
                    os.close(fd)
                raise SpoolBusyError(
                    f"{db}: another process is replicating this database "
                    f"({holder or 'its pid not written yet'}); its spool {self.root} is locked"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # removed by a holder letting go of the spool it had made: again
        note = f"pid {os.getpid()} on {socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
        self._owner_fd, self._made = fd, made

    def release(self) -> None:
        """Let go of the spool (see :meth:`claim`). A spool directory the claim made that
        still holds nothing else goes with it (a start refused for bad input leaves nothing
        behind)."""
        fd, self._owner_fd = self._owner_fd, None
        if fd is None:
            return
        try:
            if self._made and os.listdir(self.root) == [OWNER_FILE]:
                os.unlink(os.path.join(self.root, OWNER_FILE))
                os.rmdir(self.root)
        except OSError:
            pass  # something else is there: it stays
        finally:
            os.close(fd)

    @property
    def claimed(self) -> bool:
        """Whether this process holds the spool (:meth:`claim`)."""
        return self._owner_fd is not None

    def remove_temp_files(self) -> int:
        """Remove temp files a crash left behind (the spool belongs to one process)."""
        removed = 0
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if name.endswith(TMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def path(self, info: ObjectInfo) -> str:
        """The file path of an object."""
        return os.path.join(self.root, *info.key.split("/"))

    def write(
        self,
        info: ObjectInfo,
        header: ObjectHeader,
        body: Iterable[bytes | memoryview] | bytes | memoryview,
        level: int | None = DEFAULT_LEVEL,
    ) -> ObjectInfo:
        """Write an object durably (zstd ``level``, None: stored uncompressed); return its info
        with the size filled in (the index keeps it too). The body is given in chunks, or whole
        as one buffer (then compressed in one pass: :meth:`ObjectWriter.write_whole`)."""
        kind = _KIND_CODES[info.kind]
        path = self.path(info)
        parent = os.path.dirname(path)
        with atomic_writer(path, parent_exists=parent in self._dirs) as f:
            w = ObjectWriter(f, kind, header.to_json(), level)
            if isinstance(body, (bytes, memoryview)):
                w.write_whole(body)
            else:
                for chunk in body:
                    w.write(chunk)
                w.close()
            size = w.size
        out = dataclasses.replace(info, size=size)
        with self._lock:
            self._dirs.add(parent)
            self._scan().setdefault(out.generation, {})[out.key] = out
            ordered = self._sorted.get(out.generation)
            if ordered is not None:
                if not ordered or _order(ordered[-1]) < _order(out):
                    ordered.append(out)  # capture writes in order: the usual case
                else:
                    del self._sorted[out.generation]
            self._cache_header(out.key, header)
            for feed in self._feeds:
                if len(feed.written) >= FEED_MAX:
                    feed.written.clear()
                    feed.broken = True
                if not feed.broken:
                    feed.written.append(out)
        return out

    def follow(self) -> Feed:
        """A new feed of the objects written from now on (see :meth:`take`)."""
        feed = Feed()
        with self._lock:
            self._feeds.append(feed)
        return feed

    def unfollow(self, feed: Feed) -> None:
        """Stop feeding ``feed``."""
        with self._lock:
            if feed in self._feeds:
                self._feeds.remove(feed)

    def restart(self, feed: Feed) -> None:
        """Empty ``feed``: its follower is about to walk the spool, which sees all of it (the
        index is not read here: this never touches a file)."""
        with self._lock:
            feed.take()

    def fed_more(self, feed: Feed, count: int) -> bool:
        """Whether ``feed`` holds more than ``count`` objects since it was last taken from (or
        broke meanwhile)."""
        with self._lock:
            return feed.broken or len(feed.written) > count

    def take(self, feed: Feed, since: list[ObjectInfo]) -> list[ObjectInfo] | None:
        """``since`` (objects in shipping order), less those no longer spooled, followed by what
        was written since ``feed`` was last taken from; None if that is not known to be in
        shipping order (the feed broke, or an object came before one already listed): the
        caller walks the spool (:meth:`all_objects`) instead, as it must when the index is not
        in memory yet (reading it is file work)."""
        with self._lock:
            if self._index is None:
                return None
            written, broken = feed.take()
            if broken:
                return None
            index = self._scan()
            out = [o for o in since if o.key in index.get(o.generation, ())]
            last = _order(out[-1]) if out else None
            listed: set[str] | None = None
            for o in written:
                if o.key not in index.get(o.generation, ()):
                    continue  # deleted since
                key = _order(o)
                if last is not None and key <= last:
                    if listed is None:
                        listed = {x.key for x in out}
                    if o.key in listed:
                        continue  # a walk of the spool saw it already
                    return None
                out.append(o)
                last = key
            return out

    @property
    def indexed(self) -> bool:
        """Whether the index is in memory (listing then touches no file)."""
        return self._index is not None

    def generations(self) -> list[str]:
        """Generations in the spool, oldest first."""
        with self._lock:
            return sorted(self._scan())

    def objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation in the spool, sorted, with their sizes."""
        with self._lock:
            ordered = self._sorted.get(generation)
            if ordered is None:
                objs = self._scan().get(generation)
                if objs is None:
                    return []
                ordered = self._sorted[generation] = sorted(objs.values(), key=_order)
            return list(ordered)

    def all_objects(self) -> list[ObjectInfo]:
        """Every object in the spool, in shipping order: generations oldest first, each's
        objects sorted."""
        out: list[ObjectInfo] = []
        for gen in self.generations():
            out.extend(self.objects(gen))
        return out

    def _cache_header(self, key: str, header: ObjectHeader) -> None:
        """Keep ``header``, dropping the oldest past HEADER_CACHE; call with the lock held."""
        self._drop_header(key)
        self._headers[key] = header
        self._header_weight += _weight(header)
        while self._header_weight > HEADER_CACHE and len(self._headers) > 1:
            self._header_weight -= _weight(self._headers.popitem(last=False)[1])

    def _drop_header(self, key: str) -> None:
        """Forget a cached header; call with the lock held."""
        old = self._headers.pop(key, None)
        if old is not None:
            self._header_weight -= _weight(old)

    def cached_header(self, info: ObjectInfo) -> ObjectHeader | None:
        """The header of an object this spool wrote lately, from memory (None otherwise)."""
        with self._lock:
            return self._headers.get(info.key)

    def read_header(self, info: ObjectInfo) -> ObjectHeader:
        """The header of a spooled object (from memory if it was written lately)."""
        header = self.cached_header(info)
        if header is not None:
            return header
        with open(self.path(info), "rb") as f:
            return header_from_json(read_header_file(f, info.key), info.key)

    def latest(self) -> tuple[ObjectInfo, ObjectHeader] | None:
        """The newest object of the newest generation with its header, or None."""
        for gen in reversed(self.generations()):
            objs = self.objects(gen)
            if objs:
                return objs[-1], self.read_header(objs[-1])
        return None

    def delete(self, infos: Iterable[ObjectInfo]) -> None:
        """Remove objects (no fsync needed: the spool's deletions need not survive a crash)."""
        for info in infos:
            with self._lock:
                self._scan().get(info.generation, {}).pop(info.key, None)
                self._sorted.pop(info.generation, None)
                self._drop_header(info.key)
            try:
                os.unlink(self.path(info))
            except FileNotFoundError:
                pass

    def delete_generation(self, generation: str) -> None:
        """Remove a generation."""
        with self._lock:
            self._dirs.clear()
            self._scan().pop(generation, None)
            self._sorted.pop(generation, None)
            for key in [k for k in self._headers if k.split("/")[1:2] == [generation]]:
                self._drop_header(key)
        shutil.rmtree(os.path.join(self.root, GENERATIONS_DIR, generation), ignore_errors=True)


def _weight(header: ObjectHeader) -> int:
    """What a cached header counts against HEADER_CACHE: one, and one per transaction listed."""
    txns = getattr(header, "txns", None)
    return 1 + (len(txns) if txns else 0)


def _order(o: ObjectInfo) -> tuple[str, int, int, int, int, int]:
    """ObjectInfo's own order (a key function sorts far faster than pairwise comparisons)."""
    return (o.generation, o.end_txid, o.kind_order, o.start_txid, o.first_ms, o.last_ms)
