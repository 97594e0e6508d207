"""Replica backends, and the registry that opens one from a destination.

A destination is first parsed (and so validated) into a :data:`Destination` without building a
client; :func:`open_destination` then builds the client. ``open_storage(url)`` does both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .base import StorageClient
from .file import FileStorage
from .memory import MemoryStorage

if TYPE_CHECKING:
    from .s3_options import S3Options

# the S3 options are imported on first use: a restore from a directory starts without them

__all__ = [
    "Destination",
    "FileDestination",
    "FileStorage",
    "MemoryDestination",
    "MemoryStorage",
    "S3Options",
    "StorageClient",
    "open_destination",
    "open_storage",
    "parse_destination",
]


@dataclass(frozen=True)
class FileDestination:
    """A local directory."""

    path: str


@dataclass(frozen=True)
class MemoryDestination:
    """An in-memory replica (tests)."""

    url: str = "memory://"


if TYPE_CHECKING:
    Destination = FileDestination | MemoryDestination | S3Options


def __getattr__(name: str) -> object:
    """``S3Options`` and ``Destination``, imported on first use."""
    if name in ("S3Options", "Destination"):
        from .s3_options import S3Options

        return S3Options if name == "S3Options" else (
            FileDestination | MemoryDestination | S3Options)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_destination(url: str) -> Destination:
    """Parse and check a destination: a directory path, ``file:///abs/path``, ``memory://``, or
    ``s3://bucket/prefix?...``; ConfigError names what is wrong."""
    if "://" not in url:
        if not url:
            raise ConfigError("replica destination is empty")
        return FileDestination(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file URL must be file:///absolute/path")
        if not parts.path:
            raise ConfigError(f"{url}: file URL has no path")
        return FileDestination(unquote(parts.path))
    if scheme == "memory":
        return MemoryDestination(url)
    if scheme == "s3":
        from .s3_options import parse_s3_url

        return parse_s3_url(url)
    raise ConfigError(f"{url}: unsupported replica scheme {scheme!r} (use a path, file:// or s3://)")


def open_destination(dest: Destination) -> StorageClient:
    """The storage client of a parsed destination."""
    if isinstance(dest, FileDestination):
        return FileStorage(dest.path)
    if isinstance(dest, MemoryDestination):
        return MemoryStorage(dest.url)
    from .s3 import S3Storage  # imported only when needed: botocore is heavy

    return S3Storage(dest)


def open_storage(url: str) -> StorageClient:
    """Open a backend from a destination string (see :func:`parse_destination`)."""
    return open_destination(parse_destination(url))
