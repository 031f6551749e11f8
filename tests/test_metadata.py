"""Tests for surfshard.metadata.state.MetadataStateMachine."""

from __future__ import annotations

import os
from typing import Any

import cbor2
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from raft.interfaces import IStateMachine
from surfshard.errors import BadRequest, WrongGroup
from surfshard.keyspace import shard_of
from surfshard.metadata import state as metadata
from surfshard.metadata.state import MetadataStateMachine, encode_update

SEED = int(os.environ.get("SURFSHARD_SEED", "20240501"))

H1, H2, H3 = "a1" * 32, "b2" * 32, "c3" * 32
NSHARDS = 4


def names_in_shard(shard: int, count: int, nshards: int = NSHARDS) -> list[str]:
    found = [n for n in (f"file-{i}" for i in range(1000)) if shard_of(n, nshards) == shard]
    return found[:count]


def ok(version: int) -> dict[str, Any]:
    return {"ok": True, "version": version}


class Writer:
    """Applies updates as one client, numbering them like a client library."""

    def __init__(self, machine: MetadataStateMachine, client: str = "client-1") -> None:
        self.machine = machine
        self.client = client
        self.seq = 0

    def update(self, name: str, version: int, hashlist: list[str]) -> dict[str, Any]:
        self.seq += 1
        return self.machine.apply(encode_update(name, version, hashlist, self.client, self.seq))


class SurfStoreRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MetadataStateMachine(NSHARDS)
        self.w = Writer(self.m)

    def test_provides_state_machine_interface(self) -> None:
        self.assertTrue(verifyObject(IStateMachine, self.m))

    def test_new_file_needs_version_1(self) -> None:
        self.assertEqual(self.m.getfileinfo("a"), None)
        self.assertEqual(self.m.version_of("a"), 0)
        result = self.w.update("a", 2, [H1])
        self.assertEqual(result["code"], "VERSION_MISMATCH")
        self.assertEqual(result["current"], 0)
        self.assertFalse(result["ok"])
        self.assertEqual(self.m.getfileinfo("a"), None)
        self.assertEqual(self.w.update("a", 1, [H1, H2]), ok(1))
        self.assertEqual(self.m.getfileinfo("a"), (1, (H1, H2)))
        self.assertEqual(self.m.version_of("a"), 1)

    def test_update_must_be_exactly_stored_plus_one(self) -> None:
        self.w.update("a", 1, [H1])
        self.assertEqual(self.w.update("a", 2, [H2]), ok(2))
        for stale_or_ahead in (1, 2, 4, 100):
            result = self.w.update("a", stale_or_ahead, [H3])
            self.assertEqual((result["code"], result["current"]), ("VERSION_MISMATCH", 2), stale_or_ahead)
        self.assertEqual(self.m.getfileinfo("a"), (2, (H2,)))
        self.assertEqual(self.w.update("a", 3, [H3]), ok(3))

    def test_files_are_independent(self) -> None:
        self.w.update("a", 1, [H1])
        self.assertEqual(self.w.update("b", 1, [H2]), ok(1))
        self.assertEqual(self.m.getfileinfomap(), {"a": (1, (H1,)), "b": (1, (H2,))})

    def test_tombstone_deletes_and_recreate_continues_version(self) -> None:
        self.w.update("a", 1, [H1])
        self.w.update("a", 2, [H2])
        self.assertEqual(self.w.update("a", 3, ["0"]), ok(3))
        self.assertEqual(self.m.getfileinfo("a"), (3, ("0",)))
        self.assertEqual(self.m.version_of("a"), 3)
        self.assertEqual(self.m.getfileinfomap(), {"a": (3, ("0",))})
        # Re-creating at version 1 is a mismatch: the name remembers its history.
        self.assertEqual(self.w.update("a", 1, [H3])["current"], 3)
        self.assertEqual(self.w.update("a", 4, [H3]), ok(4))
        self.assertEqual(self.m.getfileinfo("a"), (4, (H3,)))

    def test_deleting_a_file_that_never_existed(self) -> None:
        self.assertEqual(self.w.update("ghost", 1, ["0"]), ok(1))
        self.assertEqual(self.m.getfileinfo("ghost"), (1, ("0",)))

    def test_reads_validate_names(self) -> None:
        self.assertRaises(BadRequest, self.m.getfileinfo, "")
        self.assertRaises(BadRequest, self.m.version_of, "/abs")

    def test_encode_update_validates(self) -> None:
        self.assertRaises(BadRequest, encode_update, "", 1, [H1], "c", 1)
        self.assertRaises(BadRequest, encode_update, "a", 0, [H1], "c", 1)
        self.assertRaises(BadRequest, encode_update, "a", 1, ["0", "0"], "c", 1)
        self.assertRaises(BadRequest, encode_update, "a", 1, [H1], "", 1)
        self.assertRaises(BadRequest, encode_update, "a", 1, [H1], "c", 0)
        self.assertRaises(BadRequest, encode_update, "a", 1, [H1], "c" * 129, 1)

    def test_command_encoding_is_fixed(self) -> None:
        # Commands live in Raft logs on disk: the encoding is a file format.
        # Canonical CBOR, keys by length: op, seq, name, client, version, hashlist.
        expected = bytes.fromhex(
            "a6" "626f70" "66757064617465" "63736571" "07" "646e616d65" "6161"
            "66636c69656e74" "626331" "6776657273696f6e" "01" "68686173686c697374" "81" "7840"
        ) + (b"ab" * 32)  # fmt: skip
        self.assertEqual(encode_update("a", 1, ["ab" * 32], "c1", 7), expected)


class DedupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MetadataStateMachine(NSHARDS)

    def apply(self, name: str, version: int, hashlist: list[str], client: str, seq: int) -> dict[str, Any]:
        return self.m.apply(encode_update(name, version, hashlist, client, seq))

    def test_retry_returns_first_answer_not_a_false_mismatch(self) -> None:
        self.assertEqual(self.apply("a", 1, [H1], "c1", 1), ok(1))
        # The reply was lost; the client retries the very same command.
        self.assertEqual(self.apply("a", 1, [H1], "c1", 1), ok(1))
        self.assertEqual(self.m.getfileinfo("a"), (1, (H1,)))
        # Even after other clients moved the file on.
        self.assertEqual(self.apply("a", 2, [H2], "c2", 1), ok(2))
        self.assertEqual(self.apply("a", 1, [H1], "c1", 1), ok(1))
        self.assertEqual(self.m.getfileinfo("a"), (2, (H2,)))

    def test_retry_of_a_mismatch_returns_the_mismatch_without_applying(self) -> None:
        first = self.apply("a", 2, [H1], "c1", 1)
        self.assertEqual(first["current"], 0)
        self.apply("a", 1, [H2], "c2", 1)  # now version 2 would succeed
        self.assertEqual(self.apply("a", 2, [H1], "c1", 1), first)
        self.assertEqual(self.m.getfileinfo("a"), (1, (H2,)))

    def test_out_of_order_within_window_applies_each_once(self) -> None:
        self.assertEqual(self.apply("a", 1, [H1], "c1", 3), ok(1))
        self.assertEqual(self.apply("b", 1, [H1], "c1", 2), ok(1))  # older seq, never seen: applied
        self.assertEqual(self.apply("b", 1, [H1], "c1", 2), ok(1))  # its retry: replayed
        self.assertEqual(self.apply("a", 1, [H1], "c1", 3), ok(1))
        self.assertEqual(self.m.version_of("b"), 1)

    def test_late_seqs_apply_until_the_window_moves_past_them(self) -> None:
        self.patch(metadata, "DEDUP_WINDOW", 3)
        self.m = MetadataStateMachine(NSHARDS)  # its shards' tables take the patched bound
        (name,) = names_in_shard(0, 1)
        self.assertEqual(self.apply(name, 1, [H1], "c1", 1), ok(1))
        self.assertEqual(self.apply(name, 9, [H1], "c1", 4)["current"], 1)
        self.assertEqual(self.apply(name, 9, [H1], "c1", 5)["current"], 1)  # window full: {1, 4, 5}
        # 2 and 3 arrive late, were never applied, and are newer than the
        # window's oldest: applied, each evicting the oldest answer.
        self.assertEqual(self.apply(name, 2, [H2], "c1", 2), ok(2))  # window {2, 4, 5}
        self.assertEqual(self.apply(name, 3, [H3], "c1", 3), ok(3))  # window {3, 4, 5}
        self.assertEqual(self.apply(name, 3, [H3], "c1", 3), ok(3))  # retry: replayed
        for evicted in (1, 2):
            stale = self.apply(name, 4, [H1], "c1", evicted)
            self.assertEqual(stale["code"], "BAD_REQUEST", evicted)
            self.assertIn(f"stale sequence {evicted}", stale["message"])
        self.assertEqual(self.m.getfileinfo(name), (3, (H3,)))

    def test_never_seen_seq_older_than_a_full_window_is_refused(self) -> None:
        self.patch(metadata, "DEDUP_WINDOW", 3)
        self.m = MetadataStateMachine(NSHARDS)  # its shards' tables take the patched bound
        (name,) = names_in_shard(0, 1)
        for seq in (4, 5, 6):
            self.apply(name, 9, [H1], "c1", seq)
        # Storing seq 2 would evict it at once, so a retry could not be told
        # it applied: refuse it instead, and apply nothing.
        self.assertEqual(self.apply(name, 1, [H1], "c1", 2)["code"], "BAD_REQUEST")
        self.assertEqual(self.m.getfileinfo(name), None)
        self.assertEqual(self.apply(name, 1, [H1], "c1", 7), ok(1))

    def test_dedup_is_per_client_and_per_shard(self) -> None:
        (a,) = names_in_shard(0, 1)
        (b,) = names_in_shard(1, 1)
        self.assertEqual(self.apply(a, 1, [H1], "c1", 1), ok(1))
        self.assertEqual(self.apply(a, 2, [H1], "c2", 1), ok(2))  # other client, same seq
        self.assertEqual(self.apply(b, 1, [H1], "c1", 1), ok(1))  # other shard, same client and seq
        self.assertEqual(self.m.stats()["sessions"], 3)

    def test_sessions_per_shard_are_bounded_least_recently_used_first(self) -> None:
        self.patch(metadata, "MAX_SESSIONS_PER_SHARD", 2)
        self.m = MetadataStateMachine(NSHARDS)  # its shards' tables take the patched bound
        (a,) = names_in_shard(0, 1)
        self.apply(a, 1, [H1], "old", 1)
        self.apply(a, 2, [H1], "mid", 1)
        self.apply(a, 1, [H1], "old", 1)  # replay touches "old": "mid" is now least recent
        self.apply(a, 3, [H1], "new", 1)  # evicts "mid"
        self.assertEqual(self.m.stats()["sessions"], 2)
        self.assertEqual(self.apply(a, 1, [H1], "old", 1), ok(1))  # still remembered
        # "mid" was forgotten: its retry is applied as new, and CAS refuses it.
        self.assertEqual(self.apply(a, 2, [H1], "mid", 1)["current"], 3)
        self.assertEqual(self.m.version_of(a), 3)


