"""The pool for blocking calls: results and exceptions come back to the awaiting task, the pool
never grows past its size, a call cancelled before a thread took it is not run, and a pool shut
down finishes what was queued and refuses the rest."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from replicator.threads import Workers, off_loop


async def test_results_and_exceptions_reach_the_caller() -> None:
    pool = Workers(2, "t-pool")
    try:
        assert await pool.run(sum, [1, 2, 3]) == 6
        assert await pool.run(threading.current_thread) is not threading.current_thread()
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 // 0)

        def stops() -> None:
            raise StopIteration

        with pytest.raises(RuntimeError, match="StopIteration"):
            await pool.run(stops)
        assert await off_loop(len, "four") == 4
    finally:
        pool.shutdown()


async def test_the_pool_runs_calls_side_by_side_up_to_its_size() -> None:
    pool = Workers(3, "t-size")
    lock = threading.Lock()
    running = peak = 0
    names: set[str] = set()

    def job() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        time.sleep(0.05)
        with lock:
            running -= 1

    try:
        await asyncio.gather(*(pool.run(job) for _ in range(12)))
    finally:
        pool.shutdown()
    assert peak == 3
    assert names == {"t-size_0", "t-size_1", "t-size_2"}


async def test_a_call_cancelled_before_it_started_is_not_run() -> None:
    pool = Workers(1, "t-cancel")
    gate = threading.Event()
    ran: list[int] = []
    try:
        first = asyncio.ensure_future(pool.run(gate.wait, 10))
        second = asyncio.ensure_future(pool.run(ran.append, 2))
        await asyncio.sleep(0.05)  # the only thread is inside gate.wait; the second waits
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        gate.set()
        assert await first is True
        await pool.run(ran.append, 3)  # runs after the cancelled one would have
    finally:
        pool.shutdown()
    assert ran == [3]


async def test_shutdown_finishes_the_queue_then_refuses_new_calls() -> None:
    pool = Workers(1, "t-stop")
    done: list[int] = []

    def slow(i: int) -> None:
        time.sleep(0.02)
        done.append(i)

    calls = [asyncio.ensure_future(pool.run(slow, i)) for i in range(3)]
    await asyncio.sleep(0)  # all three queued
    await asyncio.to_thread(pool.shutdown, True)
    await asyncio.gather(*calls)
    assert done == [0, 1, 2]
    with pytest.raises(RuntimeError, match="t-stop: the pool is shut down"):
        await pool.run(slow, 9)


def test_a_result_for_a_closed_loop_is_dropped_quietly() -> None:
    pool = Workers(1, "t-closed")
    gate = threading.Event()

    async def start() -> None:
        asyncio.ensure_future(pool.run(gate.wait, 10))
        await asyncio.sleep(0.02)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start())
    loop.close()  # the call is still running
    gate.set()
    pool.shutdown()  # the thread ends: its hand-back to the closed loop did not kill it
    assert not any(t.name == "t-closed_0" for t in threading.enumerate())


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        Workers(0, "t-none")
