"""Helpers for the deployment tests: the image's entrypoint, the validators (found or skipped,
never skipped in CI), and turning a container's command into the same command on this machine.

A command from a manifest runs here with the same arguments; only what a container has at fixed
paths is mapped: the image's ``replicator`` entrypoint and ``python3`` to this interpreter, and
the container paths (``/data``, ``/etc/replicator/replicator.yml``, ``/demo/app.py``) to the
test's temp files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DEMO_APP = DEPLOY / "compose" / "app.py"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
CONFIG_PATH = "/etc/replicator/replicator.yml"


def tool(name: str, package: str) -> str:
    """A validator's executable (from PATH or this interpreter's scripts directory); skipped
    when missing, except in CI, where that is a failure."""
    path = shutil.which(name)
    if path is None:
        candidate = Path(sysconfig.get_path("scripts")) / name
        if candidate.exists():
            path = str(candidate)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: pip install -e '.[test]' installs {package}")
        pytest.skip(f"{name} is missing (pip install {package})")
    return path


def run(*argv: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured."""
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env, check=False)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """A JSON exec-form argument list (``["a", "b"]``)."""
    value = yaml.safe_load(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def image_entrypoint() -> list[str]:
    """The image's ENTRYPOINT."""
    (args,) = [a for i, a in dockerfile_instructions() if i == "ENTRYPOINT"]
    return exec_form(args)


def image_cmd() -> list[str]:
    """The image's CMD."""
    (args,) = [a for i, a in dockerfile_instructions() if i == "CMD"]
    return exec_form(args)


def local_command(argv: list[str], paths: dict[str, str]) -> list[str]:
    """A container's argv as a command on this machine: ``replicator`` runs this clone's
    package, ``python3`` this interpreter; every argument equal to a key of ``paths``, or below
    it (``/data/app.db`` under ``/data``), is mapped to its value."""
    if argv[0] == "replicator":
        head = [sys.executable, "-m", "replicator"]
    elif argv[0] == "python3":
        head = [sys.executable]
    else:
        raise AssertionError(f"unexpected program in a container command: {argv[0]}")
    return head + [map_path(a, paths) for a in argv[1:]]


def map_path(arg: str, paths: dict[str, str]) -> str:
    """``arg`` with a container path prefix replaced by its local counterpart."""
    for src, dst in paths.items():
        if arg == src:
            return dst
        if arg.startswith(src.rstrip("/") + "/"):
            return dst + arg[len(src.rstrip("/")):]
    return arg


def localize_config(text: str, paths: dict[str, str], endpoint: str | None = None) -> str:
    """A replicator config from a manifest with its container paths mapped (``path`` of each
    database) and, if given, its S3 replicas pointed at ``endpoint``."""
    data: dict[str, Any] = yaml.safe_load(text)
    for db in data["dbs"]:
        db["path"] = map_path(db["path"], paths)
        for r in db["replicas"]:
            if isinstance(r, dict) and r.get("type") == "s3" and endpoint is not None:
                r["endpoint"] = endpoint
                r["force-path-style"] = True
            elif isinstance(r, dict) and "path" in r:
                r["path"] = map_path(r["path"], paths)
    return yaml.safe_dump(data, sort_keys=False)


def clone_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment minus ``AWS_*``, with this clone first on PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env
