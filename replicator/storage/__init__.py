"""Replica backends and the registry that opens one from a URL or path."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from .base import StorageClient
from .file import FileStorage
from .memory import MemoryStorage

__all__ = ["FileStorage", "MemoryStorage", "StorageClient", "open_storage"]


def open_storage(url: str) -> StorageClient:
    """Open a backend from a destination: a directory path, ``file:///abs/path``, ``memory://``,
    or ``s3://bucket/prefix?...``."""
    if "://" not in url:
        if not url:
            raise ConfigError("replica destination is empty")
        return FileStorage(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{url}: file URL must be file:///absolute/path")
        if not parts.path:
            raise ConfigError(f"{url}: file URL has no path")
        return FileStorage(unquote(parts.path))
    if scheme == "memory":
        return MemoryStorage(url)
    if scheme == "s3":
        from .s3 import S3Storage  # imported lazily: botocore is heavy

        return S3Storage.from_url(url)
    raise ConfigError(f"{url}: unsupported replica scheme {scheme!r} (use a path, file:// or s3://)")
