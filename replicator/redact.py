"""Redaction of credentials in text shown to people or machines.

Every error message, log line, ``/status`` document and metric label goes through ``redact``:
the userinfo of any URL (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``) and the value of any
credential-looking query parameter or option (``?token=...``, ``X-Amz-Signature=...``,
``--password=...``) become ``***``. Redacting too much is harmless; echoing a secret is not.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://userinfo@ : the userinfo runs to the last '@' before the query, fragment or the end of
# the URL (a secret access key may itself contain '/' or '+'). The patterns are compiled on first
# use (and then kept in re's cache): most text has neither '@' nor '='.
_USERINFO = r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"?#]*@"
_SECRET_NAME = (r"[a-z0-9_.-]*(?:secret|passw(?:or)?d|pwd|token|signature|credential|auth|"
                r"api[-_]?key|access[-_]?key|private[-_]?key|session)[a-z0-9_.-]*")
# a query parameter (?token=...) or a command-line option (--password=...)
_PARAM = rf"(?i)((?:[?&;]|(?<!\S)--?){_SECRET_NAME}=)[^&#\s'\"]*"


def redact(text: str) -> str:
    """``text`` with URL userinfo and credential-looking query parameter values masked."""
    if "@" in text:
        text = re.sub(_USERINFO, lambda m: f"{m[1]}{MASK}@", text)
    if "=" in text:
        text = re.sub(_PARAM, lambda m: f"{m[1]}{MASK}", text)
    return text


def redact_tree(value: Any) -> Any:
    """Every string of a JSON-like tree (dicts, lists, scalars) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    return value
