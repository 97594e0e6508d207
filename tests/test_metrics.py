"""The metric families: exposed exactly as ``prometheus_client``'s own would be."""

from __future__ import annotations

import re
import time
from dataclasses import fields
from typing import Any

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from replicator.metrics import LAG_BUCKETS, AgeGauge, create_metrics


def _exercise(families: dict[str, tuple[Any, tuple[str, ...]]],
              ages: frozenset[str] = frozenset()) -> None:
    """The same updates, whichever implementation ``families`` holds; the families named in
    ``ages`` (ours show an age, a moving value) only get their series, at zero."""
    for i, (name, (fam, labelnames)) in enumerate(families.items()):
        vals = [f"v{j}" for j in range(len(labelnames))]
        one = fam.labels(*vals)
        other = fam.labels(**{n: "k" + v for n, v in zip(labelnames, vals, strict=True)})
        fam.labels(*["untouched" + v for v in vals])
        if name in ages:
            continue
        if hasattr(one, "observe"):
            for x in (0.0005, 0.001, 0.003, 0.3, 7, 100, 0.1):
                one.observe(x)
        elif hasattr(one, "set"):
            one.set(i * 1.5)
            other.set(3)
            other.inc(2)
        else:
            one.inc()
            one.inc(2.5)
            other.inc(0)


PROCESS_FAMILIES = ("process_", "python_gc_")


def _text(registry: CollectorRegistry) -> str:
    """The exposition of the ``replicator_*`` families (the process's own left out)."""
    out = generate_latest(registry).decode()
    out = "".join(line for line in out.splitlines(keepends=True)
                  if not re.sub(r"^# (HELP|TYPE) ", "", line).startswith(PROCESS_FAMILIES))
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", out)


def test_the_process_and_its_garbage_collections_are_exposed() -> None:
    out = generate_latest(create_metrics().registry).decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds"):
        assert re.search(rf"^{name} \d", out, re.M), name
    for gen in range(3):
        assert re.search(rf'^python_gc_collections_total{{generation="{gen}"}} \d', out, re.M)


def test_families_expose_like_prometheus_client() -> None:
    ours = create_metrics()
    ref_registry = CollectorRegistry()
    prometheus_client.Info("replicator_build", "Build information.", registry=ref_registry)
    ref: dict[str, tuple[Any, tuple[str, ...]]] = {}
    kinds = {"counter": prometheus_client.Counter, "gauge": prometheus_client.Gauge,
             "histogram": prometheus_client.Histogram}
    mine: dict[str, tuple[Any, tuple[str, ...]]] = {}
    for f in fields(ours):
        spec = f.metadata.get("family")
        if spec is None:
            continue
        fam = getattr(ours, f.name)
        extra = {"buckets": LAG_BUCKETS} if fam.kind == "histogram" else {}
        ref[f.name] = (kinds[fam.kind](fam.name, fam.help, spec.labels, registry=ref_registry,
                                       **extra), spec.labels)
        mine[f.name] = (fam, spec.labels)
    ages = frozenset(n for n, (fam, _) in mine.items() if isinstance(fam, AgeGauge))
    assert ages == {"replica_lag_seconds"}
    _exercise(mine, ages)
    _exercise(ref, ages)
    assert _text(ours.registry) == _text(ref_registry)
    assert ours.registry.get_sample_value(
        "replicator_snapshots_total", {"db": "v0"}) == 3.5


def test_an_age_gauge_shows_the_age_at_each_scrape() -> None:
    m = create_metrics()
    lag = m.replica_lag_seconds.labels("a", "s3")

    def shown() -> float | None:
        return m.registry.get_sample_value("replicator_replica_lag_seconds",
                                           {"db": "a", "replica": "s3"})

    assert shown() == 0.0
    lag.since(time.time() - 5)
    first = shown()
    assert first is not None and first >= 5
    time.sleep(0.05)
    later = shown()
    assert later is not None and later > first
    lag.since(time.time() + 60)  # a clock step back: never negative
    assert shown() == 0.0
    lag.since(None)
    assert shown() == 0.0
    assert m.forget("a") > 0 and shown() is None


def test_bad_labels_and_negative_increments_are_refused() -> None:
    m = create_metrics()
    with pytest.raises(ValueError):
        m.snapshots.labels()
    with pytest.raises(ValueError):
        m.snapshots.labels("a", "b")
    with pytest.raises(ValueError):
        m.errors.labels(db="a", replica="b")
    with pytest.raises(ValueError):
        m.snapshots.labels("a").inc(-1)
    assert m.registry.get_sample_value("replicator_snapshots_total", {"db": "a"}) == 0


def test_created_samples_follow_prometheus_client_switch() -> None:
    m = create_metrics()
    m.snapshots.labels("a").inc()
    m.capture_seconds.labels("a").observe(0.5)
    prometheus_client.disable_created_metrics()
    try:
        assert "_created" not in generate_latest(m.registry).decode()
    finally:
        prometheus_client.enable_created_metrics()
    assert "replicator_snapshots_created" in generate_latest(m.registry).decode()


def test_families_share_one_key_for_the_same_labels_until_forgotten() -> None:
    m = create_metrics()
    m.captured_frames.labels("a").inc()
    m.snapshots.labels(db="a").inc()  # by name: the same key
    m.replica_shipped_frames.labels("a", "s3").inc(5)
    m.replica_shipped_transactions.labels("a", "s3").inc(2)
    m.captured_frames.labels(7).inc()  # not a string: its text
    (frames_a, frames_7), (snaps_a,) = m.captured_frames._series, m.snapshots._series
    assert frames_a is snaps_a == ("a",) and frames_7 == ("7",)
    (shipped,), (txs,) = m.replica_shipped_frames._series, m.replica_shipped_transactions._series
    assert shipped is txs == ("a", "s3")
    m.captured_frames.labels(7).inc()
    assert m.registry.get_sample_value("replicator_captured_frames_total", {"db": "7"}) == 2
    assert m.registry.get_sample_value(
        "replicator_replica_shipped_frames_total", {"db": "a", "replica": "s3"}) == 5
    assert m.forget("a") > 0
    assert sorted(m.captured_frames._interned) == [("7",)]  # nothing kept for "a"
    assert m.registry.get_sample_value(
        "replicator_replica_shipped_transactions_total", {"db": "a", "replica": "s3"}) is None


def test_a_series_asked_for_again_after_forget_starts_from_zero() -> None:
    m = create_metrics()

    def shown() -> float | None:
        return m.registry.get_sample_value("replicator_captured_frames_total", {"db": "a"})

    m.captured_frames.labels("a").inc(3)
    m.captured_frames.labels("a").inc(4)  # the second look-up is the cached one
    assert shown() == 7
    assert m.forget("a") > 0 and shown() is None
    assert m.captured_frames.labels("a") is not None and shown() == 0
    m.captured_frames.labels("a").inc(2)
    assert shown() == 2
    m.captured_frames.labels(db="a").inc(1)  # by name: the same series
    assert shown() == 3
