"""The service layer in-process: one-step capture and shipping, periodic snapshots, spool
pruning, restart."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from util import commit, start_writer, until
from writer import init_db

from replicator import pageindex
from replicator.config import DbConfig, ReplicaConfig
from replicator.db import DEFAULT_TUNING, Tuning
from replicator.pos import ObjectInfo
from replicator.pruning import PRUNE_FEW, PruneSchedule
from replicator.replica import Replica
from replicator.replicator import DatabaseService
from replicator.report import service_status
from replicator.schedule import WAL_SNAPSHOT_DEFER_VOLUME
from replicator.spool import Spool


def service(tmp_path: Path, tuning: Tuning = DEFAULT_TUNING, **kw: float) -> DatabaseService:
    cfg = DbConfig(path=str(tmp_path / "app.db"),
                   replicas=[ReplicaConfig("local", str(tmp_path / "replica"))], **kw)
    return DatabaseService(cfg, tuning=tuning)


async def shipping(tmp_path: Path) -> tuple[DatabaseService, Replica]:
    """A new database ``app.db`` in ``tmp_path``, an open service for it (no periodic snapshot)
    and its replica, the first snapshot shipped."""
    init_db(str(tmp_path / "app.db"))
    s = service(tmp_path, snapshot_interval=3600)
    await s.open()
    r = s.replicas[0]
    await r.sync()
    return s, r


async def captured(s: DatabaseService, db: Path, n: int) -> None:
    """Commit ``n`` transactions one by one, each captured before the next."""
    for _ in range(n):
        commit(db, 1)
        await s.sync()


async def test_periodic_snapshot_only_when_something_changed(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))

    async def go() -> list[bool]:
        s = service(tmp_path, snapshot_interval=0.05)
        await s.open()
        out = []
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())  # nothing changed since the first snapshot
        commit(tmp_path / "app.db", 3)
        await s.sync()
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())
        await asyncio.sleep(0.1)
        out.append(await s.snapshot_if_due())  # idle again
        await s.close(5)
        return out

    assert await go() == [False, True, False]
    snaps = sorted((tmp_path / "replica").glob("generations/*/snapshots/*.snap"))
    assert len(snaps) == 2


async def test_spool_is_pruned_once_shipped_and_restart_resumes(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))

    async def run_once(n: int) -> tuple[str | None, int]:
        s = service(tmp_path, snapshot_interval=3600)
        await s.open()
        commit(tmp_path / "app.db", n)
        await s.sync()
        for r in s.replicas:
            await r.sync()
        await s.prune_spool()
        gen = s.db.generation
        await s.close(5)
        return gen, s.db.txid

    gen1, txid1 = await run_once(5)
    spool = tmp_path / ".app.db-replicator" / "generations"
    left = list(spool.glob("*/*/*"))
    assert len(left) == 1, "only the resume point stays in the spool"
    gen2, txid2 = await run_once(4)
    assert gen2 == gen1 and txid2 == txid1 + 4
    # the restart found the generation's snapshot on the replica: no second snapshot
    assert len(list((tmp_path / "replica").glob("generations/*/snapshots/*.snap"))) == 1


async def test_what_a_destination_holds_is_kept_only_for_the_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long generation: after each prune, a destination's known holdings are those of the
    objects still spooled (not one key per object ever shipped), its newest txid stays, and
    nothing is shipped twice or asked again."""
    monkeypatch.setattr(pageindex, "INDEX_SAVE_SECONDS", 0.0)  # a restart replays nothing
    db = tmp_path / "app.db"

    async def go() -> None:
        s, r = await shipping(tmp_path)
        gen = s.db.generation
        assert gen is not None
        shipped = 0
        for _ in range(4):
            for _ in range(15):
                commit(db, 1)
                await s.sync()
                shipped += await r.sync()
            await s.sync()  # a step with nothing new saves the page index
            await s.prune_spool()
            spooled = {o.key for o in s.spool.objects(gen)}
            assert r.holdings.keys[gen] <= spooled
            assert len(spooled) <= 2, "the spool was pruned"
            assert r.holdings.newest_txid(gen) == s.db.txid
        assert shipped == 60  # one segment a commit, none shipped again after a trim
        assert await r.pending() == []
        commit(db, 3)
        await s.sync()
        assert await r.sync() == 1
        rep = service_status(s)
        assert rep["replicas"][0]["generation"] == gen
        assert rep["replicas"][0]["txid"] == s.db.txid
        await s.close(5)

    await go()
    from util import restore, seqs

    restore(str(tmp_path / "replica"), tmp_path / "out.db")
    assert seqs(tmp_path / "out.db") == list(range(1, 64))


