"""End to end with S3 destinations: the real CLI (``replicator replicate`` as a subprocess, a writer
process) against SeaweedFS on 127.0.0.1, with an S3 replica alone and beside a local one.

Covered: restore equals the source and point-in-time restores are exact; kill -9 cycles; a real
outage of the S3 server under write load; wrong credentials, a missing bucket and an unreachable
endpoint beside a healthy local replica; a corrupt and a missing object; two replicators on one
prefix (fencing); no requests from an idle database; restore by replica name and the default pick
of the newest replica; the parallel download of a restore; a destination's sync-interval (uploads
paced, and neither `sync --wait` nor a stop waits for it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import util
from faultproxy import FaultProxy
from s3fixtures import TEST_REGION, TEST_SECRET_KEY, S3Server, StoppableSeaweedFS
from util import free_port
from writer import init_db

from replicator.errors import ReplicatorError
from replicator.pos import ObjectInfo, parse_key
from replicator.restore import apply_plan, fmt_ns, plan_restore
from replicator.storage import open_storage
from replicator.storage.base import StorageClient
from replicator.storage.s3 import S3Storage

pytestmark = pytest.mark.s3

DESTS = [pytest.param(False, id="s3"), pytest.param(True, id="local+s3")]


# -- helpers ------------------------------------------------------------------------------------


@dataclass
class S3Dest:
    """A replica prefix in a bucket of a test server."""

    server: S3Server
    bucket: str
    prefix: str = "replica"
    endpoint: str | None = None  # another way in (a proxy), if not the server's own

    @property
    def url(self) -> str:
        """The destination URL."""
        if self.endpoint is None:
            return self.server.url(self.bucket, self.prefix)
        return (f"s3://{self.bucket}/{self.prefix}?endpoint={self.endpoint}&region={TEST_REGION}"
                "&force_path_style=true")

    @property
    def shown(self) -> str:
        """The destination as the replicator names it."""
        return f"s3://{self.bucket}/{self.prefix}"

    def objects(self) -> list[ObjectInfo]:
        """Every object of the replica, from a listing of the bucket."""
        out = []
        for key in self.server.keys(self.bucket):
            if key.startswith(self.prefix + "/"):
                info = parse_key(key[len(self.prefix) + 1 :])
                if info is not None:
                    out.append(info)
        return sorted(out)

    def latest_txid(self) -> tuple[str, int] | None:
        """(generation, txid) of the newest object."""
        objs = self.objects()
        if not objs:
            return None
        last = max(objs, key=lambda o: (o.generation, o.end_txid))
        return last.generation, last.end_txid

    def has_snapshot(self) -> bool:
        """Whether a snapshot was shipped."""
        return any(o.kind == "snapshot" for o in self.objects())


def local_objects(dest: Path) -> list[ObjectInfo]:
    """Every object of a local replica."""
    out = []
    for p in dest.glob("generations/*/*/*"):
        info = parse_key(p.relative_to(dest).as_posix())
        if info is not None:
            out.append(info)
    return sorted(out)


def local_latest_txid(dest: Path) -> tuple[str, int] | None:
    """(generation, txid) of the newest object of a local replica."""
    objs = local_objects(dest)
    if not objs:
        return None
    last = max(objs, key=lambda o: (o.generation, o.end_txid))
    return last.generation, last.end_txid


def metrics(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The samples at ``/metrics``: (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2]))
            out.append((m[1], labels, float(m[3])))
    return out


def sample(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    return sum(v for n, lab, v in metrics(port)
               if n == name and all(lab.get(k) == want for k, want in labels.items()))


def assert_hole_is_spooled(stderr: str, spool: Path) -> None:
    """A kill -9 may cut an upload short while later objects, shipped concurrently, landed:
    the restore then names the missing txid. That is only allowed for a segment still waiting
    in the spool (the next start ships it; the final restores check that it did)."""
    m = re.search(r"missing WAL segment for txid (\d+) in generation ([0-9a-f]{16})", stderr)
    assert m, stderr
    txid = int(m[1])
    spans = [(int(f.name[:16], 16), int(f.name[17:33], 16))
             for f in (spool / "generations" / m[2] / "wal").glob("*.seg")]
    assert any(a <= txid <= b for a, b in spans), (stderr, spans)


def restore(dest: str, out: Path, env: dict[str, str], *extra: str) -> str:
    """``replicator restore DEST -o OUT``; asserts success and returns stdout."""
    r = util.cli("restore", dest, "-o", str(out), *extra, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def write_config(path: Path, db: Path, replicas: list[dict[str, str]]) -> Path:
    """A config file (JSON is YAML) for one database."""
    path.write_text(json.dumps({"dbs": [{"path": str(db), "replicas": replicas}]}))
    return path


class Replicate(util.Replicate):
    """``replicator replicate`` as a subprocess at log level info: at debug, botocore logs the
    traceback of every request it retries. A test that fails leaves none running."""

    running: list[Replicate] = []

    def __init__(self, *args: str, log: Path, env: dict[str, str]) -> None:
        Replicate.running.append(self)
        super().__init__(*args, log=log, env=env, log_level="info")


def wait_started(rep: util.Replicate) -> None:
    """Wait until the replicator runs (it logs what it replicates where)."""
    util.wait_until(lambda: " replicating " in rep.text() or rep.proc.poll() is not None, 90,
                    what="the replicator to start")
    assert rep.proc.poll() is None, rep.text()


def error_lines(rep: util.Replicate, replica: str) -> list[str]:
    """The ERROR lines the replicator logged about one replica."""
    return [line for line in rep.text().splitlines()
            if " ERROR " in line and f"replica {replica}:" in line]


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Kill the replicators a failed test left running."""
    yield
    while Replicate.running:
        rep = Replicate.running.pop()
        if rep.proc.poll() is None:
            rep.kill()


