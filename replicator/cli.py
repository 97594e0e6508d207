"""replicator: continuous backup and point-in-time recovery for SQLite.

Commands:
  replicate     stream a database's WAL to one or more destinations until stopped
  restore       rebuild a database from a destination, to the latest point, a time or a txid
  generations   list the restorable timeline of a destination
  snapshots     list the snapshots of a destination
  status        show a running replicator's databases, replicas and health checks
  prune         apply the retention policy of a config's destinations (--dry-run: show it)
  version       print the version

A DESTINATION is a directory path, file:///abs/path or s3://bucket/prefix?endpoint=...&region=...
Times are RFC 3339 / ISO 8601 (2026-11-27T10:30:00Z, 2026-11-27T19:30:00+09:00); a time without
an offset is taken as UTC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from . import __version__
from .config import (
    Config,
    DbConfig,
    load_config,
    load_metrics_addr,
    parse_command,
    parse_duration,
    replica_from_url,
    validate_addr,
)
from .errors import ConfigError, ReplicatorError, RestoreError
from .restore import apply_plan, fmt_ns, parse_time, plan_restore, summarize
from .storage import open_storage
from .storage.base import StorageClient
from .supervise import Supervisor, check_command

log = logging.getLogger("replicator")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"replicator: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (its help is the user documentation of every flag)."""
    p = _Parser(prog="replicator", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log-level", default=os.environ.get("REPLICATOR_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("replicate", help="replicate databases until stopped",
                       description="Replicate DB to each DESTINATION, or every database of a "
                       "config file. Without DESTINATION the replica is the directory "
                       "DB.replica beside the database; without DB, a demo database "
                       "./demo/app.db is replicated to ./demo/replica. Stops cleanly on "
                       "SIGTERM/SIGINT after a final sync.")
    r.add_argument("db", nargs="?", help="database file")
    r.add_argument("destinations", nargs="*", metavar="DESTINATION")
    r.add_argument("-c", "--config", help="YAML config file")
    r.add_argument("--metrics-addr",
                   help="serve /metrics, /healthz, /readyz and /status on HOST:PORT")
    r.add_argument("--snapshot-interval", help="snapshot interval, e.g. 1h (default 6h)")
    r.add_argument("--checkpoint-pages", type=int,
                   help="WAL frames before the replicator runs a PASSIVE checkpoint (default 1000)")
    r.add_argument("--monitor-interval", help="timer backstop for missed file events (default 1s)")
    r.add_argument("--spool-dir", help="local spool directory (default .<db>-replicator beside it)")
    r.add_argument("--exec", metavar="CMD", dest="exec_cmd",
                   help="run CMD (\"PROGRAM ARGS\", no shell) once replication runs, forward "
                   "signals to it, exit with its exit code after a final sync")
    r.add_argument("--restore-if-db-not-exists", action="store_true",
                   help="restore a missing database from its replicas first (none there: "
                   "start with an empty database)")

    s = sub.add_parser("restore", help="restore a database",
                       description="Restore from DESTINATION, or (with --config) the database "
                       "DB from its configured replicas.")
    s.add_argument("target", metavar="DESTINATION|DB")
    s.add_argument("-o", "--output", help="output file (required unless --dry-run)")
    s.add_argument("-c", "--config", help="YAML config file; then the argument names a database")
    s.add_argument("--replica", help="with --config: restore from this replica (default: the one "
                   "with the newest restorable point)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--to-time", help="restore the state as of this time")
    g.add_argument("--txid", type=int, help="restore up to and including this transaction")
    s.add_argument("--generation", help="restore from this generation (default: the latest)")
    s.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("--if-db-not-exists", action="store_true",
                   help="do nothing (exit 0) if the output already exists")
    s.add_argument("--if-replica-exists", action="store_true",
                   help="do nothing (exit 0) if there is no replica to restore from")
    s.add_argument("--no-integrity-check", action="store_true",
                   help="skip PRAGMA integrity_check on the result")

    for name, helptext in (("generations", "list generations and their restorable ranges"),
                           ("snapshots", "list snapshots")):
        c = sub.add_parser(name, help=helptext, description=helptext)
        c.add_argument("target", metavar="DESTINATION|DB")
        c.add_argument("-c", "--config", help="YAML config file; then the argument names a db")
        c.add_argument("--replica", help="with --config: this replica only")
        c.add_argument("--json", action="store_true", help="machine-readable output")

    st = sub.add_parser("status", help="show a running replicator's state",
                        description="Ask a running `replicator replicate` (at its metrics-addr) "
                        "for every database and replica: generation, txid, lag, last sync, last "
                        "snapshot, and the last integrity and health check results.")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", help="the replicator's YAML config (its metrics-addr)")
    where.add_argument("--addr", metavar="HOST:PORT", help="the replicator's metrics-addr")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    pr = sub.add_parser("prune", help="apply retention to the destinations now",
                        description="Delete what each destination's retention (retention, "
                        "keep-daily, keep-weekly, keep-monthly, keep-yearly) no longer needs, "
                        "and print what goes.")
    pr.add_argument("db", nargs="?", metavar="DB", help="only this database (path or name)")
    pr.add_argument("-c", "--config", required=True, help="YAML config file")
    pr.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")

    sub.add_parser("version", help="print the version")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _replicate_config(args: argparse.Namespace) -> Config:
    if args.config:
        if args.db or args.destinations:
            raise ConfigError("give either --config or DB DESTINATION..., not both")
        cfg = load_config(args.config)
    else:
        if not args.db:
            args.db = _demo_db()
            args.destinations = [os.path.join(os.path.dirname(args.db), "replica")]
        if not args.destinations:
            d, base = os.path.split(os.path.abspath(args.db))
            args.destinations = [os.path.join(d, f"{base}.replica")]
        replicas = [replica_from_url(d, f"replica{i + 1}", f"DESTINATION {d!r}")
                    for i, d in enumerate(args.destinations)]
        cfg = Config(dbs=[DbConfig(path=args.db, replicas=replicas)])
    for db in cfg.dbs:
        if args.snapshot_interval is not None:
            db.snapshot_interval = parse_duration(args.snapshot_interval, "--snapshot-interval")
        if args.checkpoint_pages is not None:
            if args.checkpoint_pages < 16:
                raise ConfigError("--checkpoint-pages: expected an integer >= 16")
            db.checkpoint_pages = args.checkpoint_pages
        if args.monitor_interval is not None:
            db.monitor_interval = parse_duration(args.monitor_interval, "--monitor-interval")
            if db.monitor_interval <= 0:
                raise ConfigError("--monitor-interval: must be positive")
        if args.spool_dir is not None:
            if len(cfg.dbs) > 1:
                raise ConfigError("--spool-dir: set spool-dir per database in the config file")
            db.spool_dir = os.path.abspath(args.spool_dir)
        db.restore_if_db_not_exists |= args.restore_if_db_not_exists
    if args.metrics_addr is not None:
        cfg.metrics_addr = validate_addr(args.metrics_addr, "--metrics-addr")
    if args.exec_cmd is not None:
        cfg.exec = parse_command(args.exec_cmd, "--exec")
    check_command(cfg.exec, "--exec" if args.exec_cmd is not None else "exec")
    return cfg


DEMO_DIR = "demo"


def _demo_db() -> str:
    """The embedded default: ./demo/app.db (created in WAL mode with a little data if missing),
    replicated to ./demo/replica."""
    import sqlite3

    path = os.path.abspath(os.path.join(DEMO_DIR, "app.db"))
    if not os.path.exists(path):
        os.makedirs(DEMO_DIR, exist_ok=True)
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, body TEXT, "
                     "created_at TEXT DEFAULT CURRENT_TIMESTAMP)")
        conn.executemany("INSERT INTO notes(body) VALUES (?)",
                         [(f"demo note {i}",) for i in range(100)])
        conn.commit()
        conn.close()
        print(f"created demo database {path}", file=sys.stderr)
    return path


