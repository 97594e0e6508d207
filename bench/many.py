"""Many databases in one process: this repository's replicator and Litestream 0.5 (its ``dir:``
configuration), side by side on the same machine in the same run.

1. **idle**: ``--idle`` databases (default 1,000) in one directory tree, replicated to S3
   (SeaweedFS through bench/s3.py's recording proxy, when ``weed`` is installed; else a local
   directory): once every database is replicated and the requests have stopped (and 25 s more:
   ours parks an idle database 30 s after its last change, which costs it a little CPU), the
   tool's RSS, threads, file descriptors, CPU and S3 requests over ``--idle-seconds``.
2. **big**: ``--big`` databases (default 10,000) to a local directory: time until every one of
   them has its first object in the replica, RSS, threads, file descriptors then. Bounded: the
   tool is stopped after ``--big-timeout`` seconds or past ``--mem-cap`` MiB of RSS.
3. **active**: ``--active`` databases (default 1,000; a comma-separated list runs each count,
   smallest first), each committing one small transaction a second at random times (a writer
   process of its own) for ``--active-seconds``: the lag from each commit to the next finished
   object of that database in the local replica, taken from inotify events (no listing),
   p50/p99/max; the tool's CPU. With several counts the report also names the largest count
   whose p99 stayed within ``P99_TARGET_MS`` for each tool (what one such machine carries).
   ``--processes N`` adds ours split over N processes (``ours-N``: one config, each process
   with ``--shard k/N``), the figures summed over them. ``--cpus one`` adds ours with that
   ``cpus`` setting (``ours@one``; split over processes, each process on a CPU of its own).
4. **lost**: ``--lost`` databases (default 1,000) replicated to a local directory, each
   committing a few transactions more, the tool stopped and the directory deleted; the time,
   and the CPU, to restore every one of them to its place (see :func:`lost`), each compared
   with what was committed.

Every process it starts is stopped in a ``finally``; its work directory is removed at the end.
Raw numbers go to bench/out/many.json (``--json``: elsewhere, for a run whose figures are not
for the docs), the report between ``<!-- many:start -->`` and
``<!-- many:end -->`` of docs/benchmarks.md. Run from the repository root:
``python bench/many.py [--quick] [--out docs/benchmarks.md]`` (``--quick``: 200/1,000/200
databases, a few minutes; the full run about 35 minutes; ``--resume`` keeps the successful runs
of the raw numbers, ``--report-only`` rewrites the report from them).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import functools
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _repl_common as rc  # noqa: E402

START = "<!-- many:start -->"
END = "<!-- many:end -->"
TOOLS = ("ours", "litestream")
LABELS = {"ours": "replicator (ours)", "litestream": "Litestream 0.5 (dir, watch)"}
SETTLE = 10.0  # seconds without new objects (or writes) before a tool counts as settled
SETTLE_MAX = 300.0
IDLE_AFTER = 25.0  # the idle measurement starts SETTLE + IDLE_AFTER s after the last write
P99_TARGET_MS = 100.0  # the lag a database count is judged by (see report)
PER_DIR = 100  # databases a directory below the root (make_dbs)


def split_tool(tool: str) -> tuple[str, int]:
    """``ours-3`` -> ("ours", 3): ours split over 3 processes; any other name -> (name, 1).
    A ``@CPUS`` suffix (:func:`cpus_of`) is left out."""
    base, _, n = tool.partition("@")[0].partition("-")
    return (base, int(n)) if base == "ours" and n.isdigit() and int(n) > 1 else (base, 1)


def cpus_of(tool: str) -> str | None:
    """``ours@one`` -> "one": ours with ``cpus: one``; split over processes, each on a CPU of
    its own (``cpus: N``, N the k-th CPU this process may use). None: no ``@``."""
    return tool.partition("@")[2] or None


def label(tool: str, result: dict[str, Any] | None = None) -> str:
    """The tool's name in the report; ours split says over how many processes the result ran,
    ours confined to CPUs says so."""
    base, procs = split_tool(tool)
    cpus = cpus_of(tool)
    pinned = "" if cpus is None else (f", cpus: {cpus}" if procs == 1
                                      else ", each on a CPU of its own")
    if procs == 1:
        return LABELS[base] + pinned
    ran = (result or {}).get("processes", procs)
    return LABELS[base] + f", {ran} processes" + pinned


def tools_of(part: dict[str, Any]) -> list[str]:
    """The tools a part has results for, in report order (TOOLS, then ours split, by count;
    confined to CPUs after the same count unconfined)."""
    split = sorted((t for t in part if t not in TOOLS),
                   key=lambda t: (split_tool(t)[1], cpus_of(t) or ""))
    return [t for t in TOOLS if t in part] + split


def writes(proxy: Any) -> int:
    """How many write requests the proxy has seen."""
    with proxy.cond:
        return sum(e.kind in ("PUT", "MPU-COMPLETE", "DELETE", "DELETE-MULTI")
                   for e in proxy.events)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ databases

def make_dbs(root: Path, n: int) -> list[str]:
    """``n`` small WAL databases below ``root`` (100 a directory); their relative paths."""
    rels = [f"g{i // PER_DIR:03d}/t{i:05d}.db" for i in range(n)]
    root.mkdir(parents=True, exist_ok=True)
    template = root.parent / f".{root.name}-template.db"
    c = sqlite3.connect(template, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    c.execute("INSERT INTO t(v) VALUES (randomblob(200))")
    c.close()  # the last connection: checkpointed, the -wal removed; WAL mode stays
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, p)
    template.unlink()
    return rels


def replicated(replica: Path) -> set[str]:
    """Relative paths of the databases with at least one finished object in ``replica``."""
    out: set[str] = set()
    for top, _dirs, files in os.walk(replica):
        for f in files:
            if f.endswith((".snap", ".seg", ".ltx")):
                rel = os.path.relpath(top, replica)
                for cut in ("/generations/", "/ltx/"):
                    if cut in rel + "/":
                        out.add((rel + "/").split(cut)[0])
                        break
    return out


# ------------------------------------------------------------------------------ process facts

def facts(pids: list[int]) -> dict[str, float]:
    """RSS, CPU, threads and descriptors of a tool's processes, summed (those still there)."""
    parts = [f for f in map(_facts, pids) if f]
    return {k: sum(f[k] for f in parts) for k in parts[0]} if parts else {}


