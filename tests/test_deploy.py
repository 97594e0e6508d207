"""The image (Dockerfile) and the systemd unit: linted and verified with the real tools, and the
image's command run as PID 1 of a new PID namespace, as in a container."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deployutil import (
    CONFIG_PATH,
    DEPLOY,
    DOCKERFILE,
    ROOT,
    TEST_EXTRA,
    clone_env,
    dockerfile_instructions,
    image_cmd,
    image_entrypoint,
    local_command,
    run,
    tool,
)
from util import restore, seqs, wait_until
from writer import init_db

from replicator.cli import build_parser
from replicator.config import load_config

UNIT = DEPLOY / "systemd" / "replicator.service"
TEMPLATE = DEPLOY / "systemd" / "replicator@.service"
"""One service per config (``/etc/replicator/<instance>.yml``), otherwise the same."""
UNITS = pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=["service", "template"])
SHUTDOWN_TIMEOUT = 5.0


def test_example_config_is_valid() -> None:
    cfg = load_config(str(DEPLOY / "replicator.yml"))
    (db,) = cfg.dbs
    assert [r.name for r in db.replicas] == ["local", "s3"]
    assert cfg.metrics_addr == "127.0.0.1:9090"


def test_dockerfile_is_hadolint_clean() -> None:
    r = run(tool("hadolint", TEST_EXTRA), "--no-color", str(DOCKERFILE))
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_image_is_multi_stage_pinned_and_unprivileged() -> None:
    ins = dockerfile_instructions()
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", base), "pin the base image's version"
    build, runtime = stages()
    assert build[0] == ("FROM", "${PYTHON_IMAGE} AS build") and runtime[0][1] == "${PYTHON_IMAGE}"
    assert any(i == "RUN" and "pip wheel" in a for i, a in build)
    installs = [a for i, a in runtime if i == "RUN" and "pip install" in a]
    assert installs and all("--mount=type=bind,from=build" in a for a in installs)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert args["VERSION"] == version and "replicator==${VERSION}" in installs[0]
    # no compiler or wheel files in the runtime stage
    runtime_text = " ".join(a for _, a in runtime)
    for word in ("gcc", "build-essential", "apt-get install", "COPY --from"):
        assert word not in runtime_text
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert ("STOPSIGNAL", "SIGTERM") in runtime
    labels = " ".join(a for i, a in runtime if i == "LABEL")
    for key in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    (hc,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/usr/local/lib/replicator/healthcheck.py" in hc
    assert image_cmd() == ["replicate", "--config", CONFIG_PATH]


def test_dockerignore_keeps_what_the_build_copies() -> None:
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for i, a in dockerfile_instructions():
        if i == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert any(src == p or src.startswith(p + "/") for p in allowed), src
                assert (ROOT / src).exists(), src


def unshare_pid1() -> list[str]:
    """``unshare`` into a new PID namespace, or skip when this machine does not allow it."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.strip()}")
    return ["unshare", "--pid", "--fork", "--kill-child"]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def test_image_command_as_pid1_exits_on_sigterm_after_its_final_sync(tmp_path: Path) -> None:
    """PID 1 gets no default signal actions: SIGTERM must be handled. The last commit before
    the signal is in the replica once the process has exited, within shutdown-timeout."""
    prefix = unshare_pid1()
    db = tmp_path / "app.db"
    init_db(str(db))
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"shutdown-timeout: {SHUTDOWN_TIMEOUT}s\ndbs:\n  - path: {db}\n"
                   f"    replicas: [{tmp_path / 'replica'}]\n")
    argv = local_command(image_entrypoint() + image_cmd(), {CONFIG_PATH: str(cfg)})
    with open(tmp_path / "log", "w") as log:
        outer = subprocess.Popen(prefix + argv, cwd=ROOT, env=clone_env({}), stdout=log,
                                 stderr=log)
        try:
            wait_until(lambda: len(children(outer.pid)) == 1, what="the replicator")
            (pid,) = children(outer.pid)
            nspid = re.search(r"^NSpid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
            assert nspid is not None and nspid[1].split()[-1] == "1", "not PID 1"
            wait_until(lambda: (tmp_path / "replica" / "generations").exists(),
                       what="replication")
            c = sqlite3.connect(db)
            c.executemany("INSERT INTO log(seq, t_ns) VALUES (?, 0)", [(i,) for i in range(1, 51)])
            c.commit()
            c.close()
            os.kill(pid, signal.SIGTERM)
            assert outer.wait(timeout=SHUTDOWN_TIMEOUT + 5) == 0, (tmp_path / "log").read_text()
        finally:
            if outer.poll() is None:
                outer.kill()
                outer.wait()
    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    assert seqs(tmp_path / "out.db") == list(range(1, 51))


def unit_settings(unit: Path = UNIT) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@UNITS
def test_systemd_unit_is_hardened_without_breaking_sqlite(unit: Path) -> None:
    s = unit_settings(unit)
    for key, value in {"ProtectSystem": "strict", "PrivateTmp": "true", "NoNewPrivileges": "true",
                       "ProtectHome": "true", "KillSignal": "SIGTERM", "KillMode": "mixed",
                       "CapabilityBoundingSet": ""}.items():
        assert s[key] == [value], key
    assert "MemoryDenyWriteExecute" not in s
    # SQLite writes -wal, -shm and the spool beside the database: its directory and every local
    # replica of the example config must be writable
    writable = s["ReadWritePaths"][0].split()
    cfg = load_config(str(DEPLOY / "replicator.yml"))
    needed = [os.path.dirname(cfg.dbs[0].path)]
    needed += [r.url for r in cfg.dbs[0].replicas if r.url.startswith("/")]
    for path in needed:
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    timeout = float(s["TimeoutStopSec"][0])
    assert timeout > 2 * cfg.shutdown_timeout


@UNITS
def test_systemd_unit_command_is_the_cli(unit: Path) -> None:
    (exec_start,) = unit_settings(unit)["ExecStart"]
    argv = exec_start.split()
    assert argv[0] == "/usr/local/bin/replicator"
    args = build_parser().parse_args(argv[1:])
    config = "/etc/replicator/%i.yml" if unit == TEMPLATE else CONFIG_PATH
    assert (args.command, args.config) == ("replicate", config)


def test_systemd_template_differs_only_in_its_config() -> None:
    """The template is the service with a config per instance: every other setting the same
    (a hardening change made to one and not the other fails here)."""
    plain, template = unit_settings(UNIT), unit_settings(TEMPLATE)
    assert template.pop("ExecStart") == [plain.pop("ExecStart")[0].replace(
        CONFIG_PATH, "/etc/replicator/%i.yml")]
    assert template.pop("Description") == [plain.pop("Description")[0] + " (%i)"]
    assert template == plain


@UNITS
def test_systemd_analyze_verify(tmp_path: Path, unit: Path) -> None:
    """``systemd-analyze verify`` (with the ExecStart program pointed at one that exists here:
    it checks that the binary is executable); the template as an instance of it."""
    analyze = tool("systemd-analyze", "bash .ci/deploy-setup.sh installs it")
    text = unit.read_text()
    unit = tmp_path / ("replicator@tenants-a.service" if unit == TEMPLATE else unit.name)
    unit.write_text(text.replace("/usr/local/bin/replicator", sys.executable))
    r = run(analyze, "verify", str(unit))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    unit.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSytem="))
    r = run(analyze, "verify", str(unit))
    assert "Unknown key 'ProtectSytem'" in r.stderr
