#!/usr/bin/env bash
# Install what the deployment tests need beyond the test extra: systemd-analyze (Debian's
# `systemd` package) for `systemd-analyze verify` of deploy/systemd/replicator.service.
# Idempotent: does nothing when systemd-analyze is already on PATH.
set -euo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" systemd
command -v systemd-analyze >/dev/null
