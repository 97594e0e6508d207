"""The asyncio helpers of the long-running loops: a stop signal relayed to a loop's wake-up, and
the slot of a background task."""

from __future__ import annotations

import asyncio

import pytest

from replicator.aio import Background, Stop, relay, wait_event


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