@pytest.fixture
def env(s3_env_vars: dict[str, str]) -> dict[str, str]:
    """The environment of the CLI subprocesses: the test identity only."""
    return {**util.env_without_aws(), **s3_env_vars}


@pytest.fixture
def s3dest(seaweedfs_server: S3Server, s3_url_factory: Callable[..., str]) -> S3Dest:
    """A fresh bucket on SeaweedFS (deleted after the test)."""
    return S3Dest(seaweedfs_server, S3Storage.from_url(s3_url_factory("seaweedfs")).bucket)


# -- replicate, restore, point in time ----------------------------------------------------------


@pytest.mark.parametrize("with_local", DESTS)
def test_replicate_restore_equals_source(tmp_path: Path, env: dict[str, str], s3dest: S3Dest,
                                         with_local: bool) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    local = tmp_path / "local"
    dests = ([str(local)] if with_local else []) + [s3dest.url]
    rep = Replicate(str(db), *dests, "--checkpoint-pages", "200", log=tmp_path / "rep.log",
                    env=env)
    util.wait_until(s3dest.has_snapshot, 60, what="first snapshot in S3")
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--ops", "mixed", "--duration", "4", "--rate", "300")
    instants: list[int] = []
    rnd = random.Random(5)
    while w.poll() is None:
        time.sleep(rnd.uniform(0.4, 0.8))
        instants.append(time.time_ns())
    _, err = w.communicate()
    assert w.returncode == 0, err
    assert rep.stop() == 0, rep.text()
    assert "Traceback" not in rep.text()
    commits = util.commit_log(log)
    assert len(commits) > 300

    sources = [s3dest.url] + ([str(local)] if with_local else [])
    for i, dest in enumerate(sources):
        out = tmp_path / f"restored{i}.db"
        restore(dest, out, env)
        assert util.integrity(out) == "ok"
        assert util.seqs(out) == [c[0] for c in commits]
        assert util.dump(out) == util.dump(db)
    util.checkpoint_truncate(db)
    for i in range(len(sources)):
        assert (tmp_path / f"restored{i}.db").read_bytes() == db.read_bytes()

    # point in time, from S3: exactly what was observed by each instant (and the same from the
    # local replica)
    times = util.observed_times(s3dest.url)
    by_seq = {c[0]: c for c in commits}
    assert len(instants) >= 4
    for i, t in enumerate(rnd.sample(instants, 4)):
        out = tmp_path / f"pitr{i}.db"
        stdout = restore(s3dest.url, out, env, "--to-time", fmt_ns(t))
        m = re.search(r"generation (\w+), txid (\d+)", stdout)
        assert m, stdout
        gen, txid = m[1], int(m[2])
        assert times[(gen, txid)] <= t
        nxt = times.get((gen, txid + 1))
        assert nxt is None or nxt > t, "a transaction observed before T is missing"
        k = util.assert_prefix(util.seqs(out))
        assert util.integrity(out) == "ok"
        if k:
            assert by_seq[k][1] <= t, "restored a commit that started after T"
        if with_local and i < 2:
            same = tmp_path / f"pitr-local{i}.db"
            restore(str(local), same, env, "--to-time", fmt_ns(t))
            assert util.dump(same) == util.dump(out)


