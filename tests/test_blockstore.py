"""The block store: content addressing, atomic files, bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from surfshard.blocks.store import MAX_BLOCK_BYTES, BlockStore, blockstore_methods
from surfshard.testing.simrpc import SimRpcNetwork, resolve


class BlockStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = BlockStore(self.mktemp(), fsync=False)

    def test_put_get_has(self) -> None:
        h = self.store.put(b"hello")
        self.assertEqual(h, hashlib.sha256(b"hello").hexdigest())
        self.assertEqual(self.store.get(h), b"hello")
        self.assertEqual(self.store.put(b"hello"), h)  # idempotent
        other = "0" * 64
        self.assertEqual(self.store.has([other, h]), [h])
        self.assertEqual(self.store.put(b""), hashlib.sha256(b"").hexdigest())

    def test_missing_and_malformed(self) -> None:
        self.assertRaises(errors.BadRequest, self.store.get, "0" * 64)
        self.assertRaises(errors.BadRequest, self.store.get, "xyz")
        self.assertRaises(errors.BadRequest, self.store.has, ["A" * 64])
        self.assertRaises(errors.BadRequest, self.store.put, b"x" * (MAX_BLOCK_BYTES + 1))

    def test_corruption_is_reported_not_served(self) -> None:
        h = self.store.put(b"precious")
        path = Path(self.store.directory) / h[:2] / h
        path.write_bytes(b"precioux")
        self.assertRaises(errors.Internal, self.store.get, h)

    def test_survives_reopen_and_leaves_no_temp_files(self) -> None:
        h = self.store.put(b"kept")
        again = BlockStore(self.store.directory, fsync=True)
        self.assertEqual(again.get(h), b"kept")
        self.assertEqual([p.name for p in Path(self.store.directory).rglob(".tmp-*")], [])


class BlockStoreRpcTests(SynchronousTestCase):
    def test_methods_over_the_wire(self) -> None:
        clock = Clock()
        net = SimRpcNetwork(clock, seed=1)
        net.register("store:1", blockstore_methods(BlockStore(self.mktemp(), fsync=False)))
        pool = net.pool("client")

        def call(method: str, args: dict) -> tuple[bool, object]:
            d = pool.call("store:1", method, args, timeout=5)
            for _ in range(200):
                clock.advance(0.01)
            return resolve(d)

        ok, h = call("putblock", {"data": b"abc"})
        self.assertTrue(ok)
        self.assertEqual(call("getblock", {"hash": h}), (True, b"abc"))
        self.assertEqual(call("hasblocks", {"hashes": [h, "1" * 64]}), (True, [h]))
        ok, error = call("putblock", {"data": "not bytes"})
        self.assertFalse(ok)
        self.assertIsInstance(error, errors.BadRequest)
        ok, error = call("getblock", {"hash": "g" * 64})
        self.assertIsInstance(error, errors.BadRequest)
