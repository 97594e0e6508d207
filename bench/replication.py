"""Replication benchmark: this repository's replicator and Litestream, side by side.

Same machine, same run, same workloads, each tool with a local directory replica. Measures

1. commit-to-replica lag (ping-pong: commit one small transaction, wait until a new object is
   finished in the replica directory, pause 20-80 ms, repeat), p50/p90/p99;
2. writer throughput kept: a flat-out writer process alone, beside each tool (3 interleaved
   repetitions, median), with the largest WAL seen and SQLITE_BUSY errors counted;
3. the tool's CPU time and peak RSS during the flat-out runs, and idle CPU over a quiet period;
4. peak RSS while the initial snapshot of a 50 MiB and a 500 MiB database is taken;
5. restore time of the 500 MiB database from the local replica.

Litestream runs twice where it matters: with its defaults (monitor-interval and sync-interval 1 s)
and tuned for latency (both 10 ms). Everything binds nothing; every child process is stopped in a
``finally``. Raw numbers go to bench/out/replication.json, the report to the section between
``<!-- replication:start -->`` and ``<!-- replication:end -->`` of docs/benchmarks.md.

Run from the repository root: ``python bench/replication.py [--quick] [--out docs/benchmarks.md]``
(``--quick`` is a ~1.5 minute smoke run; the full run takes about 9 minutes, longer when it
has to wait for other jobs on the machine to quiet down).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _repl_common as rc  # noqa: E402
from _repl_common import Litestream, MiB, Ours, Tool  # noqa: E402

WRITER = str(rc.BENCH / "_repl_writer.py")
START = "<!-- replication:start -->"
END = "<!-- replication:end -->"

TARGETS = {"lag_p50_ms": 20.0, "lag_p99_ms": 100.0, "throughput_ratio": 0.90, "rss_mib": 80.0}
# "flat in database size": peak RSS at snapshot grows by at most this much, small db -> big db
FLAT_MIB = 5.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    """One benchmark run: its parameters, work directory and every process it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.work = Path(tempfile.mkdtemp(prefix="replbench-", dir=args.workdir))
        self.tools: list[Tool] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.results: dict[str, Any] = {}
        self._n = 0
        self.quiet_budget = args.quiet_budget
        self.quiet_log: list[dict[str, float]] = []

    # ------------------------------------------------------------------ plumbing

    def quiet(self) -> None:
        """Before a measurement: wait a little for other people's jobs on this machine to calm
        down (bounded per call and in total, so the run time stays bounded)."""
        cap = min(self.args.quiet_wait, self.quiet_budget)
        if cap <= 0:
            return
        waited, rate = rc.wait_quiet(cap)
        self.quiet_budget -= waited
        self.quiet_log.append({"waited_s": waited, "busy_cpus": rate})

    def fresh(self, name: str) -> Path:
        self._n += 1
        d = self.work / f"{self._n:02d}-{name}"
        d.mkdir()
        return d

    def tool(self, key: str, db: Path, d: Path) -> Tool:
        replica = d / "replica"
        t: Tool
        if key == "ours":
            t = Ours(db, replica, d)
        elif key == "litestream":
            t = Litestream(db, replica, d, tuned=False)
        else:
            t = Litestream(db, replica, d, tuned=True)
        self.tools.append(t)
        return t

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        rc.reap(self.tools)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    def save(self, r: dict[str, Any], t_start: float) -> None:
        """Record the run time and quiet waits in ``r`` and write it to the --json file."""
        r["total_s"] = time.monotonic() - t_start
        r["quiet_waits"] = self.quiet_log
        jp = Path(self.args.json)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(r, indent=1))
        log(f"raw numbers: {jp}")

    def run_writer(self, db: Path, duration: float, seed: int = 1) -> dict[str, Any]:
        rate = ["--rate", str(self.args.tp_rate)] if self.args.tp_rate else []
        p = subprocess.Popen([sys.executable, WRITER, str(db), "--duration", str(duration),
                              "--seed", str(seed), *rate],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        out, err = p.communicate(timeout=duration + 120)
        if p.returncode != 0:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    # ------------------------------------------------------------------ 1. lag

    def lag(self, key: str, samples: int) -> dict[str, Any]:
        d = self.fresh(f"lag-{key}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        t = self.tool(key, db, d)
        t.start()
        try:
            snap_s = t.wait_snapshot(120)
            conn = sqlite3.connect(db, timeout=0, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            rnd = random.Random(42)
            busy = 0

            def commit() -> float:
                nonlocal busy
                while True:
                    try:
                        conn.execute("BEGIN")
                        conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)",
                                     (rnd.randrange(1 << 30), os.urandom(100)))
                        conn.execute("COMMIT")
                        return time.perf_counter()
                    except sqlite3.OperationalError as exc:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        if "locked" not in str(exc) and "busy" not in str(exc):
                            raise
                        busy += 1
                        time.sleep(0.001)

            # until the tool's object directory exists, commit and wait
            deadline = time.monotonic() + 60
            while t.object_dir() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{t.label}: no object directory: {t.log_tail()}")
                commit()
                time.sleep(0.2)
            watch = rc.DirWatch(t.object_dir() or "", t.is_object, self.args.watch,
                                stages=t.stage_dirs(), created_whole=t.created_whole)
            lags: list[float] = []
            local: list[float] = []
            multi = timeouts = 0
            self.quiet()
            cpu0 = rc.proc_sample(t.pid)
            bg = rc.Background()
            try:
                for i in range(samples + 5):
                    time.sleep(rnd.uniform(0.020, 0.080))
                    watch.drain()
                    t_commit = commit()
                    got = watch.wait_new(timeout=10.0)
                    if i < 5:  # warm-up
                        continue
                    if got is None:
                        timeouts += 1
                        continue
                    t_visible, names, stages = got
                    multi += len(names) > 1
                    lags.append((t_visible - t_commit) * 1000)
                    if "local" in stages:
                        local.append((stages["local"] - t_commit) * 1000)
            finally:
                watch.close()
                conn.close()
            cpu1 = rc.proc_sample(t.pid)
            tool_cpu = (cpu1.cpu - cpu0.cpu) if cpu0 and cpu1 else 0.0
            load = bg.done(tool_cpu)
        finally:
            rc_, stop_s = t.stop()
            t.clean()
        res = {"tool": key, "label": t.label, "samples": len(lags), "timeouts": timeouts,
               "busy": busy, "multi_object_samples": multi, "snapshot_s": snap_s,
               "elapsed_s": load["wall_s"], "exit_code": rc_, "stop_s": stop_s,
               "cpu_s": tool_cpu, "load": load,
               "local_samples": len(local),
               "local_p50": pct(local, 50) if local else None,
               "local_p99": pct(local, 99) if local else None,
               "lags_ms": [round(x, 3) for x in lags],
               "local_ms": [round(x, 3) for x in local]}
        res.update(summarize(lags))
        log(f"lag {key}: p50 {res.get('p50', float('nan')):.1f} ms p99 "
            f"{res.get('p99', float('nan')):.1f} ms (n={len(lags)}, timeouts {timeouts}; "
            f"local copy p50 {res['local_p50'] or float('nan'):.1f} ms; other load "
            f"{load['other_cpus']:.2f} CPUs)")
        return res

    # ------------------------------------------------------------------ 2/3. throughput, CPU

    def throughput_run(self, key: str, duration: float, seed: int) -> dict[str, Any]:
        d = self.fresh(f"tp-{key}")
        db = d / "db.sqlite"
        rc.init_db(db)
        res: dict[str, Any] = {"config": key}
        t: Tool | None = None
        try:
            if key != "baseline":
                t = self.tool(key, db, d)
                t.start()
                res["snapshot_s"] = t.wait_snapshot(120)
                time.sleep(0.5)
            self.quiet()
            if t is not None:
                s0 = rc.proc_sample(t.pid)
            bg = rc.Background()
            w = self.run_writer(db, duration, seed)
            tool_cpu = 0.0
            res.update({k: w[k] for k in ("commits", "seconds", "busy", "max_wal",
                                          "max_commit_ms")})
            res["per_100ms"] = w["per_100ms"]
            res["commits_per_s"] = w["commits"] / w["seconds"]
            if t is not None:
                s1 = rc.proc_sample(t.pid)
                if s0 is not None and s1 is not None:
                    tool_cpu = s1.cpu - s0.cpu
                    res["tool_cpu_s"] = s1.cpu - s0.cpu
                    res["tool_cpu_pct"] = 100 * (s1.cpu - s0.cpu) / w["seconds"]
                    res["tool_rss_end"] = s1.rss
                    res["tool_hwm"] = s1.hwm
            res["load"] = bg.done(tool_cpu + w["cpu_s"])
            res["writer_cpu_s"] = w["cpu_s"]
            if t is not None:
                # how far behind the replica was when the writer stopped: the time of the last
                # new object in the replica, once nothing new arrived for SETTLE_S seconds
                res["catch_up_s"] = settle(t)
                s2 = rc.proc_sample(t.pid)
                if s0 is not None and s2 is not None:
                    res["tool_cpu_total_s"] = s2.cpu - s0.cpu
                res["new_generations"] = t.new_generations()
                code, stop_s = t.stop()
                res["tool_exit_code"] = code
                res["tool_stop_s"] = stop_s
                res["replica_bytes"] = rc.dir_size(t.replica)
                res["restored_rows"] = self.restored_rows(t)
                res["replica_complete"] = res["restored_rows"] == w["commits"]
        finally:
            if t is not None:
                t.stop()
                t.clean()
            shutil.rmtree(d, ignore_errors=True)
        log(f"throughput {key}: load {os.getloadavg()[0]:.2f}, "
            f"{res['commits_per_s']:.0f} commits/s, max WAL "
            f"{res['max_wal'] / MiB:.1f} MiB, busy {res['busy']}, other load "
            f"{res['load']['other_cpus']:.2f} CPUs"
            + (f", tool CPU {res.get('tool_cpu_pct', 0):.0f}%, HWM "
               f"{res.get('tool_hwm', 0) / MiB:.1f} MiB, "
               f"CPU {res.get('tool_cpu_total_s', 0):.1f}s, "
               f"caught up after "
               f"{res['catch_up_s']:.1f}s, new generations {res['new_generations']}, restored "
               f"{res['restored_rows']}/{res['commits']} commits" if t else ""))
        return res

    def restored_rows(self, t: Tool) -> int | None:
        """Restore the replica (no integrity check) and count the writer's rows in it."""
        out = t.work / "verify.sqlite"
        p = subprocess.run(t.restore_command(out, False), capture_output=True, text=True,
                           timeout=600, cwd=t.work)
        try:
            return rc.count_rows(out, "data") if p.returncode == 0 and out.exists() else None
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{out}{suffix}").unlink(missing_ok=True)

    # ------------------------------------------------------------------ 3. idle CPU

    def idle(self, key: str, seconds: float) -> dict[str, Any]:
        d = self.fresh(f"idle-{key}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        t = self.tool(key, db, d)
        t.start()
        try:
            t.wait_snapshot(120)
            time.sleep(2.0)  # let start-up work settle
            s0 = rc.proc_sample(t.pid)
            bg = rc.Background()
            time.sleep(seconds)
            s1 = rc.proc_sample(t.pid)
            assert s0 is not None and s1 is not None
            load = bg.done(s1.cpu - s0.cpu)
        finally:
            t.stop()
            t.clean()
        assert s0 is not None and s1 is not None
        res = {"tool": key, "seconds": seconds, "cpu_s": s1.cpu - s0.cpu, "rss": s1.rss,
               "hwm": s1.hwm, "load": load}
        log(f"idle {key}: {res['cpu_s']:.2f} CPU s in {seconds:.0f} s, RSS "
            f"{s1.rss / MiB:.1f} MiB")
        return res

    # ------------------------------------------------------------------ 4/5. size, restore

    def size_and_restore(self, sizes: list[int], burst: float) -> dict[str, Any]:
        out: dict[str, Any] = {"snapshot": [], "restore": []}
        bases = {}
        for mib in sizes:
            base = self.work / f"base-{mib}.sqlite"
            t0 = time.monotonic()
            rc.make_big_db(base, mib)
            bases[mib] = base
            log(f"built {mib} MiB database in {time.monotonic() - t0:.1f}s "
                f"({base.stat().st_size / MiB:.0f} MiB)")
        largest = max(sizes)
        for mib in sizes:
            for key in ("ours", "litestream"):
                d = self.fresh(f"size{mib}-{key}")
                db = d / "db.sqlite"
                shutil.copyfile(bases[mib], db)
                t = self.tool(key, db, d)
                t.start()
                rec: dict[str, Any] = {"tool": key, "db_mib": db.stat().st_size / MiB}
                try:
                    rec["snapshot_s"] = t.wait_snapshot(600)
                    s = rc.proc_sample(t.pid)
                    assert s is not None
                    rec["hwm_at_snapshot"] = s.hwm
                    time.sleep(2.0)
                    s = rc.proc_sample(t.pid)
                    assert s is not None
                    rec["hwm_after_2s"] = s.hwm
                    if mib == largest:
                        w = self.run_writer(db, burst, seed=7)
                        rec["burst_commits"] = w["commits"]
                        s = rc.proc_sample(t.pid)
                        assert s is not None
                        rec["hwm_after_burst"] = s.hwm
                    code, stop_s = t.stop(timeout=300)
                    rec["exit_code"] = code
                    rec["stop_s"] = stop_s
                    rec["replica_bytes"] = rc.dir_size(t.replica)
                    if mib == largest:
                        out["restore"].extend(self.restores(t, db))
                finally:
                    t.stop()
                    t.clean()
                    shutil.rmtree(d, ignore_errors=True)
                out["snapshot"].append(rec)
                log(f"snapshot {mib} MiB {key}: {rec['snapshot_s']:.1f}s, peak RSS "
                    f"{rec['hwm_at_snapshot'] / MiB:.1f} MiB")
        for base in bases.values():
            base.unlink()
        return out

    def restores(self, t: Tool, db: Path) -> list[dict[str, Any]]:
        want = (rc.count_rows(db, "data"), rc.count_rows(db, "blobs"))
        res = []
        for check in (False, True):
            out = t.work / f"restored-{int(check)}.sqlite"
            cmd = t.restore_command(out, check)
            times = []
            for _attempt in range(2):  # best of two: the first may pay for a cold page cache
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{out}{suffix}").unlink(missing_ok=True)
                t0 = time.monotonic()
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=t.work)
                times.append(time.monotonic() - t0)
                if p.returncode:
                    break
            took = min(times)
            ok = p.returncode == 0 and out.exists()
            got = (rc.count_rows(out, "data"), rc.count_rows(out, "blobs")) if ok else None
            rec = {"tool": t.key, "integrity_check": check, "seconds": took, "all_s": times,
                   "exit_code": p.returncode, "rows_match": got == want,
                   "size_mib": out.stat().st_size / MiB if ok else None,
                   "stderr": p.stderr[-500:] if p.returncode else ""}
            res.append(rec)
            log(f"restore {t.key} (integrity check {'on' if check else 'off'}): {took:.1f}s, "
                f"rows match {got == want}")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{out}{suffix}").unlink(missing_ok=True)
        return res


SETTLE_S = 2.5  # longer than Litestream's default 1 s sync interval
SETTLE_CAP_S = 120.0


def settle(t: Tool) -> float:
    """Seconds from now until the last change of the replica's objects, once they have not
    changed for SETTLE_S (at most SETTLE_CAP_S)."""
    t0 = time.monotonic()
    sig = t.signature()
    last = t0
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        cur = t.signature()
        if cur != sig:
            sig, last = cur, now
        elif now - last >= SETTLE_S or now - t0 >= SETTLE_CAP_S:
            return last - t0


def pct(xs: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(lags: list[float]) -> dict[str, float]:
    if not lags:
        return {}
    return {"p50": pct(lags, 50), "p90": pct(lags, 90), "p99": pct(lags, 99),
            "min": min(lags), "max": max(lags), "mean": statistics.fmean(lags)}


# ---------------------------------------------------------------------------------- machine


def machine_facts(work: Path) -> dict[str, Any]:
    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], capture_output=True, text=True, cwd=rc.ROOT)
        return r.stdout.strip()

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    fstype = rc.fs_kind(work)
    fd = os.open(work / "fsync-probe", os.O_CREAT | os.O_WRONLY)
    t0 = time.perf_counter()
    for _ in range(20):
        os.write(fd, b"x" * 4096)
        os.fsync(fd)
    fsync_ms = (time.perf_counter() - t0) / 20 * 1000
    os.close(fd)
    os.unlink(work / "fsync-probe")
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "litestream": rc.litestream_version(),
        "replicator_commit": git("rev-parse", "--short", "HEAD"),
        "replicator_dirty": bool(git("status", "--porcelain", "--", "replicator")),
        "work_fs": fstype,
        "fsync_4k_ms": fsync_ms,
    }


