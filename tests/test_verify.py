"""Restore drills and on-demand control through the real CLI: ``replicator replicate`` under a
writer process, ``replicator sync --wait`` / ``snapshot`` over the control socket, ``replicator
verify`` proving both replicas equal to the database, then catching a deleted segment, a
corrupted object and an object whose pages are another database's (exit 1, one line, metric 0,
a webhook notification). The schedule is checked in-process with a clock the test sets."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import sqlite3
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import util
from fakeservers import WebhookTestServer
from obsutil import Reaper, get, reaper, scrape, value
from s3fixtures import S3Server
from svcutil import running_service
from util import free_port
from writer import init_db

from replicator.config import load_config
from replicator.drill import POINTS_FILE, load_points
from replicator.format import KIND_SNAPSHOT, ObjectDecoder, ObjectWriter
from replicator.pos import parse_key
from replicator.restore import plan_restore
from replicator.server import control_socket_path
from replicator.storage.file import FileStorage

WAIT = 60.0


@pytest.fixture
def procs() -> Iterator[Reaper]:
    with reaper() as r:
        yield r


def write_rows(db: Path, start: int, n: int, text: str = "row") -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=5)
    for i in range(start, start + n):
        conn.execute("INSERT INTO log(seq, t_ns) VALUES (?, ?)", (i, i))
        conn.execute("INSERT INTO data(k, payload) VALUES (?, ?)", (i, f"{text}-{i:08d}".encode()))
    conn.close()


def objects(replica: Path) -> list[Path]:
    return sorted(p for p in replica.rglob("*") if p.suffix in (".snap", ".seg"))


def verify(cfg: Path) -> tuple[int, str, str]:
    r = util.cli("verify", "--config", str(cfg), timeout=120)
    return r.returncode, r.stdout, r.stderr


def config(tmp_path: Path, db: Path, port: int, hook: str, extra: str = "") -> Path:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"""
metrics-addr: 127.0.0.1:{port}
notify:
  min-interval: 0s
  webhooks: [{{url: "{hook}"}}]
dbs:
  - path: {db}
    name: app
    compaction-levels: []  # a merge would replace the objects the test damages
    verify:
      partial:
        - {{name: recent, sql: "SELECT seq, t_ns FROM log WHERE seq > 10 ORDER BY seq"}}
{extra}    replicas:
      - {{name: local, path: {tmp_path / "local"}}}
      - {{name: second, path: {tmp_path / "second"}}}
