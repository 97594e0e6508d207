"""Every Prometheus metric the replicator exports, declared in one place.

Metrics are created on a registry passed in (tests use a fresh one). Labels: ``db`` (the database
path as configured) and ``replica`` (the replica's name). Each family is declared once, as a field
of :class:`Metrics`: its type, its name (after ``replicator_``), its help and its labels.

The labelled families are this module's own :class:`Counter`, :class:`Gauge` (and
:class:`AgeGauge`, whose series show an age at each scrape) and
:class:`Histogram`, collected by the registry like any collector and exposed exactly as
``prometheus_client``'s are. They exist for the memory of a process with thousands of databases
(about 75 series each): ``prometheus_client`` makes every series a full metric object with its
own lock (about 700 bytes, 4 KiB for a histogram's); here a series is a dictionary entry holding
its number (about 150 bytes, 350 for a histogram's), and each family has one lock.
"""

from __future__ import annotations

import bisect
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, GCCollector, Info, ProcessCollector
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

NAMESPACE = "replicator"
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DB = ("db",)
REPLICA = ("db", "replica")
CHECK = ("db", "check")
TASK = ("db", "task")


class _Family:
    """A labelled metric family: one entry per series in ``_series``, created by ``labels()``
    at its zero value, and registered on a registry as a collector."""

    kind: ClassVar[str]

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry,
                 interned: dict[tuple[str, ...], tuple[str, ...]] | None = None) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], Any] = {}
        self._keys: dict[tuple[object, ...], tuple[str, ...]] = {}
        """Positional label values that are not all strings, and their series' key."""
        self._interned = interned if interned is not None else {}
        """One tuple for the same label values in every family that shares this dictionary
        (a database's ``(db,)`` and ``(db, replica)`` are the keys of some thirty series)."""
        self._lock = threading.Lock()
        registry.register(self)

    def _key(self, values: tuple[object, ...], kw: dict[str, object]) -> tuple[str, ...]:
        """The series' label values, positional or by name (all of them, one way)."""
        if not kw:
            if values in self._series:
                return typing.cast(tuple[str, ...], values)  # strings: one look-up
            known = self._keys.get(values)
            if known is not None and known in self._series:
                return known
        if kw:
            if values or sorted(kw) != sorted(self.labelnames):
                raise ValueError(f"{self.name}: labels must be {self.labelnames}")
            values = tuple(kw[n] for n in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels must be {self.labelnames}")
        key = tuple(str(v) for v in values)
        key = self._interned.setdefault(key, key)
        with self._lock:
            if key not in self._series:
                self._series[key] = self._zero()
            if not kw and key != values:
                self._keys[values] = key
        return key

    def _zero(self) -> Any:
        return 0.0

    def forget(self, db: str) -> int:
        """Drop every series of database ``db`` (families labelled by ``db``); how many."""
        if self.labelnames[:1] != DB:
            return 0
        with self._lock:
            gone = [k for k in self._series if k[0] == db]
            for k in gone:
                del self._series[k]
                self._interned.pop(k, None)
            for v in [v for v, k in self._keys.items() if k[0] == db]:
                del self._keys[v]
        return len(gone)

    def describe(self) -> list[Metric]:
        """The family without samples (what the registry checks names against)."""
        return [Metric(self.name, self.help, self.kind)]

    def collect(self) -> Iterator[Metric]:
        """The family with a sample per series (more for counters and histograms)."""
        m = Metric(self.name, self.help, self.kind)
        with self._lock:
            series = [(k, _copy(v)) for k, v in self._series.items()]
        for key, value in series:
            labels = dict(zip(self.labelnames, key, strict=True))
            m.samples.extend(self._samples(labels, value))
        yield m

    def _samples(self, labels: dict[str, str], value: Any) -> list[Sample]:
        return [Sample(self.name, labels, value)]


class _Series:
    """One series of a family, as ``labels()`` returns it."""

    __slots__ = ("_f", "_k")

    def __init__(self, family: _Family, key: tuple[str, ...]) -> None:
        self._f, self._k = family, key


def _created(name: str, labels: dict[str, str], created: float) -> list[Sample]:
    """The ``_created`` sample, unless ``prometheus_client.disable_created_metrics()`` (or its
    environment variable) turned them off, as for its own metrics."""
    if not getattr(prometheus_metrics, "_use_created", True):
        return []
    return [Sample(name + "_created", labels, created)]


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class Gauge(_Family):
    """A family of gauges."""

    kind = "gauge"

    def labels(self, *values: object, **kw: object) -> _GaugeSeries:
        """One series of the family."""
        return _GaugeSeries(self, self._key(values, kw))


class _GaugeSeries(_Series):
    __slots__ = ()

    def set(self, value: float) -> None:
        """Set the gauge."""
        f = self._f
        with f._lock:
            f._series[self._k] = float(value)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        f = self._f
        with f._lock:
            f._series[self._k] = f._series.get(self._k, 0.0) + amount


class AgeGauge(_Family):
    """A family of gauges that show an age: each series holds the wall-clock time something
    started (None: nothing), and every scrape shows its age then (0 for None), so that it
    grows between the moments the code looks."""

    kind = "gauge"

    def labels(self, *values: object, **kw: object) -> _AgeSeries:
        """One series of the family."""
        return _AgeSeries(self, self._key(values, kw))

    def _zero(self) -> Any:
        return None

    def _samples(self, labels: dict[str, str], value: Any) -> list[Sample]:
        age = 0.0 if value is None else max(0.0, time.time() - value)
        return [Sample(self.name, labels, age)]


class _AgeSeries(_Series):
    __slots__ = ()

    def since(self, started: float | None) -> None:
        """The age counts from ``started`` (a wall-clock time; None: shows 0)."""
        f = self._f
        with f._lock:
            f._series[self._k] = started


class Counter(_Family):
    """A family of counters (``_total`` and ``_created`` samples); a series holds
    [count, created]."""

    kind = "counter"

    def _zero(self) -> Any:
        return [0.0, time.time()]

    def labels(self, *values: object, **kw: object) -> _CounterSeries:
        """One series of the family."""
        return _CounterSeries(self, self._key(values, kw))

    def _samples(self, labels: dict[str, str], value: Any) -> list[Sample]:
        out = [Sample(self.name + "_total", labels, value[0])]
        return out + _created(self.name, labels, value[1])


class _CounterSeries(_Series):
    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (never negative)."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        f = self._f
        with f._lock:
            v = f._series.get(self._k)
            if v is None:  # forgotten (see forget) by a series object kept since
                v = f._series[self._k] = f._zero()
            v[0] += amount


class Histogram(_Family):
    """A family of histograms over ``LAG_BUCKETS``; a series holds the count of each bucket
    (not cumulative), then the sum, then the time it was created."""

    kind = "histogram"
    bounds = (*LAG_BUCKETS, float("inf"))
    _les = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]

    def _zero(self) -> Any:
        return [0] * len(self.bounds) + [0.0, time.time()]

    def labels(self, *values: object, **kw: object) -> _HistogramSeries:
        """One series of the family."""
        return _HistogramSeries(self, self._key(values, kw))

    def _samples(self, labels: dict[str, str], value: Any) -> list[Sample]:
        out, total = [], 0.0
        for le, n in zip(self._les, value, strict=False):
            total += n
            out.append(Sample(self.name + "_bucket", {**labels, "le": le}, total))
        n = len(self.bounds)
        return [*out, Sample(self.name + "_count", labels, total),
                Sample(self.name + "_sum", labels, value[n]),
                *_created(self.name, labels, value[n + 1])]


