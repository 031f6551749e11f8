"""The metadata layer's fast paths answer exactly as the paths they shortcut.

- ``encode_update`` writes the update command by hand: the bytes must be
  cbor2's canonical encoding of the same map, for every valid input (the
  command is a file format: Raft logs on disk hold it);
- the validators accept common input in one step: they must accept and
  refuse (with the same message) exactly what their full checks do, which
  a str / list subclass forces them through;
- a leader applies the commands it encoded from memory, without decoding:
  states and results must be those of a replica that decodes;
- the dedup window keeps its answers in seq order instead of taking min():
  results must be those of the min() rule;
- ``MetadataReplica.updatefile`` maps results and failures with one
  callback pair: same answers as before, also after a lost leadership.

Property tests take their seed from ``SURFSHARD_SEED`` (printed on failure).
"""

from __future__ import annotations

import os
from typing import Any

import cbor2
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from raft.errors import ProposalDropped, RaftTimeout
from surfshard import errors
from surfshard.errors import BadRequest
from surfshard.keyspace import (
    MAX_FILENAME_BYTES,
    MAX_HASHLIST,
    MAX_VERSION,
    TOMBSTONE,
    shard_of,
    validate_filename,
    validate_hashlist,
    validate_version,
)
from surfshard.metadata import state as metadata
from surfshard.metadata.replica import MetadataReplica
from surfshard.metadata.state import MetadataStateMachine, encode_update
from surfshard.replica.control import DEFAULT_CALL_TIMEOUT
from surfshard.replica.dedup import MAX_CLIENT_ID_BYTES, ONE_SHOT_PREFIX, validate_client

SEED = int(os.environ.get("SURFSHARD_SEED", "20240502"))
H1, H2, H3 = "a1" * 32, "b2" * 32, "0123456789abcdef" * 4


class StrSub(str):
    """Not exactly str: takes a validator's full checks."""


class ListSub(list):
    """Not exactly list: takes validate_hashlist's full checks."""


