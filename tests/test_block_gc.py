"""Collecting the blocks no file names (``surfshard blocks gc``): a store
drops only blocks nothing touched since the cutoff, rewrites packs without
pulling a file from under a read, and the client keeps any block touched on
any store, leaves out stores it cannot reach, and drops nothing when the
listing fails."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from surfshard.blocks import store as store_module
from surfshard.blocks.store import MAX_GC_GRACE, BlockStore, blockstore_methods
from surfshard.net.methods import Access
from tests.test_blocks import Stores
from tests.test_blockstore import damage


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pack_bytes(store: BlockStore) -> int:
    return sum(p.stat().st_size for p in (Path(store.directory) / "packs").iterdir())


class SweepTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock(1000.0)
        self.dir = self.mktemp()
        self.store = BlockStore(self.dir, fsync=False, clock=self.clock)
        self.addCleanup(lambda: self.store.close())

    def test_only_blocks_untouched_since_the_cutoff_go(self) -> None:
        self.clock.now = 1010.0
        old, asked, written = (self.store.put(b"old"), self.store.put(b"asked"), self.store.put(b"written"))
        self.clock.now = 1100.0
        self.store.has([asked])  # a writer about to name it
        self.store.put(b"written")  # stored again: a touch too
        absent = h(b"never stored")
        answer = self.store.sweep([old, asked, written, absent], before=1050.0)
        self.assertEqual(answer, {"removed": [old], "kept": [asked, written], "restarted": False})
        self.assertRaises(errors.BadRequest, self.store.get, old)
        self.assertEqual(self.store.list(), sorted([asked, written]))
        self.assertEqual(self.store.get(asked), b"asked")

    def test_a_dry_run_drops_nothing(self) -> None:
        old = self.store.put(b"old")
        self.clock.now = 2000.0
        self.assertEqual(self.store.sweep([old], before=1500.0, dry_run=True)["removed"], [old])
        self.assertEqual(self.store.get(old), b"old")

    def test_a_store_that_started_after_the_cutoff_keeps_everything(self) -> None:
        old = self.store.put(b"old")
        self.store.close()
        self.clock.now = 5000.0
        self.store = BlockStore(self.dir, fsync=False, clock=self.clock)  # it forgot every touch
        self.clock.now = 5010.0
        answer = self.store.sweep([old], before=4000.0)
        self.assertEqual(answer, {"removed": [], "kept": [old], "restarted": True})
        self.assertEqual(self.store.get(old), b"old")

    def test_bad_cutoffs_are_refused(self) -> None:
        old = self.store.put(b"old")
        for before in (float("nan"), float("inf"), 1001.0, 1000.0 - MAX_GC_GRACE - 1):
            self.assertRaises(errors.BadRequest, self.store.sweep, [old], before)
        self.assertRaises(errors.BadRequest, self.store.sweep, ["x" * 64], 900.0)
        self.assertEqual(self.store.get(old), b"old")

    def test_old_touches_are_forgotten_but_protect_while_they_count(self) -> None:
        kept = self.store.put(b"kept")
        self.clock.now += MAX_GC_GRACE + 10
        other = self.store.put(b"other")  # prunes touches older than any grace
        self.assertNotIn(kept, self.store._touched)
        self.assertIn(other, self.store._touched)


class CompactTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock(1000.0)
        self.dir = self.mktemp()
        self.store = BlockStore(self.dir, fsync=True, clock=self.clock)
        self.addCleanup(lambda: self.store.close())
        self.blocks = {h(bytes([i]) * 1000): bytes([i]) * 1000 for i in range(100)}
        self.store.put_many([[k, v] for k, v in self.blocks.items()])
        self.clock.now = 2000.0

    def test_a_mostly_dead_pack_is_rewritten_and_stays_so_after_a_restart(self) -> None:
        names = sorted(self.blocks)
        dead, live = names[:80], names[80:]
        before = pack_bytes(self.store)
        self.assertEqual(len(self.store.sweep(dead, before=1500.0)["removed"]), 80)
        self.assertEqual(pack_bytes(self.store), before)  # dropped, space not yet back
        report = self.store.compact()
        self.assertEqual((report["packs"], report["moved"]), (1, 20))
        self.assertLess(pack_bytes(self.store), before * 0.3)
        self.assertEqual(report["freed"], before - pack_bytes(self.store))
        self.assertEqual({k: self.store.get(k) for k in live}, {k: self.blocks[k] for k in live})
        self.store.close()
        self.store = BlockStore(self.dir, fsync=False, clock=self.clock)
        self.assertEqual(self.store.list(), live)  # the dropped ones do not come back
        self.assertEqual({k: self.store.get(k) for k in live}, {k: self.blocks[k] for k in live})
        # Nothing dead left: a second compaction rewrites nothing.
        self.assertEqual(self.store.compact()["packs"], 0)

    def test_a_little_dead_is_left_for_later(self) -> None:
        self.store.sweep(sorted(self.blocks)[:5], before=1500.0)
        self.assertEqual(self.store.compact()["packs"], 0)
        self.assertEqual(len(self.store.list()), 95)
        usage = self.store.usage()
        self.assertEqual((usage["blocks"], usage["dead_bytes"]), (95, 5 * (44 + 1000)))
        self.assertEqual(usage["pack_bytes"], 100 * (44 + 1000))

    def test_a_block_stored_again_after_the_drop_survives_the_rewrite(self) -> None:
        names = sorted(self.blocks)
        self.store.sweep(names, before=1500.0)
        again = self.store.put(self.blocks[names[0]])
        self.store.compact()
        self.assertEqual(self.store.list(), [again])
        self.assertEqual(self.store.get(again), self.blocks[again])

    def test_a_corrupt_block_is_not_copied(self) -> None:
        names = sorted(self.blocks)
        bad = names[99]
        damage(self.store, bad)
        self.store.sweep(names[:80], before=1500.0)
        self.store.compact()
        self.assertNotIn(bad, self.store.list())
        self.assertRaises(errors.BadRequest, self.store.get, bad)  # missing now, so read elsewhere
        self.assertEqual(len(self.store.list()), 19)
        self.flushLoggedErrors()

    def test_two_rewrites_at_once_do_not_collide(self) -> None:
        names = sorted(self.blocks)
        self.store.sweep(names[:80], before=1500.0)
        reports: list[Any] = []
        errors_seen: list[BaseException] = []
        # Make both rewrites meet midway if they can: serialized, the first
        # waits out the barrier alone (bounded) and goes on.
        meet = threading.Barrier(2, timeout=0.5)
        real_rewrite = self.store._rewrite

        def rewrite(number: int) -> Any:
            try:
                meet.wait()
            except threading.BrokenBarrierError:
                pass
            return real_rewrite(number)

        self.patch(self.store, "_rewrite", rewrite)

        def run() -> None:
            try:
                reports.append(self.store.compact())
            except BaseException as e:  # reported by the assertion below
                errors_seen.append(e)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        self.assertEqual(errors_seen, [])
        self.assertEqual(sorted(r["packs"] for r in reports), [0, 1])
        self.assertEqual(len(self.store.list()), 20)
        self.assertEqual({k: self.store.get(k) for k in names[80:]}, {k: self.blocks[k] for k in names[80:]})

    def test_a_read_in_progress_keeps_its_file(self) -> None:
        """The pack being rewritten is deleted while a read still has its fd:
        the fd is closed only when that read ends (never reused under it)."""
        names = sorted(self.blocks)
        reading = names[-1]
        in_read, go_on = threading.Event(), threading.Event()
        real_pread = os.pread
        reader_fds: list[int] = []

        def slow_pread(fd: int, n: int, offset: int) -> bytes:
            if threading.current_thread().name == "reader" and not reader_fds:
                reader_fds.append(fd)
                in_read.set()
                go_on.wait(timeout=30)
            return real_pread(fd, n, offset)

        self.patch(store_module.os, "pread", slow_pread)
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(self.store.get(reading)), name="reader")
        reader.start()
        try:
            self.assertTrue(in_read.wait(timeout=30))
            self.store.sweep(names[:80], before=1500.0)
            self.assertEqual(self.store.compact()["packs"], 1)
            os.fstat(reader_fds[0])  # still open: the read holds it
        finally:
            go_on.set()
            reader.join(timeout=30)
        self.assertEqual(got, [self.blocks[reading]])
        self.assertRaises(OSError, os.fstat, reader_fds[0])  # closed once the read ended
        self.assertEqual(self.store.get(reading), self.blocks[reading])


class CollectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.s = Stores(self)
        self.data = {name: name.encode() * 100 for name in ("a1", "a2", "b1", "c1", "r1", "d1")}
        self.hash = {name: h(data) for name, data in self.data.items()}

    def put(self, *names: str) -> None:
        ok, value = self.s.run(self.s.client.put({self.hash[n]: self.data[n] for n in names}))
        self.assertTrue(ok, value)

    def held(self, name: str) -> list[str]:
        """Stores holding the block (listed, which touches nothing)."""
        return sorted(a for a, store in self.s.stores.items() if self.hash[name] in store.list())

    def listing(self, *named: str) -> Any:
        files = {"f1": [2, [self.hash[n] for n in named]], "gone": [3, ["0"]]}
        return lambda: defer.succeed(files)

    def test_unnamed_blocks_go_named_and_recent_ones_stay(self) -> None:
        self.put("a1", "a2", "c1")  # f1 version 1 (a1 a2), a deleted file (c1)
        self.s.clock.advance(100)
        self.put("b1")  # f1 version 2 (b1 a2)
        self.s.clock.advance(100)
        self.put("r1")  # an upload in progress: no file names it yet
        ok, report = self.s.run(self.s.client.collect(self.listing("b1", "a2"), grace=50))
        self.assertTrue(ok, report)
        for name in ("a1", "c1"):
            self.assertEqual(self.held(name), [], name)
        for name in ("a2", "b1", "r1"):
            self.assertEqual(self.held(name), sorted(self.s.client.ring.placement(self.hash[name])), name)
        self.assertEqual(
            (report["files"], report["named"], report["unreachable"]), (1, 2, [])
        )  # the tombstone is no file
        rows = report["stores"].values()
        self.assertEqual(sum(r["removed"] for r in rows), 4)  # two blocks, two copies each
        self.assertEqual(sum(r["kept"] for r in rows), 2)  # r1's two copies
        self.assertTrue(all(r["held"] >= r["unnamed"] >= r["removed"] for r in rows))
        ok, got = self.s.run(self.s.client.get([self.hash["b1"], self.hash["a2"]]))
        self.assertTrue(ok, got)

    def test_a_dry_run_reports_and_drops_nothing(self) -> None:
        self.put("a1", "b1")
        self.s.clock.advance(100)
        ok, report = self.s.run(self.s.client.collect(self.listing("b1"), grace=10, dry_run=True))
        self.assertTrue(ok, report)
        self.assertEqual(sum(r["removed"] for r in report["stores"].values()), 2)
        self.assertEqual(len(self.held("a1")), 2)

    def test_a_block_touched_on_one_store_is_kept_on_every_store(self) -> None:
        self.put("d1")
        self.s.clock.advance(100)
        first, second = self.s.client.ring.placement(self.hash["d1"])
        self.s.stores[first].has([self.hash["d1"]])  # a writer asked one store only
        ok, report = self.s.run(self.s.client.collect(self.listing(), grace=50))
        self.assertTrue(ok, report)
        self.assertEqual(self.held("d1"), sorted([first, second]))

    def test_blocks_a_backup_names_are_kept(self) -> None:
        self.put("a1", "c1")
        self.s.clock.advance(100)
        keep = frozenset({self.hash["a1"]})
        ok, report = self.s.run(self.s.client.collect(self.listing(), grace=10, keep=keep))
        self.assertTrue(ok, report)
        self.assertEqual((report["kept_for_backups"], report["named"]), (1, 1))
        self.assertEqual(len(self.held("a1")), 2)
        self.assertEqual(self.held("c1"), [])

    def test_a_store_out_of_reach_keeps_its_blocks_and_is_named(self) -> None:
        self.put("a1")
        self.s.clock.advance(100)
        down = self.held("a1")[0]
        self.s.net.unregister(down)
        ok, report = self.s.run(self.s.client.collect(self.listing(), grace=10))
        self.assertTrue(ok, report)
        self.assertEqual(report["unreachable"], [down])
        self.assertEqual(self.held("a1"), [down])

    def test_nothing_goes_when_the_listing_fails(self) -> None:
        self.put("a1")
        self.s.clock.advance(100)

        def failing() -> Any:
            return defer.fail(errors.Unavailable("shard 3 is in transit"))

        ok, error = self.s.run(self.s.client.collect(failing, grace=10))
        self.assertFalse(ok)
        self.assertIsInstance(error, errors.Unavailable)
        self.assertEqual(len(self.held("a1")), 2)

    def test_a_grace_out_of_range_is_refused(self) -> None:
        for grace in (-1.0, MAX_GC_GRACE + 1, float("nan")):
            ok, error = self.s.run(self.s.client.collect(self.listing(), grace=grace))
            self.assertFalse(ok)
            self.assertIsInstance(error, errors.BadRequest)


class AccessTests(SynchronousTestCase):
    def test_only_operators_collect(self) -> None:
        table = blockstore_methods(BlockStore(self.mktemp(), fsync=False))
        for name in ("gcclock", "gcsweep", "gccompact", "scrubblocks"):
            method = table.get(name)
            assert method is not None
            self.assertEqual(method.access, (Access.ADMIN,), name)
        # What clients use stays open to them.
        for name in ("putblocks", "hasblocks", "getblocks", "listblocks"):
            method = table.get(name)
            assert method is not None
            self.assertNotIn(Access.ADMIN, method.access, name)


class BadInputTests(SynchronousTestCase):
    """The collection and scrub calls refuse bad arguments with BAD_REQUEST
    before acting, and the store goes on serving."""

    def test_bad_arguments_are_refused(self) -> None:
        from twisted.internet.task import Clock as TwistedClock

        from surfshard.testing.simrpc import SimRpcNetwork, resolve

        clock = TwistedClock()
        store = BlockStore(self.mktemp(), fsync=False, clock=clock.seconds)
        kept = store.put(b"kept")
        clock.advance(100)
        net = SimRpcNetwork(clock, seed=3)
        net.register("store:1", blockstore_methods(store))
        pool = net.pool("admin")

        def call(method: str, args: Any) -> tuple[bool, Any]:
            d = pool.call("store:1", method, args, timeout=5)
            for _ in range(100):
                clock.advance(0.01)
            return resolve(d)

        for method, args in (
            ("gcsweep", {"hashes": "not a list", "before": 1.0}),
            ("gcsweep", {"hashes": ["x"], "before": 1.0}),
            ("gcsweep", {"hashes": [kept] * 10_001, "before": 1.0}),
            ("gcsweep", {"hashes": [kept], "before": "soon"}),
            ("gcsweep", {"hashes": [kept], "before": float("nan")}),
            ("gcsweep", {"hashes": [kept], "before": 1e300}),
            ("gcsweep", {"hashes": [kept]}),
            ("gcsweep", {"hashes": [kept], "before": 1.0, "dry_run": "yes"}),
            ("gcsweep", {"hashes": [kept], "before": 1.0, "extra": 1}),
            ("scrubblocks", {"after": "zz"}),
            ("scrubblocks", {"after": 7}),
            ("gcclock", {"what": 1}),
        ):
            ok, error = call(method, args)
            self.assertFalse(ok, (method, args))
            self.assertIsInstance(error, errors.BadRequest, (method, args))
        self.assertEqual(call("getblock", {"hash": kept}), (True, b"kept"))
        self.assertEqual(store.list(), [kept])
