"""Static checks of the Grafana dashboard: it loads, every panel has queries, every query is
valid PromQL (``promtool check rules`` on them as recording rules) and names only metrics that
``replicator.metrics`` exposes, and the ``db``/``replica`` variables exist.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from promutil import (
    PROVISIONING,
    all_panels,
    exposed_metric_names,
    family_sample_names,
    load_dashboard,
    metric_names_in,
    query_panels,
    run_promtool,
    substitute_grafana_vars,
    variables,
)


def test_dashboard_identity() -> None:
    d = load_dashboard()
    assert d["uid"] == "replicator"
    assert d["title"] == "Replicator"
    assert 36 <= d["schemaVersion"] <= 41
    assert d["id"] is None  # provisioning assigns it
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in all_panels(d):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, p["title"]


def test_every_panel_has_targets_on_the_datasource_variable() -> None:
    panels = query_panels()
    assert len(panels) >= 20
    for p in panels:
        assert p["targets"], f"panel {p['title']!r} has no targets"
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p.get("description"), f"panel {p['title']!r} has no description"
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]


def test_every_metric_in_every_query_is_exposed() -> None:
    exposed = exposed_metric_names()
    for p in query_panels():
        for t in p["targets"]:
            names = metric_names_in(t["expr"])
            assert names, f"{p['title']!r}: no metric in {t['expr']!r}"
            unknown = names - exposed
            assert not unknown, f"{p['title']!r}: unknown metric(s) {sorted(unknown)}"


def test_the_dashboard_covers_every_metric_family() -> None:
    used: set[str] = set()
    for p in query_panels():
        for t in p["targets"]:
            used |= metric_names_in(t["expr"])
    for family, names in family_sample_names().items():
        assert names & used, f"metric family {family} is on no panel"


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for p in query_panels():
        for t in p["targets"]:
            rules.append(
                {"record": f"dashboard:panel_{p['id']}_{t['refId']}",
                 "expr": substitute_grafana_vars(t["expr"])}
            )
    for name, v in variables().items():
        if v["type"] == "query":
            selector = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert selector, f"variable {name}: expected label_values(selector, label)"
            rules.append({"record": f"dashboard:var_{name}",
                          "expr": substitute_grafana_vars(selector[1])})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_variables_db_and_replica() -> None:
    v = variables()
    ds = v["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    exposed = exposed_metric_names()
    for name in ("db", "replica"):
        var = v[name]
        assert var["type"] == "query"
        assert var["multi"] is True and var["includeAll"] is True
        assert var["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["definition"])
        assert m and m[2] == name
        assert metric_names_in(m[1]) <= exposed
        assert var["query"]["query"] == var["definition"]
    # panels filter by the variables
    exprs = [t["expr"] for p in query_panels() for t in p["targets"]]
    assert any('db=~"$db"' in e for e in exprs)
    assert any('replica=~"$replica"' in e for e in exprs)


def test_provisioning_files() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    dash = yaml.safe_load((PROVISIONING / "dashboards" / "replicator.yml").read_text())
    assert dash["apiVersion"] == 1
    [provider] = dash["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('rate(replicator_errors_total{db=~"$db"}[$__rate_interval])', {"replicator_errors_total"}),
        ("histogram_quantile(0.99, sum by (db, le) (rate(x_bucket[5m])))", {"x_bucket"}),
        ("time() - a_seconds > 26 * 3600", {"a_seconds"}),
        ("(a > 1) and on(db) b or c offset 5m", {"a", "b", "c"}),
        ('up{job="and"} == 0', {"up"}),
        ("deriv(w[30m]) > 0 and w > 64 * 1024", {"w"}),
    ],
)
def test_metric_names_in(expr: str, names: set[str]) -> None:
    assert metric_names_in(expr) == names
