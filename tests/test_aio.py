"""The asyncio helpers of the long-running loops: events and locks that hold no queue while
nobody waits, a stop signal relayed to a loop's wake-up, the slot of a background task, and
chores run on a timer."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from replicator.aio import Background, Flag, Lock, Stop, Timed, Wake, relay, wait_event
from replicator.retry import Backoff


@pytest.mark.parametrize("make", [Flag, Wake, Stop], ids=["flag", "wake", "stop"])
async def test_a_flag_behaves_as_an_event_and_holds_no_queue_while_nobody_waits(
        make: type[Flag]) -> None:
    flag = make()
    assert flag._waiters is None and not flag.is_set()
    woken: list[int] = []

    async def waiter(k: int) -> None:
        assert await flag.wait() is True
        woken.append(k)

    tasks = [asyncio.create_task(waiter(k)) for k in range(3)]
    await asyncio.sleep(0.01)
    assert woken == [] and flag._waiters is not None and len(flag._waiters) == 3
    tasks[1].cancel()  # a waiter that gives up leaves the queue
    await asyncio.gather(tasks[1], return_exceptions=True)
    assert len(flag._waiters) == 2
    flag.set()
    await asyncio.wait_for(asyncio.gather(tasks[0], tasks[2]), 5)
    assert sorted(woken) == [0, 2] and flag._waiters is None and flag.is_set()
    assert await asyncio.wait_for(flag.wait(), 1) is True  # set: returns at once
    flag.clear()
    assert not flag.is_set()
    started = time.monotonic()
    await wait_event(flag, 0.05)  # a timed wait that runs out
    assert time.monotonic() - started >= 0.04 and not flag.is_set()
    assert flag._waiters is None  # the timed-out waiter left


async def test_a_flag_waits_within_a_time_on_a_timer_without_cancelling() -> None:
    flag = Flag()
    started = time.monotonic()
    assert await flag.wait_within(0.05) is False  # timed out: not set
    assert time.monotonic() - started >= 0.04 and flag._waiters is None
    asyncio.get_running_loop().call_later(0.02, flag.set)
    started = time.monotonic()
    assert await flag.wait_within(5) is True  # set before the time: returns then
    assert time.monotonic() - started < 4 and flag._waiters is None
    assert await flag.wait_within(5) is True  # set already: at once
    flag.clear()
    waiting = asyncio.create_task(flag.wait_within(5))
    await asyncio.sleep(0.01)
    assert flag._waiters is not None and len(flag._waiters) == 1
    waiting.cancel()  # the waiting task is cancelled: it leaves, its timer with it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert flag._waiters is None and not flag.is_set()


async def test_a_lock_excludes_and_lets_go_of_its_queue_once_nobody_waits() -> None:
    lock = Lock()
    inside, most, order = 0, 0, []

    async def worker(k: int) -> None:
        nonlocal inside, most
        async with lock:
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.005)
            order.append(k)
            inside -= 1

    waiting = asyncio.create_task(worker(99))
    await asyncio.sleep(0)  # it holds the lock
    tasks = [asyncio.create_task(worker(k)) for k in range(4)]
    await asyncio.sleep(0)
    assert lock._waiters is not None and len(lock._waiters) == 4
    tasks[2].cancel()  # one gives up while waiting
    await asyncio.wait_for(asyncio.gather(waiting, *tasks, return_exceptions=True), 5)
    assert most == 1 and order == [99, 0, 1, 3]
    assert lock._waiters is None and not lock.locked()


@pytest.mark.parametrize("make", [asyncio.Event, Stop], ids=["event", "stop"])
async def test_relay_wakes_a_loop_that_waits_for_its_wake_up_alone(
        make: type[asyncio.Event]) -> None:
    stop, wake, other = make(), asyncio.Event(), asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        async with relay(stop, wake, other):
            while not stop.is_set():
                await wait_event(wake, None)  # no timer: only the relay can end this wait
                wake.clear()
                rounds += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    wake.set()
    await asyncio.sleep(0.01)
    assert rounds == 1 and not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert rounds == 2 and other.is_set()


async def test_a_stop_signal_needs_no_task_and_lets_go_after() -> None:
    stop, wake = Stop(), asyncio.Event()
    before = len(asyncio.all_tasks())
    async with relay(stop, wake):
        await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == before
    stop.set()
    assert not wake.is_set()  # no longer linked
    # a stop already set wakes at once
    async with relay(stop, wake):
        assert wake.is_set()


async def test_a_plain_event_relayed_leaves_no_task_behind() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    before = len(asyncio.all_tasks())
    async with relay(stop, wake):
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before and not wake.is_set()


async def test_background_lets_a_task_go_once_it_ended_well() -> None:
    slot = Background()
    gate = asyncio.Event()
    assert not slot.running() and slot.task is None

    async def work() -> None:
        await gate.wait()

    task = slot.start(work())
    assert slot.running() and slot.task is task
    gate.set()
    await task
    await asyncio.sleep(0)  # its done callback
    assert not slot.running() and slot.task is None
    # a cancelled one is let go too
    gate.clear()
    task = slot.start(work())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert slot.task is None


async def test_background_reports_a_failure_as_it_ends_and_keeps_the_task() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    try:
        slot = Background()

        async def fail() -> None:
            raise OSError("disk full")

        task = slot.start(fail())
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
        assert len(reported) == 1
        assert isinstance(reported[0]["exception"], OSError)
        assert reported[0]["future"] is task
        assert slot.task is task and not slot.running()
        with pytest.raises(OSError, match="disk full"):
            await task
    finally:
        loop.set_exception_handler(None)


async def test_timed_runs_a_chore_at_the_times_it_asks_for_with_no_task_while_it_waits(
        ) -> None:
    runs: list[float] = []
    delays = [0.05, 0.05, math.inf]
    third = asyncio.Event()

    async def step() -> float:
        runs.append(time.monotonic())
        if len(runs) == 3:
            third.set()
        return delays[len(runs) - 1]

    before = len(asyncio.all_tasks())
    start = time.monotonic()
    chore = Timed(step).start(0.02)
    assert len(asyncio.all_tasks()) == before  # a timer, not a task, until the step is due
    await asyncio.wait_for(third.wait(), 10)
    await asyncio.sleep(0.1)
    assert len(runs) == 3  # then no further step: it asked for none
    slack = 0.005  # a loop timer may fire up to its clock's resolution early
    assert runs[0] - start >= 0.02 - slack
    assert runs[1] - runs[0] >= 0.05 - slack and runs[2] - runs[1] >= 0.05 - slack
    assert len(asyncio.all_tasks()) == before and not chore.running()
    await chore.stop()


class FixedBackoff(Backoff):
    """``base`` seconds before every retry (no jitter)."""

    def delay(self, attempt: int) -> float:
        return self.base


async def test_timed_reports_a_failed_step_and_runs_it_again_after_the_retry() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    runs = 0

    async def step() -> float:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise OSError("disk full")
        return math.inf

    try:
        chore = Timed(step, retry=FixedBackoff(base=0.05, cap=0.05)).start()
        await asyncio.sleep(0.02)
        assert runs == 1 and len(reported) == 1
        assert isinstance(reported[0]["exception"], OSError)
        await asyncio.sleep(0.1)
        assert runs == 2 and len(reported) == 1
        await chore.stop()
    finally:
        loop.set_exception_handler(None)


class CountedBackoff(Backoff):
    """No wait, but each retry's number recorded."""

    def __init__(self) -> None:
        super().__init__(base=0.0, cap=0.0)
        object.__setattr__(self, "attempts", [])

    def delay(self, attempt: int) -> float:
        self.attempts.append(attempt)  # type: ignore[attr-defined]
        return 0.0


