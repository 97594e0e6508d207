"""The operations commands of the CLI: ``prune`` (retention by hand), ``verify`` (a restore
drill), ``snapshot`` and ``sync --wait`` (asking a running replicator)."""

from __future__ import annotations

import argparse
import os

from .config import Config, DbConfig, load_config
from .errors import ConfigError
from .restore import fmt_ns
from .retention import apply_plan, plan_retention


def select_dbs(cfg: Config, wanted: str | None, config_path: str) -> list[DbConfig]:
    """The databases of ``cfg`` named by ``wanted`` (a path or a name; None: all of them)."""
    if wanted is None:
        return list(cfg.dbs)
    target = os.path.abspath(wanted)
    dbs = [d for d in cfg.dbs if d.path == target or d.name == wanted]
    if not dbs:
        known = ", ".join(d.name for d in cfg.dbs)
        raise ConfigError(f"database {wanted!r} is not in {config_path} (it has: {known})")
    return dbs


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