async def test_a_replica_finds_what_it_lacks_from_the_spools_feed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    s, r = await shipping(tmp_path)
    walks = 0
    walk = s.spool.all_objects

    def counted() -> list[ObjectInfo]:
        nonlocal walks
        walks += 1
        return walk()

    monkeypatch.setattr(s.spool, "all_objects", counted)
    for _ in range(10):
        commit(db, 1)
        await s.sync()
        assert await r.sync() == 1
    assert walks == 0, "each sync looked only at what was written since the last"
    await captured(s, db, 2)
    lacking = await r.pending()
    assert [o.end_txid for o in lacking] == [s.db.txid - 1, s.db.txid]
    s.spool.delete(lacking[:1])  # gone from the spool before it was shipped: not asked for
    assert await r.pending() == lacking[1:]
    assert await r.pending(remote=False) == lacking[1:]
    r._relist = True  # the destination is listed again: the spool is walked once
    assert await r.pending() == lacking[1:]
    assert walks == 1
    assert await r.sync() == 1
    assert await r.pending() == []
    assert walks == 1
    await s.close(5)


async def test_a_spool_feed_keeps_shipping_order_or_says_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    s, _ = await shipping(tmp_path)
    feed = s.spool.follow()
    await captured(s, db, 3)
    assert s.spool.fed_more(feed, 2) and not s.spool.fed_more(feed, 3)
    written = s.spool.take(feed, [])
    assert written is not None and len(written) == 3
    assert written == sorted(written) == s.spool.objects(written[0].generation)[-3:]
    assert s.spool.take(feed, written) == written, "nothing new"
    cold = Spool(s.spool.root)  # its index not read yet: a take reads no file
    assert cold.take(cold.follow(), written) is None and not cold.indexed
    # an object before the last one listed, which a walk did not see: a walk is needed
    late = s.spool.follow()
    await captured(s, db, 1)
    newest = s.spool.objects(written[0].generation)[-1]
    assert s.spool.take(late, [*written, newest]) == [*written, newest], "seen by the walk"
    feed2 = s.spool.follow()
    await captured(s, db, 2)
    y = s.spool.objects(written[0].generation)[-1]
    assert s.spool.take(feed2, [y]) is None, "one before y that was not listed"
    # a feed nobody takes from stops growing and says so
    monkeypatch.setattr("replicator.spool.FEED_MAX", 2)
    idle = s.spool.follow()
    await captured(s, db, 3)
    assert len(idle.written) <= 2
    assert s.spool.fed_more(idle, 3), "broken: more than it holds"
    assert s.spool.take(idle, []) is None
    assert s.spool.take(idle, []) == [], "whole again after a take"
    s.spool.unfollow(idle)
    await captured(s, db, 1)
    assert idle.written == []
    await s.close(5)


def linked_here(r: Replica, spooled: str, info: ObjectInfo) -> bool:
    """Whether the replica's directory holds ``info`` as a link to the spooled file."""
    there = Path(r.client.root, *info.key.split("/"))  # type: ignore[attr-defined]
    return there.exists() and there.stat().st_ino == os.stat(spooled).st_ino


