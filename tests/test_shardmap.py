"""Tests for surfshard.shardmap.ShardMap."""

from __future__ import annotations

import os

import cbor2
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from surfshard.errors import BadRequest
from surfshard.keyspace import shard_of
from surfshard.shardmap import UNASSIGNED, ShardMap

SEED = int(os.environ.get("SURFSHARD_SEED", "20240501"))

A1 = ("127.0.0.1:7001", "127.0.0.1:7002")
B1 = ("host-b:7101",)


def sample() -> ShardMap:
    # groups deliberately given out of gid order, one as a list.
    return ShardMap(3, (1, 1, 2, 0), {2: list(B1), 1: A1})


# Canonical CBOR (RFC 7049 §3.9: keys ordered by length, then bytes), checked
# by hand: a3 {3 keys}; "num": 3; "groups": {1: [two addrs], 2: [one addr]};
# "shards": [1, 1, 2, 0].
SAMPLE_CBOR = bytes.fromhex(
    "a3"
    "636e756d" "03"
    "6667726f757073" "a2"
    "01" "82" "6e3132372e302e302e313a37303031" "6e3132372e302e302e313a37303032"
    "02" "81" "6b686f73742d623a37313031"
    "66736861726473" "8401010200"
)  # fmt: skip


class ShardMapTests(SynchronousTestCase):
    def test_initial(self) -> None:
        m = ShardMap.initial(8)
        self.assertEqual(m.num, 0)
        self.assertEqual(m.shards, (UNASSIGNED,) * 8)
        self.assertEqual(dict(m.groups), {})
        self.assertEqual(m.nshards, 8)
        self.assertEqual(m.group_for("anything"), UNASSIGNED)
        self.assertEqual(m.assigned_gids(), ())
        for bad in (0, -1, True, "8"):
            self.assertRaises(ValueError, ShardMap.initial, bad)

    def test_lookups(self) -> None:
        m = sample()
        self.assertEqual(m.group_of_shard(0), 1)
        self.assertEqual(m.group_of_shard(2), 2)
        self.assertEqual(m.group_of_shard(3), UNASSIGNED)
        self.assertRaises(ValueError, m.group_of_shard, 4)
        self.assertRaises(ValueError, m.group_of_shard, -1)
        self.assertEqual(m.shards_of(1), (0, 1))
        self.assertEqual(m.shards_of(2), (2,))
        self.assertEqual(m.shards_of(UNASSIGNED), (3,))
        self.assertEqual(m.shards_of(9), ())
        self.assertEqual(m.addresses_of(1), A1)
        self.assertEqual(m.addresses_of(9), ())
        self.assertEqual(m.assigned_gids(), (1, 2))
        self.assertEqual(list(m.groups), [1, 2])

    def test_group_for_follows_keyspace(self) -> None:
        m = sample()
        # Fixed vectors from test_keyspace, 4 shards: "a" -> hash 0x333f...,
        # shard 0x333f... * 4 >> 64 = 0; "dir/sub/file.bin" -> shard 2.
        self.assertEqual(shard_of("a", 4), 0)
        self.assertEqual(m.group_for("a"), 1)
        self.assertEqual(shard_of("dir/sub/file.bin", 4), 2)
        self.assertEqual(m.group_for("dir/sub/file.bin"), 2)
        for i in range(200):
            name = f"file-{i}"
            self.assertEqual(m.group_for(name), m.shards[shard_of(name, 4)])

    def test_immutable_and_hashable(self) -> None:
        m = sample()
        with self.assertRaises(AttributeError):
            m.num = 4  # type: ignore[misc]
        with self.assertRaises(TypeError):
            m.groups[3] = ("x:1",)  # type: ignore[index]
        self.assertEqual(m, sample())
        self.assertEqual(hash(m), hash(sample()))
        self.assertEqual(len({m, sample(), m.replace(num=4)}), 2)
        self.assertNotEqual(m, m.replace(shards=(1, 1, 2, 2)))
        self.assertNotEqual(m, m.replace(groups={1: A1, 2: ("host-b:7102",)}))

    def test_replace_validates(self) -> None:
        self.assertRaises(BadRequest, sample().replace, shards=(1, 1, 3, 0))

    def test_cbor_bytes_are_fixed(self) -> None:
        self.assertEqual(sample().to_cbor(), SAMPLE_CBOR)
        self.assertEqual(ShardMap.from_cbor(SAMPLE_CBOR), sample())
        # Same map built another way: same bytes.
        other = ShardMap(3, [1, 1, 2, 0], {1: list(A1), 2: B1})
        self.assertEqual(other.to_cbor(), SAMPLE_CBOR)

    def test_wire_roundtrip(self) -> None:
        for m in (ShardMap.initial(1), ShardMap.initial(16), sample()):
            self.assertEqual(ShardMap.from_wire(m.to_wire()), m)
            self.assertEqual(ShardMap.from_cbor(m.to_cbor()), m)
            self.assertEqual(ShardMap.from_wire(cbor2.loads(cbor2.dumps(m.to_wire()))), m)

    @seed(SEED)
    @settings(deadline=None, max_examples=50)
    @given(
        num=st.integers(min_value=0, max_value=1 << 40),
        ngroups=st.integers(min_value=0, max_value=5),
        assignment=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=40),
    )
    def test_random_maps_roundtrip(self, num: int, ngroups: int, assignment: list[int]) -> None:
        groups = {g: tuple(f"10.0.{g}.{i}:7000" for i in range(1, 4)) for g in range(1, ngroups + 1)}
        shards = tuple(g if g <= ngroups else UNASSIGNED for g in assignment)
        m = ShardMap(num, shards, groups)
        self.assertEqual(ShardMap.from_cbor(m.to_cbor()), m, f"SURFSHARD_SEED={SEED}")