def _facts(pid: int) -> dict[str, float]:
    s = rc.proc_sample(pid)
    if s is None:
        return {}
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = -1
    return {"cpu_s": s.cpu, "rss_mib": s.rss / rc.MiB, "hwm_mib": s.hwm / rc.MiB,
            "threads": threads, "fds": fds}


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) of a tool's threads by their name in the kernel, numbers
    dropped (ours names its threads ``repl-worker_3`` and so on; the main thread keeps the
    process's name)."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # the thread ended meanwhile
            name, cpu = rc.stat_cpu(stat)
            name = name.rstrip("0123456789").rstrip("_")
            out[name] = out.get(name, 0.0) + cpu
    return out


class Run:
    """One tool over one directory of databases, its process (ours split: its processes) and
    log."""

    def __init__(self, tool: str, work: Path, root: Path, replica: str, s3_env: dict[str, str]
                 | None = None) -> None:
        self.tool, self.work, self.root, self.replica = tool, work, root, replica
        self.cfg = work / f"{tool}.yml"
        self.log_path = work / f"{tool}.log"
        self.env = {**os.environ, **(s3_env or {})}
        self.env.pop("AWS_CA_BUNDLE", None)  # Litestream's AWS SDK refuses a custom CA here
        base, procs = split_tool(tool)
        cpus = cpus_of(tool)
        mine = sorted(os.sched_getaffinity(0))

        def pin(k: int) -> str:
            if cpus is None:
                return ""
            return f"{cpus if procs == 1 else mine[k % len(mine)]}"

        self.cmds: list[list[str]] = []
        if base == "ours":
            # split: one config, each process its part of the databases (``--shard k/N``)
            self.env["PYTHONPATH"] = str(rc.ROOT)
            rep = (f"{{name: s3, url: '{replica}'}}" if replica.startswith("s3://")
                   else f"{{name: local, path: {replica}}}")
            self.cfg.write_text(
                f"dbs:\n  - dir: {root}\n    pattern: '*.db'\n    recursive: true\n"
                f"    replicas: [{rep}]\n")
            for k in range(procs):
                cmd = [sys.executable, "-m", "replicator", "replicate", "--config", str(self.cfg)]
                self.cmds.append(cmd + (["--shard", f"{k + 1}/{procs}"] if procs > 1 else [])
                                 + (["--cpus", pin(k)] if pin(k) else []))
        else:
            if replica.startswith("s3://"):
                bucket, _, path = replica[5:].partition("?")[0].partition("/")
                endpoint = s3_env["BENCH_ENDPOINT"] if s3_env else ""
                rep = (f"{{type: s3, bucket: {bucket}, path: {path}, endpoint: '{endpoint}', "
                       "region: us-east-1, force-path-style: true}")
            else:
                rep = f"{{type: file, path: {replica}}}"
            self.cfg.write_text(
                f"dbs:\n  - dir: {root}\n    pattern: '*.db'\n    recursive: true\n"
                f"    watch: true\n    replica: {rep}\n")
            self.cmds.append([rc.litestream_binary(), "replicate", "-config", str(self.cfg)])
        self.procs: list[subprocess.Popen[bytes]] = []
        self.t0 = 0.0

    def start(self) -> None:
        f = open(self.log_path, "ab")  # noqa: SIM115 - the children keep it
        self.t0 = time.monotonic()
        try:
            for cmd in self.cmds:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                   env=self.env, cwd=self.work,
                                                   start_new_session=True))
        finally:
            f.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def stop(self, timeout: float = 60) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            with_suppress(functools.partial(os.killpg, p.pid, signal.SIGTERM))
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with_suppress(functools.partial(os.killpg, p.pid, signal.SIGKILL))
                p.wait(30)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""


