"""replicator: continuous backup and point-in-time recovery for SQLite.

A DESTINATION is a directory path, file:///abs/path or s3://bucket/prefix?endpoint=...&region=...
A TIME is RFC 3339 / ISO 8601 (2026-11-27T10:30:00Z, 2026-11-27T19:30:00+09:00); a time without
an offset is taken as UTC. A DURATION is like 250ms, 10s, 5m, 1h, 7d or 1h30m.
Run `replicator COMMAND -h` for a command's options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .affinity import apply as apply_cpus
from .affinity import describe as describe_cpus
from .affinity import parse_cpus
from .errors import ConfigError, ReplicatorError, RestoreError
from .heap import tune_heap, tune_sqlite
from .logs import LOG_FORMATS, fmt_bytes, setup_logging
from .redact import redact
from .restore import (
    RestorePlan,
    apply_plan,
    check_output,
    fmt_ns,
    parse_time,
    plan_restore,
    summarize,
)
from .storage import open_storage
from .storage.base import StorageClient
from .supervise import Supervisor, check_command

if TYPE_CHECKING:
    from .config import Config

# The configuration (and with it the capture, compaction, drills, notifications...) is imported
# only by the commands that need it: a restore from a destination starts without it.

log = logging.getLogger("replicator")

LOG_LEVELS = ("debug", "info", "warning", "error")
TIME_HELP = ("RFC 3339 / ISO 8601, e.g. 2026-11-27T10:30:00Z, 2026-11-27T19:30:00.5+09:00 or "
             "2026-11-27 10:30 (no offset: UTC)")
EXIT_USAGE = 2
EXIT_SIGTERM = 128 + signal.SIGTERM


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"replicator: error: {redact(message)}\n")


def _log_options(p: argparse.ArgumentParser, default: bool) -> None:
    """--log-level and --log-format, accepted before or after the command."""
    p.add_argument("--log-level", choices=LOG_LEVELS, metavar="LEVEL",
                   default=os.environ.get("REPLICATOR_LOG_LEVEL", "info") if default
                   else argparse.SUPPRESS,
                   help="debug, info, warning or error (default: info, or $REPLICATOR_LOG_LEVEL)")
    p.add_argument("--log-format", choices=LOG_FORMATS, metavar="FORMAT",
                   default=os.environ.get("REPLICATOR_LOG_FORMAT", "text") if default
                   else argparse.SUPPRESS,
                   help="text, or json: one object a line for log shippers (default: text)")


def _add_replicate(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    r = sub.add_parser(name, parents=[common], help="replicate databases until stopped",
                       description="Replicate DB to each DESTINATION, or every database of a "
                       "config file, until SIGTERM/SIGINT (then a final sync). Without DB, a "
                       "demo: ./demo/app.db is created, written to a few rows a second and "
                       "replicated to ./demo/replica.")
    r.add_argument("db", nargs="?", metavar="DB",
                   help="the SQLite database, in WAL mode (omitted: the demo)")
    r.add_argument("destinations", nargs="*", metavar="DESTINATION",
                   help="where to replicate (default: the directory DB.replica beside DB)")
    _config_option(r, "YAML config file (instead of DB)")
    r.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve /metrics, /healthz, /readyz and /status there")
    r.add_argument("--snapshot-interval", metavar="DURATION",
                   help="time between snapshots (default 6h)")
    r.add_argument("--checkpoint-pages", type=int, metavar="N",
                   help="WAL frames before the replicator runs a PASSIVE checkpoint (default 1000)")
    r.add_argument("--monitor-interval", metavar="DURATION",
                   help="timer backstop for missed file events (default 1s)")
    r.add_argument("--spool-dir", metavar="DIR",
                   help="local spool directory (default .DB-replicator beside DB)")
    r.add_argument("--cpus", metavar="CPUS",
                   help="the CPUs to run on: all (default), one, or numbers like 1 or 0-1")
    r.add_argument("--shard", metavar="K/N",
                   help="replicate part K of N of the config's databases (N processes, parts "
                   "1 to N, share them; each database by its path)")
    r.add_argument("--exec", metavar="CMD", dest="exec_cmd",
                   help="run CMD (\"PROGRAM ARGS\", no shell) once replication runs, forward "
                   "signals to it, exit with its exit code after a final sync")
    r.add_argument("--restore-if-db-not-exists", action="store_true",
                   help="restore a missing database from its replicas first (none there: "
                   "start with an empty database)")
    r.add_argument("--demo-rows-per-second", type=float, metavar="N",
                   help=f"demo only: rows written a second (default {DEMO_RATE:g}; 0: none)")


def _add_restore(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    s = sub.add_parser(name, parents=[common], help="restore a database",
                       description="Restore from DESTINATION (or, with --config, the database "
                       "DB from its configured replicas) to OUTPUT: the latest point, a TIME or "
                       "a transaction. Progress is shown on a terminal.")
    s.add_argument("target", metavar="DESTINATION|DB", nargs="?",
                   help="the replica to restore from; with --config, a database of the config "
                   "(its path or name)")
    s.add_argument("-o", "--output", metavar="OUTPUT",
                   help="the database file to write (required unless --dry-run)")
    _config_option(s, "YAML config file; then the argument names a database")
    s.add_argument("--all", action="store_true",
                   help="with --config, no DB and no -o: restore every database of the config "
                   "to its own path, those of dir: entries found in their replicas")
    s.add_argument("--replica", metavar="NAME", help="with --config: restore from this replica "
                   "(default: the one with the newest restorable point)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--to-time", metavar="TIME", help=f"restore the state as of TIME: {TIME_HELP}")
    g.add_argument("--txid", type=int, metavar="N",
                   help="restore up to and including transaction N")
    s.add_argument("--generation", metavar="ID",
                   help="restore from this generation (default: the latest)")
    s.add_argument("--exact", action="store_true",
                   help="fail if TIME falls where nothing was observed (an interval the "
                   "replicator did not observe, a gap between generations) instead of "
                   "restoring the newest state captured before it")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan and the download size, write nothing")
    s.add_argument("--force", action="store_true", help="overwrite an existing OUTPUT")
    s.add_argument("--if-db-not-exists", action="store_true",
                   help="do nothing (exit 0) if OUTPUT already exists")
    s.add_argument("--if-replica-exists", action="store_true",
                   help="do nothing (exit 0) if there is no replica to restore from")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--full-integrity-check", action="store_true",
                   help="run PRAGMA integrity_check even when the content hash proved the result "
                   "(by default PRAGMA quick_check then)")
    c.add_argument("--no-integrity-check", action="store_true",
                   help="skip the content hash check and the SQLite check of the result")


def _add_listing(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    helptext = {"generations": "list generations and their restorable ranges",
                "snapshots": "list snapshots"}[name]
    c = sub.add_parser(name, parents=[common], help=helptext,
                       description=f"{helptext[0].upper()}{helptext[1:]} of DESTINATION "
                       "(or, with --config, of every replica of the database DB).")
    c.add_argument("target", metavar="DESTINATION|DB",
                   help="a replica; with --config, a database of the config")
    _config_option(c, "YAML config file; then the argument names a database")
    c.add_argument("--replica", metavar="NAME", help="with --config: this replica only")
    _json_option(c, "machine-readable output")


def _config_option(p: Any, helptext: str) -> None:
    p.add_argument("-c", "--config", metavar="FILE", help=helptext)


def _json_option(p: Any, helptext: str) -> None:
    p.add_argument("--json", action="store_true", help=helptext)


def _add_status(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    st = sub.add_parser(name, parents=[common], help="show a running replicator's state",
                        description="Ask a running `replicator replicate` (at its metrics-addr) "
                        "for every database and replica: generation, txid, lag, last sync, last "
                        "snapshot, and the last integrity and health check results.")
    where = st.add_mutually_exclusive_group(required=True)
    _config_option(where, "the replicator's YAML config (its metrics-addr)")
    where.add_argument("--addr", metavar="HOST:PORT", help="the replicator's metrics-addr")
    _json_option(st, "print /status as JSON")


def _add_prune(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    pr = sub.add_parser(name, parents=[common], help="apply retention to the destinations now",
                        description="Delete what each destination's retention (retention, "
                        "keep-daily, keep-weekly, keep-monthly, keep-yearly) no longer needs, "
                        "and print what goes.")
    pr.add_argument("db", nargs="?", metavar="DB", help="only this database (path or name)")
    pr.add_argument("-c", "--config", metavar="FILE", required=True, help="YAML config file")
    pr.add_argument("--dry-run", action="store_true", help="print what would go, delete nothing")


def _add_verify(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    v = sub.add_parser(name, parents=[common], help="run a restore drill",
                       description="Restore the newest point and a random earlier one into a "
                       "temp directory, run integrity_check and prove each equal to the "
                       "database at that txid (with --config: by the running replicator, which "
                       "hashes the live database at the same txid). Exit 0 when equal, 1 with "
                       "one line saying what differed.")
    v.add_argument("target", nargs="?", metavar="DESTINATION|DB",
                   help="a destination, or with --config a database (default: all of them)")
    _config_option(v, "YAML config file")


def _add_control(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    helptext = {"snapshot": "take a snapshot now",
                "sync": "capture now and ship (--wait: return once every destination has "
                        "everything committed so far)"}[name]
    c = sub.add_parser(name, parents=[common], help=helptext,
                       description=f"{helptext[0].upper()}{helptext[1:]}, in the replicator "
                       "running DB (over the control socket in its spool directory).")
    c.add_argument("db", metavar="DB", help="database file (or with --config its name)")
    _config_option(c, "YAML config file (for the spool directory)")
    if name == "sync":
        c.add_argument("--wait", action="store_true",
                       help="wait until every destination has it")
        c.add_argument("--timeout", metavar="DURATION", default="60s",
                       help="how long to wait (default 60s)")


def _add_version(sub: Any, common: argparse.ArgumentParser, name: str) -> None:
    sub.add_parser(name, parents=[common], help="print the version (also: --version)",
                   description="Print the version.")


_Adder = Callable[[Any, argparse.ArgumentParser, str], None]
COMMANDS: dict[str, _Adder] = {
    "replicate": _add_replicate,
    "restore": _add_restore,
    "generations": _add_listing,
    "snapshots": _add_listing,
    "status": _add_status,
    "prune": _add_prune,
    "verify": _add_verify,
    "snapshot": _add_control,
    "sync": _add_control,
    "version": _add_version,
}
"""Each command and what adds its parser, in the order ``replicator -h`` lists them."""

# what may come before the command (the top level's own options, with their values)
_LEADING_OPTIONS = ("--log-level", "--log-format")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command of a command line whose only other arguments before it are --log-level and
    --log-format; None for anything else (top-level help, a misspelt command...)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in COMMANDS:
            return arg
        if arg in _LEADING_OPTIONS:
            i += 2
        elif arg.partition("=")[0] in _LEADING_OPTIONS:
            i += 1
        else:
            return None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser (its help is the user documentation of every flag). Given the
    command line, only its command's parser is built when that is unambiguous (building all
    of them costs a short command a good part of its start-up)."""
    p = _Parser(prog="replicator", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-V", "--version", action="version", version=f"replicator {__version__}")
    _log_options(p, default=True)
    common = _Parser(add_help=False)
    _log_options(common, default=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands",
                           parser_class=_Parser)
    command = _command_in(argv) if argv is not None else None
    for name, add in COMMANDS.items():
        if command is None or name == command:
            add(sub, common, name)
    return p


def _replicate_config(args: argparse.Namespace) -> Config:
    from .config import (
        Config,
        DbConfig,
        load_config,
        parse_checkpoint_pages,
        parse_duration,
        parse_monitor_interval,
        replica_from_url,
    )

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
    for db in [*cfg.dbs, *(d.template for d in cfg.dirs)]:
        if args.snapshot_interval is not None:
            db.snapshot_interval = parse_duration(args.snapshot_interval, "--snapshot-interval")
        if args.checkpoint_pages is not None:
            db.checkpoint_pages = parse_checkpoint_pages(args.checkpoint_pages,
                                                         "--checkpoint-pages")
        if args.monitor_interval is not None:
            db.monitor_interval = parse_monitor_interval(args.monitor_interval,
                                                         "--monitor-interval")
        if args.spool_dir is not None:
            if len(cfg.dbs) + len(cfg.dirs) > 1:
                raise ConfigError("--spool-dir: set spool-dir per database in the config file")
            db.spool_dir = os.path.abspath(args.spool_dir)
        db.restore_if_db_not_exists |= args.restore_if_db_not_exists
    _process_options(cfg, args)
    return cfg


def _process_options(cfg: Config, args: argparse.Namespace) -> None:
    """The options of the process as a whole, over the config's."""
    from .config import parse_command, parse_shard, validate_addr

    if args.metrics_addr is not None:
        cfg.metrics_addr = validate_addr(args.metrics_addr, "--metrics-addr")
    if args.exec_cmd is not None:
        cfg.exec = parse_command(args.exec_cmd, "--exec")
    if args.cpus is not None:
        cfg.cpus = parse_cpus(args.cpus, "--cpus")
    if args.shard is not None:
        if not args.config:
            raise ConfigError("--shard: needs --config (a part of the config's databases)")
        cfg.shard = parse_shard(args.shard, "--shard")
    check_command(cfg.exec, "--exec" if args.exec_cmd is not None else "exec")


DEMO_DIR = "demo"
DEMO_RATE = 2.0
# the demo serves its metrics on a free loopback port unless --metrics-addr says otherwise
DEMO_METRICS_ADDR = "127.0.0.1:0"


def _is_demo(args: argparse.Namespace) -> bool:
    return not args.db and not args.config


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


def _demo_write(path: str) -> None:
    """One row into the demo table, as an application would write it."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=5)
    try:
        with conn:
            conn.execute("INSERT INTO notes(body) VALUES ('demo note ' || "
                         "strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))")
    finally:
        conn.close()


async def _demo_writer(path: str, rate: float, stop: asyncio.Event) -> None:
    """Write ``rate`` rows a second to the demo database until ``stop``."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(_demo_write, path)
        except Exception as exc:  # noqa: BLE001 - the demo's writes are not the replicator's
            log.warning("demo: insert failed: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1 / rate)


def _demo_hints(cfg: Config, port: int | None, rate: float) -> str:
    """What to try next, printed when the demo starts."""
    import datetime as dt

    db = cfg.dbs[0]
    rel = os.path.relpath(db.path)
    replica = os.path.relpath(db.replicas[0].url)
    # a whole second after the first snapshot: restorable, and older than what follows
    then = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=2)
    now = then.strftime("%Y-%m-%dT%H:%M:%SZ")
    writing = (f"writing {rate:g} rows a second into the table notes of {rel}" if rate > 0
               else f"replicating {rel}")
    lines = [
        f"demo: {writing}, replicated to {replica}/ (Ctrl-C stops)",
        "try, in another terminal:",
        f"  replicator generations {replica}",
        f"  replicator restore {replica} -o {DEMO_DIR}/restored.db",
        f"  replicator restore {replica} -o {DEMO_DIR}/then.db --to-time {now}",
        "  python3 -c \"import sqlite3; print(sqlite3.connect('"
        f"{DEMO_DIR}/then.db').execute('SELECT COUNT(*) FROM notes').fetchone())\"",
    ]
    if port is not None:
        host = cfg.metrics_addr.rpartition(":")[0] if cfg.metrics_addr else "127.0.0.1"
        lines += [f"  curl http://{host}:{port}/metrics",
                  f"  replicator status --addr {host}:{port}"]
    return "\n".join(lines)


_early_stop: list[int] = []


def _note_early_stop(signum: int, frame: object) -> None:
    _early_stop.append(signum)


async def _replicate(cfg: Config, demo_rate: float | None = None) -> int:
    from .aio import Timed
    from .bootstrap import restore_on_start
    from .collector import FullCollections
    from .replicator import Replicator

    sup = Supervisor(cfg.exec, cfg.shutdown_timeout)
    sup.install()
    for sig in _early_stop:
        sup.on_signal(sig)
    if cfg.shard is not None:
        log.info("shard %s: %d of %d listed databases, and the databases of dir entries in "
                 "this part", cfg.shard, len(cfg.held()), len(cfg.dbs))
    await restore_on_start(cfg)
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
    if demo_rate is not None:
        print(_demo_hints(cfg, server.port if server else None, demo_rate), flush=True)

    full_gc = FullCollections()
    full_gc.start()

    async def collect() -> float:
        return full_gc.step()

    async def run(stop: asyncio.Event) -> None:
        demo = None
        if demo_rate:
            demo = asyncio.create_task(_demo_writer(cfg.dbs[0].path, demo_rate, stop))
        chore = Timed(collect).start(full_gc.every)
        try:
            await rep.run(stop, sup.skip_final_sync)
        finally:
            chore.halt()
            if demo is not None:
                await demo

    try:
        code = await sup.run(run)
    finally:
        full_gc.stop()
        if server is not None:
            server.close()
    log.info("stopped")
    return code


def _replicate_main(args: argparse.Namespace) -> int:
    demo_rate: float | None = None
    if args.demo_rows_per_second is not None and not _is_demo(args):
        raise ConfigError("--demo-rows-per-second: only for the demo (replicate without DB)")
    if _is_demo(args):
        demo_rate = DEMO_RATE if args.demo_rows_per_second is None else args.demo_rows_per_second
        if not 0 <= demo_rate <= 1000:
            raise ConfigError("--demo-rows-per-second: expected a number from 0 to 1000")
        if args.metrics_addr is None:
            args.metrics_addr = DEMO_METRICS_ADDR
    cfg = _replicate_config(args)
    # before any thread starts: each inherits its creator's CPUs
    cpus = apply_cpus(cfg.cpus, "--cpus" if args.cpus is not None else "cpus")
    if cpus is not None:
        log.info("running on %s (cpus: %s)", describe_cpus(cpus),
                 cfg.cpus if isinstance(cfg.cpus, str) else ",".join(map(str, cfg.cpus)))
    # the capture thread must get the GIL back within a millisecond, not the default 5: it has a
    # few milliseconds to read a WAL tail after the application resets the WAL
    sys.setswitchinterval(0.001)
    tune_heap()
    tune_sqlite()  # before any connection opens
    return asyncio.run(_replicate(cfg, demo_rate))


@dataclass
class _Source:
    """A destination to restore or list from, with the name it is known by."""

    name: str
    client: StorageClient


def _sources(args: argparse.Namespace) -> list[_Source]:
    if not args.config:
        if getattr(args, "replica", None):
            raise ConfigError("--replica needs --config")
        return [_Source(args.target, open_storage(args.target))]
    from .cli_ops import select_dbs
    from .config import load_config

    cfg = load_config(args.config)
    db = select_dbs(cfg, args.target, args.config)[0]
    reps = db.replicas
    if args.replica:
        reps = [r for r in reps if r.name == args.replica]
        if not reps:
            names = ", ".join(r.name for r in db.replicas)
            raise ConfigError(f"--replica: no replica named {args.replica!r} (have: {names})")
    return [_Source(r.name, r.open()) for r in reps]


def _restore_checks(args: argparse.Namespace) -> bool:
    """Argument checks before anything is read; False when there is nothing to do."""
    if not args.dry_run and not args.output:
        raise ConfigError("restore needs -o OUTPUT (or --dry-run)")
    if args.txid is not None and args.txid < 0:
        raise ConfigError("--txid: expected a non-negative integer")
    if args.output and os.path.exists(args.output) and args.if_db_not_exists:
        print(f"output {args.output} exists; nothing restored")
        return False
    if args.output and not args.dry_run:
        check_output(args.output, args.force)
    return True


def _download(plan: RestorePlan) -> tuple[int, int]:
    """Bytes and objects a restore of ``plan`` reads."""
    objects = plan.objects
    return sum(o.size for o in objects), len(objects)


class _ProgressBar:
    """Bytes and objects read of the total, with rate and ETA, on stderr (a terminal only)."""

    def __init__(self, total_bytes: int, total_objects: int) -> None:
        from tqdm import tqdm

        self.objects = 0
        self.total_objects = total_objects
        try:
            sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
        except OSError:
            sized = False
        # a terminal that reports no size (a bare pseudo-terminal) is taken as 80x24
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="restore", file=sys.stderr, dynamic_ncols=sized,
                        ncols=None if sized else 80, nrows=None if sized else 24,
                        postfix=f"0/{total_objects} objects")

    def __call__(self, nbytes: int, objects: int) -> None:
        if objects:
            self.objects += objects
            self.bar.set_postfix_str(f"{self.objects}/{self.total_objects} objects",
                                     refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        """Show the final state (100 %, the average rate) and end the line."""
        self.bar.close()


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
                    src.client, to_time_ns=to_time, txid=args.txid, generation=args.generation,
                    exact=args.exact, gens=gens)))
            except ReplicatorError as exc:
                errors.append(exc)
        if not plans:
            if args.if_replica_exists and empty == len(sources):
                print("no replica found; nothing restored")
                return 0
            raise errors[0]
        src, plan = max(plans, key=lambda sp: (sp[1].ts_ns, sp[1].txid))
        size, count = _download(plan)
        for warning in plan.warnings:
            print(redact(f"warning: {warning}"), file=sys.stderr)
        if args.dry_run:
            print(redact(plan.describe()))
            print(f"download:   {fmt_bytes(size)} in {count} object{'s' if count != 1 else ''}")
            return 0
        shown = sys.stderr.isatty() and getattr(args, "progress", True)
        bar = _ProgressBar(size, count) if shown else None
        try:
            result = await apply_plan(src.client, plan, args.output, force=args.force,
                                      check=not args.no_integrity_check, progress=bar,
                                      full_check=args.full_integrity_check)
        finally:
            if bar is not None:
                bar.close()
        print(redact(
            f"restored {result.output} from {src.client.url}: generation {plan.generation}, "
            f"txid {plan.txid} ({fmt_ns(plan.ts_ns)}), {result.pages} pages, "
            f"{result.check} {result.integrity}"
            + (f", content hash matches {result.verified}" if result.verified else "")
        ))
        for note in plan.notes:
            print(f"note: {note}")
        return 0
    finally:
        for src in sources:
            await src.client.aclose()


