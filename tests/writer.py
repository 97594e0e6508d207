"""A SQLite application for tests and benchmarks: commits transactions in its own process and logs
each commit as ``seq t_before_ns t_after_ns`` (one line, written right after the commit returns).

Every logged transaction inserts row ``seq`` into table ``log``, so a restored database holds
exactly the commits 1..k of the log. With ``--ops mixed`` it also runs large transactions,
updates, big deletes, DROP/CREATE and VACUUM between logged commits. It uses no busy timeout
(SQLite's default) unless told, and exits with status 3 if it ever saw "database is locked".
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE IF NOT EXISTS log(seq INTEGER PRIMARY KEY, t_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS data(id INTEGER PRIMARY KEY, k INTEGER, payload BLOB);
CREATE INDEX IF NOT EXISTS data_k ON data(k);
"""


def init_db(path: str, page_size: int = 4096, wal: bool = True) -> None:
    """Create the database with the test schema, in WAL mode (else in rollback-journal mode)."""
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA page_size={page_size}")
    if wal:
        c.execute("PRAGMA journal_mode=WAL")
    c.executescript(SCHEMA)
    c.commit()
    c.close()


def main() -> int:  # noqa: C901 - a test program, one straight loop
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("log")
    p.add_argument("--duration", type=float, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--rate", type=float, default=0, help="transactions per second, 0 = flat out")
    p.add_argument("--ops", choices=["small", "mixed"], default="small")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--payload", type=int, default=200)
    p.add_argument("--busy-timeout", type=float, default=0.0)
    p.add_argument("--truncate-every", type=int, default=0,
                   help="run PRAGMA wal_checkpoint(TRUNCATE) every N commits")
    p.add_argument("--torn", action="store_true",
                   help="start a large transaction, print 'torn' and hang until killed")
    p.add_argument("--synchronous", default="NORMAL")
    args = p.parse_args()

    rnd = random.Random(args.seed)
    conn = sqlite3.connect(args.db, timeout=args.busy_timeout, isolation_level=None)
    conn.execute(f"PRAGMA synchronous={args.synchronous}")
    conn.executescript(SCHEMA)
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM log").fetchone()
    seq = int(row[0])

    if args.torn:
        conn.execute("PRAGMA cache_size=8")  # spill to the WAL long before the commit
        conn.execute("BEGIN")
        for _i in range(2000):
            conn.execute("INSERT INTO data(k, payload) VALUES (-1, ?)", (b"U" * 1000,))
        conn.execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (seq + 1, time.time_ns()))
        print("torn", flush=True)
        while True:
            time.sleep(1)

    logf = open(args.log, "a", buffering=1)  # noqa: SIM115
    busy = 0
    deadline = time.monotonic() + args.duration if args.duration else None
    started = time.monotonic()
    n = 0

    def execute(sql: str, params: tuple[object, ...] = ()) -> None:
        conn.execute(sql, params)

    while not stop:
        if deadline is not None and time.monotonic() >= deadline:
            break
        if args.count and n >= args.count:
            break
        if args.rate:
            target = started + n / args.rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        op = rnd.random() if args.ops == "mixed" else 0.0
        try:
            if op > 0.97:
                execute("VACUUM")
            elif op > 0.95:
                execute("DROP TABLE IF EXISTS aux")
                execute("CREATE TABLE aux(x)")
                execute("INSERT INTO aux SELECT payload FROM data LIMIT 50")
            t0 = time.time_ns()
            execute("BEGIN")
            if op > 0.90:
                execute("DELETE FROM data WHERE id IN (SELECT id FROM data ORDER BY random() "
                        "LIMIT 200)")
            elif op > 0.80:
                for _ in range(100):
                    execute("INSERT INTO data(k, payload) VALUES (?, ?)",
                            (rnd.randrange(1 << 30), os.urandom(rnd.randrange(200, 2000))))
            elif op > 0.70:
                execute("UPDATE data SET payload = randomblob(300) WHERE id IN "
                        "(SELECT id FROM data ORDER BY random() LIMIT 50)")
            else:
                execute("INSERT INTO data(k, payload) VALUES (?, ?)",
                        (rnd.randrange(1 << 30), os.urandom(args.payload)))
            execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (seq + 1, t0))
            execute("COMMIT")
            t1 = time.time_ns()
            seq += 1
            n += 1
            logf.write(f"{seq} {t0} {t1}\n")
            if args.truncate_every and seq % args.truncate_every == 0:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(exc) or "busy" in str(exc):
                busy += 1
                print(f"BUSY: {exc}", file=sys.stderr, flush=True)
            else:
                raise
    logf.close()
    conn.close()
    print(f"commits={n} busy={busy}", flush=True)
    return 3 if busy else 0


if __name__ == "__main__":
    sys.exit(main())
