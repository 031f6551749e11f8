"""A metadata group following the shard map: planning and the config command."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from surfshard.metadata.shardwatch import plan_config
from surfshard.metadata.state import MetadataStateMachine, encode_config, encode_update
from surfshard.shardmap import ShardMap

H = "ab" * 32
GROUPS = {1: ("127.0.0.1:1",), 2: ("127.0.0.1:2",)}


def smap(num: int, shards: tuple[int, ...]) -> ShardMap:
    groups = {g: a for g, a in GROUPS.items() if g in shards}
    return ShardMap(num, shards, groups)


class PlanConfigTests(SynchronousTestCase):
    def test_first_join_adopts_everything(self) -> None:
        self.assertEqual(plan_config(1, ShardMap.initial(4), smap(1, (1, 1, 1, 1))), ([0, 1, 2, 3], [], []))

    def test_second_join_moves_data(self) -> None:
        old, new = smap(1, (1, 1, 1, 1)), smap(2, (1, 1, 2, 2))
        self.assertEqual(plan_config(1, old, new), ([], [], [2, 3]))
        self.assertEqual(plan_config(2, old, new), ([], [2, 3], []))

    def test_joint_join_splits_unassigned(self) -> None:
        new = smap(1, (1, 1, 2, 2))
        self.assertEqual(plan_config(2, ShardMap.initial(4), new), ([2, 3], [], []))

    def test_unrelated_group_has_nothing_to_do(self) -> None:
        self.assertEqual(plan_config(3, smap(1, (1, 1, 2, 2)), smap(2, (1, 2, 2, 2))), ([], [], []))


class ConfigCommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MetadataStateMachine(4, owned=())

    def test_adopt_makes_shards_servable(self) -> None:
        name = "x.txt"
        self.assertEqual(self.m.apply(encode_update(name, 1, [H], "c", 1))["code"], "WRONG_GROUP")
        self.assertTrue(self.m.apply(encode_config(1, range(4)))["ok"])
        self.assertEqual(self.m.config_num, 1)
        self.assertEqual(self.m.apply(encode_update(name, 1, [H], "c", 2)), {"ok": True, "version": 1})

    def test_maps_are_taken_in_order_once(self) -> None:
        self.assertFalse(self.m.apply(encode_config(2, [0]))["ok"])
        self.assertEqual(self.m.owned_shards, frozenset())
        self.assertTrue(self.m.apply(encode_config(1, [0]))["ok"])
        repeat = self.m.apply(encode_config(1, [1]))
        self.assertEqual((repeat["ok"], repeat["num"]), (False, 1))
        self.assertEqual(self.m.owned_shards, frozenset({0}))

    def test_adopting_an_owned_shard_keeps_its_files(self) -> None:
        self.m.apply(encode_config(1, range(4)))
        self.m.apply(encode_update("y", 1, [H], "c", 1))
        self.m.apply(encode_config(2, range(4)))
        self.assertEqual(self.m.version_of("y"), 1)

    def test_snapshot_carries_the_map_number(self) -> None:
        self.m.apply(encode_config(1, [0, 2]))
        other = MetadataStateMachine(4, owned=())
        other.restore(self.m.snapshot())
        self.assertEqual((other.config_num, other.owned_shards), (1, frozenset({0, 2})))
        self.assertEqual(other.snapshot(), self.m.snapshot())

    def test_malformed_config_is_refused(self) -> None:
        import cbor2

        for bad in (
            {"op": "config", "num": 0, "adopt": []},
            {"op": "config", "num": 1, "adopt": [9]},
            {"op": "config", "num": 1, "adopt": "0"},
            {"op": "config", "num": 1},
        ):
            result = self.m.apply(cbor2.dumps(bad))
            self.assertEqual(result["code"], "BAD_REQUEST", bad)
        self.assertEqual((self.m.config_num, self.m.owned_shards), (0, frozenset()))
