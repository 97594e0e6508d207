"""Typed configuration: defaults, loading from YAML with ``${ENV}`` expansion, validation.

Every validation error is a :class:`ConfigError` whose message names the field, e.g.
``dbs[0].replicas[1].url: unsupported replica scheme 'ftp'``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shlex
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .affinity import parse_cpus
from .compact import DEFAULT_LEVELS
from .crc import crc32
from .db import DEFAULT_CHECKPOINT_PAGES as DEFAULT_CHECKPOINT_PAGES
from .drill import PartialCheck, VerifyConfig
from .errors import ConfigError
from .health import (
    DEFAULT_INTEGRITY_INTERVAL,
    DEFAULT_INTERVAL,
    OPERATORS,
    Check,
    FreshnessCheck,
    IntegrityCheck,
    SizeCheck,
    SqlThresholdCheck,
    check_names,
    parse_fail_if,
)
from .maintenance import MaintenanceConfig, parse_when
from .notices import NoticeThresholds
from .notify import (
    DEFAULT_MIN_INTERVAL,
    DEFAULT_SENDER,
    DEFAULT_SMTP_PORT,
    DEFAULT_TIMEOUT,
    Channel,
    SmtpNotifier,
    WebhookNotifier,
)
from .retention import PERIODS, RetentionPolicy
from .storage import Destination, S3Options, StorageClient, open_destination, parse_destination
from .storage.s3_options import parse_bool
from .units import parse_duration as parse_duration
from .units import parse_size as parse_size

DEFAULT_SNAPSHOT_INTERVAL = 6 * 3600.0
# with differential snapshots of at most half the pages, a restore of the newest state reads
# about 2x the database: the full snapshot, a differential one, and this much WAL
DEFAULT_SNAPSHOT_WAL_FACTOR = 0.5
DEFAULT_MONITOR_INTERVAL = 1.0
MIN_CHECKPOINT_PAGES = 16
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_METRICS_ADDR: str | None = None
DEFAULT_RETENTION: float | None = None
DEFAULT_READY_MAX_LAG = 60.0
DEFAULT_DIR_PATTERN = "*.db"

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ReplicaConfig:
    """One destination of one database: ``url`` as shown to people, and the parsed destination
    (from ``url`` unless given)."""

    name: str
    url: str
    destination: Destination | None = None
    retention: RetentionPolicy | None = None
    """This destination's own retention (None: the database's)."""
    sync_interval: float = 0.0
    """Seconds between the starts of two upload rounds (0: each round as soon as the last one
    ended and something new is spooled)."""

    def open(self) -> StorageClient:
        """The storage client of this destination."""
        dest = self.destination if self.destination is not None else parse_destination(self.url)
        return open_destination(dest)


@dataclass
class DbConfig:
    """One replicated database."""

    path: str
    replicas: list[ReplicaConfig]
    name: str = ""
    spool_dir: str = ""
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    monitor_interval: float = DEFAULT_MONITOR_INTERVAL
    checkpoint_pages: int = DEFAULT_CHECKPOINT_PAGES
    retention: float | None = DEFAULT_RETENTION
    health: list[Check] = field(default_factory=lambda: [IntegrityCheck()])
    """The health checks run on this database (``health:`` in the config): by default only
    ``PRAGMA quick_check`` at start and every 24 h."""
    ready_max_lag: float = DEFAULT_READY_MAX_LAG
    """``/readyz`` fails while a replica lags more than this many seconds."""
    restore_if_db_not_exists: bool = False
    """Restore a missing database from its replicas before replicating it."""
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    """Scheduled maintenance (``maintenance:``): only ``PRAGMA optimize`` by default."""
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """Restore drills (``verify:``): off unless an interval is set; on demand always."""
    keep: RetentionPolicy = field(default_factory=RetentionPolicy)
    """The ``keep-*`` calendar rules and ``retention: off`` (window None and no rules: keep
    everything); the window itself is ``retention``."""

    def retention_policy(self, replica: ReplicaConfig | None = None) -> RetentionPolicy:
        """What a destination keeps: its own policy, or the database's."""
        if replica is not None and replica.retention is not None:
            return replica.retention
        return dataclasses.replace(self.keep, window=self.retention)
    compaction_levels: tuple[float, ...] = DEFAULT_LEVELS
    """Compaction level intervals in seconds, shortest first (empty: no compaction)."""
    snapshot_wal_factor: float = DEFAULT_SNAPSHOT_WAL_FACTOR
    """A snapshot is taken once the WAL captured since the last one exceeds this many times the
    database size (0: only on ``snapshot-interval``)."""

    def __post_init__(self) -> None:
        self.path = os.path.abspath(self.path)
        if not self.name:
            self.name = self.path
        if not self.spool_dir:
            d, base = os.path.split(self.path)
            self.spool_dir = os.path.join(d, f".{base}-replicator")


