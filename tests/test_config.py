"""Tests for replicator.config: YAML, ${ENV} expansion, and errors that name the field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from replicator.config import (
    DEFAULT_CHECKPOINT_PAGES,
    DEFAULT_MONITOR_INTERVAL,
    DEFAULT_READY_MAX_LAG,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_SNAPSHOT_INTERVAL,
    Config,
    NotifyConfig,
    expand_env,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    replica_from_url,
    validate_addr,
)
from replicator.errors import ConfigError
from replicator.health import FreshnessCheck, IntegrityCheck, SizeCheck, SqlThresholdCheck
from replicator.notify import DEFAULT_MIN_INTERVAL, SmtpNotifier, WebhookNotifier


def write(tmp_path: Path, text: str, name: str = "replicator.yml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        load(tmp_path, text)
    return str(ei.value)


def one_db(extra: str = "", replicas: str = "    replicas:\n      - /backups/app\n") -> str:
    return "dbs:\n  - path: /data/app.db\n" + replicas + extra


# ------------------------------------------------------------------------------------------
# The happy path


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, one_db())
    assert len(cfg.dbs) == 1
    db = cfg.dbs[0]
    assert db.path == "/data/app.db"
    assert db.name == "/data/app.db"
    assert db.spool_dir == "/data/.app.db-replicator"
    assert db.snapshot_interval == DEFAULT_SNAPSHOT_INTERVAL
    assert db.monitor_interval == DEFAULT_MONITOR_INTERVAL
    assert db.checkpoint_pages == DEFAULT_CHECKPOINT_PAGES
    assert db.retention is None
    assert [(r.name, r.url) for r in db.replicas] == [("replica1", "/backups/app")]
    assert cfg.metrics_addr is None
    assert cfg.shutdown_timeout == DEFAULT_SHUTDOWN_TIMEOUT
    assert cfg.notify == NotifyConfig()
    assert cfg.notify.channels == []
    assert db.health == [IntegrityCheck(quick=True, interval=86400.0)]  # on by default
    assert db.ready_max_lag == DEFAULT_READY_MAX_LAG


@pytest.mark.parametrize(("extra", "expected"), [
    ("", [IntegrityCheck()]),
    ("    health:\n      size: [{name: s, max-bytes: 1}]\n",
     [IntegrityCheck(), SizeCheck("s", 1)]),
    ("    health:\n      integrity: off\n      size: [{name: s, max-bytes: 1}]\n",
     [SizeCheck("s", 1)]),
    ("    health:\n      integrity: false\n", []),
    ("    integrity: off\n", []),
    ("    integrity: 'off'\n    health:\n      size: [{name: s, max-bytes: 1}]\n",
     [SizeCheck("s", 1)]),
])
def test_integrity_check_is_on_unless_switched_off(
    tmp_path: Path, extra: str, expected: list[object]
) -> None:
    assert load(tmp_path, one_db(extra)).dbs[0].health == expected


def test_integrity_switch_rejects_other_values(tmp_path: Path) -> None:
    assert load_error(tmp_path, one_db("    integrity: on\n")).startswith(
        "dbs[0].integrity: expected off")


def test_full_config(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
metrics-addr: 127.0.0.1:9090
shutdown-timeout: 30s
notify:
  webhooks:
    - url: http://example.invalid/hook
dbs:
  - path: /data/a.db
    name: main
    spool-dir: /var/spool/a
    snapshot-interval: 1h30m
    monitor-interval: 250ms
    checkpoint-pages: 2000
    retention: 7d
    ready-max-lag: 1m
    health:
      integrity: {quick: false, interval: 12h}
    replicas:
      - name: local
        path: /backups/a
      - name: url-form
        url: file:///backups/a2
      - name: cloud
        type: s3
        bucket: my-bucket
        prefix: /db/a/
        region: eu-west-1
        endpoint: http://127.0.0.1:9000
        force-path-style: true
  - path: /data/b.db
    snapshot_interval: 90
    monitor_interval: 0.5
    checkpoint_pages: 16
    spool_dir: /var/spool/b
    replicas: [/backups/b]
""")
    assert cfg.metrics_addr == "127.0.0.1:9090"
    assert cfg.shutdown_timeout == 30.0
    assert [w.url for w in cfg.notify.webhooks] == ["http://example.invalid/hook"]
    a, b = cfg.dbs
    assert (a.name, a.spool_dir) == ("main", "/var/spool/a")
    assert a.snapshot_interval == 5400.0
    assert a.monitor_interval == 0.25
    assert a.checkpoint_pages == 2000
    assert a.retention == 7 * 86400.0
    assert a.health == [IntegrityCheck(quick=False, interval=12 * 3600.0)]
    assert a.ready_max_lag == 60.0
    assert [r.name for r in a.replicas] == ["local", "url-form", "cloud"]
    assert a.replicas[0].url == "/backups/a"
    assert a.replicas[1].url == "file:///backups/a2"
    s3 = a.replicas[2].url
    assert s3.startswith("s3://my-bucket/db/a?")
    assert "region=eu-west-1" in s3
    assert "endpoint=http://127.0.0.1:9000" in s3
    assert "force_path_style=true" in s3
    # underscore spellings work as well as dashes
    assert (b.snapshot_interval, b.monitor_interval, b.checkpoint_pages) == (90.0, 0.5, 16)
    assert b.spool_dir == "/var/spool/b"
    assert [(r.name, r.url) for r in b.replicas] == [("replica1", "/backups/b")]


