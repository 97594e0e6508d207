"""The dashboard and the alert rules against a real Prometheus scraping a real replicator.

``replicator replicate`` runs under a small write load with health checks, restore drills every
few seconds, ``PRAGMA optimize`` every few seconds and one broken replica (so error series and
failed drills exist); ``/usr/bin/prometheus`` (bound to 127.0.0.1, storage in a temp dir)
scrapes it every second with ``deploy/prometheus/alerts.yml`` loaded. Then every query of every
panel of ``grafana/replicator.json`` (template variables substituted) must succeed with a
non-empty result, and every rule must evaluate without error.

Skipped when prometheus is missing, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import util
import yaml
from obsutil import HEALTH_CHECKS, Reaper, get, reaper
from promutil import ALERTS, EXPECTED_ALERTS, query_panels, variables
from util import free_port
from writer import init_db

PROMETHEUS = "/usr/bin/prometheus"
WAIT = 90.0
MIN_SCRAPES = 5
# Grafana's interval variables, as Grafana would fill them in for a short time range
INTERVALS = {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "5m"}
DB = "app"
GOOD_REPLICA = "local"
BROKEN_REPLICA = "broken"


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or (PROMETHEUS if os.access(PROMETHEUS, os.X_OK) else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is missing: run .ci/observability-setup.sh")
        pytest.skip("prometheus is missing (install Debian's prometheus package)")
    return path


class Prometheus:
    """A Prometheus server on 127.0.0.1 scraping one target every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "replicator", "static_configs": [{"targets": [target]}]},
            ],
        }))
        self.server = util.ServerProcess(
            [prometheus_binary(), f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            tmp / "prometheus.log",
        )

    def stop(self) -> None:
        """Stop and reap."""
        self.server.stop(15)

    def wait_ready(self) -> None:
        self.server.wait_ready(lambda: get(f"{self.url}/-/ready")[0] == 200, WAIT,
                               "prometheus /-/ready")

    def tail(self) -> str:
        return self.server.text()[-3000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = get(url)
        assert status in (200, 400, 422), f"{url}: HTTP {status}"
        doc = json.loads(body)
        assert doc["status"] == "success", f"{path} {params}: {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result = data["result"]
        assert isinstance(result, list), (expr, data)
        return result


@contextlib.contextmanager
def running_prometheus(tmp: Path, target: str) -> Iterator[Prometheus]:
    """Prometheus for the duration of the block, never left running."""
    prom = Prometheus(tmp, target)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


@pytest.fixture
def procs() -> Iterator[Reaper]:
    with reaper() as r:
        yield r


def substitute(expr: str, db: str, replica: str) -> str:
    for var, val in INTERVALS.items():
        expr = expr.replace(var, val)
    for name, val in (("db", db), ("replica", replica)):
        expr = expr.replace(f"${{{name}}}", val).replace(f"${name}", val)
    assert "$" not in expr, f"an unknown template variable is left in {expr!r}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    out = [(p["title"], t["expr"]) for p in query_panels() for t in p["targets"]]
    assert len(out) >= 20
    return out


def start_replicator(tmp_path: Path, procs: Reaper) -> str:
    db = tmp_path / "app.db"
    init_db(str(db))
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where a replica directory should be\n")
    port = free_port()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"""
metrics-addr: 127.0.0.1:{port}
dbs:
  - path: {db}
    name: {DB}
    checkpoint-pages: 32
    snapshot-interval: 3s
    health:
      integrity: {{interval: 2s}}
{HEALTH_CHECKS}
    verify: {{interval: 5s, timeout: 3s}}
    maintenance: {{optimize: 2s}}
    replicas:
      - {{name: {GOOD_REPLICA}, path: {tmp_path / "replica"}}}
      - {{name: {BROKEN_REPLICA}, path: {blocker / "replica"}}}
""")
    procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "replicate.log"))
    util.wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, WAIT,
                    what="the replicator's /healthz")
    procs.proc(util.start_writer(db, tmp_path / "commits.log", "--duration", "300",
                                 "--rate", "50"))
    return f"127.0.0.1:{port}"


def test_every_dashboard_query_and_rule_works_on_real_prometheus(
    tmp_path: Path, procs: Reaper
) -> None:
    prometheus_binary()
    target = start_replicator(tmp_path, procs)
    with running_prometheus(tmp_path, target) as prom:
        def scraped() -> bool:
            res = prom.query(f'count_over_time(up{{job="replicator"}}[1m]) >= {MIN_SCRAPES}')
            return bool(res) and prom.query('up{job="replicator"}')[0]["value"][1] == "1"

        util.wait_until(scraped, WAIT, 0.5, what=f"{MIN_SCRAPES} successful scrapes")

        # every panel, with All (.*) and with real label values, until each has data
        queries = [
            (title, substitute(expr, db, replica))
            for title, expr in dashboard_queries()
            for db, replica in ((".*", ".*"), (DB, GOOD_REPLICA))
        ]
        empty: list[str] = []

        def all_have_data() -> bool:
            empty[:] = [f"{title}: {q}" for title, q in queries if not prom.query(q)]
            return not empty

        try:
            util.wait_until(all_have_data, WAIT, 1.0, what="data for every panel query")
        except AssertionError:
            raise AssertionError("panel queries with no data:\n" + "\n".join(empty)) from None

        # the template variables' own queries find the labels
        for name, var in variables().items():
            if var["type"] != "query":
                continue
            selector, label = var["definition"][len("label_values("):-1].rsplit(",", 1)
            found = {s["metric"].get(label.strip())
                     for s in prom.query(substitute(selector, ".*", ".*"))}
            want = {DB} if name == "db" else {GOOD_REPLICA, BROKEN_REPLICA}
            assert want <= found, f"variable {name}: {found}"

        # drills have an outcome per destination: the good one proven, the broken one failed
        def drill_ok(replica: str) -> list[str]:
            return [r["value"][1] for r in prom.query(
                f'replicator_verify_ok{{db="{DB}", replica="{replica}"}}')]

        util.wait_until(lambda: drill_ok(GOOD_REPLICA) == ["1"], WAIT, 0.5,
                        what="a proven drill of the good replica")
        assert drill_ok(BROKEN_REPLICA) == ["0"]

        # the error series the broken replica produces are there, per operation
        errors = prom.query(f'replicator_errors_total{{replica="{BROKEN_REPLICA}"}}')
        assert errors and all(float(e["value"][1]) > 0 for e in errors)

        # every alert rule loaded and evaluates without error
        def evaluated() -> list[dict[str, Any]]:
            groups = prom.api("rules")["groups"]
            return [r for g in groups for r in g["rules"]]

        util.wait_until(lambda: all(r["health"] != "unknown" for r in evaluated()), WAIT, 0.5,
                        what="every rule evaluated once")
        rules = evaluated()
        assert {r["name"] for r in rules if r["type"] == "alerting"} == EXPECTED_ALERTS
        bad = [(r["name"], r["health"], r.get("lastError")) for r in rules
               if r["health"] != "ok" or r.get("lastError")]
        assert not bad, f"rules with evaluation errors: {bad}"

        # ReplicaDown sees the broken replica (pending: it must last 2m to fire)
        def replica_down_pending() -> bool:
            alerts = prom.api("alerts")["alerts"]
            return any(a["labels"].get("alertname") == "ReplicaDown"
                       and a["labels"].get("replica") == BROKEN_REPLICA for a in alerts)

        util.wait_until(replica_down_pending, WAIT, 0.5,
                        what="ReplicaDown pending for the broken replica")
        assert prom.server.running, prom.tail()
    assert not prom.server.running, "prometheus still running"
