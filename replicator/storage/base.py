"""The storage Protocol every replica backend implements.

A backend stores opaque objects under keys built by :mod:`replicator.pos`. It knows nothing about
WAL frames or restore policy; that lives in the core, as functions that take a client.
Writes are atomic: an object is either absent or complete under its key.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ..pos import LEASE_KEY, ObjectInfo

DEFAULT_CHUNK_SIZE = 1 << 20

__all__ = ["DEFAULT_CHUNK_SIZE", "LEASE_KEY", "StorageClient"]


@runtime_checkable
class StorageClient(Protocol):
    """One replica destination.

    ``url`` is the destination as shown to people (never with credentials).

    Two optional capabilities are declared rather than inferred from the class:

    * ``local``: objects are on this machine, so reading one costs no request (a restore then
      reads them in order instead of downloading ahead);
    * ``can_link``: :meth:`link_object` can put a spooled file in place without copying it (a
      backend that cannot returns None from it; a replica then batches consecutive segments
      into one object instead, since it pays per object).
    """

    url: str
    local: bool
    can_link: bool

    async def init(self) -> None:
        """Check the destination is usable (create the directory, check the bucket)."""
        ...

    async def generations(self) -> list[str]:
        """Generation ids present, sorted oldest first."""
        ...

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Snapshots and segments of one generation, sorted by (end_txid, kind)."""
        ...

    async def children(self, sub: str = "") -> list[str]:
        """The names of the directories (prefixes) one level below ``sub``, a '/'-separated
        path below this destination ("": the destination itself), sorted; none when there is
        nothing there. How the databases of a ``dir:`` entry are found below the entry's
        destination, each at its relative path, when they are not on this machine."""
        ...

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Store ``data`` under ``info.key`` atomically; return the number of bytes written."""
        ...

    async def link_object(self, info: ObjectInfo, source: str) -> int | None:
        """Put ``source``, a durable local file that is never modified again, in place as
        ``info`` without copying it; return its size, or None when this backend cannot (then
        the caller writes it with :meth:`write_object`)."""
        ...

    async def link_objects(self, items: Sequence[tuple[ObjectInfo, str]]) -> list[int] | None:
        """:meth:`link_object` for several objects at once, made durable together (one flush
        per directory); their sizes, or None when this backend cannot link."""
        ...

    def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream an object's bytes; raises NotFoundError if it is absent."""
        ...

    async def read_objects(self, infos: Sequence[ObjectInfo]) -> list[bytes]:
        """The whole stored bytes of each of several small objects, in order, read together
        (one worker call for a directory, concurrent requests for S3); raises NotFoundError
        if one is absent. For objects small enough to hold in memory at once."""
        ...

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        """Delete objects; absent ones are ignored."""
        ...

    async def delete_generation(self, generation: str) -> None:
        """Delete a whole generation; an absent one is ignored."""
        ...

    async def read_lease(self) -> bytes | None:
        """The lease record stored at ``LEASE_KEY`` beside ``generations/``, or None if there is
        none."""
        ...

    async def write_lease(self, data: bytes) -> None:
        """Store the lease record at ``LEASE_KEY``, atomically replacing any previous one."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads."""
        ...
