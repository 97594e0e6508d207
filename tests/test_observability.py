"""Observability through the real CLI: ``replicator replicate`` as a subprocess under a writer
process, scraped on ``/metrics``; ``/healthz``, ``/readyz`` and ``/status``; ``replicator status``;
health checks from the config file (a corrupted database fails its integrity check) and their
notifications by e-mail (aiosmtpd) and webhook (an HTTP receiver), all on loopback."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import util
from fakeservers import SMTP_PASSWORD, SMTP_USER, SmtpTestServer, WebhookTestServer
from obsutil import HEALTH_CHECKS, Reaper, get, reaper, scrape, total, value, values
from util import free_port
from writer import init_db

import replicator

WAIT = 60.0  # upper bound of every wait: generous, since only a hang should reach it
PASSWORD_VAR = "REPLICATOR_TEST_SMTP_PASSWORD"


@pytest.fixture
def procs() -> Iterator[Reaper]:
    with reaper() as r:
        yield r


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def ready(port: int) -> tuple[int, Any]:
    status, body = get(f"http://127.0.0.1:{port}/readyz")
    return status, json.loads(body) if body.startswith("{") else None


def status_json(*where: str) -> dict[str, Any]:
    r = util.cli("status", *where, "--json", timeout=30)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def by_name(items: list[dict[str, Any]], key: str = "name") -> dict[str, dict[str, Any]]:
    return {i[key]: i for i in items}


def make_corrupt_copy(tmp_path: Path) -> Path:
    """A WAL-mode database whose b-tree page in the middle is scribbled over: it opens and
    replicates, but ``PRAGMA integrity_check`` fails."""
    src = tmp_path / "source.db"
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE INDEX t_v ON t (v)")
    rows = [(f"{i:06d}" + "x" * 60,) for i in range(3000)]
    conn.executemany("INSERT INTO t (v) VALUES (?)", rows)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    leaf_page = conn.execute("PRAGMA page_count").fetchone()[0] // 2
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    copy = tmp_path / "corrupt.db"
    shutil.copy(src, copy)
    with open(copy, "r+b") as f:
        f.seek((leaf_page - 1) * page_size + 8)  # the cell pointer array of a b-tree page
        f.write(b"\xde\xad\xbe\xef" * 16)
    assert util.integrity(copy) != "ok"
    return copy


def test_metrics_readiness_and_status_under_load(tmp_path: Path, procs: Reaper) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    second = tmp_path / "second"
    cfg = write_config(tmp_path / "replicator.yml", f"""
dbs:
  - path: {db}
    name: app
    checkpoint-pages: 64
    ready-max-lag: 30s
    health:
{HEALTH_CHECKS}
    replicas:
      - {{name: local, path: {tmp_path / "local"}}}
      - {{name: second, path: {second}}}