class ShardMapValidationTests(SynchronousTestCase):
    def assertRefused(self, wire: object, fragment: str) -> None:
        with self.assertRaises(BadRequest, msg=repr(wire)) as cm:
            ShardMap.from_wire(wire)
        self.assertIn(fragment, cm.exception.message)

    def test_malformed_wire(self) -> None:
        good = sample().to_wire()
        self.assertRefused([1, 2], "must be a map")
        self.assertRefused({"num": 1, "shards": [0]}, "missing groups")
        self.assertRefused({**good, "extra": 1}, "unknown keys")
        self.assertRefused({**good, "num": -1}, "num")
        self.assertRefused({**good, "num": True}, "num")
        self.assertRefused({**good, "num": "3"}, "num")
        self.assertRefused({**good, "shards": []}, "1..")
        self.assertRefused({**good, "shards": "1120"}, "shards must be a list")
        self.assertRefused({**good, "shards": [1, 1, 2, -1]}, "shard 3")
        self.assertRefused({**good, "shards": [1, 1, 2, "0"]}, "shard 3")
        self.assertRefused({**good, "shards": [1, 1, 3, 0]}, "group 3")
        self.assertRefused({**good, "groups": [[1, list(A1)]]}, "groups must be a map")
        self.assertRefused({**good, "groups": {1: "127.0.0.1:7001"}}, "groups must be a map")
        self.assertRefused({**good, "groups": {"1": list(A1), 2: list(B1)}}, "group id")
        self.assertRefused({**good, "groups": {0: list(A1), 1: list(A1), 2: list(B1)}}, "group id")
        self.assertRefused({**good, "groups": {1: [], 2: list(B1)}}, "at least one address")
        self.assertRefused({**good, "groups": {1: ["localhost"], 2: list(B1)}}, "host:port")
        self.assertRefused({**good, "groups": {1: ["h:0"], 2: list(B1)}}, "outside 1-65535")
        self.assertRefused({**good, "groups": {1: [7001], 2: list(B1)}}, "not a string")
        self.assertRefused({**good, "groups": {1: list(A1), 2: [A1[0]]}}, "in group 1 and group 2")
        self.assertRefused({**good, "groups": {1: [A1[0], A1[0]], 2: list(B1)}}, "twice in group 1")

    def test_malformed_cbor(self) -> None:
        for data in (b"", b"\xff\xff", b"\xa1", cbor2.dumps("text")):
            self.assertRaises(BadRequest, ShardMap.from_cbor, data)
