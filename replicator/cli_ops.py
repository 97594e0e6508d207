"""The operations commands of the CLI: ``prune`` (retention by hand), ``verify`` (a restore
drill), ``snapshot`` and ``sync --wait`` (asking a running replicator)."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from .config import Config, DbConfig, load_config, parse_duration
from .discovery import db_config, find_db, scan
from .drill import DrillResult, drill, load_points
from .errors import ConfigError, ReplicatorError
from .restore import apply_plan as apply_restore
from .restore import fmt_ns, plan_restore, summarize
from .retention import apply_plan, plan_retention
from .storage import open_storage


@dataclass
class RestoreCounts:
    """What ``restore --all`` did, database by database."""

    restored: int = 0
    present: int = 0
    """Left alone: the file exists (``--if-db-not-exists``)."""
    absent: int = 0
    """Not restored: no replica holds it (``--if-replica-exists``)."""
    failed: int = 0

    def summary(self, dry_run: bool) -> str:
        """The closing line."""
        verb = "planned" if dry_run else "restored"
        absent = f", {self.absent} in no replica" if self.absent else ""
        return (f"{self.restored} databases {verb}, {self.present} present (left alone)"
                f"{absent}, {self.failed} failed")


def select_dbs(cfg: Config, wanted: str | None, config_path: str) -> list[DbConfig]:
    """The databases of ``cfg`` named by ``wanted`` (a path or a name; None: all of them)."""
    if wanted is None:
        return list(cfg.dbs) + [db_config(d, p) for d in cfg.dirs for p, _ in scan(d)]
    db = find_db(cfg, wanted)
    if db is None:
        known = ", ".join([d.name for d in cfg.dbs] + [f"{d.dir}/{d.pattern}" for d in cfg.dirs])
        raise ConfigError(f"database {wanted!r} is not in {config_path} (it has: {known})")
    return [db]


async def prune(args: argparse.Namespace) -> int:
    """``replicator prune``: apply (or with ``--dry-run`` show) each destination's retention."""
    cfg = load_config(args.config)
    verb = "would delete" if args.dry_run else "delete"
    for db in select_dbs(cfg, args.db, args.config):
        for rc in db.replicas:
            policy = db.retention_policy(rc)
            client = rc.open()
            try:
                plan = await plan_retention(client, policy)
                oldest = fmt_ns(plan.oldest_ms * 1_000_000) if plan.oldest_ms else "none"
                state = "" if policy.active else " (retention off: nothing is deleted)"
                print(f"{db.name}: replica {rc.name} ({client.url}): keeps {len(plan.keep)} "
                      f"objects ({len(plan.points)} restore points, oldest snapshot {oldest}), "
                      f"{'would delete' if args.dry_run else 'deletes'} {len(plan.delete)}"
                      f"{state}")
                for o in plan.delete:
                    print(f"  {verb} {o.key}")
                if not args.dry_run:
                    await apply_plan(client, plan)
            finally:
                await client.aclose()
    return 0


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class NotRunning(ReplicatorError):
    """No replicator answers on a database's control socket."""


def _db_for(args: argparse.Namespace) -> DbConfig:
    if args.config:
        return select_dbs(load_config(args.config), args.db, args.config)[0]
    return DbConfig(path=args.db, replicas=[])


