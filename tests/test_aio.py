"""The asyncio helpers of the long-running loops: a stop signal relayed to a loop's wake-up."""

from __future__ import annotations

import asyncio

import pytest

from replicator.aio import Stop, relay, wait_event


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
