"""Every Prometheus metric the replicator exports, declared in one place.

Metrics are created on a registry passed in (tests use a fresh one). Labels: ``db`` (the database
path as configured) and ``replica`` (the replica's name).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

NAMESPACE = "replicator"
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass
class Metrics:
    """The metric families, bound to one registry."""

    registry: CollectorRegistry
    build_info: Info
    # database / capture
    db_size_bytes: Gauge
    wal_size_bytes: Gauge
    wal_frames: Gauge
    generation_changes: Counter
    catch_ups: Counter
    checkpoints: Counter
    captured_transactions: Counter
    captured_frames: Counter
    capture_seconds: Histogram
    snapshots: Counter
    snapshot_last_timestamp: Gauge
    snapshot_duration_seconds: Gauge
    snapshot_size_bytes: Gauge
    # replicas
    replica_lag_seconds: Gauge
    replica_last_sync_timestamp: Gauge
    replica_shipped_transactions: Counter
    replica_shipped_frames: Counter
    replica_shipped_bytes: Counter
    replica_commit_to_durable_seconds: Histogram
    replica_up: Gauge
    replica_objects: Gauge
    replica_bytes: Gauge
    replica_oldest_restorable: Gauge
    compactions: Counter
    errors: Counter
    # health
    integrity_check_ok: Gauge
    integrity_check_timestamp: Gauge
    health_check_ok: Gauge
    health_check_value: Gauge
    health_check_timestamp: Gauge
    # restore drills
    verify_ok: Gauge
    verify_last_success: Gauge
    verify_duration: Gauge
    verify_interval: Gauge
    # databases of dir: entries
    databases: Gauge
    # maintenance
    maintenance_runs: Counter
    maintenance_last_run: Gauge
    maintenance_duration: Gauge


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric family on ``registry`` (a new one if None)."""
    r = registry if registry is not None else CollectorRegistry()
    n = NAMESPACE
    db = ["db"]
    rep = ["db", "replica"]
    return Metrics(
        registry=r,
        build_info=Info(f"{n}_build", "Build information.", registry=r),
        db_size_bytes=Gauge(f"{n}_db_size_bytes", "Size of the database file.", db, registry=r),
        wal_size_bytes=Gauge(f"{n}_wal_size_bytes", "Size of the -wal file.", db, registry=r),
        wal_frames=Gauge(
            f"{n}_wal_frames", "Committed frames in the current WAL epoch.", db, registry=r
        ),
        generation_changes=Counter(
            f"{n}_generation_changes",
            "New generations started, by reason.",
            ["db", "reason"],
            registry=r,
        ),
        catch_ups=Counter(
            f"{n}_catch_ups",
            "Catch-ups (the pages changed while the capture could not observe the WAL, shipped "
            "in the same generation), by reason.",
            ["db", "reason"],
            registry=r,
        ),
        checkpoints=Counter(
            f"{n}_checkpoints", "Checkpoints run by the replicator, by mode and result.",
            ["db", "mode", "result"], registry=r,
        ),
        captured_transactions=Counter(
            f"{n}_captured_transactions", "Committed transactions captured from the WAL.", db,
            registry=r,
        ),
        captured_frames=Counter(
            f"{n}_captured_frames", "WAL frames captured.", db, registry=r
        ),
        capture_seconds=Histogram(
            f"{n}_capture_duration_seconds", "Duration of one capture step.", db,
            buckets=LAG_BUCKETS, registry=r,
        ),
        snapshots=Counter(f"{n}_snapshots", "Snapshots taken.", db, registry=r),
        snapshot_last_timestamp=Gauge(
            f"{n}_snapshot_last_timestamp_seconds", "Time of the last snapshot.", db, registry=r
        ),
        snapshot_duration_seconds=Gauge(
            f"{n}_snapshot_duration_seconds", "Duration of the last snapshot.", db, registry=r
        ),
        snapshot_size_bytes=Gauge(
            f"{n}_snapshot_size_bytes", "Compressed size of the last snapshot.", db, registry=r
        ),
        replica_lag_seconds=Gauge(
            f"{n}_replica_lag_seconds",
            "Age of the oldest committed transaction not yet durable at the replica (0 when "
            "caught up).",
            rep, registry=r,
        ),
        replica_last_sync_timestamp=Gauge(
            f"{n}_replica_last_sync_timestamp_seconds", "Time of the last successful sync.", rep,
            registry=r,
        ),
        replica_shipped_transactions=Counter(
            f"{n}_replica_shipped_transactions", "Transactions made durable at the replica.", rep,
            registry=r,
        ),
        replica_shipped_frames=Counter(
            f"{n}_replica_shipped_frames", "WAL frames made durable at the replica.", rep,
            registry=r,
        ),
        replica_shipped_bytes=Counter(
            f"{n}_replica_shipped_bytes", "Object bytes written to the replica.", rep, registry=r
        ),
        replica_commit_to_durable_seconds=Histogram(
            f"{n}_replica_commit_to_durable_seconds",
            "Time from observing a commit to it being durable at the replica.",
            rep, buckets=LAG_BUCKETS, registry=r,
        ),
        replica_up=Gauge(
            f"{n}_replica_up", "1 if the last operation on the replica succeeded.", rep, registry=r
        ),
        replica_objects=Gauge(
            f"{n}_replica_objects", "Objects the replica holds (after its last retention pass).",
            rep, registry=r,
        ),
        replica_bytes=Gauge(
            f"{n}_replica_bytes", "Bytes the replica holds (after its last retention pass).",
            rep, registry=r,
        ),
        replica_oldest_restorable=Gauge(
            f"{n}_replica_oldest_restorable_timestamp_seconds",
            "Observation time of the oldest snapshot the replica keeps.", rep, registry=r,
        ),
        compactions=Counter(
            f"{n}_compactions", "Merged objects written by compaction, by level (0: shortest).",
            ["db", "replica", "level"], registry=r,
        ),
        errors=Counter(
            f"{n}_errors", "Errors by operation.", ["db", "replica", "operation"], registry=r
        ),
        integrity_check_ok=Gauge(
            f"{n}_integrity_check_ok", "1 if the last integrity check passed, else 0.", db,
            registry=r,
        ),
        integrity_check_timestamp=Gauge(
            f"{n}_integrity_check_timestamp_seconds", "Time of the last integrity check.", db,
            registry=r,
        ),
        health_check_ok=Gauge(
            f"{n}_health_check_ok", "1 if the health check passed, else 0.", ["db", "check"],
            registry=r,
        ),
        health_check_value=Gauge(
            f"{n}_health_check_value", "The value the health check measured.", ["db", "check"],
            registry=r,
        ),
        health_check_timestamp=Gauge(
            f"{n}_health_check_timestamp_seconds", "Time of the last health check run.",
            ["db", "check"], registry=r,
        ),
        verify_ok=Gauge(
            f"{n}_verify_ok",
            "1 if the last restore drill proved the replica equal to the database, else 0.",
            rep, registry=r,
        ),
        verify_last_success=Gauge(
            f"{n}_verify_last_success_timestamp_seconds",
            "Time of the last successful drill of the replica.", rep, registry=r,
        ),
        verify_duration=Gauge(
            f"{n}_verify_duration_seconds", "Duration of the last restore drill of the replica.",
            rep, registry=r,
        ),
        verify_interval=Gauge(
            f"{n}_verify_interval_seconds", "The configured interval of scheduled drills.", db,
            registry=r,
        ),
        databases=Gauge(
            f"{n}_databases", "Databases of dir: entries by state (queued, opening, "
            "replicating, skipped, failed).", ["state"], registry=r,
        ),
        maintenance_runs=Counter(
            f"{n}_maintenance_runs", "Maintenance task runs, by task and result (ok, skipped, "
            "failed).", ["db", "task", "result"], registry=r,
        ),
        maintenance_last_run=Gauge(
            f"{n}_maintenance_last_run_timestamp_seconds", "Time of a maintenance task's last "
            "run.", ["db", "task"], registry=r,
        ),
        maintenance_duration=Gauge(
            f"{n}_maintenance_duration_seconds", "Duration of a maintenance task's last run.",
            ["db", "task"], registry=r,
        ),
    )
