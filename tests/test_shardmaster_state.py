"""Tests for shardmaster.state.ShardMasterStateMachine.

The classic shard-controller lab behaviours, as pure tests of the replicated
state machine (apply order stands for log order), plus bad input, dedup,
history, snapshots and a hypothesis property over random join/leave/move
sequences. Randomized tests are seeded from SURFSHARD_SEED (printed in every
assertion message that depends on it) so a failure replays exactly.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from typing import Any

import cbor2
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from raft.interfaces import IStateMachine
from shardmaster import rebalance, state
from shardmaster.state import (
    ShardMasterStateMachine,
    encode_join,
    encode_leave,
    encode_move,
    validate_join_args,
    validate_leave_args,
    validate_move_args,
)
from surfshard.errors import BadRequest
from surfshard.shardmap import UNASSIGNED, ShardMap

SEED = int(os.environ.get("SURFSHARD_SEED", "20240501"))

#: The lab's shard count.
NSHARDS = 10


def addrs(gid: int, n: int = 3) -> list[str]:
    """Distinct node addresses for group ``gid`` (distinct across gids)."""
    return [f"10.{gid // 250}.{gid % 250}.{i}:7000" for i in range(1, n + 1)]


def raw(command: dict[str, Any]) -> bytes:
    """Encode a command by hand, bypassing the encoders' validation, the way
    an older or buggy proposer could have put it in the log."""
    return cbor2.dumps(command, canonical=True)


class Admin:
    """One admin client: numbers its requests like the client library."""

    def __init__(self, machine: ShardMasterStateMachine, client: str = "admin-1") -> None:
        self.machine = machine
        self.client = client
        self.seq = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def join(self, groups: dict[int, list[str]]) -> dict[str, Any]:
        return self.machine.apply(encode_join(groups, self.client, self._next()))

    def join_gids(self, *gids: int) -> dict[str, Any]:
        return self.join({gid: addrs(gid) for gid in gids})

    def leave(self, *gids: int) -> dict[str, Any]:
        return self.machine.apply(encode_leave(list(gids), self.client, self._next()))

    def move(self, shard: int, gid: int) -> dict[str, Any]:
        return self.machine.apply(encode_move(shard, gid, self.client, self._next()))


def ok(num: int) -> dict[str, Any]:
    return {"ok": True, "num": num}


def moved(old: ShardMap, new: ShardMap) -> list[int]:
    return [s for s, (a, b) in enumerate(zip(old.shards, new.shards, strict=True)) if a != b]


class Checks:
    """Assertions about one map, shared by the lab tests and the property."""

    def assertBalancedAndLive(self: Any, m: ShardMap, context: str = "") -> None:
        gids = set(m.groups)
        if not gids:
            self.assertEqual(
                m.shards, (UNASSIGNED,) * m.nshards, f"no groups, all shards unassigned {context}"
            )
            return
        for s, gid in enumerate(m.shards):
            self.assertIn(gid, gids, f"shard {s} owned by {gid}, not a live group {context}")
        counts = Counter(m.shards)
        per_group = [counts.get(gid, 0) for gid in gids]
        self.assertLessEqual(max(per_group) - min(per_group), 1, f"unbalanced {dict(counts)} {context}")


class BasicTests(Checks, SynchronousTestCase):
    def setUp(self) -> None:
        self.m = ShardMasterStateMachine(NSHARDS)
        self.a = Admin(self.m)

    def test_provides_state_machine_interface(self) -> None:
        self.assertTrue(verifyObject(IStateMachine, self.m))

    def test_map_zero_has_every_shard_unassigned(self) -> None:
        for num in (0, -1, 7):
            m = self.m.query(num)
            self.assertEqual(m, ShardMap(0, (UNASSIGNED,) * NSHARDS, {}))
        self.assertEqual(self.m.latest.num, 0)
        self.assertEqual(self.m.oldest_num, 0)

    def test_constructor_arguments(self) -> None:
        for bad in (0, -1, True, "10", 1 << 20):
            self.assertRaises(ValueError, ShardMasterStateMachine, bad)
        for bad in (0, -3, 1.5, False):
            self.assertRaises(ValueError, ShardMasterStateMachine, 4, bad)

    def test_join_leave_move_sequence_gives_expected_maps(self) -> None:
        # Maps follow rebalance's documented rules: a group over its target
        # releases its highest-numbered shards; shards to place go lowest
        # first to the groups short of their target, in gid order.
        a = self.a
        self.assertEqual(a.join_gids(1), ok(1))
        self.assertEqual(self.m.latest.shards, (1,) * 10)
        self.assertEqual(dict(self.m.latest.groups), {1: tuple(addrs(1))})
        self.assertEqual(a.join_gids(2), ok(2))
        self.assertEqual(self.m.latest.shards, (1, 1, 1, 1, 1, 2, 2, 2, 2, 2))
        self.assertEqual(a.join_gids(3), ok(3))
        self.assertEqual(self.m.latest.shards, (1, 1, 1, 1, 3, 2, 2, 2, 3, 3))
        self.assertEqual(a.move(0, 3), ok(4))
        self.assertEqual(self.m.latest.shards, (3, 1, 1, 1, 3, 2, 2, 2, 3, 3))
        self.assertEqual(a.leave(1), ok(5))
        self.assertEqual(self.m.latest.shards, (3, 2, 2, 3, 3, 2, 2, 2, 3, 3))
        self.assertEqual(sorted(self.m.latest.groups), [2, 3])
        # The last groups may not leave: their shards' data would have no owner.
        refused = a.leave(2, 3)
        self.assertEqual((refused["ok"], refused["code"]), (False, "BAD_REQUEST"))
        self.assertIn("no group", refused["message"])
        self.assertEqual(self.m.latest.num, 5)

    def test_the_last_group_cannot_leave_and_a_group_that_left_can_rejoin(self) -> None:
        """No shard is ever left ownerless once assigned (a later join would
        start it empty while its data exists), so the last group's leave is
        refused; a group that left while others stayed may join again."""
        self.a.join_gids(7)
        self.assertEqual(self.a.leave(7)["code"], "BAD_REQUEST")
        self.assertEqual(self.m.latest.shards, (7,) * NSHARDS)
        self.a.join_gids(8)
        self.assertEqual(self.a.leave(7), ok(3))
        self.assertNotIn(UNASSIGNED, self.m.latest.shards)
        # A group that left may join again, even with other addresses.
        self.assertEqual(self.a.join({7: ["new-host:9000"]}), ok(4))
        self.assertEqual(self.m.latest.addresses_of(7), ("new-host:9000",))

    def test_query_reads_each_map_back(self) -> None:
        self.a.join_gids(1)
        self.a.join_gids(2)
        self.assertEqual(self.m.query(1).shards, (1,) * 10)
        self.assertEqual(self.m.query(2), self.m.latest)
        self.assertEqual(self.m.query(2), self.m.query(-1))
        self.assertEqual(self.m.query(99), self.m.latest)

    def test_query_refuses_bad_numbers(self) -> None:
        for bad in (-2, -100, "1", 1.0, None, True):
            e = self.assertRaises(BadRequest, self.m.query, bad)
            self.assertIn("map number", e.message)


class HistoryTests(Checks, SynchronousTestCase):
    def test_historical_queries_return_the_old_maps(self) -> None:
        m = ShardMasterStateMachine(NSHARDS)
        a = Admin(m)
        seen = [m.latest]
        rng = random.Random(SEED)
        live: list[int] = []
        for gid in range(1, 15):
            a.join_gids(gid)
            live.append(gid)
            seen.append(m.latest)
            if gid % 3 == 0:
                a.leave(live.pop(rng.randrange(len(live))))
                seen.append(m.latest)
            if gid % 4 == 0:
                a.move(rng.randrange(NSHARDS), rng.choice(live))
                seen.append(m.latest)
        for num, expected in enumerate(seen):
            self.assertEqual(expected.num, num)
            self.assertEqual(m.query(num), expected, f"map {num} SURFSHARD_SEED={SEED}")
        # Maps really differ over time: a query that ignored num would fail above.
        self.assertGreater(len(set(seen)), 10)

    def test_history_is_bounded_and_names_the_oldest_kept(self) -> None:
        m = ShardMasterStateMachine(4, history_limit=3)
        a = Admin(m)
        for gid in range(1, 6):
            a.join_gids(gid)
        self.assertEqual(m.latest.num, 5)
        self.assertEqual(m.oldest_num, 3)
        self.assertEqual(m.query(3).num, 3)
        self.assertEqual(sorted(m.query(3).groups), [1, 2, 3])
        for gone in (0, 1, 2):
            e = self.assertRaises(BadRequest, m.query, gone)
            self.assertEqual(e.details["oldest"], 3)
            self.assertIn("oldest retained map is 3", e.message)
        self.assertEqual(m.stats()["maps"], 3)

    def test_history_limit_one_keeps_only_the_latest(self) -> None:
        m = ShardMasterStateMachine(4, history_limit=1)
        Admin(m).join_gids(1)
        self.assertEqual(m.query(-1).num, 1)
        self.assertEqual(m.query(1).num, 1)
        self.assertRaises(BadRequest, m.query, 0)


class TransferTests(Checks, SynchronousTestCase):
    """Minimal transfers: count the shards that change group."""

    def test_join_moves_only_what_balance_needs_and_only_to_the_new_group(self) -> None:
        for nshards in (1, 5, 10, 16):
            m = ShardMasterStateMachine(nshards)
            a = Admin(m)
            for gid in range(1, 21):
                before = m.latest
                self.assertEqual(a.join_gids(gid)["ok"], True)
                after = m.latest
                context = f"nshards={nshards} join {gid}"
                self.assertBalancedAndLive(after, context)
                changed = moved(before, after)
                self.assertEqual(len(changed), rebalance.min_moves(before.shards, after.groups), context)
                # From a balanced map only the newcomer needs shards.
                if gid > 1:
                    self.assertEqual({after.shards[s] for s in changed} - {gid}, set(), context)
                # Lower bound by counting: the newcomer's fair share.
                self.assertEqual(len(changed), after.shards.count(gid) if gid > 1 else nshards, context)

    def test_leave_moves_only_the_leaving_groups_shards(self) -> None:
        for nshards in (1, 5, 10, 16):
            m = ShardMasterStateMachine(nshards)
            a = Admin(m)
            a.join_gids(*range(1, 13))
            for gid in (4, 1, 12, 7, 2, 3, 5, 6, 8, 9, 10):
                before = m.latest
                self.assertEqual(a.leave(gid)["ok"], True)
                after = m.latest
                context = f"nshards={nshards} leave {gid}"
                self.assertBalancedAndLive(after, context)
                changed = moved(before, after)
                self.assertEqual(sorted(changed), list(before.shards_of(gid)), context)
                self.assertEqual(len(changed), rebalance.min_moves(before.shards, after.groups), context)
            self.assertEqual(m.latest.shards, (11,) * nshards)
            self.assertEqual(a.leave(11)["ok"], False)  # the last group stays

    def test_many_groups_join_and_leave_at_once(self) -> None:
        m = ShardMasterStateMachine(NSHARDS)
        a = Admin(m)
        self.assertEqual(a.join_gids(1, 2, 3, 4, 5), ok(1))
        self.assertEqual(sorted(m.latest.groups), [1, 2, 3, 4, 5])
        self.assertEqual(sorted(Counter(m.latest.shards).values()), [2, 2, 2, 2, 2])
        before = m.latest
        self.assertEqual(a.join_gids(6, 7, 8), ok(2))
        self.assertBalancedAndLive(m.latest)
        self.assertEqual(len(moved(before, m.latest)), rebalance.min_moves(before.shards, m.latest.groups))
        before = m.latest
        self.assertEqual(a.leave(1, 3, 5, 7), ok(3))
        self.assertEqual(sorted(m.latest.groups), [2, 4, 6, 8])
        self.assertBalancedAndLive(m.latest)
        leaving_shards = [s for s, g in enumerate(before.shards) if g in (1, 3, 5, 7)]
        self.assertEqual(moved(before, m.latest), leaving_shards)
        self.assertEqual(a.leave(2, 4, 6, 8)["ok"], False)  # every group left: refused
        self.assertEqual(a.leave(2, 4, 6), ok(4))
        self.assertEqual(m.latest.shards, (8,) * NSHARDS)

    def test_more_groups_than_shards(self) -> None:
        m = ShardMasterStateMachine(4)
        a = Admin(m)
        for gid in range(1, 8):
            a.join_gids(gid)
            self.assertBalancedAndLive(m.latest, f"join {gid}")
        self.assertEqual(len(m.latest.groups), 7)
        self.assertEqual(len(set(m.latest.shards)), 4)
        idle = sorted(set(m.latest.groups) - set(m.latest.shards))
        self.assertEqual(len(idle), 3)
        # An idle group leaving moves nothing.
        before = m.latest
        a.leave(idle[0])
        self.assertEqual(moved(before, m.latest), [])
        # A busy group leaving hands its one shard to an idle one.
        busy = m.latest.shards[0]
        a.leave(busy)
        self.assertBalancedAndLive(m.latest)
        self.assertIn(m.latest.shards[0], idle[1:])
        self.assertEqual(moved(m.query(m.latest.num - 1), m.latest), [0])


class MoveTests(Checks, SynchronousTestCase):
    def setUp(self) -> None:
        self.m = ShardMasterStateMachine(NSHARDS)
        self.a = Admin(self.m)
        self.a.join_gids(1)
        self.a.join_gids(2)

    def test_move_changes_exactly_one_shard(self) -> None:
        before = self.m.latest
        self.assertEqual(self.a.move(0, 2), ok(3))
        self.assertEqual(moved(before, self.m.latest), [0])
        self.assertEqual(self.m.latest.group_of_shard(0), 2)
        self.assertEqual(self.m.latest.groups, before.groups)

    def test_move_to_the_current_owner_still_makes_a_map(self) -> None:
        self.assertEqual(self.a.move(0, 1), ok(3))
        self.assertEqual(self.m.latest.shards, self.m.query(2).shards)

    def test_moves_survive_until_the_next_join_or_leave(self) -> None:
        # Pin everything to group 1 except shard 9, one move per map; each
        # later move and failed command must keep the earlier moves.
        for shard in range(5, 9):
            self.a.move(shard, 1)
        self.a.move(0, 2)
        pinned = (2, 1, 1, 1, 1, 1, 1, 1, 1, 2)
        self.assertEqual(self.m.latest.shards, pinned)
        self.assertEqual(self.a.join_gids(1)["ok"], False)  # refused: no new map
        self.assertEqual(self.a.leave(42)["ok"], False)
        self.assertEqual(self.m.latest.shards, pinned)
        self.assertEqual(self.m.latest.num, 7)
        for num in range(3, 8):
            self.assertNotEqual(self.m.query(num).shards, self.m.query(2).shards)
        # The next join rebalances from the pinned map, minimally.
        before = self.m.latest
        self.a.join_gids(3)
        self.assertBalancedAndLive(self.m.latest)
        self.assertEqual(len(moved(before, self.m.latest)), rebalance.min_moves(before.shards, [1, 2, 3]))
        # Group 2 kept both pinned shards it held: balance did not need them.
        self.assertLessEqual({0, 9}, set(self.m.latest.shards_of(2)))


class InterleavingTests(Checks, SynchronousTestCase):
    """Many clients' commands interleaved in one log (apply order = log order)."""

    def test_concurrent_joins_and_leaves_all_take_effect(self) -> None:
        rng = random.Random(SEED)
        m = ShardMasterStateMachine(NSHARDS)
        nclients = 10
        # Client c owns gids 100c+1..100c+3: joins all three, then leaves the
        # first. Commands of different clients are interleaved at random, each
        # client's in its own order; some commands are duplicated (retries).
        queues: dict[str, list[bytes]] = {}
        for c in range(nclients):
            client = f"client-{c}"
            gids = [100 * c + i for i in (1, 2, 3)]
            queues[client] = [
                encode_join({gids[0]: addrs(gids[0])}, client, 1),
                encode_join({gids[1]: addrs(gids[1]), gids[2]: addrs(gids[2])}, client, 2),
                encode_leave([gids[0]], client, 3),
            ]
        log: list[bytes] = []
        while any(queues.values()):
            client = rng.choice(sorted(c for c, q in queues.items() if q))
            command = queues[client].pop(0)
            log.append(command)
            if rng.random() < 0.3:
                log.append(command)
        answers: dict[bytes, dict[str, Any]] = {}
        for command in log:
            result = m.apply(command)
            context = f"SURFSHARD_SEED={SEED}"
            self.assertTrue(result["ok"], f"{result} {context}")
            if command in answers:
                self.assertEqual(result, answers[command], f"retry got another answer {context}")
            answers[command] = result
            self.assertBalancedAndLive(m.latest, context)
        expected = sorted(100 * c + i for c in range(nclients) for i in (2, 3))
        self.assertEqual(sorted(m.latest.groups), expected, f"SURFSHARD_SEED={SEED}")
        self.assertEqual(m.latest.num, 3 * nclients, f"one map per distinct command SURFSHARD_SEED={SEED}")

    def test_two_admins_racing_to_join_the_same_gid(self) -> None:
        # Both passed the server's pre-check against the same map; the log
        # orders them and apply refuses the second.
        m = ShardMasterStateMachine(NSHARDS)
        first = m.apply(encode_join({5: addrs(5)}, "admin-a", 1))
        second = m.apply(encode_join({5: ["other:1"]}, "admin-b", 1))
        self.assertEqual(first, ok(1))
        self.assertEqual(second["code"], "BAD_REQUEST")
        self.assertIn("group 5 already exists", second["message"])
        self.assertEqual(m.latest.addresses_of(5), tuple(addrs(5)))


class DedupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = ShardMasterStateMachine(NSHARDS)

    def test_retried_join_returns_the_first_answer(self) -> None:
        join = encode_join({1: addrs(1)}, "c", 1)
        self.assertEqual(self.m.apply(join), ok(1))
        self.assertEqual(self.m.apply(join), ok(1))  # not "group 1 already exists"
        self.assertEqual(self.m.latest.num, 1)

    def test_retried_leave_and_move_return_the_first_answer(self) -> None:
        self.m.apply(encode_join({1: addrs(1), 2: addrs(2)}, "c", 1))
        leave = encode_leave([1], "c", 2)
        self.assertEqual(self.m.apply(leave), ok(2))
        self.assertEqual(self.m.apply(leave), ok(2))
        move = encode_move(3, 2, "c", 3)
        self.assertEqual(self.m.apply(move), ok(3))
        self.assertEqual(self.m.apply(move), ok(3))
        self.assertEqual(self.m.latest.num, 3)

    def test_retry_of_a_refused_command_sees_the_same_refusal(self) -> None:
        refused = self.m.apply(encode_leave([9], "c", 1))
        self.assertEqual(refused["code"], "BAD_REQUEST")
        self.m.apply(encode_join({9: addrs(9)}, "other", 1))
        # Group 9 exists now, but the retry is the same request: same answer.
        self.assertEqual(self.m.apply(encode_leave([9], "c", 1)), refused)
        self.assertEqual(sorted(self.m.latest.groups), [9])

    def test_stale_sequence_is_refused_and_not_applied(self) -> None:
        self.m.apply(encode_join({1: addrs(1)}, "c", 5))
        result = self.m.apply(encode_join({2: addrs(2)}, "c", 4))
        self.assertEqual(result["code"], "BAD_REQUEST")
        self.assertIn("stale sequence 4", result["message"])
        self.assertEqual(sorted(self.m.latest.groups), [1])
        # The latest answer is still the one retries get.
        self.assertEqual(self.m.apply(encode_join({1: addrs(1)}, "c", 5)), ok(1))

    def test_clients_are_independent(self) -> None:
        self.assertEqual(self.m.apply(encode_join({1: addrs(1)}, "a", 1)), ok(1))
        self.assertEqual(self.m.apply(encode_join({2: addrs(2)}, "b", 1)), ok(2))

    def test_answers_are_copies(self) -> None:
        join = encode_join({1: addrs(1)}, "c", 1)
        self.m.apply(join)["num"] = 99
        self.assertEqual(self.m.apply(join), ok(1))

    def test_sessions_are_bounded_least_recently_used_first(self) -> None:
        self.patch(state, "MAX_SESSIONS", 3)
        self.m = ShardMasterStateMachine(NSHARDS)  # a table made under the patched bound
        for i, client in enumerate(("a", "b", "c")):
            self.m.apply(encode_join({i + 1: addrs(i + 1)}, client, 1))
        self.m.apply(encode_join({1: addrs(1)}, "a", 1))  # retry: "a" is now most recent
        self.m.apply(encode_join({4: addrs(4)}, "d", 1))  # evicts "b"
        self.assertEqual(self.m.stats()["sessions"], 3)
        self.assertEqual(self.m.apply(encode_join({1: addrs(1)}, "a", 1)), ok(1))
        # "b" was forgotten: its late retry is applied as new, and refused.
        self.assertEqual(self.m.apply(encode_join({2: addrs(2)}, "b", 1))["code"], "BAD_REQUEST")


