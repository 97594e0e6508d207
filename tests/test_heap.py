"""The C heap settings of a replicate process."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

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


SQLITE_PROBE = """
import ctypes, importlib.util, sqlite3, sys
from replicator.heap import tune_sqlite
tuned = tune_sqlite() if sys.argv[1] == "tuned" else False
lib = ctypes.CDLL(importlib.util.find_spec("_sqlite3").origin)
lib.sqlite3_memory_used.restype = ctypes.c_int64
before = lib.sqlite3_memory_used()
conns = [sqlite3.connect(sys.argv[2]) for _ in range(50)]
for c in conns:
    assert c.execute("SELECT count(*) FROM t").fetchone() == (3,)
print(tuned, (lib.sqlite3_memory_used() - before) // 50)
"""


def sqlite_probe(mode: str, db: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SQLITE_PROBE, mode, db], capture_output=True,
                         text=True, check=True)
    tuned, per_conn = out.stdout.split()
    return tuned, int(per_conn)


def test_sqlite_connections_start_without_a_page_cache_block(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.executescript("PRAGMA journal_mode=WAL; CREATE TABLE t(x);"
                        "INSERT INTO t VALUES (1), (2), (3);")
    plain_flag, plain = sqlite_probe("plain", str(db))
    tuned_flag, tuned = sqlite_probe("tuned", str(db))
    assert (plain_flag, tuned_flag) == ("False", "True")
    # SQLite's first block is 20 pages (80 KiB and more with 4 KiB pages); without it a
    # connection that read two pages holds a fraction of that
    assert plain > 80 * 1024
    assert tuned < plain / 2
