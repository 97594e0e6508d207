"""Every command in the README's ``sh`` blocks is exercised: the ``replicator`` commands run here
against temp paths (the README's paths, times, txids and addresses replaced by real ones), and
each of the others is named in ``ELSEWHERE`` with the test or script that runs it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import util
from util import cli, commit, free_port, wait_until
from writer import init_db

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# command -> where it runs: "tests/FILE.py::TEST" or a script that contains it
ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate":
        "tests/test_readme.py::test_set_up_in_a_fresh_virtualenv",
    "pip install -e .": "tests/test_readme.py::test_set_up_in_a_fresh_virtualenv",
    "replicator replicate": "tests/test_cli_ux.py::test_demo_teaches_a_point_in_time_restore",
    "bash scripts/test.sh": ".ci/run",
    "ruff check replicator tests bench && mypy": ".ci/run",
    "replicator replicate /data/app.db /backups/app 's3://my-bucket/app?region=eu-west-1'":
        "tests/test_s3_e2e.py::test_replicate_restore_equals_source",
    # no container engine here: the Compose file is validated, and the commands of its
    # services (and the README's restore through `exec`) run as subprocesses
    "docker compose -f deploy/compose/compose.yml up --build":
        "tests/test_deploy_compose.py::test_the_services_commands_replicate_and_restore",
    "docker compose -f deploy/compose/compose.yml exec replicator    replicator restore "
    "--config /etc/replicator/replicator.yml -o /tmp/restored.db /data/app.db":
        "tests/test_deploy_compose.py::test_the_services_commands_replicate_and_restore",
    "docker compose -f deploy/compose/compose.yml rm -sf app replicator":
        "tests/test_deploy_compose.py::test_the_services_commands_replicate_and_restore",
    "docker volume rm replicator-demo_app-data":
        "tests/test_deploy_compose.py::test_the_services_commands_replicate_and_restore",
    "docker compose -f deploy/compose/compose.yml up -d":
        "tests/test_deploy_compose.py::test_the_services_commands_replicate_and_restore",
}


def readme_commands() -> list[str]:
    """The commands of every fenced ``sh`` block: comments and blank lines dropped,
    continuation lines joined."""
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.M | re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def runs_here(command: str) -> bool:
    return command.startswith("replicator ") and command not in ELSEWHERE


def test_every_command_is_exercised() -> None:
    commands = readme_commands()
    assert len(commands) >= 10
    missing = [c for c in commands if not runs_here(c) and c not in ELSEWHERE]
    assert not missing, f"README commands no test runs (add them to ELSEWHERE): {missing}"
    stale = [c for c in ELSEWHERE if c not in commands]
    assert not stale, f"ELSEWHERE lists commands the README no longer has: {stale}"
    for where in set(ELSEWHERE.values()):
        path, _, test = where.partition("::")
        text = (ROOT / path).read_text()
        if test:
            assert re.search(rf"^(async )?def {test}\(", text, re.M), where
        else:
            assert "scripts/test.sh" in text, where


def test_every_subcommand_is_documented() -> None:
    from replicator.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    text = README.read_text()
    assert sub.choices is not None
    for name in sub.choices:
        assert re.search(rf"replicator [^\n`]*\b{name}\b", text), name
    for flag in ("--log-level", "--log-format", "--version"):
        assert flag in text, flag


class Site:
    """The README's paths and values, made real under a temp directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "data" / "app.db"
        self.replica = root / "backups" / "app"
        self.out = root / "out" / "app.db"
        self.config = root / "etc" / "replicator.yml"
        self.addr = f"127.0.0.1:{free_port()}"
        for d in (self.db.parent, self.out.parent, self.config.parent):
            d.mkdir(parents=True)
        init_db(str(self.db))
        self.config.write_text(f"metrics-addr: {self.addr}\ndbs:\n  - path: {self.db}\n"
                               f"    replicas: [{self.replica}]\n")
        self.generation = ""
        self.txid = 0
        self.time = ""

    def learn(self) -> None:
        """A generation, a txid in it and a time inside its range, from ``generations``."""
        r = cli("generations", str(self.replica), "--json")
        assert r.returncode == 0, r.stderr
        gen = [g for g in json.loads(r.stdout) if g["restorable"]][-1]
        self.generation, self.txid, self.time = gen["generation"], gen["end_txid"], gen["end"]

    def args(self, command: str) -> list[str]:
        """The command's arguments with the README's values replaced."""
        paths = {"/data/app.db": self.db, "/backups/app": self.replica, "/tmp/app.db": self.out,
                 "/etc/replicator.yml": self.config}
        out = []
        words = shlex.split(command)[1:]
        for i, w in enumerate(words):
            prev = words[i - 1] if i else ""
            if w in paths:
                w = str(paths[w])
            elif prev == "--to-time":
                w = self.time
            elif prev == "--txid":
                w = str(self.txid)
            elif prev == "--generation":
                w = self.generation
            elif prev == "--addr":
                w = self.addr
            out.append(w)
        return out


def shipped(replica: Path) -> bool:
    """Whether the replica holds a transaction past its first snapshot."""
    r = cli("generations", str(replica), "--json")
    return r.returncode == 0 and any(g["end_txid"] >= 1 for g in json.loads(r.stdout))


def test_readme_commands_run(tmp_path: Path) -> None:
    site = Site(tmp_path)
    commands = [c for c in readme_commands() if runs_here(c)]
    replicate = [c for c in commands if " replicate " in f"{c} "]
    assert replicate, "the README shows how to replicate"
    logs = [tmp_path / f"replicate{i}.log" for i in range(len(replicate))]
    procs: list[util.ServerProcess] = []
    try:
        for c, log in zip(replicate, logs, strict=True):
            p = util.ServerProcess([sys.executable, "-m", "replicator", *site.args(c)], log)
            procs.append(p)
            p.wait_ready(lambda p=p: "replicating" in p.text(), 60,
                         f"{c} to start")
            commit(site.db)
            wait_until(lambda: shipped(site.replica), 60, what="a commit shipped")
        site.learn()
        for c in commands:
            if c in replicate:
                continue
            if site.out.exists():
                site.out.unlink()
            r = cli(*site.args(c), timeout=120)
            assert r.returncode == 0, (c, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr
    finally:
        codes = [p.stop(60) for p in procs]
    assert codes == [0] * len(procs), [log.read_text() for log in logs]
    for c, log in zip(replicate, logs, strict=True):
        if "--log-format json" in c:
            lines = log.read_text().splitlines()
            assert lines and all(json.loads(line)["message"] for line in lines), lines


@pytest.mark.slow
def test_set_up_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """The README's set-up, as written: a virtualenv, ``pip install -e .`` from the checkout
    (packages from the registry), then the installed ``replicator``."""
    env_dir = tmp_path / ".venv"
    venv.create(env_dir, with_pip=True)
    bin_dir = env_dir / "bin"
    env = {**util.env_without_aws(), "VIRTUAL_ENV": str(env_dir),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run(["pip", "install", "--quiet", "--disable-pip-version-check", "-e", "."],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["replicator", "--version"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("replicator "), r.stderr
    assert Path(sys.executable).resolve() != (bin_dir / "python").resolve()

