"""The options of an S3 replica, from an ``s3://`` URL or field by field, validated in one place.

:func:`parse_s3_url` reads ``s3://bucket/prefix?name=value&...`` (``URL_PARAMS`` lists the
names); the config file's ``type: s3`` form builds :class:`S3Options` directly. Either way every
check runs in :class:`S3Options` itself, and nothing here imports botocore: validating a
configuration builds no client. Sizes use the project's one size parser (``8MB`` is 8,000,000
bytes, ``8MiB`` is 8,388,608).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import ConfigError
from ..units import parse_size

MIB = 1 << 20
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MIB
DEFAULT_MAX_RETRIES = 5
DEFAULT_REQUEST_ATTEMPTS = 1  # the outer loop retries; botocore's own waits would hide a recovery
DEFAULT_RETRY_MODE = "standard"
DEFAULT_RETRY_TIMEOUT = 120.0
DEFAULT_BACKOFF_BASE = 0.25
DEFAULT_BACKOFF_MAX = 1.0  # a server that is back is noticed within about this
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 30.0

RETRY_MODES = ("standard", "adaptive")
STORAGE_CLASSES = (
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "GLACIER_IR",
    "SNOW",
    "EXPRESS_ONEZONE",
)
SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")
URL_PARAMS = (
    "endpoint",
    "region",
    "force_path_style",
    "storage_class",
    "sse",
    "sse_kms_key_id",
    "part_size",
    "max_retries",
    "request_attempts",
    "retry_mode",
    "retry_timeout",
    "connect_timeout",
    "read_timeout",
)

_BUCKET_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,61}[a-zA-Z0-9]$")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class S3Options:
    """Where an S3 replica lives and how it is written; checked when built (ConfigError)."""

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint: str | None = None
    force_path_style: bool = False
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    part_size: int = DEFAULT_PART_SIZE
    max_retries: int = DEFAULT_MAX_RETRIES
    request_attempts: int = DEFAULT_REQUEST_ATTEMPTS
    retry_mode: str = DEFAULT_RETRY_MODE
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.strip("/"))
        self._check_location()
        self._check_writes()
        self._check_retries()

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``: the destination as shown to people."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def to_url(self) -> str:
        """The URL that :func:`parse_s3_url` reads back as these options (the parameters that
        differ from their defaults; the backoff settings have none)."""
        params = {
            name: _url_value(getattr(self, name))
            for name in URL_PARAMS
            if getattr(self, name) != _DEFAULTS[name]
        }
        return self.url + ("?" + urlencode(params, safe=":/") if params else "")

    def _check_location(self) -> None:
        where = self.url
        if not _BUCKET_RE.match(self.bucket) or ".." in self.bucket:
            raise ConfigError(
                f"s3://{self.bucket}: invalid bucket name {self.bucket!r} "
                "(3-63 letters, digits, dots, hyphens or underscores)"
            )
        if "//" in self.prefix:
            raise ConfigError(f"{where}: invalid prefix {self.prefix!r} (empty path segment)")
        if self.region is not None and not self.region.strip():
            raise ConfigError(f"{where}: invalid region '' (leave it out to use the default)")
        if self.endpoint:
            object.__setattr__(self, "endpoint", _check_endpoint(self.endpoint, where))
        elif self.endpoint is not None:
            raise ConfigError(f"{where}: invalid endpoint '' (leave it out to use AWS)")

    def _check_writes(self) -> None:
        where = self.url
        if self.storage_class is not None and self.storage_class not in STORAGE_CLASSES:
            raise ConfigError(
                f"{where}: invalid storage_class {self.storage_class!r} "
                f"(expected one of {', '.join(STORAGE_CLASSES)})"
            )
        if self.sse is not None and self.sse not in SSE_MODES:
            raise ConfigError(
                f"{where}: invalid sse {self.sse!r} (expected one of {', '.join(SSE_MODES)})"
            )
        if self.sse_kms_key_id is not None and (
            self.sse is None or not self.sse.startswith("aws:kms")
        ):
            raise ConfigError(f"{where}: sse_kms_key_id requires sse=aws:kms or sse=aws:kms:dsse")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ConfigError(
                f"{where}: invalid part_size {self.part_size} (must be between 5MiB and 5GiB)"
            )

    def _check_retries(self) -> None:
        where = self.url
        if not 0 <= self.max_retries <= 100:
            raise ConfigError(f"{where}: invalid max_retries {self.max_retries} (must be 0-100)")
        if not 1 <= self.request_attempts <= 20:
            raise ConfigError(
                f"{where}: invalid request_attempts {self.request_attempts} (must be 1-20)"
            )
        if self.retry_mode not in RETRY_MODES:
            raise ConfigError(
                f"{where}: invalid retry_mode {self.retry_mode!r} (expected standard or adaptive)"
            )
        for name in ("retry_timeout", "connect_timeout", "read_timeout", "backoff_base",
                     "backoff_max"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{where}: invalid {name} {value} (must be positive)")
            object.__setattr__(self, name, float(value))


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(S3Options) if f.name in URL_PARAMS
}


def _url_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_bool(name: str, value: object, where: str) -> bool:
    """A flag given as a boolean or as text (true/false, 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"{where}: invalid {name} {value!r} (expected true or false)")


