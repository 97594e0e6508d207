"""Threads for blocking work the event loop hands off: a pool that costs less per call than
``loop.run_in_executor`` or ``asyncio.to_thread``.

A capture step, a link into a local destination, a spool listing: each commit of each database
hands a few such calls to threads, and with a thousand databases the hand-off itself is a large
part of the work. ``run_in_executor`` makes a ``concurrent.futures.Future`` (with its own lock and
condition) per call and chains it to an asyncio future with callbacks on both sides; here a call
is one tuple on a queue, and the result goes back with a single ``call_soon_threadsafe``
(measured: about half the CPU per hand-off), or with none when one is already on its way: the
results that reach a loop before it runs the last wake-up are settled together, in order, at
that wake-up (a busy loop is not woken, through its self-pipe, once per call). Threads start
as calls need them, up to the pool's size, and live until :meth:`Workers.shutdown` (or the
process ends: they are daemons). A call goes to the thread that went idle last, so that calls
made one after another keep one thread warm rather than wake each in turn. A call whose awaiting
task was cancelled before a thread took it is not run.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .libc import function

T = TypeVar("T")

FILE_WORKERS = 8
"""Threads of the shared pool for a destination's and the spool's file work (:func:`off_loop`)."""

_PR_SET_NAME = 15
OS_NAME_PREFIX = "repl-"
"""What a thread's ``replicator-`` prefix becomes in the kernel's name of it (15 bytes)."""




def os_thread_name(name: str) -> str:
    """The kernel's name for a thread named ``name``: ``replicator-worker_3`` is
    ``repl-worker_3`` (at most 15 bytes: what ``top -H``, ``ps -L`` and
    ``/proc/PID/task/TID/comm`` show)."""
    if name.startswith("replicator-"):
        name = OS_NAME_PREFIX + name[len("replicator-"):]
    return name.encode(errors="replace")[:15].decode(errors="ignore")


def name_os_thread() -> None:
    """Give the calling thread its Python name in the kernel too (see :func:`os_thread_name`),
    so that a look at the process's threads shows which part uses the CPU; nothing where the
    system has no ``prctl``. Threads call it first thing (a pool's as its initializer)."""
    prctl = function("prctl")
    if prctl is not None:
        prctl(_PR_SET_NAME, os_thread_name(threading.current_thread().name).encode(), 0, 0, 0)


def named(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` as a thread's target that names its thread first (:func:`name_os_thread`)."""

    def target() -> None:
        name_os_thread()
        fn()

    return target


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():
        return  # cancelled meanwhile
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Settler:
    """Hands results from threads to one event loop: one wake-up of the loop for all those that
    arrive before it runs (see the module text)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weakly: the settlers are kept per loop in a WeakKeyDictionary, which a strong
        # reference from the value to its key would keep from ever letting go
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._results: list[tuple[asyncio.Future[Any], bool, Any]] = []

    def post(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """Settle ``fut`` in its loop (from any thread); dropped if the loop is closed."""
        with self._lock:
            self._results.append((fut, ok, value))
            if len(self._results) > 1:
                return  # the wake-up for the first of them has not run yet: it takes this too
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the loop is gone")
            loop.call_soon_threadsafe(self._settle_all)
        except RuntimeError:  # the loop closed (or went) meanwhile
            with self._lock:
                self._results.clear()

    def _settle_all(self) -> None:
        with self._lock:
            results, self._results = self._results, []
        for fut, ok, value in results:
            _settle(fut, ok, value)


_settlers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Settler] = (
    weakref.WeakKeyDictionary())


def _settler(loop: asyncio.AbstractEventLoop) -> _Settler:
    """The loop's settler (call in the loop's thread)."""
    s = _settlers.get(loop)
    if s is None:
        s = _settlers[loop] = _Settler(loop)
    return s


_Item = tuple[_Settler, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class Workers:
    """Up to ``size`` threads named ``name_N`` running blocking calls for event loops (any
    number of loops: each call carries its own), each to the thread that went idle last."""

    def __init__(self, size: int, name: str) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one thread")
        self.size = size
        self.name = name
        self._jobs: collections.deque[_Item | None] = collections.deque()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # the wake-up locks of idle threads (held: each waits to acquire its own), the thread
        # idle last on top
        self._idle: list[threading.Lock] = []
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in one of the pool's threads; its result or its exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        wake = None
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the pool is shut down")
            self._jobs.append((_settler(loop), fut, fn, args))
            if self._idle:
                wake = self._idle.pop()
            elif len(self._threads) < self.size:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self.name}_{len(self._threads)}")
                self._threads.append(t)
                t.start()
        if wake is not None:
            wake.release()
        return await fut

    def _work(self) -> None:
        name_os_thread()
        wake = threading.Lock()
        wake.acquire()
        # the result of the last call, posted once this thread has taken its next call or is
        # on the idle stack: the call its caller makes next then finds this thread there
        done: tuple[_Settler, asyncio.Future[Any], bool, Any] | None = None
        while True:
            with self._lock:
                idle = not self._jobs
                if idle:
                    self._idle.append(wake)
                else:
                    item = self._jobs.popleft()
            if done is not None:
                done[0].post(*done[1:])
                done = None
            if idle:
                wake.acquire()  # released by the call that takes this thread
                continue
            if item is None:
                return
            settler, fut, fn, args = item
            if fut.cancelled():
                ok, value = True, None
            else:
                try:
                    ok, value = True, fn(*args)
                except StopIteration as exc:  # a future cannot hold it (as in a task)
                    ok, value = False, RuntimeError(f"{fn!r} raised StopIteration")
                    value.__cause__ = exc
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                    ok, value = False, exc
            done = (settler, fut, ok, value)
            del item, settler, fut, fn, args, value

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new calls; the threads end once the calls queued before are done (``wait``:
        return only then)."""
        with self._lock:
            if self._closed:
                threads = []
            else:
                self._closed = True
                threads = list(self._threads)
                self._jobs.extend([None] * len(threads))
                idle, self._idle = self._idle, []
        if threads:
            for wake in idle:
                wake.release()
        if wait:
            for t in threads:
                t.join()


_files = Workers(FILE_WORKERS, "replicator-files")


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in the shared pool for file work (in place of ``asyncio.to_thread``, at
    about half its cost a call; no context variables are carried over)."""
    return await _files.run(fn, *args)