# Bad input table: (name, raw command args, phrase the message must contain).
# Raw commands bypass the encoders, as an older or buggy proposer could.
_BAD_JOINS: list[tuple[str, Any, str]] = [
    ("empty join", {}, "at least one group"),
    ("gid 0", {0: ["h:1"]}, "gid 0 is reserved"),
    ("negative gid", {-3: ["h:1"]}, "must be in 1.."),
    ("gid too large", {1 << 64: ["h:1"]}, "must be in 1.."),
    ("string gid", {"4": ["h:1"]}, "must be an integer"),
    ("existing gid", {1: ["fresh:1"]}, "group 1 already exists"),
    ("empty address list", {4: []}, "address list is empty"),
    ("addresses not a list", {4: "h:1"}, "must be a list"),
    ("no port", {4: ["host"]}, "malformed address"),
    ("port 0", {4: ["host:0"]}, "malformed address"),
    ("port too large", {4: ["host:70000"]}, "malformed address"),
    ("no host", {4: [":80"]}, "malformed address"),
    ("bad host", {4: ["a b:80"]}, "malformed address"),
    ("address not a string", {4: [7000]}, "malformed address"),
    ("address twice in a group", {4: ["h:1", "h:1"]}, "listed twice"),
    ("address in two new groups", {4: ["h:1"], 5: ["h:1"]}, "already in group 4"),
    ("address of an existing group", {4: [addrs(1)[0]]}, "already in group 1"),
    ("too many nodes", {4: [f"h:{p}" for p in range(1, 40)]}, "over the limit"),
    ("groups not a map", [4], "map of gid"),
]
_BAD_LEAVES: list[tuple[str, Any, str]] = [
    ("empty leave", [], "at least one gid"),
    ("unknown gid", [3], "group 3 is unknown"),
    ("one unknown among known", [1, 3], "group 3 is unknown"),
    ("gid 0", [0], "gid 0 is reserved"),
    ("gid twice", [1, 1], "twice"),
    ("bool gid", [True], "must be an integer"),
    ("gids not a list", 1, "list of gids"),
]
_BAD_MOVES: list[tuple[str, Any, Any, str]] = [
    ("negative shard", -1, 1, "out of range"),
    ("shard = nshards", NSHARDS, 1, "out of range"),
    ("huge shard", 1 << 70, 1, "out of range"),
    ("string shard", "0", 1, "must be an integer"),
    ("unknown gid", 0 + 1, 3, "group 3 is unknown"),
    ("gid 0", 1, 0, "gid 0 is reserved"),
    ("negative gid", 1, -2, "must be in 1.."),
]


