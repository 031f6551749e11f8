"""Several block stores with replicated placement (issue 13, item 1): the
ring, the batch calls, and ``BlockClient`` over the simulated network
(stores down, corrupt copies, bad hashes, repair)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from client.blocks import BlockClient
from surfshard import errors
from surfshard.blocks.ring import BlockRing
from surfshard.blocks.store import BlockStore, blockstore_methods
from surfshard.testing.simrpc import SimRpcNetwork, resolve
from tests.test_blockstore import damage


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RingTests(SynchronousTestCase):
    def test_placement_is_distinct_stores_in_walk_order(self) -> None:
        ring = BlockRing(["a", "b", "c", "d"], 2)
        for i in range(200):
            block = h(b"%d" % i)
            walk = ring.candidates(block)
            self.assertEqual(sorted(walk), ["a", "b", "c", "d"])
            self.assertEqual(ring.placement(block), walk[:2])
        self.assertEqual(BlockRing(["a", "b"], 2).replicas, 2)
        self.assertRaises(ValueError, BlockRing, ["a", "b"], 3)
        self.assertRaises(ValueError, BlockRing, ["a", "a"], 1)

    def test_an_even_spread_and_a_new_store_moves_about_a_share(self) -> None:
        blocks = [h(b"block %d" % i) for i in range(20_000)]
        three = BlockRing(["s1", "s2", "s3"], 1)
        counts: dict[str, int] = {}
        for b in blocks:
            counts[three.placement(b)[0]] = counts.get(three.placement(b)[0], 0) + 1
        for store, n in counts.items():
            self.assertLess(abs(n / len(blocks) - 1 / 3), 0.06, (store, counts))
        four = BlockRing(["s1", "s2", "s3", "s4"], 1)
        moved = sum(three.placement(b) != four.placement(b) for b in blocks) / len(blocks)
        # About 1/4 move (to the new store), none between the old ones.
        self.assertLess(abs(moved - 0.25), 0.06, moved)
        self.assertTrue(
            all(four.placement(b)[0] == "s4" for b in blocks if three.placement(b) != four.placement(b))
        )

    def test_block_store_map(self) -> None:
        ring = BlockRing(["a", "b", "c"], 2)
        blocks = [h(b"x"), h(b"y")]
        where = ring.map(blocks)
        self.assertEqual(sum(len(v) for v in where.values()), 4)
        for b in blocks:
            self.assertEqual(sorted(s for s, hs in where.items() if b in hs), sorted(ring.placement(b)))


class Stores:
    """Three block stores and a client on a simulated network."""

    def __init__(self, test: SynchronousTestCase, replicas: int = 2) -> None:
        self.clock = Clock()
        self.net = SimRpcNetwork(self.clock, seed=7)
        self.addresses = ["store:1", "store:2", "store:3"]
        self.stores = {
            a: BlockStore(test.mktemp(), fsync=False, clock=self.clock.seconds) for a in self.addresses
        }
        for a, store in self.stores.items():
            self.net.register(a, blockstore_methods(store))
        self.client = BlockClient(None, self.net.pool("client"), ring=BlockRing(self.addresses, replicas))  # type: ignore[arg-type]

    def run(self, d: Any) -> tuple[bool, Any]:
        for _ in range(3000):  # bounded: 30 simulated seconds
            if d.called:
                break
            self.clock.advance(0.01)
        return resolve(d)

    def holders(self, block: str) -> list[str]:
        return sorted(a for a, s in self.stores.items() if s.has([block]))


class BlockClientTests(SynchronousTestCase):
    def blocks(self, n: int, seed: int = 1) -> dict[str, bytes]:
        rng = random.Random(seed)
        out = {}
        for _ in range(n):
            data = rng.randbytes(rng.randrange(1, 5000))
            out[h(data)] = data
        return out

    def test_every_block_on_its_placement_and_read_back(self) -> None:
        s = Stores(self)
        blocks = self.blocks(50)
        ok, sent = s.run(s.client.put(blocks))
        self.assertTrue(ok, sent)
        self.assertEqual(sent, 2 * sum(len(d) for d in blocks.values()))
        # Stored counts each block once, however many copies went out.
        self.assertEqual(s.client.stored, sum(len(d) for d in blocks.values()))
        for b in blocks:
            self.assertEqual(s.holders(b), sorted(s.client.ring.placement(b)))
        ok, got = s.run(s.client.get(list(blocks)))
        self.assertEqual((ok, got), (True, blocks))
        # Only what a store lacks is sent again.
        ok, sent = s.run(s.client.put(blocks))
        self.assertEqual((ok, sent), (True, 0))
        self.assertEqual(s.client.stored, sum(len(d) for d in blocks.values()))
        # A block one of its stores already holds goes to the other alone:
        # one copy sent, and the block counted once.
        data = b"already on one store"
        s.stores[s.client.ring.placement(h(data))[0]].put(data)
        ok, sent = s.run(s.client.put({h(data): data}))
        self.assertEqual((ok, sent), (True, len(data)))
        self.assertEqual(s.client.stored, sum(len(d) for d in blocks.values()) + len(data))

    def test_a_store_down_loses_no_block_and_repair_puts_copies_back(self) -> None:
        s = Stores(self)
        blocks = self.blocks(40, seed=2)
        s.net.unregister("store:1")  # down while writing
        ok, _ = s.run(s.client.put(blocks))
        self.assertTrue(ok)
        for b in blocks:  # still two copies each, on the stores that were up
            self.assertEqual(len(s.holders(b)), 2)
        self.assertGreater(s.client.misplaced, 0)
        s.net.register("store:1", blockstore_methods(s.stores["store:1"]))
        ok, report = s.run(s.client.repair())
        self.assertTrue(ok, report)
        self.assertGreater(report["copied"], 0)
        for b in blocks:
            self.assertTrue(set(s.client.ring.placement(b)) <= set(s.holders(b)))
        # Any one store lost: every block still reads.
        for lost in s.addresses:
            s.net.unregister(lost)
            ok, got = s.run(s.client.get(list(blocks)))
            self.assertEqual((ok, got), (True, blocks), lost)
            s.net.register(lost, blockstore_methods(s.stores[lost]))

    def test_repair_says_what_it_could_not_do(self) -> None:
        s = Stores(self)
        blocks = self.blocks(30, seed=3)
        s.net.unregister("store:1")
        ok, _ = s.run(s.client.put(blocks))
        self.assertTrue(ok)
        # Still down: nothing can be put back there, and the report says so
        # (it said "copied 0" and nothing else, as if all were in place).
        ok, report = s.run(s.client.repair())
        self.assertTrue(ok, report)
        self.assertEqual((report["copied"], report["unreachable"]), (0, ["store:1"]))
        s.net.register("store:1", blockstore_methods(s.stores["store:1"]))
        ok, report = s.run(s.client.repair())
        self.assertEqual((report["unreachable"], report["unreadable"]), ([], 0), report)
        self.assertGreater(report["copied"], 0)
        # A block whose only copy is corrupt, on a store outside its
        # placement: found by the listing, but no good copy to put back.
        data = b"only one bad copy"
        outside = next(a for a in s.addresses if a not in s.client.ring.placement(h(data)))
        s.stores[outside].put(data)
        damage(s.stores[outside], h(data))
        ok, report = s.run(s.client.repair())
        self.assertEqual((report["unreadable"], report["unreachable"]), (2, []), report)
        self.flushLoggedErrors()

    def test_a_corrupt_copy_is_reported_and_another_read(self) -> None:
        s = Stores(self)
        data = b"precious bytes"
        ok, _ = s.run(s.client.put({h(data): data}))
        first = s.client.ring.placement(h(data))[0]
        damage(s.stores[first], h(data))
        ok, got = s.run(s.client.get([h(data)]))
        self.assertEqual((ok, got), (True, {h(data): data}))
        # The bad copy is dropped, so a repair puts a good one back.
        self.assertNotIn(h(data), s.stores[first].list())
        ok, report = s.run(s.client.repair())
        self.assertEqual((ok, report["copied"]), (True, 1), report)
        self.assertEqual(s.stores[first].get(h(data)), data)
        self.flushLoggedErrors()

    def test_a_scrub_finds_bad_copies_nobody_read_and_puts_good_ones_back(self) -> None:
        s = Stores(self)
        blocks = self.blocks(30, seed=5)
        ok, _ = s.run(s.client.put(blocks))
        self.assertTrue(ok)
        names = sorted(blocks)
        bad = {}  # block -> the store whose copy is damaged
        for i, b in enumerate(names[:6]):
            bad[b] = s.client.ring.placement(b)[i % 2]
            damage(s.stores[bad[b]], b)
        lost = names[6]  # both copies damaged: nothing can bring it back
        for store in s.client.ring.placement(lost):
            damage(s.stores[store], lost)
        ok, report = s.run(s.client.scrub())
        self.assertTrue(ok, report)
        self.assertEqual(sum(r["checked"] for r in report["stores"].values()), 2 * len(blocks))
        found = {b: store for store, r in report["stores"].items() for b in r["corrupt"] if b != lost}
        self.assertEqual(found, bad)
        self.assertEqual(report["repair"]["copied"], 6)
        self.assertEqual(report["lost"], [lost])
        for b in names[:6]:
            for store in s.client.ring.placement(b):
                self.assertEqual(s.stores[store].get(b), blocks[b])
        ok, error = s.run(s.client.get([lost]))
        self.assertFalse(ok)
        self.assertIn(lost, error.details["blocks"])
        # A second scrub finds nothing more.
        ok, again = s.run(s.client.scrub())
        self.assertEqual(sum(len(r["corrupt"]) for r in again["stores"].values()), 0)
        self.assertEqual(again["lost"], [])
        self.flushLoggedErrors()

    def test_a_block_whose_hash_does_not_match_is_refused(self) -> None:
        s = Stores(self)
        ok, error = s.run(
            s.net.pool("bad").call("store:1", "putblocks", {"blocks": [["0" * 64, b"data"]]}, 5)
        )
        self.assertFalse(ok)
        self.assertIsInstance(error, errors.BadRequest)
        self.assertEqual(s.stores["store:1"].list(), [])
        ok, error = s.run(
            s.net.pool("bad").call("store:1", "putblock", {"data": b"data", "hash": "1" * 64}, 5)
        )
        self.assertIsInstance(error, errors.BadRequest)
        self.failureResultOf(s.client.put({"2" * 64: b"data"}), errors.BadRequest)

    def test_nothing_to_read_says_which_blocks(self) -> None:
        s = Stores(self)
        ok, error = s.run(s.client.get([h(b"never stored")]))
        self.assertFalse(ok)
        self.assertIsInstance(error, errors.Unavailable)
        self.assertIn(h(b"never stored"), error.details["blocks"])

    def test_a_file_is_read_in_order_a_batch_at_a_time(self) -> None:
        s = Stores(self)
        blocks = self.blocks(7, seed=5)
        s.run(s.client.put(blocks))
        order = [*blocks, *list(blocks)[:3]]  # a file may name a block twice
        asked: list[int] = []
        get = s.client.get
        s.client.get = lambda hashes: asked.append(len(hashes)) or get(hashes)  # type: ignore[method-assign]
        out: list[bytes] = []
        ok, size = s.run(s.client.read_file(order, out.append, batch=4))
        self.assertTrue(ok, size)
        self.assertEqual(b"".join(out), b"".join(blocks[x] for x in order))
        self.assertEqual(size, len(b"".join(out)))
        self.assertEqual(asked, [4, 4, 2])
        # A block no store holds: Unavailable naming it, once the batches
        # before it were written.
        out.clear()
        ok, error = s.run(s.client.read_file([*order[:4], h(b"lost")], out.append, batch=4))
        self.assertFalse(ok)
        self.assertIsInstance(error, errors.Unavailable)
        self.assertEqual(error.details["blocks"], [h(b"lost")])
        self.assertEqual(len(out), 4)


class BlockStoreMapTests(SynchronousTestCase):
    def test_getblockstoremap_over_xmlrpc(self) -> None:
        from twisted.web import xmlrpc

        from surfshard.metadata.facade import SurfStoreHandler

        handler = SurfStoreHandler(None)  # type: ignore[arg-type]  # this call needs no replica
        handler.ring = BlockRing(["s1", "s2", "s3"], 2)
        blocks = [h(b"a"), h(b"b")]
        self.assertEqual(
            self.successResultOf(handler.xmlrpc_getblockstoremap(blocks)), handler.ring.map(blocks)
        )
        fault = self.successResultOf(handler.xmlrpc_getblockstoremap(["short"]))
        self.assertIsInstance(fault, xmlrpc.Fault)
        # 64 characters, not hex: refused too, as BAD_REQUEST (not INTERNAL).
        fault = self.successResultOf(handler.xmlrpc_getblockstoremap(["z" * 64]))
        self.assertIn("BAD_REQUEST", str(fault.faultString) + str(fault.faultCode))
        self.assertRaises(errors.BadRequest, handler.ring.map, ["z" * 64])
