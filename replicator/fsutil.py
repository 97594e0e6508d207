"""Durable file helpers: write to a temp name, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: str) -> None:
    """Create ``path`` and its parents, fsyncing each parent that gained an entry."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d)
        fsync_dir(os.path.dirname(d))


def temp_path(path: str) -> str:
    """A unique temp name beside ``path`` (same directory, so rename is atomic)."""
    return f"{path}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}"


@contextlib.contextmanager
def atomic_writer(path: str) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on clean exit fsync it, rename it over ``path`` and
    fsync the directory. On error the temp file is removed and ``path`` is untouched."""
    makedirs_durable(os.path.dirname(path) or ".")
    tmp = temp_path(path)
    f = open(tmp, "xb")  # noqa: SIM115 - closed below on every path
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