def test_s3_form_opens_the_s3_backend(tmp_path: Path) -> None:
    """The typed S3 fields become S3Options directly (no URL is built and parsed back); the
    replica's url shows them, and reads back as the same options."""
    from replicator.storage import S3Options, parse_destination

    cfg = load(tmp_path, one_db(replicas="""    replicas:
      - type: s3
        bucket: bkt
        path: some/prefix
        force_path_style: "yes"
        endpoint: http://127.0.0.1:9000/
"""))
    rc = cfg.dbs[0].replicas[0]
    opts = S3Options("bkt", "some/prefix", endpoint="http://127.0.0.1:9000",
                     force_path_style=True)
    assert rc.destination == opts
    assert rc.url == "s3://bkt/some/prefix?endpoint=http://127.0.0.1:9000&force_path_style=true"
    assert parse_destination(rc.url) == opts
    client: Any = rc.open()
    assert (client.url, client.options) == ("s3://bkt/some/prefix", opts)


def test_relative_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(tmp_path, "dbs:\n  - path: app.db\n    spool-dir: sp\n    replicas: [bk]\n")
    assert cfg.dbs[0].path == str(tmp_path / "app.db")
    assert cfg.dbs[0].spool_dir == str(tmp_path / "sp")


# ------------------------------------------------------------------------------------------
# ${ENV} expansion


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPL_DATA", "/srv/data")
    monkeypatch.setenv("RPL_BUCKET", "bkt")
    monkeypatch.delenv("RPL_UNSET", raising=False)
    cfg = load(tmp_path, """
dbs:
  - path: ${RPL_DATA}/app.db
    snapshot-interval: ${RPL_UNSET:-2h}
    replicas:
      - url: s3://${RPL_BUCKET}/${RPL_UNSET:-default/prefix}
      - path: ${RPL_UNSET:-/backups}/${RPL_BUCKET}-${RPL_BUCKET}
      - path: ${RPL_UNSET:-}/x
""")
    db = cfg.dbs[0]
    assert db.path == "/srv/data/app.db"
    assert db.snapshot_interval == 7200.0
    assert [r.url for r in db.replicas] == [
        "s3://bkt/default/prefix", "/backups/bkt-bkt", "/x"]


def test_env_value_wins_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPL_DIR", "/from/env")
    cfg = load(tmp_path, one_db(replicas="    replicas: ['${RPL_DIR:-/from/default}']\n"))
    assert cfg.dbs[0].replicas[0].url == "/from/env"