RESTORE_ALL_CONCURRENCY = 4
"""Databases restored at a time by ``restore --all``."""


def _restore_all_checks(args: argparse.Namespace) -> None:
    """The arguments of ``restore --all``, checked before anything is read."""
    if not args.config:
        raise ConfigError("--all: needs --config (every database of the config)")
    if args.target:
        raise ConfigError(f"--all: restores every database of the config; drop {args.target!r}")
    if args.output:
        raise ConfigError("--all: each database is restored to its own path; drop -o")
    if args.txid is not None or args.generation:
        raise ConfigError("--all: --txid and --generation name one database's history; "
                          "use --to-time")


async def _restore_all(args: argparse.Namespace) -> int:
    """``restore --config FILE --all``: every listed database, and every database of a ``dir:``
    entry that its replicas hold, restored to its own path, a few at a time (see
    :func:`_restore` for each; its directory is made if missing). Exit 1 if one failed."""
    from .bootstrap import make_parent
    from .cli_ops import RestoreCounts
    from .config import load_config
    from .discovery import db_config, replicated

    cfg = load_config(args.config)
    paths = [d.path for d in cfg.dbs]
    for d in cfg.dirs:
        paths += [db_config(d, p).path for p in await replicated(d)]
    counts = RestoreCounts()
    limit = asyncio.Semaphore(RESTORE_ALL_CONCURRENCY)

    async def one(path: str) -> None:
        sub = argparse.Namespace(**{**vars(args), "target": path, "output": path, "all": False,
                                    "progress": False})
        async with limit:
            try:
                if not args.dry_run:
                    await asyncio.to_thread(make_parent, path)
                if not _restore_checks(sub):
                    counts.present += 1
                    return
                await _restore(sub)
                if args.dry_run or await asyncio.to_thread(os.path.exists, path):
                    counts.restored += 1
                else:
                    counts.absent += 1  # --if-replica-exists, and no replica holds it
            except ReplicatorError as exc:
                counts.failed += 1
                print(redact(f"replicator: error: {path}: {exc}"), file=sys.stderr)

    await asyncio.gather(*(one(p) for p in dict.fromkeys(paths)))
    print(counts.summary(args.dry_run))
    return 1 if counts.failed else 0