class BadInputTests(SynchronousTestCase):
    """Refused commands: clear BAD_REQUEST, and no map changes."""

    def setUp(self) -> None:
        self.m = ShardMasterStateMachine(NSHARDS)
        self.assertEqual(self.m.apply(encode_join({1: addrs(1), 2: addrs(2)}, "setup", 1)), ok(1))
        self.a = Admin(self.m, "bad-admin")

    def assertRefusedUnchanged(self, command: bytes, phrase: str, case: str) -> None:
        before_latest, before_num = self.m.latest, self.m.latest.num
        result = self.m.apply(command)
        self.assertEqual(result["ok"], False, case)
        self.assertEqual(result["code"], "BAD_REQUEST", case)
        self.assertIn(phrase, result["message"], case)
        self.assertEqual(self.m.latest.num, before_num, case)
        self.assertEqual(self.m.latest, before_latest, case)

    def test_bad_joins(self) -> None:
        for seq, (case, groups, phrase) in enumerate(_BAD_JOINS, start=1):
            command = raw({"op": "join", "groups": groups, "client": "x", "seq": seq})
            self.assertRefusedUnchanged(command, phrase, case)
            e = self.assertRaises(BadRequest, validate_join_args, groups, self.m.latest)
            self.assertIn(phrase, e.message, case)
            self.assertRaises(BadRequest, self.m.validate_join, groups)

    def test_bad_leaves(self) -> None:
        for seq, (case, gids, phrase) in enumerate(_BAD_LEAVES, start=1):
            command = raw({"op": "leave", "gids": gids, "client": "x", "seq": seq})
            self.assertRefusedUnchanged(command, phrase, case)
            e = self.assertRaises(BadRequest, validate_leave_args, gids, self.m.latest)
            self.assertIn(phrase, e.message, case)
            self.assertRaises(BadRequest, self.m.validate_leave, gids)

    def test_bad_moves(self) -> None:
        for seq, (case, shard, gid, phrase) in enumerate(_BAD_MOVES, start=1):
            command = raw({"op": "move", "shard": shard, "gid": gid, "client": "x", "seq": seq})
            self.assertRefusedUnchanged(command, phrase, case)
            e = self.assertRaises(BadRequest, validate_move_args, shard, gid, self.m.latest)
            self.assertIn(phrase, e.message, case)
            self.assertRaises(BadRequest, self.m.validate_move, shard, gid)

    def test_encoders_refuse_what_they_can_check_alone(self) -> None:
        # Without the current map: everything but membership and shard count.
        self.assertRaises(BadRequest, encode_join, {0: ["h:1"]}, "c", 1)
        self.assertRaises(BadRequest, encode_join, {4: []}, "c", 1)
        self.assertRaises(BadRequest, encode_join, {4: ["nope"]}, "c", 1)
        self.assertRaises(BadRequest, encode_leave, [], "c", 1)
        self.assertRaises(BadRequest, encode_leave, [0], "c", 1)
        self.assertRaises(BadRequest, encode_move, -1, 1, "c", 1)
        self.assertRaises(BadRequest, encode_move, 0, 0, "c", 1)
        for client, seq in (("", 1), (None, 1), ("c", 0), ("c", -1), ("c", True), ("x" * 200, 1)):
            self.assertRaises(BadRequest, encode_join, {4: ["h:1"]}, client, seq)
        # Checks that need the map pass here and are left to apply.
        encode_join({1: ["h:1"]}, "c", 1)
        encode_leave([99], "c", 1)
        encode_move(NSHARDS + 5, 99, "c", 1)

    def test_encoding_is_canonical_and_order_independent(self) -> None:
        one = encode_join({2: ["b:1"], 1: ["a:1"]}, "c", 1)
        two = encode_join({1: ["a:1"], 2: ["b:1"]}, "c", 1)
        self.assertEqual(one, two)
        self.assertEqual(encode_leave([3, 1, 2], "c", 1), encode_leave((1, 2, 3), "c", 1))
        decoded = cbor2.loads(one)
        self.assertEqual(decoded, {"op": "join", "groups": {1: ["a:1"], 2: ["b:1"]}, "client": "c", "seq": 1})

    def test_malformed_envelopes(self) -> None:
        good = {"op": "move", "shard": 0, "gid": 2, "client": "x", "seq": 1}
        cases: list[tuple[str, Any, str]] = [
            ("not CBOR", b"\xff\xfe", "not valid CBOR"),
            ("not bytes", "text", "must be bytes"),
            ("not a map", cbor2.dumps([1, 2]), "must be a map"),
            ("unknown op", raw({**good, "op": "split"}), "unknown command op"),
            ("no op", raw({k: v for k, v in good.items() if k != "op"}), "unknown command op"),
            ("missing key", raw({k: v for k, v in good.items() if k != "gid"}), "exactly the keys"),
            ("extra key", raw({**good, "force": True}), "exactly the keys"),
            ("bad client", raw({**good, "client": ""}), "client id"),
            ("bad seq", raw({**good, "seq": 0}), "seq must be"),
            ("deep nesting", b"\x81" * 100_000 + b"\x00", "not valid CBOR"),
        ]
        for case, command, phrase in cases:
            self.assertRefusedUnchanged(command, phrase, case)  # type: ignore[arg-type]
        # None of them created a session: "x" seq 1 is still fresh.
        self.assertEqual(self.m.apply(raw(good)), ok(2))

    def test_a_bug_in_rebalancing_is_internal_and_changes_nothing(self) -> None:
        def broken(*args: Any) -> tuple[int, ...]:
            raise RuntimeError("rebalance bug")

        self.patch(rebalance, "join", broken)
        before = self.m.snapshot()
        result = self.a.join_gids(3)
        self.assertEqual(result["code"], "INTERNAL")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.m.latest.num, 1)
        self.assertEqual(sorted(self.m.latest.groups), [1, 2])
        self.assertNotEqual(self.m.snapshot(), before)  # only the dedup answer was recorded
        restored = ShardMasterStateMachine(NSHARDS)
        restored.restore(self.m.snapshot())
        self.assertEqual(restored.query(-1), self.m.latest)