def test_env_default_applies_to_an_empty_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``${VAR:-default}`` follows the shell: the default is used when VAR is unset or empty."""
    monkeypatch.setenv("RPL_EMPTY", "")
    cfg = load(tmp_path, one_db(replicas="    replicas: ['${RPL_EMPTY:-/fallback}']\n"))
    assert cfg.dbs[0].replicas[0].url == "/fallback"


def test_env_set_but_empty_without_default_expands_to_empty(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RPL_EMPTY", "")
    assert expand_env("a${RPL_EMPTY}b", "x") == "ab"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("dbs:\n  - path: ${RPL_NOPE}/app.db\n    replicas: [/b]\n", "dbs[0].path"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - /b\n      - url: s3://${RPL_NOPE}\n",
         "dbs[0].replicas[1].url"),
        ("metrics-addr: ${RPL_NOPE}\n" + one_db(), "metrics-addr"),
    ],
)
def test_missing_env_var_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, where: str
) -> None:
    monkeypatch.delenv("RPL_NOPE", raising=False)
    msg = load_error(tmp_path, text)
    assert msg == f"{where}: environment variable RPL_NOPE is not set"


def test_env_in_comments_and_non_strings_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RPL_NOPE", raising=False)
    cfg = load(tmp_path, "# path: ${RPL_NOPE}\n" + one_db("    checkpoint-pages: 64\n"))
    assert cfg.dbs[0].checkpoint_pages == 64
    assert expand_env({"a": [1, 2.5, None, True]}, "") == {"a": [1, 2.5, None, True]}
    assert expand_env("$RPL_NOPE and ${not-a-name}", "x") == "$RPL_NOPE and ${not-a-name}"


# ------------------------------------------------------------------------------------------
# Errors name the full path of the field


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus: 1\n" + one_db(), "bogus: unknown field"),
        (one_db("    bogus: 1\n"), "dbs[0].bogus: unknown field"),
        ("dbs:\n  - path: /a.db\n    replicas: [/a]\n  - path: /b.db\n    replicas:\n"
         "      - /b\n      - path: /c\n        bogus: x\n",
         "dbs[1].replicas[1].bogus: unknown field"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - /b\n      - path: /c\n        bogus: x\n",
         "dbs[0].replicas[1].bogus: unknown field"),
    ],
)
def test_unknown_field_names_the_full_path(tmp_path: Path, text: str, expected: str) -> None:
    assert load_error(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dbs: []\n", "dbs: expected a non-empty list"),
        ("dbs: /a.db\n", "dbs: expected a non-empty list"),
        ("metrics-addr: x\n", "dbs: expected a non-empty list"),
        ("dbs:\n  - /a.db\n", "dbs[0]: expected a mapping"),
        ("dbs:\n  - replicas: [/b]\n", "dbs[0].path: expected a non-empty string"),
        ("dbs:\n  - path: ''\n    replicas: [/b]\n", "dbs[0].path: expected a non-empty string"),
        ("dbs:\n  - path: /a.db\n", "dbs[0].replicas: expected a non-empty list"),
        ("dbs:\n  - path: /a.db\n    replicas: []\n", "dbs[0].replicas: expected a non-empty list"),
        ("dbs:\n  - path: /a.db\n    replicas: [3]\n",
         "dbs[0].replicas[0]: expected a mapping or a URL string"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - name: x\n",
         "dbs[0].replicas[0]: needs url, or path (file), or type: s3 with bucket"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - type: gcs\n        bucket: b\n",
         "dbs[0].replicas[0].type: unsupported replica type 'gcs'"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - type: s3\n",
         "dbs[0].replicas[0].bucket: expected a non-empty string"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - name: 'a b'\n        path: /b\n",
         "dbs[0].replicas[0].name: only letters, digits"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - ftp://host/x\n",
         "dbs[0].replicas[0]: ftp://host/x: unsupported replica scheme 'ftp'"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - url: ftp://host/x\n",
         "dbs[0].replicas[0]: ftp://host/x: unsupported replica scheme 'ftp'"),
        ("dbs:\n  - path: /a.db\n    replicas:\n      - url: 's3://'\n",
         "dbs[0].replicas[0]: s3://: missing bucket name"),
        (one_db("    checkpoint-pages: 15\n"),
         "dbs[0].checkpoint-pages: expected an integer >= 16"),
        (one_db("    checkpoint-pages: true\n"),
         "dbs[0].checkpoint-pages: expected an integer >= 16"),
        (one_db("    checkpoint-pages: '100'\n"),
         "dbs[0].checkpoint-pages: expected an integer >= 16"),
        (one_db("    monitor-interval: 0s\n"), "dbs[0].monitor-interval: must be positive"),
        (one_db("    health: [1]\n"), "dbs[0].health: expected a mapping"),
        (one_db("    health: {integrity: {quick: 1}}\n"),
         "dbs[0].health.integrity.quick: expected true or false"),
        (one_db("    health: {integrity: {interval: 0s}}\n"),
         "dbs[0].health.integrity.interval: must be positive"),
        (one_db("    health: {integrity: {every: 1h}}\n"),
         "dbs[0].health.integrity.every: unknown field"),
        (one_db("    health: {freshness: {name: a}}\n"),
         "dbs[0].health.freshness: expected a list"),
        (one_db("    health: {freshness: [{name: a, sql: x}]}\n"),
         "dbs[0].health.freshness[0].max-age: expected a duration"),
        (one_db("    health: {freshness: [{sql: x, max-age: 1h}]}\n"),
         "dbs[0].health.freshness[0].name: expected a non-empty string"),
        (one_db("    health: {size: [{name: s, max-bytes: 1XB}]}\n"),
         "dbs[0].health.size[0].max-bytes: expected a size like 500MiB or 1GB, got '1XB'"),
        (one_db("    health: {sql: [{name: 'a b', sql: x, fail-if: '> 1'}]}\n"),
         "dbs[0].health.sql[0].name: only letters"),
        (one_db("    health: {sql: [{name: n, sql: x, fail-if: 'over 100'}]}\n"),
         "dbs[0].health.sql[0].fail-if: expected '<op> <number>'"),
        (one_db("    health: {sql: [{name: n, fail-if: '> 1'}]}\n"),
         "dbs[0].health.sql[0].sql: expected a non-empty string"),
        (one_db("    ready-max-lag: -1\n"), "dbs[0].ready-max-lag: duration must not be negative"),
        ("notify: {smtp: {to: [a@b]}}\n" + one_db(), "notify.smtp.host: expected a non-empty"),
        ("notify: {smtp: {host: h}}\n" + one_db(), "notify.smtp.to: expected a non-empty list"),
        ("notify: {smtp: {host: h, to: [a], port: 0}}\n" + one_db(),
         "notify.smtp.port: expected an integer >= 1"),
        ("notify: {smtp: {host: h, to: [a], starttls: 'yes'}}\n" + one_db(),
         "notify.smtp.starttls: expected true or false"),
        ("notify: {smtp: {host: h, to: [a], password: p}}\n" + one_db(),
         "notify.smtp.password: given without username"),
        ("notify: {webhooks: [{url: 'ftp://h/x'}]}\n" + one_db(),
         "notify.webhooks[0].url: expected an http:// or https:// URL"),
        ("notify: {webhooks: [{url: 'http://h', headers: [a]}]}\n" + one_db(),
         "notify.webhooks[0].headers: expected a mapping"),
        ("notify: {webhooks: [{url: 'http://h', timeout: 0}]}\n" + one_db(),
         "notify.webhooks[0].timeout: must be positive"),
        ("notify: {min-interval: soon}\n" + one_db(), "notify.min-interval: expected a duration"),
        ("notify: {email: x}\n" + one_db(), "notify.email: unknown field"),
        (one_db("    name: ''\n"), "dbs[0].name: expected a non-empty string"),
        ("notify: [1]\n" + one_db(), "notify: expected a mapping"),
        ("metrics-addr: 9090\n" + one_db(), "metrics-addr: expected HOST:PORT, got 9090"),
        ("metrics-addr: 'localhost:http'\n" + one_db(), "metrics-addr: invalid port"),
        ("metrics-addr: 'localhost:70000'\n" + one_db(), "metrics-addr: invalid port"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in load_error(tmp_path, text)


def test_duplicate_replica_names(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """dbs:
  - path: /a.db
    replicas:
      - {name: r1, path: /b1}
      - {name: r1, path: /b2}