""")
    return cfg


def forge_snapshot(path: Path, old: bytes, new: bytes) -> None:
    """Rewrite a snapshot object with the same header and another database's pages (one value
    changed in place): a self-consistent object, as if another replica had written it."""
    raw = path.read_bytes()

    dec = ObjectDecoder(path.name)
    pages = dec.feed(raw)
    dec.finish()
    header = dec.header
    assert header is not None
    assert old in pages
    tmp = path.with_suffix(".forged")
    with open(tmp, "wb") as f:
        w = ObjectWriter(f, KIND_SNAPSHOT, header)
        w.write(pages.replace(old, new, 1))
        w.close()
    os.replace(tmp, path)


def test_sync_snapshot_and_drills_catch_every_kind_of_damage(
    tmp_path: Path, procs: Reaper
) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    write_rows(db, 1, 50)
    port = free_port()
    with WebhookTestServer() as hook:
        cfg = config(tmp_path, db, port, hook.url)
        procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "replicate.log"))
        sock = control_socket_path(load_config(str(cfg)).dbs[0].spool_dir)
        util.wait_until(lambda: os.path.exists(sock), WAIT, what="the control socket")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

        # sync --wait: everything committed so far is on both destinations when it returns
        write_rows(db, 51, 20)
        r = util.cli("sync", "--wait", str(db), "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "on local, second" in r.stdout
        for name in ("local", "second"):
            out = tmp_path / f"synced-{name}.db"
            util.restore(str(tmp_path / name), out)
            assert util.seqs(out) == list(range(1, 71))

        # snapshot now (found without a config: the default spool directory beside DB)
        before = {p.name for p in objects(tmp_path / "local") if p.suffix == ".snap"}
        r = util.cli("snapshot", str(db))
        assert r.returncode == 0, r.stderr
        assert "snapshot of" in r.stdout
        util.wait_until(lambda: {p.name for p in objects(tmp_path / "local")
                                 if p.suffix == ".snap"} - before != set(), WAIT,
                        what="the new snapshot shipped")

        # two good drills: the second one also restores the first one's point
        code, out, err = verify(cfg)
        assert code == 0, err
        assert "restore drill ok" in out and "recent" in out
        write_rows(db, 71, 30)
        code, out, err = verify(cfg)
        assert code == 0, err
        assert len(load_points(os.path.dirname(sock))) == 2
        assert out.count("local@") == 3  # newest, its partial check, the earlier point
        m = scrape(port)
        for name in ("local", "second"):
            assert value(m, "replicator_verify_ok", db="app", replica=name) == 1
            assert (value(m, "replicator_verify_last_success_timestamp_seconds", db="app",
                          replica=name) or 0) > 0
            assert (value(m, "replicator_verify_duration_seconds", db="app",
                          replica=name) or 0) > 0

        def failing(what: str, bad: str = "local") -> str:
            """One line naming the damaged destination; the other one still proven."""
            code, out, err = verify(cfg)
            assert code == 1, f"{what}: drill passed: {out}"
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith(f"app: {bad}: "), lines[0]
            m = scrape(port)
            good = "second" if bad == "local" else "local"
            assert value(m, "replicator_verify_ok", db="app", replica=bad) == 0
            assert value(m, "replicator_verify_ok", db="app", replica=good) == 1
            return lines[0]

        local = tmp_path / "local"
        # 1. a segment deleted from a replica
        segs = [p for p in objects(local) if p.suffix == ".seg"]
        victim = segs[-1]
        saved = victim.read_bytes()
        victim.unlink()
        line = failing("deleted segment")
        assert "/local: " in line and "restore failed" in line and "not in generation" in line
        victim.write_bytes(saved)
        assert verify(cfg)[0] == 0

        # 2. a corrupted object: the last one the newest state is restored from (a segment,
        # or a differential snapshot that makes the segments before it unnecessary)
        newest = asyncio.run(plan_restore(FileStorage(str(local))))
        victim = local / newest.objects[-1].key
        saved = victim.read_bytes()
        data = bytearray(saved)
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        line = failing("corrupted object")
        assert victim.name in line and "corrupt" in line
        victim.write_bytes(saved)
        assert verify(cfg)[0] == 0

        # 3. content that differs: the newest snapshot replaced by one with another database's
        # pages (same header, valid checksums, integrity_check ok)
        write_rows(db, 101, 5, text="ROW")
        r = util.cli("snapshot", str(db))
        assert r.returncode == 0, r.stderr
        r = util.cli("sync", "--wait", str(db))
        assert r.returncode == 0, r.stderr
        snap = max((p for p in objects(tmp_path / "second") if p.suffix == ".snap"),
                   key=lambda p: parse_key(str(p.relative_to(tmp_path / "second"))).end_txid)
        forge_snapshot(snap, b"ROW-00000103", b"XXX-00000103")
        line = failing("different content", bad="second")
        assert "second" in line and "differs" in line

        # every failure went out as a notification
        util.wait_until(lambda: len([p for p in hook.payloads if p["check"] == "verify"
                                     and p["state"] == "failing"]) >= 3, WAIT,
                        what="drill failures notified")
        recovered = [p for p in hook.payloads if p["check"] == "verify"
                     and p["state"] == "recovered"]
        assert recovered


def test_control_commands_without_a_running_replicator_say_so(tmp_path: Path) -> None:
    db = tmp_path / "idle.db"
    init_db(str(db))
    for args in (("snapshot", str(db)), ("sync", "--wait", str(db))):
        r = util.cli(*args)
        assert r.returncode == 1
        assert r.stderr.startswith("replicator: error: no replicator is running") and (
            len(r.stderr.splitlines()) == 1)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n    replicas: [{tmp_path / 'rep'}]\n")
    code, out, err = verify(cfg)
    assert code == 1 and "recorded no content hash" in err


async def test_scheduled_drill_follows_the_clock(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    write_rows(db, 1, 10)
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"""
dbs:
  - path: {db}
    verify: {{interval: 24h}}
    replicas: [{tmp_path / "rep"}]
""")
    dbcfg = load_config(str(cfg)).dbs[0]

    async def run() -> None:
        async with running_service(dbcfg) as svc:
            assert svc.driller.next_due() == 0.0  # never drilled: due at once
            t0 = 1_800_000_000.0
            result = await svc.driller.run_once(now=t0)
            assert result.ok, result.message
            assert svc.driller.next_due() == t0 + 86400
            m = svc.metrics.registry.get_sample_value
            labels = {"db": dbcfg.name, "replica": svc.replicas[0].name}
            assert m("replicator_verify_ok", labels) == 1
            assert m("replicator_verify_last_success_timestamp_seconds", labels) == t0
            # a damaged replica fails the drill, and the next one is still an interval later
            for p in objects(tmp_path / "rep"):
                p.unlink()
            result = await svc.driller.run_once(now=t0 + 86400)
            assert not result.ok and "rep" in result.message
            assert m("replicator_verify_ok", labels) == 0
            assert m("replicator_verify_last_success_timestamp_seconds", labels) == t0
            assert svc.driller.next_due() == t0 + 2 * 86400

    await run()
    assert (Path(dbcfg.spool_dir) / POINTS_FILE).exists()


async def test_a_destination_that_is_down_fails_its_own_drill(tmp_path: Path) -> None:
    """A destination that never gets the newest point fails its drill after the timeout; the
    other one is proven, and the point is recorded as proven there."""
    db = tmp_path / "app.db"
    init_db(str(db))
    write_rows(db, 1, 10)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a regular file where a replica directory should be\n")
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"""
dbs:
  - path: {db}
    name: app
    verify: {{interval: 24h, timeout: 2s}}
    replicas:
      - {{name: good, path: {tmp_path / "good"}}}
      - {{name: down, path: {blocker / "replica"}}}