class SnapshotTests(SynchronousTestCase):
    def build(self, history_limit: int = 1000) -> ShardMasterStateMachine:
        m = ShardMasterStateMachine(NSHARDS, history_limit)
        a = Admin(m)
        a.join_gids(1, 2)
        a.join_gids(3)
        a.move(0, 3)
        a.leave(1)
        a.join_gids(1)
        a.leave(42)  # refused; its answer is in the dedup table
        Admin(m, "admin-2").join_gids(4)
        return m

    def test_restore_gives_an_equal_state(self) -> None:
        m = self.build()
        copy = ShardMasterStateMachine(NSHARDS)
        copy.restore(m.snapshot())
        self.assertEqual(copy.snapshot(), m.snapshot())
        for num in range(0, m.latest.num + 1):
            self.assertEqual(copy.query(num), m.query(num))
        # Dedup survives: retries answer as the first time, refused or not.
        retry_join = encode_join({4: addrs(4)}, "admin-2", 1)
        self.assertEqual(copy.apply(retry_join), ok(m.latest.num))
        retry_leave = encode_leave([42], "admin-1", 6)
        self.assertEqual(copy.apply(retry_leave), m.apply(retry_leave))
        self.assertEqual(copy.apply(retry_leave)["code"], "BAD_REQUEST")
        self.assertEqual(copy.snapshot(), m.snapshot())

    def test_snapshot_is_compact(self) -> None:
        # History is stored as differences: 200 maps of 1000 shards stay far
        # below 200 full maps (each ~1000+ bytes).
        m = ShardMasterStateMachine(1000)
        a = Admin(m)
        a.join_gids(1, 2)
        for i in range(198):
            a.move(i, 2)  # shards 0..499 are group 1's: each move changes one shard
        self.assertEqual(m.latest.num, 199)
        self.assertEqual(m.latest.shards.count(2), 500 + 198)
        full = sum(len(m.query(num).to_cbor()) for num in range(200))
        self.assertGreater(full, 200_000)
        self.assertLess(len(m.snapshot()), 20_000)

    def test_restore_into_a_smaller_history_keeps_the_newest(self) -> None:
        m = self.build()
        small = ShardMasterStateMachine(NSHARDS, history_limit=2)
        small.restore(m.snapshot())
        self.assertEqual(small.latest, m.latest)
        self.assertEqual(small.oldest_num, m.latest.num - 1)
        self.assertEqual(small.query(m.latest.num - 1), m.query(m.latest.num - 1))
        # And a trimmed snapshot restores, its base being a map other than 0.
        again = ShardMasterStateMachine(NSHARDS)
        again.restore(small.snapshot())
        self.assertEqual(again.oldest_num, m.latest.num - 1)
        self.assertEqual(again.latest, m.latest)

    def test_bad_snapshots_are_refused_and_change_nothing(self) -> None:
        m = self.build()
        before = m.snapshot()
        good = cbor2.loads(before)
        bad_delta = {"shards": [[0, 77]], "join": {}, "leave": []}  # gid 77 not a group
        cases: list[tuple[str, Any]] = [
            ("garbage", b"\x00\x01"),
            ("not a map", cbor2.dumps([])),
            ("wrong format", cbor2.dumps({**good, "format": 99})),
            ("other nshards", ShardMasterStateMachine(NSHARDS + 1).snapshot()),
            ("missing key", cbor2.dumps({k: v for k, v in good.items() if k != "sessions"})),
            ("inconsistent delta", cbor2.dumps({**good, "deltas": good["deltas"] + [bad_delta]})),
            (
                "shard out of range",
                cbor2.dumps({**good, "deltas": [{"shards": [[99, 0]], "join": {}, "leave": []}]}),
            ),
            ("leave unknown", cbor2.dumps({**good, "deltas": [{"shards": [], "join": {}, "leave": [5]}]})),
            ("bad session", cbor2.dumps({**good, "sessions": [["c", 0, {"ok": True, "num": 1}]]})),
            ("bad answer", cbor2.dumps({**good, "sessions": [["c", 1, {"ok": "yes"}]]})),
            ("bad base", cbor2.dumps({**good, "base": {"num": 0, "shards": [5] * NSHARDS, "groups": {}}})),
        ]
        for case, data in cases:
            self.assertRaises(BadRequest, m.restore, data)
            self.assertEqual(m.snapshot(), before, case)


