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
        damage(self.store, h)
        self.assertRaises(errors.Internal, self.store.get, h)
        # Dropped: no longer claimed, so the writer or a repair stores it again.
        self.assertEqual(self.store.has([h]), [])
        self.assertRaises(errors.BadRequest, self.store.get, h)
        self.store.put(b"precious")
        self.assertEqual(self.store.get(h), b"precious")
        self.flushLoggedErrors()

    def test_a_scrub_reads_back_in_pages_and_drops_bad_copies(self) -> None:
        hashes = sorted(self.store.put(bytes([i]) * 1000) for i in range(50))
        damage(self.store, hashes[10])
        damage(self.store, hashes[40])
        pages, after, corrupt, checked = 0, "", [], 0
        while pages < 100:  # bounded
            page = self.store.scrub(after, max_bytes=5000)
            pages += 1
            checked += page["checked"]
            corrupt += page["corrupt"]
            if not page["last"]:
                break
            after = page["last"]
        self.assertGreater(pages, 5)
        self.assertEqual((checked, corrupt), (50, [hashes[10], hashes[40]]))
        self.assertEqual(self.store.list(), [h for h in hashes if h not in (hashes[10], hashes[40])])
        self.assertRaises(errors.BadRequest, self.store.scrub, "not a hash")
        self.flushLoggedErrors()

    def test_a_corrupt_block_of_the_older_layout_is_put_aside(self) -> None:
        data = b"from an older version"
        h = hashlib.sha256(data).hexdigest()
        folder = Path(self.store.directory) / h[:2]
        folder.mkdir()
        (folder / h).write_bytes(b"rotten" + data)
        self.assertRaises(errors.Internal, self.store.get, h)
        self.assertEqual((self.store.has([h]), self.store.list()), ([], []))
        self.assertTrue((folder / (h + ".corrupt")).exists())
        self.flushLoggedErrors()

    def test_survives_reopen_and_leaves_no_temp_files(self) -> None:
        h = self.store.put(b"kept")
        self.store.close()
        again = BlockStore(self.store.directory, fsync=True)
        self.assertEqual(again.get(h), b"kept")
        self.assertEqual([p.name for p in Path(self.store.directory).rglob(".tmp-*")], [])

    def test_a_batch_is_one_record_each_and_survives_reopen(self) -> None:
        blocks = [bytes([i]) * (i + 1) for i in range(200)]
        hashes = self.store.put_many([[hashlib.sha256(b).hexdigest(), b] for b in blocks])
        self.store.put_many([[hashes[0], blocks[0]]])  # stored again: nothing written
        self.assertEqual(self.store.stats["written"], 200)
        self.store.close()
        again = BlockStore(self.store.directory, fsync=False)
        self.assertEqual([again.get(h) for h in hashes], blocks)
        self.assertEqual(again.list(), sorted(hashes))
        self.assertEqual(again.list(after=sorted(hashes)[10], limit=3), sorted(hashes)[11:14])

    def test_a_torn_last_record_is_cut_and_the_rest_kept(self) -> None:
        kept = self.store.put(b"kept block")
        torn = self.store.put(b"torn block, half written when the power went")
        path, offset, length = self.store.location(torn)
        self.store.close()
        with open(path, "r+b") as f:
            f.truncate(offset + length // 2)  # a crash in the middle of the last write
        again = BlockStore(self.store.directory, fsync=False)
        self.assertEqual(again.get(kept), b"kept block")
        self.assertEqual(again.has([kept, torn]), [kept])
        h = again.put(b"after")  # appends after the cut
        again.close()
        third = BlockStore(self.store.directory, fsync=False)
        self.assertEqual((third.get(kept), third.get(h)), (b"kept block", b"after"))
        self.flushLoggedErrors()

    def test_blocks_of_the_older_layout_are_still_read(self) -> None:
        data = b"from an older version"
        h = hashlib.sha256(data).hexdigest()
        folder = Path(self.store.directory) / h[:2]
        folder.mkdir()
        (folder / h).write_bytes(data)
        self.assertEqual((self.store.get(h), self.store.has([h]), self.store.list()), (data, [h], [h]))
        self.store.put(data)  # already there: not appended again
        self.assertEqual(self.store.stats["written"], 0)


def damage(store: BlockStore, block_hash: str) -> None:
    """Flip a byte of the block's data where the store keeps it."""
    path, offset, _ = store.location(block_hash)
    with open(path, "r+b") as f:
        f.seek(offset)
        first = f.read(1)
        f.seek(offset)
        f.write(bytes([first[0] ^ 0xFF]))


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