async def test_a_caught_up_local_replica_gets_each_commit_in_the_capture_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    s, r = await shipping(tmp_path)
    r.wake.clear()  # its round ran: what run() leaves
    shipped = r.shipped_transactions
    for _ in range(3):
        commit(db, 1)
        res = await s.sync()
        assert len(res.objects) == 1
        info = res.objects[0]
        assert linked_here(r, s.spool.path(info), info)
        assert r.holdings.holds(info) and not r.wake.is_set(), "no round needed"
        assert r.lag == 0 and r.healthy
    assert r.shipped_transactions == shipped + 3
    assert await r.sync() == 0 and await r.pending() == []

    # an object waits for a round (its wake-up not handled yet): the next one goes in order
    commit(db, 1)
    r.wake.set()
    first = (await s.sync()).objects[0]
    r.wake.clear()
    commit(db, 1)
    second = (await s.sync()).objects[0]
    assert r.wake.is_set() and not r.holdings.holds(first) and not r.holdings.holds(second)
    assert await r.sync() == 2
    r.wake.clear()

    # a link that fails is left to the round, which reports what fails
    real = r.client.link_now  # type: ignore[attr-defined]
    calls = 0

    def once(items: list[tuple[ObjectInfo, str]]) -> list[int] | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(errno.EIO, "injected")
        return real(items)  # type: ignore[no-any-return]

    monkeypatch.setattr(r.client, "link_now", once)
    commit(db, 1)
    info = (await s.sync()).objects[0]
    assert r.wake.is_set() and not r.holdings.holds(info) and not r._round.locked()
    assert await r.sync() == 1 and r.holdings.holds(info) and calls == 2
    r.wake.clear()

    # a step that fails gives the replica back
    def broken() -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(s.db, "step", broken)
    with pytest.raises(OSError):
        await s.sync()
    assert not r._round.locked()
    monkeypatch.undo()
    await s.close(5)
    out = tmp_path / "out.db"
    from util import restore, seqs

    restore(str(tmp_path / "replica"), out)
    assert seqs(out) == seqs(db)


async def test_a_round_waits_for_the_capture_step_its_replica_is_lent_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "app.db"
    s, r = await shipping(tmp_path)
    r.wake.clear()
    go = threading.Event()
    step = s.db.step

    def held() -> object:
        go.wait(30)
        return step()

    monkeypatch.setattr(s.db, "step", held)
    commit(db, 1)
    capture = asyncio.ensure_future(s.sync())
    await until(lambda: r._round.locked(), "the replica is lent")
    rnd = asyncio.ensure_future(r.sync())
    await asyncio.sleep(0.2)
    assert not rnd.done(), "a round waits while the step may link"
    go.set()
    res = await capture
    assert await rnd == 0, "the step linked it: nothing left for the round"
    assert r.holdings.holds(res.objects[0])
    await s.close(5)


async def test_final_sync_drains_a_backlog(tmp_path: Path) -> None:
    init_db(str(tmp_path / "app.db"))

    async def go() -> int:
        s = service(tmp_path, Tuning(segment_max_frames=8, step_batches=2))
        await s.open()
        commit(tmp_path / "app.db", 200)  # far more than one step captures
        await s.close(30)
        return s.db.txid

    assert await go() == 200
    out = tmp_path / "out.db"
    from util import restore, seqs

    restore(str(tmp_path / "replica"), out)
    assert seqs(out) == list(range(1, 201))


async def test_busy_writer_wal_resets_are_proven_without_a_new_generation(tmp_path: Path) -> None:
    """A writer in another process committing 3000 transactions a second (no busy timeout)
    beside the running service: the WAL keeps resetting (the replicator never holds it), every
    reset is proven continuous (one generation from start to end), and the restore holds every
    commit."""
    from util import commit_log, restore, seqs, start_writer

    db = tmp_path / "app.db"
    init_db(str(db))

    async def go() -> tuple[str | None, str | None, set[int], int]:
        s = service(tmp_path)
        await s.open()
        first = s.db.generation
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run(stop))
        writer = start_writer(db, tmp_path / "commits.log", "--duration", "4", "--rate", "3000")
        salts: set[int] = set()
        while writer.poll() is None:
            await asyncio.sleep(0.005)
            salt = wal_salt1(tmp_path / "app.db-wal")
            if salt is not None:
                salts.add(salt)
        _, err = writer.communicate()
        assert writer.returncode == 0, err
        stop.set()
        await runner
        await s.close(30)
        return first, s.db.generation, salts, s.db.checkpoints.get("ok", 0)

    first, last, salts, _ = await go()
    assert first is not None and last == first
    assert len(salts) >= 3, "the WAL was never reset under a flat-out writer"
    out = tmp_path / "out.db"
    restore(str(tmp_path / "replica"), out)
    assert seqs(out) == [c[0] for c in commit_log(tmp_path / "commits.log")]


