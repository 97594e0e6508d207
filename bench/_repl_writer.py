"""Flat-out writer for bench/replication.py, run as its own process.

Commits one-row transactions (a 512-byte random payload and a random key under an index) as fast as
it can (or ``--rate`` times a second, on a fixed schedule) for ``--duration`` seconds with
``synchronous=NORMAL`` and no busy timeout (SQLite's default: "database is locked" is returned at
once and counted, never waited for). Samples the size of the ``-wal`` file every 256 commits.
Prints one JSON line when done::

    {"commits": N, "seconds": S, "busy": B, "max_wal": BYTES, "max_commit_ms": MS,
     "cpu_s": CPU, "per_100ms": [...]}

``--times FILE`` also writes the wall-clock time (ns) at which each COMMIT returned, one a line
(the k-th line: the state with k rows), for point-in-time checks. SIGTERM ends the run early.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS data(id INTEGER PRIMARY KEY, k INTEGER, payload BLOB);
CREATE INDEX IF NOT EXISTS data_k ON data(k);
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--payload", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="commits per second (0: flat out)")
    p.add_argument("--times", default=None, help="file for the commit times (ns), one a line")
    args = p.parse_args()
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))

    rnd = random.Random(args.seed)
    conn = sqlite3.connect(args.db, timeout=0, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    wal = args.db + "-wal"
    commits = busy = 0
    max_wal = 0
    max_commit = 0.0
    buckets: list[int] = []
    start = time.perf_counter()
    end = start + args.duration
    now = start
    times: list[int] = []
    while now < end and not stopped:
        t0 = now
        if args.rate > 0:
            due = start + commits / args.rate
            if due > now:
                time.sleep(due - now)
        try:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)",
                         (rnd.randrange(1 << 30), os.urandom(args.payload)))
            conn.execute("COMMIT")
            if args.times:
                times.append(time.time_ns())
            commits += 1
            b = int((t0 - start) * 10)
            while len(buckets) <= b:
                buckets.append(0)
            buckets[b] += 1
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                busy += 1
            else:
                raise
        now = time.perf_counter()
        max_commit = max(max_commit, now - t0)
        if commits % 256 == 0:
            try:
                max_wal = max(max_wal, os.stat(wal).st_size)
            except FileNotFoundError:
                pass
    elapsed = time.perf_counter() - start
    try:
        max_wal = max(max_wal, os.stat(wal).st_size)
    except FileNotFoundError:
        pass
    conn.close()
    if args.times:
        with open(args.times, "w") as f:
            f.write("".join(f"{t}\n" for t in times))
    t = os.times()
    print(json.dumps({"commits": commits, "seconds": elapsed, "busy": busy, "max_wal": max_wal,
                      "max_commit_ms": max_commit * 1000, "cpu_s": t.user + t.system,
                      "per_100ms": buckets}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
