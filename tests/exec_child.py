"""A child for ``replicate --exec`` tests: records the signals it gets in a file, one name a line.

    exec_child.py LOG forward    records HUP/USR1/USR2/INT; exits 0 on TERM
    exec_child.py LOG ignore     ignores TERM (killed by the replicator after shutdown-timeout)
    exec_child.py LOG slow DB    on the first TERM commits a row to DB, then exits on the second
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time


def main() -> int:
    log, mode = sys.argv[1], sys.argv[2]
    got: list[str] = []

    def note(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        got.append(name)
        with open(log, "a") as f:
            f.write(name + "\n")

    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(log, "a") as f:
        f.write("ready\n")
    parent = os.getppid()
    while True:
        time.sleep(0.01)
        if os.getppid() != parent:
            return 1  # the replicator is gone (a failed test killed it): do not linger
        terms = got.count("SIGTERM")
        if mode == "forward" and terms:
            return 0
        if mode == "slow" and terms == 1 and "committed" not in got:
            conn = sqlite3.connect(sys.argv[3], isolation_level=None)
            conn.execute("INSERT INTO log(seq, t_ns) VALUES (1000000, 0)")
            conn.close()
            got.append("committed")
        if mode == "slow" and terms >= 2:
            return 5


if __name__ == "__main__":
    sys.exit(main())
