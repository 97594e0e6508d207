#!/usr/bin/env bash
# Install what the observability tests need (promtool, from Debian's `prometheus` package).
#
# Idempotent and quiet: does nothing when promtool is already on PATH. Never leaves a
# Prometheus (or node-exporter) daemon running: service starts are denied through a
# policy-rc.d for the duration of the install, and Recommends (node-exporter) are skipped.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

bash "$(dirname "$0")/apt-install.sh" prometheus

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

# Belt and braces: on a host with systemd, policy-rc.d is not consulted by every path, so stop
# and disable the units this install may have started (no-ops when they are not there).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for unit in prometheus prometheus-node-exporter; do
        $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
    done
fi
for daemon in prometheus prometheus-node-exporter; do
    if pgrep -x "$daemon" >/dev/null 2>&1; then
        echo "observability-setup: a $daemon daemon is running; stop it (service $daemon stop)" >&2
        exit 1
    fi
done

command -v promtool >/dev/null
