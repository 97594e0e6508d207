"""Which CPUs ``replicate`` runs on: the ``cpus`` setting.

Most of the replicator's work holds the interpreter lock, so its threads take turns on one CPU
whatever the number of cores; spread over several, each turn hands the lock to a thread woken on
another CPU, which costs more than the work it hands over when databases commit one small
transaction at a time (about 130 µs of CPU per hand-off across CPUs on the 2-core virtual
machines of ``docs/benchmarks.md``, 40 µs on one CPU). ``cpus`` confines every thread of the
process to the CPUs it names:

- ``all``: wherever the operating system puts them (nothing is set);
- ``one``: the last CPU of those the process may use (the first is where interrupts and other
  processes' threads tend to land);
- a list: ``3``, ``0,2``, ``2-3`` or a YAML list of numbers, each one the process may use.

Set before any thread starts: threads inherit their creator's CPUs. So would a child process:
the application that ``exec`` starts is started :func:`unconfined`, on every CPU the replicator
could use before.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from .errors import ConfigError

ALL = "all"
ONE = "one"
_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")
_before: set[int] | None = None
"""The CPUs the process could use before :func:`apply` confined it (None: not confined)."""


def parse_cpus(value: object, where: str = "cpus") -> str | tuple[int, ...]:
    """``all``, ``one`` or the CPU numbers named, sorted (checked against the machine later:
    :func:`resolve`)."""
    if isinstance(value, str) and value.strip().lower() in (ALL, ONE):
        return value.strip().lower()
    hint = f"{where}: expected all, one or CPU numbers like 3, 0,2 or 2-3, got {value!r}"
    cpus: set[int] = set()
    if isinstance(value, bool):
        raise ConfigError(hint)
    if isinstance(value, int):
        parts: list[object] = [value]
    elif isinstance(value, list):
        parts = list(value)
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    else:
        raise ConfigError(hint)
    for part in parts:
        if isinstance(part, bool):
            raise ConfigError(hint)
        if isinstance(part, int):
            if part < 0:
                raise ConfigError(hint)
            cpus.add(part)
            continue
        m = _RANGE_RE.fullmatch(part) if isinstance(part, str) else None
        if m is None:
            raise ConfigError(hint)
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo:
            raise ConfigError(f"{where}: range {part} ends before it starts")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ConfigError(hint)
    return tuple(sorted(cpus))


def allowed() -> set[int] | None:
    """The CPUs this process may run on (None: the platform does not say)."""
    get = getattr(os, "sched_getaffinity", None)
    return None if get is None else set(get(0))


def resolve(setting: str | tuple[int, ...], where: str = "cpus") -> set[int] | None:
    """The CPUs ``setting`` means on this machine (None: leave the process as it is)."""
    if setting == ALL:
        return None
    mine = allowed()
    if mine is None:
        raise ConfigError(f"{where}: this platform cannot confine a process to CPUs")
    if isinstance(setting, str):  # one
        return {max(mine)}
    wanted = set(setting)
    outside = sorted(wanted - mine)
    if outside:
        may = _ranges(sorted(mine))
        raise ConfigError(f"{where}: CPU {_ranges(outside)} is not one this process may run on "
                          f"(it may use {may})")
    return wanted


def apply(setting: str | tuple[int, ...], where: str = "cpus") -> set[int] | None:
    """Confine the calling thread, and every thread it starts from now on, to ``setting``'s CPUs;
    return them (None: ``all``, nothing set)."""
    global _before
    cpus = resolve(setting, where)
    if cpus is not None:
        before = allowed()
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # a sandbox's system-call filter, say
            raise ConfigError(f"{where}: cannot confine the process to {describe(cpus)}: "
                              f"{exc.strerror}") from None
        if _before is None:
            _before = before
    return cpus


@contextlib.contextmanager
def unconfined() -> Iterator[None]:
    """Within: the calling thread runs on the CPUs the process had before :func:`apply` (a child
    process started here inherits them); confined again after."""
    if _before is None:
        yield
        return
    now = allowed()
    os.sched_setaffinity(0, _before)
    try:
        yield
    finally:
        if now is not None:
            os.sched_setaffinity(0, now)


def _ranges(cpus: list[int]) -> str:
    """``0-3,6`` for [0, 1, 2, 3, 6]."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive CPUs
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe(cpus: set[int] | None) -> str:
    """For the log: ``CPU 1``, ``CPUs 0-1``."""
    if cpus is None:
        return "any CPU"
    return f"CPU{'s' if len(cpus) > 1 else ''} {_ranges(sorted(cpus))}"
