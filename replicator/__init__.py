"""Continuous backup and point-in-time recovery for SQLite."""

from __future__ import annotations

__version__ = "0.1.0"

import os  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

# numpy (page indexes, WAL checksums) does integer arithmetic only, never BLAS; its OpenBLAS would
# start a thread per core when first imported (63 more threads on a 64-core host, each with its
# buffers). A setting the environment gives stays.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import (  # noqa: E402
    ConfigError,
    CorruptObjectError,
    DatabaseError,
    ReplicatorError,
    RestoreError,
    StorageError,
)

if TYPE_CHECKING:
    from .config import Config, DbConfig, ReplicaConfig, load_config

_FROM_CONFIG = ("Config", "DbConfig", "ReplicaConfig", "load_config")


def __getattr__(name: str) -> Any:
    """The configuration's names, imported on first use: a command that needs no configuration
    (a restore from a destination) starts without importing what it pulls in."""
    if name in _FROM_CONFIG:
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
