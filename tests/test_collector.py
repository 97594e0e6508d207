"""The full garbage collections of a replicate process (replicator.collector)."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.collector import FullCollections


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    saved = gc.get_threshold()
    try:
        yield saved
    finally:
        gc.set_threshold(*saved)


def full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def young_garbage(n: int) -> None:
    """Make the younger generations collect ``n`` times, freeing cycles and promoting objects
    that live on meanwhile (as many as the process holds, so that CPython's own rule would
    make a full collection)."""
    survivors: list[list[int]] = []
    per_round = len(gc.get_objects()) // n + 1
    for _ in range(n):
        for _ in range(gc.get_threshold()[0] + 10):
            Node()
        survivors.extend([i] for i in range(per_round))


def test_start_turns_cpythons_full_collections_off_and_stop_gives_them_back(
        thresholds: tuple[int, int, int]) -> None:
    gc.set_threshold(700, 10, 10)
    policy = FullCollections()
    policy.start()
    young, middle, oldest = gc.get_threshold()
    assert (young, middle) == (700, 10) and oldest > 10**6
    before = full_collections()
    young_garbage(200)  # 20 middle-generation collections: CPython would have made a full one
    assert full_collections() == before
    policy.stop()
    assert gc.get_threshold() == (700, 10, 10)


def test_a_due_step_collects_an_old_cycle(thresholds: tuple[int, int, int]) -> None:
    clock = Clock()
    policy = FullCollections(every=300.0, clock=clock)
    policy.start()
    try:
        old = Node()
        gc.collect(1)
        gc.collect(1)  # now in the oldest generation
        dead = weakref.ref(old)
        del old
        young_garbage(150)  # at least MIN_YOUNG collections of the middle generation
        clock.now += 299.0
        assert policy.step() == pytest.approx(1.0)
        assert dead() is not None and policy.collections == 0
        clock.now += 1.0
        assert policy.step() == pytest.approx(29.0)  # the next look at the oldest generation
        assert dead() is None and policy.collections == 1
    finally:
        policy.stop()


def test_an_idle_process_makes_no_full_collection(thresholds: tuple[int, int, int]) -> None:
    clock = Clock()
    policy = FullCollections(every=300.0, min_young=10**9, clock=clock)
    policy.start()
    try:
        before = full_collections()
        clock.now += 301.0
        assert policy.step() == pytest.approx(30.0)  # looked, and the next look is later
        assert policy.collections == 0 and full_collections() == before
    finally:
        policy.stop()


def test_an_oldest_generation_grown_twice_is_collected_at_once(
        thresholds: tuple[int, int, int]) -> None:
    clock = Clock()
    policy = FullCollections(every=300.0, clock=clock)
    policy.start()
    try:
        held = len(gc.get_objects(generation=2))
        cycles = [Node() for _ in range(held + 1000)]
        kept = [[i] for i in range(held + 1000)]
        gc.collect(1)
        gc.collect(1)  # all of them in the oldest generation: more than twice what it held
        dead = weakref.ref(cycles[0])
        del cycles  # garbage, which only a full collection frees
        clock.now += 29.0
        assert policy.step() == pytest.approx(1.0) and policy.collections == 0
        clock.now += 1.0
        policy.step()
        assert policy.collections == 1 and dead() is None
        assert len(kept) == held + 1000
    finally:
        policy.stop()


def test_replicate_runs_with_cpythons_full_collections_off(tmp_path: Path) -> None:
    """The real command: while it runs, its process's oldest threshold is out of reach; a stop
    ends it cleanly."""
    db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);")
    probe = (
        "import gc, signal, sys, threading, time\n"
        "from replicator import cli\n"
        "def watch():\n"
        "    time.sleep(2)\n"
        "    print('threshold', gc.get_threshold()[2], flush=True)\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "threading.Thread(target=watch, daemon=True).start()\n"
        "sys.exit(cli.main(['replicate', sys.argv[1], sys.argv[2]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(db), str(tmp_path / "replica")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("threshold ")]
    assert line and int(line[0].split()[1]) > 10**6, (out.stdout, out.stderr)
