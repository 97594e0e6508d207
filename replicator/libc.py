"""The C library through ctypes, for the process: file events (inotify), the kernel's names of
threads, the heap's settings and handing freed memory back to the system."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The symbols the process has loaded, the C library's among them (``errno`` kept for
    ``ctypes.get_errno``; no search for the library's file, which costs a subprocess), or None
    where they cannot be had."""
    try:
        return ctypes.CDLL(None, use_errno=True)
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