# ----------------------------------------------------------------------------------- report


def mib(b: float | None) -> str:
    return "–" if b is None else f"{b / MiB:.1f}"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(r: dict[str, Any]) -> str:  # noqa: C901 - one linear report
    m = r["machine"]
    p = r["params"]
    L = []  # noqa: N806
    a = L.append
    a("## Replication: replicator vs Litestream (`bench/replication.py`)")
    a("")
    kind = "**--quick** smoke run: small samples, not for comparison" if p["quick"] else "full run"
    a(f"Run {m['date_utc']} ({kind}, took {r['total_s'] / 60:.1f} min). "
      f"Machine: {m['nproc']} CPUs ({m['cpu']}), "
      f"Linux {m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}, Litestream "
      f"{m['litestream']}, replicator at {m['replicator_commit']}"
      f"{' + uncommitted changes' if m['replicator_dirty'] else ''}. Databases and replicas on "
      f"{m['work_fs']} (one 4 KiB write + fsync: {m['fsync_4k_ms']:.1f} ms).")
    a("")
    a("Both tools replicate to a local directory. Ours runs with its defaults "
      "(`python -m replicator replicate DB DIR`, checkpoint-pages 1000). Litestream runs from a "
      "config file with a `type: file` replica, once with its defaults (monitor-interval and "
      "sync-interval 1 s) and once tuned for latency (`monitor-interval: 10ms` on the database, "
      "`sync-interval: 10ms` on the replica).")
    a("")

    # summary
    lag = {x["tool"]: x for x in r["lag"]}
    tp = r["throughput"]["summary"]
    a("### Summary against the targets")
    a("")
    a("| target | replicator (ours) | Litestream defaults | Litestream 10 ms |")
    a("|---|---|---|---|")

    def lagcell(k: str, q: str) -> str:
        x = lag.get(k)
        return f"{x[q]:.1f} ms" if x and q in x else "–"

    o = lag.get("ours", {})
    a(f"| lag p50 ≤ 20 ms | {lagcell('ours', 'p50')} {met(o.get('p50', 1e9) <= 20)} | "
      f"{lagcell('litestream', 'p50')} | {lagcell('litestream_tuned', 'p50')} |")
    a(f"| lag p99 ≤ 100 ms | {lagcell('ours', 'p99')} {met(o.get('p99', 1e9) <= 100)} | "
      f"{lagcell('litestream', 'p99')} | {lagcell('litestream_tuned', 'p99')} |")

    def ratio(k: str) -> str:
        x = tp.get(k)
        return f"{x['ratio']:.2f}" if x else "–"

    a(f"| writer keeps ≥ 90 % of its throughput | {ratio('ours')} "
      f"{met(tp.get('ours', {}).get('ratio', 0) >= 0.9)} | {ratio('litestream')} | "
      f"{ratio('litestream_tuned')} |")
    def peak(key: str) -> tuple[float, str]:
        """The largest VmHWM of a tool over the whole benchmark and where it was seen."""
        cands = [(x.get("tool_hwm", 0), "flat-out writer run") for x in r["throughput"]["runs"]
                 if x["config"] == key]
        for s in r["size"]["snapshot"]:
            if s["tool"] == key:
                cands.append((s["hwm_at_snapshot"], f"snapshot of {s['db_mib']:.0f} MiB"))
                cands.append((max(s["hwm_after_2s"], s.get("hwm_after_burst") or 0),
                              f"{s['db_mib']:.0f} MiB database after the snapshot"))
        cands += [(x["hwm"], "idle") for x in r["idle"] if x["tool"] == key]
        return max(cands) if cands else (0, "")

    pk = {k: peak(k) for k in ("ours", "litestream", "litestream_tuned")}
    a(f"| peak RSS ≤ 80 MiB (largest VmHWM in any phase) | {mib(pk['ours'][0])} MiB "
      f"({pk['ours'][1]}) {met(pk['ours'][0] / MiB <= TARGETS['rss_mib'])} | "
      f"{mib(pk['litestream'][0])} MiB ({pk['litestream'][1]}) | "
      f"{mib(pk['litestream_tuned'][0])} MiB ({pk['litestream_tuned'][1]}) |")

    def flat(key: str) -> tuple[str, bool]:
        snaps = [s for s in r["size"]["snapshot"] if s["tool"] == key]
        if len(snaps) < 2:
            return "–", True
        lo, hi = snaps[0], snaps[-1]
        grow = (hi["hwm_after_2s"] - lo["hwm_after_2s"]) / MiB
        return (f"{mib(lo['hwm_after_2s'])} → {mib(hi['hwm_after_2s'])} MiB "
                f"({lo['db_mib']:.0f} → {hi['db_mib']:.0f} MiB database)"), grow <= FLAT_MIB

    fo, fl = flat("ours")
    a(f"| RSS flat in database size (peak up to 2 s after the snapshot grows ≤ "
      f"{FLAT_MIB:.0f} MiB) | {fo} "
      f"{met(fl)} | {flat('litestream')[0]} | not run |")
    def wal(k: str) -> str:
        x = tp.get(k)
        return f"{x['max_wal'] / MiB:.0f} MiB" if x else "–"

    a(f"| (no target) largest WAL during the flat-out runs; alone: {wal('baseline')} | "
      f"{wal('ours')} | {wal('litestream')} | {wal('litestream_tuned')} |")
    a("")
    a("Ratios are the median commits/s beside the tool over the median baseline. Litestream "
      "10 ms was not run on the big databases.")
    a("")

    # lag
    a("### 1. Commit-to-replica lag (ping-pong)")
    a("")
    a("A writer in the benchmark process commits one small transaction (100-byte row, "
      "synchronous=NORMAL), takes t_commit when COMMIT returns, then waits until a new object is "
      f"finished in the replica directory ({p['watch']}: "
      + ("an inotify watch for rename-into-place / close-after-write of a final name"
         if p["watch"] == "inotify" else "directory listing every 1 ms")
      + "; ours: `generations/<gen>/wal/*.seg`, Litestream: `ltx/0/*.ltx`), takes t_visible, "
      "pauses 20–80 ms (random) and commits again. 5 warm-up commits are dropped. The database "
      "holds 1000 rows; no other writer.")
    a("")
    a("| tool | samples | p50 ms | p90 ms | p99 ms | max ms | mean ms | timeouts (10 s) | "
      "local copy p50 / p99 ms | tool CPU s | other load, CPUs |")
    a("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in r["lag"]:
        loc = (f"{x['local_p50']:.1f} / {x['local_p99']:.1f}" if x.get("local_p50") is not None
               else "–")
        a(f"| {x['label']} | {x['samples']} | {x.get('p50', 0):.1f} | {x.get('p90', 0):.1f} | "
          f"{x.get('p99', 0):.1f} | {x.get('max', 0):.1f} | {x.get('mean', 0):.1f} | "
          f"{x['timeouts']} | {loc} | {x['cpu_s']:.2f} | {x['load']['other_cpus']:.2f} |")
    a("")
    a("\"Local copy\" is when the same change first appeared, finished, in the tool's local "
      "directory beside the database (ours: the spool `.<db>-replicator/generations/<gen>/wal`, "
      "Litestream: its `.<db>-litestream/ltx/0`), before it was copied to the replica. \"Other "
      "load\" is the machine's busy CPU time during the measurement minus the CPU time of the "
      "benchmark's own processes (this script, the tool, the writer), in CPUs. It includes kernel "
      "threads doing I/O for us (about 0.1 CPUs beside a lone flat-out writer on a quiet "
      "machine); well above that, other jobs were running on this shared 2-CPU machine and the "
      "figures of that measurement are noisier.")
    a("")
    a("Litestream with its defaults ships on a 1 s tick, and ping-pong locks onto that tick (the "
      "next commit follows the previous shipment by 20–80 ms, so it waits most of the next "
      "second): its figures are ~1 s minus the pause. Commits at random times would see about "
      "0.5 s on average, up to ~1 s (inferred from the tick, not measured here).")
    a("")

    # throughput
    runs = r["throughput"]["runs"]
    a("### 2./3. Writer throughput kept, WAL size, replicator CPU and memory")
    a("")
    a(f"A separate writer process commits one-row transactions flat out for "
      f"{p['tp_duration']:.0f} s (512-byte random payload, random key under an index, "
      "synchronous=NORMAL, no busy timeout) on a fresh database: alone (baseline), and beside each "
      f"tool once its initial snapshot is in the replica. {p['tp_reps']} repetitions, "
      "interleaved; the table shows the median commits/s, the range, and each repetition's "
      "ratio to the baseline run of the same repetition.")
    a("")
    a("| writer beside | commits/s (median) | range | ratio to baseline | per-rep ratios | "
      "max WAL MiB | "
      "SQLITE_BUSY | slowest commit ms | tool CPU % of a core | tool peak RSS MiB | "
      "replica caught up after writer s | SIGTERM to exit s | other load, CPUs |")
    a("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in r["throughput"]["order"]:
        s = tp[key]
        if key == "baseline":
            tool_cells = "– | – | – | – |"
        else:
            catch = f"{s['catch_up_s']:.1f}" if "catch_up_s" in s else "–"
            tool_cells = (f"{s['tool_cpu_pct']:.0f} | {mib(s['tool_hwm'])} | {catch} | "
                          f"{s['stop_s']:.1f} |")
        a(f"| {s['label']} | {s['median']:.0f} | {s['min']:.0f}–{s['max']:.0f} | "
          f"{s['ratio']:.2f} | {' '.join(f'{v:.2f}' for v in s['rep_ratios'])} | "
          f"{s['max_wal'] / MiB:.1f} | {s['busy']} | {s['max_commit_ms']:.0f} | "
          f"{tool_cells} {s['other_cpus']:.2f} |")
    a("")
    a("A ratio near or above 1 together with a WAL of hundreds of MiB does not mean the tool "
      "costs nothing. The baseline writer spends much of its time in the fsyncs of its automatic "
      "checkpoints (with synchronous=OFF the same writer ran about 3x faster on this machine); "
      "while the WAL is not reset those checkpoints change character, and the writer can end up "
      "faster than alone (our inference; not measured separately). The WAL column matters as "
      "much as the ratio: the WAL is the database's to read through and, later, to checkpoint.")
    a("")
    a("Max WAL, SQLITE_BUSY and slowest commit are over all repetitions, the other columns are "
      "medians. \"Replica caught up after writer\" is when the last new object arrived in "
      "the replica after the writer's last commit (the replica then stayed unchanged for "
      f"{SETTLE_S} s), i.e. how far behind the replica was at the end of the run; \"SIGTERM "
      "to exit\" is measured after that. Tool CPU is over the writer's run only.")
    a("")
    a("After each run with a tool the replica was restored and its rows counted:")
    a("")
    a("| tool | restored commits / writer commits, per repetition | full snapshots started "
      "during the run (new generations) |")
    a("|---|---|---|")
    for key in r["throughput"]["order"][1:]:
        rs = [x for x in runs if x["config"] == key]
        cells = ", ".join(f"{x['restored_rows']}/{x['commits']}"
                          + ("" if x["replica_complete"] else " **incomplete**") for x in rs)
        gens = (", ".join(str(x["new_generations"]) for x in rs) if key == "ours"
                else "not tracked")
        a(f"| {LABELS[key]} | {cells} | {gens} |")
    a("")
    a("Idle: a 1000-row database, no writes, CPU time used over "
      f"{p['idle_seconds']:.0f} s (after 2 s of settling):")
    a("")
    a("| tool | idle CPU s | % of a core | RSS MiB | other load, CPUs |")
    a("|---|---|---|---|---|")
    for x in r["idle"]:
        a(f"| {LABELS[x['tool']]} | {x['cpu_s']:.2f} | {100 * x['cpu_s'] / x['seconds']:.1f} | "
          f"{mib(x['rss'])} | {x['load']['other_cpus']:.2f} |")
    a("")

    # size
    a("### 4. Peak RSS while snapshotting a big database")
    a("")
    a("A database of random 64 KiB blobs, copied fresh for each tool; the tool starts on it and "
      "its peak RSS (VmHWM) is read as soon as the initial snapshot is in the replica (ours: a "
      "`.snap` object, Litestream: the level-9 snapshot), and again 2 s later"
      + (f" and after a {p['burst']:.0f} s flat-out writer burst on the largest database" if
         p["burst"] else "") + ".")
    a("")
    a("| tool | database MiB | time to snapshot s | peak RSS at snapshot MiB | +2 s MiB | "
      "after burst MiB | replica MiB |")
    a("|---|---|---|---|---|---|---|")
    for s in r["size"]["snapshot"]:
        a(f"| {LABELS[s['tool']]} | {s['db_mib']:.0f} | {s['snapshot_s']:.1f} | "
          f"{mib(s['hwm_at_snapshot'])} | {mib(s['hwm_after_2s'])} | "
          f"{mib(s.get('hwm_after_burst'))} | {mib(s['replica_bytes'])} |")
    a("")

    # restore
    a("### 5. Restore time")
    a("")
    a("From the local replica of the largest database (initial snapshot + the WAL of the burst), "
      "to a new file; rows compared with the source afterwards. Ours checks integrity by "
      "default (`--no-integrity-check` turns it off); Litestream does not by default "
      "(`-integrity-check full` turns it on).")
    a("")
    a("| tool | integrity check | seconds | rows match source |")
    a("|---|---|---|---|")
    for x in r["size"]["restore"]:
        a(f"| {LABELS[x['tool']]} | {'full' if x['integrity_check'] else 'off'} | "
          f"{x['seconds']:.1f} | {'yes' if x['rows_match'] else 'NO'}"
          f"{'' if x['exit_code'] == 0 else ' (exit ' + str(x['exit_code']) + ')'} |")
    a("")
    if r.get("notes"):
        a("### Observations")
        a("")
        for n in r["notes"]:
            a(f"- {n}")
        a("")
    a("Raw numbers (every lag sample, per-100 ms commit counts of every writer run): "
      "`bench/out/replication.json`.")
    return "\n".join(L) + "\n"


LABELS = {"ours": "replicator (ours)", "litestream": "Litestream 0.5, defaults (1s)",
          "litestream_tuned": "Litestream 0.5, monitor/sync-interval 10ms",
          "baseline": "nothing (baseline)"}


def write_report(path: Path, section: str) -> None:
    rc.write_section(path, START, END, section)


def observations(r: dict[str, Any]) -> list[str]:
    """Plain statements derived from the numbers (no tuning, no hiding)."""
    notes = []
    tp = r["throughput"]["summary"]
    for key in ("ours", "litestream", "litestream_tuned"):
        s = tp.get(key)
        if s and s["busy"]:
            notes.append(f"{s['label']}: the writer got SQLITE_BUSY {s['busy']} times.")
    for key in ("ours", "litestream", "litestream_tuned"):
        s = tp.get(key)
        if s and s.get("catch_up_s", 0) > 1.5:
            notes.append(f"{s['label']}: at the end of a {r['params']['tp_duration']:.0f} s "
                         f"flat-out run the replica was {s['catch_up_s']:.1f} s behind the "
                         "writer (median).")
        rs = [x for x in r["throughput"]["runs"] if x["config"] == key]
        bad = [x for x in rs if not x.get("replica_complete")]
        if bad:
            notes.append(f"{LABELS[key]}: after {len(bad)} of {len(rs)} flat-out runs the "
                         "restored replica did not hold every commit (see the table).")
        gens = sum(x.get("new_generations", 0) for x in rs)
        if gens:
            notes.append(f"{LABELS[key]}: {gens} new generations (full snapshots) started during "
                         f"the {len(rs)} flat-out runs (the log says: WAL reset that could not "
                         "be proven continuous).")
    base = tp.get("baseline")
    if base and base["max_wal"]:
        for key in ("ours", "litestream", "litestream_tuned"):
            s = tp.get(key)
            if s and s["max_wal"] > 4 * base["max_wal"]:
                notes.append(f"{s['label']}: the WAL grew to {s['max_wal'] / MiB:.0f} MiB "
                             f"(baseline {base['max_wal'] / MiB:.0f} MiB).")
    return notes


def throughput_summary(runs: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in order:
        rs = sorted((x for x in runs if x["config"] == key), key=lambda x: x["commits_per_s"])
        if not rs:
            continue
        vals = [x["commits_per_s"] for x in rs]
        s: dict[str, Any] = {
            "label": LABELS[key], "median": statistics.median(vals), "min": vals[0],
            "max": vals[-1], "max_wal": max(x["max_wal"] for x in rs),
            "busy": sum(x["busy"] for x in rs),
            "max_commit_ms": max(x["max_commit_ms"] for x in rs),
            "other_cpus": statistics.median(x["load"]["other_cpus"] for x in rs),
        }
        if key != "baseline":
            s["tool_cpu_pct"] = statistics.median(x.get("tool_cpu_pct", 0) for x in rs)
            s["tool_hwm"] = max(x.get("tool_hwm", 0) for x in rs)
            s["stop_s"] = statistics.median(x.get("tool_stop_s", 0) for x in rs)
            if all("catch_up_s" in x for x in rs):
                s["catch_up_s"] = statistics.median(x["catch_up_s"] for x in rs)
        out[key] = s
    base = out.get("baseline", {}).get("median")
    for s in out.values():
        s["ratio"] = s["median"] / base if base else float("nan")
    # each run against the baseline of its own repetition
    bases = [x["commits_per_s"] for x in runs if x["config"] == "baseline"]
    for key, s in out.items():
        mine = [x["commits_per_s"] for x in runs if x["config"] == key]
        s["rep_ratios"] = [a / b for a, b in zip(mine, bases, strict=False) if b]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watch", choices=["inotify", "poll"], default="inotify",
                    help="how the lag test sees new replica objects")
    ap.add_argument("--only", default="lag,throughput,idle,size",
                    help="comma-separated phases to run (report needs all)")
    ap.add_argument("--tools", default="baseline,ours,litestream,litestream_tuned",
                    help="throughput phase: which of baseline, ours, litestream, "
                    "litestream_tuned to run (e.g. baseline,ours for a quick flat-out check)")
    ap.add_argument("--tp-duration", type=float, default=None,
                    help="throughput phase: seconds per writer run (default 10, 3 with --quick)")
    ap.add_argument("--tp-reps", type=int, default=None,
                    help="throughput phase: interleaved repetitions (default 3, 1 with --quick)")
    ap.add_argument("--tp-rate", type=float, default=None,
                    help="throughput phase: commit this many times a second instead of flat out "
                    "(compares CPU per commit of versions that both keep up)")
    args = rc.bench_args(ap, "replication.json", "reduced smoke run (~1.5 min)", quiet_wait=8.0,
                         quiet_budget=60.0)
    q = args.quick
    params = {
        "quick": q, "watch": args.watch,
        "lag_samples": 30 if q else 200,
        "lag_samples_default_ls": 10 if q else 100,
        "tp_duration": args.tp_duration or (3.0 if q else 10.0),
        "tp_reps": args.tp_reps or (1 if q else 3),
        "idle_seconds": 3.0 if q else 10.0,
        "sizes": [10, 50] if q else [50, 500],
        "burst": 1.0 if q else 3.0,
    }
    phases = set(args.only.split(","))
    if (old := rc.report_from_json(args)) is not None:
        t = old["throughput"]
        t["summary"] = throughput_summary(t["runs"], t["order"])
        old["notes"] = observations(old)
        write_report(Path(args.out), render(old))
        log(f"report: {args.out} (from {args.from_json})")
        return 0

    rc.interrupt_on_sigterm()
    bench = Bench(args)
    t_start = time.monotonic()
    r: dict[str, Any] = {"params": params}
    try:
        r["machine"] = machine_facts(bench.work)
        log(f"work dir {bench.work} ({r['machine']['work_fs']}), litestream "
            f"{r['machine']['litestream']}")
        if "lag" in phases:
            r["lag"] = [
                bench.lag("ours", params["lag_samples"]),
                bench.lag("litestream_tuned", params["lag_samples"]),
                bench.lag("litestream", params["lag_samples_default_ls"]),
            ]
        if "throughput" in phases:
            order = args.tools.split(",")
            runs = []
            for rep in range(params["tp_reps"]):
                for key in order:
                    runs.append(bench.throughput_run(key, params["tp_duration"], seed=rep + 1))
            r["throughput"] = {"order": order, "runs": runs,
                               "summary": throughput_summary(runs, order)}
        if "idle" in phases:
            r["idle"] = [bench.idle(k, params["idle_seconds"])
                         for k in ("ours", "litestream", "litestream_tuned")]
        if "size" in phases:
            r["size"] = bench.size_and_restore(params["sizes"], params["burst"])
    finally:
        bench.cleanup()
    bench.save(r, t_start)
    if phases >= {"lag", "throughput", "idle", "size"}:
        r["notes"] = observations(r)
        write_report(Path(args.out), render(r))
        log(f"report: {args.out} (took {r['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