@pytest.mark.parametrize("with_local", DESTS)
def test_kill9_cycles_lose_nothing(tmp_path: Path, env: dict[str, str], s3dest: S3Dest,
                                   with_local: bool) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    local = tmp_path / "local"
    dests = ([str(local)] if with_local else []) + [s3dest.url]
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--duration", "600", "--rate", "300", "--ops", "mixed")
    rnd = random.Random(13)
    try:
        for cycle, rep in util.kill9_cycles(db, dests, tmp_path, 6, rnd, up=(0.5, 1.5), env=env,
                                            replicate=Replicate):
            # a restart right after kill -9 takes the lease back: the old pid is gone
            assert "replica path in use" not in rep.text()
            if s3dest.has_snapshot():
                out = tmp_path / f"r{cycle}.db"
                r = util.cli("restore", s3dest.url, "-o", str(out), env=env)
                if r.returncode != 0:
                    assert_hole_is_spooled(r.stderr, tmp_path / ".app.db-replicator")
                    continue
                util.assert_prefix_of(out, log)
                out.unlink()
        rep = Replicate(str(db), *dests, log=tmp_path / "final.log", env=env)
        wait_started(rep)
        util.wait_until(s3dest.has_snapshot, 60, what="a snapshot in S3")
        time.sleep(0.5)
    finally:
        w.terminate()
        w.communicate(timeout=60)
    assert w.returncode == 0
    assert rep.stop() == 0, rep.text()
    for i, dest in enumerate([s3dest.url] + ([str(local)] if with_local else [])):
        out = tmp_path / f"final{i}.db"
        restore(dest, out, env)
        util.assert_every_commit(out, log, db)


# -- faults -------------------------------------------------------------------------------------


def test_s3_outage_under_write_load(tmp_path: Path, env: dict[str, str],
                                    stoppable_seaweedfs: StoppableSeaweedFS) -> None:
    """The S3 server really stops for 30 s while the application writes: the local replica keeps
    up meanwhile, S3 catches up afterwards, and both restores hold every commit."""
    weed = stoppable_seaweedfs
    s3 = S3Dest(weed.server, weed.server.create_bucket())
    db = tmp_path / "app.db"
    init_db(str(db))
    local = tmp_path / "local"
    port = free_port()
    cfg = write_config(tmp_path / "cfg.yml", db, [{"name": "local", "path": str(local)},
                                                  {"name": "s3", "url": s3.url}])
    rep = Replicate("--config", str(cfg), "--metrics-addr", f"127.0.0.1:{port}",
                    log=tmp_path / "rep.log", env=env)
    util.wait_until(s3.has_snapshot, 60, what="first snapshot in S3")
    log = tmp_path / "commits.log"
    w = util.start_writer(db, log, "--duration", "600", "--rate", "150")
    try:
        util.wait_until(lambda: len(util.commit_log(log)) >= 100, 30, what="first commits")
        weed.stop()
        seen = [local_latest_txid(local)]
        outage_end = time.monotonic() + 30
        while time.monotonic() < outage_end:
            time.sleep(5)
            seen.append(local_latest_txid(local))
        # the local replica kept receiving segments all along
        assert None not in seen
        assert all(b > a for a, b in itertools.pairwise(seen)), seen  # type: ignore[operator]
        assert sample(port, "replicator_replica_up", replica="s3") == 0
        assert sample(port, "replicator_errors_total", replica="s3") > 0
        assert sample(port, "replicator_replica_up", replica="local") == 1
        assert sample(port, "replicator_errors_total", replica="local") == 0
        weed.start()  # returns once S3 answers again
        back = time.monotonic()
        util.wait_until(lambda: sample(port, "replicator_replica_lag_seconds", replica="s3") < 1,
                        60, what="S3 lag back under a second")
        # a figure for the record (tests assert outcomes, not timings)
        print(f"S3 lag under 1 s {time.monotonic() - back:.2f} s after S3 was back",
              file=sys.stderr)
        at_restart = len(util.commit_log(log))
        util.wait_until(lambda: len(util.commit_log(log)) >= at_restart + 300, 30,
                        what="commits after the restart")
    finally:
        w.terminate()
        w.communicate(timeout=60)
    assert w.returncode == 0
    commits = [c[0] for c in util.commit_log(log)]
    # S3 catches up with everything the local replica has
    util.wait_until(lambda: s3.latest_txid() is not None
                    and s3.latest_txid() == local_latest_txid(local), 90,
                    what="S3 to catch up after the outage")
    assert sample(port, "replicator_replica_up", replica="s3") == 1
    assert rep.stop() == 0, rep.text()
    assert "Traceback" not in rep.text()
    for i, dest in enumerate([s3.url, str(local)]):
        out = tmp_path / f"restored{i}.db"
        restore(dest, out, env)
        assert util.seqs(out) == commits
        assert util.dump(out) == util.dump(db)


