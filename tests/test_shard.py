"""``shard: K/N``: several ``replicate`` processes sharing one config's databases, each database
in exactly one part, picked by its path (relative to its ``dir:`` entry)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import util
from util import commit, free_port
from writer import init_db

from replicator.config import Shard, parse_config, parse_shard
from replicator.discovery import shard_key
from replicator.errors import ConfigError


def test_every_database_is_in_exactly_one_part() -> None:
    keys = [f"g{i % 10}/tenant-{i:04d}.db" for i in range(2000)] + [f"/srv/db{i}.db"
                                                                   for i in range(200)]
    for parts in (1, 2, 3, 7):
        counts = [sum(Shard(k, parts).holds(key) for key in keys) for k in range(1, parts + 1)]
        for key in keys:
            assert sum(Shard(k, parts).holds(key) for k in range(1, parts + 1)) == 1, key
        assert sum(counts) == len(keys)
        assert min(counts) > 0.8 * len(keys) / parts, counts  # spread, not all in one part
    # the part depends on the path alone: the same on every run and every machine
    assert [Shard(k, 3).holds("g1/tenant-0001.db") for k in (1, 2, 3)].count(True) == 1
    assert Shard(1, 2).holds("a.db") == Shard(1, 2).holds("a.db")


def test_shard_in_the_config_and_its_errors(tmp_path: Path) -> None:
    dbs = [{"dir": str(tmp_path / "t"), "replicas": ["/b"]}]
    assert parse_config({"dbs": dbs}).shard is None
    cfg = parse_config({"dbs": dbs, "shard": " 2 / 3 "})
    assert cfg.shard == Shard(2, 3) and str(cfg.shard) == "2/3"
    for bad in ("0/2", "3/2", "1/0", "1", "a/b", "1/2/3", 2, True, ""):
        with pytest.raises(ConfigError, match=r"^shard: expected K/N"):
            parse_config({"dbs": dbs, "shard": bad})
    assert parse_shard("1/1") == Shard(1, 1)
    # listed databases are split by their path
    listed = parse_config({"dbs": [{"path": str(tmp_path / f"d{i}.db"), "replicas": ["/b"]}
                                   for i in range(20)], "shard": "1/2"})
    other = parse_config({"dbs": [{"path": str(tmp_path / f"d{i}.db"), "replicas": ["/b"]}
                                  for i in range(20)], "shard": "2/2"})
    one, two = {d.path for d in listed.held()}, {d.path for d in other.held()}
    assert one and two and not one & two and len(one | two) == 20


def test_bad_shard_options_are_one_line_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(f"dbs:\n  - dir: {tmp_path}\n    replicas: [{tmp_path / 'b'}]\n")
    for args, msg in (
        (("--config", str(cfg), "--shard", "3/2"), "--shard: expected K/N"),
        ((str(tmp_path / "a.db"), "--shard", "1/2"), "--shard: needs --config"),
    ):
        r = util.cli("replicate", *args, timeout=60)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text(cfg.read_text() + "shard: 0/2\n")
    r = util.cli("replicate", "--config", str(bad), timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "replicator: error: shard: expected K/N, part K of N with 1 <= K <= N, like 1/2, "
        "got '0/2'"], r.stderr
    assert not (tmp_path / "b").exists()


def _status(port: int) -> dict[str, object] | None:
    r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
    if r.returncode != 0:
        return None
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def _replicating(port: int) -> set[str]:
    doc = _status(port)
    if doc is None:
        return set()
    dbs = doc["dbs"]
    assert isinstance(dbs, list)
    return {d["path"] for d in dbs if all(r["generation"] for r in d["replicas"])}


def test_two_processes_share_a_directory_each_database_once(tmp_path: Path) -> None:
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    names = [f"g{i % 3}/t{i:02d}.db" for i in range(24)] + ["top.db"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        init_db(str(root / name))
        commit(root / name, 2)
    app = tmp_path / "app.db"
    init_db(str(app))
    # the second process names the directory by another path: the parts are the same
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    ports = [free_port(), free_port()]
    cfgs = []
    for k, top in ((1, root), (2, alias)):
        cfg = tmp_path / f"part{k}.yml"
        cfg.write_text(
            f"metrics-addr: 127.0.0.1:{ports[k - 1]}\nshard: {k}/2\nshutdown-timeout: 20s\n"
            f"dbs:\n  - dir: {top}\n    recursive: true\n    integrity: off\n"
            f"    replicas: [{{name: local, path: {dest}}}]\n"
            f"  - path: {app}\n    integrity: off\n"
            f"    replicas: [{{name: local, path: {tmp_path / 'app-backup'}}}]\n")
        cfgs.append(cfg)
    reps = [util.Replicate("--config", str(c), log=tmp_path / f"rep{k}.log")
            for k, c in enumerate(cfgs)]
    writer = util.CommitLoop(root / "top.db")
    total = len(names) + 1
    try:
        util.wait_until(lambda: sum(len(_replicating(p)) for p in ports) == total, 90, 0.3,
                        "every database replicated by one of the two")
        writer.start()
        init_db(str(root / "g1" / "new.db"))  # found by one of them, by its part
        commit(root / "g1" / "new.db", 4)
        util.wait_until(lambda: sum(len(_replicating(p)) for p in ports) == total + 1, 60,
                        0.3, "the new database replicated")
        one, two = (_replicating(p) for p in ports)
        names.append("g1/new.db")
        mine = [{str(top / n) for n in names if Shard(k, 2).holds(n)}
                | ({str(app)} if Shard(k, 2).holds(str(app)) else set())
                for k, top in ((1, root), (2, alias))]
        assert (one, two) == (mine[0], mine[1])
        assert one and two
        for port, k in zip(ports, (1, 2), strict=True):
            doc = _status(port)
            assert doc is not None and doc["shard"] == f"{k}/2"
            fleet = doc["databases"]
            assert isinstance(fleet, dict) and fleet["failed"] == 0, fleet
            text = util.cli("status", "--addr", f"127.0.0.1:{port}", timeout=30).stdout
            assert f", shard {k}/2: " in text.splitlines()[0], text
        commit(root / "g1" / "new.db", 1)
    finally:
        writer.stop()
        codes = [r.stop(60) for r in reps]
    logs = [r.text() for r in reps]
    assert codes == [0, 0], logs
    for log in logs:
        assert "Traceback" not in log and "another process" not in log, log
        assert "candidates of the other parts of shard" in log, log
    # every command sees every database, whichever part's config it is given
    for name in names:
        out = tmp_path / "out" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        r = util.cli("restore", "--config", str(cfgs[0]), "-o", str(out), str(root / name))
        assert r.returncode == 0, r.stderr
        assert util.dump(out) == util.dump(root / name), name
    assert len(util.seqs(tmp_path / "out" / "top.db")) == 2 + writer.count
    r = util.cli("restore", "--config", str(cfgs[1]), "-o", str(tmp_path / "app.out"), str(app))
    assert r.returncode == 0, r.stderr
    assert util.dump(tmp_path / "app.out") == util.dump(app)
    assert shard_key(parse_config({"dbs": [{"dir": str(alias), "replicas": ["/b"]}]}).dirs[0],
                     str(alias / "g1" / "new.db")) == "g1/new.db"