def outcome(validate: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", validate(*args)
    except BadRequest as e:
        return "refused", e.message


def reference_command(name: str, version: int, hashlist: Any, client: str, seq: int) -> bytes:
    """What encode_update produced before it wrote the bytes itself."""
    command = {
        "op": "update",
        "name": name,
        "version": version,
        "hashlist": validate_hashlist(hashlist),
        "client": client,
        "seq": seq,
    }
    return cbor2.dumps(command, canonical=True)


# Lengths around the CBOR head boundaries (23/24, 255/256, 65535/65536).
BOUNDARY_INTS = [1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, MAX_VERSION]
no_surrogates = st.characters(blacklist_categories=("Cs",))
names = st.one_of(
    st.text(no_surrogates, min_size=1, max_size=300),
    st.sampled_from(["a", "x" * 23, "x" * 24, "x" * 255, "x" * 256, "\u00e9" * 12, "y" * MAX_FILENAME_BYTES]),
).filter(lambda n: outcome(validate_filename, n)[0] == "ok")
numbers = st.one_of(st.sampled_from(BOUNDARY_INTS), st.integers(min_value=1, max_value=MAX_VERSION))
hashes = st.text("0123456789abcdef", min_size=64, max_size=64)
hashlists = st.one_of(
    st.just(["0"]),
    st.just([]),
    st.lists(hashes, max_size=30),
    st.lists(hashes, max_size=3).map(tuple),
)
clients = st.text(no_surrogates, min_size=1, max_size=MAX_CLIENT_ID_BYTES).filter(
    lambda c: len(c.encode("utf-8")) <= MAX_CLIENT_ID_BYTES
)


class EncodingTests(SynchronousTestCase):
    @seed(SEED)
    @settings(deadline=None, max_examples=300)
    @given(name=names, version=numbers, hashlist=hashlists, client=clients, seq=numbers)
    def test_same_bytes_as_canonical_cbor(
        self, name: str, version: int, hashlist: Any, client: str, seq: int
    ) -> None:
        expected = reference_command(name, version, hashlist, client, seq)
        context = f"SURFSHARD_SEED={SEED}"
        self.assertEqual(encode_update(name, version, hashlist, client, seq), expected, context)
        self.assertEqual(
            MetadataStateMachine(1).encode_update(name, version, hashlist, client, seq), expected
        )

    def test_long_hash_lists(self) -> None:
        for count in (23, 24, 255, 256, 65535, 65536, MAX_HASHLIST):
            hashlist = [f"{i:064x}" for i in range(count)]
            self.assertEqual(
                encode_update("f", 1, hashlist, "c", 1), reference_command("f", 1, hashlist, "c", 1), count
            )

    def test_refuses_what_it_refused_before(self) -> None:
        bad_hashlists = [
            ["0", "0"],
            [H1, "0"],
            [H1.upper()],
            [H1[:-1]],
            [H1 + "a"],
            [H1[:31] + "x@" + H1[33:]],
            [H1 + "x@" + H2],
            [H1[:63], "a" + H2],
            [1],
            [H1, None],
            [b"0" * 64],
            "0" * 64,
            None,
            {H1: 1},
            [H1] * (MAX_HASHLIST + 1),
        ]
        for hashlist in bad_hashlists:
            self.assertRaises(BadRequest, encode_update, "f", 1, hashlist, "c", 1)
        self.assertRaises(UnicodeEncodeError, encode_update, "f", 1, [H1], "c\udc80", 1)


# Items that are valid hashes, almost valid, or the joiner in disguise.
hash_like = st.one_of(
    hashes,
    st.sampled_from(
        [
            "0",
            H1.upper(),
            H1[:63],
            H1 + "0",
            H1[:30] + "x@" + H1[32:],
            H1 + "x@" + H2,
            H1[:32] + "x@",
            "x@",
            "",
            "\u00e9" * 64,
        ]
    ),
    st.text(max_size=70),
    st.integers(),
    st.none(),
    st.binary(max_size=64),
)


class ValidatorTests(SynchronousTestCase):
    @seed(SEED + 1)
    @settings(deadline=None, max_examples=400)
    @given(
        name=st.one_of(st.text(max_size=40), st.sampled_from(["/a", "a/", "a\x00b", "\udc80", "x" * 5000]))
    )
    def test_filename_fast_path_agrees(self, name: str) -> None:
        self.assertEqual(
            outcome(validate_filename, name),
            outcome(validate_filename, StrSub(name)),
            f"SURFSHARD_SEED={SEED}",
        )

    @seed(SEED + 2)
    @settings(deadline=None, max_examples=400)
    @given(items=st.lists(hash_like, max_size=5), exact=st.sampled_from([list, tuple]))
    def test_hashlist_fast_path_agrees(self, items: list[Any], exact: type) -> None:
        fast = outcome(validate_hashlist, exact(items))
        self.assertEqual(fast, outcome(validate_hashlist, ListSub(items)), f"SURFSHARD_SEED={SEED + 2}")
        # And the rule itself: every item a hash, or exactly ["0"], or none.
        valid = items == ["0"] or all(
            isinstance(h, str) and len(h) == 64 and set(h) <= set("0123456789abcdef") for h in items
        )
        self.assertEqual(fast[0] == "ok", valid, f"{items!r} SURFSHARD_SEED={SEED + 2}")

    @seed(SEED + 3)
    @settings(deadline=None, max_examples=300)
    @given(
        client=st.one_of(st.text(max_size=140), st.sampled_from(["", "\udc80", "é" * 64, "é" * 65])),
        seq=st.one_of(st.sampled_from([0, 1, -1, MAX_VERSION, MAX_VERSION + 1, True]), st.integers()),
    )
    def test_client_fast_path_agrees(self, client: str, seq: int) -> None:
        self.assertEqual(
            outcome(validate_client, client, seq),
            outcome(validate_client, StrSub(client), seq),
            f"SURFSHARD_SEED={SEED + 3}",
        )

    def test_version_rule(self) -> None:
        for version in [1, 2, MAX_VERSION]:
            self.assertEqual(validate_version(version), version)
        for bad in [0, -1, MAX_VERSION + 1, True, 1.0, "1", None]:
            self.assertRaises(BadRequest, validate_version, bad)


class DecodedCommandTests(SynchronousTestCase):
    """A follower checks decoded fields in one expression first: it must
    accept and refuse what the validators, in their order, do."""

    @seed(SEED + 6)
    @settings(deadline=None, max_examples=400)
    @given(
        name=st.one_of(
            st.sampled_from(["a", "d\u00e9", "/a", "a/", "a\x00", "", "x" * 5000, 5, None]),
            st.text(max_size=8),
        ),
        version=st.sampled_from([1, 2, 0, -1, MAX_VERSION, MAX_VERSION + 1, True, 1.0, "1"]),
        hashlist=st.one_of(
            st.lists(hash_like, max_size=3), st.sampled_from([["0"], [], "x", None, {"a": 1}])
        ),
        client=st.sampled_from(["c", "\u00e9" * 64, "\u00e9" * 65, "", "c" * 129, 7, None]),
        seq=st.sampled_from([1, 5, 0, MAX_VERSION + 1, True, "1"]),
    )
    def test_decoded_fields_are_checked_as_the_validators_do(
        self, name: Any, version: Any, hashlist: Any, client: Any, seq: Any
    ) -> None:
        command = cbor2.dumps(
            {
                "op": "update",
                "name": name,
                "version": version,
                "hashlist": hashlist,
                "client": client,
                "seq": seq,
            }
        )
        expected: Any
        try:
            validate_filename(name)
            validate_version(version)
            validate_hashlist(hashlist)
            validate_client(client, seq)
        except BadRequest as e:
            expected = ("BAD_REQUEST", e.message)
        else:
            expected = ("ok", version == 1)
        result = MetadataStateMachine(1).apply(command)
        if result.get("code") == "BAD_REQUEST":
            got = ("BAD_REQUEST", result["message"])
        else:
            got = ("ok", result["ok"])
        self.assertEqual(got, expected, f"SURFSHARD_SEED={SEED + 6}")


# -- leader path: applying what this replica encoded ---------------------------

update_args = st.tuples(
    st.sampled_from(["a", "b", "dir/c", "d\u00e9"]),
    st.integers(min_value=1, max_value=4),
    st.sampled_from([[H1], [H1, H2], ["0"], [], (H3,)]),
    st.sampled_from(["c1", "c2"]),
    st.integers(min_value=1, max_value=8),
)


class LeaderApplyTests(SynchronousTestCase):
    @seed(SEED + 4)
    @settings(deadline=None, max_examples=150)
    @given(
        batches=st.lists(st.lists(update_args, max_size=6), max_size=10),
        window=st.sampled_from([2, 32]),
        nshards=st.sampled_from([1, 3]),
    )
    def test_leader_applies_as_a_follower_does(
        self, batches: list[list[tuple]], window: int, nshards: int
    ) -> None:
        """Proposals in batches (several in flight), retries included: the
        leader, remembering what it encoded, ends where a decoding replica
        does, answer for answer."""
        self.patch(metadata, "DEDUP_WINDOW", window)
        leader, follower = MetadataStateMachine(nshards), MetadataStateMachine(nshards)
        context = f"SURFSHARD_SEED={SEED + 4}"
        for batch in batches:
            commands = [leader.encode_update(*args) for args in batch]
            for command in commands:
                self.assertEqual(leader.apply(command), follower.apply(bytes(bytearray(command))), context)
        self.assertEqual(leader.snapshot(), follower.snapshot(), context)
        self.assertEqual(leader.getfileinfomap(), follower.getfileinfomap(), context)
        self.assertEqual(leader._encoded, {}, context)

    def test_a_command_committed_twice_is_answered_from_the_dedup_table(self) -> None:
        m = MetadataStateMachine(1)
        command = m.encode_update("a", 1, [H1], "c", 1)
        self.assertEqual(m.apply(command), {"ok": True, "version": 1})
        self.assertEqual(m.apply(command), {"ok": True, "version": 1})
        self.assertEqual(m.getfileinfo("a"), (1, (H1,)))

    def test_memory_is_bounded(self) -> None:
        self.patch(metadata, "_MAX_REMEMBERED", 8)
        m = MetadataStateMachine(1)
        commands = [m.encode_update(f"f{i}", 1, [H1], "c", i + 1) for i in range(20)]
        self.assertLessEqual(len(m._encoded), 8)
        # The forgotten ones are decoded instead: same outcome.
        for command in commands:
            self.assertEqual(m.apply(command), {"ok": True, "version": 1})
        self.assertEqual(len(m.getfileinfomap()), 20)
        self.assertEqual(m._encoded, {})

    def test_large_commands_are_not_remembered(self) -> None:
        m = MetadataStateMachine(1)
        many = [f"{i:064x}" for i in range(300)]  # ~20 KB
        command = m.encode_update("big", 1, many, "c", 1)
        self.assertEqual(m._encoded, {})
        self.assertEqual(m.apply(command), {"ok": True, "version": 1})
        self.assertEqual(m.getfileinfo("big"), (1, tuple(many)))

    def test_any_bytes_like_command_still_applies(self) -> None:
        m = MetadataStateMachine(1)
        m.encode_update("a", 1, [H1], "c", 1)
        self.assertEqual(m.apply(bytearray(encode_update("a", 1, [H1], "c", 1))), {"ok": True, "version": 1})
        self.assertEqual(m.apply(memoryview(encode_update("b", 1, [H1], "c", 2))), {"ok": True, "version": 1})
        self.assertEqual(m.apply(None)["code"], "BAD_REQUEST")  # type: ignore[arg-type]

    def test_tombstone_is_stored_as_the_shared_tombstone(self) -> None:
        m = MetadataStateMachine(1)
        m.apply(m.encode_update("a", 1, ("0",), "c", 1))
        self.assertEqual(m.getfileinfo("a"), (1, ("0",)))


# -- dedup window in seq order ----------------------------------------------------


class MinRuleModel:
    """The dedup rule as written before (min() over the stored seqs)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.floor: dict[str, int] = {}
        self.answers: dict[str, dict[int, Any]] = {}
        self.files: dict[str, int] = {}

    def apply(self, name: str, version: int, client: str, seq: int) -> Any:
        answers = self.answers.setdefault(client, {})
        floor = self.floor.get(client, 0)
        if seq in answers:
            return answers[seq]
        if seq <= floor or (len(answers) >= self.window and seq < min(answers)):
            return "stale"
        current = self.files.get(name, 0)
        if version == current + 1:
            self.files[name] = version
            answer: Any = ("ok", version)
        else:
            answer = ("mismatch", current)
        answers[seq] = answer
        if len(answers) > self.window:
            oldest = min(answers)
            del answers[oldest]
            self.floor[client] = max(floor, oldest)
        return answer


def summary(result: dict[str, Any]) -> Any:
    if result["ok"]:
        return ("ok", result["version"])
    if result["code"] == "VERSION_MISMATCH":
        return ("mismatch", result["current"])
    assert "stale sequence" in result["message"], result
    return "stale"


class DedupOrderTests(SynchronousTestCase):
    @seed(SEED + 5)
    @settings(deadline=None, max_examples=200)
    @given(
        ops=st.lists(
            st.tuples(
                st.sampled_from(["a", "b"]),
                st.integers(min_value=1, max_value=6),
                st.sampled_from(["c1", "c2"]),
                st.integers(min_value=1, max_value=14),
            ),
            max_size=60,
        ),
        window=st.integers(min_value=1, max_value=5),
        restore_at=st.integers(min_value=0, max_value=60),
    )
    def test_out_of_order_seqs_follow_the_min_rule(
        self, ops: list[tuple[str, int, str, int]], window: int, restore_at: int
    ) -> None:
        self.patch(metadata, "DEDUP_WINDOW", window)
        model = MinRuleModel(window)
        m = MetadataStateMachine(1)
        for i, (name, version, client, seq) in enumerate(ops):
            if i == restore_at:  # sessions rebuilt from a snapshot keep the order
                restored = MetadataStateMachine(1)
                restored.restore(m.snapshot())
                m = restored
            got = summary(m.apply(encode_update(name, version, [H1], client, seq)))
            self.assertEqual(
                got, model.apply(name, version, client, seq), f"op {i} SURFSHARD_SEED={SEED + 5}"
            )


# -- MetadataReplica.updatefile ----------------------------------------------------


class ScriptedNode:
    """A leader whose proposals fail as scripted, then commit when told."""

    node_id = 1
    leader_id = 1
    crashed = False
    is_leader = True

    def __init__(self, machine: MetadataStateMachine, failures: list[Exception] | None = None) -> None:
        self.machine = machine
        self.failures = list(failures or [])
        self.pending: list[tuple[bytes, defer.Deferred]] = []
        self.proposed: list[bytes] = []
        self.timeouts: list[float | None] = []

    tracer = None

    def propose(
        self, command: bytes, timeout: float | None = None, arrived: float | None = None
    ) -> defer.Deferred:
        self.proposed.append(command)
        self.timeouts.append(timeout)
        if self.failures:
            return defer.fail(self.failures.pop(0))
        d: defer.Deferred = defer.Deferred()
        self.pending.append((command, d))
        return d

    processed_now = 0

    def process_now(self) -> None:
        """RaftNode's: what was proposed is sent at once (here: counted, held until ``commit``)."""
        self.processed_now += 1

    def commit(self) -> None:
        pending, self.pending = self.pending, []
        for command, d in pending:
            d.callback(self.machine.apply(command))


class UpdatefileTests(SynchronousTestCase):
    def replica(
        self, failures: list[Exception] | None = None, machine: MetadataStateMachine | None = None
    ) -> tuple[MetadataReplica, ScriptedNode, task.Clock]:
        machine = machine or MetadataStateMachine(1)
        node = ScriptedNode(machine, failures)
        clock = task.Clock()
        replica = MetadataReplica(node, machine, {1: "127.0.0.1:7001"}, clock, poll_interval=0.02)
        return replica, node, clock

    def test_success_is_the_new_version_and_mismatch_an_error(self) -> None:
        replica, node, clock = self.replica()
        first = replica.updatefile("a", 1, [H1], "c", 1)
        stale = replica.updatefile("a", 1, [H2], "c", 2)
        clock.advance(0)  # the end of the turn: the batch is proposed
        node.commit()
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(self.failureResultOf(stale, errors.VersionMismatch).value.current, 1)

    def test_bad_input_is_refused_before_proposing(self) -> None:
        replica, node, _ = self.replica()
        for args in [("", 1, [H1]), ("a", 0, [H1]), ("a", 1, ["nothex"]), ("a", 1, "x"), ("a", True, [H1])]:
            self.assertRaises(BadRequest, replica.updatefile, *args)
        self.assertEqual(node.proposed, [])

    def test_wrong_group_carries_the_map_number(self) -> None:
        machine = MetadataStateMachine(2, owned=())
        machine.config_num = 7
        replica, node, clock = self.replica(machine=machine)
        d = replica.updatefile("a", 1, [H1], "c", 1)
        clock.advance(0)
        node.commit()
        error = self.failureResultOf(d, errors.WrongGroup).value
        self.assertEqual((error.num, error.details["shard"]), (7, shard_of("a", 2)))
        self.assertIn("does not serve shard", error.message)

    def test_a_lost_leadership_is_retried_and_still_answers_a_version(self) -> None:
        replica, node, clock = self.replica(failures=[ProposalDropped("lost")])
        d = replica.updatefile("a", 1, [H1], "c", 1, timeout=5.0)
        clock.advance(0)
        self.assertNoResult(d)
        for _ in range(5):
            clock.advance(0.01)
        node.commit()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(len(node.proposed), 2)
        self.assertEqual(node.proposed[0], node.proposed[1])  # same client id and seq: deduplicated

    def test_raft_timeout_is_a_timeout(self) -> None:
        replica, _, clock = self.replica(failures=[RaftTimeout("slow")])
        d = replica.updatefile("a", 1, [H1], "c", 1)
        clock.advance(0)
        self.failureResultOf(d, errors.Timeout)

    def test_callers_without_identity_get_one_per_call(self) -> None:
        replica, node, clock = self.replica()
        a = replica.updatefile("a", 1, [H1])
        b = replica.updatefile("a", 2, [H1])
        clock.advance(0)
        node.commit()
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), (1, 2))
        (batch,) = node.proposed
        commands = cbor2.loads(batch)["cmds"]
        self.assertEqual([c["seq"] for c in commands], [1, 1])
        self.assertNotEqual(commands[0]["client"], commands[1]["client"])
        self.assertTrue(all(c["client"].startswith(ONE_SHOT_PREFIX) for c in commands))

    def test_calls_without_identity_commit_in_any_order(self) -> None:
        # More than a dedup window of them (retried after a leader change,
        # say) committing in reverse order: each is its own call, none is
        # refused as stale (they were, when they shared one identity).
        replica, node, clock = self.replica()
        n = metadata.DEDUP_WINDOW + 8
        for i in range(n):
            replica.updatefile(f"f{i}", 1, [H1])
            clock.advance(0)  # one entry each
        fresh = MetadataStateMachine(1)
        answers = [fresh.apply(command) for command in reversed(node.proposed)]
        self.assertEqual([a.get("ok") for a in answers], [True] * n, answers[:3])
        self.assertEqual(sorted(fresh.version_of(f"f{i}") for i in range(n)), [1] * n)


