"""JSON schemas for the two Prometheus Operator resources of deploy/kubernetes.

No package on PyPI ships the operator's CRD schemas for offline use (the one that ships models
generated from them also installs a pytest plugin), so these are written by hand from the
published CRDs (monitoring.coreos.com/v1 PodMonitor and PrometheusRule, operator v0.82-v0.91):
the same types, required fields and duration pattern, for the fields our manifests use. Unlike
the CRDs they reject unknown fields: the API server would silently prune a misspelled one.
"""

from __future__ import annotations

from typing import Any

# the CRDs' pattern for a Prometheus duration (monitoringv1.Duration)
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
               r"(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                   "labels": STRING_MAP, "annotations": STRING_MAP},
    "required": ["name"],
    "additionalProperties": False,
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
    }


LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                               "values": {"type": "array", "items": {"type": "string"}}},
                "required": ["key", "operator"],
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}

POD_MONITOR = _resource("PodMonitor", {
    "type": "object",
    "properties": {
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {
            "type": "object",
            "properties": {"any": {"type": "boolean"},
                           "matchNames": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False,
        },
        "podMetricsEndpoints": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "port": {"type": "string"},
                    "path": {"type": "string"},
                    "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                    "interval": DURATION,
                    "scrapeTimeout": DURATION,
                    "honorLabels": {"type": "boolean"},
                },
                "additionalProperties": False,
            },
        },
    },
    "required": ["selector"],
    "additionalProperties": False,
})

RULE = {
    "type": "object",
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "for": DURATION,
        "keep_firing_for": {**DURATION, "minLength": 1},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "additionalProperties": False,
}

PROMETHEUS_RULE = _resource("PrometheusRule", {
    "type": "object",
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": DURATION,
                    "limit": {"type": "integer"},
                    "query_offset": DURATION,
                    "labels": STRING_MAP,
                    "rules": {"type": "array", "items": RULE},
                },
                "required": ["name"],
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
})

SCHEMAS = {"PodMonitor": POD_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