class MalformedCommandTests(SynchronousTestCase):
    def test_malformed_commands_return_errors_and_change_nothing(self) -> None:
        m = MetadataStateMachine(NSHARDS)
        Writer(m).update("a", 1, [H1])
        before = m.snapshot()
        good = cbor2.loads(encode_update("b", 1, [H1], "c", 1))
        cases: list[Any] = [
            b"",
            b"\xff\x00garbage",
            b"\x9f",  # truncated indefinite array
            b"\x81" * 100_000,  # deeply nested arrays
            None,
            "text",
            cbor2.dumps([1, 2]),
            cbor2.dumps({"op": "delete"}),
            cbor2.dumps({**good, "op": None}),
            cbor2.dumps({k: v for k, v in good.items() if k != "seq"}),
            cbor2.dumps({**good, "extra": 1}),
            cbor2.dumps({**good, "name": ""}),
            cbor2.dumps({**good, "name": "/a"}),
            cbor2.dumps({**good, "name": 5}),
            cbor2.dumps({**good, "version": True}),
            cbor2.dumps({**good, "version": 0}),
            cbor2.dumps({**good, "version": 1.0}),
            cbor2.dumps({**good, "hashlist": [H1, "0"]}),
            cbor2.dumps({**good, "hashlist": ["0", H1]}),
            cbor2.dumps({**good, "hashlist": H1}),
            cbor2.dumps({**good, "client": ""}),
            cbor2.dumps({**good, "client": 7}),
            cbor2.dumps({**good, "seq": 0}),
            cbor2.dumps({**good, "seq": -1}),
            cbor2.dumps({**good, "seq": 1 << 70}),
        ]
        for i, command in enumerate(cases):
            result = m.apply(command)
            self.assertEqual((result["ok"], result["code"]), (False, "BAD_REQUEST"), f"case {i}: {result}")
            self.assertIsInstance(result["message"], str)
            self.assertEqual(m.snapshot(), before, f"case {i} changed the state")
        # The well-formed version of the same command does apply.
        self.assertEqual(m.apply(cbor2.dumps(good)), ok(1))

    def test_a_bug_in_apply_is_an_internal_error_not_a_crash(self) -> None:
        m = MetadataStateMachine(NSHARDS)

        def broken(*args: object) -> object:
            raise KeyError("bug")

        self.patch(metadata, "shard_of", broken)
        result = m.apply(encode_update("a", 1, [H1], "c", 1))
        self.assertEqual(result["code"], "INTERNAL")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class OwnershipTests(SynchronousTestCase):
    def test_unowned_shards_answer_wrong_group(self) -> None:
        m = MetadataStateMachine(NSHARDS, owned=[0])
        (mine,) = names_in_shard(0, 1)
        (other,) = names_in_shard(2, 1)
        self.assertEqual(m.owned_shards, frozenset({0}))
        self.assertEqual(Writer(m).update(mine, 1, [H1]), ok(1))
        result = Writer(m, "c2").update(other, 1, [H1])
        self.assertEqual((result["code"], result["shard"]), ("WRONG_GROUP", 2))
        self.assertRaises(WrongGroup, m.getfileinfo, other)
        self.assertRaises(WrongGroup, m.version_of, other)
        self.assertRaises(WrongGroup, m.export_shard, 2)
        self.assertEqual(m.getfileinfomap(), {mine: (1, (H1,))})

    def test_constructor_checks(self) -> None:
        self.assertEqual(MetadataStateMachine().owned_shards, frozenset({0}))
        self.assertEqual(MetadataStateMachine(4, owned=()).owned_shards, frozenset())
        for bad in (0, True, "4"):
            self.assertRaises(ValueError, MetadataStateMachine, bad)
        self.assertRaises(ValueError, MetadataStateMachine, 4, owned=[4])

    def test_export_import_moves_files_and_dedup(self) -> None:
        source = MetadataStateMachine(NSHARDS)
        target = MetadataStateMachine(NSHARDS, owned=())
        moving = names_in_shard(1, 3)
        staying = names_in_shard(3, 2)
        w = Writer(source)
        for name in moving + staying:
            w.update(name, 1, [H1])
        w.update(moving[0], 2, ["0"])
        last_seq_on_moving = w.seq
        last_command = encode_update(moving[0], 2, ["0"], w.client, last_seq_on_moving)

        data = source.export_shard(1)
        target.import_shard(1, data)
        source.release_shard(1)

        self.assertEqual(target.owned_shards, frozenset({1}))
        self.assertEqual(source.owned_shards, frozenset({0, 2, 3}))
        self.assertEqual(
            target.getfileinfomap(), {moving[0]: (2, ("0",)), moving[1]: (1, (H1,)), moving[2]: (1, (H1,))}
        )
        for name in moving:
            self.assertRaises(WrongGroup, source.getfileinfo, name)
        self.assertEqual(set(source.getfileinfomap()), set(staying))
        # The client's retry of its last write, now routed to the new group,
        # gets the first answer: the dedup entry moved with the shard.
        self.assertEqual(target.apply(last_command), ok(2))
        self.assertEqual(target.version_of(moving[0]), 2)
        # Exporting again from the target gives the same bytes: nothing lost.
        self.assertEqual(target.export_shard(1), data)

    def test_import_refuses_bad_exports_without_change(self) -> None:
        source = MetadataStateMachine(NSHARDS)
        for name in names_in_shard(1, 2) + names_in_shard(2, 2):
            Writer(source, name).update(name, 1, [H1])
        target = MetadataStateMachine(NSHARDS, owned=[0])
        before = target.snapshot()
        export1 = source.export_shard(1)
        wire = cbor2.loads(export1)
        other_shard_file = names_in_shard(2, 1)[0]
        bad: list[Any] = [
            (2, export1),  # export of shard 1 imported as shard 2
            (1, MetadataStateMachine(8).export_shard(1)),  # other shard count
            (1, b"not cbor \xff"),
            (1, cbor2.dumps([1])),
            (1, cbor2.dumps({**wire, "format": 99})),
            (1, cbor2.dumps({**wire, "files": {**wire["files"], other_shard_file: [1, [H1]]}})),
            (1, cbor2.dumps({**wire, "files": {"x/": [1, [H1]]}})),
            (1, cbor2.dumps({**wire, "sessions": [["c", 0, [[1, True]]]]})),
            (1, cbor2.dumps({**wire, "sessions": [["c", 5, [[3, True, 1]]]]})),  # answer below floor
            (1, cbor2.dumps({**wire, "sessions": [["c", 0, []], ["c", 0, []]]})),
            (1, cbor2.dumps({**wire, "unexpected": 1})),
        ]
        for i, (shard, data) in enumerate(bad):
            self.assertRaises(BadRequest, target.import_shard, shard, data)
            self.assertEqual(target.snapshot(), before, f"case {i} changed the state")
        self.assertRaises(ValueError, target.import_shard, 4, export1)