""")
    assert msg == "dbs[0].replicas: duplicate replica name 'r1'"
    # a generated name can collide with an explicit one
    msg = load_error(tmp_path, """dbs:
  - path: /a.db
    replicas:
      - /b1
      - {name: replica1, path: /b2}
""")
    assert msg == "dbs[0].replicas: duplicate replica name 'replica1'"


def test_same_replica_name_in_two_databases_is_fine(tmp_path: Path) -> None:
    cfg = load(tmp_path, "dbs:\n  - path: /a.db\n    replicas: [/x]\n"
                         "  - path: /b.db\n    replicas: [/y]\n")
    assert [d.replicas[0].name for d in cfg.dbs] == ["replica1", "replica1"]


def test_duplicate_db_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    msg = load_error(tmp_path, f"""dbs:
  - path: {tmp_path}/app.db
    replicas: [/b1]
  - path: ./sub/../app.db
    replicas: [/b2]
""")
    assert msg == f"dbs: database {tmp_path}/app.db is listed twice"


# ------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        ("1h 30m 15s", 5415.0),
        ("1m500ms", 60.5),
        ("0s", 0.0),
        (90, 90.0),
        (0, 0.0),
        (2.5, 2.5),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize(
    "value",
    ["", " ", "10", "ten seconds", "10x", "s", "-5s", "5s-", "1h30", "h1", "1.h", ".5h", "1e3s",
     "10 sec", "1H", True, False, None, [], {}, -1, -0.5, "10s10"],
)
def test_bad_durations(value: object) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_duration(value, "dbs[0].retention")
    assert str(ei.value).startswith("dbs[0].retention: ")


def test_nan_is_not_a_duration() -> None:
    with pytest.raises(ConfigError, match="^snapshot-interval: "):
        parse_duration(math.nan, "snapshot-interval")


def test_bad_duration_in_file_names_the_field(tmp_path: Path) -> None:
    msg = load_error(tmp_path, one_db("    snapshot-interval: 1 fortnight\n"))
    assert msg.startswith(
        "dbs[0].snapshot-interval: expected a duration like 250ms, 10s, 5m, 1h or 7d")
    assert "'1 fortnight'" in msg
    msg = load_error(tmp_path, "shutdown-timeout: soon\n" + one_db())
    assert msg.startswith("shutdown-timeout: expected a duration")
    msg = load_error(tmp_path, one_db("    retention: .nan\n"))
    assert msg.startswith("dbs[0].retention: ")


# ------------------------------------------------------------------------------------------
# The file itself


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("dbs:\n  - path: /a.db\n    replicas: [/b, /c\n", 4, 1),
        ("dbs:\n  - path: /a.db\n    replicas: a: b\n", 3, 16),
        ("dbs:\n  - path: '/a.db\n", 3, 1),
        ("dbs:\n\t- path: /a.db\n", 2, 1),
    ],
)
def test_malformed_yaml_names_line_and_column(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    path = write(tmp_path, text)
    msg = load_error(tmp_path, text)
    assert msg.startswith(f"config file {path}: ")
    assert msg.endswith(f" at line {line}, column {column}")
    assert "\n" not in msg


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "dbs: !!python/object/apply:os.system ['true']\n")
    assert "line 1, column 6" in msg


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n",
                                  "42\n", "null\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    assert load_error(tmp_path, text) == "config: expected a mapping at the top level"


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yml"
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    assert str(ei.value) == f"config file {path} does not exist"


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(str(tmp_path))
    assert str(tmp_path) in str(ei.value)


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(one_db().encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(str(path))
    assert str(ei.value).startswith(f"config file {path}: ")


def test_parse_config_direct() -> None:
    cfg = parse_config({"dbs": [{"path": "/a.db", "replicas": ["/b"]}]})
    assert cfg.dbs[0].replicas[0].url == "/b"
    with pytest.raises(ConfigError, match="^config: expected a mapping"):
        parse_config(["dbs"])


def test_replica_from_url_and_validate_addr() -> None:
    assert replica_from_url("/x", "r").url == "/x"
    with pytest.raises(ConfigError, match=r"^DESTINATION 'ftp://x': ftp://x: unsupported"):
        replica_from_url("ftp://x", "r", "DESTINATION 'ftp://x'")
    with pytest.raises(ConfigError, match="^replica: replica destination is empty"):
        replica_from_url("", "r")
    assert validate_addr(":9090", "a") == ":9090"
    assert validate_addr("[::1]:9090", "a") == "[::1]:9090"
    for bad in ("", "9090", "host:", "host:-1", "host:65536", None, 9090):
        with pytest.raises(ConfigError, match="^--metrics-addr: "):
            validate_addr(bad, "--metrics-addr")



def test_health_checks_and_notify_are_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP_PASSWORD", "pw-from-env")
    cfg = load(tmp_path, """
