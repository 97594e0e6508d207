"""How often a writer without a busy timeout (SQLite's default) sees SQLITE_BUSY beside a tool.

An SQLite reader that finds the wal-index header half rewritten by a commit takes the write lock
for a moment to read it again; a writer that asks for the lock in that moment fails at once
(see the README's Known limits). The event is rare, so it is counted over many short runs: in
each, a fresh database, the tool started (its initial snapshot in the replica), then a writer
process committing one-row transactions flat out for ``--seconds`` (``bench/_repl_writer.py``:
512-byte payload, synchronous=NORMAL, no busy timeout, "database is locked" counted, never
waited for). Beside: nothing (baseline), a plain reader process that begins a read transaction
(``BEGIN; SELECT; COMMIT``) every ``--reader-gap`` seconds, ours with its defaults, and
Litestream 0.5 with its defaults. Arms are interleaved run by run.

Run from the repository root: ``python bench/busy.py [--runs N] [--quick]``; raw numbers go to
``bench/out/busy.json``, the report between ``<!-- busy:start -->`` and ``<!-- busy:end -->`` of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _repl_common as rc  # noqa: E402
from replication import machine_facts  # noqa: E402

START = "<!-- busy:start -->"
END = "<!-- busy:end -->"
WRITER = str(rc.BENCH / "_repl_writer.py")
ARMS = ("alone", "reader", "ours", "litestream")
LABELS = {"alone": "nothing (baseline)", "reader": "a plain reader", "ours": "ours (defaults)",
          "litestream": "Litestream 0.5 (defaults)"}

READER = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
gap, begins, busy = float(sys.argv[2]), 0, 0
while True:
    time.sleep(gap)
    try:
        c.execute("BEGIN")
        c.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        begins += 1
    except sqlite3.OperationalError:
        busy += 1
    finally:
        if c.in_transaction:
            c.execute("COMMIT")
"""


def one_run(arm: str, work: Path, seconds: float, gap: float) -> dict[str, Any]:
    """One fresh database, the arm's companion started, the writer run; its JSON line."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "db.sqlite"
    rc.init_db(db)
    tool: rc.Tool | None = None
    reader: subprocess.Popen[bytes] | None = None
    try:
        if arm == "reader":
            reader = subprocess.Popen([sys.executable, "-c", READER, str(db), str(gap)])
            time.sleep(0.2)
        elif arm in ("ours", "litestream"):
            tool = (rc.Ours if arm == "ours" else rc.Litestream)(db, work / "replica", work)
            tool.start()
            tool.wait_snapshot(60)
        out = subprocess.run([sys.executable, WRITER, str(db), "--duration", str(seconds)],
                             capture_output=True, text=True, check=True)
        res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return {"arm": arm, "commits": res["commits"], "busy": res["busy"]}
    finally:
        if reader is not None:
            reader.kill()
            reader.wait()
        if tool is not None:
            tool.stop()


def report(raw: dict[str, Any]) -> str:
    m = raw["machine"]
    lines = [
        "## A writer without a busy timeout (`bench/busy.py`)", "",
        f"Run {m['date_utc']}: {raw['runs']} runs per arm, each a writer committing one-row "
        f"transactions flat out for {raw['seconds']:g} s (no busy timeout) on a fresh database "
        "beside the arm; arms interleaved. The plain reader begins a read transaction every "
        f"{raw['reader_gap'] * 1000:g} ms. Machine: {m['nproc']} CPUs ({m['cpu']}), Linux "
        f"{m['kernel']}, Python {m['python']}, SQLite {m['sqlite']}, Litestream "
        f"{m['litestream']}, replicator at {m['replicator_commit']}"
        f"{' + uncommitted changes' if m['replicator_dirty'] else ''}; {m['work_fs']}.", "",
        "| writer beside | runs with SQLITE_BUSY | SQLITE_BUSY in all | commits a run (median) |",
        "|---|---|---|---|"]
    for arm in ARMS:
        rows = [r for r in raw["results"] if r["arm"] == arm]
        if not rows:
            continue
        failed = sum(1 for r in rows if r["busy"])
        lines.append(f"| {LABELS[arm]} | {failed} of {len(rows)} | "
                     f"{sum(r['busy'] for r in rows):,} | "
                     f"{statistics.median(r['commits'] for r in rows):,.0f} |")
    lines += ["", "Each SQLITE_BUSY is a commit the application had to retry, or lost. Ours and "
              "the plain reader take the write lock only for the moment SQLite needs after a "
              "torn read of the wal-index header (see the README's Known limits).", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=None, help="runs per arm (default 60, 4 quick)")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reader-gap", type=float, default=0.02)
    ap.add_argument("--arms", default=",".join(ARMS))
    args = rc.bench_args(ap, "busy.json", "4 runs per arm", 0.0, 0.0)
    raw = rc.report_from_json(args)
    if raw is None:
        runs = args.runs or (4 if args.quick else 60)
        arms = [a for a in args.arms.split(",") if a]
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            ap.error(f"unknown arm {unknown[0]!r} (arms: {', '.join(ARMS)})")
        rc.interrupt_on_sigterm()
        rc.compile_tree()
        base = Path(args.workdir or tempfile.gettempdir()) / "bench-busy"
        base.mkdir(parents=True, exist_ok=True)
        machine = machine_facts(base)
        results: list[dict[str, Any]] = []
        try:
            for i in range(runs):
                for arm in arms:
                    r = one_run(arm, base / arm, args.seconds, args.reader_gap)
                    results.append(r)
                    print(f"run {i + 1} {arm}: {r['commits']} commits, busy {r['busy']}",
                          flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
        raw = {"machine": machine, "runs": runs, "seconds": args.seconds,
               "reader_gap": args.reader_gap, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(raw, indent=1))
    rc.write_section(Path(args.out), START, END, report(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
