"""The content hash and the page index: incremental updates equal a full recomputation; a saved
index reads back, and a damaged one is refused."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
import xxhash

from replicator import pageindex
from replicator.contenthash import content_hash, file_content_hash, page_hash
from replicator.pageindex import IndexUnusable, PageIndex, SavedIndex
from replicator.wal import FRAME_HEADER_SIZE

PS = 512


def full(pages: dict[int, bytes], n: int) -> int:
    return content_hash((p, pages.get(p, bytes(PS))) for p in range(1, n + 1))


def test_page_hash_is_xxh3_128_seeded_with_the_page_number() -> None:
    page = os.urandom(PS)
    assert page_hash(7, page) == int.from_bytes(xxhash.xxh3_128_digest(page, seed=7), "big")
    assert page_hash(7, page) != page_hash(8, page)


def frames(writes: list[tuple[int, bytes]], commit: int) -> bytes:
    out = b""
    for i, (pgno, page) in enumerate(writes):
        size = commit if i == len(writes) - 1 else 0
        out += struct.pack(">II", pgno, size) + bytes(FRAME_HEADER_SIZE - 8) + page
    return out


@pytest.mark.parametrize("few", [0, 16], ids=["arrays", "a-few-frames-in-python"])
def test_incremental_equals_full_recomputation(few: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random batches of transactions that write pages, grow and shrink the database: after
    each, the index's hash is the hash of the pages a restore would hold, frame by frame (pages
    past a commit's size are gone, pages that come back unwritten are zeros). Runs of up to 16
    frames, applied with numpy or (as a run of a few frames is) in plain Python."""
    monkeypatch.setattr(pageindex, "SMALL_RUN_FRAMES", few)
    rnd = random.Random(5)
    ix = PageIndex(PS)
    pages: dict[int, bytes] = {}
    n = 0
    for _ in range(300):
        batch = b""
        after = dict(pages)
        size = n
        for _ in range(rnd.randint(1, 4)):
            size = max(1, size + rnd.randint(-4, 4))
            writes = [(rnd.randint(1, size + 2), rnd.randbytes(PS))
                      for _ in range(rnd.randint(1, 4))]
            batch += frames(writes, size)
            for pgno, page in writes:
                after[pgno] = page
            after = {p: v for p, v in after.items() if p <= size}
        ix.begin()
        if rnd.random() < 0.5:
            ix.apply_frames(batch)
        else:  # in chunks cut anywhere
            cuts = sorted(rnd.sample(range(1, len(batch)), 3))
            ix.apply_stream(batch[a:b] for a, b in zip([0, *cuts], [*cuts, len(batch)],
                                                        strict=True))
        if rnd.random() < 0.2:
            ix.rollback()
            assert ix.content == full(pages, n)
            continue
        ix.commit()
        pages, n = after, size
        assert ix.pages == n and ix.content == full(pages, n)


def test_diff_finds_exactly_the_changed_pages() -> None:
    old = [os.urandom(PS) for _ in range(10)]
    ix = PageIndex(PS)
    ix.set_pages(1, b"".join(old))
    ix.resize(10)
    new = list(old) + [os.urandom(PS)]
    new[3] = os.urandom(PS)
    assert [p for p, _ in ix.diff(1, new)] == [4, 11]


def test_save_and_load(tmp_path: Path) -> None:
    ix = PageIndex(PS)
    ix.set_pages(1, os.urandom(5 * PS))
    ix.resize(5)
    path = str(tmp_path / "pages.idx")
    ix.save(path, "0123456789abcdef", 42, 1, 2)
    saved = SavedIndex.load(path)
    assert (saved.generation, saved.txid, saved.dev, saved.ino) == ("0123456789abcdef", 42, 1, 2)
    assert saved.index.content == ix.content and saved.index.pages == 5
    raw = bytearray(Path(path).read_bytes())
    for cut, what in ((len(raw) - 1, "damaged"), (10, "truncated")):
        Path(path).write_bytes(bytes(raw[:cut]))
        with pytest.raises(IndexUnusable, match=what):
            SavedIndex.load(path)
    raw[100] ^= 1
    Path(path).write_bytes(bytes(raw))
    with pytest.raises(IndexUnusable, match="checksum mismatch"):
        SavedIndex.load(path)
    os.unlink(path)
    with pytest.raises(IndexUnusable, match="no page index"):
        SavedIndex.load(path)


def test_file_content_hash(tmp_path: Path) -> None:
    data = os.urandom(7 * PS)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        want = content_hash((p + 1, data[p * PS : (p + 1) * PS]) for p in range(7))
        assert file_content_hash(fd, PS, 7) == want
        # short reads are zeros
        assert file_content_hash(fd, PS, 8) == want ^ page_hash(8, bytes(PS))
    finally:
        os.close(fd)
