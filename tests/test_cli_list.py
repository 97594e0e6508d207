"""``generations``, ``snapshots``, ``restore --dry-run`` and ``version`` through the real CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from util import Replicate, cli, commit_log, seqs, start_writer, tree, wait_until
from writer import init_db

import replicator
from replicator.db import Database
from replicator.format import ObjectDecoder
from replicator.pos import parse_key
from replicator.restore import fmt_ns, parse_time
from replicator.spool import Spool

GEN_COLUMNS = ["replica", "generation", "start", "end", "end_txid", "snapshots", "segments",
               "diffs", "size", "restorable", "unobserved"]
SNAP_COLUMNS = ["replica", "generation", "txid", "time", "size", "key"]


def run(*args: str) -> str:
    r = cli(*args, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def insert(c: sqlite3.Connection, seq: int) -> None:
    c.execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (seq, time.time_ns()))


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generations written by the capture engine straight into a directory (the spool
    layout is the file replica layout).

    Generation 1: snapshot 0, txids 1..4, a periodic snapshot at 4, txids 5..6.
    Generation 2 (after the WAL was reset while capture was stopped, and the page index that
    would have let it catch up was lost): snapshot 0, txids 1..3.
    """
    root = tmp_path_factory.mktemp("list")
    db = root / "app.db"
    init_db(str(db))
    rep = root / "rep"
    app = sqlite3.connect(db, isolation_level=None)
    seq = 0
    d = Database(str(db), Spool(str(rep)))
    d.open()
    d.step()
    for n in (1, 3, 1, 1):
        time.sleep(0.003)
        for _ in range(n):
            seq += 1
            insert(app, seq)
        d.step()
        if seq == 4:
            time.sleep(0.003)
            d.snapshot()
    d.close()
    seq += 1
    insert(app, seq)
    assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    os.unlink(rep / "pages.idx")
    d = Database(str(db), Spool(str(rep)))
    d.open()
    d.step()
    for _ in range(3):
        time.sleep(0.003)
        seq += 1
        insert(app, seq)
        d.step()
    d.close()
    app.close()
    return rep


def objects(rep: Path) -> dict[str, list[Any]]:
    """generation -> its objects (with sizes), from the files."""
    out: dict[str, list[Any]] = {}
    for gen in sorted(os.listdir(rep / "generations")):
        objs = []
        for folder in ("snapshots", "wal"):
            for name in os.listdir(rep / "generations" / gen / folder):
                key = f"generations/{gen}/{folder}/{name}"
                info = parse_key(key, os.path.getsize(rep / key))
                assert info is not None
                objs.append(info)
        out[gen] = sorted(objs)
    return out


def header(rep: Path, key: str) -> dict[str, Any]:
    dec = ObjectDecoder(key)
    dec.feed((rep / key).read_bytes())
    assert dec.header is not None
    return dec.header


def table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.splitlines()
    return lines[0].split(), [ln.split() for ln in lines[1:]]


# ------------------------------------------------------------------------------------------


def test_generations_json(replica: Path) -> None:
    rows = json.loads(run("generations", str(replica), "--json"))
    objs = objects(replica)
    assert [r["generation"] for r in rows] == list(objs)  # oldest first
    for row, (_gen, infos) in zip(rows, objs.items(), strict=True):
        assert list(row) == GEN_COLUMNS
        snaps = [o for o in infos if o.kind == "snapshot"]
        segs = [o for o in infos if o.kind == "wal"]
        assert row["replica"] == str(replica)
        assert row["snapshots"] == len(snaps)
        assert row["segments"] == len(segs)
        assert row["end_txid"] == max(o.end_txid for o in infos)
        assert row["size"] == sum(o.size for o in infos)
        assert row["restorable"] is True
        assert row["unobserved"] == []
        # exact (ns) times from the headers, consistent with the keys' milliseconds
        assert parse_time(row["start"]) // 1_000_000 == snaps[0].last_ms
        assert parse_time(row["end"]) // 1_000_000 == max(o.last_ms for o in infos)
    assert [(r["end_txid"], r["snapshots"], r["segments"]) for r in rows] == [(6, 2, 4),
                                                                              (3, 1, 3)]
    assert rows[0]["end"] < rows[1]["start"]


def test_generations_table(replica: Path) -> None:
    cols, rows = table(run("generations", str(replica)))
    assert cols == [c.upper() for c in GEN_COLUMNS]
    as_json = json.loads(run("generations", str(replica), "--json"))
    assert rows == [[str(len(r[c])) if c == "unobserved" else str(r[c]) for c in GEN_COLUMNS]
                    for r in as_json]


