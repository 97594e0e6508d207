"""History benchmark: what a replica costs after it has run for a while, beside Litestream.

Part 1, a steady history. A writer commits 100 one-row transactions (200-byte rows) a second for
``--duration`` (10 min; ``--quick``: 1 min) while the tool replicates the database to a local
directory *and* to S3 (SeaweedFS on 127.0.0.1 through the recording proxy of bench/_s3proxy.py,
which counts requests). Ours runs once with both destinations; Litestream 0.5 takes one replica
per database, so it runs twice, each on a database of its own with a writer of its own, all at
the same time. Then: objects and bytes in each replica, S3 requests by kind while writing, and
restore time (and S3 requests) of the newest state and of the point 90 % of the way through,
from the directory and from S3; the restored row counts are compared with the writer's commit
times. As a reference, the same final database is replicated afresh (ours, one snapshot) and
restored the same ways.

Part 2, restarts. A database of ``--restart-mib`` (1 GiB; ``--quick``: 256 MiB) is replicated to
S3 through the proxy beside a writer (100 commits/s); the tool is stopped 5 times (alternately
SIGKILL and SIGTERM) for 5 s, long enough for the application's own checkpoints to reset the
WAL, and started again. Bytes uploaded per restart (from the start to the next stop) and
generations at the end.

Raw numbers go to bench/out/history.json, the report between ``<!-- history:start -->`` and
``<!-- history:end -->`` in docs/benchmarks.md.

Run from the repository root: ``python bench/history.py [--quick] [--duration S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's replicator

import _repl_common as rc  # noqa: E402
import s3fixtures as fx  # noqa: E402
from replication import WRITER, log, machine_facts, met, mib  # noqa: E402
from s3 import (  # noqa: E402
    FINAL,
    PREFIX,
    LitestreamS3,
    OursS3,
    S3Bench,
    kinds_text,
    remove_db,
    request_stats,
    use_test_identity,
    weed_version,
)

START = "<!-- history:start -->"
END = "<!-- history:end -->"
RATE = 100.0
ROW = 200
RESTARTS = 5
DOWN_S = 5.0
UP_S = 15.0
FRESH = "fresh snapshot (reference)"
RESTORE_REPS = 3  # each restore is timed this many times (the median is reported)


class OursBoth(OursS3):
    """Ours with two destinations in one process: a directory and S3."""

    def __init__(self, db: Path, work: Path, bucket: str, endpoint: str) -> None:
        super().__init__(db, work, bucket, endpoint)
        self.replica = work / "replica"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "replicator", "--log-level", "info", "replicate",
                str(self.db), str(self.replica), self.url(self.endpoint)]


class Writer:
    """bench/_repl_writer.py at RATE commits/s of ROW-byte rows, recording commit times."""

    def __init__(self, db: Path, duration: float, seed: int) -> None:
        self.times_path = db.parent / f"{db.name}.times"
        self.proc = subprocess.Popen(
            [sys.executable, WRITER, str(db), "--duration", str(duration), "--rate", str(RATE),
             "--payload", str(ROW), "--seed", str(seed), "--times", str(self.times_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def finish(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"writer failed: {err[-2000:]}")
        times = [int(x) for x in self.times_path.read_text().split()]
        return dict(json.loads(out.strip().splitlines()[-1])), times

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def list_bucket(server: fx.S3Server, bucket: str) -> tuple[int, int]:
    """(objects, bytes) stored in a bucket (lease and metadata files included)."""
    n = size = 0
    for page in server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            n += 1
            size += o["Size"]
    return n, size


def count_files(path: Path) -> tuple[int, int]:
    n = size = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            n += 1
            size += os.stat(os.path.join(root, f)).st_size
    return n, size


def iso(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


class HistoryBench(S3Bench):
    """Both parts of the benchmark on one SeaweedFS and one proxy."""

    def restore(self, name: str, cmd: list[str], bucket: str | None, out: Path,
                want: int | None) -> dict[str, Any]:
        """Run one restore command RESTORE_REPS times; the median time, and the exit, rows and
        (through the proxy) requests of the first run."""
        assert self.proxy is not None
        times: list[float] = []
        rec: dict[str, Any] = {"what": name}
        for _ in range(RESTORE_REPS):
            remove_db(out)
            self.quiet()
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                               cwd=out.parent)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if len(times) > 1:
                continue
            rec.update(exit_code=p.returncode, stderr=p.stderr[-500:], load=load,
                       want_rows=want)
            rec["rows"] = rc.count_rows(out) if p.returncode == 0 and out.exists() else None
            if bucket is not None:
                time.sleep(0.2)  # the proxy's last lines
                rec["requests"] = request_stats(self.proxy.window(bucket, t0, t1),
                                                lambda k: False)
            if p.returncode != 0:
                break
        rec["seconds"] = statistics.median(times)
        rec["runs_s"] = times
        remove_db(out)
        log(f"restore {name}: {rec['seconds']:.2f}s exit {p.returncode} rows {rec['rows']} "
            f"(want {want}) requests {rec.get('requests', {}).get('requests', '-')}")
        return rec

    def history(self, duration: float) -> dict[str, Any]:
        """Part 1."""
        assert self.proxy is not None and self.server is not None
        d = self.fresh("history")
        setups: dict[str, tuple[Path, list[Any]]] = {}
        for key in ("ours", "litestream_dir", "litestream_s3"):
            sub = d / key
            sub.mkdir()
            db = sub / "db.sqlite"
            rc.init_db(db)
            tools: list[Any]
            if key == "ours":
                tools = [OursBoth(db, sub, self.server.create_bucket(), self.proxy.endpoint)]
            elif key == "litestream_dir":
                tools = [rc.Litestream(db, sub / "replica", sub)]
            else:
                tools = [LitestreamS3(db, sub, self.server.create_bucket(), self.proxy.endpoint,
                                      tuned=False)]
            self.tools.extend(tools)
            setups[key] = (db, tools)
        for _db, tools in setups.values():
            tools[0].start()
        for _db, tools in setups.values():
            self.wait_initial(tools[0])
        t0 = time.perf_counter()
        writers = {k: Writer(db, duration, seed=i + 1)
                   for i, (k, (db, _t)) in enumerate(setups.items())}
        results: dict[str, Any] = {}
        times: dict[str, list[int]] = {}
        for k, w in writers.items():
            results[k], times[k] = w.finish(duration + 300)
        t1 = time.perf_counter()
        time.sleep(3.0)  # Litestream's 1 s tick, twice
        for _db, tools in setups.values():
            tools[0].stop(timeout=300)
        t2 = time.perf_counter()
        out: dict[str, Any] = {"duration": duration, "writers": results, "tools": []}
        for key, (db, tools) in setups.items():
            out["tools"].append(self.history_one(key, db, tools[0], times[key], (t0, t1, t2)))
        ours_db = setups["ours"][0]
        out["fresh"] = self.fresh_reference(ours_db)
        return out

    def wait_initial(self, t: Any, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if isinstance(t, OursS3 | LitestreamS3):
                done = self.proxy is not None and any(
                    e.bucket == t.bucket and e.kind in FINAL and e.status == 200
                    and t.is_snapshot(e.key)
                    for e in self.proxy.window(t.bucket, 0, float("inf")))
            else:
                done = t.snapshot_done()
            if done:
                return
            if not t.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{t.label}: no initial snapshot: {t.log_tail()}")
            time.sleep(0.05)

    def history_one(self, key: str, db: Path, t: Any, times: list[int],
                    window: tuple[float, float, float]) -> dict[str, Any]:
        assert self.proxy is not None and self.server is not None
        t0, t1, t2 = window
        rec: dict[str, Any] = {"tool": key, "commits": len(times)}
        has_dir = key in ("ours", "litestream_dir")
        has_s3 = key in ("ours", "litestream_s3")
        if has_dir:
            rec["dir_objects"], rec["dir_bytes"] = count_files(t.replica)
        if key == "ours":
            rec["newest_plan"] = newest_plan(t.replica)
        rec["db_bytes"] = db.stat().st_size
        if has_s3:
            rec["s3_objects"], rec["s3_bytes"] = list_bucket(self.server, t.bucket)
            rec["s3_requests"] = request_stats(self.proxy.window(t.bucket, t0, t2), t.is_change)
        want = rc.count_rows(db)
        t90 = times[0] + int(0.9 * (times[-1] - times[0]))
        want90 = sum(1 for x in times if x <= t90)
        out = db.parent / "restored.sqlite"
        rec["t90"] = iso(t90)
        rec["restores"] = []
        for point, at, rows in (("newest", None, want), ("90%", t90, want90)):
            if has_dir:
                rec["restores"].append(self.restore(
                    f"{key} dir {point}", restore_cmd(t, out, at, s3=False), None, out, rows))
            if has_s3:
                rec["restores"].append(self.restore(
                    f"{key} S3 {point}", restore_cmd(t, out, at, s3=True, endpoint=self.proxy
                                                     .endpoint), t.bucket, out, rows))
        t.clean()
        return rec

    def fresh_reference(self, src: Path) -> dict[str, Any]:
        """The final database replicated afresh (one snapshot) and restored from both."""
        assert self.proxy is not None and self.server is not None
        d = self.fresh("fresh")
        db = d / "db.sqlite"
        c = sqlite3.connect(src)
        try:
            c.execute("VACUUM INTO ?", (str(db),))
        finally:
            c.close()
        c = sqlite3.connect(db)
        c.execute("PRAGMA journal_mode=WAL")
        c.close()
        t = OursBoth(db, d, self.server.create_bucket(), self.proxy.endpoint)
        self.tools.append(t)
        t.start()
        self.wait_initial(t)
        t.wait_snapshot(120)
        t.stop()
        want = rc.count_rows(db)
        out = d / "restored.sqlite"
        rec: dict[str, Any] = {"db_bytes": db.stat().st_size}
        rec["dir_objects"], rec["dir_bytes"] = count_files(t.replica)
        rec["restores"] = [
            self.restore(f"{FRESH} dir", restore_cmd(t, out, None, s3=False), None, out, want),
            self.restore(f"{FRESH} S3", restore_cmd(t, out, None, s3=True,
                                                    endpoint=self.proxy.endpoint),
                         t.bucket, out, want)]
        return rec

    # ------------------------------------------------------------------ part 2

    def restarts(self, key: str, size_mib: int) -> dict[str, Any]:
        assert self.proxy is not None and self.server is not None
        d = self.fresh(f"restart-{key}")
        db = d / "db.sqlite"
        rc.make_big_db(db, size_mib)
        c = sqlite3.connect(db)
        c.executescript(rc.SCHEMA)
        c.close()
        t = (OursS3(db, d, self.server.create_bucket(), self.proxy.endpoint) if key == "ours"
             else LitestreamS3(db, d, self.server.create_bucket(), self.proxy.endpoint, False))
        self.tools.append(t)
        rec: dict[str, Any] = {"tool": key, "label": t.label, "db_bytes": db.stat().st_size,
                               "restarts": []}
        a = time.perf_counter()
        t.start()
        self.wait_initial(t, 900)
        rec["initial_bytes_up"] = sum(e.req_bytes for e in self.proxy.window(
            t.bucket, a, time.perf_counter()))
        w = Writer(db, 3600, seed=9)
        starts: list[tuple[str, float]] = []
        try:
            time.sleep(UP_S)
            for i in range(RESTARTS):
                if i % 2 == 0:
                    t.kill()
                    how = "SIGKILL"
                else:
                    t.stop()
                    how = "SIGTERM"
                time.sleep(DOWN_S)
                starts.append((how, time.perf_counter()))
                t.start()
                time.sleep(UP_S)
        finally:
            w.stop()
        w.finish(120)
        time.sleep(2.0)
        t.stop(timeout=300)
        # what each run sent, from its start until the next one started (or the last stopped)
        ends = [b for _, b in starts[1:]] + [time.perf_counter()]
        for (how, a), b in zip(starts, ends, strict=True):
            evs = self.proxy.window(t.bucket, a, b)
            up = sum(e.req_bytes for e in evs)
            rec["restarts"].append({"stop": how, "bytes_up": up, "requests": len(evs)})
            log(f"restart {key} ({how}): {up / rc.MiB:.1f} MiB up in {len(evs)} requests")
        if key == "ours":
            cl = self.server.client()
            gens = set()
            for page in cl.get_paginator("list_objects_v2").paginate(
                    Bucket=t.bucket, Prefix=f"{PREFIX}/generations/"):
                for o in page.get("Contents", []):
                    gens.add(o["Key"].split("/")[2])
            rec["generations"] = len(gens)
        out = d / "restored.sqlite"
        rec["final_restore"] = self.restore(
            f"{key} after restarts", restore_cmd(t, out, None, s3=True,
                                                 endpoint=self.server.endpoint),
            None, out, rc.count_rows(db))
        remove_db(db)
        return rec


def newest_plan(replica: Path) -> dict[str, Any]:
    """What our restore of the newest state reads from the directory: objects and bytes, and
    whether it starts from a differential snapshot."""
    from replicator.restore import plan_restore
    from replicator.storage.file import FileStorage

    async def go() -> dict[str, Any]:
        plan = await plan_restore(FileStorage(str(replica)))
        objs = plan.objects
        return {"objects": len(objs), "bytes": sum(o.size for o in objs),
                "diff": plan.diff is not None, "segments": len(plan.segments)}

    return asyncio.run(go())


def restore_cmd(t: Any, out: Path, at: int | None, *, s3: bool, endpoint: str = "") -> list[str]:
    """The tool's restore command (its default integrity-check setting), to a time or the
    newest state."""
    if isinstance(t, OursS3):
        cmd = (t.s3_restore_command(out, endpoint, True) if s3
               else rc.Ours.restore_command(t, out, True))
        return cmd if at is None else [*cmd, "--to-time", iso(at)]
    cmd = t.s3_restore_command(out, endpoint, False) if s3 else t.restore_command(out, False)
    return cmd if at is None else [*cmd[:-1], "-timestamp", iso(at), cmd[-1]]


# ------------------------------------------------------------------------------------ report

LABELS = {"ours": "replicator (ours)", "litestream_dir": "Litestream 0.5 (directory replica)",
          "litestream_s3": "Litestream 0.5 (S3 replica)"}


def render_history(r: dict[str, Any]) -> list[str]:
    h = r["history"]
    L = [f"### 1. {h['duration']:.0f} s at {RATE:.0f} commits/s", "",  # noqa: N806
         "Objects and bytes the replica holds at the end (ours: one process with both "
         "destinations; Litestream: one process per replica, each on its own database and "
         "writer, all running at the same time), S3 requests by kind from the start of the "
         "writer until the tool exited after it (SIGTERM 3 s after the last commit):", "",
         "| tool | commits | directory: objects | MiB | S3: objects | MiB | S3 requests | "
         "by kind |", "|---|---|---|---|---|---|---|---|"]
    for x in h["tools"]:
        q = x.get("s3_requests")
        L.append(f"| {LABELS[x['tool']]} | {x['commits']} | {x.get('dir_objects', '–')} | "
                 f"{mib(x.get('dir_bytes'))} | {x.get('s3_objects', '–')} | "
                 f"{mib(x.get('s3_bytes'))} | {q['requests'] if q else '–'} | "
                 f"{kinds_text(q['by_kind']) if q else '–'} |")
    L += ["", f"Restores (wall time of the command, the median of {RESTORE_REPS} runs; each "
          "tool's default integrity-check setting: "
          "ours checks, Litestream does not). The newest state, and `--to-time` / `-timestamp` "
          "at the point 90 % of the way through the writer's run; \"rows\" is what the "
          "restored database holds, \"committed by then\" the rows whose COMMIT had returned "
          "by that time in the writer (a commit observed a moment after it returned may "
          "differ by one or two). From S3 the restore goes through the proxy, which counts "
          "its requests. The reference is the same final database replicated afresh by ours "
          f"(one snapshot, {mib(h['fresh']['db_bytes'])} MiB) and restored the same ways.", "",
          "\"load\" is the 1-minute load average when the restore started.", "",
          "| restore | seconds | S3 requests | rows | committed by then | exit | load |",
          "|---|---|---|---|---|---|---|"]
    rows = [y for x in h["tools"] for y in x["restores"]] + h["fresh"]["restores"]
    for y in rows:
        q = y.get("requests")
        L.append(f"| {y['what']} | {y['seconds']:.2f} | {q['requests'] if q else '–'} | "
                 f"{y['rows'] if y['rows'] is not None else 'failed'} | {y['want_rows']} | "
                 f"{y['exit_code']} | {_load(y)} |")
    L.append("")
    return L


def _load(rec: dict[str, Any]) -> str:
    return f"{rec['load']:.1f}" if "load" in rec else "–"


def render_summary(r: dict[str, Any]) -> list[str]:
    """The issue's targets: the newest state restored within 1.5x a fresh snapshot's restore and
    not slower than Litestream; restarts cost what changed, not the database."""
    h = r["history"]
    rows = {y["what"]: y for x in h["tools"] for y in x["restores"]}
    rows.update({y["what"]: y for y in h["fresh"]["restores"]})
    L = ["### Summary against the targets", "",  # noqa: N806
         "| restore of the newest state | ours s | fresh snapshot s | ours / fresh (target <= 1.5) "
         "| Litestream s | not slower than Litestream |", "|---|---|---|---|---|---|"]
    for where, ls in (("dir", "litestream_dir dir newest"), ("S3", "litestream_s3 S3 newest")):
        o, f, l_ = (rows.get(f"ours {where} newest"), rows.get(f"{FRESH} {where}"), rows.get(ls))
        if not (o and f and l_):
            continue
        ratio = o["seconds"] / f["seconds"]
        L.append(f"| from {'the directory' if where == 'dir' else 'S3'} | {o['seconds']:.2f} | "
                 f"{f['seconds']:.2f} | {ratio:.1f} ({met(ratio <= 1.5)}) | {l_['seconds']:.2f} | "
                 f"{met(o['seconds'] <= l_['seconds'])} |")
    for x in h["tools"]:
        p = x.get("newest_plan")
        if p and x.get("db_bytes"):
            L += ["", f"Our restore of the newest state reads {p['objects']} objects, "
                  f"{mib(p['bytes'])} MiB from the directory ({p['bytes'] / x['db_bytes']:.2f}x "
                  f"the {mib(x['db_bytes'])} MiB database; target: a few dozen objects, <= ~2x): "
                  f"a full snapshot, {'a differential snapshot, ' if p['diff'] else ''}"
                  f"{p['segments']} segment(s)."]
    for x in r.get("restarts", []):
        per = [y["bytes_up"] for y in x["restarts"]]
        if per:
            L += ["", f"Restarts ({x['label']}): {mib(sum(per) / len(per))} MiB sent per restart "
                  f"on average for a {mib(x['db_bytes'])} MiB database "
                  f"({100 * sum(per) / len(per) / x['db_bytes']:.1f} % of it), "
                  f"{x.get('generations', '–')} generation(s) at the end."]
    L.append("")
    return L


def render_restarts(r: dict[str, Any]) -> list[str]:
    L = ["### 2. Restarts beside a writer", "",  # noqa: N806
         f"A database of random blobs is replicated to S3 (through the proxy) while a writer "
         f"commits {RATE:.0f} times a second; the tool is stopped {RESTARTS} times "
         f"(alternately SIGKILL and SIGTERM) for {DOWN_S:.0f} s, long enough for the "
         "application's own automatic checkpoints to reset the WAL meanwhile, then started "
         f"again and left running {UP_S:.0f} s; bytes sent to S3 by each run (from its start "
         "until the next one starts, or the end).", "",
         "| tool | database MiB | initial upload MiB | MiB sent per restart | generations at the "
         "end | final restore rows / source |", "|---|---|---|---|---|---|"]
    for x in r["restarts"]:
        per = ", ".join(f"{y['bytes_up'] / rc.MiB:.1f} ({y['stop']})" for y in x["restarts"])
        fr = x["final_restore"]
        L.append(f"| {x['label']} | {mib(x['db_bytes'])} | {mib(x['initial_bytes_up'])} | "
                 f"{per} | {x.get('generations', '–')} | {fr['rows']}/{fr['want_rows']} |")
    L.append("")
    return L


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    p = r["params"]
    kind = "**--quick** smoke run" if p["quick"] else "full run"
    L = ["## History: objects, requests and restores after a long run (`bench/history.py`)",  # noqa: N806
         "", f"Run {m['date_utc']} ({kind}, took {r['total_s'] / 60:.1f} min). Machine: "
         f"{m['nproc']} CPUs ({m['cpu']}), shared with other jobs: figures are noisy. Python "
         f"{m['python']}, SQLite {m['sqlite']}, Litestream {m['litestream']} (defaults), "
         f"SeaweedFS {m['weed']}, replicator at {m['replicator_commit']}"
         f"{' + uncommitted changes' if m['replicator_dirty'] else ''}. Writers: "
         "bench/_repl_writer.py with `--rate 100 --payload 200`."
         + (f" Part 1 comes from the run of {r['history_run']}." if r.get("history_run") else ""),
         ""]
    L += render_summary(r) + render_history(r) + render_restarts(r)
    if r.get("notes"):
        L += ["### Observations", ""] + [f"- {n}" for n in r["notes"]] + [""]
    L.append("Raw numbers: `bench/out/history.json`.")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=None, help="seconds of part 1")
    ap.add_argument("--restart-mib", type=int, default=None)
    ap.add_argument("--restarts-only", default=None, metavar="JSON",
                    help="run only part 2 and keep part 1 from this earlier run's raw numbers")
    args = rc.bench_args(ap, "history.json", "reduced run (~1 min of history, 256 MiB restarts)",
                         quiet_wait=5.0, quiet_budget=60.0)
    q = args.quick
    params = {"quick": q, "duration": args.duration or (60.0 if q else 600.0),
              "restart_mib": args.restart_mib or (256 if q else 1024),
              "restart_tools": ["ours"]}
    if (old := rc.report_from_json(args)) is not None:
        rc.write_section(Path(args.out), START, END, render(old))
        return 0

    rc.interrupt_on_sigterm()
    use_test_identity()
    rc.compile_tree()
    bench = HistoryBench(args)
    t_start = time.monotonic()
    r: dict[str, Any] = {"params": params}
    try:
        r["machine"] = machine_facts(bench.work)
        r["machine"]["weed"] = weed_version()
        bench.start_s3()
        if args.restarts_only:
            earlier = json.loads(Path(args.restarts_only).read_text())
            r["history"] = earlier["history"]
            params["duration"] = r["history"]["duration"]
            r["history_run"] = (f"{earlier['machine']['date_utc']}, replicator at "
                                f"{earlier['machine']['replicator_commit']}")
        else:
            r["history"] = bench.history(params["duration"])
            bench.save(r, t_start)  # part 1 is kept even if part 2 fails
        r["restarts"] = [bench.restarts(k, params["restart_mib"])
                         for k in params["restart_tools"]]
    finally:
        bench.cleanup()
    bench.save(r, t_start)
    rc.write_section(Path(args.out), START, END, render(r))
    log(f"report: {args.out} (took {r['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
