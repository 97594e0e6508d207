"""Continuous backup and point-in-time recovery for SQLite."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config, DbConfig, ReplicaConfig, load_config  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    CorruptObjectError,
    DatabaseError,
    ReplicatorError,
    RestoreError,
    StorageError,
)

__all__ = [
    "Config",
    "ConfigError",
    "CorruptObjectError",
    "DatabaseError",
    "DbConfig",
    "ReplicaConfig",
    "ReplicatorError",
    "RestoreError",
    "StorageError",
    "__version__",
    "load_config",
]