def ask(db: DbConfig, request: str, timeout: float | None = None) -> dict[str, Any]:
    """POST ``request`` to the replicator running ``db`` over its control socket."""
    from .server import control_socket_path

    path = control_socket_path(db.spool_dir)
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("POST", request)
        resp = conn.getresponse()
        doc = json.loads(resp.read() or b"{}")
    except (FileNotFoundError, ConnectionRefusedError):
        raise NotRunning(f"no replicator is running {db.path} (nothing answers on {path})"
                         ) from None
    except PermissionError:
        raise ReplicatorError(f"{path}: permission denied (run as the replicator's user)"
                              ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ReplicatorError(f"{path}: {exc}") from None
    finally:
        conn.close()
    if not isinstance(doc, dict):
        raise ReplicatorError(f"{path}: unexpected answer")
    return doc


def snapshot(args: argparse.Namespace) -> int:
    """``replicator snapshot DB``: the running replicator takes a snapshot now."""
    db = _db_for(args)
    doc = ask(db, "/snapshot")
    if not doc.get("ok"):
        raise ReplicatorError(str(doc.get("error")))
    print(f"snapshot of {db.name}: generation {doc['generation']}, txid {doc['txid']} "
          f"({doc['key']})")
    return 0


def sync(args: argparse.Namespace) -> int:
    """``replicator sync [--wait] DB``: capture now; with ``--wait``, return once every
    destination holds it (exit 1 after ``--timeout``)."""
    db = _db_for(args)
    within = parse_duration(args.timeout, "--timeout") if args.wait else 0.0
    doc = ask(db, f"/sync?timeout={within}&wait={int(args.wait)}")
    if not doc.get("ok"):
        raise ReplicatorError(str(doc.get("error")))
    where = "on " + ", ".join(doc["replicas"]) if args.wait else "captured"
    print(f"{db.name}: generation {doc['generation']} txid {doc['txid']} {where}")
    return 0


async def verify(args: argparse.Namespace) -> int:
    """``replicator verify``: a restore drill. With ``--config``, the running replicator of each
    database drills (or, when none runs, the points it recorded are checked); with a
    DESTINATION, its newest point and an earlier snapshot are restored and integrity-checked.
    Exit 0 when every drill passed, 1 with one line per failure."""
    if args.config:
        results: list[tuple[str, bool, str]] = []
        for db in select_dbs(load_config(args.config), args.target, args.config):
            try:
                doc = await asyncio.to_thread(ask, db, "/verify")
                results += _destination_lines(db.name, doc)
            except NotRunning:
                r = await _verify_offline(db)
                results += _destination_lines(db.name, r.to_json())
    else:
        if args.target is None:
            raise ConfigError("verify needs a DESTINATION, or --config FILE")
        r = await _verify_destination(args.target)
        results = [(args.target, r.ok, r.message)]
    for name, ok, message in results:
        print(f"{name}: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if all(ok for _, ok, _ in results) else 1


def _destination_lines(db: str, doc: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """One ``(who, ok, message)`` per destination of a drill's JSON form: a failed one named;
    every one ok, one line for the database."""
    failed = [(f"{db}: {r.get('replica')}", False, str(r.get("message")))
              for r in doc.get("replicas") or [] if not r.get("ok")]
    if failed:
        return failed
    return [(db, bool(doc.get("ok")), str(doc.get("message") or doc.get("error")))]


async def _verify_offline(db: DbConfig) -> DrillResult:
    """Check the points a replicator recorded for ``db`` (none running now)."""
    points = load_points(db.spool_dir)
    if not points:
        return DrillResult(False, f"no replicator runs {db.path} and it recorded no content "
                           "hash to compare with: run verify while replicate runs")
    clients = [(rc.name, rc.open()) for rc in db.replicas]
    try:
        return await drill(clients, points[-1], points[:-1])
    finally:
        for _, c in clients:
            await c.aclose()


async def _verify_destination(url: str) -> DrillResult:
    """Restore the newest point and a random earlier snapshot of a destination (integrity
    checked); with no source at hand, equality with the database is not part of it."""
    client = open_storage(url)
    checked = []
    try:
        with tempfile.TemporaryDirectory(prefix="replicator-", suffix=".drill") as tmp:
            plan = await plan_restore(client)
            await apply_restore(client, plan, os.path.join(tmp, "newest.db"))
            checked.append(f"txid {plan.txid}")
            snaps = [s for g in await summarize(client) if g.generation == plan.generation
                     for s in g.snapshots if s.end_txid < plan.txid]
            if snaps:
                snap = random.choice(snaps)
                earlier = await plan_restore(client, txid=snap.end_txid,
                                             generation=snap.generation)
                await apply_restore(client, earlier, os.path.join(tmp, "earlier.db"))
                checked.append(f"txid {earlier.txid}")
    except ReplicatorError as exc:
        return DrillResult(False, f"restore drill failed: {exc}", checked)
    finally:
        await client.aclose()
    return DrillResult(True, f"restore drill ok: generation {plan.generation} "
                       f"{' and '.join(checked)} restored, integrity_check ok (no database to "
                       "compare with: give --config to prove equality)", checked)
