"""A replicated database run in-process, for tests that drive its one-step methods."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from replicator.config import DbConfig
from replicator.replicator import DatabaseService


@contextlib.asynccontextmanager
async def running_service(dbcfg: DbConfig) -> AsyncIterator[DatabaseService]:
    """An opened service with its destinations shipping, closed after the block."""
    svc = DatabaseService(dbcfg)
    await svc.open()
    stop = asyncio.Event()
    shippers = [asyncio.create_task(r.run(stop)) for r in svc.replicas]
    try:
        yield svc
    finally:
        stop.set()
        await asyncio.gather(*shippers)
        await svc.close(5.0)
