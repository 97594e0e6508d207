"""The image's HEALTHCHECK: exit 0 if the replicator's /healthz answers 200 at the
``metrics-addr`` of its config file ($REPLICATOR_CONFIG, default
/etc/replicator/replicator.yml), 1 if it does not. A config without ``metrics-addr`` (or no
config file) has no endpoint to ask: then it exits 0, and only the process being alive counts.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from replicator.config import load_metrics_addr
from replicator.errors import ConfigError

DEFAULT_CONFIG = "/etc/replicator/replicator.yml"
TIMEOUT = 3.0


def main() -> int:
    path = os.environ.get("REPLICATOR_CONFIG", DEFAULT_CONFIG)
    if not os.path.exists(path):
        return 0
    try:
        addr = load_metrics_addr(path)
    except ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    if addr is None:
        return 0
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=TIMEOUT) as r:
            return 0 if r.status == 200 else 1
    except OSError as exc:
        print(f"healthcheck: http://{host}:{port}/healthz: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
