"""Durable writes: a temp file beside the target, written whole, then renamed over it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator.fsutil import TMP_SUFFIX, WRITE_BUFFER, atomic_writer


def test_small_and_large_writes_land_in_order_and_whole(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    pieces = [os.urandom(n) for n in (5, 100, WRITE_BUFFER - 50, 200, 3 * WRITE_BUFFER + 7, 1)]
    pieces.append(memoryview(os.urandom(WRITE_BUFFER))[10:])
    with atomic_writer(str(target)) as f:
        for p in pieces:
            assert f.write(p) == len(p)
    assert target.read_bytes() == b"".join(bytes(p) for p in pieces)
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


def test_a_failed_write_leaves_the_target_as_it_was_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    target.write_bytes(b"before")
    with pytest.raises(RuntimeError), atomic_writer(str(target)) as f:
        f.write(os.urandom(3 * WRITE_BUFFER))
        raise RuntimeError("stop")
    assert target.read_bytes() == b"before"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_a_buffer_changed_after_a_small_write_does_not_change_the_file(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    buf = bytearray(b"abc")
    with atomic_writer(str(target)) as f:
        f.write(memoryview(buf))
        buf[:] = b"xyz"
    assert target.read_bytes() == b"abc"


def test_the_file_gets_the_modes_a_new_file_gets(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_writer(str(tmp_path / "obj")) as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "obj").stat().st_mode & 0o777 == 0o640