BAD = ["wrong-credentials", "missing-bucket", "unreachable"]


@pytest.mark.parametrize("fault", BAD)
def test_bad_s3_destination_beside_local(tmp_path: Path, env: dict[str, str], s3dest: S3Dest,
                                         fault: str) -> None:
    if fault == "wrong-credentials":
        env = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
        url, reason = s3dest.url, "check credentials"
    elif fault == "missing-bucket":
        url = s3dest.server.url("no-such-bucket-" + s3dest.bucket[2:], "replica")
        reason = "does not exist"
    else:
        # fewer retries than the default: each attempt is refused at once, and the defaults
        # would spend about 12 s on the first one before the database starts
        url = S3Dest(s3dest.server, s3dest.bucket,
                     endpoint=f"http://127.0.0.1:{free_port()}").url + "&max_retries=1"
        reason = "connection refused"
    db = tmp_path / "app.db"
    init_db(str(db))
    local = tmp_path / "local"
    port = free_port()
    cfg = write_config(tmp_path / "cfg.yml", db, [{"name": "local", "path": str(local)},
                                                  {"name": "s3", "url": url}])
    rep = Replicate("--config", str(cfg), "--metrics-addr", f"127.0.0.1:{port}",
                    log=tmp_path / "rep.log", env=env)
    try:
        util.wait_until(lambda: any(local.glob("generations/*/snapshots/*.snap")), 90,
                        what="the local replica's first snapshot")
        log = tmp_path / "commits.log"
        w = util.start_writer(db, log, "--count", "200", "--rate", "200")
        w.communicate(timeout=60)
        assert w.returncode == 0
        util.wait_until(lambda: local_latest_txid(local) is not None
                        and local_latest_txid(local)[1] >= 200, 30,  # type: ignore[index]
                        what="the local replica to have every commit")
        assert rep.proc.poll() is None, rep.text()
        assert sample(port, "replicator_errors_total", replica="s3") > 0
        assert sample(port, "replicator_replica_up", replica="s3") == 0
        assert sample(port, "replicator_replica_up", replica="local") == 1
    finally:
        rc = rep.stop()
    assert rc == 0, rep.text()
    text = rep.text()
    assert "Traceback" not in text
    assert TEST_SECRET_KEY not in text and "not-the-secret" not in text
    lines = error_lines(rep, "s3")
    assert len(lines) == 1, lines
    assert reason in lines[0] and "s3://" in lines[0]
    assert not error_lines(rep, "local")
    out = tmp_path / "restored.db"
    restore(str(local), out, env)
    assert util.seqs(out) == list(range(1, 201))
    assert util.dump(out) == util.dump(db)