_early_stop: list[int] = []


def _note_early_stop(signum: int, frame: object) -> None:
    _early_stop.append(signum)


async def _replicate(cfg: Config) -> int:
    from .bootstrap import restore_if_missing
    from .replicator import Replicator

    sup = Supervisor(cfg.exec, cfg.shutdown_timeout)
    sup.install()
    for sig in _early_stop:
        sup.on_signal(sig)
    for db in cfg.dbs:
        if db.restore_if_db_not_exists:
            await restore_if_missing(db)
    rep = Replicator(cfg)
    server = None
    if cfg.metrics_addr:
        from .server import start_server

        # listen before opening anything: a bad address must fail before a generation starts
        server = await start_server(cfg.metrics_addr, rep)
    try:
        await rep.open()
    except BaseException:
        if server is not None:
            server.close()
        raise
    for s in rep.services:
        log.info("replicating %s to %s", s.cfg.path, ", ".join(r.url for r in s.replicas))
    try:
        code = await sup.run(lambda stop: rep.run(stop, sup.skip_final_sync))
    finally:
        if server is not None:
            server.close()
    log.info("stopped")
    return code


@dataclass
class _Source:
    name: str
    client: StorageClient


def _sources(args: argparse.Namespace) -> list[_Source]:
    if not args.config:
        if getattr(args, "replica", None):
            raise ConfigError("--replica needs --config")
        return [_Source(args.target, open_storage(args.target))]
    cfg = load_config(args.config)
    target = os.path.abspath(args.target)
    dbs = [d for d in cfg.dbs if d.path == target or d.name == args.target]
    if not dbs:
        known = ", ".join(d.name for d in cfg.dbs)
        raise ConfigError(f"database {args.target!r} is not in {args.config} (it has: {known})")
    reps = dbs[0].replicas
    if args.replica:
        reps = [r for r in reps if r.name == args.replica]
        if not reps:
            names = ", ".join(r.name for r in dbs[0].replicas)
            raise ConfigError(f"--replica: no replica named {args.replica!r} (have: {names})")
    return [_Source(r.name, open_storage(r.url)) for r in reps]


