"""Generate the Kubernetes files that copy another file of this repository, so each has one
source of truth:

    deploy/kubernetes/prometheusrule.yaml  <- deploy/prometheus/alerts.yml (the alert rules)
    deploy/kubernetes/demo-app.yaml        <- deploy/compose/app.py (the demo application)

    python3 scripts/gen_kubernetes.py          # rewrite them
    python3 scripts/gen_kubernetes.py --check  # exit 1 if either is out of date (tests run this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DEMO_APP = ROOT / "deploy" / "compose" / "app.py"
OUT = ROOT / "deploy" / "kubernetes"
LABELS = {"app.kubernetes.io/name": "app", "app.kubernetes.io/component": "replicator"}


class _Dumper(yaml.SafeDumper):
    """Block style, keys in source order, multi-line strings as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _header(source: Path, extra: str = "") -> str:
    rel = source.relative_to(ROOT)
    return (f"# Generated from {rel} by scripts/gen_kubernetes.py:\n"
            f"# edit that file and re-run the script (tests fail when this one is out of date).\n"
            f"{extra}")


def _dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


def prometheus_rule() -> str:
    """The PrometheusRule holding the groups of alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "replicator", "labels": dict(LABELS)},
        "spec": {"groups": groups},
    }
    extra = ("# Add the labels your Prometheus' ruleSelector asks for\n"
             "# (kube-prometheus-stack: release: <its release name>).\n")
    return _header(ALERTS, extra) + _dump(doc)


def demo_app() -> str:
    """The ConfigMap holding the demo application, mounted at /demo in the app container."""
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "demo-app", "labels": {"app.kubernetes.io/name": "app"}},
        "data": {"app.py": DEMO_APP.read_text()},
    }
    return _header(DEMO_APP) + _dump(doc)


GENERATED = {"prometheusrule.yaml": prometheus_rule, "demo-app.yaml": demo_app}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = p.parse_args()
    stale = []
    for name, make in GENERATED.items():
        path = OUT / name
        text = make()
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        names = ", ".join(str(s) for s in stale)
        print(f"out of date: {names}; run python3 scripts/gen_kubernetes.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