class SnapshotTests(SynchronousTestCase):
    def populated(self) -> MetadataStateMachine:
        m = MetadataStateMachine(NSHARDS, owned=[0, 1, 3])
        for i, name in enumerate(names_in_shard(0, 3) + names_in_shard(1, 3) + names_in_shard(3, 2)):
            w = Writer(m, f"client-{i % 3}")
            w.seq = i * 10
            w.update(name, 1, [H1, H2][: 1 + i % 2])
            if i % 3 == 0:
                w.update(name, 2, ["0"])
        return m

    def test_snapshot_restore_roundtrip(self) -> None:
        m = self.populated()
        data = m.snapshot()
        copy = MetadataStateMachine(NSHARDS, owned=())
        copy.restore(data)
        self.assertEqual(copy.snapshot(), data)
        self.assertEqual(copy.getfileinfomap(), m.getfileinfomap())
        self.assertEqual(copy.owned_shards, m.owned_shards)
        self.assertEqual(copy.stats(), m.stats())

    def test_snapshot_is_canonical(self) -> None:
        # The same state reached through different insertion orders encodes
        # identically (files are a CBOR map, sorted on encoding).
        a, b = MetadataStateMachine(1), MetadataStateMachine(1)
        a.apply(encode_update("x", 1, [H1], "c", 1))
        a.apply(encode_update("y", 1, [H1], "d", 1))
        b.apply(encode_update("y", 1, [H1], "d", 1))
        b.apply(encode_update("x", 1, [H1], "c", 1))
        self.assertEqual(
            cbor2.loads(a.snapshot())["shards"][0]["files"], cbor2.loads(b.snapshot())["shards"][0]["files"]
        )
        self.assertEqual(
            cbor2.dumps(cbor2.loads(a.snapshot())["shards"][0]["files"], canonical=True),
            cbor2.dumps(cbor2.loads(b.snapshot())["shards"][0]["files"], canonical=True),
        )

    def test_restore_replaces_everything(self) -> None:
        m = self.populated()
        empty = MetadataStateMachine(NSHARDS, owned=[2]).snapshot()
        m.restore(empty)
        self.assertEqual(m.getfileinfomap(), {})
        self.assertEqual(m.owned_shards, frozenset({2}))

    def test_restore_refuses_bad_snapshots_without_change(self) -> None:
        m = self.populated()
        before = m.snapshot()
        wire = cbor2.loads(before)
        bad = [
            b"",
            b"\xff",
            cbor2.dumps([]),
            cbor2.dumps({**wire, "format": 3}),
            cbor2.dumps({**wire, "incoming": {0: {"num": 1}}}),
            cbor2.dumps(
                {**wire, "outgoing": {0: {"num": 1, "to": 2, "state": wire["shards"][0]}}}
            ),  # also serving
            cbor2.dumps({**wire, "acks": {}}),
            cbor2.dumps({**wire, "nshards": 8}),
            cbor2.dumps({**wire, "shards": []}),
            cbor2.dumps({**wire, "shards": {**wire["shards"], 4: wire["shards"][0]}}),
            cbor2.dumps({**wire, "shards": {**wire["shards"], "1": wire["shards"][0]}}),
            cbor2.dumps(
                {**wire, "shards": {**wire["shards"], 2: wire["shards"][0]}}
            ),  # files of shard 0 under 2
            cbor2.dumps({**wire, "shards": {0: {"files": {}}}}),
        ]
        for i, data in enumerate(bad):
            self.assertRaises(BadRequest, m.restore, data)
            self.assertEqual(m.snapshot(), before, f"case {i} changed the state")


