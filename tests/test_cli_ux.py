"""What a newcomer meets, through the real CLI as a subprocess: a restore stopped or killed leaves
nothing behind, progress on a terminal only, no secret in any output, quiet pipes, ``--version``,
usage without arguments, suggestions for misspelt config fields, log lines that say what
happened (JSON too), and a demo that leads to a point-in-time restore."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from util import Replicate, cli, free_port, wait_until
from writer import init_db

from replicator.db import Database
from replicator.fsutil import lock_owned, remove_stale_temps, temp_path
from replicator.spool import Spool

SECRET = "Sup3rS3cretValue"
ROOT = Path(__file__).resolve().parent.parent
# the CLI of this checkout, from any working directory
HERE_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def big_replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file replica of a 48 MiB database (incompressible rows): a restore takes a while."""
    root = tmp_path_factory.mktemp("big")
    db = root / "src.db"
    init_db(str(db))
    c = sqlite3.connect(db, isolation_level=None)
    try:
        for i in range(48):
            c.execute("INSERT INTO data(k, payload) VALUES (?, ?)", (i, os.urandom(1 << 20)))
    finally:
        c.close()
    rep = root / "rep"
    d = Database(str(db), Spool(str(rep)))
    d.open()
    try:
        while d.step().more:
            pass
    finally:
        d.close()
    return rep


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def start_restore(rep: Path, out: Path) -> subprocess.Popen[str]:
    """A restore, paused (SIGSTOP) once its temp file exists."""
    # SIGINT as a terminal gives it: a shell without job control starts background jobs (a CI
    # run among them) with SIGINT ignored, and a child inherits that
    p = subprocess.Popen([sys.executable, "-m", "replicator", "restore", str(rep), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: bool(leftovers(out.parent)) or p.poll() is not None, 60, interval=0.001,
               what="the restore's temp file")
    p.send_signal(signal.SIGSTOP)
    assert p.poll() is None, "the restore finished before it could be stopped"
    return p


# -- a stopped or killed restore ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_restore_leaves_no_temp_file(tmp_path: Path, big_replica: Path,
                                             sig: signal.Signals) -> None:
    out = tmp_path / "out.db"
    p = start_restore(big_replica, out)
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode != 0, stdout
    assert "Traceback" not in stderr, stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_killed_restore_is_cleaned_up_by_the_next(tmp_path: Path, big_replica: Path) -> None:
    out = tmp_path / "out.db"
    p = start_restore(big_replica, out)
    p.kill()
    p.communicate(timeout=60)
    (stale,) = leftovers(tmp_path)
    assert stale.startswith(f"out.db.{p.pid}.")
    # not ours to remove: another output's, a live process's, a foreign name
    keep = [tmp_path / f"other.db.{p.pid}.0badc0de.tmp", tmp_path / "out.db.backup.tmp",
            tmp_path / f"out.db.{os.getpid()}.0badc0de.tmp"]
    for k in keep:
        k.write_bytes(b"x")
    r = cli("restore", str(big_replica), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert f"removed {tmp_path / stale}" in r.stderr
    assert leftovers(tmp_path) == sorted(k.name for k in keep)
    assert util.integrity(out) == "ok"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_stale_temp_rule(tmp_path: Path) -> None:
    """Only our pattern, only a dead process's, only when nobody holds its lock."""
    out = tmp_path / "app.db"
    pid = dead_pid()
    stale_file = tmp_path / f"app.db.{pid}.12ab34cd.tmp"
    stale_dir = tmp_path / f".app.db.{pid}.k3j_9x2a.tmp"
    locked = tmp_path / f"app.db.{pid}.99999999.tmp"
    alive = tmp_path / f"app.db.{os.getpid()}.12ab34cd.tmp"
    foreign = [tmp_path / f"app.db.{pid}.tmp", tmp_path / f"app.db2.{pid}.12ab34cd.tmp",
               tmp_path / f"xapp.db.{pid}.12ab34cd.tmp"]
    for f in [stale_file, locked, alive, *foreign]:
        f.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "00000001.obj").write_bytes(b"x")
    fd = os.open(locked, os.O_RDONLY)
    try:
        lock_owned(fd)  # as a restore in another pid namespace would hold it
        removed = remove_stale_temps(str(out))
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([str(stale_file), str(stale_dir)])
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in [locked, alive, *foreign])