async def test_timed_backs_off_over_failures_in_a_row_and_starts_over_after_a_success() -> None:
    """The one retry policy: failures in a row are counted (retry 1, 2, 3...) and a step that
    succeeds resets the count; each failure is reported."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    outcomes = iter(["fail", "fail", "fail", "ok", "fail", "ok"])
    done = asyncio.Event()

    async def step() -> float:
        outcome = next(outcomes, "end")
        if outcome == "fail":
            raise RuntimeError("a bug")
        if outcome == "end":
            done.set()
            return math.inf
        return 0.0

    backoff = CountedBackoff()
    try:
        chore = Timed(step, retry=backoff).start()
        await asyncio.wait_for(done.wait(), 5)
        assert backoff.attempts == [1, 2, 3, 1]  # type: ignore[attr-defined]
        assert len(reported) == 4
        await chore.stop()
    finally:
        loop.set_exception_handler(None)


async def test_timed_stop_lets_a_running_step_finish_or_cancels_it_after_the_grace() -> None:
    finished: list[str] = []
    cancelled: list[str] = []

    def make(name: str, seconds: float) -> Callable[[], Coroutine[Any, Any, float]]:
        async def step() -> float:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled.append(name)
                raise
            finished.append(name)
            return 0.0  # would run again at once, but for the stop
        return step

    short, long = Timed(make("short", 0.05)).start(), Timed(make("long", 30)).start()
    await asyncio.sleep(0.01)
    assert short.running() and long.running()
    await short.stop()  # no grace: waits for the step
    assert finished == ["short"]
    await asyncio.wait_for(long.stop(grace=0.05), 5)
    assert cancelled == ["long"] and not long.running()
    await asyncio.sleep(0.1)
    assert finished == ["short"]  # neither ran again after its stop


async def test_timed_halted_starts_no_further_step() -> None:
    runs = 0

    async def step() -> float:
        nonlocal runs
        runs += 1
        return 0.01

    chore = Timed(step).start()
    await asyncio.sleep(0.05)
    chore.halt()
    await asyncio.sleep(0)  # a step already started may end
    seen = runs
    await asyncio.sleep(0.1)
    assert seen >= 2 and runs == seen
    await chore.stop()
