"""Helpers for tests that drive the real CLI and a real writer process."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
WRITER = str(TESTS / "writer.py")


def cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``replicator ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], capture_output=True, text=True,
        timeout=timeout, env=env,
    )


class Replicate:
    """``replicator replicate ...`` as a subprocess, stderr captured to a file."""

    def __init__(self, *args: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._f = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "replicator", "--log-level", "debug", "replicate", *args],
            stdout=self._f, stderr=self._f, env=env,
        )

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._f.close()
        return rc

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._f.close()

    def text(self) -> str:
        """What the process logged so far."""
        return self.log.read_text(errors="replace")


def start_writer(db: Path, log: Path, *args: str) -> subprocess.Popen[str]:
    """Start the writer process."""
    return subprocess.Popen(
        [sys.executable, WRITER, str(db), str(log), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def commit_log(path: Path) -> list[tuple[int, int, int]]:
    """The writer's log: (seq, t_before_ns, t_after_ns) for each complete line."""
    out: list[tuple[int, int, int]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return out


def seqs(db: Path) -> list[int]:
    """The seq values in a database's log table."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in c.execute("SELECT seq FROM log ORDER BY seq")]
    finally:
        c.close()


def dump(db: Path) -> list[str]:
    """Every row of every table, as SQL text."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(c.iterdump())
    finally:
        c.close()


def integrity(db: Path) -> str:
    """PRAGMA integrity_check of a database."""
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "; ".join(r[0] for r in c.execute("PRAGMA integrity_check"))
    finally:
        c.close()


def checkpoint_truncate(db: Path) -> None:
    """Fold the WAL into the database file (used once writers and the replicator stopped)."""
    c = sqlite3.connect(db)
    try:
        busy = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        assert busy == 0, "checkpoint could not complete"
    finally:
        c.close()


def wait_until(pred: Callable[[], bool], timeout: float = 30, interval: float = 0.05,
               what: str = "condition") -> None:
    """Poll ``pred`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def restore(dest: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``replicator restore DEST -o OUT ...``; asserts success."""
    r = cli("restore", dest, "-o", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return r


def assert_prefix(restored: list[int]) -> int:
    """The restored seqs are exactly 1..k; returns k."""
    assert restored == list(range(1, len(restored) + 1)), "restored commits are not a prefix"
    return len(restored)


def env_without_aws() -> dict[str, str]:
    """The environment minus the caller's AWS_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def tree(root: Path) -> dict[str, str]:
    """Every entry below ``root``: relative path -> content digest (or "dir")."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out