def wal_salt1(path: Path) -> int | None:
    """salt-1 of a WAL file's header (it changes at every reset), None if there is none."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(32)
        if len(head) == 32:
            return int.from_bytes(head[16:20], "big")
    return None


async def test_follows_a_busy_wal_without_file_events_then_rearms_them(tmp_path: Path) -> None:
    """While commits keep coming the loop follows the WAL with file events off; once it is
    quiet they are back on, and a lone commit is captured at once (the 30 s timer backstop
    plays no part)."""
    from replicator.replicator import FOLLOW_QUIET

    db = tmp_path / "app.db"
    init_db(str(db))

    async def go() -> tuple[bool, bool, float]:
        s = service(tmp_path, monitor_interval=30.0)
        await s.open()
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run(stop))
        await asyncio.sleep(0.2)
        assert s._watcher is not None
        armed_at_rest = not s._watcher.paused
        paused_seen = False
        for _ in range(40):
            await asyncio.to_thread(commit, db, 5)
            await asyncio.sleep(0.005)
            paused_seen = paused_seen or s._watcher.paused
        await asyncio.sleep(FOLLOW_QUIET + 0.5)
        assert not s._watcher.paused, "file events were not re-armed once quiet"
        before = s.db.txid
        t0 = asyncio.get_running_loop().time()
        await asyncio.to_thread(commit, db, 1)
        while s.db.txid == before:
            await asyncio.sleep(0.001)
            assert asyncio.get_running_loop().time() - t0 < 10, "the lone commit was missed"
        took = asyncio.get_running_loop().time() - t0
        stop.set()
        await runner
        await s.close(10)
        return armed_at_rest, paused_seen, took

    armed_at_rest, paused_seen, took = await go()
    assert armed_at_rest and paused_seen
    assert took < 10  # captured on its file event; the backstop would take 30 s


async def test_segments_past_the_compression_budget_are_stored_when_they_do_not_compress(
    tmp_path: Path,
) -> None:
    """Segments are compressed within the budget, and past it while frames compress; past it
    after frames that did not, they are stored as they are. Each compressed one is measured.
    All restore the same."""
    from util import restore, seqs

    from replicator.coding import Coding

    db = tmp_path / "app.db"
    init_db(str(db))
    spool = tmp_path / ".app.db-replicator"

    async def go(
        n: int, tuning: Tuning = DEFAULT_TUNING, ratio: float | None = None,
    ) -> tuple[int, Coding]:
        s = service(tmp_path, tuning)
        await s.open()
        coding = s.db.capture.coding
        coding.ratio = ratio
        before = set(spool.glob("generations/*/wal/*.seg"))
        commit(db, n)
        await s.sync()
        new = set(spool.glob("generations/*/wal/*.seg")) - before
        await s.close(10)
        return max(p.stat().st_size for p in new), coding

    packed, _ = await go(100)
    past = Tuning(compress_budget=0)
    stored, coding = await go(100, past, ratio=1.0)
    # about 100 frames of 4 KiB each, mostly zeros: stored is their size, packed far less
    assert stored > 100 * 4096 > 10 * packed
    assert coding.ratio == 1.0  # stored: nothing learned
    past_packed, coding = await go(100, past)
    assert 10 * past_packed < 100 * 4096
    assert coding.ratio is not None and coding.ratio < 0.1  # measured as it was written
    out = tmp_path / "out.db"
    restore(str(tmp_path / "replica"), out)
    assert seqs(out) == list(range(1, 301))


async def test_remote_replica_ships_consecutive_segments_as_one_object(tmp_path: Path) -> None:
    """A destination that pays per request gets each run of consecutive spooled segments as one
    object (a file replica gets them one by one, linked); runs break where the WAL restarts.
    Restores from both are equal to the source, and a restarted shipper sees the merged parts as
    shipped."""
    from util import seqs

    from replicator.headers import SegmentHeader
    from replicator.restore import apply_plan, plan_restore

    db = tmp_path / "app.db"
    init_db(str(db))
    # a WAL restart every few commits; a first compaction window of a day, so that only the
    # restarts break the runs (a run spans no two first-level windows)
    cfg = DbConfig(path=str(db), checkpoint_pages=8, compaction_levels=(86400.0,),
                   replicas=[ReplicaConfig("local", str(tmp_path / "replica")),
                             ReplicaConfig("remote", "memory://")])

    async def go() -> None:
        s = DatabaseService(cfg)
        await s.open()  # the snapshot is spooled
        local, remote = s.replicas
        for _ in range(12):
            commit(db, 2)
            await s.sync()  # a segment each (and WAL restarts)
        gen = s.db.generation
        assert gen is not None
        segments = [o for o in s.spool.objects(gen) if o.kind == "wal"]
        headers = [s.spool.read_header(o) for o in segments]
        starts = [h.start.frame for h in headers if isinstance(h, SegmentHeader)]
        runs = sum(1 for i, f in enumerate(starts) if i == 0 or f == 0)
        assert len(segments) >= 12 and 1 < runs < len(segments)
        assert await local.sync() == 1 + len(segments)
        assert await remote.sync() == 1 + runs  # the snapshot, then one object per WAL epoch
        wal = [o for o in await remote.client.objects(gen) if o.kind == "wal"]
        assert len(wal) == runs and wal[0].start_txid == 1 and wal[-1].end_txid == 24
        assert all(a.end_txid + 1 == b.start_txid for a, b in itertools.pairwise(wal))
        again = Replica("remote", remote.client, s.spool, s.cfg.name)
        assert await again.pending() == []
        for name, client in (("local", local.client), ("remote", remote.client)):
            plan = await plan_restore(client)
            await apply_plan(client, plan, str(tmp_path / f"{name}.db"))
        await s.close(10)

    await go()
    assert seqs(tmp_path / "local.db") == seqs(tmp_path / "remote.db") == seqs(db)
    assert seqs(db) == list(range(1, 25))


async def test_housekeeping_waits_while_the_capture_follows_a_busy_writer(
        tmp_path: Path) -> None:
    """While the loop follows a busy writer, a snapshot due for WAL volume and a spool prune
    wait for the writer's pause, but not beyond their limit; a snapshot a destination needs
    does not wait."""
    db = tmp_path / "app.db"
    init_db(str(db))

    async def go() -> None:
        s = service(tmp_path, snapshot_interval=3600, snapshot_wal_factor=0.5)
        s.schedule.wal_snapshot_min = 0
        s.schedule.wal_snapshot_duty = 1.0  # no spacing after a snapshot (not tested here)
        await s.open()
        commit(db, 200, payload=500)
        await s.sync()
        s.following = True
        assert not await s.snapshot_if_due()  # due for WAL volume, put off
        s.following = False
        assert await s.snapshot_if_due()  # the writer paused
        def wal_is(times: float) -> None:
            """Make the WAL captured since the last snapshot ``times`` the volume due."""
            sched = s.schedule
            s.cfg.snapshot_wal_factor = (
                sched._wal_since_snapshot / max(sched._db_size, 1) / times)

        commit(db, 200, payload=500)
        await s.sync()
        s.following = True
        s.schedule.deferral.limit = 0.0
        wal_is(WAL_SNAPSHOT_DEFER_VOLUME * 2)
        assert await s.snapshot_if_due()  # put off for as long as it may be
        # a writer whose WAL grows no faster than the database (a bulk load) is put off past
        # that limit, until its WAL reaches WAL_SNAPSHOT_DEFER_VOLUME times what made it due
        commit(db, 200, payload=500)
        await s.sync()
        wal_is(WAL_SNAPSHOT_DEFER_VOLUME / 2)
        assert not await s.snapshot_if_due()
        wal_is(WAL_SNAPSHOT_DEFER_VOLUME * 2)
        assert await s.snapshot_if_due()
        s.schedule.deferral.limit = 3600.0
        s.replicas[0].needs_snapshot = True
        assert await s.snapshot_if_due()  # a destination needs it: at once
        await s.close(10)

    await go()


async def test_a_prune_waits_for_the_writers_pause_within_its_limit() -> None:
    pruned: list[float] = []
    busy = [True]

    async def prune() -> int:
        pruned.append(asyncio.get_running_loop().time())
        return PRUNE_FEW

    waits = PruneSchedule(prune, 0.01, lambda: busy[0], defer=3600.0)
    waits.soon()
    await asyncio.sleep(0.1)
    assert pruned == []  # the capture is busy
    busy[0] = False
    await asyncio.sleep(0.1)
    assert len(pruned) == 1  # the writer paused
    bounded = PruneSchedule(prune, 0.01, lambda: True, defer=0.05)
    bounded.soon()
    await asyncio.sleep(0.3)
    assert len(pruned) == 2  # busy all along, but put off no longer than its limit
    await waits.stop()
    await bounded.stop()


async def test_a_prune_that_dropped_few_objects_waits_longer_for_the_next() -> None:
    """A database committing now and then is not pruned after every commit: after a prune
    that dropped fewer than PRUNE_FEW objects the next waits ``slow``; after one that dropped
    many, ``every``."""
    pruned: list[float] = []
    drops = [PRUNE_FEW, 0, PRUNE_FEW, 0]

    async def prune() -> int:
        pruned.append(asyncio.get_running_loop().time())
        return drops[len(pruned) - 1]

    s = PruneSchedule(prune, 0.01, slow=0.5)

    async def one() -> None:
        s.soon()
        task = s._slot.task
        assert task is not None
        await task

    for _ in range(3):
        await one()
    assert pruned[1] - pruned[0] < 0.3  # the first dropped many: ``every``
    assert pruned[2] - pruned[1] >= 0.5  # the second dropped none: ``slow``
    await one()
    assert pruned[3] - pruned[2] < 0.3
    await s.stop()


async def test_retention_after_a_snapshot_does_not_hold_up_shipping(tmp_path: Path) -> None:
    """In the shipping loop the retention policy runs beside shipping: a destination held by
    another maintenance step (a compaction) still receives the objects that follow a snapshot;
    the retention runs once it is free."""
    db = tmp_path / "app.db"

    async def go() -> None:
        s, r = await shipping(tmp_path)
        async with r._maintenance:  # as a compaction step holds it
            await s.snapshot_now()
            commit(db, 3)
            await s.sync()
            assert await asyncio.wait_for(r.sync(beside=True), 10) == 2
            retaining = r._retaining.task
            assert retaining is not None and not retaining.done()
        await asyncio.wait_for(retaining, 10)
        assert r.last_error is None
        await s.close(10)

    await go()
    snaps = sorted((tmp_path / "replica").glob("generations/*/snapshots/*.snap"))
    assert len(snaps) == 2


async def test_a_bulk_writer_is_followed_in_larger_steps(tmp_path: Path) -> None:
    """While the loop follows a writer, it looks again after FOLLOW_POLL when the last look
    found a few commits, and after FOLLOW_POLL_BULK when the last two found FOLLOW_BULK bytes
    or more each (fewer, larger segments); everything committed is captured either way."""
    from replicator.replicator import FOLLOW_BULK, FOLLOW_POLL, FOLLOW_POLL_BULK
    from replicator.watcher import FileEvents, Watcher

    db = tmp_path / "app.db"
    init_db(str(db))

    async def go() -> None:
        s = service(tmp_path, snapshot_interval=3600)
        await s.open()
        w = Watcher(str(db), s.wake, FileEvents())
        w.start()
        w.pause()
        before = s.db.txid
        seqs = commit(db, 1)
        await s.sync()
        assert s._wait_for(w, 0.0) == FOLLOW_POLL
        for looks in (1, 2):
            seqs += commit(db, FOLLOW_BULK // 2000 + 1, payload=4000)
            while (await s.sync()).more:
                pass
            want = FOLLOW_POLL_BULK if looks == 2 else FOLLOW_POLL  # a backlog caught up once
            assert s._wait_for(w, 0.0) == want
        seqs += commit(db, 1)
        await s.sync()
        assert s._wait_for(w, 0.0) == FOLLOW_POLL
        assert s.db.txid - before == len(seqs)
        w.stop()
        await s.close(10)

    await go()


async def test_while_following_commits_are_stamped_when_seen_between_looks(
        tmp_path: Path) -> None:
    """While the loop follows a writer, the wal-index is read between its looks too: a commit
    made long before the next look is stamped with a moment before that look (and not before
    the commit); once it stops following, only a look sees commits."""
    import time

    db = tmp_path / "app.db"
    init_db(str(db))

    async def stamp_after_pause(follow: bool) -> tuple[int, int, int]:
        s.following = False
        if follow:
            s.follower.follow(True, None)
        before = time.time_ns()
        commit(db, 1)
        await asyncio.sleep(0.3)
        looked = time.time_ns()
        await s.sync()
        s.follower.follow(False, None)
        return before, s.db.progress.last_observed_ns, looked

    s = service(tmp_path, snapshot_interval=3600)
    await s.open()
    try:
        before, seen, looked = await stamp_after_pause(True)
        assert before <= seen < looked
        before, seen, looked = await stamp_after_pause(False)
        assert seen >= looked
    finally:
        await s.close(10)


async def test_a_commit_between_opening_and_watching_wakes_the_backstop(
        tmp_path: Path) -> None:
    """A commit after the opening's step and before the file watch starts has no file event:
    the backstop compares the files with how that step saw them (when it found everything
    captured), or wakes the capture at its first look; it never takes such a commit for the
    state it starts from."""
    db = tmp_path / "app.db"
    init_db(str(db))
    s = service(tmp_path, snapshot_interval=3600)
    await s.open()
    commit(db, 1)
    s.wake.clear()
    try:
        s.runtime.watch(s.cfg.path, s.wake, 0.01, s._looked)
        await asyncio.wait_for(s.wake.wait(), 10)
        res = await s.sync()
        assert res.transactions == 1
    finally:
        s.runtime.unwatch(s.cfg.path)
        await s.close(5)


async def test_the_backstop_wakes_for_changes_since_the_capture_looked_only(
        tmp_path: Path) -> None:
    """The stat backstop compares the files with how the last step that captured everything
    saw them: a commit already captured wakes nothing more; one not captured yet does."""
    db = tmp_path / "app.db"
    init_db(str(db))
    s = service(tmp_path, snapshot_interval=3600)
    await s.open()
    started = finished = 0
    tick = s.runtime.tick
    ended = asyncio.Event()

    async def counted() -> int:
        nonlocal started, finished
        started += 1
        try:
            return await tick()
        finally:
            finished += 1
            ended.set()

    async def looks(n: int) -> None:
        """Wait for ``n`` looks that start from now to finish (one runs at a time)."""
        goal = started + n + 1  # and the one that may be running now
        while finished < goal:
            ended.clear()
            await asyncio.wait_for(ended.wait(), 10)

    s.runtime.tick = counted  # type: ignore[method-assign]
    try:
        s.runtime.watch(s.cfg.path, s.wake, 0.01)  # its ticker looks every few milliseconds
        await looks(1)
        for _ in range(3):
            commit(db, 1)
            res = await s.sync()
            assert res.transactions == 1 and res.looked is not None
            await looks(0)  # a look at the files between the commit and the capture's wakes it
            s.wake.clear()
            await looks(3)
            assert not s.wake.is_set()
        commit(db, 1)  # not captured
        await asyncio.wait_for(s.wake.wait(), 10)
    finally:
        s.runtime.unwatch(s.cfg.path)
        await s.close(5)


async def test_a_file_event_the_last_step_saw_needs_no_step(tmp_path: Path) -> None:
    """A file event handled before the capture step looked at the files (which then showed
    everything captured) needs no further step; one handled after it does, and so does any
    other wake-up."""
    from replicator.watcher import Watcher

    db = tmp_path / "app.db"
    init_db(str(db))
    s = service(tmp_path, snapshot_interval=3600)
    await s.open()
    watcher = Watcher(s.cfg.path, s.wake, s.runtime.events)  # not started: never paused
    try:
        assert s.seen_already(watcher) is False  # what open() set counts as another wake-up
        commit(db, 1)
        s.wake.clear()
        s.wake.file_event(time.monotonic())  # the commit's event, handled before the step
        await s.sync()
        assert s.seen_already(watcher) is True
        commit(db, 1)
        await s.sync()
        s.wake.file_event(time.monotonic())  # handled after the step's look
        assert s.seen_already(watcher) is False
        commit(db, 1)
        s.wake.file_event(time.monotonic())
        await s.sync()
        s.wake.set()  # and something else (a destination that needs a snapshot, say)
        assert s.seen_already(watcher) is False
        s.wake.file_event(time.monotonic() - 60)
        assert s.seen_already(watcher) is True  # the other wake-up was counted already
    finally:
        await s.close(5)


async def test_health_checks_and_maintenance_wait_on_a_timer_not_a_task(tmp_path: Path) -> None:
    """A running service's health checks run again as they fall due, and neither they nor the
    maintenance tasks hold an asyncio task while they wait (a thousand parked databases would
    hold two thousand); stopping the service closes the checks' connection."""
    from replicator.health import IntegrityCheck, SizeCheck

    init_db(str(tmp_path / "app.db"))
    cfg = DbConfig(path=str(tmp_path / "app.db"),
                   replicas=[ReplicaConfig("local", str(tmp_path / "replica"))],
                   snapshot_interval=3600)
    cfg.health = [SizeCheck("size", max_bytes=1 << 30, interval=0.1),
                  IntegrityCheck(quick=True, interval=3600)]
    s = DatabaseService(cfg)
    assert s.health is not None and s.maintainer.tasks  # PRAGMA optimize, by default
    await s.open()
    stop = asyncio.Event()
    runner = asyncio.create_task(s.run(stop))
    seen: set[int] = set()

    def ran_thrice() -> bool:
        assert s.health is not None
        result = s.health.last_results.get("size")
        if result is not None:
            seen.add(id(result))
        return len(seen) >= 3

    await until(ran_thrice, "the size check to run again as it fell due", within=20)
    assert s.health.last_results["integrity"].ok
    waiting = [t.get_coro() for t in asyncio.all_tasks()]
    names = [getattr(c, "__qualname__", "") for c in waiting]
    assert not [n for n in names if n.startswith(("HealthChecker.", "Maintainer."))], names
    stop.set()
    await asyncio.wait_for(runner, 30)
    await s.close(30)
    assert s.health._conn is None


