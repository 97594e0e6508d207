"""What a compaction step costs as a generation ages: one generation of a local directory
destination holding ``--objects`` hourly segments (default 10,000: about 14 months of the 1 h
level), then ``--steps`` steps, each after one new segment was shipped. Per step: wall time and
how many times the generation was listed. Each ``--tree`` (a checkout of this repository; default
this one) is measured in a process of its own, in the same run, so that two versions compare on
the same machine. Litestream has no counterpart to time here (its compaction is not a step that
can be called alone); what it costs at that age is in its own listings (``bench/many.py``).

Run from the repository root:
``python bench/compaction_age.py [--tree OTHER_CHECKOUT] [--out docs/benchmarks.md]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _repl_common as rc  # noqa: E402

START = "<!-- compaction-age:start -->"
END = "<!-- compaction-age:end -->"

MEASURE = r"""
import asyncio, json, os, shutil, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from replicator.compact import DEFAULT_LEVELS, Compactor
from replicator.pos import new_generation_id, segment_info
from replicator.storage.file import FileStorage

n, steps = int(sys.argv[2]), int(sys.argv[3])
root = tempfile.mkdtemp(prefix="compaction-age-")
store = FileStorage(root)
gen = new_generation_id()
hour = 3_600_000
t = int(time.time() * 1000) - (n + 1) * hour
lists = []
inner = store.objects


async def counted(g):
    lists.append(g)
    return await inner(g)


store.objects = counted


def put(info):
    path = os.path.join(root, *info.key.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")


for i in range(n):
    put(segment_info(gen, 1000 * i + 1, 1000 * i + 1000, t + i * hour, t + i * hour + hour - 1))


async def go():
    comp = Compactor(store, None, DEFAULT_LEVELS, grace=0, local=[store])
    out = []
    txid = 1000 * n + 1
    for _ in range(steps):
        ms = int(time.time() * 1000) - 5000
        seg = segment_info(gen, txid + 1, txid + 1, ms, ms)  # a hole before it: nothing merges
        txid += 2
        put(seg)
        comp.shipped(seg)
        before = len(lists)
        t0 = time.perf_counter()
        res = await comp.step()
        out.append({"ms": 1000 * (time.perf_counter() - t0), "lists": len(lists) - before,
                    "objects": res.objects})
    return out


try:
    print(json.dumps(asyncio.run(go())))
finally:
    shutil.rmtree(root, ignore_errors=True)
"""


def commit_of(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objects", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tree", action="append", default=[], help="a checkout to measure too")
    p.add_argument("--out", help="docs file to update between the markers")
    args = p.parse_args()
    trees = [rc.ROOT, *(Path(t).resolve() for t in args.tree)]
    rows = []
    for tree in trees:
        out = subprocess.run([sys.executable, "-c", MEASURE, str(tree), str(args.objects),
                              str(args.steps)], capture_output=True, text=True, check=True)
        steps = json.loads(out.stdout.strip().splitlines()[-1])
        later = steps[1:]
        rows.append({"tree": commit_of(tree), "first_ms": steps[0]["ms"],
                     "later_median_ms": statistics.median(s["ms"] for s in later),
                     "later_max_ms": max(s["ms"] for s in later),
                     "later_lists": sum(s["lists"] for s in later) / len(later),
                     "objects": steps[-1]["objects"]})
        print(json.dumps(rows[-1]), flush=True)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Compaction at age (`bench/compaction_age.py`)", "",
        f"Run {when}. One generation of a local directory destination holding "
        f"{args.objects:,} hourly segments; {args.steps} steps, each after one segment was "
        "shipped. Litestream has no step to time alone; see the module's docstring.", "",
        "| replicator at | objects | first step ms | later steps: median ms | max ms | "
        "listings a step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tree']} | {r['objects']:,} | {r['first_ms']:.0f} | "
                     f"{r['later_median_ms']:.1f} | {r['later_max_ms']:.1f} | "
                     f"{r['later_lists']:.1f} |")
    section = "\n".join(lines) + "\n\n"
    if args.out:
        rc.write_section(Path(args.out), START, END, section)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