def with_suppress(fn: Any) -> None:
    try:
        fn()
    except (ProcessLookupError, PermissionError):
        pass


def wait_replicated(run: Run, replica: Path, n: int, timeout: float, mem_cap: float
                    ) -> dict[str, Any]:
    """Wait until all ``n`` databases have an object in ``replica`` (local) or time or memory
    runs out; returns how far it got and when."""
    peak = 0.0
    done = 0
    while time.monotonic() - run.t0 < timeout:
        if not run.alive():
            return {"ok": False, "why": "exited", "replicated": done, "log": run.tail()}
        f = facts(run.pids)
        peak = max(peak, f.get("rss_mib", 0))
        if peak > mem_cap:
            return {"ok": False, "why": f"RSS over {mem_cap:.0f} MiB", "replicated": done}
        done = len(replicated(replica))
        if done >= n:
            return {"ok": True, "seconds": time.monotonic() - run.t0, "replicated": done,
                    "peak_rss_mib": peak}
        time.sleep(2.0)
    return {"ok": False, "why": f"not all within {timeout:.0f}s", "replicated": done,
            "peak_rss_mib": peak}


# ------------------------------------------------------------------------------ inotify lag

_IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE, _IN_ISDIR = 0x8, 0x80, 0x100, 0x40000000
_EV = struct.Struct("iIII")


class TreeWatch:
    """inotify on every directory below a root (new ones added as they appear): the perf_counter
    time of every finished file, by directory."""

    def __init__(self, root: Path, created_whole: bool = False) -> None:
        # IN_CREATE of a file marks it finished too (see _repl_common.DirWatch)
        self.done = _IN_CLOSE_WRITE | _IN_MOVED_TO | (_IN_CREATE if created_whole else 0)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(0o4000 | 0o2000000)
        self.wds: dict[int, str] = {}
        self.events: list[tuple[float, str]] = []
        for top, _dirs, _files in os.walk(root):
            self._add(top)

    def _add(self, d: str) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(d),
                                         _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE)
        if wd >= 0:
            self.wds[wd] = d

    def pump(self, until: float) -> None:
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        while time.perf_counter() < until:
            if not p.poll(50):
                continue
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            now = time.perf_counter()
            off = 0
            while off + _EV.size <= len(buf):
                wd, mask, _c, ln = _EV.unpack_from(buf, off)
                name = os.fsdecode(buf[off + _EV.size: off + _EV.size + ln].rstrip(b"\0"))
                off += _EV.size + ln
                d = self.wds.get(wd)
                if d is None:
                    continue
                path = os.path.join(d, name)
                if mask & _IN_ISDIR and mask & _IN_CREATE:
                    for top, _dirs, _files in os.walk(path):
                        self._add(top)
                elif mask & self.done:
                    if name.endswith(".seg") or (name.endswith(".ltx") and "/ltx/0" in d):
                        self.events.append((now, d))

    def close(self) -> None:
        os.close(self.fd)


WRITER = r"""
import random, sqlite3, sys, time, heapq
root, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rels = sys.argv[4:]
conns = [sqlite3.connect(f"{root}/{r}", isolation_level=None, timeout=1) for r in rels]
busy = 0
for c in conns:  # a first commit each, not measured: the steady state is
    c.execute("PRAGMA synchronous=NORMAL")
    try:
        c.execute("INSERT INTO t(v) VALUES (randomblob(200))")
    except sqlite3.OperationalError:
        busy += 1
t0 = time.perf_counter() + 5.0
heap = [(t0 + random.random(), i) for i in range(len(rels))]
heapq.heapify(heap)
log = []
end = t0 + seconds
while heap:
    t, i = heapq.heappop(heap)
    if t >= end:
        continue
    d = t - time.perf_counter()
    if d > 0:
        time.sleep(d)
    try:
        conns[i].execute("INSERT INTO t(v) VALUES (randomblob(200))")
        log.append(f"{i} {time.perf_counter():.6f}")
    except sqlite3.OperationalError:
        busy += 1  # "database is locked": the tool held the write lock for a second
    heapq.heappush(heap, (t + 1.0 + random.uniform(-0.5, 0.5), i))
with open(out, "w") as f:
    f.write("\n".join(log))
with open(out + ".busy", "w") as f:
    f.write(str(busy))
"""


def lags(commits: list[tuple[int, float]], events: list[tuple[float, str]], replica: Path,
         rels: list[str], keep_none: bool = False) -> list[Any]:
    """Per commit: the time to the next finished object of its database (None-less list;
    ``keep_none``: one entry per commit, None where no object followed)."""
    by_rel: dict[str, list[float]] = {}
    for t, d in events:
        rel = os.path.relpath(d, replica) + "/"
        for cut in ("/generations/", "/ltx/"):
            if cut in rel:
                by_rel.setdefault(rel.split(cut)[0], []).append(t)
                break
    import bisect
    out = []
    for i, t in commits:
        ts = by_rel.get(rels[i], [])
        k = bisect.bisect_left(ts, t)
        if k < len(ts):
            out.append(ts[k] - t)
        elif keep_none:
            out.append(None)
    return out


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# ------------------------------------------------------------------------------ scenarios

