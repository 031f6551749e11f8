"""A download takes the blocks the folder already holds from the folder
(``client.sync.local_sources``, ``read_local_blocks``), and never a block
that no longer matches its hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from client.sync import hash_file, local_sources, read_local_blocks

BLOCK = 4096


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalBlocksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        # Three full blocks and a short last one.
        self.blocks = [bytes([i]) * BLOCK for i in range(3)] + [b"tail"]
        (self.base / "big.bin").write_bytes(b"".join(self.blocks))
        (self.base / "other.txt").write_bytes(b"other")
        self.local = {name: hash_file(self.base / name, BLOCK) for name in ("big.bin", "other.txt")}

    def test_blocks_of_any_file_are_read_back_checked(self) -> None:
        # A new version of big.bin: block 1 changed, the rest as before,
        # plus the whole of other.txt appended.
        new = [self.blocks[0], b"changed", self.blocks[2], b"tail", b"other"]
        wanted = {sha(b) for b in new}
        sources = local_sources(self.local, wanted)
        self.assertEqual(sources[sha(self.blocks[2])], ("big.bin", 2))
        self.assertEqual(sources[sha(b"tail")], ("big.bin", 3))
        self.assertEqual(sources[sha(b"other")], ("other.txt", 0))
        self.assertNotIn(sha(b"changed"), sources)
        found = read_local_blocks(self.base, sources, wanted, BLOCK)
        self.assertEqual(found, {sha(b): b for b in new if b != b"changed"})

    def test_a_file_changed_since_the_scan_gives_nothing_wrong(self) -> None:
        wanted = {sha(b) for b in self.blocks}
        sources = local_sources(self.local, wanted)
        with open(self.base / "big.bin", "r+b") as f:  # block 1 rewritten after the scan
            f.seek(BLOCK)
            f.write(b"X" * 10)
        found = read_local_blocks(self.base, sources, wanted, BLOCK)
        self.assertEqual(set(found), wanted - {sha(self.blocks[1])})
        for h, data in found.items():
            self.assertEqual(sha(data), h)

    def test_a_file_gone_since_the_scan_gives_nothing(self) -> None:
        wanted = {sha(b) for b in self.blocks} | {sha(b"other")}
        sources = local_sources(self.local, wanted)
        os.remove(self.base / "big.bin")
        self.assertEqual(read_local_blocks(self.base, sources, wanted, BLOCK), {sha(b"other"): b"other"})

    def test_only_wanted_blocks_are_placed(self) -> None:
        self.assertEqual(local_sources(self.local, set()), {})
        self.assertEqual(local_sources(self.local, {sha(b"elsewhere")}), {})
        self.assertEqual(read_local_blocks(self.base, {}, [sha(b"tail")], BLOCK), {})