@dataclass
class NotifyConfig:
    """Where health-check state changes go; one notifier is shared by every database."""

    min_interval: float = DEFAULT_MIN_INTERVAL
    thresholds: NoticeThresholds = field(default_factory=NoticeThresholds)
    """When a failing destination and a lagging replica are notified."""
    smtp: SmtpNotifier | None = None
    webhooks: list[WebhookNotifier] = field(default_factory=list)

    @property
    def channels(self) -> list[Channel]:
        """Every configured channel (none: notifications are off)."""
        out: list[Channel] = [self.smtp] if self.smtp is not None else []
        return out + list(self.webhooks)


@dataclass
class DirConfig:
    """A directory of databases (``dbs: [{dir: ..., pattern: ..., recursive: ...}]``): every
    matching database is replicated with ``template``'s settings, each below its destinations at
    its path relative to ``dir`` (see :mod:`replicator.discovery`)."""

    dir: str
    template: DbConfig
    pattern: str = DEFAULT_DIR_PATTERN
    recursive: bool = False
    spool_root: str | None = None
    """``spool-dir`` of the entry: the databases' spools go below it at their relative path
    (None: beside each database, as for a listed one)."""


@dataclass(frozen=True)
class Shard:
    """``shard: K/N``: the part of the config's databases one ``replicate`` process takes, so
    that N processes with the same config, parts 1 to N, share its databases between them,
    each database in exactly one part. Which part a database is in depends on its path alone:
    a listed one's absolute path, one of a ``dir:`` entry its path relative to the directory
    ('/'-separated), so the processes may name the directory differently. Every other command
    sees every database of the config."""

    part: int
    parts: int

    def holds(self, key: str) -> bool:
        """Whether the database of ``key`` (see above) is in this part."""
        return crc32(key.encode("utf-8", "surrogateescape")) % self.parts == self.part - 1

    def __str__(self) -> str:
        return f"{self.part}/{self.parts}"


_SHARD_RE = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def parse_shard(value: object, where: str = "shard") -> Shard:
    """``K/N`` with 1 <= K <= N."""
    m = _SHARD_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or not 1 <= int(m[1]) <= int(m[2]):
        raise ConfigError(f"{where}: expected K/N, part K of N with 1 <= K <= N, like 1/2, "
                          f"got {value!r}")
    return Shard(int(m[1]), int(m[2]))


@dataclass
class Config:
    """The whole configuration."""

    dbs: list[DbConfig]
    dirs: list[DirConfig] = field(default_factory=list)
    """Directories of databases, discovered at start and watched for new and removed ones."""
    metrics_addr: str | None = DEFAULT_METRICS_ADDR
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    exec: list[str] | None = None
    """The application to run as a child of ``replicate`` (argv), if any."""
    cpus: str | tuple[int, ...] = "all"
    """The CPUs ``replicate`` runs on: ``all``, ``one`` or their numbers (:mod:`.affinity`)."""
    shard: Shard | None = None
    """The part of the databases ``replicate`` takes (None: all of them)."""

    def held(self) -> list[DbConfig]:
        """The listed databases of this process's part (all without a shard)."""
        return [d for d in self.dbs if self.shard is None or self.shard.holds(d.path)]


