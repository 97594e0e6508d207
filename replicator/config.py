"""Typed configuration: defaults, loading from YAML with ``${ENV}`` expansion, validation.

Every validation error is a :class:`ConfigError` whose message names the field, e.g.
``dbs[0].replicas[1].url: unsupported replica scheme 'ftp'``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_SNAPSHOT_INTERVAL = 6 * 3600.0
DEFAULT_MONITOR_INTERVAL = 1.0
DEFAULT_CHECKPOINT_PAGES = 1000
DEFAULT_SHUTDOWN_TIMEOUT = 10.0
DEFAULT_METRICS_ADDR: str | None = None
DEFAULT_RETENTION: float | None = None

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ReplicaConfig:
    """One destination of one database."""

    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)


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
    health: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = os.path.abspath(self.path)
        if not self.name:
            self.name = self.path
        if not self.spool_dir:
            d, base = os.path.split(self.path)
            self.spool_dir = os.path.join(d, f".{base}-replicator")


@dataclass
class Config:
    """The whole configuration."""

    dbs: list[DbConfig]
    metrics_addr: str | None = DEFAULT_METRICS_ADDR
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    notify: dict[str, Any] = field(default_factory=dict)


def parse_duration(value: object, where: str) -> float:
    """Seconds from ``1h30m``, ``10s``, ``250ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration like 10s, 5m or 1h, got {value!r}")
    if isinstance(value, int | float):
        if math.isnan(value):
            raise ConfigError(f"{where}: expected a duration like 10s, 5m or 1h, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: duration must not be negative")
        return float(value)
    if isinstance(value, str):
        s = value.strip().replace(" ", "")
        pos = 0
        total = 0.0
        for m in _DUR_RE.finditer(s):
            if m.start() != pos:
                break
            n = float(m[1])
            total += n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
            pos = m.end()
        if s and pos == len(s):
            return total
    raise ConfigError(f"{where}: expected a duration like 10s, 5m or 1h, got {value!r}")


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
            raise ConfigError(f"{where}.{key}: unknown field" if where else f"{key}: unknown field")


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: expected a non-empty string")
    return v


def _int(v: Any, where: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}")
    return v


def replica_from_url(url: str, name: str, where: str = "replica") -> ReplicaConfig:
    """A replica from a destination string, validated by opening its backend."""
    from .storage import open_storage

    try:
        open_storage(url)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ReplicaConfig(name=name, url=url)


_REPLICA_FIELDS = {"name", "url", "path", "type", "bucket", "prefix", "region", "endpoint",
                   "force-path-style", "force_path_style", "storage-class", "storage_class",
                   "sse", "sse-kms-key-id", "sse_kms_key_id"}


def _replica(raw: Any, where: str, index: int) -> ReplicaConfig:
    if isinstance(raw, str):
        return replica_from_url(raw, f"replica{index + 1}", where)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping or a URL string")
    _take(raw, _REPLICA_FIELDS, where)
    name = _str(raw.get("name", f"replica{index + 1}"), f"{where}.name")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{where}.name: only letters, digits, '.', '_' and '-' are allowed")
    kind = raw.get("type")
    if "url" in raw:
        url = _str(raw["url"], f"{where}.url")
    elif "path" in raw and kind in (None, "file"):
        url = _str(raw["path"], f"{where}.path")
    elif kind == "s3":
        bucket = _str(raw.get("bucket"), f"{where}.bucket")
        params = []
        for key in ("region", "endpoint", "force-path-style", "force_path_style",
                    "storage-class", "storage_class", "sse", "sse-kms-key-id", "sse_kms_key_id"):
            if key in raw:
                val = raw[key]
                if isinstance(val, bool):
                    val = "true" if val else "false"
                params.append(f"{key.replace('-', '_')}={val}")
        prefix = str(raw.get("prefix", raw.get("path", ""))).strip("/")
        url = f"s3://{bucket}/{prefix}" + ("?" + "&".join(params) if params else "")
    elif kind is not None and kind not in ("file", "s3"):
        raise ConfigError(f"{where}.type: unsupported replica type {kind!r} (use file or s3)")
    else:
        raise ConfigError(f"{where}: needs url, or path (file), or type: s3 with bucket")
    return replica_from_url(url, name, where)


_DB_FIELDS = {"path", "name", "replicas", "spool-dir", "spool_dir", "snapshot-interval",
              "snapshot_interval", "monitor-interval", "monitor_interval", "checkpoint-pages",
              "checkpoint_pages", "retention", "health"}


def _check_retention(cfg: DbConfig, where: str) -> None:
    assert cfg.retention is not None
    if cfg.snapshot_interval <= 0 or cfg.retention < cfg.snapshot_interval:
        raise ConfigError(
            f"{where}.retention: must be at least snapshot-interval "
            f"({cfg.snapshot_interval:g}s), or nothing could ever be deleted"
        )


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
        cfg.monitor_interval = parse_duration(get("monitor-interval"), f"{where}.monitor-interval")
        if cfg.monitor_interval <= 0:
            raise ConfigError(f"{where}.monitor-interval: must be positive")
    if get("checkpoint-pages") is not None:
        cfg.checkpoint_pages = _int(get("checkpoint-pages"), f"{where}.checkpoint-pages", 16)
    if get("retention") is not None:
        cfg.retention = parse_duration(get("retention"), f"{where}.retention")
        _check_retention(cfg, where)
    if raw.get("health") is not None:
        if not isinstance(raw["health"], dict):
            raise ConfigError(f"{where}.health: expected a mapping")
        cfg.health = raw["health"]
    return cfg


def parse_config(data: Any) -> Config:
    """Validate a parsed YAML document (after env expansion)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    _take(data, {"dbs", "metrics-addr", "metrics_addr", "shutdown-timeout", "shutdown_timeout",
                 "notify"}, "")
    dbs_raw = data.get("dbs")
    if not isinstance(dbs_raw, list) or not dbs_raw:
        raise ConfigError("dbs: expected a non-empty list of databases")
    dbs = [_db(d, f"dbs[{i}]") for i, d in enumerate(dbs_raw)]
    paths = [d.path for d in dbs]
    for p in paths:
        if paths.count(p) > 1:
            raise ConfigError(f"dbs: database {p} is listed twice")
    cfg = Config(dbs=dbs)
    addr = data.get("metrics-addr", data.get("metrics_addr"))
    if addr is not None:
        cfg.metrics_addr = validate_addr(addr, "metrics-addr")
    st = data.get("shutdown-timeout", data.get("shutdown_timeout"))
    if st is not None:
        cfg.shutdown_timeout = parse_duration(st, "shutdown-timeout")
    if data.get("notify") is not None:
        if not isinstance(data["notify"], dict):
            raise ConfigError("notify: expected a mapping")
        cfg.notify = data["notify"]
    return cfg


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
    return parse_config(expand_env(data, ""))