class UpdateBatchTests(SynchronousTestCase):
    """The updates of one reactor turn travel as one Raft entry, and each is
    still answered on its own."""

    def replica(
        self, failures: list[Exception] | None = None, machine: MetadataStateMachine | None = None
    ) -> tuple[MetadataReplica, ScriptedNode, task.Clock]:
        return UpdatefileTests.replica(self, failures, machine)  # type: ignore[arg-type]

    def test_one_turn_is_one_entry_each_answered_alone(self) -> None:
        replica, node, clock = self.replica()
        ok = replica.updatefile("a", 1, [H1], "c1", 1)
        stale = replica.updatefile("b", 2, [H1], "c2", 1)  # b is new: mismatch, current 0
        again = replica.updatefile("a", 2, [H2], "c3", 1)  # sees the first one applied
        self.assertEqual(node.proposed, [], "proposed before the end of the turn")
        clock.advance(0)
        self.assertEqual(len(node.proposed), 1)
        self.assertEqual(cbor2.loads(node.proposed[0])["op"], metadata.OP_BATCH)
        self.assertNoResult(ok)
        node.commit()
        self.assertEqual(self.successResultOf(ok), 1)
        self.assertEqual(self.failureResultOf(stale, errors.VersionMismatch).value.current, 0)
        self.assertEqual(self.successResultOf(again), 2)
        self.assertEqual((replica.batches_proposed, replica.batched_updates), (1, 3))

    def test_the_next_turn_is_another_entry(self) -> None:
        replica, node, clock = self.replica()
        replica.updatefile("a", 1, [H1], "c", 1)
        clock.advance(0)
        replica.updatefile("a", 2, [H1], "c", 2)
        clock.advance(0)
        self.assertEqual(len(node.proposed), 2)
        # A batch of one is the plain update command.
        self.assertEqual([cbor2.loads(c)["op"] for c in node.proposed], [metadata.OP_UPDATE] * 2)

    def test_a_full_batch_is_proposed_at_once(self) -> None:
        replica, node, clock = self.replica()
        n = metadata.MAX_BATCH_COMMANDS + 3
        waiters = [replica.updatefile(f"f{i}", 1, [H1], "c", i + 1) for i in range(n)]
        self.assertEqual(len(node.proposed), 1)
        # Proposed mid-turn, replicated with the turn's other batches: one
        # Raft pass (one sync) at the end of the turn, not one per batch.
        self.assertEqual(node.processed_now, 0)
        clock.advance(0)
        self.assertEqual(node.processed_now, 1)
        self.assertEqual(
            [len(cbor2.loads(b)["cmds"]) for b in node.proposed], [metadata.MAX_BATCH_COMMANDS, 3]
        )
        node.commit()
        self.assertEqual([self.successResultOf(w) for w in waiters], [1] * n)

    def test_a_batch_waits_as_long_as_its_most_patient_caller(self) -> None:
        replica, node, clock = self.replica()
        replica.updatefile("a", 1, [H1], "c", 1, timeout=1.0)
        replica.updatefile("b", 1, [H1], "c", 2, timeout=5.0)
        clock.advance(0)
        replica.updatefile("c", 1, [H1], "c", 3, timeout=1.0)
        replica.updatefile("d", 1, [H1], "c", 4)  # no timeout: the server's default
        clock.advance(0)
        self.assertEqual(node.timeouts, [5.0, DEFAULT_CALL_TIMEOUT])

    def test_a_caller_with_a_shorter_timeout_is_answered_at_its_own(self) -> None:
        replica, node, clock = self.replica()
        quick = replica.updatefile("a", 1, [H1], "c", 1, timeout=1.0)
        patient = replica.updatefile("b", 1, [H1], "c", 2, timeout=5.0)
        clock.advance(0)
        clock.advance(1.0)
        self.failureResultOf(quick, errors.Timeout)
        self.assertNoResult(patient)
        node.commit()
        self.assertEqual(self.successResultOf(patient), 1)

    def test_a_failed_batch_fails_every_caller(self) -> None:
        replica, _, clock = self.replica(failures=[RaftTimeout("slow")])
        a = replica.updatefile("a", 1, [H1], "c", 1)
        b = replica.updatefile("b", 1, [H1], "c", 2)
        clock.advance(0)
        self.failureResultOf(a, errors.Timeout)
        self.failureResultOf(b, errors.Timeout)

    def test_a_lost_leadership_reproposes_the_same_batch(self) -> None:
        replica, node, clock = self.replica(failures=[ProposalDropped("lost")])
        a = replica.updatefile("a", 1, [H1], "c", 1, timeout=5.0)
        b = replica.updatefile("b", 1, [H1], "c", 2, timeout=5.0)
        for _ in range(5):
            clock.advance(0.01)
        node.commit()
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), (1, 1))
        self.assertEqual(len(node.proposed), 2)
        self.assertEqual(node.proposed[0], node.proposed[1])

    def test_a_cancelled_caller_does_not_disturb_the_others(self) -> None:
        replica, node, clock = self.replica()
        a = replica.updatefile("a", 1, [H1], "c", 1)
        b = replica.updatefile("b", 1, [H1], "c", 2)
        a.cancel()
        self.failureResultOf(a, defer.CancelledError)
        clock.advance(0)
        node.commit()
        self.assertEqual(self.successResultOf(b), 1)

    def test_not_leading_takes_the_one_at_a_time_path(self) -> None:
        replica, node, _ = self.replica()
        node.is_leader = False
        d = replica.updatefile("a", 1, [H1], "c", 1)
        self.failureResultOf(d, errors.NotLeader)
        self.assertEqual(node.proposed, [])


