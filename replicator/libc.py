"""The C library through ctypes, loaded once for the process: file events (inotify), the
kernel's names of threads, handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (``errno`` kept for ``ctypes.get_errno``), or None where it cannot be
    loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def function(name: str) -> Callable[..., Any] | None:
    """The C library's function ``name``, or None where the library or the function is
    missing (another system)."""
    lib = libc()
    if lib is None:
        return None
    try:
        fn: Callable[..., Any] = getattr(lib, name)
    except AttributeError:
        return None
    return fn
