"""The exception tree.

    ReplicatorError            anything this package raises on purpose
    ├── ConfigError            a bad config file, flag or URL (names the field)
    ├── WalError               a WAL header or frame that cannot be parsed
    ├── FormatError            a replica object that is not in the replica format
    │   └── CorruptObjectError an object whose checksum or chain does not verify (names the key)
    ├── StorageError           a backend operation failed (names the replica and the key)
    │   └── NotFoundError      the object or generation does not exist
    ├── DatabaseError          the watched database cannot be used (missing, not WAL, ...)
    └── RestoreError           no restore is possible as asked (prints the restorable range)
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(ReplicatorError):
    """A configuration value, flag or URL is invalid."""


class WalError(ReplicatorError):
    """A WAL header or frame cannot be parsed."""


class FormatError(ReplicatorError):
    """A replica object is not in the replica format."""


class CorruptObjectError(FormatError):
    """A replica object fails its checksum or does not chain to its predecessor."""


class StorageError(ReplicatorError):
    """A storage backend operation failed."""


class NotFoundError(StorageError):
    """The requested object or generation does not exist."""


class DatabaseError(ReplicatorError):
    """The watched database cannot be used."""


class SpoolBusyError(DatabaseError):
    """Another process holds the database's spool: it is replicating the database already."""


class RestoreError(ReplicatorError):
    """The requested restore is not possible."""