def test_snapshots_json_and_table(replica: Path) -> None:
    rows = json.loads(run("snapshots", str(replica), "--json"))
    objs = objects(replica)
    expected = [(gen, o) for gen, infos in objs.items() for o in infos if o.kind == "snapshot"]
    assert len(rows) == len(expected) == 3
    for row, (gen, info) in zip(rows, expected, strict=True):
        assert list(row) == SNAP_COLUMNS
        assert row == {"replica": str(replica), "generation": gen, "txid": info.end_txid,
                       "time": fmt_ns(info.last_ms * 1_000_000), "size": info.size,
                       "key": info.key}
        assert (replica / info.key).is_file()
        assert header(replica, info.key)["txid"] == info.end_txid
    assert [r["txid"] for r in rows] == [0, 4, 0]

    cols, trows = table(run("snapshots", str(replica)))
    assert cols == [c.upper() for c in SNAP_COLUMNS]
    assert trows == [[str(r[c]) for c in SNAP_COLUMNS] for r in rows]


def test_listing_an_empty_replica(tmp_path: Path) -> None:
    assert run("generations", str(tmp_path)) == "no generations\n"
    assert run("snapshots", str(tmp_path)) == "no snapshots\n"
    assert json.loads(run("generations", str(tmp_path / "none"), "--json")) == []
    assert json.loads(run("snapshots", str(tmp_path / "none"), "--json")) == []
    assert os.listdir(tmp_path) == []


def dry_run(replica: Path, *args: str) -> dict[str, str]:
    """Run ``restore --dry-run``, check nothing was written, parse the "name: value" lines."""
    before = tree(replica.parent)
    out = run("restore", str(replica), "--dry-run", *args)
    assert tree(replica.parent) == before
    fields: dict[str, str] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name, _, value = line.partition(":")
            fields.setdefault(name, value.strip())
    fields["_text"] = out
    return fields


def test_dry_run_latest(replica: Path) -> None:
    gen1, gen2 = objects(replica)
    infos = objects(replica)[gen2]
    snap = infos[0]
    f = dry_run(replica)
    assert f["source"] == f"file://{replica}"
    assert f["generation"] == gen2
    assert f["snapshot"].startswith(f"{snap.key} (txid 0, ")
    assert f["segments"] == "3"
    last = header(replica, infos[-1].key)["txns"][-1]
    assert f["stops at"] == f"txid 3, committed (observed) at {fmt_ns(last[1])}"
    for o in infos[1:]:
        assert f"\n  {o.key}\n" in f["_text"]


def test_dry_run_txid_and_time(replica: Path) -> None:
    gen1, gen2 = objects(replica)
    infos = objects(replica)[gen1]
    mid_snap = next(o for o in infos if o.kind == "snapshot" and o.end_txid == 4)
    txns = {t[0]: t[1] for o in infos if o.kind == "wal"
            for t in header(replica, o.key)["txns"]}

    f = dry_run(replica, "--generation", gen1, "--txid", "3")
    assert (f["generation"], f["segments"]) == (gen1, "2")
    assert f["snapshot"].startswith(f"generations/{gen1}/snapshots/0000000000000000-")
    assert f["stops at"] == f"txid 3, committed (observed) at {fmt_ns(txns[3])}"

    f = dry_run(replica, "--generation", gen1, "--txid", "5")
    assert f["snapshot"].startswith(f"{mid_snap.key} (txid 4, ")
    assert f["segments"] == "1"

    # a time (given with a +09:00 offset) between txid 5 and 6 of generation 1
    t = txns[5] + (txns[6] - txns[5]) // 2
    local = fmt_ns(t).replace("Z", "")  # to the microsecond: 5 and 6 are 3 ms apart
    stamp = dt.datetime.fromisoformat(local).replace(tzinfo=dt.UTC)
    text = stamp.astimezone(dt.timezone(dt.timedelta(hours=9))).isoformat()
    f = dry_run(replica, "--to-time", text)
    assert f["generation"] == gen1
    assert f["stops at"] == f"txid 5, committed (observed) at {fmt_ns(txns[5])}"
    assert "note" not in f


def test_dry_run_after_the_end_has_a_note(replica: Path) -> None:
    f = dry_run(replica, "--to-time", "2999-01-01T00:00:00Z")
    assert f["stops at"].startswith("txid 3, ")
    assert "after the last replicated transaction" in f["note"]