""")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    rep = procs.replicator(util.Replicate("--config", str(cfg), "--metrics-addr", addr,
                                          log=tmp_path / "replicate.log"))
    util.wait_until(lambda: get(f"http://{addr}/healthz")[0] == 200, WAIT, what="/healthz 200")
    util.wait_until(lambda: ready(port)[0] == 200, WAIT, what="/readyz 200 once caught up")

    before = scrape(port)
    m = before
    rep_names = ("local", "second")
    dur = "replicator_replica_commit_to_durable_seconds_count"
    durable_before = sum(value(before, dur, db="app", replica=r) or 0.0 for r in rep_names)

    # a write load: watch the lag and the commit-to-durable histogram while it runs
    log = tmp_path / "commits.log"
    w = procs.proc(util.start_writer(db, log, "--duration", "4", "--rate", "300"))
    max_lag = 0.0
    while w.poll() is None:
        m = scrape(port)
        lags = values(m, "replicator_replica_lag_seconds", db="app").values()
        max_lag = max([max_lag, *lags])
    out, err = w.communicate()
    assert w.returncode == 0, err
    n = len(util.commit_log(log))
    assert n > 100

    def caught_up() -> bool:
        nonlocal m
        m = scrape(port)
        lags = values(m, "replicator_replica_lag_seconds", db="app")
        captured = value(m, "replicator_captured_frames_total", db="app")
        return len(lags) == 2 and all(v == 0 for v in lags.values()) and all(
            value(m, "replicator_replica_shipped_frames_total", db="app", replica=r) == captured
            for r in rep_names
        )

    try:
        util.wait_until(caught_up, WAIT, 0.2,
                        what="lag 0 and every captured frame shipped to both replicas")
    except AssertionError as exc:
        shown = ("replicator_replica_lag_seconds", "replicator_captured_frames_total",
                 "replicator_replica_shipped_frames_total")
        raise AssertionError(f"{exc}: {[(k, v) for k, v in m.items() if k[0] in shown]}") from None
    durable_after = sum(value(m, dur, db="app", replica=r) or 0.0 for r in rep_names)
    assert max_lag > 0 or durable_after > durable_before, "neither the lag nor the histogram moved"
    assert (value(m, "replicator_captured_frames_total", db="app") or 0) > 0
    # (a generation change under load puts transactions into a snapshot instead: not >= n)
    assert (value(m, "replicator_captured_transactions_total", db="app") or 0) > 0
    for r in rep_names:
        assert (value(m, "replicator_replica_shipped_transactions_total", db="app", replica=r)
                or 0) > 0
    assert (value(m, "replicator_db_size_bytes", db="app") or 0) > 0
    wal = value(m, "replicator_wal_size_bytes", db="app")
    assert wal and wal != value(before, "replicator_wal_size_bytes", db="app")
    assert value(m, "replicator_wal_frames", db="app") is not None
    assert (value(m, "replicator_checkpoints_total", db="app", mode="passive", result="ok")
            or 0) > 0, "64-page checkpoints under 4s of writes: none counted"
    assert (value(m, "replicator_capture_duration_seconds_count", db="app") or 0) > 0
    assert (value(m, "replicator_snapshots_total", db="app") or 0) >= 1
    assert (value(m, "replicator_snapshot_last_timestamp_seconds", db="app") or 0) > 0
    assert (value(m, "replicator_snapshot_size_bytes", db="app") or 0) > 0
    assert (value(m, "replicator_generation_changes_total", db="app", reason="no_position")
            == 1)
    for r in rep_names:
        assert value(m, "replicator_replica_up", db="app", replica=r) == 1
        assert (value(m, "replicator_replica_last_sync_timestamp_seconds", db="app", replica=r)
                or 0) > 0
        assert (value(m, "replicator_replica_shipped_bytes_total", db="app", replica=r)
                or 0) > 0
    [build] = values(m, "replicator_build_info")
    assert dict(build) == {"version": replicator.__version__,
                           "python": platform.python_version(),
                           "sqlite": sqlite3.sqlite_version}

    # the health checks (every second) see the final state
    def checks_done() -> bool:
        nonlocal m
        m = scrape(port)
        return (
            all(value(m, "replicator_health_check_ok", db="app", check=c) == 1
                for c in ("fresh", "size", "rows"))
            and value(m, "replicator_health_check_value", db="app", check="rows") == n
            # quick_check runs by default, at start
            and value(m, "replicator_integrity_check_ok", db="app") == 1
        )

    util.wait_until(checks_done, WAIT, 0.2, what="health checks fresh, size, rows passing")
    assert (value(m, "replicator_health_check_timestamp_seconds", db="app", check="size")
            or 0) > 0

    # status, for people and for scripts
    doc = status_json("--addr", addr)
    assert doc["ready"] is True and doc["version"] == replicator.__version__
    [d] = doc["dbs"]
    assert (d["name"], d["path"]) == ("app", str(db))
    assert d["txid"] > 0 and d["generation"]
    assert d["last_snapshot"]["time"] and d["last_capture"]
    reps = by_name(d["replicas"])
    assert set(reps) == set(rep_names)
    for rd in reps.values():
        assert rd["healthy"] and rd["error"] is None and rd["lag_seconds"] == 0
        assert (rd["generation"], rd["txid"]) == (d["generation"], d["txid"])
        assert rd["last_sync"]
    checks = by_name(d["health"], "check")
    assert set(checks) == {"fresh", "size", "rows"}
    assert all(c["ok"] for c in checks.values())
    assert checks["rows"]["kind"] == "sql" and checks["rows"]["value"] == n
    assert d["integrity"]["ok"] is True  # on by default
    text = util.cli("status", "--addr", addr, timeout=30)
    assert text.returncode == 0, text.stderr
    assert ": ready" in text.stdout.splitlines()[0]
    for word in ("app", "local", "second", "fresh", "size", "rows", d["generation"]):
        assert word in text.stdout

    # break the second replica: its directory becomes a regular file (moved away in one step:
    # the replicator may still be merging or linking into it)
    second.rename(tmp_path / "second-gone")
    second.write_text("not a directory any more\n")
    w = procs.proc(util.start_writer(db, log, "--count", "20", "--rate", "100"))
    w.communicate(timeout=60)
    assert w.returncode == 0
    util.wait_until(lambda: ready(port)[0] == 503, WAIT, what="/readyz 503 with a broken replica")
    code, body = ready(port)
    assert code == 503 and body["ready"] is False
    detail = by_name(body["replicas"], "replica")
    assert detail["local"]["healthy"] is True
    assert detail["second"]["healthy"] is False and detail["second"]["error"]
    m = scrape(port)
    assert value(m, "replicator_replica_up", db="app", replica="second") == 0
    assert total(m, "replicator_errors_total", db="app", replica="second") > 0
    assert value(m, "replicator_replica_up", db="app", replica="local") == 1
    doc = status_json("--addr", addr)
    reps = by_name(doc["dbs"][0]["replicas"])
    assert doc["ready"] is False
    assert reps["second"]["healthy"] is False and reps["second"]["error"]
    assert reps["local"]["healthy"] is True
    text = util.cli("status", "--addr", addr, timeout=30)
    assert "NOT READY" in text.stdout and "FAILING" in text.stdout

    assert rep.stop() == 0, rep.text()[-3000:]
    assert "Traceback" not in rep.text()
    gone = util.cli("status", "--addr", addr, timeout=30)
    assert gone.returncode == 1
    assert gone.stderr == (f"replicator: error: nothing is listening on {addr} (is `replicator "
                           f"replicate` running with metrics-addr {addr}?)\n")


def test_integrity_failure_and_notifications_from_the_config_file(
    tmp_path: Path, procs: Reaper
) -> None:
    app = tmp_path / "app.db"
    init_db(str(app))
    corrupt = make_corrupt_copy(tmp_path)
    port = free_port()
    with SmtpTestServer() as smtp, WebhookTestServer() as hook:
        cfg = write_config(tmp_path / "replicator.yml", f"""
