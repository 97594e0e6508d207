"""The storage Protocol every replica backend implements.

A backend stores opaque objects under keys built by :mod:`replicator.pos`. It knows nothing about
WAL frames or restore policy; that lives in the core, as functions that take a client.
Writes are atomic: an object is either absent or complete under its key.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from ..pos import ObjectInfo

DEFAULT_CHUNK_SIZE = 1 << 20
# The one key outside generations/: the fencing record (see replicator.lease and docs/format.md).
LEASE_KEY = "lease.json"


@runtime_checkable
class StorageClient(Protocol):
    """One replica destination.

    ``url`` is the destination as shown to people (never with credentials).
    """

    url: str

    async def init(self) -> None:
        """Check the destination is usable (create the directory, check the bucket)."""
        ...

    async def generations(self) -> list[str]:
        """Generation ids present, sorted oldest first."""
        ...

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Snapshots and segments of one generation, sorted by (end_txid, kind)."""
        ...

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Store ``data`` under ``info.key`` atomically; return the number of bytes written."""
        ...

    def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream an object's bytes; raises NotFoundError if it is absent."""
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
