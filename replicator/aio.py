"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from enum import Enum
from typing import Any


async def wait_event(event: asyncio.Event, within: float | None) -> None:
    """Return once ``event`` is set, or after ``within`` seconds (None: no limit). It makes
    no task: a loop that wakes a thousand times a second waits with it, on its own wake-up
    alone (and learns of its stop through :func:`relay`)."""
    if event.is_set():
        return
    if within is None:
        await event.wait()
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await event.wait()


class Stop(asyncio.Event):
    """A stop signal that sets the wake-ups :func:`relay` linked to it when it is set, without a
    task waiting for it (a thousand databases' loops would hold two such tasks each)."""

    def __init__(self) -> None:
        super().__init__()
        self._linked: list[asyncio.Event] = []

    def link(self, wakes: tuple[asyncio.Event, ...]) -> None:
        """Set ``wakes`` whenever this is set (at once if it is)."""
        self._linked.extend(wakes)
        if self.is_set():
            for w in wakes:
                w.set()

    def unlink(self, wakes: tuple[asyncio.Event, ...]) -> None:
        """Undo :meth:`link`."""
        for w in wakes:
            self._linked.remove(w)

    def set(self) -> None:
        super().set()
        for w in list(self._linked):
            w.set()


@contextlib.asynccontextmanager
async def relay(stop: asyncio.Event, *wakes: asyncio.Event) -> AsyncIterator[None]:
    """While inside, ``stop`` being set sets every one of ``wakes`` too, so that a loop can wait
    for its wake-up alone with :func:`wait_event` (with a :class:`Stop`, no task is needed)."""
    if isinstance(stop, Stop):
        stop.link(wakes)
        try:
            yield
        finally:
            stop.unlink(wakes)
        return

    async def forward() -> None:
        await stop.wait()
        for w in wakes:
            w.set()

    task = asyncio.ensure_future(forward())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Outcome(Enum):
    """How :func:`bounded` ended."""

    DONE = "done"
    SKIPPED = "skipped"
    LATE = "late"


async def bounded(
    work: Coroutine[Any, Any, None], grace: float, skip: asyncio.Event | None
) -> Outcome:
    """Run ``work`` until it is done, ``grace`` seconds pass or ``skip`` is set (whichever
    comes first; the work is then cancelled). Re-raises what the work raised."""
    task = asyncio.ensure_future(work)
    skipping = asyncio.ensure_future((skip or asyncio.Event()).wait())
    in_time = False
    try:
        done, _ = await asyncio.wait({task, skipping}, timeout=grace,
                                     return_when=asyncio.FIRST_COMPLETED)
        in_time = task in done
    finally:
        for t in (skipping, task):
            t.cancel()
        await asyncio.gather(skipping, task, return_exceptions=True)
    if in_time:
        task.result()  # re-raises what failed
        return Outcome.DONE
    return Outcome.SKIPPED if skip is not None and skip.is_set() else Outcome.LATE
