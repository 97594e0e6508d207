"""Retention: which objects of a replica are still needed, and deleting the rest.

A :class:`RetentionPolicy` combines two things:

* the **window** (``retention: 7d``): every commit of the last 7 days stays restorable exactly.
  For the cutoff ``now - window``, each generation keeps its newest snapshot observed at or
  before the cutoff and everything after it; a generation that ended before the cutoff is not
  needed by the window.
* **calendar points** (``keep-daily``, ``keep-weekly``, ``keep-monthly``, ``keep-yearly``), with
  restic's semantics: walking the snapshots newest first, each rule keeps the newest snapshot of
  each period (UTC day, ISO week, month, year) that has one, for its N most recent such periods.
  The rules are OR-ed, and with the window too. A calendar point keeps only what restoring it
  needs: its snapshot.

Whatever the policy, the newest restorable state (the newest snapshot of the newest generation
that has one, and the segments after it) and every generation newer than it are kept.

**Restores in flight.** An object is deleted only when it is unneeded now *and* was already
unneeded ``grace`` seconds ago (planned over the objects that existed then). Needs only move
forward in time, so no restore planned within the last ``grace`` seconds reads a deleted object;
a restore that runs longer than ``grace`` may find an object gone and stops naming it.

:func:`plan_retention` is a pure function of the object list, the policy and the time; the
planner of one generation's needs (:func:`needed_for_point`) is the place to extend when an
object depends on others.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .pos import ObjectInfo
from .storage.base import StorageClient

log = logging.getLogger(__name__)

DEFAULT_DELETE_GRACE = 3600.0
"""Seconds an object stays after it became unneeded (restores that started before can read it)."""

PERIODS = ("daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class RetentionPolicy:
    """What one destination keeps. ``window`` None and every ``keep_*`` 0: keep everything."""

    window: float | None = None
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    grace: float = DEFAULT_DELETE_GRACE

    @property
    def active(self) -> bool:
        """Whether this policy can delete anything."""
        return self.window is not None or any(self.counts().values())

    def counts(self) -> dict[str, int]:
        """``{"daily": n, ...}``."""
        return {"daily": self.keep_daily, "weekly": self.keep_weekly,
                "monthly": self.keep_monthly, "yearly": self.keep_yearly}


@dataclass
class RetentionPlan:
    """The outcome of planning: what stays, what goes, and which points stay restorable."""

    keep: list[ObjectInfo] = field(default_factory=list)
    delete: list[ObjectInfo] = field(default_factory=list)
    drop_generations: list[str] = field(default_factory=list)
    """Generations every object of which is deleted (their folder goes as well)."""
    points: list[ObjectInfo] = field(default_factory=list)
    """The snapshots kept as calendar points (and the window bases), oldest first."""
    oldest_ms: int = 0
    """Observation time of the oldest kept snapshot (0: none)."""


def _period_key(period: str, ms: int) -> tuple[int, ...]:
    d = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    if period == "daily":
        return (d.year, d.month, d.day)
    if period == "weekly":
        iso = d.isocalendar()
        return (iso.year, iso.week)
    if period == "monthly":
        return (d.year, d.month)
    return (d.year,)


def calendar_points(snapshots: Sequence[ObjectInfo], policy: RetentionPolicy) -> set[ObjectInfo]:
    """The snapshots the ``keep-*`` rules keep (restic's semantics)."""
    newest_first = sorted(snapshots, key=lambda s: (s.last_ms, s.generation, s.end_txid),
                          reverse=True)
    kept: set[ObjectInfo] = set()
    for period, count in policy.counts().items():
        last: tuple[int, ...] | None = None
        for s in newest_first:
            if count <= 0:
                break
            key = _period_key(period, s.last_ms)
            if key != last:
                kept.add(s)
                last = key
                count -= 1
    return kept


def needed_for_point(snapshot: ObjectInfo, generation: Sequence[ObjectInfo]) -> list[ObjectInfo]:
    """What restoring exactly ``snapshot``'s state needs, among its generation's objects."""
    return [snapshot]


def _needed_from(base: ObjectInfo, generation: Sequence[ObjectInfo]) -> list[ObjectInfo]:
    """``base`` and everything after it: what restoring any point from ``base`` on needs."""
    return [o for o in generation if o.end_txid > base.end_txid or o == base
            or (o.kind == "snapshot" and o.end_txid == base.end_txid and o.last_ms >= base.last_ms)]


def _by_generation(objects: Iterable[ObjectInfo]) -> dict[str, list[ObjectInfo]]:
    gens: dict[str, list[ObjectInfo]] = {}
    for o in sorted(objects):
        gens.setdefault(o.generation, []).append(o)
    return dict(sorted(gens.items()))


def _needed(objects: Sequence[ObjectInfo], policy: RetentionPolicy, now_ms: int,
            points: set[ObjectInfo]) -> set[ObjectInfo]:
    """Every object the policy needs at ``now_ms``; adds the kept snapshots to ``points``."""
    gens = _by_generation(objects)
    with_snaps = [g for g, objs in gens.items() if any(o.kind == "snapshot" for o in objs)]
    if not policy.active or not with_snaps:
        return set(objects)
    newest = with_snaps[-1]
    need: set[ObjectInfo] = set()
    for g, objs in gens.items():
        if g > newest:
            need.update(objs)  # not restorable yet: its snapshot may still be coming
    snaps = [o for o in gens[newest] if o.kind == "snapshot"]
    bases = {snaps[-1]}  # the newest restorable state
    if policy.window is not None:
        cutoff = now_ms - int(policy.window * 1000)
        for g in with_snaps:
            gsnaps = [o for o in gens[g] if o.kind == "snapshot"]
            if max(o.last_ms for o in gens[g]) < cutoff and g != newest:
                continue  # ended before the window
            before = [s for s in gsnaps if s.last_ms <= cutoff]
            bases.add(before[-1] if before else gsnaps[0])
    for b in bases:
        need.update(_needed_from(b, gens[b.generation]))
        points.add(b)
    all_snaps = [o for objs in gens.values() for o in objs if o.kind == "snapshot"]
    for s in calendar_points(all_snaps, policy):
        need.update(needed_for_point(s, gens[s.generation]))
        points.add(s)
    return need


def plan_objects(
    objects: Sequence[ObjectInfo], policy: RetentionPolicy, now: float
) -> RetentionPlan:
    """Plan retention over a replica's objects (every generation) at ``now`` (unix seconds)."""
    now_ms = int(now * 1000)
    points: set[ObjectInfo] = set()
    need = _needed(objects, policy, now_ms, points)
    # what was already unneeded ``grace`` ago, among the objects that existed then
    then_ms = now_ms - int(policy.grace * 1000)
    earlier = [o for o in objects if o.last_ms <= then_ms]
    need_then = _needed(earlier, policy, then_ms, set())
    unneeded_then = set(earlier) - need_then
    plan = RetentionPlan()
    for o in sorted(objects):
        (plan.delete if o not in need and o in unneeded_then else plan.keep).append(o)
    kept_gens = {o.generation for o in plan.keep}
    plan.drop_generations = sorted({o.generation for o in plan.delete} - kept_gens)
    plan.points = sorted((p for p in points if p in set(plan.keep)), key=lambda s: s.last_ms)
    kept_snaps = [o.last_ms for o in plan.keep if o.kind == "snapshot"]
    plan.oldest_ms = min(kept_snaps, default=0)
    return plan


async def list_objects(client: StorageClient) -> list[ObjectInfo]:
    """Every object of every generation of a replica."""
    out: list[ObjectInfo] = []
    for gen in await client.generations():
        out.extend(await client.objects(gen))
    return out


async def plan_retention(
    client: StorageClient, policy: RetentionPolicy | float, now: float | None = None
) -> RetentionPlan:
    """Plan retention for a destination (a bare number is a window in seconds)."""
    if not isinstance(policy, RetentionPolicy):
        policy = RetentionPolicy(window=policy, grace=0.0)
    return plan_objects(await list_objects(client), policy,
                        now if now is not None else time.time())


async def apply_plan(
    client: StorageClient, plan: RetentionPlan,
    on_delete: Callable[[ObjectInfo], None] | None = None,
) -> int:
    """Delete what ``plan`` says; returns the number of objects deleted."""
    for o in plan.delete:
        if on_delete is not None:
            on_delete(o)
    if plan.delete:
        await client.delete_objects(plan.delete)
    for gen in plan.drop_generations:
        await client.delete_generation(gen)
    if plan.delete:
        log.info("%s: retention removed %d objects (%d whole generations)", client.url,
                 len(plan.delete), len(plan.drop_generations))
    return len(plan.delete)


async def apply_retention(
    client: StorageClient, policy: RetentionPolicy | float, now: float | None = None
) -> int:
    """Delete what ``policy`` no longer needs; return the number of objects deleted."""
    return await apply_plan(client, await plan_retention(client, policy, now))
