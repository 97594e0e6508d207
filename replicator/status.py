"""``replicator status``: ask a running replicator (its ``metrics-addr``) for ``/status`` and show
it as tables for people or as JSON for scripts."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from .affinity import describe
from .errors import ReplicatorError

DEFAULT_TIMEOUT = 5.0
# a wildcard listen address is asked on loopback
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def status_url(addr: str) -> str:
    """The ``/status`` URL of a ``HOST:PORT`` listen address."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    host = _WILDCARDS.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/status"


def fetch_status(addr: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The ``/status`` document of the replicator listening on ``addr``; a one-line
    :class:`ReplicatorError` if nothing (or something else) answers there."""
    url = status_url(addr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 404:
            raise ReplicatorError(f"{addr} does not serve /status (not a replicator?)") from None
        raise ReplicatorError(f"{addr}: /status answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ConnectionRefusedError):
            raise ReplicatorError(
                f"nothing is listening on {addr} (is `replicator replicate` running with "
                f"metrics-addr {addr}?)"
            ) from None
        if isinstance(reason, TimeoutError | socket.timeout):
            raise ReplicatorError(f"{addr}: no answer within {timeout:g}s") from None
        raise ReplicatorError(f"cannot reach {addr}: {reason}") from None
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("dbs"), list):
        raise ReplicatorError(f"{addr}: /status did not answer with a replicator status")
    return doc


def _table(rows: Sequence[Sequence[str]], header: Sequence[str], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = [indent + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        out.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def _s(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)


def _check_row(r: dict[str, Any]) -> list[str]:
    ok = "ok" if r.get("ok") else ("error" if not r.get("ran", True) else "FAILING")
    return [_s(r.get("check")), _s(r.get("kind")), ok, _s(r.get("value")), _s(r.get("time")),
            _s(r.get("reason"))]


def format_status(doc: dict[str, Any]) -> str:
    """The status document as text: per database a summary line, its replicas and its checks."""
    cpus = doc.get("cpus")
    on = (f", on {describe(set(cpus))}" if isinstance(cpus, list) and cpus
          and all(isinstance(c, int) for c in cpus) else "")
    shard = doc.get("shard")
    on += f", shard {shard}" if isinstance(shard, str) else ""
    lines = [f"replicator {_s(doc.get('version'))}, started {_s(doc.get('started'))}{on}: "
             + ("ready" if doc.get("ready") else "NOT READY")]
    fleet = doc.get("databases")
    if isinstance(fleet, dict):
        counts = ", ".join(f"{fleet.get(k, 0)} {k}" for k in
                           ("replicating", "queued", "opening", "skipped", "failed"))
        lines.append(f"databases of dir entries: {counts}")
        for kind in ("skipped_files", "failed_files"):
            for path, why in sorted((fleet.get(kind) or {}).items()):
                lines.append(f"  {kind.split('_')[0]} {path}: {why}")
    for db in doc["dbs"]:
        snap = db.get("last_snapshot") or {}
        pos = db.get("position") or {}
        lines.append("")
        lines.append(f"{db.get('name')}" + (f" ({db['path']})" if db.get("path") != db.get("name")
                                              else ""))
        lines.append(
            f"  generation {_s(db.get('generation'))}  txid {_s(db.get('txid'))}  "
            f"wal frame {_s(pos.get('frame'))}  last capture {_s(db.get('last_capture'))}  "
            + ("(parked)  " if db.get("parked") else "") +
            f"last snapshot {_s(snap.get('time'))} (txid {_s(snap.get('txid'))})"
        )
        replicas = [
            [_s(r.get("name")), "ok" if r.get("healthy") else "FAILING", _s(r.get("txid")),
             _s(r.get("lag_seconds")), _s(r.get("last_sync")), _s(r.get("error"))]
            for r in db.get("replicas", [])
        ]
        if replicas:
            lines += _table(replicas, ["REPLICA", "STATE", "TXID", "LAG(S)", "LAST SYNC", "ERROR"])
        checks = ([db["integrity"]] if db.get("integrity") else []) + list(db.get("health", []))
        if checks:
            lines += _table([_check_row(c) for c in checks],
                            ["CHECK", "KIND", "RESULT", "VALUE", "LAST RUN", "REASON"])
        else:
            lines.append("  no health check results")
    return "\n".join(lines)
