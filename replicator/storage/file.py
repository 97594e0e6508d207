"""A local directory backend.

Layout under the root directory is exactly the key space of :mod:`replicator.pos`. Writes go to a
temp file in the target directory, are fsynced, renamed into place, and the directory is fsynced.
Blocking file work runs in threads (``aiofiles`` and :func:`~replicator.threads.off_loop`), never
on the loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Sequence

from ..errors import NotFoundError, StorageError
from ..fsutil import TMP_SUFFIX, atomic_writer, fsync_dir, makedirs_durable, temp_path
from ..pos import (
    GENERATIONS_DIR,
    LEASE_KEY,
    ObjectInfo,
    is_generation_id,
    parse_key,
    sort_objects,
)
from ..threads import off_loop
from .base import DEFAULT_CHUNK_SIZE

# link() errors that mean "copy instead": another file system, or one without hard links
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


async def stream_file(path: str) -> AsyncGenerator[bytes, None]:
    """A local file's bytes in ``DEFAULT_CHUNK_SIZE`` chunks, read in a thread."""
    import aiofiles  # not at the top: a restore, which only reads, starts without it

    async with aiofiles.open(path, "rb") as f:
        while chunk := await f.read(DEFAULT_CHUNK_SIZE):
            yield chunk


def _open_read(path: str) -> tuple[int, int, bytes]:
    """Open a file: (descriptor, size, first chunk) (blocking). A read asks for no more than
    the file holds: it allocates what it asks for (a spooled segment is often a few KiB)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return fd, size, os.read(fd, min(DEFAULT_CHUNK_SIZE, size))
    except BaseException:
        os.close(fd)
        raise


def link_into(source: str, path: str) -> None:
    """Make ``path`` a hard link to ``source`` (a complete, durable file): a link at ``path``
    itself when nothing is there (the name appears whole, one directory entry made), else a
    link at a temp name renamed over what is there. The caller fsyncs the directory."""
    try:
        os.link(source, path)
        return
    except FileExistsError:
        pass
    tmp = temp_path(path)
    os.link(source, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileStorage:
    """Objects as files below a root directory."""

    local = True
    can_link = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/"))

    def object_path(self, info: ObjectInfo) -> str:
        """The file that holds an object (which may not exist)."""
        return self._path(info.key)

    def _error(self, what: str, exc: OSError) -> StorageError:
        return StorageError(f"{self.url}: {what}: {_describe(exc)}")

    async def init(self) -> None:
        """Create the root directory if needed and check it is writable."""

        def check() -> None:
            makedirs_durable(self.root)
            probe = temp_path(os.path.join(self.root, ".probe"))
            with open(probe, "xb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            os.unlink(probe)

        try:
            await off_loop(check)
        except OSError as exc:
            raise self._error("cannot write replica directory", exc) from None

    def scan_generations(self) -> list[str]:
        """Generation ids present, oldest first (blocking: call from a thread)."""
        try:
            names = os.listdir(os.path.join(self.root, GENERATIONS_DIR))
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_generation_id(n))

    def scan_children(self, sub: str) -> list[str]:
        """See :meth:`children` (blocking: call from a thread)."""
        try:
            entries = list(os.scandir(self._path(sub) if sub else self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def scan_objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation with their sizes, sorted; temp files are ignored (blocking:
        call from a thread)."""
        out: list[ObjectInfo] = []
        for folder in ("snapshots", "wal"):
            d = os.path.join(self.root, GENERATIONS_DIR, generation, folder)
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.name.endswith(TMP_SUFFIX):
                    continue
                key = f"{GENERATIONS_DIR}/{generation}/{folder}/{e.name}"
                try:
                    size = e.stat().st_size
                except FileNotFoundError:
                    continue
                info = parse_key(key, size)
                if info is not None:
                    out.append(info)
        return sort_objects(out)

    def scan_segments(self, generation: str, start: int, end: int) -> list[ObjectInfo]:
        """The WAL segments of a generation that lie within txids ``start``..``end``, with
        their sizes (blocking). Only their names are looked at for the others, so that the
        cost does not grow with everything the generation holds."""
        d = os.path.join(self.root, GENERATIONS_DIR, generation, "wal")
        lo, hi = f"{start:016x}", f"{end:016x}"
        out: list[ObjectInfo] = []
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            return out
        for e in entries:
            name = e.name
            # "<start>-<end>-...": 16 hex digits each, so text order is txid order
            if not (lo <= name[:16] and name[17:33] <= hi) or name.endswith(TMP_SUFFIX):
                continue
            try:
                size = e.stat().st_size
            except FileNotFoundError:
                continue
            info = parse_key(f"{GENERATIONS_DIR}/{generation}/wal/{name}", size)
            if info is not None and info.kind == "wal":
                out.append(info)
        return sort_objects(out)

    async def generations(self) -> list[str]:
        """Generation ids present, oldest first."""
        try:
            return await off_loop(self.scan_generations)
        except OSError as exc:
            raise self._error("cannot list generations", exc) from None

    async def children(self, sub: str = "") -> list[str]:
        """The directories below ``sub``, sorted."""
        try:
            return await off_loop(self.scan_children, sub)
        except OSError as exc:
            raise self._error(f"cannot list {sub or 'the replica directory'}", exc) from None

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation, sorted; temp files are ignored."""
        try:
            return await off_loop(self.scan_objects, generation)
        except OSError as exc:
            raise self._error(f"cannot list generation {generation}", exc) from None

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Write to a temp file, fsync, rename, fsync the directory."""
        import aiofiles  # not at the top: a restore, which only reads, starts without it
        import aiofiles.os

        path = self._path(info.key)
        tmp = temp_path(path)
        total = 0
        try:
            await off_loop(makedirs_durable, os.path.dirname(path))
            async with aiofiles.open(tmp, "xb") as f:
                async for chunk in data:
                    await f.write(chunk)
                    total += len(chunk)
                await f.flush()
                await off_loop(os.fsync, f.fileno())
            await aiofiles.os.replace(tmp, path)
            await off_loop(fsync_dir, os.path.dirname(path))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise self._error(f"cannot write {info.key}", exc) from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return total

    async def link_object(self, info: ObjectInfo, source: str) -> int | None:
        """Put ``source``, a local file that is already durable, in place as ``info`` by
        hard-linking it: no copy, no second write of the same bytes. Returns the size, or None
        when the file system cannot link it (another device, no hard links): then
        :meth:`write_object` copies it. Objects are never modified in place, so sharing the
        file is safe."""
        sizes = await self.link_objects([(info, source)])
        return sizes[0] if sizes is not None else None

    def link_now(self, items: Sequence[tuple[ObjectInfo, str]]) -> list[int] | None:
        """:meth:`link_objects` in the calling thread (a worker's: it blocks), raising
        :class:`OSError`."""
        dirs: dict[str, None] = {}
        sizes = []
        for info, source in items:
            path = self._path(info.key)
            parent = os.path.dirname(path)
            dirs[parent] = None
            try:
                try:
                    link_into(source, path)
                except FileNotFoundError:
                    # the directory is new (no look first: it is there nearly always)
                    makedirs_durable(parent)
                    link_into(source, path)
            except OSError as exc:
                if exc.errno in _NO_LINK:
                    return None
                raise
            sizes.append(info.size or os.stat(path).st_size)
        for parent in dirs:
            fsync_dir(parent)
        return sizes

    async def link_objects(self, items: Sequence[tuple[ObjectInfo, str]]) -> list[int] | None:
        """:meth:`link_object` for several objects in one worker call, each directory fsynced
        once after all its links (an object whose link is not yet durable is not reported)."""
        try:
            return await off_loop(self.link_now, items)
        except OSError as exc:
            more = f" and {len(items) - 1} more" if len(items) > 1 else ""
            raise self._error(f"cannot write {items[0][0].key}{more}", exc) from None

    async def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream a file in chunks (an object of one chunk in one worker call)."""
        try:
            fd, size, chunk = await off_loop(_open_read, self._path(info.key))
        except FileNotFoundError:
            raise NotFoundError(f"{self.url}: {info.key}: object not found") from None
        except OSError as exc:
            raise self._error(f"cannot read {info.key}", exc) from None
        # closed with this iterator, so a reader that stops early (a header) closes the file;
        # no inner generator, which asyncio would close on its own at shutdown, at the same time
        try:
            done = len(chunk)
            while chunk:
                yield chunk
                if done >= size:
                    return  # objects are never modified: nothing follows
                try:
                    chunk = await off_loop(os.read, fd, min(DEFAULT_CHUNK_SIZE, size - done))
                except OSError as exc:
                    raise self._error(f"cannot read {info.key}", exc) from None
                done += len(chunk)
        finally:
            os.close(fd)

    async def read_objects(self, infos: Sequence[ObjectInfo]) -> list[bytes]:
        """The whole stored bytes of each object, in one worker call."""

        def read_all() -> list[bytes]:
            out = []
            for info in infos:
                try:
                    with open(self._path(info.key), "rb") as f:
                        out.append(f.read())
                except FileNotFoundError:
                    raise NotFoundError(f"{self.url}: {info.key}: object not found") from None
                except OSError as exc:
                    raise self._error(f"cannot read {info.key}", exc) from None
            return out

        return await off_loop(read_all)

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        """Unlink files; absent ones are ignored."""

        def rm() -> None:
            dirs = set()
            for info in infos:
                path = self._path(info.key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    dirs.add(os.path.dirname(path))
            for d in dirs:
                fsync_dir(d)

        try:
            await off_loop(rm)
        except OSError as exc:
            raise self._error("cannot delete objects", exc) from None

    async def delete_generation(self, generation: str) -> None:
        """Remove a generation's directory tree."""
        path = os.path.join(self.root, GENERATIONS_DIR, generation)
        try:
            await off_loop(shutil.rmtree, path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error(f"cannot delete generation {generation}", exc) from None

    async def read_lease(self) -> bytes | None:
        """The contents of ``<root>/lease.json``, or None if it does not exist."""

        def read() -> bytes | None:
            try:
                with open(self._path(LEASE_KEY), "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        try:
            return await off_loop(read)
        except OSError as exc:
            raise self._error(f"cannot read {LEASE_KEY}", exc) from None

    async def write_lease(self, data: bytes) -> None:
        """Replace ``<root>/lease.json`` like any object: temp file, fsync, rename, fsync."""

        def write() -> None:
            with atomic_writer(self._path(LEASE_KEY)) as f:
                f.write(data)

        try:
            await off_loop(write)
        except OSError as exc:
            raise self._error(f"cannot write {LEASE_KEY}", exc) from None

    async def aclose(self) -> None:
        """Nothing to release."""