notify:
  min-interval: 10m
  smtp:
    host: mail.example.test
    port: 587
    starttls: true
    username: alerts
    password: ${SMTP_PASSWORD}
    from: replicator@example.test
    to: [dba@example.test, oncall@example.test]
    timeout: 5s
  webhooks:
    - url: https://hooks.example.test/T0KEN
      headers: {Authorization: Bearer x, X-Retry: 3}
    - url: http://127.0.0.1:8080/hook
dbs:
  - path: /data/app.db
    replicas: [/backups/app]
    ready-max-lag: 30s
    health:
      integrity: {quick: true, interval: 24h}
      freshness:
        - {name: releases_fresh, sql: SELECT MAX(created_at) FROM releases, max-age: 25h}
      size:
        - {name: db_size, max-bytes: 500MiB, interval: 5m}
        - {name: db_size_int, max_bytes: 1000}
      sql:
        - {name: overdue, sql: SELECT COUNT(*) FROM t, fail-if: "> 100", interval: 1m}
""")
    db = cfg.dbs[0]
    assert db.ready_max_lag == 30.0
    assert db.health == [
        IntegrityCheck(quick=True, interval=86400.0),
        FreshnessCheck("releases_fresh", "SELECT MAX(created_at) FROM releases", 25 * 3600.0),
        SizeCheck("db_size", 500 * 1024 * 1024, 300.0),
        SizeCheck("db_size_int", 1000),
        SqlThresholdCheck("overdue", "SELECT COUNT(*) FROM t", ">", 100.0, 60.0),
    ]
    n = cfg.notify
    assert n.min_interval == 600.0
    assert n.smtp == SmtpNotifier(
        host="mail.example.test", port=587, starttls=True, username="alerts",
        password="pw-from-env", sender="replicator@example.test",
        recipients=["dba@example.test", "oncall@example.test"], timeout=5.0,
    )
    assert n.webhooks == [
        WebhookNotifier("https://hooks.example.test/T0KEN",
                        {"Authorization": "Bearer x", "X-Retry": "3"}),
        WebhookNotifier("http://127.0.0.1:8080/hook"),
    ]
    assert n.channels == [n.smtp, *n.webhooks]
    assert "pw-from-env" not in repr(cfg)
    assert NotifyConfig().min_interval == DEFAULT_MIN_INTERVAL


def test_duplicate_check_names(tmp_path: Path) -> None:
    msg = load_error(tmp_path, one_db("""    health:
      size: [{name: a, max-bytes: 1}]
      sql: [{name: a, sql: x, fail-if: '> 1'}]