def idle(tool: str, work: Path, n: int, seconds: float, s3: Any) -> dict[str, Any]:
    root = work / f"idle-{tool}"
    rels = make_dbs(root, n)
    env = None
    if s3 is not None:
        server, proxy = s3
        bucket = server.create_bucket()
        replica = f"s3://{bucket}/t?endpoint={proxy.endpoint}&region=us-east-1&force_path_style=true"
        env = {**rc_s3_env(), "BENCH_ENDPOINT": proxy.endpoint}
    else:
        replica = str(work / f"idle-{tool}-replica")
    run = Run(tool, work, root, replica, env)
    run.start()
    try:
        # settled: no new writes (or objects) for SETTLE seconds (reads may go on for ever);
        # still writing after SETTLE_MAX seconds: measured anyway
        if settle(run, lambda: writes(proxy) if s3 is not None
                  else len(replicated(Path(replica)))) is None:
            return {"ok": False, "why": "exited", "log": run.tail()}
        settled = time.monotonic() - run.t0 - SETTLE
        time.sleep(IDLE_AFTER)  # ours parks an idle database this long after its last change
        a = facts(run.pids)
        req0 = proxy.mark() if s3 is not None else None
        busy = rc.Background()
        time.sleep(seconds)
        b = facts(run.pids)
        req1 = proxy.mark() if s3 is not None else None
        return {
            "ok": True, "databases": n, "settled_s": settled, "rss_mib": b["rss_mib"],
            "threads": b["threads"], "fds": b["fds"], "fds_per_db": b["fds"] / n,
            "idle_cpu_pct": 100 * (b["cpu_s"] - a["cpu_s"]) / seconds,
            "idle_requests": None if req0 is None else req1 - req0,
            "destination": "s3" if s3 is not None else "local", "machine": busy.done(0.0),
            "rels": len(rels),
        }
    finally:
        run.stop()
        rc.retire(root, work)


def big(tool: str, work: Path, n: int, timeout: float, mem_cap: float) -> dict[str, Any]:
    root, replica = work / f"big-{tool}", work / f"big-{tool}-replica"
    t = time.monotonic()
    make_dbs(root, n)
    log(f"  {n} databases made in {time.monotonic() - t:.0f}s")
    run = Run(tool, work, root, str(replica))
    busy = rc.Background()
    run.start()
    try:
        res = wait_replicated(run, replica, n, timeout, mem_cap)
        f = facts(run.pids) if run.alive() else {}
        res.update({"databases": n, "rss_mib": f.get("rss_mib"), "threads": f.get("threads"),
                    "fds": f.get("fds"), "cpu_s": f.get("cpu_s"), "machine": busy.done(0.0)})
        return res
    finally:
        run.stop(120)
        rc.retire(root, work)
        rc.retire(replica, work)


