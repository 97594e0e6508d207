"""Restore on start: bring a missing database back from its replicas before replicating it.

The rule is the one of ``restore --if-db-not-exists --if-replica-exists``: a database file that
exists is left alone; a missing one is restored (newest state, integrity checked) from the
replica with the newest restorable point; if no replica holds anything restorable, the database
starts empty. A replica that holds something but cannot be restored (a corrupt or missing
object, an unreachable store) is an error, and nothing starts. For a ``dir:`` entry the rule
applies to every database its replicas hold (:func:`restore_missing_below`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass

from .config import Config, DbConfig, DirConfig, Shard
from .errors import ReplicatorError, RestoreError
from .fsutil import fsync_dir, temp_path
from .restore import RestorePlan, RestoreResult, apply_plan, fmt_ns, plan_restore, summarize
from .storage.base import StorageClient

log = logging.getLogger(__name__)


@dataclass
class BestPlan:
    """The newest restorable point over several replicas (``plan`` None: none holds any)."""

    client: StorageClient | None
    plan: RestorePlan | None


async def best_plan(clients: list[StorageClient]) -> BestPlan:
    """Plan the latest point on every replica and keep the newest.

    A replica without a restorable generation counts as empty; if every replica is empty the
    result has no plan. If none can be planned and one failed for another reason, that error is
    raised."""
    plans: list[tuple[StorageClient, RestorePlan]] = []
    errors: list[ReplicatorError] = []
    for client in clients:
        try:
            gens = await summarize(client)
            if any(g.snapshots for g in gens):
                plans.append((client, await plan_restore(client)))
        except ReplicatorError as exc:
            errors.append(exc)
    if not plans:
        if errors:
            raise errors[0]
        return BestPlan(None, None)
    client, plan = max(plans, key=lambda cp: (cp[1].ts_ns, cp[1].txid))
    return BestPlan(client, plan)


def _present(path: str) -> bool:
    """Whether the database exists; a -wal or -journal left without it is an error (SQLite
    would replay it onto the restored file)."""
    if os.path.exists(path):
        return True
    for suffix in ("-wal", "-journal"):
        if os.path.exists(path + suffix):
            raise RestoreError(f"database {path} is missing but {path}{suffix} exists; "
                               f"move it away before restoring")
    return False


def create_empty(path: str) -> None:
    """Create an empty database in WAL mode at ``path`` (temp name, fsync, link into place), so
    that the application never has to switch the journal mode (an exclusive lock) beside the
    replicator. A database that appeared at ``path`` meanwhile is kept as it is."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise RestoreError(f"database directory {parent} does not exist")
    tmp = temp_path(path)
    try:
        conn = sqlite3.connect(tmp)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode stayed {mode}")
        finally:
            conn.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # link, not rename: a database the application created meanwhile is never replaced
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
        fsync_dir(parent)
    except (OSError, sqlite3.Error) as exc:
        raise RestoreError(f"cannot create {path}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def restore_if_missing(db: DbConfig, *, check: bool = True) -> RestoreResult | None:
    """Restore ``db.path`` from the newest replica if the file is missing; None when nothing
    was restored (the database exists, or no replica holds anything: then an empty database is
    created)."""
    if await asyncio.to_thread(_present, db.path):
        log.info("%s exists: not restored", db.path)
        return None
    clients = [r.open() for r in db.replicas]
    try:
        best = await best_plan(clients)
        if best.client is None or best.plan is None:
            log.info("%s: no replica to restore from: starting with an empty database", db.path)
            await asyncio.to_thread(create_empty, db.path)
            return None
        plan = best.plan
        result = await apply_plan(best.client, plan, db.path, check=check)
    finally:
        for c in clients:
            await c.aclose()
    log.info("restored %s from %s: generation %s, txid %d (%s), %s %s", db.path,
             best.client.url, plan.generation, plan.txid, fmt_ns(plan.ts_ns), result.check,
             result.integrity)
    return result


def make_parent(path: str) -> None:
    """The directory of ``path``, made if missing; RestoreError if it cannot be."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise RestoreError(f"cannot make directory {os.path.dirname(path)}: "
                           f"{exc.strerror}") from None


DIR_RESTORES = 4
"""Databases of a ``dir:`` entry restored at a time on start."""


async def restore_missing_below(d: DirConfig, shard: Shard | None = None,
                                *, check: bool = True) -> tuple[int, int]:
    """Restore every database of ``d`` (of ``shard``'s part) that its replicas hold and this
    machine does not, a few at a time; (restored, present). Its directories are made as
    needed. A database that cannot be restored is an error, raised once the others are done;
    nothing is created for one the replicas do not hold (the application creates it)."""
    from .discovery import db_config, replicated, shard_key

    paths = [p for p in await replicated(d)
             if shard is None or shard.holds(shard_key(d, p))]
    limit = asyncio.Semaphore(DIR_RESTORES)
    present = 0

    async def one(path: str) -> bool:
        nonlocal present
        async with limit:
            if await asyncio.to_thread(_present, path):
                present += 1
                return False
            await asyncio.to_thread(make_parent, path)
            return await restore_if_missing(db_config(d, path), check=check) is not None

    results = await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    restored = sum(r is True for r in results)
    log.info("%s: %d databases restored from the replicas, %d present, %d failed", d.dir,
             restored, present, len(errors))
    if errors:
        raise errors[0]
    return restored, present


async def restore_on_start(cfg: Config) -> None:
    """``restore-if-db-not-exists`` of every database ``replicate`` takes (its ``shard``)."""
    for db in cfg.held():
        if db.restore_if_db_not_exists:
            await restore_if_missing(db)
    for d in cfg.dirs:
        if d.template.restore_if_db_not_exists:
            await restore_missing_below(d, cfg.shard)
