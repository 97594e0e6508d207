"""Helpers for the Prometheus and Grafana tests: the dashboard, its PromQL, the alert rules, the
metric names the replicator exposes, and promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from replicator.metrics import create_metrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "replicator.json"
PROVISIONING = ROOT / "grafana" / "provisioning"

# Grafana's variables, replaced by something PromQL accepts
GRAFANA_VARS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${db}": ".*",
    "${replica}": ".*",
    "$db": ".*",
    "$replica": ".*",
}
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def family_sample_names() -> dict[str, set[str]]:
    """For each metric family ``create_metrics()`` declares, the sample names it exposes
    (counters ``_total``/``_created``, histograms ``_bucket``/``_count``/``_sum``, info
    ``_info``)."""
    return {
        family.name: {family.name + s for s in SAMPLE_SUFFIXES[family.type]}
        for family in create_metrics().registry.collect()
    }


def exposed_metric_names() -> set[str]:
    """Every sample name ``create_metrics()`` can expose."""
    return set().union(*family_sample_names().values())


def substitute_grafana_vars(expr: str) -> str:
    """``expr`` with Grafana's variables replaced by values PromQL accepts."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (function names and keywords excluded)."""
    text = _STRING.sub('""', substitute_grafana_vars(expr))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or aggregation
        if m.group().lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group())
    return names


def promtool() -> str:
    """The promtool binary; skipped when missing, unless running in CI (then it fails)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: run .ci/observability-setup.sh")
        pytest.skip("promtool is missing (install Debian's prometheus package)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args`` from the repository root."""
    return subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))  # panels inside collapsed rows
    return panels


def query_panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(load_dashboard()) if p["type"] != "row"]


def variables() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in load_dashboard()["templating"]["list"]}


PROM_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROM_DIR / "prometheus.yml"
# Prometheus' own series, not the replicator's
PROMETHEUS_METRICS = {"up"}
EXPECTED_ALERTS = {
    "ReplicatorDown", "ReplicationLagHigh", "ReplicaNoRecentSync", "SnapshotTooOld",
    "IntegrityCheckFailed", "HealthCheckFailing", "ReplicationErrorsRising",
    "WalGrowingUnbounded", "ReplicaDown", "RestoreDrillFailed", "RestoreDrillMissing",
}
