"""deploy/compose: the file is valid against the Compose specification, everything it mounts or
builds exists, its Prometheus and Grafana files fit the services, and the replicator and demo
application services' commands run here with the same arguments against a real S3 (moto).

Not run here: the MinIO and bucket-creation commands (no MinIO on this machine; moto stands in
for the S3 endpoint), Prometheus and Grafana themselves (their files are checked instead).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deployutil import (
    CONFIG_PATH,
    DEMO_APP,
    DEPLOY,
    HEALTHCHECK,
    HEALTHCHECK_IN_IMAGE,
    ROOT,
    TEST_EXTRA,
    clone_env,
    image_entrypoint,
    image_healthcheck,
    local_command,
    localize_config,
    replicator_then_app,
    run,
    tool,
)
from obsutil import reaper
from promutil import run_promtool
from s3fixtures import S3_ENV_VARS, S3Server
from util import dump, free_port, wait_until

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "compose.yml"


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    s = compose()["services"][name]
    assert isinstance(s, dict)
    return s


def bind_mounts(svc: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host file of every bind mount (named volumes left out)."""
    out = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith((".", "/")):
            out[dst] = (COMPOSE_DIR / src).resolve()
    return out


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("check-jsonschema", TEST_EXTRA), "--builtin-schema",
               "vendor.compose-spec", str(path))


