"""Helpers for tests that drive the real CLI and a real writer process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

from replicator.format import decode_stream, read_header
from replicator.pos import ObjectInfo
from replicator.restore import apply_plan, plan_restore
from replicator.storage import StorageClient, open_storage

TESTS = Path(__file__).resolve().parent
WRITER = str(TESTS / "writer.py")
P = ParamSpec("P")
C = TypeVar("C", bound=StorageClient)


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``replicator ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


class ServerProcess:
    """A server (or any long-running program) as a child process: every external server of the
    tests (the replicator, SeaweedFS, Prometheus) runs this way. Its output goes to ``log``;
    :meth:`wait_ready` fails at once with the log's tail if it exits; :meth:`stop` and
    :meth:`kill` never leave it running."""

    def __init__(self, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: str | None = None, new_session: bool = False) -> None:
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self.new_session = new_session
        self.start()

    def start(self) -> None:
        """Start the program (again, after a stop)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=self.new_session,
            )

    @property
    def running(self) -> bool:
        """Whether the process runs."""
        return self.proc.poll() is None

    def text(self) -> str:
        """What the process wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self) -> str:
        """The command, its exit status and the end of its output, for failure messages."""
        return f"`{' '.join(self.argv)}` exited with {self.proc.poll()}:\n{self.text()[-4000:]}"

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready`` until it is true; fail naming ``what`` if the process exits first or
        ``timeout`` seconds pass."""

        def check() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: {self.describe()}")
            return ready()

        wait_until(check, timeout, 0.05, what=what)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code. One that does not stop within ``timeout`` is
        killed and the test fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stacks = self.stacks()
            self.kill()
            raise AssertionError(
                f"`{' '.join(self.argv)}` did not stop within {timeout}s; its threads:\n"
                f"{stacks}\nits output:\n{self.text()[-4000:]}") from None

    def stacks(self) -> str:
        """Every thread's Python stack in the running process (``py-spy dump``), for the
        message of a process that hangs; a line saying why where that cannot be had."""
        spy = shutil.which("py-spy")
        if spy is None:
            return "(py-spy is not installed)"
        try:
            out = subprocess.run([spy, "dump", "--pid", str(self.proc.pid)],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"(py-spy dump failed: {exc})"
        return (out.stdout + out.stderr)[-12000:]

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Replicate(ServerProcess):
    """``replicator replicate ...`` as a subprocess, its log in ``log``."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None,
                 log_level: str = "debug", log_format: str = "text") -> None:
        super().__init__([sys.executable, "-m", "replicator", "--log-level", log_level,
                          "--log-format", log_format, "replicate", *args], log, env=env)


def commit(db: Path | str | sqlite3.Connection, n: int = 1, *, payload: int = 0) -> list[int]:
    """``n`` transactions like the writer's: each inserts the next ``seq`` into ``log`` (and,
    with ``payload``, a row of that many random bytes into ``data``). Returns their seqs."""
    conn = db if isinstance(db, sqlite3.Connection) else sqlite3.connect(db, isolation_level=None)
    try:
        out = []
        for _ in range(n):
            conn.execute("BEGIN")
            seq = int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM log").fetchone()[0])
            if payload:
                conn.execute("INSERT INTO data(k, payload) VALUES (?, randomblob(?))",
                             (seq, payload))
            conn.execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (seq, time.time_ns()))
            conn.execute("COMMIT")
            out.append(seq)
        return out
    finally:
        if conn is not db:
            conn.close()


def hold_open(db: Path) -> subprocess.Popen[str]:
    """An application process that has ``db`` open (it has read from it) until its stdin
    closes: ``communicate("")`` ends it."""
    app = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM log').fetchone(); print('ready', flush=True); "
         "sys.stdin.read()", str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert app.stdout is not None and app.stdout.readline() == "ready\n"
    return app


def start_writer(db: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    """Start the writer process."""
    return subprocess.Popen(
        [sys.executable, WRITER, str(db), str(log), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


class CommitLoop:
    """:func:`commit` of one transaction every 10 ms to ``db`` in a thread of this process,
    from :meth:`start` until :meth:`stop`; ``count``: how many were committed."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            commit(self.db, 1)
            self.count += 1
            self._stop.wait(0.01)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def commit_log(path: Path) -> list[tuple[int, int, int]]:
    """The writer's log: (seq, t_before_ns, t_after_ns) for each complete line."""
    out: list[tuple[int, int, int]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def seqs(db: Path) -> list[int]:
    """The seq values in a database's log table."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in c.execute("SELECT seq FROM log ORDER BY seq")]
    finally:
        c.close()


def dump(db: Path) -> list[str]:
    """Every row of every table, as SQL text."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(c.iterdump())
    finally:
        c.close()


def integrity(db: Path) -> str:
    """PRAGMA integrity_check of a database."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in c.execute("PRAGMA integrity_check"))
    finally:
        c.close()


def checkpoint_truncate(db: Path) -> None:
    """Fold the WAL into the database file (used once writers and the replicator stopped)."""
    c = sqlite3.connect(db)
    try:
        busy = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0, "checkpoint could not complete"
    finally:
        c.close()


def wait_until(pred: Callable[[], bool], timeout: float = 30, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll ``pred`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


async def until(pred: Callable[[], bool | Awaitable[bool]], what: str,
                within: float = 120) -> None:
    """``wait_until`` for async tests: poll ``pred`` (or await it, if it is a coroutine
    function) without blocking the event loop."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        ok = pred()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def restore(dest: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``replicator restore DEST -o OUT ...``; asserts success."""
    r = cli("restore", dest, "-o", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return r


def assert_prefix(restored: list[int]) -> int:
    """The restored seqs are exactly 1..k; returns k."""
    assert restored == list(range(1, len(restored) + 1)), "restored commits are not a prefix"
    return len(restored)


def assert_prefix_of(out: Path, log: Path) -> int:
    """A restore taken while the writer runs passes integrity_check and holds commits 1..k,
    none the writer's log does not have but the one it may be writing; returns k."""
    assert integrity(out) == "ok"
    k = assert_prefix(seqs(out))
    assert k <= len(commit_log(log)) + 1
    return k


def assert_every_commit(out: Path, log: Path, db: Path | None = None) -> None:
    """A final restore passes integrity_check and holds every commit of the writer's log (and,
    given the database, equals it row for row)."""
    assert integrity(out) == "ok"
    assert seqs(out) == [c[0] for c in commit_log(log)]
    if db is not None:
        assert dump(out) == dump(db)


def kill9_cycles(
    db: Path, dests: Sequence[str], logs: Path, cycles: int, rnd: random.Random, *,
    up: tuple[float, float], short_snapshots: bool = True,
    started: Callable[[str], bool] | None = None, env: dict[str, str] | None = None,
    replicate: type[Replicate] = Replicate,
) -> Iterator[tuple[int, Replicate]]:
    """Start ``replicator replicate DB DESTS...`` and kill -9 it, ``cycles`` times: each time
    with a random ``--checkpoint-pages`` (and, with ``short_snapshots``, a snapshot interval of
    0.3 s every third time), killed a random while (``up``: its bounds in seconds) after it
    started (after ``started(its log)`` holds, if given). Yields each cycle and its killed
    process, which logged no traceback (its log: ``logs/rep<cycle>.log``)."""
    def has_started(rep: Replicate) -> Callable[[], bool]:
        return lambda: started is not None and started(rep.text())

    for cycle in range(cycles):
        args = [str(db), *dests, "--checkpoint-pages", str(rnd.choice([32, 128, 1000]))]
        if short_snapshots and cycle % 3 == 0:
            args += ["--snapshot-interval", "0.3s"]
        rep = replicate(*args, log=logs / f"rep{cycle}.log", env=env)
        if started is not None:
            wait_until(has_started(rep), 60, what="capture started")
        time.sleep(rnd.uniform(*up))
        rep.kill()
        assert "Traceback" not in rep.text()
        yield cycle, rep


def env_without_aws() -> dict[str, str]:
    """The environment minus the caller's AWS_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def tree(root: Path) -> dict[str, str]:
    """Every entry below ``root``: relative path -> content digest (or "dir")."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def wait_for_snapshot(replica: Path) -> None:
    """Wait until the replicator has shipped its first snapshot to a local replica."""
    wait_until(lambda: any(replica.glob("generations/*/snapshots/*.snap")), 60,
               what="first snapshot")


async def _objects(dest: str) -> AsyncIterator[tuple[ObjectInfo, AsyncIterator[bytes]]]:
    """Every object of a replica, oldest generation first, with a stream of its bytes."""
    client = open_storage(dest)
    try:
        for gen in await client.generations():
            for o in await client.objects(gen):
                yield o, client.read_object(o)
    finally:
        await client.aclose()


async def _observed_times(dest: str) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    async for o, data in _objects(dest):
        h = await read_header(data, o.key)
        if o.kind == "wal":
            for txid, ts, _, _ in h["txns"]:
                out[(o.generation, int(txid))] = int(ts)
        elif o.kind == "catchup" or o.end_txid == 0:
            out[(o.generation, o.end_txid)] = int(h["ts_ns"])
        else:
            # a later snapshot (full or differential) of a transaction: read after it was
            # observed, it does not change when the transaction was
            out.setdefault((o.generation, o.end_txid), int(h["ts_ns"]))
    return out


async def _segment_bodies(dest: str) -> list[bytes]:
    out = []
    async for o, data in _objects(dest):
        _, body = await decode_stream(data, o.key)
        out.append(b"".join([c async for c in body]))
    return out


async def _restore_latest(client: StorageClient, out: Path) -> None:
    plan = await plan_restore(client)
    await apply_plan(client, plan, str(out), force=True)


# Blocking forms of the library's async calls, for tests that drive processes and files (a test
# of async code is an ``async def`` test and awaits the library directly).


def observed_times(dest: str) -> dict[tuple[str, int], int]:
    """(generation, txid) -> observed ns, from every object header of a replica."""
    return asyncio.run(_observed_times(dest))


def segment_bodies(dest: str) -> list[bytes]:
    """The decoded body of every object of a replica."""
    return asyncio.run(_segment_bodies(dest))


def restore_latest(client: StorageClient, out: Path) -> None:
    """Restore the latest point of ``client`` to ``out``, in this process (overwriting)."""
    asyncio.run(_restore_latest(client, out))


@contextlib.asynccontextmanager
async def closing_all(make: Callable[P, C]) -> AsyncIterator[Callable[P, C]]:
    """``make``, remembering every client it makes: each is closed at the end."""
    opened: list[C] = []

    def tracked(*args: P.args, **kwargs: P.kwargs) -> C:
        client = make(*args, **kwargs)
        opened.append(client)
        return client

    yield tracked
    for client in opened:
        await client.aclose()