def _parse_int(name: str, value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: invalid {name} {value!r} (expected an integer)") from None


def _parse_float(name: str, value: str, where: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: invalid {name} {value!r} (expected seconds)") from None


def _check_endpoint(endpoint: str, where: str) -> str:
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        # Never echo the value: it holds credentials.
        raise ConfigError(f"{where}: endpoint must not contain credentials")
    bad = f"{where}: invalid endpoint {endpoint!r} (expected http://host:port or https://host)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(bad)
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{where}: invalid endpoint {endpoint!r} (bad port)") from None
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ConfigError(bad)
    return f"{parts.scheme}://{parts.netloc}"


def _query_params(query: str, where: str) -> dict[str, str]:
    """The name=value pairs of an s3:// URL's query string (each known, each once)."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(
            f"{where}: malformed query string (expected name=value pairs joined by &)"
        ) from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in URL_PARAMS:
            raise ConfigError(
                f"{where}: unknown parameter {name!r} (known: {', '.join(URL_PARAMS)})"
            )
        if name in params:
            raise ConfigError(f"{where}: parameter {name!r} given twice")
        params[name] = value
    return params


def parse_params(params: dict[str, str], where: str) -> dict[str, Any]:
    """Typed :class:`S3Options` keyword arguments from parameters given as text."""
    if params.get("endpoint") == "":
        raise ConfigError(f"{where}: invalid endpoint '' (leave it out to use AWS)")
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        if name == "force_path_style":
            kwargs[name] = parse_bool(name, value, where)
        elif name == "part_size":
            kwargs[name] = parse_size(value, f"{where}: {name}")
        elif name in ("max_retries", "request_attempts"):
            kwargs[name] = _parse_int(name, value, where)
        elif name in ("retry_timeout", "connect_timeout", "read_timeout"):
            kwargs[name] = _parse_float(name, value, where)
        else:
            kwargs[name] = value
    return kwargs


def parse_s3_url(url: str) -> S3Options:
    """The options of ``s3://bucket/prefix?param=value&...``; see ``URL_PARAMS``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    host = netloc.rpartition("@")[2]
    path = unquote(parts.path)
    where = f"{parts.scheme}://{host}{path.rstrip('/')}"
    if parts.scheme.lower() != "s3":
        raise ConfigError(f"{where}: not an s3:// URL")
    if "@" in netloc:
        # Never echo the userinfo: it would be an access key and secret.
        raise ConfigError(
            f"{where}: credentials in the URL are not supported "
            "(use the AWS environment variables, a profile or an instance role)"
        )
    if not host:
        raise ConfigError(f"{url}: missing bucket name (expected s3://bucket/prefix)")
    if ":" in host:
        raise ConfigError(f"{where}: a bucket name has no port (use ?endpoint=host:port)")
    if parts.fragment:
        raise ConfigError(f"{where}: unexpected fragment '#{parts.fragment}'")
    return S3Options(host, path, **parse_params(_query_params(parts.query, where), where))
