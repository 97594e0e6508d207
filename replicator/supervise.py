"""The stop signals of ``replicate`` and the application it runs with ``--exec``.

Without a child, SIGTERM or SIGINT stops replication with a final sync bounded by
``shutdown-timeout``. With ``--exec CMD``, the child starts once every database is replicating
(never if replication could not start) and SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 are
forwarded to it; replication goes on while the child shuts down, so its last commits are
captured. A child still running ``shutdown-timeout`` after a stop signal is killed. Once it has
exited, the final sync runs (bounded by ``shutdown-timeout``) and ``replicate`` exits with the
child's own code: its exit status, or 128 + N if signal N ended it, as a shell reports it. In
every case a second SIGTERM or SIGINT skips the final sync.

The child runs in a process group of its own, so a terminal's Ctrl-C reaches it exactly once
(through the replicator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable, Sequence

from .affinity import unconfined
from .aio import Stop
from .errors import ConfigError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# the exit code of a command that could not be started, as a shell reports it
EXIT_NOT_STARTED = 127


def check_command(argv: Sequence[str] | None, where: str) -> None:
    """Refuse an ``exec`` command that cannot be run (None: no command), before anything
    starts."""
    if argv is None:
        return
    if not argv:
        raise ConfigError(f"{where}: empty command")
    if shutil.which(argv[0]) is None:
        what = "is not executable" if os.path.exists(argv[0]) else "not found"
        raise ConfigError(f"{where}: command {argv[0]!r} {what}")


def exit_code(returncode: int) -> int:
    """A child's return code as a shell's exit status: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Stop requests of ``replicate`` and, with a command, the child running it.

    ``stop`` is set when replication should end; ``skip_final_sync`` on a second stop request.
    """

    def __init__(self, command: Sequence[str] | None, shutdown_timeout: float) -> None:
        self.command = list(command) if command else None
        self.shutdown_timeout = shutdown_timeout
        self.stop: asyncio.Event = Stop()
        self.skip_final_sync = asyncio.Event()
        self.child: asyncio.subprocess.Process | None = None
        self._stop_requests = 0
        self._kill_timer: asyncio.TimerHandle | None = None

    def install(self) -> None:
        """Handle the stop signals (and, with a command, the forwarded ones) on the loop."""
        loop = asyncio.get_running_loop()
        sigs = FORWARDED_SIGNALS if self.command else STOP_SIGNALS
        for sig in sigs:
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        """A signal arrived: forward it to the child, count stop requests."""
        if self.child is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(sig)
        if sig not in STOP_SIGNALS:
            return
        self._stop_requests += 1
        if self._stop_requests > 1:
            if not self.skip_final_sync.is_set():
                log.warning("second stop signal: skipping the final sync")
            self.skip_final_sync.set()
        if self.child is None:
            self.stop.set()
        elif self._kill_timer is None:
            self._kill_timer = asyncio.get_running_loop().call_later(
                self.shutdown_timeout, self._kill_child)

    def _kill_child(self) -> None:
        if self.child is not None and self.child.returncode is None:
            log.error("child %d still running %.1fs after the stop signal: killing it",
                      self.child.pid, self.shutdown_timeout)
            with contextlib.suppress(ProcessLookupError):
                self.child.kill()

    async def run(self, replicate: Callable[[asyncio.Event], Awaitable[None]]) -> int:
        """Run ``replicate(stop)`` (already open) and the child; return the exit code."""
        if self.command is None or self.stop.is_set():
            await replicate(self.stop)
            return 0
        try:
            # the application gets every CPU, whatever the replicator's own cpus setting (a
            # thread the loop starts meanwhile is not confined either: slower, not wrong)
            with unconfined():
                self.child = await asyncio.create_subprocess_exec(*self.command,
                                                                  process_group=0)
        except OSError as exc:
            log.error("exec: cannot start %r: %s", self.command[0], exc.strerror or exc)
            self.stop.set()
            await replicate(self.stop)
            return EXIT_NOT_STARTED
        log.info("started child %d: %s", self.child.pid, " ".join(self.command))
        replication = asyncio.ensure_future(replicate(self.stop))
        waiting = asyncio.ensure_future(self.child.wait())
        await asyncio.wait({replication, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            # replication ended on its own (an error): the application must not go on without it
            log.error("replication stopped: stopping child %d", self.child.pid)
            self.on_signal(signal.SIGTERM)
            await waiting
            await replication  # re-raises what stopped it
        code = exit_code(waiting.result())
        log.info("child %d exited with code %d", self.child.pid, code)
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        self.stop.set()
        await replication
        return code
