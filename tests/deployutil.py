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
import sqlite3
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from obsutil import reaper
from util import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DEMO_APP = DEPLOY / "compose" / "app.py"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
CONFIG_PATH = "/etc/replicator/replicator.yml"
TEST_EXTRA = "pip install -e '.[test]' installs it"
HEALTHCHECK_IN_IMAGE = "/usr/local/lib/replicator/healthcheck.py"


def tool(name: str, install: str) -> str:
    """A validator's executable (from PATH or this interpreter's scripts directory); skipped
    when missing, except in CI, where that is a failure."""
    path = shutil.which(name)
    if path is None:
        candidate = Path(sysconfig.get_path("scripts")) / name
        if candidate.exists():
            path = str(candidate)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {install}")
        pytest.skip(f"{name} is missing: {install}")
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


def image_healthcheck() -> list[str]:
    """The image's HEALTHCHECK command."""
    (args,) = [a for i, a in dockerfile_instructions() if i == "HEALTHCHECK"]
    return exec_form(args.split(" CMD ", 1)[1])


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


def count_events(db: Path) -> int:
    """Rows the demo application (deploy/compose/app.py) has written to ``db`` (0 before it
    created its table)."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(c.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        c.close()


def replicator_then_app(rep_argv: list[str], app_argv: list[str], env: dict[str, str],
                        db: Path, log: Path, started: Callable[[], bool]) -> None:
    """Start the replicator, wait until ``started()``, run the demo application until it has
    written a few rows to ``db``, then stop the application and after it the replicator (the
    order of a native sidecar and of `docker compose down`); both must exit 0."""
    with reaper() as procs, open(log, "w") as out:
        rep = procs.proc(subprocess.Popen(rep_argv, env=env, cwd=ROOT, stdout=out, stderr=out,
                                          text=True))
        wait_until(started, what="the replicator to start")
        app = procs.proc(subprocess.Popen(app_argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        wait_until(lambda: count_events(db) >= 3, timeout=60, what="the application's writes")
        app.terminate()
        assert app.wait(timeout=30) == 0
        rep.terminate()
        assert rep.wait(timeout=60) == 0, log.read_text()
