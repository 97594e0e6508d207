"""Retention: delete what is no longer needed to restore any point of the retention window.

For a window of ``retention`` seconds ending now, the cutoff is ``now - retention``. Everything a
restore to any T >= cutoff needs is kept: in each generation, the newest snapshot observed at or
before the cutoff and all that follows it; a generation that ended before the cutoff goes whole,
unless it is the newest. Nothing is deleted until a newer snapshot makes it unnecessary, so
retention only takes effect with periodic snapshots (``snapshot-interval`` < ``retention``).
"""

from __future__ import annotations

import logging
import time

from .pos import ObjectInfo
from .restore import summarize
from .storage.base import StorageClient

log = logging.getLogger("replicator.retention")


async def plan_retention(
    client: StorageClient, retention: float, now: float | None = None
) -> tuple[list[str], list[ObjectInfo]]:
    """(generations to delete whole, objects to delete) for a retention window."""
    cutoff_ms = int(((now if now is not None else time.time()) - retention) * 1000)
    gens = await summarize(client)
    drop_gens: list[str] = []
    drop_objs: list[ObjectInfo] = []
    for i, g in enumerate(gens):
        newest = i == len(gens) - 1
        if not newest and g.end_ms < cutoff_ms and gens[i + 1].snapshots:
            drop_gens.append(g.generation)
            continue
        base = [s for s in g.snapshots if s.last_ms <= cutoff_ms]
        if not base:
            continue
        keep_from = base[-1].end_txid
        drop_objs.extend(o for o in g.snapshots if o.end_txid < keep_from)
        drop_objs.extend(o for o in g.segments if o.end_txid <= keep_from)
    return drop_gens, drop_objs


async def apply_retention(
    client: StorageClient, retention: float, now: float | None = None
) -> int:
    """Delete what the window no longer needs; return the number of objects and generations
    deleted."""
    drop_gens, drop_objs = await plan_retention(client, retention, now)
    for gen in drop_gens:
        await client.delete_generation(gen)
    if drop_objs:
        await client.delete_objects(drop_objs)
    if drop_gens or drop_objs:
        log.info("%s: retention removed %d generations and %d objects", client.url,
                 len(drop_gens), len(drop_objs))
    return len(drop_gens) + len(drop_objs)
