"""The pool for blocking calls: results and exceptions come back to the awaiting task, the pool
never grows past its size, a call goes to the thread idle last, results that finish while the
loop is busy come back with one wake-up of it, a call cancelled before a thread took it is not
run, and a pool shut down finishes what was queued and refuses the rest."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest

from replicator.runtime import Runtime
from replicator.sightings import Sighter, Sightings
from replicator.threads import Workers, off_loop, os_thread_name


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


async def test_calls_one_after_another_go_to_the_thread_idle_last() -> None:
    """Once several threads are idle, calls made one after another all go to one of them (the
    one that went idle last), not to each in turn; a shutdown wakes the idle ones to end."""
    pool = Workers(4, "t-lifo")
    barrier = threading.Barrier(4)
    names: list[str] = []

    def together() -> None:
        barrier.wait(5)

    def name() -> None:
        names.append(threading.current_thread().name)

    await asyncio.gather(*(pool.run(together) for _ in range(4)))  # four threads, now idle
    for _ in range(20):
        await pool.run(name)
    assert len(names) == 20 and len(set(names)) == 1
    threads = list(pool._threads)
    assert len(threads) == 4
    await asyncio.wait_for(asyncio.to_thread(pool.shutdown, True), 5)
    assert not any(t.is_alive() for t in threads)


async def test_results_that_finish_while_the_loop_is_busy_come_back_with_one_wake_up() -> None:
    pool = Workers(2, "t-wake")
    loop = asyncio.get_running_loop()
    wakeups = []
    orig = loop.call_soon_threadsafe

    def counting(*args: Any, **kw: Any) -> Any:
        wakeups.append(args[0])
        return orig(*args, **kw)

    gate, finished = threading.Event(), threading.Event()
    count = iter(range(1, 21))

    def call(i: int) -> int:
        gate.wait(10)
        if next(count, 0) == 20:
            finished.set()
        if i == 7:
            raise KeyError(i)
        return i * i

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        calls = [asyncio.ensure_future(pool.run(call, i)) for i in range(20)]
        await asyncio.sleep(0.05)  # every call is queued; two wait at the gate
        gate.set()
        # the loop is busy (blocked) while all twenty finish and hand their results back
        finished.wait(10)
        time.sleep(0.2)  # noqa: ASYNC251 - the point: the loop does not run meanwhile
        got = await asyncio.gather(*calls, return_exceptions=True)
        assert got[:7] + got[8:] == [i * i for i in range(20) if i != 7]
        assert isinstance(got[7], KeyError)
        assert len(wakeups) == 1
        # and once the loop is idle again, a result wakes it at once
        assert await asyncio.wait_for(pool.run(call, 3), 5) == 9
        assert len(wakeups) == 2
    finally:
        loop.call_soon_threadsafe = orig  # type: ignore[method-assign]
        pool.shutdown()


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


def test_a_loop_the_pool_served_is_not_kept_alive_by_it() -> None:
    pool = Workers(1, "t-gone")
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(pool.run(sum, [2, 3])) == 5
    finally:
        loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
    pool.shutdown()


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        Workers(0, "t-none")


def _kernel_name() -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip()


async def test_the_kernel_knows_each_thread_by_its_name() -> None:
    # what top -H and ps -L show: which part of the process uses the CPU
    pool = Workers(2, "replicator-worker")
    try:
        assert await pool.run(_kernel_name) == "repl-worker_0"
    finally:
        pool.shutdown()
    runtime = Runtime(workers=1)
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(runtime.compaction, _kernel_name) == "repl-compact_0"
        assert await loop.run_in_executor(runtime.io, _kernel_name) == "repl-io_0"
        assert await runtime.call(_kernel_name) == "repl-worker_0"
    finally:
        await runtime.aclose()
    assert (await off_loop(_kernel_name)).startswith("repl-files_")
    assert not _kernel_name().startswith("repl-")  # the loop's own thread keeps its name


def test_the_sighter_thread_is_named_too(tmp_path: Path) -> None:
    sighter = Sighter(interval=0.001)
    with sighter.watching(Sightings(str(tmp_path / "none.db-shm"))):
        deadline = time.monotonic() + 10
        while (t := sighter._thread) is None or t.native_id is None:
            assert time.monotonic() < deadline, "the sighter thread did not start"
            time.sleep(0.001)
        comm = Path(f"/proc/self/task/{t.native_id}/comm")
        while (name := comm.read_text().strip()) != "repl-sighter":
            assert time.monotonic() < deadline, name
            time.sleep(0.001)


def test_a_kernel_name_fits_its_fifteen_bytes() -> None:
    assert os_thread_name("replicator-sighter") == "repl-sighter"
    assert os_thread_name("replicator-compact_0") == "repl-compact_0"
    assert len(os_thread_name("replicator-a-very-long-thread-name").encode()) == 15
    assert os_thread_name("Thread-3") == "Thread-3"
