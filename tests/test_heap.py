"""The C heap settings of a replicate process."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = "from replicator.heap import tune_heap; print(','.join(tune_heap()))"


def probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True)
    return out.stdout.strip()


def test_both_settings_apply_in_a_fresh_process() -> None:
    assert probe({"PATH": "/usr/bin:/bin"}) == "MALLOC_ARENA_MAX,MALLOC_MMAP_THRESHOLD_"


def test_a_setting_the_environment_gives_is_left_alone() -> None:
    env = {"PATH": "/usr/bin:/bin", "MALLOC_ARENA_MAX": "8"}
    assert probe(env) == "MALLOC_MMAP_THRESHOLD_"
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    assert probe(env) == ""