""")
    dbcfg = load_config(str(cfg)).dbs[0]

    async def run() -> None:
        async with running_service(dbcfg) as svc:
            t0 = 1_800_000_000.0
            result = await svc.driller.run_once(now=t0)
            assert not result.ok
            by_name = {r.replica: r for r in result.replicas}
            assert by_name["good"].ok, by_name["good"].message
            assert not by_name["down"].ok and "within 2s: down" in by_name["down"].message
            assert "down: " in result.message and "good" not in result.message
            m = svc.metrics.registry.get_sample_value
            assert m("replicator_verify_ok", {"db": "app", "replica": "good"}) == 1
            assert m("replicator_verify_ok", {"db": "app", "replica": "down"}) == 0
            assert m("replicator_verify_last_success_timestamp_seconds",
                     {"db": "app", "replica": "good"}) == t0
            assert m("replicator_verify_last_success_timestamp_seconds",
                     {"db": "app", "replica": "down"}) is None
            assert (m("replicator_verify_duration_seconds",
                      {"db": "app", "replica": "down"}) or 0) >= 2

    await run()
    [point] = load_points(dbcfg.spool_dir)
    assert point.replicas == ("good",)


def test_drills_on_seaweedfs(
    tmp_path: Path, procs: Reaper, seaweedfs_server: S3Server, seaweedfs_url: str,
    s3_env_vars: dict[str, str],
) -> None:
    """A drill restores from S3 too: equal at first, then a deleted segment is caught; verify
    DESTINATION restores an S3 replica without a database to compare with."""
    env = {**util.env_without_aws(), **s3_env_vars}
    db = tmp_path / "app.db"
    init_db(str(db))
    write_rows(db, 1, 40)
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"""
dbs:
  - path: {db}
    name: app
    compaction-levels: []  # a merge would replace the segment the test deletes
    replicas:
      - {{name: s3, url: "{seaweedfs_url}"}}
""")
    procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "r.log", env=env))
    sock = control_socket_path(load_config(str(cfg)).dbs[0].spool_dir)
    util.wait_until(lambda: os.path.exists(sock), WAIT, what="the control socket")
    write_rows(db, 41, 10)
    r = util.cli("verify", "--config", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    assert "restore drill ok" in r.stdout and "s3@" in r.stdout
    r = util.cli("verify", seaweedfs_url, env=env)
    assert r.returncode == 0, r.stderr
    assert "integrity_check ok" in r.stdout

    bucket = seaweedfs_url.split("/")[2]
    segs = sorted(k for k in seaweedfs_server.keys(bucket) if k.endswith(".seg"))
    seaweedfs_server.client().delete_object(Bucket=bucket, Key=segs[-1])
    r = util.cli("verify", "--config", str(cfg), env=env)
    assert r.returncode == 1, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and "s3://" in r.stderr, r.stderr


def _outside_address() -> str | None:
    """An address of this host that is not loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


def post(url: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read()
        return exc.code, json.loads(body) if body.startswith(b"{") else {}


def test_control_on_the_metrics_address_answers_loopback_only(
    tmp_path: Path, procs: Reaper
) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    port = free_port()
    cfg = tmp_path / "r.yml"
    cfg.write_text(f"metrics-addr: 0.0.0.0:{port}\ndbs:\n  - path: {db}\n    name: app\n"
                   f"    replicas: [{tmp_path / 'rep'}]\n")
    procs.replicator(util.Replicate("--config", str(cfg), log=tmp_path / "r.log"))
    util.wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, WAIT,
                    what="/healthz")
    write_rows(db, 1, 5)
    code, doc = post(f"http://127.0.0.1:{port}/sync?db=app&timeout=30")
    assert code == 200 and doc["ok"] is True, doc
    out = tmp_path / "synced.db"
    util.restore(str(tmp_path / "rep"), out)  # everything committed before the request
    assert util.seqs(out) == [1, 2, 3, 4, 5]
    code, doc = post(f"http://127.0.0.1:{port}/snapshot?db=nope")
    assert code == 404 and "no database 'nope'" in str(doc["error"])
    outside = _outside_address()
    if outside is not None:
        code, _ = post(f"http://{outside}:{port}/snapshot?db=app")
        assert code == 403
