"""Pruning the spool: a spooled object goes once every replica holds it, except the newest (the
resume point), those a restart replays into the page index, and, while a remote destination
compacts, the segments its first level will merge soon (so that it need not download them)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

from .aio import Background
from .pageindex import IndexKeeper
from .replica import Replica
from .retry import Deferral
from .spool import Spool


def keep_recent_ms(replicas: Sequence[Replica]) -> int | None:
    """Segments last written at or after this time (ms) stay while a destination compacts."""
    levels = [r.compactor.levels[0] for r in replicas
              if r.batch and r.compactor is not None and r.compactor.levels]
    return int((time.time() - 2 * max(levels)) * 1000) if levels else None


def prune_spool(spool: Spool, keeper: IndexKeeper, replicas: Sequence[Replica],
                keep_ms: int | None) -> int:
    """Drop the spooled objects every replica has (blocking), keeping those named above;
    returns how many were dropped."""
    dropped = 0
    gens = spool.generations()
    for gi, gen in enumerate(gens):
        objs = spool.objects(gen)
        newest_gen = gi == len(gens) - 1
        # a restart replays the objects after the saved page index
        keep_after = keeper.keep_from(gen)
        drop = []
        for i, o in enumerate(objs):
            if newest_gen and i == len(objs) - 1:
                continue
            if keep_after is not None and o.end_txid > keep_after:
                continue
            if newest_gen and keep_ms is not None and o.last_ms >= keep_ms:
                continue
            if all(r.holdings.holds(o) for r in replicas):
                drop.append(o)
        spool.delete(drop)
        dropped += len(drop)
        if not newest_gen and len(drop) == len(objs):
            spool.delete_generation(gen)
    return dropped


PRUNE_FEW = 16
PRUNE_SLOW = 10.0
"""After a prune that dropped fewer than PRUNE_FEW objects the next waits PRUNE_SLOW seconds
rather than ``every``: a database that commits now and then would otherwise be pruned after
nearly every commit (a worker call and a turn of the database each), for a spool that holds
only a few small objects more meanwhile. A busy one (many objects a prune) keeps ``every``."""
PRUNE_DEFER = 5.0
"""While the capture follows a busy writer a prune waits (for at most this many seconds): it
takes the database's turn (the spool is the capture's too) and its unlinks take the disk."""


class PruneSchedule:
    """Runs ``prune`` soon after each :meth:`soon`, at most every ``every`` seconds (a busy
    database ships every few milliseconds, and a prune looks at every spooled object; ``slow``
    after a prune that dropped few, see PRUNE_SLOW), and not while ``busy()`` says the capture
    follows a busy writer (see :class:`Deferral`). ``prune`` returns how many objects it
    dropped."""

    def __init__(self, prune: Callable[[], Awaitable[int]], every: float,
                 busy: Callable[[], bool] = lambda: False, defer: float = PRUNE_DEFER,
                 slow: float = PRUNE_SLOW) -> None:
        self._prune = prune
        self._every = every
        self._slow = max(slow, every)
        self._dropped = PRUNE_FEW
        self._busy = busy
        self._deferral = Deferral(defer)
        self._slot = Background()
        self._waiting = False
        self._pruned_at = 0.0

    def soon(self) -> None:
        """Prune soon (once, however often it is asked before that)."""
        if not self._slot.running():
            self._slot.start(self._after_wait())

    async def _after_wait(self) -> None:
        every = self._every if self._dropped >= PRUNE_FEW else self._slow
        wait = self._pruned_at + every - time.monotonic()
        if wait > 0:
            self._waiting = True
            try:
                await asyncio.sleep(wait)
            finally:
                self._waiting = False
        while self._deferral.defers(self._busy()):
            self._waiting = True
            try:
                await asyncio.sleep(self._every / 10)
            finally:
                self._waiting = False
        self._deferral.done()
        self._pruned_at = time.monotonic()
        self._dropped = await self._prune()

    async def stop(self) -> None:
        """Drop a prune that is waiting for its turn; let one that runs finish."""
        task = self._slot.task
        if task is not None and not task.done():
            if self._waiting:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