# -- property ---------------------------------------------------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True)),
        st.tuples(st.just("leave"), st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True)),
        st.tuples(st.just("move"), st.tuples(st.integers(-1, 12), st.integers(0, 13))),
        st.tuples(st.just("retry"), st.just(None)),
    ),
    max_size=40,
)


#: Gids that are never live in the garbage test (only group 1 is).
_BAD_GIDS = st.integers(-2, 0) | st.integers(2, 3) | st.text(max_size=2) | st.none()


def _envelopes(op: str, **args: Any) -> Any:
    envelope = {"op": st.just(op), "client": st.just("fuzz"), "seq": st.just(1), **args}
    return st.fixed_dictionaries(envelope).map(raw)


class PropertyTests(Checks, SynchronousTestCase):
    @seed(SEED)
    @settings(deadline=None, max_examples=120)
    @given(nshards=st.integers(1, 12), ops=_OPS, snapshot_at=st.integers(0, 40))
    def test_random_join_leave_move_sequences(
        self, nshards: int, ops: list[tuple[str, Any]], snapshot_at: int
    ) -> None:
        context = f"nshards={nshards} ops={ops} SURFSHARD_SEED={SEED}"
        m = ShardMasterStateMachine(nshards)
        replica: ShardMasterStateMachine | None = None
        last_command: bytes | None = None
        last_answer: dict[str, Any] | None = None
        for seq, (kind, arg) in enumerate(ops, start=1):
            if seq - 1 == snapshot_at:
                replica = ShardMasterStateMachine(nshards)
                replica.restore(m.snapshot())
                self.assertEqual(replica.snapshot(), m.snapshot(), context)
            before = m.latest
            live = set(before.groups)
            if kind == "join":
                command = raw({"op": "join", "groups": {g: addrs(g) for g in arg}, "client": "p", "seq": seq})
                valid = not live & set(arg)
            elif kind == "leave":
                command = raw({"op": "leave", "gids": arg, "client": "p", "seq": seq})
                valid = set(arg) <= live
            elif kind == "move":
                shard, gid = arg
                command = raw({"op": "move", "shard": shard, "gid": gid, "client": "p", "seq": seq})
                valid = 0 <= shard < nshards and gid in live
            else:
                if last_command is None:
                    continue
                command, valid = last_command, False
            result = m.apply(command)
            if replica is not None:
                self.assertEqual(replica.apply(command), result, context)
            after = m.latest

            if kind == "retry":
                self.assertEqual(result, last_answer, context)
                self.assertEqual(after, before, context)
                continue
            last_command, last_answer = command, result
            step = f"step {seq} {kind} {arg} -> {result} {context}"
            if not valid:
                self.assertEqual(result["code"], "BAD_REQUEST", step)
                self.assertEqual(after, before, step)
                continue
            self.assertEqual(result, ok(before.num + 1), step)
            self.assertEqual(after.num, before.num + 1, step)
            if kind == "move":
                self.assertEqual(after.groups, before.groups, step)
                self.assertEqual(after.group_of_shard(arg[0]), arg[1], step)
                self.assertLessEqual(len(moved(before, after)), 1, step)
                continue
            expected_groups = live | set(arg) if kind == "join" else live - set(arg)
            self.assertEqual(set(after.groups), expected_groups, step)
            self.assertBalancedAndLive(after, step)
            self.assertEqual(
                len(moved(before, after)), rebalance.min_moves(before.shards, expected_groups), step
            )

        if replica is not None:
            self.assertEqual(replica.snapshot(), m.snapshot(), context)
        for num in range(m.oldest_num, m.latest.num + 1):
            self.assertEqual(m.query(num).num, num, context)

    @seed(SEED + 1)
    @settings(deadline=None, max_examples=150)
    @given(
        st.one_of(
            st.binary(max_size=64),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                ),
                max_leaves=12,
            ).map(lambda v: cbor2.dumps(v)),
            # Well-formed envelopes whose arguments are always invalid for a
            # machine holding only group 1 (so none may succeed).
            _envelopes(
                "join",
                groups=st.dictionaries(_BAD_GIDS | st.just(1), st.lists(st.text(max_size=10), max_size=2)),
            ),
            _envelopes("leave", gids=st.lists(_BAD_GIDS, max_size=3)),
            _envelopes("move", shard=st.integers(-2, 12), gid=_BAD_GIDS),
        )
    )
    def test_garbage_never_raises_or_changes_maps(self, command: bytes) -> None:
        m = ShardMasterStateMachine(NSHARDS)
        m.apply(encode_join({1: addrs(1)}, "setup", 1))
        before = m.latest
        result = m.apply(command)
        self.assertEqual(result["ok"], False, f"{command!r} SURFSHARD_SEED={SEED + 1}")
        self.assertEqual(result["code"], "BAD_REQUEST")
        self.assertEqual(m.latest, before)