class BatchCommandTests(SynchronousTestCase):
    """``OP_BATCH`` in the state machine: the same answers and state as the
    updates applied one by one, on a leader (remembered) and a follower
    (decoded) alike."""

    def commands(self) -> list[bytes]:
        return [
            encode_update("a", 1, [H1], "c1", 1),
            encode_update("a", 1, [H2], "c2", 1),  # mismatch: a is at 1 by then
            encode_update("b", 1, [TOMBSTONE], "c1", 2),
            encode_update("a", 1, [H1], "c1", 1),  # a retry: answered from dedup
        ]

    def test_batch_bytes_are_canonical_cbor(self) -> None:
        commands = self.commands()
        wire = {"op": "batch", "cmds": [cbor2.loads(c) for c in commands]}
        self.assertEqual(metadata.encode_batch(commands), cbor2.dumps(wire, canonical=True))

    def test_batch_applies_like_its_updates_one_by_one(self) -> None:
        one_by_one = MetadataStateMachine(1)
        expected = [one_by_one.apply(c) for c in self.commands()]
        follower = MetadataStateMachine(1)
        got = follower.apply(metadata.encode_batch(self.commands()))
        self.assertEqual(got, {"ok": True, "results": expected})
        leader = MetadataStateMachine(1)
        commands = [leader.encode_update(*cbor2_args(c)) for c in self.commands()]
        self.assertEqual(leader.apply(leader.encode_batch(commands)), got)
        self.assertEqual(leader.snapshot(), one_by_one.snapshot())
        self.assertEqual(follower.snapshot(), one_by_one.snapshot())

    def test_a_malformed_update_is_refused_alone(self) -> None:
        bad = cbor2.dumps({"op": "update", "name": "x"}, canonical=True)
        m = MetadataStateMachine(1)
        got = m.apply(metadata.encode_batch([encode_update("a", 1, [H1], "c", 1), bad]))
        self.assertEqual(got["results"][0], {"ok": True, "version": 1})
        self.assertEqual(got["results"][1]["code"], errors.ErrorCode.BAD_REQUEST.value)
        self.assertEqual(m.version_of("a"), 1)

    def test_malformed_batches_are_refused_whole(self) -> None:
        m = MetadataStateMachine(1)
        before = m.snapshot()
        too_many = [
            encode_update(f"f{i}", 1, [H1], "c", i + 1) for i in range(metadata.MAX_BATCH_COMMANDS + 1)
        ]
        for wire in [
            {"op": "batch", "cmds": []},
            {"op": "batch", "cmds": "x"},
            {"op": "batch", "cmds": [cbor2.loads(c) for c in too_many]},
            {"op": "batch", "cmds": [], "extra": 1},
        ]:
            got = m.apply(cbor2.dumps(wire))
            self.assertEqual(
                got["code"], errors.ErrorCode.BAD_REQUEST.value, wire if len(str(wire)) < 200 else ""
            )
        nested = cbor2.dumps({"op": "batch", "cmds": [{"op": "batch", "cmds": []}]})
        self.assertEqual(m.apply(nested)["results"][0]["code"], errors.ErrorCode.BAD_REQUEST.value)
        self.assertEqual(m.snapshot(), before)
        self.assertRaises(ValueError, metadata.encode_batch, [])


def cbor2_args(command: bytes) -> tuple[str, int, list[str], str, int]:
    wire = cbor2.loads(command)
    return wire["name"], wire["version"], wire["hashlist"], wire["client"], wire["seq"]
