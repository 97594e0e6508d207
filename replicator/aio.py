"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import typing
from collections.abc import Awaitable, Callable, Coroutine
from enum import Enum
from typing import Any

from .retry import CHORE_RETRY, Backoff


async def wait_event(event: asyncio.Event, within: float | None) -> None:
    """Return once ``event`` is set, or after ``within`` seconds (None: no limit). It makes
    no task: a loop that wakes a thousand times a second waits with it, on its own wake-up
    alone (and learns of its stop through :func:`relay`)."""
    if event.is_set():
        return
    if within is None:
        await event.wait()
        return
    if isinstance(event, Flag):
        await event.wait_within(within)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            await event.wait()


class Flag(asyncio.Event):
    """An :class:`asyncio.Event` that holds no queue of waiters while none waits. The standard
    event makes one (a ``deque`` of about 760 bytes) as it is created, and a lock the first
    time two tasks want it, and keeps it: a thousand parked databases held about 3 MiB of
    empty queues in their wake-ups, stop signals and locks. Here the list of waiters exists
    only while someone waits."""

    def __init__(self) -> None:  # no super().__init__(): it would make the deque
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None  # type: ignore[assignment]

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> typing.Literal[True]:
        if self._value:
            return True
        await self._wait(None)
        return True

    async def wait_within(self, within: float) -> bool:
        """Wait until set, or ``within`` seconds; whether it is set. A timer ends the wait
        (as a wake-up would), not a cancellation: a loop that looks every few milliseconds
        pays for no exception unwinding its coroutines each time."""
        if not self._value:
            await self._wait(within)
        return self._value

    async def _wait(self, within: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        timer = None if within is None else loop.call_later(within, _end_wait, fut)
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            waiters = self._waiters
            if waiters is not None and fut in waiters:  # cancelled or timed out before set()
                waiters.remove(fut)
                if not waiters:
                    self._waiters = None


def _end_wait(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Lock(asyncio.Lock):
    """An :class:`asyncio.Lock` that lets go of its queue of waiters once nobody waits (the
    standard lock keeps the ``deque`` it made for the first wait for ever; see :class:`Flag`)."""

    async def acquire(self) -> typing.Literal[True]:
        try:
            return await super().acquire()
        finally:
            if not self._waiters:
                self._waiters = None


class Wake(Flag):
    """A loop's wake-up that knows whether only file events set it since a given moment: a file
    event says when it was handled (:meth:`file_event`, on the loop: the change it reports was
    made before that); every other :meth:`set` counts in ``others``."""

    def __init__(self) -> None:
        super().__init__()
        self.others = 0
        """How many times :meth:`set` was called (anything but a file event)."""
        self.file_at = 0.0
        """``time.monotonic()`` when the last file event was handled (0: none yet)."""

    def set(self) -> None:
        self.others += 1
        super().set()

    def file_event(self, at: float) -> None:
        """Set by a file event handled at ``at`` (``time.monotonic()``)."""
        self.file_at = at
        super().set()


def file_event(event: asyncio.Event) -> None:
    """Set ``event`` for a file event handled now (noting when, if it is a :class:`Wake`)."""
    if isinstance(event, Wake):
        event.file_event(time.monotonic())
    else:
        event.set()


class Stop(Flag):
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


class relay:  # noqa: N801 - used as ``async with relay(stop, wake)``, like a function
    """While inside, ``stop`` being set sets every one of ``wakes`` too, so that a loop can wait
    for its wake-up alone with :func:`wait_event` (with a :class:`Stop`, no task is needed).
    A class rather than a generator: a thousand databases' loops each hold one while they run."""

    __slots__ = ("_stop", "_wakes", "_task")

    def __init__(self, stop: asyncio.Event, *wakes: asyncio.Event) -> None:
        self._stop = stop
        self._wakes = wakes
        self._task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> None:
        if isinstance(self._stop, Stop):
            self._stop.link(self._wakes)
        else:
            self._task = asyncio.ensure_future(self._forward())

    async def _forward(self) -> None:
        await self._stop.wait()
        for w in self._wakes:
            w.set()

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            assert isinstance(self._stop, Stop)
            self._stop.unlink(self._wakes)
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class Background:
    """At most one task of some background work at a time (a compaction step, a prune). A task
    that ended without an error is let go at once: a thousand idle databases would otherwise
    each hold their last finished tasks (about 0.7 KB each). A task that failed is reported
    to the loop's exception handler as it ends (as asyncio would report it, later, when
    nobody read its error) and kept, so that whoever waits for it sees the error."""

    __slots__ = ("task",)

    def __init__(self) -> None:
        self.task: asyncio.Future[None] | None = None

    def running(self) -> bool:
        """Whether a task started here has not ended yet."""
        return self.task is not None and not self.task.done()

    def start(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``work`` in a task of its own (the one this slot now holds)."""
        task = asyncio.ensure_future(work)
        self.task = task
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is None:
            if self.task is task:
                self.task = None
            return
        report_failure(task, "background task failed")


def report_failure(task: asyncio.Future[Any], message: str) -> None:
    """Hand the error of ``task`` (ended, with one) to the loop's exception handler now, as
    asyncio would report it later if nobody read it."""
    asyncio.get_running_loop().call_exception_handler({
        "message": message, "exception": task.exception(), "future": task})


class Timed:
    """A chore run again and again at the times it asks for, with no task while it waits:
    ``step()`` runs in a task of its own and returns how many seconds to wait before the next
    run (``math.inf``: none). A loop timer (about a hundred bytes) stands in for a task
    waiting in a loop with its coroutines, timeout and future: the health checks and
    maintenance of a thousand parked databases held about 3 MiB of them.

    A step that raises is reported to the loop's exception handler (as a failed task would be)
    and run again after the ``retry`` backoff (counting the failures in a row)."""

    __slots__ = ("_step", "_retry", "_failures", "_timer", "_task", "_stopped")

    def __init__(self, step: Callable[[], Awaitable[float]],
                 retry: Backoff = CHORE_RETRY) -> None:
        self._step = step
        self._retry = retry
        self._failures = 0
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Future[float] | None = None
        self._stopped = False

    def start(self, delay: float = 0.0) -> Timed:
        """Run the first step ``delay`` seconds from now (on the running loop)."""
        self._later(delay)
        return self

    def running(self) -> bool:
        """Whether a step is running now."""
        return self._task is not None

    def _later(self, delay: float) -> None:
        if not self._stopped and delay != math.inf:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._stopped:
            return
        task = asyncio.ensure_future(self._step())
        self._task = task
        task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Future[float]) -> None:
        self._task = None
        if task.cancelled():
            return
        if task.exception() is None:
            self._failures = 0
            self._later(task.result())
            return
        report_failure(task, "timed chore failed")
        self._failures += 1
        self._later(self._retry.delay(self._failures))

    def halt(self) -> None:
        """No further step (a step running now goes on)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def stop(self, grace: float | None = None) -> None:
        """No further step; a step running now may finish (within ``grace`` seconds, if given,
        else it is cancelled then). Returns once it has ended."""
        self.halt()
        task = self._task
        if task is None:
            return
        if grace is not None:
            await asyncio.wait({task}, timeout=grace)
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
