"""The sync client's hash cache (``client.sync.HashCache``): a re-sync
hashes only the files that changed, and is never fooled into reusing the
hashes of a file that did."""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from client import sync
from client.sync import HASH_CACHE_NAME, HashCache, SyncResult, scan


class HashCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.hashed: list[str] = []
        real = sync.hash_file

        def counting(path: str | Path, block_size: int) -> list[str]:
            self.hashed.append(Path(path).name)
            return real(path, block_size)

        self.patch(sync, "hash_file", counting)

    def scan(self) -> dict[str, list[str]]:
        self.hashed.clear()
        cache = HashCache(self.base / HASH_CACHE_NAME, 4096)
        found = scan(self.base, 4096, SyncResult(), cache)
        cache.save()
        return found

    def test_unchanged_files_are_not_hashed_again(self) -> None:
        for name in ("a", "b"):
            (self.base / name).write_bytes(name.encode() * 5000)
        first = self.scan()
        self.assertEqual(sorted(self.hashed), ["a", "b"])
        self.assertNotIn(HASH_CACHE_NAME, first)
        # Written in the same second as the cache: not trusted yet ("racy").
        self.scan()
        self.assertEqual(sorted(self.hashed), ["a", "b"])
        # A cache written well after the files were: trusted.
        self.trust_cache()
        again = self.scan()
        self.assertEqual(self.hashed, [])
        self.assertEqual(again, first)

    def trust_cache(self) -> None:
        """Date the cache well after every file, so only a file's own
        changes (not the racy rule) can make it hashed again."""
        import cbor2

        path = self.base / HASH_CACHE_NAME
        body = cbor2.loads(path.read_bytes())
        body["written_ns"] = time.time_ns() + 5_000_000_000
        path.write_bytes(cbor2.dumps(body))

    def test_a_changed_file_is_hashed_again_even_with_its_old_times(self) -> None:
        path = self.base / "doc"
        path.write_bytes(b"x" * 10_000)
        (self.base / "other").write_bytes(b"o" * 10_000)
        before = os.stat(path)
        self.scan()
        self.trust_cache()
        # Same size, and its modification time put back as it was: only the
        # change time (and the content) differ.
        path.write_bytes(b"y" * 10_000)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        found = self.scan()
        self.assertEqual(self.hashed, ["doc"])  # "other" came from the cache
        self.assertEqual(found["doc"], sync.hash_file(path, 4096))

    def test_a_damaged_cache_is_ignored(self) -> None:
        (self.base / "f").write_bytes(b"data")
        (self.base / HASH_CACHE_NAME).write_bytes(b"\xff not cbor")
        found = self.scan()
        self.assertEqual(self.hashed, ["f"])
        self.assertEqual(found["f"], sync.hash_file(self.base / "f", 4096))

    def test_another_block_size_is_not_reused(self) -> None:
        (self.base / "f").write_bytes(b"z" * 9000)
        self.scan()
        self.hashed.clear()
        cache = HashCache(self.base / HASH_CACHE_NAME, 1024)
        scan(self.base, 1024, SyncResult(), cache)
        self.assertEqual(self.hashed, ["f"])