def active(tool: str, work: Path, n: int, seconds: float) -> dict[str, Any]:
    root, replica = work / f"active-{tool}", work / f"active-{tool}-replica"
    rels = make_dbs(root, n)
    run = Run(tool, work, root, str(replica))
    run.start()
    writer = None
    try:
        res = wait_replicated(run, replica, n, 600, 1 << 20)
        if not res["ok"]:
            return res
        time.sleep(SETTLE)
        watch = TreeWatch(replica, created_whole=split_tool(tool)[0] == "ours")
        out = work / f"commits-{tool}.txt"
        a, ta = facts(run.pids), thread_cpu(run.pids)
        busy = rc.Background()
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(seconds),
                                   str(out), *rels])
        watch.pump(time.perf_counter() + seconds + 7.0)
        writer.wait(60)
        watch.pump(time.perf_counter() + 3.0)
        b, tb = facts(run.pids), thread_cpu(run.pids)
        watch.close()
        if not out.exists():
            return {"ok": False, "why": "the writer failed"}
        busy_count = int(Path(f"{out}.busy").read_text())
        commits = [(int(x), float(y)) for x, y in
                   (line.split() for line in out.read_text().splitlines() if line)]
        each = lags(commits, watch.events, replica, rels, keep_none=True)
        ls = [lag for lag in each if lag is not None]
        # the same lags by when the commit was made (10 s windows): the first one includes
        # opening every parked database again
        t0 = min((t for _, t in commits), default=0.0)
        windows: dict[int, list[float]] = {}
        by_sec: dict[int, list[float]] = {}
        for (_i, t), lag in zip(commits, each, strict=True):
            if lag is not None:
                windows.setdefault(int((t - t0) // 10), []).append(lag)
                by_sec.setdefault(int(t - t0), []).append(lag)
        by_window = [{"from_s": 10 * k, "commits": len(v), "p50_ms": 1000 * pct(v, 50),
                      "p99_ms": 1000 * pct(v, 99)} for k, v in sorted(windows.items())]
        machine = busy.done(0.0)
        # then every database restored and compared with what the writer left (a stop that
        # loses a commit, a database parked over one, shows here)
        time.sleep(3.0)  # Litestream ships once a second
        run.stop(120)
        expect = {rel: digest(root / rel) for rel in rels}
        kept = root.with_name(root.name + "-written")
        root.rename(kept)
        restored = restore_all(tool, run, work, root, replica, rels)
        equal = sum(1 for rel in rels
                    if (root / rel).exists() and digest(root / rel) == expect[rel])
        rc.retire(kept, work)
        return {"ok": True, "databases": n, "processes": len(run.procs),
                "commits": len(commits), "matched": len(ls),
                "lag_by_window": by_window,
                # each second's p50, p99 and max (ms): what recurs, and when
                "lag_by_second": [[k, round(1000 * pct(v, 50), 1), round(1000 * pct(v, 99), 1),
                                   round(1000 * max(v), 1)] for k, v in sorted(by_sec.items())],
                "writer_busy": busy_count,
                "lag_p50_ms": 1000 * pct(ls, 50), "lag_p99_ms": 1000 * pct(ls, 99),
                "lag_max_ms": 1000 * max(ls, default=float("nan")),
                "cpu_pct": 100 * (b["cpu_s"] - a["cpu_s"]) / (seconds + 10),
                # where it went: CPU milliseconds a commit by thread (threads named alike
                # summed; one that ended meanwhile is missing)
                "cpu_ms_per_commit_by_thread": {
                    k: round(1000 * (v - ta.get(k, 0.0)) / max(1, len(commits)), 3)
                    for k, v in sorted(tb.items(), key=lambda kv: -kv[1])},
                "rss_mib": b["rss_mib"], "threads": b["threads"], "machine": machine,
                "restored_equal": equal, "restore_s": restored["seconds"]}
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        run.stop()
        rc.retire(root, work)
        rc.retire(replica, work)


LOST_COMMITS = 3  # transactions a database gets after its first snapshot (lost phase)
LITESTREAM_PARALLEL = 4  # Litestream restores at a time: ours restores 4 databases at a time


def digest(db: Path) -> str:
    """The rows of a benchmark database, hashed."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return hashlib.sha256(repr(c.execute("SELECT id, v FROM t ORDER BY id").fetchall())
                              .encode()).hexdigest()
    finally:
        c.close()


def settle(run: Run, probe: Any, since: float | None = None) -> bool | None:
    """Wait until ``probe()`` (a count of the tool's writes or objects) stays the same for
    ``SETTLE`` seconds: True; False if it still changes ``SETTLE_MAX`` seconds after
    ``since`` (``time.monotonic()``; None: the tool's start); None if the tool exited."""
    last, last_change = -1, time.monotonic()
    since = run.t0 if since is None else since
    while time.monotonic() - last_change < SETTLE:
        if not run.alive():
            return None
        if time.monotonic() - since > SETTLE_MAX:
            return False
        cur = probe()
        if cur != last:
            last, last_change = cur, time.monotonic()
        time.sleep(1.0)
    return True


def lost(tool: str, work: Path, n: int, s3: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """A lost directory brought back: ``n`` databases replicated to a local directory (with
    ``s3``: to S3, through the recording proxy), each committing ``LOST_COMMITS`` transactions
    more, the tool stopped, the directory deleted; then every database restored from the
    replica to its place. Ours: one ``restore --config FILE --all``; Litestream: one
    ``litestream restore -o DB URL`` a database, ``LITESTREAM_PARALLEL`` at a time (it has no
    command for a directory). Timed from the start of the restore to the last database
    written, CPU of every process it took, S3 requests it made; every database is compared with
    what was committed."""
    where = "s3" if s3 is not None else "local"
    root, replica_dir = work / f"lost-{tool}-{where}", work / f"lost-{tool}-{where}-replica"
    rels = make_dbs(root, n)
    env = None
    if s3 is not None:
        server, proxy = s3
        bucket = server.create_bucket()
        replica = (f"s3://{bucket}/t?endpoint={proxy.endpoint}&region=us-east-1"
                   "&force_path_style=true")
        env = {**rc_s3_env(), "BENCH_ENDPOINT": proxy.endpoint}
    else:
        replica = str(replica_dir)
    run = Run(tool, work, root, replica, env)
    run.start()
    try:
        if s3 is not None:
            if not settle(run, lambda: writes(s3[1]), time.monotonic()):
                return {"ok": False, "why": "not settled", "log": run.tail()}
        else:
            res = wait_replicated(run, replica_dir, n, 600, 1 << 20)
            if not res["ok"]:
                return res
        for rel in rels:
            c = sqlite3.connect(root / rel, isolation_level=None)
            for _ in range(LOST_COMMITS):
                c.execute("INSERT INTO t(v) VALUES (randomblob(200))")
            c.close()
        expect = {rel: digest(root / rel) for rel in rels}
        if s3 is not None:
            settle(run, lambda: writes(s3[1]), time.monotonic())
        else:
            time.sleep(SETTLE)  # Litestream ships once a second
    finally:
        run.stop(120)
    rc.retire(root, work)  # lost: gone from where it was
    url = None if s3 is None else (f"s3://{bucket}/t/{{rel}}?endpoint={s3[1].endpoint}"
                                   "&region=us-east-1&forcePathStyle=true")
    out = restore_all(tool, run, work, root, replica_dir, rels, url,
                      s3[1] if s3 is not None else None)
    equal = sum(1 for rel in rels if (root / rel).exists() and digest(root / rel) == expect[rel])
    rc.retire(root, work)
    rc.retire(replica_dir, work)
    return {**out, "databases": n, "destination": where, "equal": equal}


def restore_all(tool: str, run: Run, work: Path, root: Path, replica_dir: Path,
                rels: list[str], url: str | None = None, proxy: Any = None) -> dict[str, Any]:
    """Every database of ``rels`` restored to its place below ``root`` (gone): ours with one
    ``restore --config FILE --all``, Litestream with one ``litestream restore`` a database from
    ``url`` (``{rel}`` in it: the database's relative path; None: below ``replica_dir``),
    ``LITESTREAM_PARALLEL`` at a time. Time, CPU of the processes, S3 requests (``proxy``)."""
    busy = rc.Background()
    before = os.times()
    req0 = proxy.mark() if proxy is not None else 0
    t0 = time.perf_counter()
    if tool.startswith("ours"):
        r = subprocess.run([sys.executable, "-m", "replicator", "restore", "--config",
                            str(run.cfg), "--all"], capture_output=True, text=True,
                           env=run.env, cwd=work, check=False)
        failed = r.returncode != 0
        why = r.stderr[-500:]
    else:
        import concurrent.futures

        def one(rel: str) -> int:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            src = f"file://{replica_dir / rel}" if url is None else url.format(rel=rel)
            return subprocess.run([rc.litestream_binary(), "restore", "-o", str(root / rel),
                                   src], capture_output=True, env=run.env,
                                  check=False).returncode

        with concurrent.futures.ThreadPoolExecutor(LITESTREAM_PARALLEL) as pool:
            codes = list(pool.map(one, rels))
        failed = any(codes)
        why = f"{sum(1 for x in codes if x)} restores failed"
    seconds = time.perf_counter() - t0
    after = os.times()
    return {"ok": not failed, "why": why if failed else None, "seconds": seconds,
            "cpu_s": (after.children_user + after.children_system
                      - before.children_user - before.children_system),
            "requests": proxy.mark() - req0 if proxy is not None else None,
            "machine": busy.done(0.0)}


def rc_s3_env() -> dict[str, str]:
    import s3fixtures as fx
    return {**fx.S3_ENV_VARS, "AWS_REGION": fx.TEST_REGION}


def start_s3(work: Path) -> tuple[Any, Any, Any] | None:
    import s3fixtures as fx
    from s3 import Proxy
    weed = fx.find_weed()
    if weed is None:
        return None
    proc, server = fx._launch(weed, str(work))
    return proc, server, Proxy(server.port, work)


# ------------------------------------------------------------------------------ report

def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec) if isinstance(v, int | float) else str(v)


def _machine(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    return f"{fmt(m.get('machine_busy_cpus'), '.2f')}, {fmt(m.get('loadavg_start'), '.1f')}"


def _table(parts: list[dict[str, Any]], header: list[str], cells: Any) -> list[str]:
    """A markdown table: one row per tool of each part (a run's results by tool),
    ``cells(result)`` after the tool's name (a failed run says why), the machine's load last."""
    lines = ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for part, tool in ((p, t) for p in parts for t in tools_of(p)):
        r = part.get(tool, {})
        row = cells(r) if r.get("ok") or "seconds" in header[2] else None
        if row is None:
            row = [f"failed: {r.get('why')}"] + [""] * (len(header) - 4)
        lines.append("| " + " | ".join([str(r.get("databases", "")), label(tool, r), *row,
                                         _machine(r)]) + " |")
    return lines


def windows_p99(r: dict[str, Any]) -> str:
    """The lag p99 of each 10 s of the run, in order ("-" for a run that kept none): whether
    the lag holds or grows as the run goes on. The last window, cut short by the end of the
    writing, is left out when it holds less than half the commits of a full one."""
    ws = r.get("lag_by_window") or []
    full = max((w["commits"] for w in ws), default=0)
    return " / ".join(fmt(w["p99_ms"], ".0f") for w in ws if w["commits"] * 2 >= full) or "-"


def by_count(active: dict[str, Any]) -> dict[str, Any]:
    """An ``active`` result as ``{count: {tool: result}}``: older runs saved one count as
    ``{tool: result}``."""
    if not any(k in TOOLS for k in active):
        return active
    out: dict[str, Any] = {}
    for tool, r in active.items():
        out.setdefault(str(r.get("databases", "?")), {})[tool] = r
    return out


def report(res: dict[str, Any]) -> str:
    lines = [START, "## Many databases: replicator vs Litestream (`bench/many.py`)", "",
             f"Run {res['date']}.", "",
             f"Machine: {res['machine']}. Litestream {res['litestream']}. Each figure beside the "
             "load average and how busy the machine was during the measurement: other jobs share "
             "its 2 cores, so CPU and lag figures are noisy. `python bench/many.py`."]
    load = "machine busy (cores), load"
    lines += _table([res["idle"]], ["idle databases", "tool", "RSS MiB", "threads", "fds (per db)",
                                  "idle CPU % of a core", "requests while idle",
                                  "replicated after", load], lambda r: [
        fmt(r["rss_mib"]), str(r["threads"]), f"{r['fds']} ({fmt(r['fds_per_db'], '.2f')})",
        fmt(r["idle_cpu_pct"], ".2f"), fmt(r["idle_requests"], "d"),
        f"{fmt(r['settled_s'], '.0f')} s"])
    lines += _table([res["big"]], ["start", "tool", "all replicated (seconds)", "replicated",
                                 "RSS MiB", "threads", "fds", load], lambda r: [
        fmt(r.get("seconds"), ".0f") if r.get("ok") else f"no: {r.get('why')}",
        str(r.get("replicated")), fmt(r.get("rss_mib")), fmt(r.get("threads"), "d"),
        fmt(r.get("fds"), "d")])
    active = by_count(res["active"])
    counts = sorted(active, key=lambda n: int(n) if n.isdigit() else 0)
    lines += _table([active[n] for n in counts], [
        "each committing 1/s", "tool", "commits", "lag p50 ms", "p99 ms", "max ms",
        "p99 ms by 10 s", "tool CPU % of a core", "threads", "restored equal", load], lambda r: [
        f"{r['matched']}/{r['commits']}", fmt(r["lag_p50_ms"]), fmt(r["lag_p99_ms"]),
        fmt(r["lag_max_ms"]), windows_p99(r), fmt(r["cpu_pct"]), fmt(r.get("threads"), "d"),
        f"{r['restored_equal']}/{r['databases']}" if "restored_equal" in r else "not run"])
    lines += ["", "Lag: from the writer's commit to the inotify event of the next finished object "
              "of that database in the replica (ours: a `.seg`; Litestream: a level-0 `.ltx`); "
              "a commit whose object had already been written counts from the next one; "
              "by 10 s: of the commits made in each 10 s of the run, in order. "
              "Restored equal: after the run the tool was stopped, and every database restored "
              "from the replica (as in the lost directory below) and compared with the file the "
              "writer left."]
    if len(counts) > 1:
        carried = []
        for tool in tools_of({t: 1 for n in counts for t in active[n]}):
            ok = [int(n) for n in counts if active[n].get(tool, {}).get("ok")
                  and active[n][tool]["lag_p99_ms"] <= P99_TARGET_MS]
            carried.append(f"{label(tool)} {max(ok) if ok else 'none'}")
        lines += ["", f"Largest count measured with lag p99 ≤ {P99_TARGET_MS:.0f} ms (of "
                  f"{', '.join(counts)}): {'; '.join(carried)}."]
    lost_parts = [res[k] for k in ("lost", "lost_s3") if res.get(k)]
    if lost_parts:
        lines += _table(lost_parts, ["lost directory", "tool", "from", "restored equal",
                                     "seconds", "databases a second", "CPU s", "S3 requests",
                                     load], lambda r: [
            r.get("destination", "local"), f"{r['equal']}/{r['databases']}",
            fmt(r["seconds"], ".1f"), fmt(r["databases"] / r["seconds"], ".0f"),
            fmt(r["cpu_s"], ".1f"), fmt(r.get("requests"), "d")])
        lines += ["", f"Lost directory: every database (each with {LOST_COMMITS} transactions "
                  "after its first snapshot) restored from its replica (a local directory; S3: "
                  "SeaweedFS through the recording proxy) to its place after the directory was "
                  "deleted: ours with one `restore --config FILE --all` (4 at a time), "
                  f"Litestream with one `litestream restore` a database, {LITESTREAM_PARALLEL} "
                  "at a time; CPU of every process the restore took."]
    lines += ["", END]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--idle", type=int, default=1000)
    p.add_argument("--idle-seconds", type=float, default=60)
    p.add_argument("--big", type=int, default=10000)
    p.add_argument("--big-timeout", type=float, default=600)
    p.add_argument("--mem-cap", type=float, default=4096, help="MiB of RSS, then stop the tool")
    p.add_argument("--active", default="1000",
                   help="databases committing (a comma-separated list: each count in turn)")
    p.add_argument("--active-seconds", type=float, default=60)
    p.add_argument("--lost", type=int, default=1000,
                   help="databases of the lost directory restored (phase lost)")
    p.add_argument("--only", choices=("idle", "big", "active", "lost"), action="append")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--processes", type=int, default=1,
                   help="also ours split over this many processes (active databases only)")
    p.add_argument("--cpus", default=None, metavar="CPUS",
                   help="also ours with this `cpus` setting (with --processes, also ours split "
                   "with each process on a CPU of its own; active databases only)")
    p.add_argument("--no-s3", action="store_true", help="idle databases to a local directory")
    p.add_argument("--out", help="docs file to update between the markers")
    p.add_argument("--json", default=str(rc.BENCH / "out" / "many.json"),
                   help="the raw numbers: written after every run, read by --resume and "
                   "--report-only (default bench/out/many.json)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--report-only", action="store_true",
                   help="write the report of the raw numbers (--json), run nothing")
    p.add_argument("--resume", action="store_true",
                   help="keep the successful runs of the raw numbers (--json), do the others")
    args = p.parse_args()
    if args.quick:
        args.idle, args.big, args.active, args.lost = 200, 1000, "200", 200
        args.idle_seconds = args.active_seconds = 20
    return args


def main() -> int:
    args = parse_args()
    tools = [t for t in args.tools.split(",") if t]
    if args.processes > 1:
        tools.append(f"ours-{args.processes}")
    if args.cpus:
        tools += [f"{t}@{args.cpus}" for t in list(tools) if t.startswith("ours")]
    only = set(args.only or ("idle", "big", "active", "lost"))
    work = Path(tempfile.mkdtemp(prefix="manybench-", dir=args.workdir))
    res: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                           "machine": f"{os.cpu_count()} cores, {platform_facts()}, "
                                      f"databases on {rc.fs_kind(work)}",
                           "litestream": rc.litestream_version(), "idle": {}, "big": {},
                           "active": {}, "lost": {}}
    saved = Path(args.json)
    if args.report_only:
        return write_report(json.loads(saved.read_text()), args.out)
    if args.resume and saved.exists():
        res = {**res, **json.loads(saved.read_text())}
    s3 = None
    try:
        if ("idle" in only or "lost" in only) and not args.no_s3:
            started = start_s3(work)
            if started is not None:
                os.environ.update(rc_s3_env())
                s3 = (started[1], started[2])
                res["s3_proc"] = started
        res["active"] = by_count(res["active"])
        counts = sorted({int(x) for x in str(args.active).split(",") if x.strip()})

        def run_active(n: int) -> Any:
            return lambda t: active(t, work, n, args.active_seconds)

        phases = [("idle", args.idle, res["idle"],
                   lambda t: idle(t, work, args.idle, args.idle_seconds, s3))]
        phases += [("active", n, res["active"].setdefault(str(n), {}), run_active(n))
                   for n in counts]
        phases += [("big", args.big, res["big"],
                    lambda t: big(t, work, args.big, args.big_timeout, args.mem_cap))]
        phases += [("lost", args.lost, res.setdefault("lost", {}),
                    lambda t: lost(t, work, args.lost))]
        if s3 is not None:
            phases += [("lost", args.lost, res.setdefault("lost_s3", {}),
                        lambda t: lost(t, work, args.lost, s3))]
        for phase, n, part, fn in phases:
            for tool in tools if phase in only else []:
                variant = split_tool(tool)[1] > 1 or cpus_of(tool) is not None
                if part.get(tool, {}).get("ok") or (variant and phase != "active"):
                    continue  # kept from an earlier run (--resume); split, pinned: active only
                log(f"{phase}: {tool}, {n} databases")
                try:
                    part[tool] = fn(tool)
                except Exception as exc:  # noqa: BLE001 - the other runs go on
                    part[tool] = {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
                log(f"  {part[tool]}")
                save(res, saved)
        for n in [k for k, v in res["active"].items() if not v]:
            del res["active"][n]  # a count this run did not measure
    finally:
        started = res.pop("s3_proc", None)
        if started is not None:
            started[2].proc.kill()
            started[0].stop()
        shutil.rmtree(work, ignore_errors=True)
    save(res, saved)
    return write_report(res, args.out)


def write_report(res: dict[str, Any], out: str | None) -> int:
    """Print the report; with ``out``, put it between the markers of that file."""
    text = report(res)
    print(text)
    if out:
        doc = Path(out).read_text()
        if START in doc and END in doc:
            doc = doc[: doc.index(START)] + text + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + text + "\n"
        Path(out).write_text(doc)
    return 0


def save(res: dict[str, Any], path: Path) -> None:
    """The raw numbers, after every run (a later failure loses nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in res.items() if k != "s3_proc"}
    path.write_text(json.dumps(clean, indent=2, default=str))


def platform_facts() -> str:
    import platform
    return f"Linux {platform.release()}, Python {platform.python_version()}, " \
           f"SQLite {sqlite3.sqlite_version}"


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