def test_compose_file_matches_the_compose_specification() -> None:
    r = check_compose(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_typo_fails_the_compose_check(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text(COMPOSE.read_text().replace("depends_on:", "depend_on:", 1))
    r = check_compose(bad)
    assert r.returncode != 0 and "depend_on" in r.stdout + r.stderr


def test_every_mounted_file_and_build_context_exists() -> None:
    services = compose()["services"]
    assert set(services) == {"minio", "create-bucket", "replicator", "app", "prometheus",
                             "grafana"}
    mounted = 0
    for name, svc in services.items():
        for dst, src in bind_mounts(svc).items():
            assert src.is_file(), f"{name}: {src} (mounted at {dst}) does not exist"
            mounted += 1
        if "build" in svc:
            ctx = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file()
    assert mounted == 7
    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
             if not v.startswith((".", "/"))}
    assert named == set(compose()["volumes"])


def test_app_and_replicator_share_the_database_volume() -> None:
    rep, app = service("replicator"), service("app")
    assert "app-data:/data" in rep["volumes"] and "app-data:/data" in app["volumes"]
    assert app["image"] == rep["image"]
    # the app starts once the replicator answers its health check (database restored or created)
    assert app["depends_on"]["replicator"]["condition"] == "service_healthy"
    assert rep["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    cfg = yaml.safe_load((COMPOSE_DIR / "replicator.yml").read_text())
    assert cfg["dbs"][0]["replicas"][0]["bucket"] in service("create-bucket")["command"][0]
    assert rep["environment"]["S3_ENDPOINT"] == "http://minio:9000"


def test_prometheus_gets_the_alert_rules_and_scrapes_the_replicator(tmp_path: Path) -> None:
    prom = service("prometheus")
    mounts = bind_mounts(prom)
    assert mounts["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "replicator"  # the alert rules expect up{job="replicator"}
    rep_cfg = yaml.safe_load((COMPOSE_DIR / "replicator.yml").read_text())
    port = rep_cfg["metrics-addr"].rpartition(":")[2]
    assert job["static_configs"][0]["targets"] == [f"replicator:{port}"]
    # promtool on the files as the container sees them
    etc = tmp_path / "etc"
    etc.mkdir()
    for dst, src in mounts.items():
        shutil.copy(src, etc / Path(dst).name)
    r = run_promtool("check", "config", str(etc / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    mounts = bind_mounts(service("grafana"))
    provider = yaml.safe_load(
        mounts["/etc/grafana/provisioning/dashboards/replicator.yml"].read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert mounts[f"{folder}/replicator.json"] == ROOT / "grafana" / "replicator.json"
    (ds,) = yaml.safe_load(
        mounts["/etc/grafana/provisioning/datasources/datasources.yml"].read_text())["datasources"]
    prom_port = service("prometheus")["ports"][0].rsplit(":", 1)[1]
    assert ds["url"] == f"http://prometheus:{prom_port}" and ds["isDefault"] is True
    env = service("grafana")["environment"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{folder}/replicator.json"


def test_the_services_commands_replicate_and_restore(
        tmp_path: Path, moto_server: S3Server) -> None:
    """The replicator and app services' commands (image entrypoints included), the replicator's
    health check, then the restore shown in the README."""
    rep_svc, app_svc = service("replicator"), service("app")
    cfg_src = bind_mounts(rep_svc)[CONFIG_PATH]
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(localize_config(cfg_src.read_text(), {"/data": str(data)}).replace(
        "0.0.0.0:9090", f"127.0.0.1:{port}"))
    client = moto_server.client()
    bucket = yaml.safe_load(cfg_src.read_text())["dbs"][0]["replicas"][0]["bucket"]
    client.create_bucket(Bucket=bucket)
    env = clone_env({**rep_svc["environment"], **S3_ENV_VARS,
                     "S3_ENDPOINT": moto_server.endpoint, "REPLICATOR_CONFIG": str(cfg)})
    paths = {"/data": str(data), CONFIG_PATH: str(cfg), "/demo/app.py": str(DEMO_APP)}
    healthcheck = local_command(image_healthcheck(), {HEALTHCHECK_IN_IMAGE: str(HEALTHCHECK)})
    try:
        replicator_then_app(
            local_command(image_entrypoint() + rep_svc["command"], paths),
            local_command(app_svc["entrypoint"] + app_svc["command"], paths), env,
            data / "app.db", tmp_path / "replicator.log",
            lambda: run(*healthcheck, env=env).returncode == 0)
        assert run(*healthcheck, env=env).returncode == 1
        service_name, readme_restore = readme_compose_exec()
        assert service_name == "replicator"
        r = run(*local_command(readme_restore, {**paths, "/tmp": str(tmp_path)}), env=env)
        assert r.returncode == 0, r.stderr
        want = dump(data / "app.db")
        assert dump(tmp_path / "restored.db") == want
        # the volume is lost: the replicator's next start restores the database
        shutil.rmtree(data)
        data.mkdir()
        with reaper() as procs, open(tmp_path / "again.log", "w") as log:
            again = procs.proc(subprocess.Popen(
                local_command(image_entrypoint() + rep_svc["command"], paths), env=env,
                cwd=ROOT, stdout=log, stderr=log, text=True))
            wait_until(lambda: run(*healthcheck, env=env).returncode == 0,
                       what="the replicator after a lost volume")
            assert dump(data / "app.db") == want
            again.terminate()
            assert again.wait(timeout=60) == 0
        assert "restored " in (tmp_path / "again.log").read_text()
    finally:
        moto_server.delete_bucket(bucket)


def readme_compose_exec() -> tuple[str, list[str]]:
    """The service and command of the README's `docker compose ... exec` line."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if "compose.yml exec " in ln]
    argv = shlex.split(line)
    i = argv.index("exec")
    return argv[i + 1], argv[i + 2:]


@pytest.mark.parametrize("svc", ["replicator", "app"])
def test_services_run_unprivileged(svc: str) -> None:
    s = service(svc)
    assert s["read_only"] is True and s["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in s["security_opt"]


def test_healthcheck_passes_without_metrics_addr(tmp_path: Path) -> None:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text("dbs:\n  - path: /nonexistent/app.db\n    replicas: [/nonexistent/r]\n")
    argv = local_command(image_healthcheck(), {HEALTHCHECK_IN_IMAGE: str(HEALTHCHECK)})
    r = run(*argv, env=clone_env({"REPLICATOR_CONFIG": str(cfg)}))
    assert r.returncode == 0, r.stderr
    cfg.write_text(f"metrics-addr: 127.0.0.1:{free_port()}\n" + cfg.read_text())
    r = run(*argv, env=clone_env({"REPLICATOR_CONFIG": str(cfg)}))
    assert r.returncode == 1 and "/healthz" in r.stderr
