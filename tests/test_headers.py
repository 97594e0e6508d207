"""Typed object headers: JSON round trips, validation, and the fields docs/format.md names."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from replicator.errors import CorruptObjectError
from replicator.headers import (
    CatchupHeader,
    Reason,
    SegmentHeader,
    SnapshotHeader,
    Txn,
    header_from_json,
)
from replicator.pos import WalPos

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"
KEY = "generations/0123456789abcdef/wal/x.seg"
POS = WalPos(1, 2, 3, (4, 5))


def snapshot() -> SnapshotHeader:
    return SnapshotHeader("0123456789abcdef", 7, 1_700_000_000_000_000_000, 4096, 3, False,
                          POS, Reason.WAL_RESET, "/db", "0123456789abcde0", 6, 123)


def segment() -> SegmentHeader:
    return SegmentHeader("0123456789abcdef", 8, 9, 4096, True, POS, POS,
                         WalPos(1, 2, 5, (6, 7)), None, 2,
                         (Txn(8, 10, 1, 3), Txn(9, 11, 1, 4)))


def catchup() -> CatchupHeader:
    return CatchupHeader("0123456789abcdef", 10, 20, 15, 4096, 3, False, POS, None, 0,
                         0x0123456789ABCDEF0123456789ABCDEF, Reason.RESUME_FAILED)


def doc_fields(section: str) -> set[str]:
    """The backticked names in the first column of the table under a heading."""
    text = DOC.read_text()
    start = text.index(section)
    table = text[start:].split("\n\n", 2)[1]
    names: set[str] = set()
    for line in table.splitlines()[2:]:
        names.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return names


@pytest.mark.parametrize(("cls", "section"), [
    (SnapshotHeader, "### Snapshot header"),
    (SegmentHeader, "### WAL segment header"),
    (CatchupHeader, "### Catch-up header"),
])
def test_classes_and_document_name_the_same_fields(cls: Any, section: str) -> None:
    fields = {f.name for f in dataclasses.fields(cls)} | {"kind"}
    assert fields == doc_fields(section)


@pytest.mark.parametrize("header", [snapshot(), segment(), catchup()])
def test_round_trip(header: SnapshotHeader | SegmentHeader) -> None:
    obj = header.to_json()
    assert set(obj) == {f.name for f in dataclasses.fields(header)} | {"kind"}
    assert header_from_json(obj, KEY) == header


def test_content_hash_is_32_hex_digits() -> None:
    assert catchup().to_json()["content_hash"] == "0123456789abcdef0123456789abcdef"
    assert snapshot().to_json()["content_hash"] is None  # version 1 objects have none


def test_reason_is_a_string() -> None:
    assert snapshot().to_json()["reason"] == "wal_reset"
    assert Reason("interval") is Reason.INTERVAL and Reason.WAL_RESET.text


def test_absent_optional_fields_read_as_null() -> None:
    obj = snapshot().to_json()
    for k in ("previous_generation", "previous_txid", "previous_confirmed_ns", "db"):
        del obj[k]
    h = SnapshotHeader.from_json(obj, KEY)
    assert h.previous_generation is None and h.db is None


@pytest.mark.parametrize(("header", "field", "value"), [
    (snapshot(), "txid", "7"),
    (snapshot(), "txid", True),
    (snapshot(), "ts_ns", None),
    (snapshot(), "reason", "bored"),
    (snapshot(), "position", {"salt1": 1}),
    (snapshot(), "big_endian", 0),
    (segment(), "txns", [[8, 10, 1]]),
    (segment(), "txns", [[8, 10, 1, 3]]),  # one transaction for txids 8..9
    (segment(), "txns", []),
    (segment(), "txns", [[8, 10, 1, 3], [9, 11, True, 3]]),
    (segment(), "txns", [[8, 10, 1, 3], [9, 11, 1, 3.0]]),
    (segment(), "txns", [[8, 10, 1, 3], (9, 11, 1, 3)]),
    (segment(), "txns", [[8, 10, 1, 3], [10, 11, 1, 3]]),  # txids 8 and 10 for 8..9
    (segment(), "txns", {"8": [10, 1, 3]}),
    (segment(), "start", None),
    (segment(), "wal_header", "zz"),
    (segment(), "kind", "snapshot"),
    (segment(), "content_hash", "ABC"),
    (catchup(), "content_hash", None),
    (catchup(), "content_hash", "0" * 31),
    (catchup(), "unobserved_from_ns", -0.5),
])
def test_bad_field_names_the_object_and_the_key(header: Any, field: str, value: Any) -> None:
    obj = header.to_json()
    obj[field] = value
    with pytest.raises(CorruptObjectError) as ei:
        header_from_json(obj, KEY) if field != "kind" else SegmentHeader.from_json(obj, KEY)
    assert str(ei.value) == f"{KEY}: corrupt object (bad header field {field!r})"


def test_not_an_object() -> None:
    with pytest.raises(CorruptObjectError, match="bad header"):
        header_from_json([1], KEY)
    with pytest.raises(CorruptObjectError, match="'kind'"):
        header_from_json({"kind": "other"}, KEY)


def test_segment_follows() -> None:
    a = segment()
    b = dataclasses.replace(a, start_txid=10, end_txid=10, prev=a.end, start=a.end,
                            end=WalPos(1, 2, 6, (8, 9)), txns=(Txn(10, 12, 1, 4),))
    assert b.follows(a)
    assert not dataclasses.replace(b, start_txid=11).follows(a)
