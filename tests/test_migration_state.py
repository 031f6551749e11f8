"""Tests for shards in transit in the metadata state machine
(surfshard.metadata.handoff and the config, install and delete commands):
the hand-off between a source and a target state machine, chunking, and bad
input refused without a change."""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from surfshard.errors import BadRequest, NotReady
from surfshard.keyspace import MAX_HASHLIST
from surfshard.metadata.handoff import MIN_CHUNK_BYTES, Cursor, cursor_from_wire
from surfshard.metadata.state import (
    MetadataStateMachine,
    encode_config,
    encode_delete,
    encode_install,
    encode_update,
)
from surfshard.testing import keys

NSHARDS = 4
H1, H2 = "a1" * 32, "b2" * 32
SOURCE, TARGET = 1, 2
ADDRS = ["127.0.0.1:7101"]


def names_in_shard(shard: int, count: int, prefix: str = "f") -> list[str]:
    return keys.names_in_shard(shard, count, NSHARDS, prefix)


def block(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def pull(
    source: MetadataStateMachine, target: MetadataStateMachine, num: int, shard: int, max_bytes: int
) -> int:
    """Move ``shard`` chunk by chunk as the target's leader does; returns
    the number of chunks."""
    chunks = 0
    while True:
        start: Cursor = target.incoming()[shard].cursor
        chunk = source.fetch_chunk(num, shard, start, max_bytes)
        end = cursor_from_wire(chunk["next"])
        result = target.apply(
            encode_install(
                num, shard, start, end, chunk["files"], chunk.get("sessions"), chunk.get("revision")
            )
        )
        assert result["ok"] and result["applied"], result
        chunks += 1
        if end is None:
            return chunks


class HandoffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source = MetadataStateMachine(NSHARDS, owned=[])
        self.target = MetadataStateMachine(NSHARDS, owned=[])
        self.assertTrue(self.source.apply(encode_config(1, range(NSHARDS)))["ok"])
        self.assertTrue(self.target.apply(encode_config(1, []))["ok"])
        self.names = names_in_shard(0, 100)
        for i, name in enumerate(self.names):
            self.assertTrue(self.source.apply(encode_update(name, 1, [block(i)], "writer", i + 1))["ok"])
        self.other = names_in_shard(1, 1)[0]

    def move_shard_0(self) -> None:
        self.assertEqual(
            self.source.apply(encode_config(2, [], outgoing=[(0, TARGET, ADDRS)])), {"ok": True, "num": 2}
        )
        self.assertEqual(
            self.target.apply(encode_config(2, [], incoming=[(0, SOURCE, ADDRS)])), {"ok": True, "num": 2}
        )

    def test_frozen_on_both_sides_until_installed(self) -> None:
        self.move_shard_0()
        for m in (self.source, self.target):
            answer = m.apply(encode_update(self.names[0], 2, [H1], "c", 1))
            self.assertEqual((answer["code"], answer["num"], answer["shard"]), ("WRONG_GROUP", 2, 0))
        # Shards untouched by the map keep serving.
        self.assertTrue(self.source.apply(encode_update(self.other, 1, [H1], "c", 1))["ok"])

    def test_shard_arrives_whole_with_its_dedup_and_revision(self) -> None:
        self.move_shard_0()
        revision = cbor2.loads(self.source.snapshot())["outgoing"][0]["state"]["revision"]
        chunks = pull(self.source, self.target, 2, 0, MIN_CHUNK_BYTES)
        self.assertGreater(chunks, 1)
        self.assertEqual(
            {n: self.target.getfileinfo(n) for n in self.names},
            {n: (1, (block(i),)) for i, n in enumerate(self.names)},
        )
        self.assertEqual(cbor2.loads(self.target.snapshot())["shards"][0]["revision"], revision)
        # A write applied at the source, retried at the target, gets its first answer.
        last = len(self.names) - 1
        retry = encode_update(self.names[last], 1, [block(last)], "writer", last + 1)
        self.assertEqual(self.target.apply(retry)["version"], 1)  # not a false mismatch
        self.assertEqual(self.target.getfileinfo(self.names[last]), (1, (block(last),)))
        self.assertTrue(self.target.apply(encode_update(self.names[last], 2, [H2], "c", 1))["ok"])
        self.assertTrue(self.target.installed(2, 0))
        self.assertEqual(self.source.outgoing(), {0: (2, TARGET, tuple(ADDRS))})

    def test_the_source_deletes_once_the_target_has_installed(self) -> None:
        self.move_shard_0()
        self.assertFalse(self.target.installed(2, 0))
        pull(self.source, self.target, 2, 0, 64 * 1024)
        self.assertTrue(self.target.installed(2, 0))
        self.assertTrue(self.source.moving)
        self.assertEqual(self.source.apply(encode_delete(2, 0)), {"ok": True, "deleted": True})
        self.assertEqual(self.source.apply(encode_delete(2, 0)), {"ok": True, "deleted": False})
        self.assertFalse(self.source.moving)
        self.assertNotIn(0, cbor2.loads(self.source.snapshot())["outgoing"])
        # Both can take the next map now.
        self.assertTrue(self.source.apply(encode_config(3, []))["ok"])
        self.assertTrue(self.target.apply(encode_config(3, []))["ok"])

    def test_a_file_of_the_largest_hash_list_moves_in_pieces(self) -> None:
        big = names_in_shard(0, 1, prefix="big")[0]
        hashes = [block(i) for i in range(MAX_HASHLIST)]
        self.assertTrue(self.source.apply(encode_update(big, 1, hashes, "big", 1))["ok"])
        self.move_shard_0()
        chunks = pull(self.source, self.target, 2, 0, 1024 * 1024)
        self.assertGreaterEqual(chunks, 6)  # 6.6 MB of hashes in chunks of at most 1 MiB
        self.assertEqual(self.target.getfileinfo(big), (1, tuple(hashes)))

    def test_replayed_and_duplicated_chunks_change_nothing(self) -> None:
        self.move_shard_0()
        chunk = self.source.fetch_chunk(2, 0, None, MIN_CHUNK_BYTES)
        command = encode_install(2, 0, None, cursor_from_wire(chunk["next"]), chunk["files"])
        self.assertTrue(self.target.apply(command)["applied"])
        after_first = self.target.snapshot()
        self.assertEqual(self.target.apply(command), {"ok": True, "applied": False})
        self.assertEqual(self.target.snapshot(), after_first)
        pull(self.source, self.target, 2, 0, MIN_CHUNK_BYTES)
        installed = self.target.snapshot()
        self.assertEqual(self.target.apply(command), {"ok": True, "applied": False})
        self.assertEqual(self.target.snapshot(), installed)

    def test_snapshot_mid_move_resumes_where_it_was(self) -> None:
        self.move_shard_0()
        chunk = self.source.fetch_chunk(2, 0, None, MIN_CHUNK_BYTES)
        self.target.apply(encode_install(2, 0, None, cursor_from_wire(chunk["next"]), chunk["files"]))
        restarted_target = MetadataStateMachine(NSHARDS, owned=[])
        restarted_target.restore(self.target.snapshot())
        restarted_source = MetadataStateMachine(NSHARDS, owned=[])
        restarted_source.restore(self.source.snapshot())
        self.assertEqual(restarted_target.snapshot(), self.target.snapshot())
        pull(restarted_source, restarted_target, 2, 0, MIN_CHUNK_BYTES)
        self.assertEqual(restarted_target.getfileinfo(self.names[-1]), (1, (block(len(self.names) - 1),)))

    def test_two_groups_swapping_shards_at_once(self) -> None:
        """Both directions in one map: each side serves its outgoing copy
        while it pulls its incoming one, so neither waits for the other."""
        self.assertTrue(self.target.apply(encode_update("x", 1, [H1], "c", 1))["code"] == "WRONG_GROUP")
        # Map 2: shard 1 to the target; map 3: shard 1 back, shard 0 over.
        self.source.apply(encode_config(2, [], outgoing=[(1, TARGET, ADDRS)]))
        self.target.apply(encode_config(2, [], incoming=[(1, SOURCE, ADDRS)]))
        pull(self.source, self.target, 2, 1, 64 * 1024)
        self.source.apply(encode_delete(2, 1))
        self.source.apply(encode_config(3, [], incoming=[(1, TARGET, ADDRS)], outgoing=[(0, TARGET, ADDRS)]))
        self.target.apply(encode_config(3, [], incoming=[(0, SOURCE, ADDRS)], outgoing=[(1, SOURCE, ADDRS)]))
        pull(self.source, self.target, 3, 0, 64 * 1024)
        pull(self.target, self.source, 3, 1, 64 * 1024)
        self.assertEqual(self.target.getfileinfo(self.names[0]), (1, (block(0),)))
        self.assertEqual(sorted(self.source.owned_shards), [1, 2, 3])


class TransitRefusalTests(SynchronousTestCase):
    """Bad input to the transfer commands and calls is refused, with a code,
    changing nothing."""

    def setUp(self) -> None:
        self.source = MetadataStateMachine(NSHARDS, owned=[])
        self.source.apply(encode_config(1, range(NSHARDS)))
        self.source.apply(encode_update(names_in_shard(0, 1)[0], 1, [H1], "c", 1))
        self.source.apply(encode_config(2, [], outgoing=[(0, TARGET, ADDRS)]))
        self.target = MetadataStateMachine(NSHARDS, owned=[])
        self.target.apply(encode_config(1, []))
        self.target.apply(encode_config(2, [], incoming=[(0, SOURCE, ADDRS)]))

    def test_fetch_refusals(self) -> None:
        before = self.source.snapshot()
        self.assertRaises(NotReady, self.source.fetch_chunk, 3, 0, None)  # a map not applied yet
        self.assertRaises(BadRequest, self.source.fetch_chunk, 1, 0, None)  # a stale map number
        self.assertRaises(BadRequest, self.source.fetch_chunk, 2, 1, None)  # a shard not moving
        self.assertRaises(BadRequest, self.target.fetch_chunk, 2, 0, None)  # not the owner
        self.assertRaises(BadRequest, self.source.fetch_chunk, 2, 9, None)  # no such shard
        self.assertRaises(BadRequest, self.source.fetch_chunk, 2, 0, None, 10)  # absurd budget
        self.assertEqual(self.source.snapshot(), before)

    def test_install_refusals(self) -> None:
        before = self.target.snapshot()
        good = self.source.fetch_chunk(2, 0, None)
        elsewhere = names_in_shard(1, 1)[0]
        bad: list[Any] = [
            encode_install(2, 0, None, None, [[elsewhere, 1, 0, [H1], 1]], [], 0),  # file of another shard
            encode_install(2, 0, None, None, [["a", 1, 0, ["zz"], 1]], [], 0),  # not a hash
            encode_install(2, 0, None, None, [[names_in_shard(0, 1)[0], 1, 0, [H1], 2]], [], 0),  # incomplete
            encode_install(2, 0, None, None, good["files"], [["c", 0, [[1, "yes", 1]]]], 0),  # bad session
            cbor2.dumps({"op": "install", "num": 2, "shard": 0}),  # keys missing
            encode_delete(2, "0"),
            cbor2.dumps({"op": "acked", "num": 0, "shard": 0}),
            encode_config(3, []),  # while moving: NOT_READY
            encode_config(3, [], incoming=[(0, SOURCE, ADDRS)]),
        ]
        for command in bad:
            answer = self.target.apply(command)
            self.assertFalse(answer["ok"], answer)
            self.assertIn(answer["code"], ("BAD_REQUEST", "NOT_READY"), answer)
        self.assertEqual(self.target.snapshot(), before)
        # Wrong or stale map numbers and chunks not at the cursor are
        # ignored, not applied.
        for command in (
            encode_install(3, 0, None, None, good["files"], good["sessions"], good["revision"]),
            encode_install(1, 0, None, None, good["files"], good["sessions"], good["revision"]),
            encode_install(2, 0, ("zzz", 0), None, good["files"], good["sessions"], good["revision"]),
            encode_install(2, 1, None, None, [], [], 0),  # a shard not incoming
        ):
            self.assertEqual(self.target.apply(command), {"ok": True, "applied": False})
        self.assertEqual(self.target.snapshot(), before)

    def test_config_that_does_not_fit_ownership_is_refused_whole(self) -> None:
        fresh = MetadataStateMachine(NSHARDS, owned=[])
        fresh.apply(encode_config(1, [0]))
        before = fresh.snapshot()
        for command in (
            encode_config(2, [0]),  # adopting a shard it serves
            encode_config(2, [], outgoing=[(1, TARGET, ADDRS)]),  # giving a shard it lacks
            encode_config(2, [1], incoming=[(1, SOURCE, ADDRS)]),  # one shard twice
            encode_config(4, []),  # skipping a map
        ):
            self.assertFalse(fresh.apply(command)["ok"])
        self.assertEqual(fresh.snapshot(), before)

    def test_format_1_snapshots_are_still_read(self) -> None:
        m = MetadataStateMachine(NSHARDS, owned=[])
        old = {
            "format": 1,
            "nshards": NSHARDS,
            "shards": {0: {"files": {names_in_shard(0, 1)[0]: [1, [H1]]}, "sessions": []}},
            "config": 5,
        }
        m.restore(cbor2.dumps(old, canonical=True))
        self.assertEqual((m.config_num, sorted(m.owned_shards)), (5, [0]))


class ListShardTests(SynchronousTestCase):
    """``list_shard``: a shard's files a page at a time, in name order."""

    def test_pages_in_name_order_bounded_by_files_and_hashes(self) -> None:
        from surfshard.metadata.state import encode_update

        m = MetadataStateMachine(1)
        names = [f"n{i:03d}" for i in range(25)]
        for i, name in enumerate(reversed(names)):
            m.apply(encode_update(name, 1, ["a" * 64] * (1 + i % 3), "c", i + 1))
        pages, after = [], ""
        for _ in range(30):  # bounded
            page = m.list_shard(0, after, 10, 10_000)
            assert page is not None
            pages.append(page)
            if not page["more"]:
                break
            after = page["files"][-1][0]
        self.assertEqual([f[0] for p in pages for f in p["files"]], names)
        self.assertEqual([len(p["files"]) for p in pages], [10, 10, 5])
        self.assertEqual({p["revision"] for p in pages}, {25})
        # The hash bound cuts a page short (but never below one file).
        small = m.list_shard(0, "", 10, 4)
        assert small is not None
        self.assertLessEqual(sum(len(f[2]) for f in small["files"]), 4)
        self.assertTrue(small["more"])
        one = m.list_shard(0, "", 10, 0)
        assert one is not None
        self.assertEqual(len(one["files"]), 1)
        # A write moves the revision on; later pages say so.
        m.apply(encode_update("n000", 2, ["b" * 64], "c", 99))
        later = m.list_shard(0, after, 10, 10_000)
        assert later is not None
        self.assertEqual(later["revision"], 26)

    def test_a_shard_not_served_is_none(self) -> None:
        m = MetadataStateMachine(4, owned=(0,))
        self.assertIsNone(m.list_shard(1, "", 10, 100))

    def test_new_names_keep_a_fresh_order_without_a_sort(self) -> None:
        from surfshard.metadata.state import encode_update

        m = MetadataStateMachine(1)
        for i, name in enumerate(["b", "d", "f"]):
            m.apply(encode_update(name, 1, [], "c", i + 1))
        self.assertEqual([f[0] for f in m.list_shard(0, "", 10, 100)["files"]], ["b", "d", "f"])  # type: ignore[index]
        state = m._shards[0]
        cached = state._names
        m.apply(encode_update("c", 1, [], "c", 10))
        m.apply(encode_update("a", 1, [], "c", 11))
        m.apply(encode_update("d", 2, [], "c", 12))  # an existing name
        self.assertIs(state._names, cached)  # kept in order, not rebuilt
        self.assertEqual([f[0] for f in m.list_shard(0, "", 10, 100)["files"]], ["a", "b", "c", "d", "f"])  # type: ignore[index]
