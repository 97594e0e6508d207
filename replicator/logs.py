"""Log set-up for the CLI: plain text or JSON lines on stderr, every line redacted.

Other libraries' chatter (botocore's "Found credentials in environment variables.", watchdog's
events) is kept to warnings and errors, whatever the level asked for.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time

from .redact import redact

LOG_FORMATS = ("text", "json")
QUIET_LOGGERS = ("botocore", "aiobotocore", "urllib3", "watchdog")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL message``, redacted."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message`` (and
    ``exception`` when there is one), redacted."""

    def format(self, record: logging.LogRecord) -> str:
        t = dt.datetime.fromtimestamp(record.created, dt.UTC)
        doc = {
            "time": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log at ``level`` to stderr in ``fmt`` ("text" or "json"); other libraries at WARNING."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class RateLimit:
    """Lets something happen at most once per ``interval`` seconds (monotonic clock)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -interval

    def ready(self, now: float | None = None) -> bool:
        """True (and the clock restarts) when ``interval`` has passed since the last True."""
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


def fmt_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``1.5 KiB``, ``3.2 MiB``, ``1.1 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
