"""Fencing: at most one process ships to a replica path.

A small JSON record, ``lease.json`` at the replica root beside ``generations/``, names the process
that ships there: a random owner id drawn when the lease object is created (one per replica per
process start), the host name, pid, database path, when it started and when it last renewed the
lease. A replica claims the lease before shipping anything and refuses to start while another
owner's lease is live; while shipping it re-reads the lease at most once per ``renew_interval``
and stops for good if another owner has written it (it was taken over). An idle replica makes no
lease requests, so a lease is live only while its owner runs *and* ships: another process may
take over a lease that has not been renewed for ``ttl`` seconds. A clean shutdown marks the lease
released. The scheme and its race window are described in docs/format.md ("Fencing").

A lease is also free at once when its owner is provably gone: it was written on this host by a
pid that no longer runs (a ``kill -9`` followed by a restart), or by this very pid but not by a
lease this process holds (a container restarted with the same pid).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .errors import StorageError
from .pos import LEASE_KEY
from .storage.base import StorageClient

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL = 300.0  # a lease not renewed for this long may be taken over
DEFAULT_RENEW_INTERVAL = 60.0  # while shipping, verify and renew at most this often
RELEASE_TIMEOUT = 5.0  # how long a clean shutdown waits to mark the lease released
LEASE_VERSION = 1

# owner ids of the leases this process holds now (two databases of one process may not share a
# replica path either)
_HELD: set[str] = set()


class LeaseError(StorageError):
    """Another process holds the replica's lease: the replica path is in use."""


class LeaseLostError(LeaseError):
    """Another process took over a lease this replica held: it must stop shipping."""


@dataclass(frozen=True)
class LeaseRecord:
    """The contents of ``lease.json``."""

    owner: str
    hostname: str
    pid: int
    db: str
    started_ms: int
    renewed_ms: int
    released: bool = False

    def encode(self) -> bytes:
        """The record as stored: one JSON object with a version field."""
        return (json.dumps({"version": LEASE_VERSION, **asdict(self)}, sort_keys=True)
                + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> LeaseRecord | None:
        """Parse a stored record; None if it is not one (it is then treated as absent)."""
        try:
            raw: Any = json.loads(data)
        except ValueError:
            log.warning("%s: %s is not valid JSON; ignoring it", where, LEASE_KEY)
            return None
        if not isinstance(raw, dict):
            log.warning("%s: %s is not a lease record; ignoring it", where, LEASE_KEY)
            return None
        version = raw.get("version")
        if version != LEASE_VERSION:
            # a newer writer's record is not ours to overwrite
            raise LeaseError(f"{where}: {LEASE_KEY} has unknown version {version!r}; "
                             "is a newer replicator shipping here?")
        try:
            return cls(
                owner=str(raw["owner"]),
                hostname=str(raw["hostname"]),
                pid=int(raw["pid"]),
                db=str(raw["db"]),
                started_ms=int(raw["started_ms"]),
                renewed_ms=int(raw["renewed_ms"]),
                released=bool(raw.get("released", False)),
            )
        except (KeyError, TypeError, ValueError):
            log.warning("%s: %s lacks fields; ignoring it", where, LEASE_KEY)
            return None

    def describe(self) -> str:
        """Who holds it, for people: ``host H pid P db D``."""
        return f"host {self.hostname} pid {self.pid} db {self.db}"


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class Lease:
    """This process's claim on one replica path."""

    def __init__(
        self,
        client: StorageClient,
        db: str,
        *,
        ttl: float = DEFAULT_LEASE_TTL,
        renew_interval: float = DEFAULT_RENEW_INTERVAL,
        clock: Callable[[], float] = time.time,
        hostname: str | None = None,
        pid: int | None = None,
    ) -> None:
        self.client = client
        self.db = db
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.clock = clock
        self.owner = secrets.token_hex(8)
        self.hostname = hostname if hostname is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self.held = False
        self._started_ms = 0
        self._checked = 0.0  # clock() of the last successful claim or renewal

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def read(self) -> LeaseRecord | None:
        """The lease record at the replica, if any."""
        data = await self.client.read_lease()
        return None if data is None else LeaseRecord.decode(data, self.client.url)

    def is_free(self, rec: LeaseRecord) -> bool:
        """Whether another owner's record no longer fences this replica path."""
        if rec.released or self._now_ms() - rec.renewed_ms >= self.ttl * 1000:
            return True
        if rec.hostname != self.hostname:
            return False
        if rec.pid == self.pid:
            return rec.owner not in _HELD  # our pid, but not a lease of this process: a restart
        return not _pid_running(rec.pid)

    def due(self) -> bool:
        """Whether the lease must be verified before the next write."""
        return not self.held or self.clock() - self._checked >= self.renew_interval

    async def _write(self, released: bool = False) -> None:
        now = self._now_ms()
        if not self._started_ms:
            self._started_ms = now
        rec = LeaseRecord(self.owner, self.hostname, self.pid, self.db, self._started_ms, now,
                          released)
        await self.client.write_lease(rec.encode())

    def _in_use(self, rec: LeaseRecord) -> LeaseError:
        # the same text every time (no age): a refusal retried in a loop is logged once
        return LeaseError(
            f"{self.client.url}: replica path in use by {rec.describe()} (its lease lasts until "
            f"it is released or not renewed for {self.ttl:.0f}s)"
        )

    def _taken_over(self, rec: LeaseRecord) -> LeaseLostError:
        return LeaseLostError(
            f"{self.client.url}: replica taken over by {rec.describe()}; shipping to it stopped "
            "(the local spool keeps every object)"
        )

    async def claim(self) -> None:
        """Take the lease, or raise LeaseError naming the live owner (LeaseLostError if this
        replica held it and another owner has it now)."""
        rec = await self.read()
        if rec is not None and rec.owner != self.owner:
            if self.held:
                self.forget()
                raise self._taken_over(rec)
            if not self.is_free(rec):
                raise self._in_use(rec)
            if not rec.released:
                log.warning("%s: taking over the lease of %s (%s)", self.client.url,
                            rec.describe(), "expired" if self._now_ms() - rec.renewed_ms
                            >= self.ttl * 1000 else "that process is gone")
        await self._write()
        # A claim racing ours (both read the old record, both wrote) shows here if it wrote last;
        # if it wrote first, it sees ours when it reads back.
        back = await self.read()
        if back is None or back.owner != self.owner:
            if back is None:
                raise LeaseError(f"{self.client.url}: {LEASE_KEY} vanished right after it was "
                                 "written; another process is handling the lease")
            raise self._in_use(back)
        self.held = True
        _HELD.add(self.owner)
        self._checked = self.clock()

    async def renew(self) -> None:
        """Verify this replica still holds the lease and extend it (claim it if not held yet).
        Raises LeaseLostError if another owner wrote it."""
        if not self.held:
            await self.claim()
            return
        rec = await self.read()
        if rec is not None and rec.owner != self.owner:
            self.forget()
            raise self._taken_over(rec)
        await self._write()
        self._checked = self.clock()

    async def release(self) -> None:
        """Mark the lease released (only if this replica still holds it)."""
        if not self.held:
            return
        rec = await self.read()
        self.forget()
        if rec is None or rec.owner == self.owner:
            await self._write(released=True)

    def forget(self) -> None:
        """This replica no longer holds the lease: released, taken over, or stopped without
        releasing it (its destination down, or fenced). An unreleased record stays until it
        expires, but for this process it is a stopped owner's, free to take over (see
        :meth:`is_free`)."""
        self.held = False
        _HELD.discard(self.owner)