"""))
    assert msg == "dbs[0].health: duplicate check name 'a'"
    msg = load_error(tmp_path, one_db("""    health:
      integrity: {}
      size: [{name: integrity, max-bytes: 1}]
"""))
    assert msg == (
        "dbs[0].health: duplicate check name 'integrity' (reserved for the integrity check)"
    )


@pytest.mark.parametrize(
    ("value", "size"),
    [(1, 1), (1024, 1024), ("1GB", 10**9), ("500MiB", 500 << 20), ("64 KiB", 65536),
     ("1.5k", 1500), ("1000b", 1000), ("2tib", 2 << 40), ("10", 10)],
)
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [0, -1, "0GB", "1XB", "GB", "10i", True, None, [1], "nan"])
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ConfigError, match="^x: "):
        parse_size(value, "x")


def test_retention_per_destination_overrides_the_database_field_by_field(
    tmp_path: Path,
) -> None:
    from replicator.retention import RetentionPolicy

    cfg = load(tmp_path, """
dbs:
  - path: /data/app.db
    retention: 2d
    keep-daily: 7
    replicas:
      - {name: local, path: /backups/app}
      - {name: archive, path: /archive/app, keep-monthly: 12, keep-yearly: 3, keep_daily: 0}
      - {name: locked, path: /locked/app, retention: off}
      - {name: long, path: /long/app, retention: 30d}
