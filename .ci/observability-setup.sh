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

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    # invoke-rc.d consults this file: exit 101 means "action forbidden", so the package's
    # postinst cannot start the service.
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 0755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f "$POLICY"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"

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
