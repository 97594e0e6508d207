"""The C heap of a long-running ``replicate`` process (glibc only; elsewhere nothing changes).

A capture reads WAL frames in buffers of up to a few MiB, and compaction and snapshots work in
chunks of that size, from several threads. With glibc's defaults each thread may get an arena
of its own, and a freed buffer of a few MiB raises the threshold under which later buffers come
from the heap instead of a mapping of their own; the heap then keeps the peak of every arena.
Two arenas, and a fixed 1 MiB threshold, keep the resident size near what is in use (beside a
writer flat out: about 65 MiB at its peak instead of 90 to 110) at no measurable CPU cost.

A setting the environment already gives (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) is
left as it is.

SQLite gives every connection's page cache a first block of 20 pages (about 85 KiB with 4 KiB
pages) as soon as it reads anything. An open database holds three connections that read a page
or two, about 250 KiB of blocks a database: a thousand databases of a ``dir:`` entry opening at
start peaked at about 450 MiB, 235 MiB without them. :func:`tune_sqlite` turns the block off
for the process: each page is allocated when it is first read.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sqlite3
import sys

from .libc import function

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 1 << 20

SQLITE_CONFIG_PAGECACHE = 7
SQLITE_OK = 0

_SETTINGS = (
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
)


def tune_heap() -> list[str]:
    """Apply the settings above the environment does not give; the names of those applied."""
    if not sys.platform.startswith("linux"):
        return []
    mallopt = function("mallopt")
    if mallopt is None:
        return []
    # ctypes passes Python ints as C ints and returns a C int by default: mallopt's signature
    return [env for env, param, value in _SETTINGS
            if env not in os.environ and mallopt(param, value) == 1]


def tune_sqlite() -> bool:
    """Turn off the page caches' first block (see the module text) for the SQLite library this
    Python's ``sqlite3`` uses; whether it was. The setting can only change while the library is
    shut down: call this before the process opens any connection (at the start of
    ``replicate``), never from code that runs beside open connections."""
    # the extension module: its symbols resolve to the library it was linked with
    spec = importlib.util.find_spec("_sqlite3")
    if spec is None or spec.origin is None:
        return False
    try:
        lib = ctypes.CDLL(spec.origin)
        shutdown, initialize = lib.sqlite3_shutdown, lib.sqlite3_initialize
        config, libversion = lib.sqlite3_config, lib.sqlite3_libversion
    except (OSError, AttributeError):
        return False
    libversion.restype = ctypes.c_char_p
    if libversion().decode() != sqlite3.sqlite_version:
        return False  # not the library the module was linked with
    if shutdown() != SQLITE_OK:
        return False
    try:
        done = bool(config(SQLITE_CONFIG_PAGECACHE, ctypes.c_void_p(None), ctypes.c_int(0),
                           ctypes.c_int(0)) == SQLITE_OK)
    finally:
        initialize()
    return done