async def test_the_wal_index_says_whether_anything_was_committed_since_the_last_step(
        tmp_path: Path) -> None:
    """``unchanged()`` (the loop's cheap look while it follows a writer) is true only while
    the wal-index shows nothing past what the last step captured in full."""
    db = tmp_path / "app.db"
    s, _ = await shipping(tmp_path)
    try:
        commit(db, 1)
        await s.sync()
        assert s.db.unchanged()
        commit(db, 1)
        assert not s.db.unchanged()  # committed since the step
        await s.sync()
        assert s.db.unchanged()
        s.db._settled = None  # a step that left work (a backlog, a rotation, a proof)
        assert not s.db.unchanged()
    finally:
        await s.close(5)


async def test_looks_while_following_run_a_step_only_for_a_commit(tmp_path: Path) -> None:
    """A writer committing every 25 ms (another process) is followed with looks every few
    milliseconds; a look that finds no commit in the wal-index runs no capture step, and every
    commit is still captured."""
    from replicator.following import FOLLOW_POLL

    db, log_path = tmp_path / "app.db", tmp_path / "writer.log"
    init_db(str(db))
    s = service(tmp_path, snapshot_interval=3600, monitor_interval=30.0)
    await s.open()
    steps, real_step = 0, s.db.step

    def counted() -> object:
        nonlocal steps
        steps += 1
        return real_step()

    s.db.step = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    runner = asyncio.create_task(s.run(stop))
    try:
        await asyncio.sleep(0.2)
        n, rate, base = 60, 40.0, s.db.txid
        writer = start_writer(db, log_path, "--count", str(n), "--rate", str(rate))
        _, err = await asyncio.to_thread(writer.communicate, timeout=60)
        assert writer.returncode == 0, err
        await until(lambda: s.db.txid == base + n, "every commit captured", 10)
        seconds = n / rate
        # about seconds / FOLLOW_POLL looks while following (each a step before): a step per
        # commit and a few around the starts and ends of following
        assert seconds / FOLLOW_POLL > 4 * n
        assert steps < 2 * n, f"{steps} capture steps for {n} commits"
    finally:
        stop.set()
        await runner
        await s.close(10)
