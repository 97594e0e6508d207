"""An in-memory backend, for tests and as the reference implementation of the Protocol."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence

from ..errors import NotFoundError
from ..pos import GENERATIONS_DIR, ObjectInfo, is_generation_id, parse_key, sort_objects
from .base import DEFAULT_CHUNK_SIZE


class MemoryStorage:
    """Keeps objects in a dict keyed like the other backends. It counts as local (reads cost
    nothing) but cannot link files, so a replica batches segments for it like for a remote
    destination."""

    local = True
    can_link = False

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self.data: dict[str, bytes] = {}
        self.lease: bytes | None = None  # kept apart from the objects: never listed

    async def init(self) -> None:
        """Nothing to check."""

    async def generations(self) -> list[str]:
        """Generation ids present, oldest first."""
        gens = {k.split("/")[1] for k in self.data if k.startswith(GENERATIONS_DIR + "/")}
        return sorted(g for g in gens if is_generation_id(g))

    async def children(self, sub: str = "") -> list[str]:
        """The names one level below ``sub`` that have keys below them, sorted."""
        base = f"{sub.strip('/')}/" if sub.strip("/") else ""
        return sorted({k[len(base):].split("/")[0] for k in self.data
                       if k.startswith(base) and "/" in k[len(base):]})

    async def objects(self, generation: str) -> list[ObjectInfo]:
        """Objects of a generation, sorted."""
        out = []
        for key, value in self.data.items():
            info = parse_key(key, len(value))
            if info is not None and info.generation == generation:
                out.append(info)
        return sort_objects(out)

    async def write_object(self, info: ObjectInfo, data: AsyncIterable[bytes]) -> int:
        """Collect the stream, then store it in one assignment (atomic)."""
        parts = [bytes(chunk) async for chunk in data]
        blob = b"".join(parts)
        self.data[info.key] = blob
        return len(blob)

    async def link_object(self, info: ObjectInfo, source: str) -> int | None:
        """Not supported: None (the caller writes the object instead)."""
        return None

    async def link_objects(self, items: Sequence[tuple[ObjectInfo, str]]) -> list[int] | None:
        """Not supported: None (the caller writes the objects instead)."""
        return None

    async def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        """Stream the stored bytes."""
        try:
            blob = self.data[info.key]
        except KeyError:
            raise NotFoundError(f"{self.url}: {info.key}: object not found") from None
        for i in range(0, len(blob), DEFAULT_CHUNK_SIZE):
            yield blob[i : i + DEFAULT_CHUNK_SIZE]

    async def read_objects(self, infos: Sequence[ObjectInfo]) -> list[bytes]:
        """The stored bytes of each object."""
        try:
            return [self.data[info.key] for info in infos]
        except KeyError as exc:
            raise NotFoundError(f"{self.url}: {exc.args[0]}: object not found") from None

    async def delete_objects(self, infos: Sequence[ObjectInfo]) -> None:
        """Delete objects; absent ones are ignored."""
        for info in infos:
            self.data.pop(info.key, None)

    async def delete_generation(self, generation: str) -> None:
        """Delete every key of a generation."""
        prefix = f"{GENERATIONS_DIR}/{generation}/"
        for key in [k for k in self.data if k.startswith(prefix)]:
            del self.data[key]

    async def read_lease(self) -> bytes | None:
        """The stored lease record, or None."""
        return self.lease

    async def write_lease(self, data: bytes) -> None:
        """Replace the lease record (one assignment: atomic)."""
        self.lease = bytes(data)

    async def aclose(self) -> None:
        """Nothing to release."""