def test_only_replica_with_wrong_credentials_exits(tmp_path: Path, env: dict[str, str],
                                                   s3dest: S3Dest) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    bad = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret-0123456789"}
    r = util.cli("replicate", str(db), s3dest.url, env=bad, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "not-the-secret" not in r.stderr + r.stdout
    final = r.stderr.strip().splitlines()[-1]
    assert final.startswith("replicator: error: s3://")
    assert "check credentials" in final
    assert s3dest.objects() == []


def replicate_every_segment(db: Path, s3dest: S3Dest, env: dict[str, str],
                            tmp_path: Path) -> Replicate:
    """``replicate`` to ``s3dest`` without differential snapshots or compaction: a restore of the
    newest state reads every segment after the first snapshot, and no merged object covers one
    that a test deletes."""
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(json.dumps({"dbs": [{"path": str(db), "replicas": [s3dest.url],
                                        "snapshot-wal-factor": 0,
                                        "compaction-levels": []}]}))
    return Replicate("--config", str(cfg), log=tmp_path / "rep.log", env=env)


def test_corrupt_or_missing_object_stops_restore(tmp_path: Path, env: dict[str, str],
                                                 s3dest: S3Dest) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    # the newest restore must read the damaged segments below
    rep = replicate_every_segment(db, s3dest, env, tmp_path)
    util.wait_until(s3dest.has_snapshot, 60, what="first snapshot in S3")
    w = util.start_writer(db, tmp_path / "c.log", "--count", "300", "--rate", "300")
    w.communicate(timeout=60)
    assert rep.stop() == 0, rep.text()
    segs = [o for o in s3dest.objects() if o.kind == "wal"]
    assert len(segs) >= 6
    client = s3dest.server.client()
    outdir = tmp_path / "out"
    outdir.mkdir()

    def fails(*extra: str) -> str:
        r = util.cli("restore", s3dest.url, "-o", str(outdir / "x.db"), *extra, env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        assert os.listdir(outdir) == [], "a failed restore left files behind"
        return r.stderr.strip()

    # a corrupted object: named, and nothing written
    bad = segs[len(segs) * 2 // 3]
    key = f"{s3dest.prefix}/{bad.key}"
    data = bytearray(client.get_object(Bucket=s3dest.bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=s3dest.bucket, Key=key, Body=bytes(data))
    err = fails()
    assert bad.key in err and "corrupt" in err, err
    # up to the point before it, when asked explicitly
    restore(s3dest.url, tmp_path / "before.db", env, "--txid", str(bad.start_txid - 1))
    assert util.seqs(tmp_path / "before.db")[-1] == bad.start_txid - 1

    # a missing object in the middle: the missing txid named, and nothing written
    gone = segs[len(segs) // 3]
    client.delete_object(Bucket=s3dest.bucket, Key=f"{s3dest.prefix}/{gone.key}")
    err = fails()
    assert f"missing WAL segment for txid {gone.start_txid}" in err, err
    err = fails("--dry-run")
    assert f"missing WAL segment for txid {gone.start_txid}" in err, err


def test_two_replicators_on_one_prefix(tmp_path: Path, env: dict[str, str],
                                       s3dest: S3Dest) -> None:
    """A second replicator (another database) pointed at a prefix in use is refused; the first
    one's replica stays intact."""
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    init_db(str(db_a))
    init_db(str(db_b))
    local_a, local_b = tmp_path / "local-a", tmp_path / "local-b"
    rep_a = Replicate(str(db_a), str(local_a), s3dest.url, log=tmp_path / "a.log", env=env)
    util.wait_until(s3dest.has_snapshot, 60, what="a's first snapshot in S3")
    log_a = tmp_path / "a-commits.log"
    w_a = util.start_writer(db_a, log_a, "--count", "150", "--rate", "150")
    try:
        # alone: it cannot start
        r = util.cli("replicate", str(db_b), s3dest.url, env=env, timeout=120)
        assert r.returncode == 1, r.stderr
        final = r.stderr.strip().splitlines()[-1]
        assert "replica path in use by host " in final
        assert f"pid {rep_a.proc.pid} db {db_a}" in final
        # beside a local replica: it runs, replicating locally only
        port = free_port()
        rep_b = Replicate(str(db_b), str(local_b), s3dest.url, "--metrics-addr",
                          f"127.0.0.1:{port}", log=tmp_path / "b.log", env=env)
        try:
            wait_started(rep_b)
            w_b = util.start_writer(db_b, tmp_path / "b-commits.log", "--count", "100",
                                    "--rate", "200")
            w_b.communicate(timeout=60)
            util.wait_until(lambda: (local_latest_txid(local_b) or ("", 0))[1] >= 100, 30,
                            what="b's local replica")
            assert sample(port, "replicator_errors_total", replica="replica2",
                          operation="lease") > 0
            assert sample(port, "replicator_replica_up", replica="replica2") == 0
        finally:
            assert rep_b.stop() == 0, rep_b.text()
        assert len(error_lines(rep_b, "replica2")) == 1
        assert "replica path in use" in error_lines(rep_b, "replica2")[0]
        w_a.communicate(timeout=60)
    finally:
        w_a.terminate()
        w_a.communicate(timeout=60)
    util.wait_until(lambda: s3dest.latest_txid() == local_latest_txid(local_a), 30,
                    what="a's S3 replica to catch up")
    assert rep_a.stop() == 0, rep_a.text()
    assert "replica taken over" not in rep_a.text()
    # nothing of b's reached the prefix
    assert {o.generation for o in s3dest.objects()} == {o.generation for o in
                                                        local_objects(local_a)}
    out = tmp_path / "restored-a.db"
    restore(s3dest.url, out, env)
    assert util.seqs(out) == list(range(1, 151))
    assert util.dump(out) == util.dump(db_a)
    out_b = tmp_path / "restored-b.db"
    restore(str(local_b), out_b, env)
    assert util.dump(out_b) == util.dump(db_b)


# -- idle cost ----------------------------------------------------------------------------------


def test_idle_database_makes_no_requests(tmp_path: Path, env: dict[str, str], s3dest: S3Dest
                                         ) -> None:
    with FaultProxy(("127.0.0.1", s3dest.server.port)) as proxy:
        via = S3Dest(s3dest.server, s3dest.bucket, endpoint=proxy.endpoint)
        db = tmp_path / "app.db"
        init_db(str(db))
        # compaction off: it follows the last writes with a listing as each level's window
        # closes, which is bounded work, not polling
        cfg = tmp_path / "idle.yml"
        cfg.write_text(json.dumps({"dbs": [{"path": str(db), "compaction-levels": [],
                                            "replicas": [{"url": via.url}]}]}))
        rep = Replicate("--config", str(cfg), log=tmp_path / "rep.log", env=env)
        try:
            util.wait_until(via.has_snapshot, 60, what="first snapshot in S3")
            w = util.start_writer(db, tmp_path / "c.log", "--count", "20", "--rate", "100")
            w.communicate(timeout=60)
            util.wait_until(lambda: (via.latest_txid() or ("", 0))[1] >= 20, 30,
                            what="the commits in S3")
            assert proxy.client_bytes > 0  # it does go through the proxy

            def settled() -> bool:
                before = proxy.client_bytes
                time.sleep(1)
                return proxy.client_bytes == before

            util.wait_until(settled, 30, interval=0, what="the replicator to go idle")
            before = (proxy.client_bytes, proxy.connections)
            time.sleep(5)
            assert (proxy.client_bytes, proxy.connections) == before, "requests while idle"
            assert rep.proc.poll() is None
        finally:
            assert rep.stop() == 0, rep.text()


def start_paced(tmp_path: Path, env: dict[str, str], s3dest: S3Dest, interval: str,
                port: int | None = None, **db_fields: object
                ) -> tuple[Path, Path, Replicate, int]:
    """A database replicated to ``s3dest`` with ``sync-interval: interval`` (and its metrics
    and status on ``port``), once its first snapshot is there: (database, config, replicator,
    the replica's txid then)."""
    db = tmp_path / "app.db"
    init_db(str(db))
    cfg = tmp_path / "paced.yml"
    top = {} if port is None else {"metrics-addr": f"127.0.0.1:{port}"}
    cfg.write_text(json.dumps({**top, "dbs": [{"path": str(db), **db_fields, "replicas": [
        {"url": s3dest.url, "sync-interval": interval}]}]}))
    rep = Replicate("--config", str(cfg), log=tmp_path / "rep.log", env=env)
    util.wait_until(s3dest.has_snapshot, 60, what="first snapshot in S3")
    return db, cfg, rep, (s3dest.latest_txid() or ("", 0))[1]


def test_sync_interval_paces_uploads_and_restores_equal(
    tmp_path: Path, env: dict[str, str], s3dest: S3Dest
) -> None:
    """A destination with ``sync-interval: 1s`` uploads at most one round a second: a writer's
    300 commits go up as a handful of objects (compaction off, so none is merged away), not one
    per upload round trip, and the replica restores equal."""
    db, _, rep, base = start_paced(tmp_path, env, s3dest, "1s", **{"compaction-levels": []})
    try:
        log = tmp_path / "commits.log"
        w = util.start_writer(db, log, "--count", "300", "--rate", "100")
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err

        def segments() -> list[ObjectInfo]:
            return [o for o in s3dest.objects() if o.kind == "wal"]

        # the segments, not any object: a differential snapshot taken for the WAL's volume in
        # the writer's pause may go up in the same round as the last segment, or before it
        util.wait_until(lambda: max((o.end_txid for o in segments()), default=0) >= base + 300,
                        30, what="the commits in S3")
        wal = segments()
        # three seconds of writing, a round at most every second (and one for the snapshot's
        # neighbours); unpaced, about one object per commit at this rate
        assert 1 <= len(wal) <= 8, [o.key for o in wal]
    finally:
        assert rep.stop() == 0, rep.text()
    out = tmp_path / "restored.db"
    restore(s3dest.url, out, env)
    assert util.seqs(out) == [c[0] for c in util.commit_log(log)]
    assert util.dump(out) == util.dump(db)


def test_sync_wait_and_shutdown_do_not_wait_for_the_sync_interval(
    tmp_path: Path, env: dict[str, str], s3dest: S3Dest
) -> None:
    """``sync --wait`` ships at once whatever the interval; commits waiting for the next round
    show as the destination's lag in ``status``, growing as they wait; a stop in the middle of
    an interval ends at once with a final sync that ships them."""
    port = free_port()
    db, cfg, rep, base = start_paced(tmp_path, env, s3dest, "5m", port,
                                     **{"ready-max-lag": "10m"})
    try:
        log = tmp_path / "commits.log"
        w = util.start_writer(db, log, "--count", "20", "--rate", "100")
        assert w.communicate(timeout=60) and w.returncode == 0
        r = util.cli("sync", "--wait", str(db), "--timeout", "60s", "--config", str(cfg),
                     env=env)
        assert r.returncode == 0, r.stderr
        assert (s3dest.latest_txid() or ("", 0))[1] >= base + 20
        # the next round is minutes away: these commits stay in the spool ...
        w = util.start_writer(db, tmp_path / "more.log", "--count", "10", "--rate", "100")
        assert w.communicate(timeout=60) and w.returncode == 0
        time.sleep(1)
        assert (s3dest.latest_txid() or ("", 0))[1] < base + 30
        lags = []
        for _ in range(2):
            r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
            assert r.returncode == 0, r.stderr
            lags.append(json.loads(r.stdout)["dbs"][0]["replicas"][0]["lag_seconds"])
            time.sleep(1.5)
        assert 1.0 <= lags[0] < lags[1], lags
    finally:
        # ... until the stop's final sync, which does not wait for it
        assert rep.stop(timeout=30) == 0, rep.text()
    assert (s3dest.latest_txid() or ("", 0))[1] >= base + 30
    out = tmp_path / "restored.db"
    restore(s3dest.url, out, env)
    assert util.dump(out) == util.dump(db)


# -- restore: by name, the newest by default, parallel download ---------------------------------


def test_restore_by_replica_name_and_newest_by_default(tmp_path: Path, env: dict[str, str],
                                                       s3dest: S3Dest) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    local = tmp_path / "local"
    both = write_config(tmp_path / "both.yml", db, [{"name": "local", "path": str(local)},
                                                    {"name": "s3", "url": s3dest.url}])
    s3_only = write_config(tmp_path / "s3.yml", db, [{"name": "s3", "url": s3dest.url}])
    log = tmp_path / "c.log"
    for cfg, count in ((both, 100), (s3_only, 50)):  # then S3 is ahead of the local replica
        rep = Replicate("--config", str(cfg), log=tmp_path / f"{cfg.stem}.log", env=env)
        wait_started(rep)
        w = util.start_writer(db, log, "--count", str(count), "--rate", "200")
        w.communicate(timeout=60)
        assert rep.stop() == 0, rep.text()

    out = tmp_path / "newest.db"
    stdout = restore(str(db), out, env, "--config", str(both))
    assert f"from {s3dest.shown}" in stdout
    assert util.seqs(out) == list(range(1, 151))
    assert util.dump(out) == util.dump(db)
    named = tmp_path / "named.db"
    stdout = restore(str(db), named, env, "--config", str(both), "--replica", "s3")
    assert f"from {s3dest.shown}" in stdout
    assert util.dump(named) == util.dump(db)
    older = tmp_path / "local.db"
    restore(str(db), older, env, "--config", str(both), "--replica", "local")
    assert util.seqs(older) == list(range(1, 101))
    by_url = tmp_path / "url.db"
    restore(s3dest.url, by_url, env)
    assert util.dump(by_url) == util.dump(db)


class Watched:
    """A destination wrapper that records how many objects are being read at once, and can fail
    the read of one key."""

    def __init__(self, inner: StorageClient, fail_key: str | None = None) -> None:
        self.inner = inner
        self.url = inner.url
        self.fail_key = fail_key
        self.active = 0
        self.most = 0
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def read_object(self, info: ObjectInfo) -> AsyncIterator[bytes]:
        self.active += 1
        self.most = max(self.most, self.active)
        self.reads.append(info.key)
        try:
            async for chunk in self.inner.read_object(info):
                if info.key == self.fail_key:
                    raise ReplicatorError(f"{info.key}: injected failure")
                await asyncio.sleep(0.01)  # a slow network
                yield chunk
        finally:
            self.active -= 1


async def test_restore_downloads_in_parallel_and_cleans_up(tmp_path: Path, env: dict[str, str],
                                                     s3dest: S3Dest) -> None:
    db = tmp_path / "app.db"
    init_db(str(db))
    rep = replicate_every_segment(db, s3dest, env, tmp_path)  # a plan of many objects
    util.wait_until(s3dest.has_snapshot, 60, what="first snapshot in S3")
    w = util.start_writer(db, tmp_path / "c.log", "--count", "200", "--rate", "200")
    w.communicate(timeout=60)
    assert rep.stop() == 0, rep.text()
    outdir = tmp_path / "out"
    outdir.mkdir()

    async def run(fail: bool) -> tuple[Watched, list[ObjectInfo]]:
        client = open_storage(s3dest.url)
        try:
            plan = await plan_restore(client)
            assert len(plan.segments) >= 6
            watched = Watched(client, plan.segments[3].key if fail else None)
            await apply_plan(watched, plan, str(outdir / "x.db"),  # type: ignore[arg-type]
                             prefetch=3)
            return watched, [plan.snapshot, *plan.segments]
        finally:
            await client.aclose()

    watched, objects = await run(False)
    assert 2 <= watched.most <= 4  # the object applied plus at most 3 ahead
    plan_keys = [o.key for o in objects]
    assert sorted(watched.reads) == sorted(plan_keys)  # each object read once
    assert os.listdir(outdir) == ["x.db"]  # the temp directory is gone
    restored = (outdir / "x.db").rename(tmp_path / "x.db")
    assert util.dump(restored) == util.dump(db)
    with pytest.raises(ReplicatorError, match=re.escape(objects[4].key)):
        await run(True)
    assert os.listdir(outdir) == [], "temp files left behind"