def expand_env(value: Any, where: str) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m[1], m[2]
            found = os.environ.get(var)
            if found:
                return found
            if default is not None:
                return default  # like the shell: the default also replaces an empty value
            if found is not None:
                return found
            raise ConfigError(f"{where}: environment variable {var} is not set")

        return _ENV_RE.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    return value


def _take(d: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in d:
        if key not in allowed:
            at = f"{where}.{key}" if where else str(key)
            # suggest the dash spelling: it is the one the docs use
            names = sorted({a.replace("_", "-") for a in allowed})
            near = difflib.get_close_matches(str(key).replace("_", "-"), names, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{at}: unknown field{hint}")


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a non-empty string")
    return v


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}")
    return v


def replica_from_url(url: str, name: str, where: str = "replica") -> ReplicaConfig:
    """A replica from a destination string, parsed and checked (no client is built)."""
    try:
        dest = parse_destination(url)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ReplicaConfig(name=name, url=url, destination=dest)


_S3_FIELDS = ("region", "endpoint", "force-path-style", "storage-class", "sse", "sse-kms-key-id")
_KEEP_FIELDS = {"retention", *(f"keep{sep}{p}" for sep in "-_" for p in PERIODS)}
_REPLICA_FIELDS = {"name", "url", "path", "type", "bucket", "prefix", "sync-interval",
                   "sync_interval", *_KEEP_FIELDS} | {
    n for f in _S3_FIELDS for n in (f, f.replace("-", "_"))}


def _s3_replica(raw: dict[str, Any], name: str, where: str) -> ReplicaConfig:
    """The ``type: s3`` form: its fields become S3Options directly."""
    bucket = _str(raw.get("bucket"), f"{where}.bucket")
    prefix = str(raw.get("prefix", raw.get("path", "")))
    kwargs: dict[str, Any] = {}
    for key in _S3_FIELDS:
        val = _get(raw, key)
        if val is None:
            continue
        arg = key.replace("-", "_")
        kwargs[arg] = parse_bool(arg, val, where) if arg == "force_path_style" else str(val)
    try:
        opts = S3Options(bucket, prefix, **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ReplicaConfig(name=name, url=opts.to_url(), destination=opts)


def _keep(raw: dict[str, Any], where: str, base: RetentionPolicy,
          snapshot_interval: float | None) -> RetentionPolicy:
    """``retention`` (a window, or off) and ``keep-daily`` .. ``keep-yearly`` over ``base``."""
    policy = base
    ret = raw.get("retention")
    if ret is not None:
        if _is_off(ret):
            return RetentionPolicy()
        window = parse_duration(ret, f"{where}.retention")
        if snapshot_interval is not None and (snapshot_interval <= 0
                                              or window < snapshot_interval):
            raise ConfigError(
                f"{where}.retention: must be at least snapshot-interval "
                f"({snapshot_interval:g}s), or nothing could ever be deleted"
            )
        policy = dataclasses.replace(policy, window=window)
    for period in PERIODS:
        v = _get(raw, f"keep-{period}")
        if v is not None:
            policy = dataclasses.replace(
                policy, **{f"keep_{period}": _int(v, f"{where}.keep-{period}", 0)})
    return policy


def _replica(raw: Any, where: str, index: int) -> ReplicaConfig:
    if isinstance(raw, str):
        return replica_from_url(raw, f"replica{index + 1}", where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping or a URL string")
    _take(raw, _REPLICA_FIELDS, where)
    rc = _replica_destination(raw, where, index)
    if _get(raw, "sync-interval") is not None:
        rc.sync_interval = parse_duration(_get(raw, "sync-interval"), f"{where}.sync-interval")
    return rc


def _replica_destination(raw: dict[str, Any], where: str, index: int) -> ReplicaConfig:
    name = _str(raw.get("name", f"replica{index + 1}"), f"{where}.name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: only letters, digits, '.', '_' and '-' are allowed")
    kind = raw.get("type")
    if "url" in raw:
        url = _str(raw["url"], f"{where}.url")
    elif "path" in raw and kind in (None, "file"):
        url = _str(raw["path"], f"{where}.path")
    elif kind == "s3":
        return _s3_replica(raw, name, where)
    elif kind is not None and kind not in ("file", "s3"):
        raise ConfigError(f"{where}.type: unsupported replica type {kind!r} (use file or s3)")
    else:
        raise ConfigError(f"{where}: needs url, or path (file), or type: s3 with bucket")
    return replica_from_url(url, name, where)


def _fields(*names: str) -> set[str]:
    """The dash and the underscore spelling of each field name."""
    return {n for name in names for n in (name, name.replace("-", "_"))}


def _get(d: dict[str, Any], key: str) -> Any:
    return d.get(key, d.get(key.replace("-", "_")))


def _mapping(v: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _take(v, allowed, where)
    return v


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{where}: expected a list")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: expected true or false")
    return v


def _flag(v: Any, where: str) -> bool:
    """An optional boolean field (absent: false)."""
    return False if v is None else _bool(v, where)


def parse_checkpoint_pages(v: Any, where: str) -> int:
    """The ``checkpoint-pages`` setting: an integer of at least MIN_CHECKPOINT_PAGES."""
    return _int(v, where, MIN_CHECKPOINT_PAGES)


def parse_monitor_interval(v: Any, where: str) -> float:
    """The ``monitor-interval`` setting: a positive duration."""
    return _positive_duration(v, where)


def _positive_duration(v: Any, where: str) -> float:
    seconds = parse_duration(v, where)
    if seconds <= 0:
        raise ConfigError(f"{where}: must be positive")
    return seconds


def _interval(d: dict[str, Any], where: str, default: float) -> float:
    v = d.get("interval")
    return default if v is None else _positive_duration(v, f"{where}.interval")


def _check_name(d: dict[str, Any], where: str) -> str:
    name = _str(d.get("name"), f"{where}.name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: only letters, digits, '.', '_' and '-' are allowed")
    return name


def _fail_if(v: Any, where: str) -> tuple[str, float]:
    parsed = parse_fail_if(v) if isinstance(v, str) else None
    if parsed is not None:
        return parsed
    raise ConfigError(
        f"{where}: expected '<op> <number>' with op one of {' '.join(OPERATORS)}, got {v!r}"
    )


def _is_off(v: Any) -> bool:
    """``off`` (which YAML also reads as false) or ``false``: a feature switched off."""
    return v is False or (isinstance(v, str) and v.strip().lower() == "off")


def _health(raw: Any, where: str) -> list[Check]:
    """The typed checks of a database's ``health:`` mapping."""
    raw = _mapping(raw, where, {"integrity", "freshness", "size", "sql"})
    checks: list[Check] = []
    integrity = raw.get("integrity")
    if integrity is None:
        checks.append(IntegrityCheck())  # on by default
    elif not _is_off(integrity):
        w = f"{where}.integrity"
        d = _mapping(integrity, w, {"quick", "interval"})
        quick = _bool(d.get("quick", True), f"{w}.quick")
        checks.append(IntegrityCheck(quick, _interval(d, w, DEFAULT_INTEGRITY_INTERVAL)))
    for i, item in enumerate(_list(raw.get("freshness"), f"{where}.freshness")):
        w = f"{where}.freshness[{i}]"
        d = _mapping(item, w, _fields("name", "sql", "max-age", "interval"))
        checks.append(FreshnessCheck(
            _check_name(d, w), _str(d.get("sql"), f"{w}.sql"),
            _positive_duration(_get(d, "max-age"), f"{w}.max-age"),
            _interval(d, w, DEFAULT_INTERVAL),
        ))
    for i, item in enumerate(_list(raw.get("size"), f"{where}.size")):
        w = f"{where}.size[{i}]"
        d = _mapping(item, w, _fields("name", "max-bytes", "interval"))
        checks.append(SizeCheck(
            _check_name(d, w), parse_size(_get(d, "max-bytes"), f"{w}.max-bytes"),
            _interval(d, w, DEFAULT_INTERVAL),
        ))
    for i, item in enumerate(_list(raw.get("sql"), f"{where}.sql")):
        w = f"{where}.sql[{i}]"
        d = _mapping(item, w, _fields("name", "sql", "fail-if", "interval"))
        name = _check_name(d, w)
        op, threshold = _fail_if(_get(d, "fail-if"), f"{w}.fail-if")
        checks.append(SqlThresholdCheck(
            name, _str(d.get("sql"), f"{w}.sql"), op, threshold, _interval(d, w, DEFAULT_INTERVAL)
        ))
    check_names(checks, where)
    return checks


def _smtp(raw: Any, where: str) -> SmtpNotifier:
    d = _mapping(raw, where, _fields("host", "port", "starttls", "username", "password", "from",
                                      "to", "timeout"))
    to = d.get("to")
    recipients = [to] if isinstance(to, str) else to
    if not isinstance(recipients, list) or not recipients:
        raise ConfigError(f"{where}.to: expected a non-empty list of addresses")
    for i, addr in enumerate(recipients):
        _str(addr, f"{where}.to[{i}]")
    port = _int(d.get("port", DEFAULT_SMTP_PORT), f"{where}.port", 1)
    if port > 65535:
        raise ConfigError(f"{where}.port: expected a port number up to 65535")
    username = d.get("username")
    password = d.get("password")
    if username is not None:
        username = _str(username, f"{where}.username")
    if password is not None:
        if username is None:
            raise ConfigError(f"{where}.password: given without username")
        if not isinstance(password, str):
            raise ConfigError(f"{where}.password: expected a string")
    timeout = d.get("timeout")
    return SmtpNotifier(
        host=_str(d.get("host"), f"{where}.host"),
        port=port,
        starttls=_bool(d.get("starttls", False), f"{where}.starttls"),
        username=username,
        password=password,
        sender=_str(d.get("from", DEFAULT_SENDER), f"{where}.from"),
        recipients=list(recipients),
        timeout=DEFAULT_TIMEOUT if timeout is None else _positive_duration(
            timeout, f"{where}.timeout"),
    )


def _webhook(raw: Any, where: str) -> WebhookNotifier:
    d = _mapping(raw, where, {"url", "headers", "timeout"})
    url = _str(d.get("url"), f"{where}.url")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the URL may embed a token: name the field, not the value
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL")
    headers: dict[str, str] = {}
    raw_headers = d.get("headers") or {}
    if not isinstance(raw_headers, dict):
        raise ConfigError(f"{where}.headers: expected a mapping of header names to values")
    for k, v in raw_headers.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ConfigError(f"{where}.headers.{k}: expected a string")
        headers[str(k)] = str(v)
    timeout = d.get("timeout")
    return WebhookNotifier(url, headers, DEFAULT_TIMEOUT if timeout is None else
                           _positive_duration(timeout, f"{where}.timeout"))


def _notify(raw: Any, where: str = "notify") -> NotifyConfig:
    d = _mapping(raw, where, _fields("min-interval", "smtp", "webhooks",
                                      "destination-failing-after", "lag-above"))
    cfg = NotifyConfig()
    if _get(d, "min-interval") is not None:
        cfg.min_interval = parse_duration(_get(d, "min-interval"), f"{where}.min-interval")
    for key, attr in (("destination-failing-after", "failing_after"), ("lag-above", "lag_above")):
        if _get(d, key) is not None:
            cfg.thresholds = dataclasses.replace(
                cfg.thresholds, **{attr: parse_duration(_get(d, key), f"{where}.{key}")})
    if d.get("smtp") is not None:
        cfg.smtp = _smtp(d["smtp"], f"{where}.smtp")
    cfg.webhooks = [_webhook(w, f"{where}.webhooks[{i}]")
                    for i, w in enumerate(_list(d.get("webhooks"), f"{where}.webhooks"))]
    return cfg


_DB_FIELDS = {"path", "name", "replicas", "spool-dir", "spool_dir", "snapshot-interval",
              "snapshot_interval", "monitor-interval", "monitor_interval", "checkpoint-pages",
              "checkpoint_pages", "retention", "health", "ready-max-lag", "ready_max_lag",
              "restore-if-db-not-exists", "restore_if_db_not_exists", "integrity", "verify",
              "maintenance",
              *(f"keep{sep}{p}" for sep in "-_" for p in PERIODS),
              "compaction-levels", "compaction_levels", "snapshot-wal-factor",
              "snapshot_wal_factor"}


def _db_retention(cfg: DbConfig, raw: dict[str, Any], reps: list[Any], where: str) -> None:
    """The database's retention, and each destination's own where it sets one (its fields
    override the database's one by one)."""
    policy = _keep(raw, where, RetentionPolicy(), cfg.snapshot_interval)
    cfg.retention = policy.window
    cfg.keep = dataclasses.replace(policy, window=None)
    for i, (rc, r) in enumerate(zip(cfg.replicas, reps, strict=True)):
        if isinstance(r, dict) and any(k in r for k in _KEEP_FIELDS):
            rc.retention = _keep(r, f"{where}.replicas[{i}]", policy, cfg.snapshot_interval)


def _verify(raw: Any, where: str) -> VerifyConfig:
    """``verify: {interval: 24h, timeout: 10m, partial: [{name, sql}]}`` or ``verify: off``."""
    if _is_off(raw):
        return VerifyConfig()
    d = _mapping(raw, where, {"interval", "timeout", "partial"})
    interval = None if d.get("interval") is None else _positive_duration(
        d["interval"], f"{where}.interval")
    partial = []
    for i, item in enumerate(_list(d.get("partial"), f"{where}.partial")):
        w = f"{where}.partial[{i}]"
        c = _mapping(item, w, {"name", "sql"})
        partial.append(PartialCheck(_check_name(c, w), _str(c.get("sql"), f"{w}.sql")))
    cfg = VerifyConfig(interval, tuple(partial))
    if d.get("timeout") is not None:
        cfg = dataclasses.replace(cfg, timeout=_positive_duration(d["timeout"], f"{where}.timeout"))
    return cfg


def _maintenance(raw: Any, where: str) -> MaintenanceConfig:
    """``maintenance: {optimize: 24h, checkpoint: {mode: truncate, when: "Sun 03:00"},
    vacuum: {when: "Sun 03:30", max-size: 2GB, max-duration: 60s}}``."""
    d = _mapping(raw, where, {"optimize", "checkpoint", "vacuum"})
    cfg = MaintenanceConfig()
    opt = d.get("optimize")
    if opt is not None:
        cfg = dataclasses.replace(cfg, optimize=None if _is_off(opt) else _positive_duration(
            opt, f"{where}.optimize"), optimize_analyze=not _is_off(opt))
    ck = d.get("checkpoint")
    if ck is not None and not _is_off(ck):
        w = f"{where}.checkpoint"
        c = _mapping(ck, w, {"mode", "when", "timeout"})
        if str(c.get("mode", "truncate")).lower() != "truncate":
            raise ConfigError(f"{w}.mode: only truncate is scheduled (the replicator runs "
                              "PASSIVE checkpoints itself)")
        cfg = dataclasses.replace(cfg, checkpoint=parse_when(c.get("when"), f"{w}.when"))
        if c.get("timeout") is not None:
            cfg = dataclasses.replace(cfg, checkpoint_timeout=_positive_duration(
                c["timeout"], f"{w}.timeout"))
    vac = d.get("vacuum")
    if vac is not None and not _is_off(vac):
        w = f"{where}.vacuum"
        v = _mapping(vac, w, _fields("when", "max-size", "max-duration"))
        cfg = dataclasses.replace(cfg, vacuum=parse_when(v.get("when"), f"{w}.when"))
        if _get(v, "max-size") is not None:
            cfg = dataclasses.replace(cfg, vacuum_max_size=parse_size(
                _get(v, "max-size"), f"{w}.max-size"))
        if _get(v, "max-duration") is not None:
            cfg = dataclasses.replace(cfg, vacuum_max_duration=_positive_duration(
                _get(v, "max-duration"), f"{w}.max-duration"))
    return cfg


def _db_checks(cfg: DbConfig, raw: dict[str, Any], where: str) -> None:
    """``health:`` and the ``integrity: off`` switch."""
    if raw.get("health") is not None:
        cfg.health = _health(raw["health"], f"{where}.health")
    if raw.get("integrity") is not None:
        if not _is_off(raw["integrity"]):
            raise ConfigError(f"{where}.integrity: expected off (configure the check under "
                              "health.integrity)")
        cfg.health = [c for c in cfg.health if not isinstance(c, IntegrityCheck)]
    if raw.get("verify") is not None:
        cfg.verify = _verify(raw["verify"], f"{where}.verify")
    if raw.get("maintenance") is not None:
        cfg.maintenance = _maintenance(raw["maintenance"], f"{where}.maintenance")


def _db(raw: Any, where: str) -> DbConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _take(raw, _DB_FIELDS, where)
    path = _str(raw.get("path"), f"{where}.path")
    reps = raw.get("replicas")
    if not isinstance(reps, list) or not reps:
        raise ConfigError(f"{where}.replicas: expected a non-empty list")
    replicas = [_replica(r, f"{where}.replicas[{i}]", i) for i, r in enumerate(reps)]
    names = [r.name for r in replicas]
    for n in names:
        if names.count(n) > 1:
            raise ConfigError(f"{where}.replicas: duplicate replica name {n!r}")

    def get(key: str) -> Any:
        return raw.get(key, raw.get(key.replace("-", "_")))

    cfg = DbConfig(path=path, replicas=replicas)
    if get("name") is not None:
        cfg.name = _str(get("name"), f"{where}.name")
    if get("spool-dir") is not None:
        cfg.spool_dir = os.path.abspath(_str(get("spool-dir"), f"{where}.spool-dir"))
    if get("snapshot-interval") is not None:
        cfg.snapshot_interval = parse_duration(get("snapshot-interval"),
                                               f"{where}.snapshot-interval")
    if get("monitor-interval") is not None:
        cfg.monitor_interval = parse_monitor_interval(get("monitor-interval"),
                                                      f"{where}.monitor-interval")
    if get("checkpoint-pages") is not None:
        cfg.checkpoint_pages = parse_checkpoint_pages(get("checkpoint-pages"),
                                                      f"{where}.checkpoint-pages")
    _db_retention(cfg, raw, reps, where)
    _db_checks(cfg, raw, where)
    if get("ready-max-lag") is not None:
        cfg.ready_max_lag = _positive_duration(get("ready-max-lag"), f"{where}.ready-max-lag")
    for i, rc in enumerate(cfg.replicas):
        if rc.sync_interval >= cfg.ready_max_lag:
            raise ConfigError(
                f"{where}.replicas[{i}].sync-interval: {rc.sync_interval:g}s is not below "
                f"ready-max-lag ({cfg.ready_max_lag:g}s): /readyz would fail between rounds")
    _db_history(cfg, get, where)
    cfg.restore_if_db_not_exists = _flag(get("restore-if-db-not-exists"),
                                         f"{where}.restore-if-db-not-exists")
    return cfg


def _dir(raw: dict[str, Any], where: str) -> DirConfig:
    """A ``dir:`` entry: its own fields, and a database's fields for every database in it."""
    own = {"dir", "pattern", "recursive"}
    if "path" in raw:
        raise ConfigError(f"{where}: give either path or dir, not both")
    if "name" in raw:
        raise ConfigError(f"{where}.name: a dir entry's databases are named by their paths")
    root = os.path.abspath(_str(raw["dir"], f"{where}.dir"))
    template = _db({**{k: v for k, v in raw.items() if k not in own}, "path": root}, where)
    pattern = _str(raw.get("pattern", DEFAULT_DIR_PATTERN), f"{where}.pattern")
    if "/" in pattern:
        raise ConfigError(f"{where}.pattern: a file-name pattern (no '/'), got {pattern!r}")
    spool = _get(raw, "spool-dir")
    return DirConfig(dir=root, template=template, pattern=pattern,
                     recursive=_flag(raw.get("recursive"), f"{where}.recursive"),
                     spool_root=template.spool_dir if spool is not None else None)


def _db_history(cfg: DbConfig, get: Callable[[str], Any], where: str) -> None:
    """The fields that keep a long history cheap: compaction levels, WAL-volume snapshots."""
    if get("compaction-levels") is not None:
        cfg.compaction_levels = _levels(get("compaction-levels"), f"{where}.compaction-levels")
    factor = get("snapshot-wal-factor")
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
            raise ConfigError(f"{where}.snapshot-wal-factor: expected a number >= 0 (0: off)")
        cfg.snapshot_wal_factor = float(factor)


def _levels(raw: Any, where: str) -> tuple[float, ...]:
    """Compaction levels: positive durations, each longer than the one before."""
    levels = tuple(_positive_duration(v, f"{where}[{i}]")
                   for i, v in enumerate(_list(raw, where)))
    for i in range(1, len(levels)):
        if levels[i] <= levels[i - 1]:
            raise ConfigError(f"{where}[{i}]: must be longer than the level before it")
    return levels


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document (after env expansion)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    _take(data, {"dbs", "metrics-addr", "metrics_addr", "shutdown-timeout", "shutdown_timeout",
                 "notify", "exec", "cpus", "shard"}, "")
    dbs_raw = data.get("dbs")
    if not isinstance(dbs_raw, list) or not dbs_raw:
        raise ConfigError("dbs: expected a non-empty list of databases")
    dbs = [_db(d, f"dbs[{i}]") for i, d in enumerate(dbs_raw)
           if not (isinstance(d, dict) and "dir" in d)]
    dirs = [_dir(d, f"dbs[{i}]") for i, d in enumerate(dbs_raw)
            if isinstance(d, dict) and "dir" in d]
    paths = [d.path for d in dbs]
    for p in paths:
        if paths.count(p) > 1:
            raise ConfigError(f"dbs: database {p} is listed twice")
    roots = [d.dir for d in dirs]
    for r in roots:
        if roots.count(r) > 1:
            raise ConfigError(f"dbs: directory {r} is listed twice")
    cfg = Config(dbs=dbs, dirs=dirs)
    addr = data.get("metrics-addr", data.get("metrics_addr"))
    if addr is not None:
        cfg.metrics_addr = validate_addr(addr, "metrics-addr")
    st = data.get("shutdown-timeout", data.get("shutdown_timeout"))
    if st is not None:
        cfg.shutdown_timeout = parse_duration(st, "shutdown-timeout")
    if data.get("notify") is not None:
        cfg.notify = _notify(data["notify"])
    if data.get("exec") is not None:
        cfg.exec = parse_command(data["exec"], "exec")
    if data.get("cpus") is not None:
        cfg.cpus = parse_cpus(data["cpus"], "cpus")
    if data.get("shard") is not None:
        cfg.shard = parse_shard(data["shard"], "shard")
    return cfg


def parse_command(value: Any, where: str) -> list[str]:
    """A command as a string (split like a shell would, no shell involved) or a list."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise ConfigError(f"{where}: expected a command string or a list of strings")
    if not argv:
        raise ConfigError(f"{where}: empty command")
    return argv


def validate_addr(addr: Any, where: str) -> str:
    """Check a ``HOST:PORT`` listen address."""
    if not isinstance(addr, str) or ":" not in addr:
        raise ConfigError(f"{where}: expected HOST:PORT, got {addr!r}")
    host, _, port = addr.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: invalid port in {addr!r}")
    return addr


def load_config(path: str) -> Config:
    """Read, expand and validate a YAML config file."""
    return parse_config(expand_env(_load_yaml(path), ""))


def load_metrics_addr(path: str) -> str | None:
    """Only the ``metrics-addr`` of a config file (expanded and checked), for commands that talk
    to a running replicator: the rest, and the environment it needs, is not looked at."""
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    addr = data.get("metrics-addr", data.get("metrics_addr"))
    if addr is None:
        return None
    return validate_addr(expand_env(addr, "metrics-addr"), "metrics-addr")


def _load_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}: {problem}{at}") from None
    return data
