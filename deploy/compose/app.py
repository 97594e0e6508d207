"""A demo application (Compose stack, Kubernetes example): it writes a row to a SQLite database
(in WAL mode) every INTERVAL seconds and, on SIGTERM or SIGINT, a last "stopping" row before it
exits 0.

    python3 app.py DB [--interval SECONDS]
"""

from __future__ import annotations

import argparse
import signal
import socket
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("db")
    p.add_argument("--interval", type=float, default=1.0)
    args = p.parse_args()
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    # a long busy timeout: the application never gives up on a write
    conn = sqlite3.connect(args.db, timeout=30, isolation_level=None)
    if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
        print(f"app: {args.db} is not in WAL mode", file=sys.stderr)
        return 1
    conn.executescript(SCHEMA)
    host = socket.gethostname()
    n = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    print(f"app: {args.db} has {n} events; writing one every {args.interval:g}s", flush=True)
    while not stopping:
        conn.execute("INSERT INTO events(host, body) VALUES (?, ?)", (host, f"event {n}"))
        n += 1
        time.sleep(args.interval)
    conn.execute("INSERT INTO events(host, body) VALUES (?, 'stopping')", (host,))
    conn.close()
    print(f"app: stopped after event {n - 1}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
