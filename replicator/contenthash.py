"""The content hash of a database (docs/format.md, "Content hash").

For a database of ``n`` pages of ``page_size`` bytes, page ``p`` (1-based) hashes to
``H(p) = XXH3-128(page bytes, seed = p)`` taken as an unsigned 128-bit integer, and the content
hash is ``H(1) xor H(2) xor ... xor H(n)``, written as 32 lowercase hex digits (big-endian). XOR
makes it incremental: a page that changes from ``a`` to ``b`` changes the hash by ``H_a xor H_b``;
a database that shrinks drops the pages past its end.

This module needs only xxhash, so a restore checks its result without loading what the capture's
page index (:mod:`replicator.pageindex`) needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import xxhash

CATCHUP_PGNO_SIZE = 4  # a catch-up or differential body is records of (page number u32 BE, page)
_HASH_CHUNK = 1024  # pages read at once by file_content_hash


def page_hash(pgno: int, page: bytes | memoryview) -> int:
    """``H(p)``: XXH3-128 of the page with the page number as the seed."""
    return int(xxhash.xxh3_128_intdigest(page, seed=pgno))


def hash_hex(value: int) -> str:
    """The written form of a content hash: 32 lowercase hex digits."""
    return f"{value:032x}"


def content_hash(pages: Iterable[tuple[int, bytes | memoryview]]) -> int:
    """The content hash of ``(pgno, page)`` pairs that cover pages 1..n exactly once."""
    h = 0
    for pgno, page in pages:
        h ^= page_hash(pgno, page)
    return h


def file_content_hash(fd: int, page_size: int, pages: int) -> int:
    """The content hash of pages 1..``pages`` of an open database file (short reads are zeros)."""
    h = 0
    pgno = 1
    while pgno <= pages:
        n = min(_HASH_CHUNK, pages - pgno + 1)
        buf = os.pread(fd, n * page_size, (pgno - 1) * page_size)
        if len(buf) < n * page_size:
            buf += bytes(n * page_size - len(buf))
        mv = memoryview(buf)
        for k in range(n):
            h ^= page_hash(pgno + k, mv[k * page_size : (k + 1) * page_size])
        pgno += n
    return h
