"""The Prometheus alert rules: ``promtool check rules`` / ``test rules`` / ``check config`` pass,
every alert has a unit-test case where it fires and one where it does not, and the rules use only
metrics that ``replicator.metrics`` exposes.

Skipped when promtool is missing, except in CI (``CI`` set), where that is a failure.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from promutil import (
    ALERTS,
    ALERTS_TEST,
    EXPECTED_ALERTS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_METRICS,
    ROOT,
    exposed_metric_names,
    metric_names_in,
    run_promtool,
)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def alert_rules() -> list[dict[str, Any]]:
    groups = load(ALERTS)["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_example_config() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr
    config = load(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "replicator"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9090"]}]


def test_the_expected_alerts_are_defined_in_group_replicator() -> None:
    assert [g["name"] for g in load(ALERTS)["groups"]] == ["replicator"]
    assert {r["alert"] for r in alert_rules()} == EXPECTED_ALERTS


def test_every_alert_has_a_firing_and_a_quiet_test_case() -> None:
    tests = load(ALERTS_TEST)
    assert tests["rule_files"] == ["alerts.yml"]
    firing: dict[str, int] = defaultdict(int)
    quiet: dict[str, int] = defaultdict(int)
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            if t.get("exp_alerts"):
                firing[t["alertname"]] += 1
            else:
                quiet[t["alertname"]] += 1
    for name in {r["alert"] for r in alert_rules()}:
        assert firing[name] >= 1, f"{name}: no test case where it fires"
        assert quiet[name] >= 1, f"{name}: no test case where it does not fire"
    assert set(firing) | set(quiet) <= EXPECTED_ALERTS, "a test names an unknown alert"


def test_every_alert_has_severity_and_annotations() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        text = annotations["summary"] + annotations["description"]
        metrics = metric_names_in(rule["expr"])
        if metrics != PROMETHEUS_METRICS:
            assert "$labels.db" in text, f"{name}: annotations do not name the database"
        if any(m.startswith("replicator_replica_") for m in metrics):
            assert "$labels.replica" in text, f"{name}: annotations do not name the replica"


def test_alerts_use_only_exposed_metrics() -> None:
    exposed = exposed_metric_names() | PROMETHEUS_METRICS
    for rule in alert_rules():
        names = metric_names_in(rule["expr"])
        assert names, rule["alert"]
        assert names <= exposed, f"{rule['alert']}: unknown metric(s) {sorted(names - exposed)}"


@pytest.mark.parametrize("path", [ALERTS, ALERTS_TEST, PROMETHEUS_CONFIG])
def test_yaml_files_load(path: Path) -> None:
    assert load(path)
