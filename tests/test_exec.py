"""``replicate --exec``: the application as a child of the real CLI, with real signals."""

from __future__ import annotations

import shlex
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deployutil import DEMO_APP, count_events
from obsutil import Reaper, reaper
from util import TESTS, Replicate, cli, dump, restore, wait_until
from writer import init_db

CHILD = str(TESTS / "exec_child.py")


def config(tmp_path: Path, shutdown_timeout: str = "10s", exec_cmd: str | None = None) -> Path:
    cfg = tmp_path / "replicator.yml"
    lines = [f"shutdown-timeout: {shutdown_timeout}"]
    if exec_cmd is not None:
        lines.append(f"exec: {exec_cmd!r}")
    lines += ["dbs:", f"  - path: {tmp_path / 'app.db'}",
              f"    replicas: [{tmp_path / 'replica'}]"]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def child(*args: str) -> str:
    return shlex.join([sys.executable, CHILD, *args])


@pytest.fixture
def procs() -> Iterator[Reaper]:
    """Replicators still running when a test ends are killed (their children follow)."""
    with reaper() as r:
        yield r


def signals_seen(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.mark.parametrize(("command", "code"), [
    ("true", 0),
    ("sh -c 'exit 3'", 3),
    ("sh -c 'kill -KILL $$'", 128 + signal.SIGKILL),
    ("sh -c 'kill -SEGV $$'", 128 + signal.SIGSEGV),
])
def test_exit_code_of_the_child_is_passed_through(tmp_path: Path, command: str, code: int) -> None:
    init_db(str(tmp_path / "app.db"))
    r = cli("replicate", str(tmp_path / "app.db"), str(tmp_path / "replica"), "--exec", command)
    assert r.returncode == code, r.stderr
    assert f"exited with code {code}" in r.stderr
    # replication ran before the child: the replica holds the database
    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    assert dump(tmp_path / "out.db") == dump(tmp_path / "app.db")


def test_sigterm_reaches_the_child_and_its_last_commit_is_in_the_replica(
        tmp_path: Path, procs: Reaper) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    app = shlex.join([sys.executable, str(DEMO_APP), str(db), "--interval", "0.02"])
    rep = procs.replicator(Replicate(str(db), str(tmp_path / "replica"), "--exec", app,
                                     log=tmp_path / "log"))

    wait_until(lambda: count_events(db) >= 10, what="the demo application's writes")
    assert rep.stop() == 0, rep.text()
    text = rep.text()
    # the child's final row was committed after the stop signal, then the final sync ran
    assert text.index("exited with code 0") < text.index(": final sync\n") < text.index(
        "INFO stopped")
    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    out = sqlite3.connect(tmp_path / "out.db")
    last = out.execute("SELECT body FROM events ORDER BY id DESC LIMIT 1").fetchone()[0]
    out.close()
    assert last == "stopping"
    assert dump(tmp_path / "out.db") == dump(db)


def test_other_signals_are_forwarded(tmp_path: Path, procs: Reaper) -> None:
    init_db(str(tmp_path / "app.db"))
    log = tmp_path / "signals"
    rep = procs.replicator(Replicate(str(tmp_path / "app.db"), str(tmp_path / "replica"),
                                     "--exec", child(str(log), "forward"), log=tmp_path / "log"))
    wait_until(lambda: "ready" in signals_seen(log), what="the child")
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        rep.proc.send_signal(sig)
        wait_until(lambda s=sig: s.name in signals_seen(log), what=f"{sig.name} at the child")
    assert rep.proc.poll() is None, "the replicator must not stop on HUP/USR1/USR2"
    assert rep.stop() == 0, rep.text()
    assert signals_seen(log) == ["ready", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTERM"]


def test_a_child_that_ignores_sigterm_is_killed_after_shutdown_timeout(
        tmp_path: Path, procs: Reaper) -> None:
    init_db(str(tmp_path / "app.db"))
    log = tmp_path / "signals"
    cfg = config(tmp_path, "1s", child(str(log), "ignore"))
    rep = procs.replicator(Replicate("--config", str(cfg), log=tmp_path / "log"))
    wait_until(lambda: "ready" in signals_seen(log), what="the child")
    assert rep.stop(timeout=30) == 128 + signal.SIGKILL, rep.text()
    assert "still running 1.0s after the stop signal: killing it" in rep.text()
    assert "final sync skipped" not in rep.text()


def test_a_second_sigterm_skips_the_final_sync(tmp_path: Path, procs: Reaper) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    log = tmp_path / "signals"
    rep = procs.replicator(Replicate(str(db), str(tmp_path / "replica"), "--exec",
                                     child(str(log), "slow", str(db)), log=tmp_path / "log"))
    wait_until(lambda: "ready" in signals_seen(log), what="the child")
    rep.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM" in signals_seen(log), what="the first SIGTERM at the child")
    rep.proc.send_signal(signal.SIGTERM)
    rep.proc.wait(timeout=60)
    assert rep.stop() == 5, rep.text()  # exited already: no third signal
    assert "skipping the final sync" in rep.text()
    assert signals_seen(log) == ["ready", "SIGTERM", "SIGTERM"]


def test_the_child_does_not_start_when_replication_cannot(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    # no database: replication cannot start
    r = cli("replicate", str(tmp_path / "app.db"), str(tmp_path / "replica"),
            "--exec", f"touch {marker}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("replicator: error: database ")
    assert not marker.exists()


@pytest.mark.parametrize(("flag", "where", "message"), [
    ("nosuch-program-xyz", "--exec", "command 'nosuch-program-xyz' not found"),
    ("", "--exec", "empty command"),
    ("'unterminated", "--exec", "No closing quotation"),
])
def test_a_bad_command_is_refused_before_anything_starts(
        tmp_path: Path, flag: str, where: str, message: str) -> None:
    init_db(str(tmp_path / "app.db"))
    r = cli("replicate", str(tmp_path / "app.db"), str(tmp_path / "replica"), "--exec", flag)
    assert r.returncode == 1
    assert r.stderr == f"replicator: error: {where}: {message}\n"
    assert not (tmp_path / "replica").exists()


def test_exec_from_the_config_file(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))
    r = cli("replicate", "--config", str(config(tmp_path, exec_cmd="sh -c 'exit 7'")))
    assert r.returncode == 7, r.stderr
    bad = config(tmp_path, exec_cmd="./not-there")
    r = cli("replicate", "--config", str(bad))
    assert r.stderr == "replicator: error: exec: command './not-there' not found\n"
