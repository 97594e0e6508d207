"""deploy/kubernetes: every manifest validated (kubernetes-validate, strict, pinned Kubernetes
versions; the Prometheus Operator resources against the models generated from its published
CRDs), the generated files up to date, the two StatefulSet forms in step, and the commands the
containers run, run here with the same arguments against a real S3 (moto)."""

from __future__ import annotations

import copy
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from crdschemas import SCHEMAS
from deployutil import (
    CONFIG_PATH,
    DEMO_APP,
    DEPLOY,
    ROOT,
    TEST_EXTRA,
    clone_env,
    local_command,
    localize_config,
    replicator_then_app,
    run,
    tool,
)
from obsutil import get
from s3fixtures import S3Server
from util import dump, free_port

from replicator.config import expand_env, parse_config, parse_duration

K8S = DEPLOY / "kubernetes"
# native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29
MIN_VERSION = "1.29.0"
# the classic form is for older clusters
CLASSIC_MIN_VERSION = "1.27.0"
CRDS = {"podmonitor.yaml", "prometheusrule.yaml"}
NOT_IN_KUSTOMIZATION = {"kustomization.yaml", "secret.example.yaml", "statefulset-classic.yaml"}
# docs/benchmarks.md: the replicator's largest peak RSS (VmHWM) in any phase, MiB
PEAK_RSS_MIB = 120


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((K8S / name).read_text())
    assert isinstance(doc, dict)
    return doc