metrics-addr: 127.0.0.1:{port}
notify:
  min-interval: 10m
  smtp:
    host: 127.0.0.1
    port: {smtp.port}
    username: {SMTP_USER}
    password: ${{{PASSWORD_VAR}}}
    from: replicator@example.test
    to: [dba@example.test]
    timeout: 5s
  webhooks:
    - url: {hook.url}
      headers: {{Authorization: Bearer test-token}}
      timeout: 5s
dbs:
  - path: {app}
    name: app
    health:
      integrity: {{interval: 1s}}
      sql:
        - {{name: rows, sql: "SELECT COUNT(*) FROM log", fail-if: "< 5", interval: 1s}}
    replicas:
      - {{name: local, path: {tmp_path / "app-replica"}}}
  - path: {corrupt}
    name: corrupt
    health:
      integrity: {{quick: false, interval: 1s}}
    replicas:
      - {{name: local, path: {tmp_path / "corrupt-replica"}}}
""")
        env = {**os.environ, PASSWORD_VAR: SMTP_PASSWORD}
        rep = procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "rep.log",
                                              env=env))

        def states() -> list[tuple[str, str, str]]:
            return [(p["db"], p["check"], p["state"]) for p in hook.payloads]

        def failing_seen() -> bool:
            m = scrape(port) if get(f"http://127.0.0.1:{port}/healthz")[0] == 200 else {}
            return (
                value(m, "replicator_integrity_check_ok", db="corrupt") == 0
                and value(m, "replicator_integrity_check_ok", db="app") == 1
                and value(m, "replicator_health_check_ok", db="app", check="rows") == 0
                and {("corrupt", "integrity", "failing"), ("app", "rows", "failing")}
                <= set(states())
            )

        util.wait_until(failing_seen, WAIT, 0.2,
                        what="integrity failing on corrupt, rows failing on app, both notified")

        # five commits make the "rows" check pass again: a recovery is sent
        w = procs.proc(util.start_writer(app, tmp_path / "c.log", "--count", "10"))
        w.communicate(timeout=60)
        assert w.returncode == 0
        util.wait_until(lambda: ("app", "rows", "recovered") in states(), WAIT, 0.2,
                        what="the recovery of rows notified")
        m = scrape(port)
        assert value(m, "replicator_health_check_ok", db="app", check="rows") == 1
        assert value(m, "replicator_integrity_check_ok", db="corrupt") == 0
        assert total(m, "replicator_errors_total", operation="notify") == 0

        got = states()
        assert got.index(("app", "rows", "failing")) < got.index(("app", "rows", "recovered"))
        # a persistent failure is notified once (min-interval 10m), not every second
        assert got.count(("corrupt", "integrity", "failing")) == 1
        assert all(h.get("Authorization") == "Bearer test-token" for _, h, _ in hook.requests)
        integrity_hook = next(p for p in hook.payloads
                              if p["db"] == "corrupt" and p["check"] == "integrity")
        assert "page" in integrity_hook["reason"].lower()
        # each database's first generation is announced, with its reason
        for name in ("app", "corrupt"):
            assert got.count((name, "generation", "notice")) == 1
        notice = next(p for p in hook.payloads if p["check"] == "generation")
        assert notice["reason"].startswith("new generation ") and "no_position" in notice["reason"]

        util.wait_until(lambda: len(smtp.messages) >= len(got), WAIT, what="every e-mail")
        subjects = [msg["Subject"] for _, _, msg in smtp.messages]
        assert any("FAILING: integrity on corrupt" in s for s in subjects), subjects
        assert any("RECOVERED: rows on app" in s for s in subjects), subjects
        assert any("NOTICE: generation on app" in s for s in subjects), subjects
        # delivered after AUTH with the password from ${REPLICATOR_TEST_SMTP_PASSWORD}
        assert all(rcpt == ["dba@example.test"] for _, rcpt, _ in smtp.messages)
        assert all(sender == "replicator@example.test" for sender, _, _ in smtp.messages)

        # status, from the config file's metrics-addr
        doc = status_json("--config", str(cfg))
        dbs = by_name(doc["dbs"])
        assert set(dbs) == {"app", "corrupt"}
        bad = dbs["corrupt"]["integrity"]
        assert bad["ok"] is False and bad["ran"] is True and "page" in bad["reason"].lower()
        assert dbs["app"]["integrity"]["ok"] is True
        assert by_name(dbs["app"]["health"], "check")["rows"]["ok"] is True
        assert [r["name"] for r in dbs["corrupt"]["replicas"]] == ["local"]
        text = util.cli("status", "--config", str(cfg), timeout=30)
        assert text.returncode == 0, text.stderr
        corrupt_block = text.stdout.split("\ncorrupt")[1]
        assert "integrity" in corrupt_block and "FAILING" in corrupt_block

        assert rep.stop() == 0, rep.text()[-3000:]
        log = rep.text()
        assert "Traceback" not in log
        assert SMTP_PASSWORD not in log


def test_status_errors_are_one_line(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    r = util.cli("status", "--addr", addr, timeout=30)
    assert r.returncode == 1
    assert r.stderr.startswith(f"replicator: error: nothing is listening on {addr} ")
    assert r.stderr.count("\n") == 1

    cfg = write_config(tmp_path / "r.yml", f"dbs:\n  - path: {tmp_path / 'a.db'}\n"
                                            f"    replicas: [{tmp_path / 'r'}]\n")
    r = util.cli("status", "--config", str(cfg), timeout=30)
    assert (r.returncode, r.stderr) == (
        1, f"replicator: error: {cfg} sets no metrics-addr: there is no status to ask\n")

    r = util.cli("status", "--addr", "nowhere", timeout=30)
    assert (r.returncode, r.stderr) == (
        1, "replicator: error: --addr: expected HOST:PORT, got 'nowhere'\n")

    r = util.cli("status", timeout=30)
    assert r.returncode == 2 and "one of the arguments -c/--config --addr is required" in r.stderr


def test_readiness_uses_each_databases_lag_limit(tmp_path: Path) -> None:
    from replicator.config import parse_config
    from replicator.replicator import Replicator
    from replicator.server import readiness

    cfg = parse_config({"dbs": [
        {"path": str(tmp_path / "a.db"), "name": "a", "ready-max-lag": "10s",
         "replicas": [str(tmp_path / "ra")]},
        {"path": str(tmp_path / "b.db"), "name": "b", "replicas": [str(tmp_path / "rb")]},
    ]})
    rep = Replicator(cfg)
    [ra], [rb] = (s.replicas for s in rep.services)
    assert readiness(rep)[0] is False  # nothing initialised yet
    ra.healthy = rb.healthy = True
    ra.lag, rb.lag = 9.5, 59.0  # b has the default limit, 60s
    assert readiness(rep)[0] is True
    ra.lag = 10.5
    ok, detail = readiness(rep)
    assert ok is False
    assert [(d["db"], d["lag_seconds"], d["max_lag_seconds"]) for d in detail] == [
        ("a", 10.5, 10.0), ("b", 59.0, 60.0)]
