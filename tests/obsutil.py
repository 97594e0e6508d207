"""Helpers for the observability tests: plain HTTP GETs, scraping ``/metrics`` and processes
that are always reaped."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families
from util import Replicate

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

HEALTH_CHECKS = """\
      freshness:
        - {name: fresh, sql: "SELECT MAX(t_ns) / 1e9 FROM log", max-age: 1h, interval: 1s}
      size:
        - {name: size, max-bytes: 1GB, interval: 1s}
      sql:
        - {name: rows, sql: "SELECT COUNT(*) FROM log", fail-if: "> 1000000", interval: 1s}"""
"""A freshness, a size and an SQL check of the writer's ``log`` table, every second: the lines
under ``health:`` of a database in a config file."""


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    """``(status, body)`` of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read().decode()
        finally:
            exc.close()
    except OSError:
        return 0, ""


def scrape(port: int) -> Samples:
    """Every sample of the replicator's ``/metrics`` on ``port``: (name, labels) -> value."""
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, f"/metrics answered {status}"
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value (None if absent)."""
    return samples.get((name, frozenset(labels.items())))


def values(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in samples.items() if n == name and want <= lab}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of :func:`values`."""
    return sum(values(samples, name, **labels).values())


class Reaper:
    """Collects the processes a test starts and ends whatever is still running at teardown."""

    def __init__(self) -> None:
        self.replicators: list[Replicate] = []
        self.procs: list[subprocess.Popen[str]] = []

    def replicator(self, rep: Replicate) -> Replicate:
        """Track ``rep``; returns it."""
        self.replicators.append(rep)
        return rep

    def proc(self, proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
        """Track ``proc``; returns it."""
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill and reap everything still running."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.communicate(timeout=30)
        for r in self.replicators:
            r.kill()


@contextlib.contextmanager
def reaper() -> Iterator[Reaper]:
    """A :class:`Reaper` closed on exit."""
    r = Reaper()
    try:
        yield r
    finally:
        r.close()