def manifests() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def pod_spec(name: str = "statefulset.yaml") -> dict[str, Any]:
    spec = load(name)["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    return dict(c)


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def replicator_config() -> str:
    text = load("configmap.yaml")["data"]["replicator.yml"]
    assert isinstance(text, str)
    return text


def mebibytes(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert m, quantity
    return int(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


@pytest.mark.parametrize("version", [MIN_VERSION, "1.33.0"])
def test_manifests_validate_strictly(version: str) -> None:
    files = [f for f in manifests() if f not in CRDS]
    r = run(tool("kubernetes-validate", TEST_EXTRA), "--strict", "-k", version,
            *files, cwd=K8S)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = re.findall(r"^INFO (\S+) passed for resource", r.stdout + r.stderr, re.M)
    assert sorted(passed) == files, r.stdout + r.stderr


def test_classic_form_validates_on_older_clusters() -> None:
    r = run(tool("kubernetes-validate", TEST_EXTRA), "--strict", "-k",
            CLASSIC_MIN_VERSION, "statefulset-classic.yaml", cwd=K8S)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_typo_fails_strict_validation(tmp_path: Path) -> None:
    bad = tmp_path / "statefulset.yaml"
    bad.write_text((K8S / "statefulset.yaml").read_text().replace(
        "readOnlyRootFilesystem", "readOnlyRootFileSystem", 1))
    r = run(tool("kubernetes-validate", TEST_EXTRA), "--strict", "-k", MIN_VERSION,
            str(bad))
    assert r.returncode != 0 and "readOnlyRootFileSystem" in r.stdout + r.stderr


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Where ``doc`` breaks the schema of its kind (tests/crdschemas.py)."""
    validator = jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", sorted(CRDS))
def test_crd_resources_match_their_schema(name: str) -> None:
    assert crd_errors(load(name)) == []


def test_crd_check_catches_a_typo_and_a_bad_duration() -> None:
    doc = load("podmonitor.yaml")
    doc["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    assert crd_errors(doc)
    rule = load("prometheusrule.yaml")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "1 minute"
    assert crd_errors(rule)


def test_generated_files_are_up_to_date() -> None:
    r = run(sys.executable, "scripts/gen_kubernetes.py", "--check")
    assert r.returncode == 0, r.stderr
    rule = load("prometheusrule.yaml")
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert load("demo-app.yaml")["data"]["app.py"] == DEMO_APP.read_text()


def test_generated_files_drift_is_caught(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for rel in ("scripts/gen_kubernetes.py", "deploy/prometheus/alerts.yml",
                "deploy/compose/app.py", "deploy/kubernetes/prometheusrule.yaml",
                "deploy/kubernetes/demo-app.yaml"):
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text((ROOT / rel).read_text())
    alerts = repo / "deploy/prometheus/alerts.yml"
    alerts.write_text(alerts.read_text().replace("for: 2m", "for: 3m", 1))
    r = run(sys.executable, "scripts/gen_kubernetes.py", "--check", cwd=repo)
    assert r.returncode == 1 and "prometheusrule.yaml" in r.stderr


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "labels", "resources", "images"}
    assert sorted(kust["resources"]) == sorted(set(manifests()) - NOT_IN_KUSTOMIZATION)
    (image,) = kust["images"]
    used = {c["image"] for f in ("statefulset.yaml", "statefulset-classic.yaml")
            for c in all_containers(pod_spec(f))}
    assert used == {image["name"]}


def test_native_and_classic_forms_run_the_same_containers() -> None:
    native, classic = pod_spec("statefulset.yaml"), pod_spec("statefulset-classic.yaml")
    sidecar = container(native, "replicator")
    assert sidecar.pop("restartPolicy") == "Always"
    assert sidecar == container(classic, "replicator")
    assert [c["name"] for c in native["initContainers"]] == ["restore", "replicator"]
    assert [c["name"] for c in classic["initContainers"]] == ["restore"]
    assert [c["name"] for c in classic["containers"]] == ["replicator", "app"]
    n, c = copy.deepcopy(native), copy.deepcopy(classic)
    for spec in (n, c):
        spec.pop("initContainers")
        spec.pop("containers")
    assert n == c
    assert container(native, "restore") == container(classic, "restore")
    assert container(native, "app") == container(classic, "app")
    full_n, full_c = load("statefulset.yaml"), load("statefulset-classic.yaml")
    for doc in (full_n, full_c):
        doc["spec"]["template"]["spec"] = None
    assert full_n == full_c


@pytest.mark.parametrize("form", ["statefulset.yaml", "statefulset-classic.yaml"])
def test_security_context_and_resources(form: str) -> None:
    spec = pod_spec(form)
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["fsGroup"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in all_containers(spec):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert "memory" in c["resources"]["requests"] and "memory" in c["resources"]["limits"]
    for name in ("restore", "replicator"):
        res = container(spec, name)["resources"]
        assert mebibytes(res["requests"]["memory"]) >= PEAK_RSS_MIB, name
        assert mebibytes(res["limits"]["memory"]) >= 2 * PEAK_RSS_MIB, name


def test_probes_ports_and_monitoring_fit_together(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = pod_spec()
    side = container(spec, "replicator")
    (port,) = side["ports"]
    for var in ("REPLICATOR_BUCKET", "POD_NAME", "AWS_REGION"):
        monkeypatch.setenv(var, "x-" + var.lower().replace("_", "-"))
    cfg = parse_config(expand_env(yaml.safe_load(replicator_config()), ""))
    assert cfg.metrics_addr == f"0.0.0.0:{port['containerPort']}"
    assert side["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    pm = load("podmonitor.yaml")["spec"]
    assert pm["podMetricsEndpoints"][0]["port"] == port["name"]
    labels = load("statefulset.yaml")["spec"]["template"]["metadata"]["labels"]
    # the alert rules expect up{job="replicator"}
    assert labels[pm["jobLabel"]] == "replicator"
    assert pm["selector"]["matchLabels"].items() <= labels.items()
    # the application gets its shutdown, then the replicator its final sync
    assert spec["terminationGracePeriodSeconds"] > 2 * cfg.shutdown_timeout
    assert cfg.shutdown_timeout == parse_duration("10s", "")
    mounts = {m["name"]: m["mountPath"] for m in side["volumeMounts"]}
    assert CONFIG_PATH.startswith(mounts["config"] + "/")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == load("configmap.yaml")["metadata"]["name"]
    assert volumes["demo-app"]["configMap"]["name"] == load("demo-app.yaml")["metadata"]["name"]


def pod_env(c: dict[str, Any], s3: S3Server, bucket: str) -> dict[str, str]:
    """The container's environment as Kubernetes would set it, with the test's S3 identity."""
    from s3fixtures import S3_ENV_VARS

    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[e["name"]] = "app-0"
    env["REPLICATOR_BUCKET"] = bucket
    env.update(S3_ENV_VARS)
    return clone_env(env)


def test_the_pod_commands_restore_replicate_and_come_back(
        tmp_path: Path, moto_server: S3Server) -> None:
    """The pod's life with the manifests' own commands: a first start (nothing anywhere), the
    application writing, a stop in the native sidecar's order, then a new pod on an empty
    volume restoring everything from S3."""
    spec = pod_spec()
    restore_c, side, app = (container(spec, n) for n in ("restore", "replicator", "app"))
    bucket = moto_server.create_bucket()
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(localize_config(replicator_config(), {"/data": str(data)},
                                   moto_server.endpoint).replace("0.0.0.0:9090",
                                                                 f"127.0.0.1:{port}"))
    paths = {"/data": str(data), CONFIG_PATH: str(cfg), "/demo/app.py": str(DEMO_APP)}
    env = pod_env(side, moto_server, bucket)
    assert pod_env(restore_c, moto_server, bucket) == env

    def init_restore() -> subprocess.CompletedProcess[str]:
        return run(*local_command(["replicator", *restore_c["args"]], paths), env=env)

    r = init_restore()
    assert r.returncode == 0, r.stderr
    assert "nothing restored" in r.stdout and not (data / "app.db").exists()
    probe = side["startupProbe"]["httpGet"]["path"]
    ready = side["readinessProbe"]["httpGet"]["path"]

    def started() -> bool:
        return all(get(f"http://127.0.0.1:{port}{p}")[0] == 200 for p in (probe, ready))

    replicator_then_app(local_command(["replicator", *side["args"]], paths),
                        local_command(app["command"], paths), env, data / "app.db",
                        tmp_path / "sidecar.log", started)
    before = dump(data / "app.db")
    # a new pod: the volume is gone, the bucket is not
    shutil.rmtree(data)
    data.mkdir()
    r = init_restore()
    assert r.returncode == 0, r.stderr
    assert dump(data / "app.db") == before
    c = sqlite3.connect(data / "app.db")
    assert c.execute("SELECT body FROM events ORDER BY id DESC LIMIT 1").fetchone()[0] == "stopping"
    c.close()
    moto_server.delete_bucket(bucket)