async def _list(args: argparse.Namespace) -> int:
    sources = _sources(args)
    out = []
    try:
        for src in sources:
            for g in await summarize(src.client):
                if args.command == "generations":
                    await g.refine(src.client)
                    gaps = [{"from": fmt_ns(a), "to": fmt_ns(b)}
                            for a, b in await g.unobserved(src.client)]
                    out.append({
                        "replica": src.name, "generation": g.generation,
                        "start": fmt_ns(g.start) if g.snapshots else None,
                        "end": fmt_ns(g.end) if g.snapshots else None,
                        "end_txid": g.end_txid, "snapshots": len(g.snapshots),
                        "segments": len(g.segments), "diffs": len(g.diffs), "size": g.size,
                        "restorable": bool(g.snapshots), "unobserved": gaps,
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
        print(redact(json.dumps(out, indent=2)))
        return 0
    if not out:
        print("no generations" if args.command == "generations" else "no snapshots")
        return 0
    # the table shows how many unobserved intervals, then lists them under it
    cells = [{c: str(len(v)) if isinstance(v, list) else str(v) for c, v in row.items()}
             for row in out]
    cols = list(cells[0])
    widths = {c: max(len(c), *(len(row[c]) for row in cells)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for cell in cells:
        print(redact("  ".join(cell[c].ljust(widths[c]) for c in cols).rstrip()))
    for row in out:
        intervals = row.get("unobserved")
        for gap in intervals if isinstance(intervals, list) else []:
            print(f"{row['generation']}: not observed from {gap['from']} to {gap['to']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .config import load_metrics_addr, validate_addr
    from .status import fetch_status, format_status

    if args.config:
        addr = load_metrics_addr(args.config)
        if addr is None:
            raise ConfigError(f"{args.config} sets no metrics-addr: there is no status to ask")
    else:
        addr = validate_addr(args.addr, "--addr")
    doc = fetch_status(addr)
    print(redact(json.dumps(doc, indent=2) if args.json else format_status(doc)))
    return 0


def _run_stoppable(coro: Coroutine[Any, Any, int]) -> int:
    """Run a one-shot command; SIGTERM cancels it like SIGINT does, so its ``finally`` blocks
    remove what it had half written."""
    async def main() -> int:
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            if not task.cancelling():  # once: a second signal must not cut the clean-up short
                task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        print("replicator: stopped (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM


def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "version":
        print(f"replicator {__version__}")
        return 0
    if command == "status":
        return _status(args)
    if command == "replicate":
        return _replicate_main(args)
    if command in ("prune", "verify", "snapshot", "sync"):
        from . import cli_ops

        if command == "snapshot":
            return cli_ops.snapshot(args)
        if command == "sync":
            return cli_ops.sync(args)
        return int(asyncio.run(getattr(cli_ops, command)(args)))
    if command == "restore":
        if args.to_time:
            parse_time(args.to_time)  # a bad time is reported before anything is read
        if args.all:
            _restore_all_checks(args)
            return _run_stoppable(_restore_all(args))
        if not args.target:
            raise ConfigError("restore needs DESTINATION|DB (or --config FILE --all)")
        return _run_stoppable(_restore(args)) if _restore_checks(args) else 0
    return _run_stoppable(_list(args))


def _quiet_stdout() -> None:
    """The reader of stdout went away (``| head``): send what is left nowhere, quietly."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.log_level not in LOG_LEVELS:  # from the environment: argparse did not check it
        parser.error(f"REPLICATOR_LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, "
                     f"got {args.log_level!r}")
    if args.log_format not in LOG_FORMATS:
        parser.error(f"REPLICATOR_LOG_FORMAT: expected one of {', '.join(LOG_FORMATS)}, "
                     f"got {args.log_format!r}")
    if args.command == "replicate":
        # a stop requested while starting up is honoured once the loop runs
        signal.signal(signal.SIGTERM, _note_early_stop)
        signal.signal(signal.SIGINT, _note_early_stop)
    setup_logging(args.log_level, args.log_format)
    try:
        rc = _dispatch(args)
        sys.stdout.flush()
        return rc
    except ReplicatorError as exc:
        print(f"replicator: error: {redact(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


def run() -> int:
    """The command-line entry point: :func:`main`, then, when nothing but this thread is left
    (a one-shot command: everything it wrote is closed, fsynced and renamed by now), an exit
    that skips the interpreter's teardown of every imported module (a good part of a short
    command's CPU time). Output and log handlers are flushed first; if that fails, or other
    threads run, the ordinary exit."""
    rc = main()
    if threading.active_count() == 1:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:
            return rc
        logging.shutdown()
        os._exit(rc)
    return rc