def test_dry_run_writes_nothing_even_with_an_output(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.db"
    dry_run(replica, "-o", str(out))
    assert not out.exists()
    out.write_bytes(b"existing")
    dry_run(replica, "-o", str(out))
    assert out.read_bytes() == b"existing"


def test_restore_prints_what_it_did(replica: Path, tmp_path: Path) -> None:
    gen2 = list(objects(replica))[1]
    out = tmp_path / "o.db"
    text = run("restore", str(replica), "-o", str(out))
    assert text.startswith(f"restored {out} from file://{replica}: generation {gen2}, txid 3 (")
    # the content hash proved the file is the application's: quick_check is enough
    assert "pages, quick_check ok, content hash matches generations/" in text
    assert seqs(out) == list(range(1, 11))  # 1..6, 7 (the gap, in the snapshot), 8..10


def test_restore_full_integrity_check(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.db"
    text = run("restore", str(replica), "-o", str(out), "--full-integrity-check")
    assert "pages, integrity_check ok, content hash matches generations/" in text
    assert seqs(out) == list(range(1, 11))


def test_restore_from_a_directory_imports_only_what_it_needs(
    replica: Path, tmp_path: Path
) -> None:
    """A restore from a directory that replays little WAL starts without numpy, the S3 client
    and its options, or anything only replication (or writing to a directory) needs."""
    out = tmp_path / "o.db"
    code = (
        "import sys\n"
        "from replicator.cli import main\n"
        f"assert main(['restore', {str(replica)!r}, '-o', {str(out)!r}]) == 0\n"
        "heavy = ('numpy', 'aiobotocore', 'botocore', 'aiohttp', 'prometheus_client', 'yaml',\n"
        "         'tqdm', 'watchdog', 'aiofiles', 'replicator.config',\n"
        "         'replicator.storage.s3_options')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "[]"
    assert seqs(out) == list(range(1, 11))


def test_restore_integrity_check_flags_exclude_each_other(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.db"
    r = cli("restore", str(replica), "-o", str(out), "--full-integrity-check",
            "--no-integrity-check", timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--no-integrity-check" in r.stderr and "--full-integrity-check" in r.stderr
    assert not out.exists()


def test_config_selects_replicas(replica: Path, tmp_path: Path) -> None:
    """With --config: listings per replica; restore picks the replica with the newest point."""
    behind = tmp_path / "behind"
    shutil.copytree(replica, behind)
    gen2 = list(objects(replica))[1]
    shutil.rmtree(behind / "generations" / gen2)
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"""dbs:
  - path: {tmp_path / 'app.db'}
    name: app
    replicas:
      - {{name: old, path: {behind}}}
      - {{name: new, url: file://{replica}}}
""")
    rows = json.loads(run("generations", "-c", str(cfg), "app", "--json"))
    assert [(r["replica"], r["end_txid"]) for r in rows] == [("old", 6), ("new", 6), ("new", 3)]
    rows = json.loads(run("snapshots", "-c", str(cfg), "app", "--replica", "old", "--json"))
    assert {r["replica"] for r in rows} == {"old"}
    f = run("restore", "-c", str(cfg), "app", "--dry-run")
    assert f"generation: {gen2}" in f
    assert f"source:     file://{replica}" in f
    f = run("restore", "-c", str(cfg), str(tmp_path / "app.db"), "--replica", "old", "--dry-run")
    assert f"source:     file://{behind}" in f
    r = cli("generations", "-c", str(cfg), "app", "--replica", "nope")
    assert r.returncode == 1
    assert r.stderr.startswith("replicator: error: --replica: no replica named 'nope'")
    r = cli("generations", "-c", str(cfg), "other")
    assert r.returncode == 1
    assert "database 'other' is not in" in r.stderr


def test_listed_times_are_restorable(replica: Path) -> None:
    """The START of a generation and the END of the one before it, as ``generations`` prints
    them, restore that generation's first and last point."""
    rows = json.loads(run("generations", str(replica), "--json"))
    f = dry_run(replica, "--to-time", rows[1]["start"])
    assert (f["generation"], f["stops at"].split(",")[0]) == (rows[1]["generation"], "txid 0")
    f = dry_run(replica, "--to-time", rows[0]["end"])
    assert (f["generation"], f["stops at"].split(",")[0]) == (rows[0]["generation"], "txid 6")


def test_restore_into_a_directory_with_force(replica: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep").write_bytes(b"x")
    r = cli("restore", str(replica), "-o", str(out), "--force")
    assert r.returncode == 1
    assert r.stderr.startswith(f"replicator: error: cannot write {out}")
    assert len(r.stderr.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["d"]
    assert os.listdir(out) == ["keep"]


def test_version() -> None:
    assert run("version") == f"replicator {replicator.__version__}\n"


def test_real_replicate_then_list(tmp_path: Path) -> None:
    """End to end: the replicate command and a writer process, then the listings agree with
    what the writer committed."""
    db = tmp_path / "app.db"
    init_db(str(db))
    rep = tmp_path / "rep"
    proc = Replicate(str(db), str(rep), "--monitor-interval", "100ms", log=tmp_path / "r.log")
    try:
        wait_until(lambda: (rep / "generations").is_dir(), what="the first generation")
        w = start_writer(db, tmp_path / "w.log", "--count", "40", "--rate", "200")
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        assert "commits=40 busy=0" in out
    finally:
        assert proc.stop() == 0, proc.text()
    assert len(commit_log(tmp_path / "w.log")) == 40
    rows = json.loads(run("generations", str(rep), "--json"))
    assert len(rows) == 1
    assert rows[0]["end_txid"] == 40
    assert rows[0]["restorable"] is True
    f = dry_run(rep)
    assert f["stops at"].startswith("txid 40, ")
    out = tmp_path / "o.db"
    run("restore", str(rep), "-o", str(out))
    assert seqs(out) == list(range(1, 41))
