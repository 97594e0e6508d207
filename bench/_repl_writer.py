"""Flat-out writer for bench/replication.py, run as its own process.

Commits transactions of ``--rows`` rows (default 1; a ``--payload``-byte random payload and a
random key under an index each) as fast as it can (or ``--rate`` times a second, on a fixed
schedule) for ``--duration`` seconds, or until ``--max-bytes`` of payload are written, with
``synchronous=NORMAL`` and no busy timeout (SQLite's default: "database is locked" is returned at
once and counted, never waited for). ``--bursts N --pause S`` repeats the run N times with S
seconds of rest in between (the commit schedule restarts with each burst). Samples the size of the
``-wal`` file every 256 commits. ``--count-frames`` reads the wal-index (``-shm``) after each
commit and adds up the WAL frames the commits wrote (every writer pays the same small cost).
Prints one JSON line when done::

    {"commits": N, "seconds": S, "busy": B, "max_wal": BYTES, "max_commit_ms": MS,
     "cpu_s": CPU, "per_100ms": [...], "wal_frames": F, "page_size": P}

(``seconds`` counts the bursts only, not the rests between them.)

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


class FrameCounter:
    """Adds up the WAL frames commits wrote, from the wal-index header (mxFrame and the salts,
    in native byte order) read after each commit: a change of salts means the WAL was reset, and
    the new epoch's frames are all new."""

    def __init__(self, db: str) -> None:
        self.path = db + "-shm"
        self.fd: int | None = None
        self.frames = 0
        self.salts = b""
        self.mx = 0

    def sample(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
        raw = os.pread(self.fd, 48, 0)
        if len(raw) < 48:
            return
        mx = int.from_bytes(raw[16:20], sys.byteorder)
        salts = raw[32:40]
        if salts != self.salts:
            self.frames += mx
        elif mx > self.mx:
            self.frames += mx - self.mx
        self.salts, self.mx = salts, mx


class Writer:
    """The writer's connection and counters."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rnd = random.Random(args.seed)
        self.conn = sqlite3.connect(args.db, timeout=0, isolation_level=None)
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self.wal = args.db + "-wal"
        self.frames = FrameCounter(args.db) if args.count_frames else None
        if self.frames is not None:
            self.frames.sample()
            self.frames.frames = 0  # only what this run writes
        self.commits = self.busy = self.max_wal = 0
        self.payload_bytes = 0
        self.max_commit = 0.0
        self.buckets: list[int] = []
        self.times: list[int] = []
        self.seconds = 0.0

    def commit_one(self) -> None:
        conn, n = self.conn, self.args.rows
        try:
            conn.execute("BEGIN")
            rows = [(self.rnd.randrange(1 << 30), os.urandom(self.args.payload))
                    for _ in range(n)]
            conn.executemany("INSERT INTO data(k, payload) VALUES (?, ?)", rows)
            conn.execute("COMMIT")
            if self.args.times:
                self.times.append(time.time_ns())
            self.commits += 1
            self.payload_bytes += n * self.args.payload
            if self.frames is not None:
                self.frames.sample()
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                self.busy += 1
            else:
                raise

    def burst(self, stopped: list[int]) -> None:
        args = self.args
        start = time.perf_counter()
        end = start + args.duration
        now = start
        first = self.commits
        base = int(self.seconds * 10)
        while now < end and not stopped and (
            not args.max_bytes or self.payload_bytes < args.max_bytes
        ):
            t0 = now
            if args.rate > 0:
                due = start + (self.commits - first) / args.rate
                if due > now:
                    time.sleep(due - now)
            before = self.commits
            self.commit_one()
            if self.commits > before:
                b = base + int((t0 - start) * 10)
                while len(self.buckets) <= b:
                    self.buckets.append(0)
                self.buckets[b] += 1
            now = time.perf_counter()
            self.max_commit = max(self.max_commit, now - t0)
            if self.commits % 256 == 0:
                self.sample_wal()
        self.seconds += time.perf_counter() - start

    def sample_wal(self) -> None:
        try:
            self.max_wal = max(self.max_wal, os.stat(self.wal).st_size)
        except FileNotFoundError:
            pass


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--payload", type=int, default=512)
    p.add_argument("--rows", type=int, default=1, help="rows per transaction")
    p.add_argument("--max-bytes", type=int, default=0, help="stop after this much payload")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="commits per second (0: flat out)")
    p.add_argument("--bursts", type=int, default=1)
    p.add_argument("--pause", type=float, default=1.0, help="seconds between bursts")
    p.add_argument("--count-frames", action="store_true")
    p.add_argument("--times", default=None, help="file for the commit times (ns), one a line")
    args = p.parse_args()
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))

    w = Writer(args)
    for i in range(args.bursts):
        if stopped:
            break
        if i:
            time.sleep(args.pause)
        w.burst(stopped)
    w.sample_wal()
    page_size = int(w.conn.execute("PRAGMA page_size").fetchone()[0])
    w.conn.close()
    commits, busy, max_wal, elapsed, times = w.commits, w.busy, w.max_wal, w.seconds, w.times
    max_commit, buckets = w.max_commit, w.buckets
    if args.times:
        with open(args.times, "w") as f:
            f.write("".join(f"{t}\n" for t in times))
    t = os.times()
    print(json.dumps({"commits": commits, "seconds": elapsed, "busy": busy, "max_wal": max_wal,
                      "max_commit_ms": max_commit * 1000, "cpu_s": t.user + t.system,
                      "per_100ms": buckets, "payload_bytes": w.payload_bytes,
                      "wal_frames": w.frames.frames if w.frames else None,
                      "page_size": page_size}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
