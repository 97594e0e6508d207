"""A lost directory of databases brought back from its replicas: ``restore --config FILE --all``
and ``restore-if-db-not-exists`` on a ``dir:`` entry, through the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import util
from util import commit, free_port
from writer import init_db

from replicator.config import Shard, parse_config
from replicator.discovery import replicated, shard_key
from replicator.pos import new_generation_id, snapshot_info
from replicator.storage.s3 import S3Storage

NAMES = ["a.db", "g1/b.db", "g1/c.db", "g2/deep/d.db", "g2/e.db"]


def _config(tmp_path: Path, root: Path, dest: Path, extra: str = "", top: str = "") -> Path:
    cfg = tmp_path / "replicator.yml"
    cfg.write_text(
        f"{top}shutdown-timeout: 20s\n"
        f"dbs:\n  - dir: {root}\n    recursive: true\n    integrity: off\n{extra}"
        f"    replicas: [{{name: local, path: {dest}}}]\n"
        f"  - path: {tmp_path / 'app.db'}\n    integrity: off\n"
        f"    replicas: [{{name: local, path: {tmp_path / 'app-backup'}}}]\n")
    return cfg


def _replicated_all(port: int, count: int) -> bool:
    r = util.cli("status", "--addr", f"127.0.0.1:{port}", "--json", timeout=30)
    if r.returncode != 0:
        return False
    dbs = json.loads(r.stdout)["dbs"]
    return sum(all(x["generation"] for x in d["replicas"]) for d in dbs) == count


def _replicate_all(tmp_path: Path, root: Path, dest: Path) -> tuple[Path, dict[str, list[str]]]:
    """Databases below ``root`` (and app.db) replicated; the config and each one's dump."""
    for i, name in enumerate(NAMES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        init_db(str(root / name))
        commit(root / name, 1 + i)
    init_db(str(tmp_path / "app.db"))
    commit(tmp_path / "app.db", 3)
    # matching the pattern in the destination but not a database of the entry: hidden
    (dest / ".hidden" / "x.db" / "generations").mkdir(parents=True)
    port = free_port()
    cfg = _config(tmp_path, root, dest, top=f"metrics-addr: 127.0.0.1:{port}\n")
    rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep.log")
    try:
        util.wait_until(lambda: _replicated_all(port, len(NAMES) + 1), 60, 0.3,
                        "every database replicated")
    finally:
        assert rep.stop(60) == 0, rep.text()
    dumps = {n: util.dump(root / n) for n in NAMES}
    dumps["app.db"] = util.dump(tmp_path / "app.db")
    return _config(tmp_path, root, dest), dumps


def test_restore_all_brings_back_a_lost_directory(tmp_path: Path) -> None:
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    cfg, dumps = _replicate_all(tmp_path, root, dest)
    d = parse_config({"dbs": [{"dir": str(root), "recursive": True, "replicas": [str(dest)]}]})
    found = asyncio.run(replicated(d.dirs[0]))
    assert found == sorted(str(root / n) for n in NAMES)
    flat = parse_config({"dbs": [{"dir": str(root), "replicas": [str(dest)]}]}).dirs[0]
    assert asyncio.run(replicated(flat)) == [str(root / "a.db")]  # not recursive: the top
    shutil.rmtree(root)  # the host lost them
    os.unlink(tmp_path / "app.db")

    r = util.cli("restore", "--config", str(cfg), "--all", "--dry-run", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 databases planned, 0 present (left alone), 0 failed" in r.stdout, r.stdout
    assert not root.exists() and not (tmp_path / "app.db").exists()

    r = util.cli("restore", "--config", str(cfg), "--all", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "6 databases restored, 0 present (left alone), 0 failed" in r.stdout, r.stdout
    for name in NAMES:
        assert util.dump(root / name) == dumps[name], name
    assert util.dump(tmp_path / "app.db") == dumps["app.db"]
    assert not (root / ".hidden").exists()

    # present ones are left alone, or refused (nothing overwritten)
    before = {n: (root / n).stat().st_mtime_ns for n in NAMES}
    r = util.cli("restore", "--config", str(cfg), "--all", "--if-db-not-exists", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "0 databases restored, 6 present (left alone), 0 failed" in r.stdout, r.stdout
    r = util.cli("restore", "--config", str(cfg), "--all", timeout=120)
    assert r.returncode == 1
    assert "0 databases restored, 0 present (left alone), 6 failed" in r.stdout
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 6 and all("already exists; pass --force" in e for e in errors), errors
    assert "Traceback" not in r.stderr
    assert {n: (root / n).stat().st_mtime_ns for n in NAMES} == before
    # a directory that cannot be made: an error for each of its databases, no traceback
    shutil.rmtree(root)
    root.write_text("a file where the directory was\n")
    r = util.cli("restore", "--config", str(cfg), "--all", timeout=120)
    assert r.returncode == 1 and "0 databases restored" in r.stdout and "6 failed" in r.stdout
    errors = r.stderr.strip().splitlines()
    assert sum("cannot make directory" in e for e in errors) == 5, errors
    assert sum("app.db already exists" in e for e in errors) == 1, errors
    assert "Traceback" not in r.stderr
    assert root.read_text() == "a file where the directory was\n"


def test_restore_all_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "t", tmp_path / "b")
    for args, msg in (
        (("--all",), "--all: needs --config"),
        (("--config", str(cfg), "--all", str(tmp_path / "t" / "a.db")), "drop"),
        (("--config", str(cfg), "--all", "-o", str(tmp_path / "x.db")), "drop -o"),
        (("--config", str(cfg), "--all", "--txid", "3"), "use --to-time"),
        (("--config", str(cfg)), "restore needs DESTINATION|DB"),
    ):
        r = util.cli("restore", *args, timeout=60)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and msg in lines[0], r.stderr
    assert not (tmp_path / "t").exists() and not (tmp_path / "x.db").exists()


def test_restore_all_with_a_database_no_replica_holds(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "t", tmp_path / "b")  # nothing replicated anywhere
    r = util.cli("restore", "--config", str(cfg), "--all", "--if-replica-exists", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "0 databases restored, 0 present (left alone), 1 in no replica, 0 failed" in r.stdout
    r = util.cli("restore", "--config", str(cfg), "--all", timeout=60)
    assert r.returncode == 1 and "0 databases restored" in r.stdout and "1 failed" in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'app.db'}: " in lines[0], r.stderr
    assert not (tmp_path / "app.db").exists()


def test_replicate_restores_its_part_of_a_lost_directory_on_start(tmp_path: Path) -> None:
    root, dest = tmp_path / "tenants", tmp_path / "backups"
    _replicate_all(tmp_path, root, dest)
    dumps = {n: util.dump(root / n) for n in NAMES}
    shutil.rmtree(root)
    init_db(str(tmp_path / "keep.db"))
    mine = [n for n in NAMES if Shard(1, 2).holds(n)]
    assert mine and len(mine) < len(NAMES)
    assert shard_key(parse_config({"dbs": [{"dir": str(root), "replicas": ["/b"]}]}).dirs[0],
                     str(root / "g1" / "b.db")) == "g1/b.db"
    # one of its part is there already (and changed since): left as it is
    present = mine[0]
    (root / present).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "keep.db", root / present)
    port = free_port()
    cfg = _config(tmp_path, root, dest, extra="    restore-if-db-not-exists: true\n",
                  top=f"metrics-addr: 127.0.0.1:{port}\nshard: 1/2\n")
    rep = util.Replicate("--config", str(cfg), log=tmp_path / "rep2.log")
    try:
        util.wait_until(lambda: _replicated_all(port, len(mine)
                                                + Shard(1, 2).holds(str(tmp_path / "app.db"))),
                        60, 0.3, "its part replicating")
    finally:
        assert rep.stop(60) == 0, rep.text()
    log = rep.text()
    assert (f"{root}: {len(mine) - 1} databases restored from the replicas, 1 present, "
            "0 failed") in log, log
    for name in NAMES:
        if name == present:
            assert util.dump(root / name) == util.dump(tmp_path / "keep.db")
        elif name in mine:
            assert util.dump(root / name) == dumps[name], name
        else:
            assert not (root / name).exists(), name


@pytest.mark.s3
@pytest.mark.parametrize("server", ["seaweedfs", "moto"])
async def test_a_directorys_databases_are_found_in_an_s3_destination(
        server: str, s3_url_factory: Callable[..., str], tmp_path: Path) -> None:
    url = s3_url_factory(server, prefix="fleet/t")
    bucket = S3Storage.from_url(url).bucket
    for name in NAMES + [".hidden/h.db", "g1/notes.txt"]:
        client = S3Storage.from_url(s3_url_factory(server, prefix=f"fleet/t/{name}",
                                                   bucket=bucket))
        try:
            await client.write_object(snapshot_info(GEN, 0, 1), _one(b"x"))
            await client.write_lease(b"lease")
        finally:
            await client.aclose()
    root = tmp_path / "tenants"
    d = parse_config({"dbs": [{"dir": str(root), "recursive": True,
                               "replicas": [{"name": "s3", "url": url}]}]}).dirs[0]
    assert await replicated(d) == sorted(str(root / n) for n in NAMES)
    shallow = parse_config({"dbs": [{"dir": str(root), "replicas": [url]}]}).dirs[0]
    assert await replicated(shallow) == [str(root / "a.db")]


GEN = new_generation_id()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