""")
    db = cfg.dbs[0]
    local, archive, locked, long = (db.retention_policy(r) for r in db.replicas)
    assert local == RetentionPolicy(window=2 * 86400.0, keep_daily=7)
    assert archive == RetentionPolicy(window=2 * 86400.0, keep_monthly=12, keep_yearly=3)
    assert locked == RetentionPolicy() and not locked.active
    assert long == RetentionPolicy(window=30 * 86400.0, keep_daily=7)
    assert db.retention == 2 * 86400.0


@pytest.mark.parametrize(("extra", "message"), [
    ("    keep-daily: -1\n", "dbs[0].keep-daily: expected an integer >= 0"),
    ("    keep-weekly: many\n", "dbs[0].keep-weekly: expected an integer >= 0"),
    ("    keep-hourly: 3\n", "dbs[0].keep-hourly: unknown field"),
    ("    retention: 1h\n", "dbs[0].retention: must be at least snapshot-interval"),
])
def test_bad_retention_fields(tmp_path: Path, extra: str, message: str) -> None:
    assert load_error(tmp_path, one_db(extra)).startswith(message)


def test_bad_retention_field_of_a_destination(tmp_path: Path) -> None:
    msg = load_error(tmp_path, one_db(replicas="    replicas:\n"
                                       "      - {path: /b, keep-monthly: x}\n"))
    assert msg == "dbs[0].replicas[0].keep-monthly: expected an integer >= 0"


def test_sync_interval_per_destination(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
dbs:
  - path: /data/app.db
    replicas:
      - {name: local, path: /backups/app}
      - {name: s3, url: "s3://bucket/app", sync-interval: 1s}
      - {name: minio, type: s3, bucket: backups, sync_interval: 250ms}
  - dir: /data/tenants
    replicas:
      - {name: s3, url: "s3://bucket/tenants", sync-interval: 2s}
""")
    assert [r.sync_interval for r in cfg.dbs[0].replicas] == [0.0, 1.0, 0.25]
    assert [r.sync_interval for r in cfg.dirs[0].template.replicas] == [2.0]


@pytest.mark.parametrize(("replica", "message"), [
    ("{path: /b, sync-interval: soon}", "dbs[0].replicas[0].sync-interval: expected a duration"),
    ("{path: /b, sync-interval: -1}", "dbs[0].replicas[0].sync-interval: duration must not be"),
    ("{path: /b, sync-interval: 60s}", "dbs[0].replicas[0].sync-interval: 60s is not below "
                                       "ready-max-lag (60s): /readyz would fail between rounds"),
])
def test_bad_sync_interval(tmp_path: Path, replica: str, message: str) -> None:
    msg = load_error(tmp_path, one_db(replicas=f"    replicas:\n      - {replica}\n"))
    assert msg.startswith(message)