def _restore_checks(args: argparse.Namespace) -> bool:
    """Argument checks before anything is read; False when there is nothing to do."""
    if not args.dry_run and not args.output:
        raise ConfigError("restore needs -o OUTPUT (or --dry-run)")
    if args.txid is not None and args.txid < 0:
        raise ConfigError("--txid: expected a non-negative integer")
    if args.output and os.path.exists(args.output):
        if args.if_db_not_exists:
            print(f"output {args.output} exists; nothing restored")
            return False
        if not args.force and not args.dry_run:
            raise RestoreError(f"output {args.output} already exists; pass --force to overwrite")
    return True


async def _restore(args: argparse.Namespace) -> int:
    to_time = parse_time(args.to_time) if args.to_time else None
    sources = _sources(args)
    try:
        plans = []
        errors: list[ReplicatorError] = []
        empty = 0
        for src in sources:
            try:
                gens = await summarize(src.client)
                if not any(g.snapshots for g in gens):
                    empty += 1
                    errors.append(RestoreError(f"no restorable generation on {src.client.url}"))
                    continue
                plans.append((src, await plan_restore(
                    src.client, to_time_ns=to_time, txid=args.txid, generation=args.generation)))
            except ReplicatorError as exc:
                errors.append(exc)
        if not plans:
            if args.if_replica_exists and empty == len(sources):
                print("no replica found; nothing restored")
                return 0
            raise errors[0]
        src, plan = max(plans, key=lambda sp: (sp[1].ts_ns, sp[1].txid))
        if args.dry_run:
            print(plan.describe())
            return 0
        result = await apply_plan(src.client, plan, args.output, force=args.force,
                                  check=not args.no_integrity_check)
        print(
            f"restored {result.output} from {src.client.url}: generation {plan.generation}, "
            f"txid {plan.txid} ({fmt_ns(plan.ts_ns)}), {result.pages} pages, "
            f"integrity_check {result.integrity}"
        )
        for note in plan.notes:
            print(f"note: {note}")
        return 0
    finally:
        for src in sources:
            await src.client.aclose()


async def _list(args: argparse.Namespace) -> int:
    sources = _sources(args)
    out = []
    try:
        for src in sources:
            for g in await summarize(src.client):
                if args.command == "generations":
                    await g.refine(src.client)
                    out.append({
                        "replica": src.name, "generation": g.generation,
                        "start": fmt_ns(g.start) if g.snapshots else None,
                        "end": fmt_ns(g.end) if g.snapshots else None,
                        "end_txid": g.end_txid, "snapshots": len(g.snapshots),
                        "segments": len(g.segments), "size": g.size,
                        "restorable": bool(g.snapshots),
                    })
                else:
                    for s in g.snapshots:
                        out.append({
                            "replica": src.name, "generation": g.generation, "txid": s.end_txid,
                            "time": fmt_ns(s.last_ms * 1_000_000), "size": s.size, "key": s.key,
                        })
    finally:
        for src in sources:
            await src.client.aclose()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if not out:
        print("no generations" if args.command == "generations" else "no snapshots")
        return 0
    cols = list(out[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in out)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for row in out:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in cols).rstrip())
    return 0


def _status(args: argparse.Namespace) -> int:
    from .status import fetch_status, format_status

    if args.config:
        addr = load_metrics_addr(args.config)
        if addr is None:
            raise ConfigError(f"{args.config} sets no metrics-addr: there is no status to ask")
    else:
        addr = validate_addr(args.addr, "--addr")
    doc = fetch_status(addr)
    print(json.dumps(doc, indent=2) if args.json else format_status(doc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "replicate":
        # a stop requested while starting up is honoured once the loop runs
        signal.signal(signal.SIGTERM, _note_early_stop)
        signal.signal(signal.SIGINT, _note_early_stop)
    _setup_logging(args.log_level)
    try:
        if args.command == "version":
            print(f"replicator {__version__}")
            return 0
        if args.command == "status":
            return _status(args)
        if args.command == "replicate":
            # the capture thread must get the GIL back within a millisecond, not the default 5:
            # it has a few milliseconds to read a WAL tail after the application resets the WAL
            sys.setswitchinterval(0.001)
            return asyncio.run(_replicate(_replicate_config(args)))
        if args.command == "prune":
            from .cli_ops import prune

            return asyncio.run(prune(args))
        if args.command == "restore":
            if args.to_time:
                parse_time(args.to_time)  # a bad time is reported before anything is read
            return asyncio.run(_restore(args)) if _restore_checks(args) else 0
        return asyncio.run(_list(args))
    except ReplicatorError as exc:
        print(f"replicator: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
