#!/usr/bin/env bash
# Install everything the test suite needs (Python packages, Debian's prometheus for promtool and
# the dashboard test), then run the whole suite. Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
for setup in .ci/observability-setup.sh .ci/s3-setup.sh .ci/deploy-setup.sh; do
  if [ -f "$setup" ]; then bash "$setup"; fi
done
exec python3 -m pytest "$@"
