"""``cpus``: the CPUs ``replicate`` runs on. The parser, and the real CLI confining every one of
its threads (read back from ``/proc``) while it replicates a real writer's commits."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest
import util
from test_cli_errors import fails
from writer import init_db

from replicator import __version__
from replicator.affinity import describe, parse_cpus, resolve
from replicator.config import parse_config
from replicator.errors import ConfigError

MINE = sorted(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "want"),
    [("all", "all"), ("ONE", "one"), (" one ", "one"), (3, (3,)), ("3", (3,)),
     ("0,2", (0, 2)), ("2-4", (2, 3, 4)), ("4-5,1", (1, 4, 5)), ([2, "0-1"], (0, 1, 2)),
     ("1,1", (1,))],
)
def test_parse_cpus(value: object, want: object) -> None:
    assert parse_cpus(value) == want


@pytest.mark.parametrize("value", ["", "some", "-1", "1-", "a-b", "1,,2", True, -2, 1.5,
                                   {"cpu": 1}, [], [True], ["x"]])
def test_parse_cpus_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^cpus: expected all, one or CPU numbers"):
        parse_cpus(value)


def test_parse_cpus_backwards_range() -> None:
    with pytest.raises(ConfigError, match=r"^cpus: range 3-1 ends before it starts$"):
        parse_cpus("3-1")


def test_resolve() -> None:
    assert resolve("all") is None
    assert resolve("one") == {MINE[-1]}
    assert resolve((MINE[0],)) == {MINE[0]}
    with pytest.raises(ConfigError, match=r"^--cpus: CPU 4096 is not one this process may run on "
                       r"\(it may use [0-9,-]+\)$"):
        resolve((4096,), "--cpus")
    assert describe({1}) == "CPU 1"
    assert describe({0, 1, 2, 5}) == "CPUs 0-2,5"
    assert describe(None) == "any CPU"


def test_config_key() -> None:
    one_db = {"dbs": [{"path": "/data/a.db", "replicas": ["/backup/a"]}]}
    assert parse_config(one_db).cpus == "all"
    assert parse_config({**one_db, "cpus": "0-1"}).cpus == (0, 1)
    with pytest.raises(ConfigError, match="^cpus: expected all, one"):
        parse_config({**one_db, "cpus": "fast"})


def _cpus_of_threads(pid: int) -> dict[str, str]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            name = (task / "comm").read_text().strip()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        line = next(ln for ln in status.splitlines() if ln.startswith("Cpus_allowed_list:"))
        out[f"{name}/{task.name}"] = line.split(":", 1)[1].strip()
    return out


@pytest.mark.parametrize("how", ["flag", "config"])
def test_replicate_on_one_cpu(tmp_path: Path, how: str) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    dest = tmp_path / "replica"
    want = str(MINE[-1]) if how == "flag" else str(MINE[0])
    if how == "flag":
        args = ["--cpus", "one", str(db), str(dest)]
    else:
        cfg = tmp_path / "replicator.yml"
        cfg.write_text(f"cpus: {MINE[0]}\ndbs:\n  - path: {db}\n    replicas: [{dest}]\n")
        args = ["--config", str(cfg)]
    addr = f"127.0.0.1:{util.free_port()}"
    rep = util.Replicate(*args, "--metrics-addr", addr, log=tmp_path / "rep.log")
    try:
        util.wait_for_snapshot(dest)
        seqs = util.commit(db, 50, payload=300)
        # the workers start as commits need them: every thread there is now, on that CPU
        threads = _cpus_of_threads(rep.proc.pid)
        assert len(threads) > 3, threads
        assert set(threads.values()) == {want}, threads
        assert f"running on CPU {want} (cpus: {'one' if how == 'flag' else want})" in rep.text()
        doc = json.loads(util.cli("status", "--addr", addr, "--json").stdout)
        assert doc["cpus"] == [int(want)]
        text = util.cli("status", "--addr", addr).stdout
        assert text.splitlines()[0].startswith(f"replicator {__version__}, started ")
        assert f", on CPU {want}: " in text.splitlines()[0]
    finally:
        assert rep.stop() == 0, rep.text()
    assert "Traceback" not in rep.text()
    out = tmp_path / "restored.db"
    util.restore(str(dest), out)
    assert util.seqs(out)[-50:] == seqs
    assert util.dump(out) == util.dump(db)


def test_cpus_not_allowed_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    before = util.tree(tmp_path)
    line = fails("replicate", "--cpus", "4096", str(db), str(tmp_path / "rep"))
    assert "--cpus: CPU 4096 is not one this process may run on" in line
    assert util.tree(tmp_path) == before
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"cpus: [fast]\ndbs:\n  - path: {db}\n    replicas: [{tmp_path / 'rep'}]\n")
    before = util.tree(tmp_path)
    assert "cpus: expected all, one or CPU numbers" in fails("replicate", "-c", str(cfg))
    assert util.tree(tmp_path) == before


@pytest.mark.skipif(len(MINE) < 2, reason="needs 2 CPUs to tell confined from not")
def test_exec_child_gets_every_cpu(tmp_path: Path) -> None:
    """The application that ``exec`` starts is not confined with the replicator."""
    db = tmp_path / "app.db"
    init_db(str(db))
    probe = tmp_path / "child_cpus.txt"
    script = (f"import os; open({str(probe)!r}, 'w').write("
              "','.join(map(str, sorted(os.sched_getaffinity(0)))))")
    cmd = f"{sys.executable} -c {shlex.quote(script)}"
    r = util.cli("replicate", "--cpus", "one", str(db), str(tmp_path / "replica"), "--exec", cmd)
    assert r.returncode == 0, r.stderr
    assert f"running on CPU {MINE[-1]} (cpus: one)" in r.stderr
    assert probe.read_text() == ",".join(map(str, MINE))