# -- properties -------------------------------------------------------------------

NAMES = ["a", "b", "dir/c", "d\u00e9", "e", "f"]
CLIENTS = ["c1", "c2", "c3"]

updates = st.builds(
    encode_update,
    st.sampled_from(NAMES),
    st.integers(min_value=1, max_value=5),
    st.one_of(st.just(["0"]), st.lists(st.sampled_from([H1, H2, H3]), min_size=1, max_size=3)),
    st.sampled_from(CLIENTS),
    st.integers(min_value=1, max_value=12),
)
garbage = st.one_of(
    st.binary(max_size=16),
    st.sampled_from(
        [cbor2.dumps({"op": "update", "name": "a"}), cbor2.dumps(["update"]), cbor2.dumps({"op": "x"})]
    ),
)
commands = st.lists(st.one_of(updates, updates, updates, garbage), max_size=60)


class PropertyTests(SynchronousTestCase):
    def run_split(self, cmds: list[bytes], split: int) -> None:
        whole = MetadataStateMachine(NSHARDS, owned=[0, 1, 2])
        first = MetadataStateMachine(NSHARDS, owned=[0, 1, 2])
        results_whole = [whole.apply(c) for c in cmds]
        results_split = [first.apply(c) for c in cmds[:split]]
        second = MetadataStateMachine(NSHARDS, owned=[3])  # different start: restore must replace it
        second.restore(first.snapshot())
        results_split += [second.apply(c) for c in cmds[split:]]
        context = f"split={split} SURFSHARD_SEED={SEED}"
        self.assertEqual(results_split, results_whole, context)
        self.assertEqual(second.snapshot(), whole.snapshot(), context)
        self.assertEqual(second.getfileinfomap(), whole.getfileinfomap(), context)

    @seed(SEED)
    @settings(deadline=None, max_examples=80)
    @given(cmds=commands, split=st.integers(min_value=0, max_value=60))
    def test_restore_midway_gives_identical_states_and_results(self, cmds: list[bytes], split: int) -> None:
        self.run_split(cmds, min(split, len(cmds)))

    @seed(SEED + 1)
    @settings(deadline=None, max_examples=40)
    @given(cmds=commands, split=st.integers(min_value=0, max_value=60))
    def test_same_with_small_dedup_limits(self, cmds: list[bytes], split: int) -> None:
        # Small limits make window and session eviction happen constantly.
        self.patch(metadata, "DEDUP_WINDOW", 2)
        self.patch(metadata, "MAX_SESSIONS_PER_SHARD", 2)
        self.m = MetadataStateMachine(NSHARDS)  # its shards' tables take the patched bound
        self.run_split(cmds, min(split, len(cmds)))

    @seed(SEED + 2)
    @settings(deadline=None, max_examples=80)
    @given(
        ops=st.lists(
            st.tuples(
                st.sampled_from(NAMES),
                st.integers(min_value=1, max_value=5),
                st.one_of(st.just(["0"]), st.lists(st.sampled_from([H1, H2]), min_size=1, max_size=2)),
                st.booleans(),
            ),
            max_size=50,
        )
    )
    def test_matches_a_plain_dict_model(self, ops: list[tuple[str, int, list[str], bool]]) -> None:
        """With fresh sequence numbers (plus immediate retries), results follow
        the SurfStore rule on a plain dict, and a retry repeats its answer."""
        m = MetadataStateMachine(NSHARDS)
        model: dict[str, tuple[int, tuple[str, ...]]] = {}
        for seq, (name, version, hashlist, retry) in enumerate(ops, start=1):
            command = encode_update(name, version, hashlist, "c", seq)
            current = model.get(name, (0, ()))[0]
            if version == current + 1:
                model[name] = (version, tuple(hashlist))
                expected: dict[str, Any] = ok(version)
            else:
                expected = {"ok": False, "code": "VERSION_MISMATCH", "current": current}
            result = m.apply(command)
            result.pop("message", None)
            self.assertEqual(result, expected, f"op {seq} SURFSHARD_SEED={SEED + 2}")
            if retry:
                again = m.apply(command)
                again.pop("message", None)
                self.assertEqual(again, expected, f"retry of op {seq} SURFSHARD_SEED={SEED + 2}")
        self.assertEqual(m.getfileinfomap(), model)
