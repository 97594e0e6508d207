"""Benchmark of the vectorised WAL checksum and of scan_frames over a synthetic WAL.

Builds a ~64 MiB WAL (page size 4096, one commit every 8 frames, valid chained checksums) in a
temporary file, then times ``wal_checksum`` over the whole frame area held in memory and
``scan_frames`` over the file (page cache warm), best of a few runs, and prints one line::

    wal checksum: 1800 MB/s (scan_frames: 1500 MB/s)

Run from the repository root: ``python bench/wal_checksum.py [--mib 64] [--page-size 4096]``.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import tempfile
import time
from types import ModuleType


def _wal_module() -> ModuleType:
    """The replicator.wal module, importable from a source checkout without installing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    import replicator.wal

    return replicator.wal


def build_wal(wal: ModuleType, n_frames: int, page_size: int, commit_every: int = 8) -> bytes:
    """A valid little-endian WAL of ``n_frames`` random frames."""
    salts = (0x01020304, 0x0A0B0C0D)
    body = struct.pack(">6I", wal.WAL_MAGIC_LE, wal.WAL_VERSION, page_size, 1, *salts)
    ck = wal.wal_checksum(body, False)
    out = bytearray(body + struct.pack(">2I", *ck))
    pages = os.urandom(n_frames * page_size)
    for i in range(n_frames):
        commit = i + 1 if (i + 1) % commit_every == 0 or i == n_frames - 1 else 0
        head8 = struct.pack(">2I", i % 1000 + 1, commit)
        page = pages[i * page_size : (i + 1) * page_size]
        ck = wal.wal_checksum(page, False, *wal.wal_checksum(head8, False, *ck))
        out += head8 + struct.pack(">4I", *salts, *ck) + page
    return bytes(out)


def best_of(runs: int, fn: object) -> float:
    """The shortest wall time of ``runs`` calls of ``fn``."""
    assert callable(fn)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    """Build the synthetic WAL, time both paths, print one line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--mib", type=int, default=64, help="size of the frame area (MiB)")
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    wal = _wal_module()

    n_frames = (args.mib << 20) // args.page_size
    data = build_wal(wal, n_frames, args.page_size)
    frames = memoryview(data)[wal.WAL_HEADER_SIZE :]
    n_bytes = len(frames)
    header = wal.parse_wal_header(data)

    t_ck = best_of(args.runs, lambda: wal.wal_checksum(frames, False))

    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = f.fileno()
        res = wal.scan_frames(fd, header, 1, header.checksum)
        if res.end_index != n_frames or res.stop_reason != "eof":
            raise SystemExit(f"scan_frames failed on the synthetic WAL: {res.stop_reason}")
        t_scan = best_of(args.runs, lambda: wal.scan_frames(fd, header, 1, header.checksum))

    mb = n_bytes / 1e6
    print(f"wal checksum: {mb / t_ck:.0f} MB/s (scan_frames: {mb / t_scan:.0f} MB/s)")


if __name__ == "__main__":
    main()