def test_temp_names_are_unique_across_threads_and_forks_and_known_as_ours(
        tmp_path: Path) -> None:
    """Names drawn by many threads at once never repeat; a forked child's carry its own pid
    (its parent's counter would repeat in it otherwise); the stale-temp rule reads them as
    this process's, so it removes them only once the process is gone."""
    import threading

    base = str(tmp_path / "app.db")
    names: list[str] = []

    def draw() -> None:
        names.extend(temp_path(base) for _ in range(2000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 8000
    assert all(n.startswith(f"{base}.{os.getpid()}.") and n.endswith(".tmp") for n in names)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one name and leave at once
        os.write(w, temp_path(base).encode())
        os._exit(0)
    os.close(w)
    child_name = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert child_name.startswith(f"{base}.{pid}.") and child_name not in names

    for n in (names[0], child_name):
        Path(n).write_bytes(b"x")
    assert remove_stale_temps(base) == [child_name]  # the child is gone; this process is not
    assert os.path.exists(names[0])


# -- progress -----------------------------------------------------------------------------------


def run_on_pty(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (80x24); returns rc, stdout, terminal text."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "replicator", *args], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    screen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not data:
            break
        screen += data
    os.close(master)
    assert p.stdout is not None
    stdout = p.stdout.read().decode()
    p.stdout.close()
    return p.wait(timeout=60), stdout, screen.decode(errors="replace")


def test_progress_on_a_terminal_only(tmp_path: Path, big_replica: Path) -> None:
    rc, stdout, screen = run_on_pty("restore", str(big_replica), "-o", str(tmp_path / "a.db"))
    assert rc == 0, screen
    assert "restored" in stdout
    # the bar ends showing the whole: bytes and objects of the total, and the rate
    assert re.search(r"restore: 100%.*\b([\d.]+M)/\1 .*B/s, 1/1 objects\]", screen), screen
    r = cli("restore", str(big_replica), "-o", str(tmp_path / "b.db"))
    assert r.returncode == 0
    assert r.stderr == ""
    assert r.stdout.startswith("restored ")


def test_dry_run_prints_the_download_size(big_replica: Path) -> None:
    r = cli("restore", str(big_replica), "--dry-run")
    assert r.returncode == 0, r.stderr
    size = sum(f.stat().st_size for f in big_replica.glob("generations/*/*/*"))
    assert re.search(r"^download: +4[89]\.\d MiB in 1 object$", r.stdout, re.M), r.stdout
    assert 48 << 20 <= size < 50 << 20


# -- secrets ------------------------------------------------------------------------------------


def test_no_secret_in_any_output(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    out = tmp_path / "out.db"
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n    replicas:\n"
                   f"      - url: 's3://AKIAEXAMPLE:{SECRET}@bucket/p'\n")
    env = {**util.env_without_aws(), "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_EC2_METADATA_DISABLED": "true"}
    dead = f"http://127.0.0.1:{free_port()}"
    commands = [
        ["replicate", str(db), f"s3://user:{SECRET}@bucket/p"],
        ["replicate", str(db), f"s3://AKIAEXAMPLE:{SECRET[:4]}/{SECRET[4:]}@bucket/p"],
        ["replicate", "--config", str(cfg)],
        ["restore", f"s3://user:{SECRET}@bucket/p", "-o", str(out)],
        ["restore", "--dry-run", f"s3://bucket/p?endpoint=http://u:{SECRET}@127.0.0.1:1"],
        ["generations", f"s3://bucket/p?aws_secret_access_key={SECRET}"],
        ["snapshots", f"file://user:{SECRET}@host/x"],
        ["restore", "--txid", f"s3://user:{SECRET}@bucket/p"],
        # a destination that cannot be reached, with credentials in the environment
        ["replicate", str(db), f"s3://bucket/p?endpoint={dead}&max_retries=1&token={SECRET}"],
        ["replicate", str(db), f"s3://bucket/p?endpoint={dead}&max_retries=1"],
    ]
    for args in commands:
        r = cli("--log-level", "debug", *args, env=env, timeout=120)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        for text in (r.stdout, r.stderr):
            assert SECRET not in text and SECRET[4:] not in text, (args, text)
        assert "Found credentials" not in r.stderr  # botocore's own INFO lines stay out


async def test_status_and_metrics_are_redacted(tmp_path: Path) -> None:
    from urllib.request import urlopen

    from replicator.config import Config, DbConfig, ReplicaConfig
    from replicator.replicator import Replicator
    from replicator.server import start_server

    db = tmp_path / "app.db"
    init_db(str(db))
    cfg = Config(dbs=[DbConfig(path=str(db), replicas=[ReplicaConfig("r", str(tmp_path / "r"))])])
    rep = Replicator(cfg)
    leaked = f"s3://AKIAEXAMPLE:{SECRET}@bucket/p?X-Amz-Signature={SECRET}"
    rep.services[0].replicas[0].last_error = f"{leaked}: access denied"
    rep.metrics.errors.labels(leaked, "r", "sync").inc()
    server = await start_server("127.0.0.1:0", rep)
    try:
        for path in ("/status", "/readyz", "/metrics"):
            url = f"http://127.0.0.1:{server.port}{path}"
            body = await asyncio_read(url, urlopen)
            assert "bucket/p" in body, (path, body)
            assert SECRET not in body, (path, body)
    finally:
        server.close()
        for s in rep.services:
            for r in s.replicas:
                await r.aclose()


async def asyncio_read(url: str, urlopen: object) -> str:
    import asyncio
    import urllib.error

    def get() -> str:
        try:
            with urlopen(url, timeout=10) as resp:  # type: ignore[operator]
                return str(resp.read().decode())
        except urllib.error.HTTPError as exc:  # /readyz answers 503: not ready
            return str(exc.read().decode())

    return await asyncio.to_thread(get)


# -- pipes, version, usage, suggestions ----------------------------------------------------------


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Replicate, str]]:
    db = tmp_path / "app.db"
    init_db(str(db))
    addr = f"127.0.0.1:{free_port()}"
    rep = Replicate(str(db), str(tmp_path / "rep"), "--metrics-addr", addr,
                    log=tmp_path / "rep.log")
    try:
        wait_until(lambda: "replicating" in rep.text(), 60, what="the replicator to start")
        yield rep, addr
    finally:
        assert rep.stop() == 0, rep.text()


def test_head_exits_quietly(tmp_path: Path, running: tuple[Replicate, str],
                            big_replica: Path) -> None:
    _, addr = running
    me = f"{sys.executable} -m replicator"
    pipelines = [f"{me} status --addr {addr} --json | head -1",
                 f"{me} generations {big_replica} --json | head -c 10",
                 f"{me} snapshots {big_replica} | head -c 1"]
    for line in pipelines:
        for _ in range(20):
            r = subprocess.run(["bash", "-c", f"set -o pipefail; {line} >/dev/null"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stderr == "", (line, r.stderr)


def test_version() -> None:
    for args in (["--version"], ["-V"], ["version"]):
        r = cli(*args)
        assert r.returncode == 0 and r.stdout == f"replicator {util_version()}\n", r


def util_version() -> str:
    import replicator

    return replicator.__version__


def test_no_arguments_prints_usage_and_the_commands() -> None:
    r = cli()
    assert r.returncode == 2
    assert r.stderr.startswith("usage: replicator")
    for command in ("replicate", "restore", "generations", "snapshots", "status", "version"):
        assert re.search(rf"^ +{command} +\S", r.stderr, re.M), (command, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_help_lists_each_command_once() -> None:
    r = cli("-h")
    assert r.returncode == 0
    for command in ("replicate", "restore", "generations", "snapshots", "status", "version"):
        assert len(re.findall(rf"^ +{command} ", r.stdout, re.M)) == 1, (command, r.stdout)


def test_help_describes_arguments() -> None:
    replicate = cli("replicate", "-h").stdout
    assert re.search(r"^  DB +the SQLite database", replicate, re.M), replicate
    assert re.search(r"^  DESTINATION +where to replicate", replicate, re.M), replicate
    restore = cli("restore", "-h").stdout
    assert "--to-time TIME" in restore and "2026-11-27T10:30:00Z" in restore
    assert "no offset: UTC" in restore


def test_a_command_line_builds_its_own_parser_only() -> None:
    """A command's parser built alone (as a command line builds it) is the one of the full
    parser; anything else before the command builds them all."""
    from replicator.cli import COMMANDS, build_parser

    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(sub.choices)

    full = subparsers(build_parser())
    assert list(full) == list(COMMANDS)
    for name in COMMANDS:
        for argv in ([name], ["--log-level", "debug", name, "x"], ["--log-format=json", name]):
            (alone,) = subparsers(build_parser(argv)).values()
            assert alone.format_help() == full[name].format_help(), argv
    for argv in ([], ["-h"], ["--log-level", "debug"], ["restor", "x"], ["-V", "restore"]):
        assert subparsers(build_parser(argv)).keys() == full.keys(), argv
    args = build_parser(["restore", "R", "-o", "O"]).parse_args(["restore", "R", "-o", "O"])
    assert (args.command, args.target, args.output) == ("restore", "R", "O")


def test_log_options_after_the_command(tmp_path: Path) -> None:
    r = cli("generations", str(tmp_path), "--log-level", "debug", "--log-format", "json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("var", ["REPLICATOR_LOG_LEVEL", "REPLICATOR_LOG_FORMAT"])
def test_bad_log_setting_in_the_environment(var: str) -> None:
    r = cli("version", env={**os.environ, var: "loud"})
    assert r.returncode == 2
    assert r.stderr.startswith(f"replicator: error: {var}: expected one of ")
    assert "Traceback" not in r.stderr


def test_nearest_field_is_suggested(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(f"dbs:\n  - path: {tmp_path / 'a.db'}\n    snapshot-intervl: 1h\n"
                   f"    replicas: [{tmp_path / 'r'}]\n")
    r = cli("replicate", "--config", str(cfg))
    assert r.returncode == 1
    assert r.stderr == ("replicator: error: dbs[0].snapshot-intervl: unknown field "
                        "(did you mean snapshot-interval?)\n")
    cfg.write_text(f"dbs:\n  - path: {tmp_path / 'a.db'}\n    retention: 7x\n"
                   f"    replicas: [{tmp_path / 'r'}]\n")
    r = cli("replicate", "--config", str(cfg))
    assert "expected a duration like 250ms, 10s, 5m, 1h or 7d, got '7x'" in r.stderr


# -- logs ---------------------------------------------------------------------------------------


def test_logs_say_what_happened(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    log = tmp_path / "rep.log"
    p = util.Replicate(str(db), str(tmp_path / "rep"), log=log, log_format="json")
    try:
        p.wait_ready(lambda: "replicating" in p.text(), 60, "start")
        started = time.monotonic()
        w = util.start_writer(db, tmp_path / "commits.log", "--duration", "2")
        w.communicate(timeout=60)
        assert w.returncode == 0
        time.sleep(0.5)
    finally:
        assert p.stop(60) == 0
    elapsed = time.monotonic() - started
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(set(d) >= {"time", "level", "logger", "message"} for d in lines)
    captured = [d for d in lines if " captured " in d["message"]]
    # a writer flat out makes a capture every few ms: DEBUG says so about once a second
    assert 1 <= len(captured) <= elapsed + 2, len(captured)
    last = len(util.commit_log(tmp_path / "commits.log"))
    stopped = [d["message"] for d in lines if "stopped after final sync" in d["message"]]
    assert len(stopped) == 1, stopped
    m = re.fullmatch(rf"{re.escape(str(db))}: stopped after final sync at txid (\d+)", stopped[0])
    # one txid a commit, unless a catch-up bridged frames the capture did not see in time (one
    # txid for the commits it covers; on a starved machine a WAL reset's proof can lose its race
    # with the application): never more, and the replica holds every commit
    assert m is not None and 0 < int(m.group(1)) <= last, stopped
    out = tmp_path / "out.db"
    util.restore(str(tmp_path / "rep"), out)
    assert util.seqs(out) == list(range(1, last + 1))


async def test_periodic_summary(tmp_path: Path) -> None:
    from replicator.config import DbConfig, ReplicaConfig
    from replicator.replicator import SUMMARY_EVERY, DatabaseService

    db = tmp_path / "app.db"
    init_db(str(db))
    svc = DatabaseService(DbConfig(path=str(db), replicas=[
        ReplicaConfig("local", str(tmp_path / "a")), ReplicaConfig("other", str(tmp_path / "b"))]))
    await svc.open()
    try:
        t0 = time.monotonic()
        for r in svc.replicas:
            await r.sync()
        first = svc.log_summary(t0 + SUMMARY_EVERY)  # the first snapshot went out
        assert first is not None and "0 transactions" in first, first
        c = sqlite3.connect(db, isolation_level=None)
        for seq in range(1, 6):
            c.execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (seq, time.time_ns()))
        c.close()
        await svc.sync()
        assert svc.log_summary(t0 + SUMMARY_EVERY + 1) is None  # not a minute yet
        for r in svc.replicas:
            await r.sync()
        line = svc.log_summary(t0 + 2 * SUMMARY_EVERY + 1)
        assert line is not None
        size = r"\([\d.]+ (?:B|KiB)\)"
        assert re.fullmatch(rf"{db}: shipped 5 transactions {size} to local, 5 transactions "
                            rf"{size} to other in the last \d+s", line), line
        assert svc.log_summary(t0 + 4 * SUMMARY_EVERY) is None  # idle: nothing to say
    finally:
        await svc.close(5.0)


def test_process_summary_folds_many_databases_into_one_line() -> None:
    from replicator.report import SUMMARY_FOLD_ABOVE, ProcessSummary

    count = [SUMMARY_FOLD_ABOVE]
    t = [100.0]
    p = ProcessSummary(lambda: count[0], every=60.0, clock=lambda: t[0])
    assert not p.folding  # few databases: each logs its own line
    count[0] = 40
    assert p.folding
    assert p.add("a.db", {"local": (5, 2048)}, 130.0) is None  # not a minute yet
    assert p.add("b.db", {"local": (1, 1024), "s3": (1, 1024)}, 150.0) is None
    line = p.add("a.db", {"local": (2, 1024)}, 161.0)
    assert line == ("shipped 8 transactions (4.0 KiB) to local, 1 transactions (1.0 KiB) to "
                    "s3 from 2 of 40 databases in the last 61s"), line
    assert p.add("c.db", {"local": (1, 10)}, 200.0) is None  # counted again from 161
    line = p.add("c.db", {"local": (1, 10)}, 222.0)
    assert line == "shipped 2 transactions (20 B) to local from 1 of 40 databases in the last 61s"
    # a shutdown folds the final syncs' lines of the databases it began with, though their
    # count falls as they stop
    p.stopping()
    p.stopped("a.db", 7)
    count[0] = 2
    p.stopped("b.db", 9)
    assert p.stopped_all() == "2 databases stopped after final sync"
    assert p.stopped_all() is None


async def test_many_databases_log_one_summary_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A process replicating more than SUMMARY_FOLD_ABOVE databases logs one INFO line of what
    they all shipped; each database's own line goes to DEBUG."""
    import logging

    from replicator.config import DbConfig, ReplicaConfig
    from replicator.replicator import SUMMARY_EVERY, DatabaseService
    from replicator.report import SUMMARY_FOLD_ABOVE
    from replicator.runtime import Runtime

    rt = Runtime(workers=2)
    services = []
    try:
        for i in range(SUMMARY_FOLD_ABOVE + 1):
            db = tmp_path / f"t{i}.db"
            init_db(str(db))
            s = DatabaseService(DbConfig(path=str(db), replicas=[
                ReplicaConfig("local", str(tmp_path / "rep" / f"t{i}"))]), runtime=rt)
            await s.open()
            services.append(s)
        assert rt.claimed == SUMMARY_FOLD_ABOVE + 1
        t0 = time.monotonic()
        for s in services[:3]:
            c = sqlite3.connect(s.cfg.path, isolation_level=None)
            c.execute("INSERT INTO log(seq, t_ns) VALUES (1, 0)")
            c.close()
            await s.sync()
            await s.replicas[0].sync()
        rt.summary.every = 0.0  # due at once, after the first database's summary
        with caplog.at_level(logging.DEBUG, logger="replicator"):
            lines = [s.log_summary(t0 + SUMMARY_EVERY) for s in services[:3]]
        assert all(line is not None for line in lines)
        info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
        assert all(line in debug for line in lines) and not set(lines) & set(info)
        process = [m for m in info if " databases in the last " in m]
        assert len(process) == 3, info  # every=0: one for each summary folded
        assert re.fullmatch(r"shipped 1 transactions \([\d.]+ (?:B|KiB)\) to local from 1 of "
                            rf"{SUMMARY_FOLD_ABOVE + 1} databases in the last \d+s",
                            process[0]), process
    finally:
        for s in services:
            await s.close(5.0)
        await rt.aclose()


# -- the demo -----------------------------------------------------------------------------------


def test_demo_teaches_a_point_in_time_restore(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "replicator", "replicate",
                          "--demo-rows-per-second", "20"], cwd=tmp_path, env=HERE_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        hints = [p.stdout.readline() for _ in range(8)]
        text = "".join(hints)
        assert text.startswith("demo: writing 20 rows a second"), text
        commands = [h.strip() for h in hints if h.startswith("  replicator ")]
        assert [c.split()[1] for c in commands] == ["generations", "restore", "restore", "status"]
        assert re.search(r"curl http://127\.0\.0\.1:\d+/metrics", text), text
        then = re.search(r"--to-time (\S+)", text)
        assert then is not None
        wait_until(lambda: time.time() > util_parse(then[1]) + 2, 30, what="rows after T")
        for c in commands:
            r = subprocess.run([sys.executable, "-m", "replicator", *c.split()[1:]], cwd=tmp_path,
                               env=HERE_ENV, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (c, r.stderr)
        latest = len(util.dump(tmp_path / "demo" / "restored.db"))
        at_then = len(util.dump(tmp_path / "demo" / "then.db"))
        assert 100 < at_then < latest
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "stopped after final sync" in err


def util_parse(text: str) -> float:
    from replicator.restore import parse_time

    return parse_time(text) / 1e9


def test_demo_flag_is_for_the_demo_only(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    r = cli("replicate", str(db), "--demo-rows-per-second", "5")
    assert r.returncode == 1
    assert "--demo-rows-per-second: only for the demo" in r.stderr


def test_long_snapshot_logs_its_progress(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from replicator.db import Tuning

    db = tmp_path / "app.db"
    init_db(str(db))
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("INSERT INTO data(k, payload) VALUES (1, ?)", (os.urandom(4 << 20),))
    c.close()
    # a progress line every chunk, not every 5 s
    d = Database(str(db), Spool(str(tmp_path / "spool")), tuning=Tuning(snapshot_log_every=0.0))
    with caplog.at_level(logging.INFO, logger="replicator"):
        d.open()
        try:
            d.step()  # the first snapshot
        finally:
            d.close()
    percents = [int(m[1]) for r in caplog.records
                if (m := re.search(r": snapshot (\d+)% \(\d+ of \d+ pages\)$", r.getMessage()))]
    assert len(percents) >= 3 and percents == sorted(percents) and percents[-1] < 100, percents
