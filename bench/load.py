"""Load benchmark: write bursts, CPU per committed byte and bulk loads, beside Litestream.

Same machine, same run, each tool with a local directory replica (ours with its defaults,
Litestream 0.5 with its defaults and tuned to 10 ms intervals, as in ``bench/replication.py``).

1. **Bursts**: a writer process commits one-row transactions (512-byte rows) at 200 a second for
   1 s, rests 3 s, and again. For each burst, the lag is from the moment its last COMMIT returned
   to the moment the replica object holding it was finished in the replica directory (an inotify
   watch; the object holding it is the one that brings the replica's newest txid to its final
   value before the next burst).
2. **Flat-out writer**: the writer commits as fast as it can, alone (baseline) and beside each
   tool right after its bursts; the ratio of commit rates.
3. **CPU per MiB**: the tool's CPU time (user + system, all threads) over the bursts and the
   flat-out run until its replica stopped changing, over the WAL the writer committed (frames
   counted by the writer from the wal-index, times the frame size).
4. **Bulk load**: 1 GiB of 4 KB rows, 250 per transaction, alone and beside ours and Litestream
   (defaults): the writer's rate kept, how long after the last commit the replica caught up, and
   (ours) point-in-time restores to moments during the load: every transaction that committed more
   than 20 ms before the target must be there, and none that committed after it.
5. **Backlog**: the tool is paused (SIGSTOP) while the flat-out writer commits the same number
   of one-row transactions for each tool, then resumed: how fast the writer went meanwhile (a
   paused tool that holds a read transaction keeps the WAL from being checkpointed past it),
   how long the tool takes to hold the writer's last transaction, and its CPU per MiB of that
   WAL: the cost per byte without the bursts' cost per commit, nor a writer slowed down. Twice
   per tool: paused half a second after a few commits (``writing``), and paused after a flat-out
   half second (past ``checkpoint-pages``: ours rotated) and 3 s idle (``idle``: ours released its
   pin), where what the WAL lost meanwhile costs a catch-up (counted).

Run from the repository root: ``python bench/load.py [--quick]`` (``--quick``: ~2 minutes, fewer
bursts, a 256 MiB load; the full run takes about 10 minutes). Raw numbers go to
``bench/out/load.json``, the report between ``<!-- load:start -->`` and ``<!-- load:end -->`` of
docs/benchmarks.md. Every figure is reported with the load average and the CPU other processes used
meanwhile (the machine may be shared).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _repl_common as rc  # noqa: E402
import replication  # noqa: E402
from _repl_common import MiB, Tool  # noqa: E402
from replication import SETTLE_CAP_S, SETTLE_S, machine_facts, pct, settle  # noqa: E402

WRITER = str(rc.BENCH / "_repl_writer.py")
START = "<!-- load:start -->"
END = "<!-- load:end -->"
TOOLS = ("ours", "litestream", "litestream_tuned")
LABELS = {"ours": "replicator (ours)", "litestream": "Litestream 0.5, defaults (1s)",
          "litestream_tuned": "Litestream 0.5, monitor/sync-interval 10ms",
          "baseline": "nothing (baseline)"}
BURST_RATE = 200.0
BURST_PAUSE = 3.0
BULK_ROWS = 250
BULK_PAYLOAD = 4000  # a 4 KB row fits one 4 KiB page
PITR_SLACK_NS = 20_000_000
FRAME_HEADER = 24
ARRIVAL_POLL_S = 0.02
BACKLOG_STATES = ("writing", "idle")
BACKLOG_IDLE_S = 3.0


def newest_txn_arrival(t: Tool, last_commit: float) -> tuple[float, float]:
    """(when the replica first held the writer's last transaction, when its objects stopped
    changing), each in seconds after ``last_commit`` (wall clock).

    Both tools name a change object after the transactions it holds (ours ``<start>-<end>-...``
    in the generation's ``wal/``, Litestream ``<min>-<max>.ltx`` in ``ltx/0/``): the newest
    transaction in the replica is the largest second field among the finished names. One
    listing of that one directory every ``ARRIVAL_POLL_S`` until nothing changed for
    ``SETTLE_S``; the first listing that shows the final newest transaction dates its arrival.
    Objects written later (merges, snapshots, retention) move the second figure only.
    """
    newest, seen_at, t0 = -1, time.time(), time.time()
    sig, changed, polls = t.signature(), time.time(), 0
    while True:
        d = t.object_dir()
        names = os.listdir(d) if d else []
        now = time.time()
        top = max((int(n.split("-")[1].split(".")[0], 16) for n in names if t.is_object(n)),
                  default=-1)
        if top > newest:
            newest, seen_at = top, now
        polls += 1
        cur = t.signature() if polls % 5 == 0 else sig  # a walk of the replica: less often
        if cur != sig:
            sig, changed = cur, now
        if (now - changed >= SETTLE_S and now - seen_at >= SETTLE_S) or now - t0 >= SETTLE_CAP_S:
            return max(0.0, seen_at - last_commit), max(0.0, changed - last_commit)
        time.sleep(ARRIVAL_POLL_S)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def txid_of(name: str) -> int:
    """The newest txid an object covers: the second hex field of both tools' names."""
    return int(name[17:33], 16)


class Bench(replication.Bench):
    """One run: parameters, work directory and every process it started."""

    def __init__(self, args: argparse.Namespace, params: dict[str, Any]) -> None:
        super().__init__(args)
        self.p = params

    def writer(self, db: Path, *opts: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, WRITER, str(db), "--count-frames", *opts],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    @staticmethod
    def result(p: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    # ------------------------------------------------------------------ 1-3

    def bursts(self, t: Tool, db: Path, d: Path) -> dict[str, Any]:
        """The bursts beside a running tool: per-burst lag, objects, CPU."""
        times = d / "burst-times"
        watch = rc.DirWatch(t.object_dir() or "", t.is_object, created_whole=t.created_whole)
        events: list[tuple[float, str]] = []
        bg = rc.Background()
        s0 = rc.proc_sample(t.pid)
        p = self.writer(db, "--rate", str(BURST_RATE), "--duration", "1", "--bursts",
                        str(self.p["bursts"]), "--pause", str(BURST_PAUSE), "--times", str(times))
        try:
            while p.poll() is None:
                events += watch.events(0.05)
            end = time.time() + BURST_PAUSE
            while time.time() < end:
                events += watch.events(0.05)
        finally:
            watch.close()
        w = self.result(p)
        s1 = rc.proc_sample(t.pid)
        cpu = s1.cpu - s0.cpu if s0 and s1 else float("nan")
        commits = [int(x) / 1e9 for x in times.read_text().split()]
        lags, objects = burst_lags(commits, events)
        return {"writer": w, "lags_ms": lags, "objects": objects, "cpu_s": cpu,
                "load": bg.done(cpu + w["cpu_s"])}

    def session(self, key: str, rep: int) -> dict[str, Any]:
        """One tool on a fresh database: bursts, then a flat-out writer, then the replica is
        restored and its rows counted."""
        d = self.fresh(f"{key}-{rep}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        res: dict[str, Any] = {"tool": key, "rep": rep}
        if key == "baseline":
            res["flat"] = self.flat(None, db)
            shutil.rmtree(d, ignore_errors=True)
            return res
        t = self.tool(key, db, d)
        t.start()
        try:
            t.wait_snapshot(120)
            deadline = time.monotonic() + 30
            while t.object_dir() is None:  # one commit makes the tool's object directory
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{t.label}: no object directory: {t.log_tail()}")
                self.result(self.writer(db, "--rate", "10", "--duration", "0.3"))
                time.sleep(0.3)
            time.sleep(1.0)
            s0 = rc.proc_sample(t.pid)
            res["bursts"] = self.bursts(t, db, d)
            res["flat"] = self.flat(t, db)
            s1 = rc.proc_sample(t.pid)
            res["cpu_s"] = s1.cpu - s0.cpu if s0 and s1 else float("nan")
            frames = res["bursts"]["writer"]["wal_frames"] + res["flat"]["wal_frames"]
            page = res["flat"]["page_size"]
            res["wal_mib"] = frames * (page + FRAME_HEADER) / MiB
            res["cpu_s_per_mib"] = res["cpu_s"] / res["wal_mib"]
            stop_and_verify(t, d, db, res)
        finally:
            discard(t, d)
        b = res["bursts"]
        log(f"{key} rep {rep}: burst lag p50 {pct(b['lags_ms'], 50):.1f} max "
            f"{max(b['lags_ms'], default=float('nan')):.1f} ms; flat {res['flat']['rate']:.0f}/s;"
            f" {res['cpu_s']:.1f} CPU s for {res['wal_mib']:.0f} MiB of WAL "
            f"({res['cpu_s_per_mib']:.4f} s/MiB); restored {res['restored_rows']}/{res['rows']}; "
            f"load {b['load']['loadavg_start']:.2f}")
        return res

    def flat(self, t: Tool | None, db: Path) -> dict[str, Any]:
        bg = rc.Background()
        s0 = rc.proc_sample(t.pid) if t else None
        w = self.result(self.writer(db, "--duration", str(self.p["flat_s"])))
        out = {"rate": w["commits"] / w["seconds"], "commits": w["commits"],
               "wal_frames": w["wal_frames"], "page_size": w["page_size"], "busy": w["busy"],
               "max_wal": w["max_wal"], "max_commit_ms": w["max_commit_ms"]}
        if t is not None:
            out["catch_up_s"] = settle(t)
            s1 = rc.proc_sample(t.pid)
            out["tool_cpu_s"] = s1.cpu - s0.cpu if s0 and s1 else float("nan")
        out["load"] = bg.done(out.get("tool_cpu_s", 0.0) + w["cpu_s"])
        if t is None:
            log(f"baseline: {out['rate']:.0f} commits/s, load {out['load']['loadavg_start']:.2f}")
        return out

    # ------------------------------------------------------------------ 4

    def bulk(self, key: str) -> dict[str, Any]:
        d = self.fresh(f"bulk-{key}")
        db = d / "db.sqlite"
        rc.init_db(db)
        t = self.tool(key, db, d) if key != "baseline" else None
        res: dict[str, Any] = {"tool": key}
        try:
            if t is not None:
                t.start()
                t.wait_snapshot(120)
                time.sleep(1.0)
            s0 = rc.proc_sample(t.pid) if t else None
            bg = rc.Background()
            times = d / "bulk-times"
            w = self.result(self.writer(
                db, "--rows", str(BULK_ROWS), "--payload", str(BULK_PAYLOAD), "--max-bytes",
                str(self.p["bulk_mib"] * MiB), "--duration", "900", "--times", str(times)))
            res.update(seconds=w["seconds"], commits=w["commits"],
                       mib_per_s=w["payload_bytes"] / MiB / w["seconds"], max_wal=w["max_wal"])
            if t is not None:
                last_commit = int(times.read_text().split()[-1]) / 1e9
                res["holds_last_s"], res["catch_up_s"] = newest_txn_arrival(t, last_commit)
                s1 = rc.proc_sample(t.pid)
                res["tool_cpu_s"] = s1.cpu - s0.cpu if s0 and s1 else float("nan")
            res["load"] = bg.done(res.get("tool_cpu_s", 0.0) + w["cpu_s"])
            if t is not None:
                res["exit_code"], res["stop_s"] = t.stop(timeout=300)
                res["replica_mib"] = rc.dir_size(t.replica) / MiB
                if key == "ours":
                    commits = [int(x) for x in times.read_text().split()]
                    res["pitr"] = [self.pitr(t, d, commits, q) for q in self.p["pitr_points"]]
        finally:
            discard(t, d)
        log(f"bulk {key}: {res['seconds']:.1f} s ({res['mib_per_s']:.0f} MiB/s)"
            + (f", caught up {res['holds_last_s']:.1f} s after (settled "
               f"{res['catch_up_s']:.1f})" if t else "")
            + f", load {res['load']['loadavg_start']:.2f}")
        return res

    # ------------------------------------------------------------------ 5

    def backlog(self, key: str, state: str) -> dict[str, Any]:
        """The tool paused while the flat-out writer runs, then resumed: catch-up time and CPU
        per MiB of the WAL it found waiting. ``state``: what came before the pause (see
        BACKLOG_STATES)."""
        d = self.fresh(f"backlog-{key}-{state}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        t = self.tool(key, db, d)
        res: dict[str, Any] = {"tool": key, "state": state}
        try:
            t.start()
            t.wait_snapshot(120)
            if state == "writing":
                self.result(self.writer(db, "--rate", "10", "--duration", "0.3"))
                time.sleep(0.5)
            else:
                self.result(self.writer(db, "--duration", "0.5"))
                time.sleep(BACKLOG_IDLE_S)
            os.killpg(t.pid, signal.SIGSTOP)
            try:
                w = self.result(self.writer(db, "--max-bytes", str(self.p["backlog_mib"] * MiB),
                                            "--duration", "900"))
                res["wal_mib"] = w["wal_frames"] * (w["page_size"] + FRAME_HEADER) / MiB
                res.update(commits=w["commits"], writer_s=w["seconds"], max_wal=w["max_wal"])
                s0 = rc.proc_sample(t.pid)
                bg = rc.Background()
                resumed = time.time()
            finally:
                os.killpg(t.pid, signal.SIGCONT)
            res["holds_last_s"], res["settled_s"] = newest_txn_arrival(t, resumed)
            s1 = rc.proc_sample(t.pid)
            res["cpu_s"] = s1.cpu - s0.cpu if s0 and s1 else float("nan")
            res["cpu_s_per_mib"] = res["cpu_s"] / res["wal_mib"]
            res["load"] = bg.done(res["cpu_s"])
            res["catchups"] = len(list(t.replica.glob("generations/*/wal/*.cu")))
            stop_and_verify(t, d, db, res)
        finally:
            discard(t, d)
        log(f"backlog {key} {state}: {res['wal_mib']:.0f} MiB of WAL held "
            f"{res['holds_last_s']:.1f} s after the resume (settled {res['settled_s']:.1f}), "
            f"{res['cpu_s']:.1f} CPU s "
            f"({res['cpu_s_per_mib']:.4f} s/MiB), {res['catchups']} catch-up(s); restored "
            f"{res['restored_rows']}/{res['rows']}")
        return res

    def pitr(self, t: Tool, d: Path, commits: list[int], q: float) -> dict[str, Any]:
        """Restore to a moment ``q`` of the way through the load, between two commits."""
        i = int(len(commits) * q)
        target = (commits[i] + commits[i + 1]) // 2
        out = d / f"pitr-{i}.sqlite"
        when = dt.datetime.fromtimestamp(target // 10**9, dt.UTC)
        stamp = when.strftime("%Y-%m-%dT%H:%M:%S") + f".{target % 10**9:09d}Z"
        cmd = [*t.restore_command(out, False), "--to-time", stamp]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=t.work)
        got = rc.count_rows(out) // BULK_ROWS if p.returncode == 0 and out.exists() else None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
        due = sum(1 for c in commits if c <= target - PITR_SLACK_NS)
        by_t = sum(1 for c in commits if c <= target)
        rec = {"q": q, "target": stamp, "restored_txns": got, "committed_by_t": by_t,
               "committed_20ms_before": due, "exit_code": p.returncode,
               "missing": None if got is None else max(0, due - got),
               "after_t": None if got is None else max(0, got - by_t),
               "stderr": p.stderr[-300:]}
        log(f"pitr at {q:.0%}: restored {got} transactions, {by_t} committed by T, {due} more "
            "than 20 ms before")
        return rec


def burst_lags(commits: list[float], events: list[tuple[float, str]]) -> tuple[
        list[float], list[int]]:
    """Per burst: ms from its last commit to the first object that brought the replica's
    newest txid to its final value before the next burst; and how many objects it got."""
    starts = [0] + [i for i in range(1, len(commits)) if commits[i] - commits[i - 1] > 0.5]
    lags, objects = [], []
    for b, first in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(commits)) - 1
        t_last = commits[last]
        t_next = commits[starts[b + 1]] if b + 1 < len(starts) else float("inf")
        mine = [(t, txid_of(n)) for t, n in events if commits[first] <= t < t_next]
        if not mine:
            continue
        final = max(x for _, x in mine)
        seen = min(t for t, x in mine if x == final)
        lags.append(round(max(0.0, seen - t_last) * 1000, 3))
        objects.append(len(mine))
    return lags, objects


def restored_rows(t: Tool, out: Path) -> int | None:
    p = subprocess.run(t.restore_command(out, False), capture_output=True, text=True,
                       timeout=600, cwd=t.work)
    try:
        return rc.count_rows(out) if p.returncode == 0 and out.exists() else None
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- report


def stop_and_verify(t: Tool, d: Path, db: Path, res: dict[str, Any]) -> None:
    """Stop the tool (exit code and time into ``res``), restore its replica and count the rows
    restored against the database's."""
    res["exit_code"], res["stop_s"] = t.stop()
    res["restored_rows"] = restored_rows(t, d / "verify.sqlite")
    res["rows"] = rc.count_rows(db)


def discard(t: Tool | None, d: Path) -> None:
    """Stop the tool (if still running), remove its replica and state, and the directory."""
    if t is not None:
        t.stop()
        t.clean()
    shutil.rmtree(d, ignore_errors=True)


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """Per tool: burst lag over all bursts, flat-out ratio (median of reps), CPU per MiB."""
    out: dict[str, Any] = {}
    base = statistics.median(x["flat"]["rate"] for x in r["sessions"] if x["tool"] == "baseline")
    for key in TOOLS:
        xs = [x for x in r["sessions"] if x["tool"] == key]
        if not xs:
            continue
        lags = [v for x in xs for v in x["bursts"]["lags_ms"]]
        out[key] = {
            "lag_p50": pct(lags, 50), "lag_p90": pct(lags, 90), "lag_max": max(lags),
            "bursts": len(lags),
            "objects_per_burst": statistics.median(v for x in xs for v in x["bursts"]["objects"]),
            "flat_ratio": statistics.median(x["flat"]["rate"] for x in xs) / base,
            "cpu_s": sum(x["cpu_s"] for x in xs), "wal_mib": sum(x["wal_mib"] for x in xs),
            "complete": all(x["restored_rows"] == x["rows"] for x in xs),
            "loadavg": max(x["bursts"]["load"]["loadavg_start"] for x in xs),
            "other_cpus": statistics.median(x["bursts"]["load"]["other_cpus"] for x in xs),
        }
        out[key]["cpu_per_mib"] = out[key]["cpu_s"] / out[key]["wal_mib"]
    out["baseline_rate"] = base
    return out


def render(r: dict[str, Any]) -> str:  # noqa: C901 - one linear report
    m, p, s = r["machine"], r["params"], summary(r)
    bulk = {x["tool"]: x for x in r["bulk"]}
    L: list[str] = []  # noqa: N806
    a = L.append
    a("## Load: bursts, CPU per byte, bulk loads (`bench/load.py`)")
    a("")
    kind = "**--quick** smoke run: few samples" if p["quick"] else "full run"
    a(f"Run {m['date_utc']} ({kind}, took {r['total_s'] / 60:.1f} min). Machine: {m['nproc']} "
      f"CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}, "
      f"Litestream {m['litestream']}, replicator at {m['replicator_commit']}"
      f"{' + uncommitted changes' if m['replicator_dirty'] else ''}; {m['work_fs']} "
      f"(4 KiB write + fsync: {m['fsync_4k_ms']:.1f} ms). Load average at the start of each "
      "measurement and the CPUs other processes used during it are in the tables: the machine "
      "is shared, and figures taken beside other jobs are noisier.")
    a("")
    a("### Summary against the targets")
    a("")
    a("| target | replicator (ours) | Litestream defaults | Litestream 10 ms |")
    a("|---|---|---|---|")

    def cell(key: str, field: str, fmt: str) -> str:
        x = s.get(key)
        return format(x[field], fmt) if x else "–"

    o = s.get("ours", {})
    ls_def = s.get("litestream", {}).get("cpu_per_mib", float("nan"))
    ls_10ms = s.get("litestream_tuned", {}).get("cpu_per_mib", float("nan"))

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    a(f"| burst lag p50 ≤ 10 ms | {cell('ours', 'lag_p50', '.1f')} ms "
      f"{met(o.get('lag_p50', 1e9) <= 10)} | {cell('litestream', 'lag_p50', '.1f')} ms | "
      f"{cell('litestream_tuned', 'lag_p50', '.1f')} ms |")
    a(f"| burst lag max ≤ 100 ms | {cell('ours', 'lag_max', '.1f')} ms "
      f"{met(o.get('lag_max', 1e9) <= 100)} | {cell('litestream', 'lag_max', '.1f')} ms | "
      f"{cell('litestream_tuned', 'lag_max', '.1f')} ms |")
    a(f"| flat-out writer keeps ≥ 0.95 | {cell('ours', 'flat_ratio', '.2f')} "
      f"{met(o.get('flat_ratio', 0) >= 0.95)} | {cell('litestream', 'flat_ratio', '.2f')} | "
      f"{cell('litestream_tuned', 'flat_ratio', '.2f')} |")
    a(f"| CPU s per MiB of WAL ≤ Litestream's | {cell('ours', 'cpu_per_mib', '.4f')} "
      f"{met(o.get('cpu_per_mib', 1e9) <= ls_def)} (defaults), "
      f"{met(o.get('cpu_per_mib', 1e9) <= ls_10ms)} (10 ms) | "
      f"{cell('litestream', 'cpu_per_mib', '.4f')} | "
      f"{cell('litestream_tuned', 'cpu_per_mib', '.4f')} |")
    base_s = bulk["baseline"]["seconds"]
    ob = bulk.get("ours", {})
    lb = bulk.get("litestream", {})
    a(f"| bulk load: writer keeps ≥ 0.6 | {base_s / ob['seconds']:.2f} "
      f"{met(base_s / ob['seconds'] >= 0.6)} | "
      f"{base_s / lb['seconds']:.2f} | not run |" if ob and lb else "| bulk | – | – | – |")
    held = "holds_last_s" if "holds_last_s" in ob else "catch_up_s"  # older results: settle
    a(f"| bulk load: replica caught up ≤ 2 s after the last commit | {ob.get(held, 0):.1f}"
      f" s {met(ob.get(held, 1e9) <= 2)} | {lb.get(held, float('nan')):.1f} s "
      "| not run |")
    pitr = ob.get("pitr", [])
    missing = sum(x["missing"] or 0 for x in pitr)
    failed = sum(x["restored_txns"] is None for x in pitr)
    a(f"| `--to-time` during the load misses no transaction committed > 20 ms before T | "
      f"{missing} missing over {len(pitr)} restores{f', {failed} failed' if failed else ''} "
      f"{met(missing == 0 and not failed and bool(pitr))} | not run | not run |")
    a("")
    a("### Bursts, flat-out writer, CPU per MiB")
    a("")
    a(f"Each tool runs on a fresh database (1000 rows) and gets {p['bursts']} bursts of "
      f"{BURST_RATE:.0f} one-row commits a second for 1 s (512-byte random payload, a random key "
      f"under an index, synchronous=NORMAL), {BURST_PAUSE:.0f} s apart, then a flat-out writer "
      f"for {p['flat_s']:.0f} s; {p['reps']} repetition(s), interleaved with the baseline "
      "(the flat-out writer alone on a fresh database). Burst lag: from the return of a burst's "
      "last COMMIT to the moment the replica object that holds it was finished in the replica "
      "directory (inotify). CPU: the tool's user + system time from the first burst until its "
      "replica stopped changing after the flat-out run, over the WAL the writer committed "
      "(frames counted from the wal-index after every commit, times page size + 24).")
    a("")
    a("| tool | bursts | lag p50 ms | p90 ms | max ms | objects per burst (median) | "
      "flat-out commits/s ratio | tool CPU s | WAL MiB | CPU s per MiB | restored = committed |"
      " load average | other load, CPUs |")
    a("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in TOOLS:
        x = s.get(key)
        if not x:
            continue
        a(f"| {LABELS[key]} | {x['bursts']} | {x['lag_p50']:.1f} | {x['lag_p90']:.1f} | "
          f"{x['lag_max']:.1f} | {x['objects_per_burst']:.0f} | {x['flat_ratio']:.2f} | "
          f"{x['cpu_s']:.1f} | {x['wal_mib']:.0f} | {x['cpu_per_mib']:.4f} | "
          f"{'yes' if x['complete'] else '**no**'} | {x['loadavg']:.2f} | "
          f"{x['other_cpus']:.2f} |")
    a("")
    a(f"Baseline flat-out writer: {s['baseline_rate']:.0f} commits/s (median).")
    a("")
    a("### Bulk load")
    a("")
    a(f"{p['bulk_mib']} MiB of 4 KB rows ({BULK_PAYLOAD}-byte random payloads), {BULK_ROWS} "
      "per transaction, on a fresh database, alone and beside each tool. \"Caught up\" is when "
      "the replica first held the writer's last transaction, after its last commit: the "
      "newest transaction named by a finished change object in the replica (ours: "
      "`generations/<gen>/wal/<start>-<end>-…`, Litestream: `ltx/0/<min>-<max>.ltx`), one "
      f"listing of that directory every {ARRIVAL_POLL_S * 1000:.0f} ms. \"Settled\" is when "
      "the replica's objects (change objects and snapshots) last changed, merges and "
      "snapshots taken after the load included.")
    a("")
    a("| writer beside | seconds | MiB/s | ratio | largest WAL MiB | caught up after s | "
      "settled after s | tool CPU s | replica MiB | load average | other load, CPUs |")
    a("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in ("baseline", "ours", "litestream"):
        x = bulk.get(key)
        if not x:
            continue
        cu = f"{x['holds_last_s']:.1f}" if "holds_last_s" in x else "–"
        st = f"{x['catch_up_s']:.1f}" if "catch_up_s" in x else "–"
        cpu = f"{x['tool_cpu_s']:.1f}" if "tool_cpu_s" in x else "–"
        rep = f"{x['replica_mib']:.0f}" if "replica_mib" in x else "–"
        a(f"| {LABELS[key]} | {x['seconds']:.1f} | {x['mib_per_s']:.0f} | "
          f"{base_s / x['seconds']:.2f} | {x['max_wal'] / MiB:.0f} | {cu} | {st} | {cpu} | {rep} | "
          f"{x['load']['loadavg_start']:.2f} | {x['load']['other_cpus']:.2f} |")
    a("")
    if pitr:
        a("Point-in-time restores of ours, to a moment between two commits of the load "
          "(transactions counted by rows / 250):")
        a("")
        a("| at | restored transactions | committed by T | committed > 20 ms before T | "
          "missing | after T |")
        a("|---|---|---|---|---|---|")
        for x in pitr:
            a(f"| {x['q']:.0%} | {x['restored_txns']} | {x['committed_by_t']} | "
              f"{x['committed_20ms_before']} | {x['missing']} | {x['after_t']} |")
        a("")
    backlog = {(x["tool"], x.get("state", "writing")): x for x in r.get("backlog", [])}
    if backlog:
        a("### Backlog")
        a("")
        a("Each tool on a fresh database (1000 rows), paused with SIGSTOP while the flat-out "
          f"writer commits {p['backlog_mib']} MiB of 512-byte rows, one a transaction, then "
          "resumed with SIGCONT; paused half a second after a few commits (writing), or after "
          f"a flat-out half second and {BACKLOG_IDLE_S:.0f} s idle (idle). \"Writer\": the "
          "writer's seconds meanwhile, and the largest WAL. \"Held\": "
          "when its replica first held the writer's last transaction, after the resume (the "
          "listing of the bulk load); \"settled\": when its objects last changed (merges and "
          "checkpoint included). CPU: the tool's user + system time from the resume until "
          "settled, over the WAL waiting for it. The same work for every tool, in one go: the "
          "cost per byte of shipping, without a cost per commit or a writer slowed down.")
        a("")
        a("| tool paused | before | writer s | largest WAL MiB | WAL MiB | held after s | "
          "MiB/s | settled after s | tool CPU s | CPU s per MiB | catch-ups | "
          "restored = committed | load average | other load, CPUs |")
        a("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for state, key in itertools.product(BACKLOG_STATES, TOOLS):
            x = backlog.get((key, state))
            if not x:
                continue
            rate = x["wal_mib"] / x["holds_last_s"] if x["holds_last_s"] > 0 else float("inf")
            cu = x.get("catchups", 0) if key == "ours" else "–"
            a(f"| {LABELS[key]} | {state} | {x['writer_s']:.1f} | {x['max_wal'] / MiB:.0f} | "
              f"{x['wal_mib']:.0f} | {x['holds_last_s']:.1f} | {rate:.0f} | "
              f"{x['settled_s']:.1f} | {x['cpu_s']:.1f} | {x['cpu_s_per_mib']:.4f} | {cu} | "
              f"{'yes' if x['restored_rows'] == x['rows'] else '**no**'} | "
              f"{x['load']['loadavg_start']:.2f} | {x['load']['other_cpus']:.2f} |")
        a("")
    a("Raw numbers (every burst lag, every run): `bench/out/load.json`.")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="sessions,bulk,backlog",
                    help="phases: sessions, bulk, backlog")
    args = rc.bench_args(ap, "load.json", "reduced smoke run (~2 min)", quiet_wait=0.0,
                         quiet_budget=0.0)
    q = args.quick
    params = {"quick": q, "bursts": 5 if q else 10, "flat_s": 3.0 if q else 10.0,
              "reps": 1 if q else 3, "bulk_mib": 256 if q else 1024,
              "backlog_mib": 4 if q else 12,
              "pitr_points": [0.5] if q else [0.25, 0.5, 0.75]}
    if (old := rc.report_from_json(args)) is not None:
        rc.write_section(Path(args.out), START, END, render(old))
        return 0

    rc.interrupt_on_sigterm()
    phases = set(args.only.split(","))
    bench = Bench(args, params)
    t0 = time.monotonic()
    r: dict[str, Any] = {"params": params, "sessions": [], "bulk": [], "backlog": []}
    try:
        r["machine"] = machine_facts(bench.work)
        if "sessions" in phases:
            for rep in range(params["reps"]):
                for key in ("baseline", *TOOLS):
                    r["sessions"].append(bench.session(key, rep))
        if "bulk" in phases:
            for key in ("baseline", "ours", "litestream"):
                r["bulk"].append(bench.bulk(key))
        if "backlog" in phases:
            for state in BACKLOG_STATES:
                for key in TOOLS:
                    r["backlog"].append(bench.backlog(key, state))
    finally:
        bench.cleanup()
    r["total_s"] = time.monotonic() - t0
    jp = Path(args.json)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(r, indent=1))
    log(f"raw numbers: {jp}")
    if phases >= {"sessions", "bulk"}:
        rc.write_section(Path(args.out), START, END, render(r))
        log(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
