"""The one parser of each kind of quantity the user writes: sizes and durations.

Sizes: a number of bytes, or a number with a unit. ``kB``/``KB``, ``MB``, ``GB``, ``TB`` (and
``k``, ``m``, ``g``, ``t``) are powers of 1000; ``KiB``, ``MiB``, ``GiB``, ``TiB`` are powers of
1024 (``8MB`` is 8,000,000 bytes, ``8MiB`` is 8,388,608). Units are case-insensitive.

Durations: a number of seconds, or ``250ms``, ``10s``, ``5m``, ``1h``, ``2d`` and sums of them
such as ``1h30m``.
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

_DURATION_HINT = "a duration like 250ms, 10s, 5m, 1h or 7d"
_DUR_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DUR_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_duration(value: object, where: str) -> float:
    """Seconds from ``1h30m``, ``10s``, ``250ms`` or a number of seconds."""
    err = ConfigError(f"{where}: expected {_DURATION_HINT}, got {value!r}")
    if isinstance(value, bool):
        raise err
    if isinstance(value, int | float):
        if math.isnan(value):
            raise err
        if value < 0:
            raise ConfigError(f"{where}: duration must not be negative")
        return float(value)
    if isinstance(value, str):
        s = value.strip().replace(" ", "")
        pos = 0
        total = 0.0
        for m in _DUR_RE.finditer(s):
            if m.start() != pos:
                break
            total += float(m[1]) * _DUR_UNITS[m[2]]
            pos = m.end()
        if s and pos == len(s):
            return total
    raise err


def parse_size(value: object, where: str) -> int:
    """Bytes from a positive number or ``500MiB``, ``1GB``, ``64 KiB``, ``1000b`` (KB, MB, GB, TB
    are powers of 1000; KiB, MiB, GiB, TiB powers of 1024)."""
    err = ConfigError(f"{where}: expected a size like 500MiB or 1GB, got {value!r}")
    if isinstance(value, bool):
        raise err
    if isinstance(value, int | float):
        n = float(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value.strip())
        if m is None or (m[3] and not m[2]):
            raise err
        base = 1024 if m[3] else 1000
        n = float(m[1]) * base ** _SIZE_POWERS[m[2].lower()]
    else:
        raise err
    if math.isnan(n) or math.isinf(n) or n < 1:
        raise ConfigError(f"{where}: must be at least 1 byte, got {value!r}")
    return int(n)