class _HistogramSeries(_Series):
    __slots__ = ()

    def observe(self, amount: float) -> None:
        """Count one observation."""
        f = self._f
        i = bisect.bisect_left(Histogram.bounds, amount)
        with f._lock:
            v = f._series.get(self._k)
            if v is None:  # forgotten (see forget) by a series object kept since
                v = f._series[self._k] = f._zero()
            v[i] += 1
            v[len(Histogram.bounds)] += amount


@dataclass(frozen=True)
class Family:
    """How a metric family is created: its name after the namespace, help and label names."""

    name: str
    help: str
    labels: tuple[str, ...]


def family(name: str, help: str, labels: tuple[str, ...] = DB) -> Any:
    """Declare a field of :class:`Metrics` as the family ``replicator_<name>``."""
    return field(metadata={"family": Family(name, help, labels)})


@dataclass
class Metrics:
    """The metric families, bound to one registry."""

    registry: CollectorRegistry
    build_info: Info
    # database / capture
    db_size_bytes: Gauge = family("db_size_bytes", "Size of the database file.")
    wal_size_bytes: Gauge = family("wal_size_bytes", "Size of the -wal file.")
    wal_frames: Gauge = family("wal_frames", "Committed frames in the current WAL epoch.")
    generation_changes: Counter = family("generation_changes",
        "New generations started, by reason.", ("db", "reason"))
    catch_ups: Counter = family("catch_ups",
        "Catch-ups (the pages changed while the capture could not observe the WAL, "
        "shipped in the same generation), by reason.", ("db", "reason"))
    checkpoints: Counter = family("checkpoints",
        "Checkpoints run by the replicator, by mode and result.", ("db", "mode", "result"))
    captured_transactions: Counter = family("captured_transactions",
        "Committed transactions captured from the WAL.")
    captured_frames: Counter = family("captured_frames", "WAL frames captured.")
    capture_seconds: Histogram = family("capture_duration_seconds", "Duration of one capture step.")
    snapshots: Counter = family("snapshots", "Snapshots taken.")
    snapshot_last_timestamp: Gauge = family("snapshot_last_timestamp_seconds",
        "Time of the last snapshot.")
    snapshot_duration_seconds: Gauge = family("snapshot_duration_seconds",
        "Duration of the last snapshot.")
    snapshot_size_bytes: Gauge = family("snapshot_size_bytes",
        "Compressed size of the last snapshot.")
    # replicas
    replica_lag_seconds: AgeGauge = family("replica_lag_seconds",
        "Age of the oldest committed transaction not yet durable at the replica (0 when "
        "caught up), at the time of the scrape.", REPLICA)
    replica_last_sync_timestamp: Gauge = family("replica_last_sync_timestamp_seconds",
        "Time of the last successful sync.", REPLICA)
    replica_shipped_transactions: Counter = family("replica_shipped_transactions",
        "Transactions made durable at the replica.", REPLICA)
    replica_shipped_frames: Counter = family("replica_shipped_frames",
        "WAL frames made durable at the replica.", REPLICA)
    replica_shipped_bytes: Counter = family("replica_shipped_bytes",
        "Object bytes written to the replica.", REPLICA)
    replica_commit_to_durable_seconds: Histogram = family("replica_commit_to_durable_seconds",
        "Time from observing a commit to it being durable at the replica.", REPLICA)
    replica_up: Gauge = family("replica_up",
        "1 if the last operation on the replica succeeded.", REPLICA)
    replica_objects: Gauge = family("replica_objects",
        "Objects the replica holds (after its last retention pass).", REPLICA)
    replica_bytes: Gauge = family("replica_bytes",
        "Bytes the replica holds (after its last retention pass).", REPLICA)
    replica_oldest_restorable: Gauge = family("replica_oldest_restorable_timestamp_seconds",
        "Observation time of the oldest snapshot the replica keeps.", REPLICA)
    compactions: Counter = family("compactions",
        "Merged objects written by compaction, by level (0: shortest).", ("db", "replica", "level"))
    errors: Counter = family("errors", "Errors by operation.", ("db", "replica", "operation"))
    # health
    integrity_check_ok: Gauge = family("integrity_check_ok",
        "1 if the last integrity check passed, else 0.")
    integrity_check_timestamp: Gauge = family("integrity_check_timestamp_seconds",
        "Time of the last integrity check.")
    health_check_ok: Gauge = family("health_check_ok",
        "1 if the health check passed, else 0.", CHECK)
    health_check_value: Gauge = family("health_check_value",
        "The value the health check measured.", CHECK)
    health_check_timestamp: Gauge = family("health_check_timestamp_seconds",
        "Time of the last health check run.", CHECK)
    # restore drills
    verify_ok: Gauge = family("verify_ok",
        "1 if the last restore drill proved the replica equal to the database, else 0.", REPLICA)
    verify_last_success: Gauge = family("verify_last_success_timestamp_seconds",
        "Time of the last successful drill of the replica.", REPLICA)
    verify_duration: Gauge = family("verify_duration_seconds",
        "Duration of the last restore drill of the replica.", REPLICA)
    verify_interval: Gauge = family("verify_interval_seconds",
        "The configured interval of scheduled drills.")
    # databases of dir: entries
    databases: Gauge = family("databases",
        "Databases of dir: entries by state (queued, opening, replicating, skipped, "
        "failed).", ("state",))
    # maintenance
    maintenance_runs: Counter = family("maintenance_runs",
        "Maintenance task runs, by task and result (ok, skipped, "
        "failed).", ("db", "task", "result"))
    maintenance_last_run: Gauge = family("maintenance_last_run_timestamp_seconds",
        "Time of a maintenance task's last run.", TASK)
    maintenance_duration: Gauge = family("maintenance_duration_seconds",
        "Duration of a maintenance task's last run.", TASK)

    def forget(self, db: str) -> int:
        """Drop every series of database ``db`` (one no longer replicated: a file of a
        ``dir:`` entry that was removed), so that neither memory nor the exposition keeps
        the databases a directory ever held; how many series went."""
        return sum(v.forget(db) for v in vars(self).values() if isinstance(v, _Family))


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric family on ``registry`` (a new one if None)."""
    r = registry if registry is not None else CollectorRegistry()
    # the process's own: CPU, resident memory, descriptors (process_*) and the garbage
    # collector's collections by generation (python_gc_*: see replicator.collector)
    ProcessCollector(registry=r)
    GCCollector(registry=r)
    build_info = Info(f"{NAMESPACE}_build", "Build information.", registry=r)
    kinds = typing.get_type_hints(Metrics)
    families: dict[str, Any] = {}
    interned: dict[tuple[str, ...], tuple[str, ...]] = {}
    for f in fields(Metrics):
        spec: Family | None = f.metadata.get("family")
        if spec is None:
            continue
        families[f.name] = kinds[f.name](f"{NAMESPACE}_{spec.name}", spec.help, spec.labels, r,
                                         interned)
    return Metrics(registry=r, build_info=build_info, **families)
