"""Tests for surfshard.replica.dedup, the one deduplication table of the
metadata shards and the ShardMaster."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from surfshard.replica.dedup import ONE_SHOT_PREFIX, DedupTable, OneShotIds


def offer(table: DedupTable[str], client: str, seq: int) -> str:
    """What a state machine does with one command: the stored answer, or
    "stale", or apply (answer "applied <seq>") and record."""
    session = table.touch(client)
    if seq in session.answers:
        return session.answers[seq]
    if session.is_stale(seq, table.window):
        return "stale"
    answer = f"applied {seq}"
    table.record(session, seq, answer)
    return answer


class WindowTests(SynchronousTestCase):
    def test_a_retry_gets_the_first_answer(self) -> None:
        t: DedupTable[str] = DedupTable(4, 10)
        self.assertEqual(offer(t, "c", 1), "applied 1")
        self.assertEqual(offer(t, "c", 1), "applied 1")
        self.assertEqual(t.sessions["c"].answers, {1: "applied 1"})

    def test_out_of_order_within_the_window_applies_once_each(self) -> None:
        t: DedupTable[str] = DedupTable(3, 10)
        for seq in (3, 1, 2):
            self.assertEqual(offer(t, "c", seq), f"applied {seq}")
        self.assertEqual(list(t.sessions["c"].answers), [1, 2, 3])  # kept in seq order

    def test_overflow_evicts_the_oldest_into_the_floor(self) -> None:
        t: DedupTable[str] = DedupTable(2, 10)
        for seq in (1, 2, 3):
            offer(t, "c", seq)
        session = t.sessions["c"]
        self.assertEqual((session.floor, list(session.answers)), (1, [2, 3]))
        self.assertEqual(offer(t, "c", 1), "stale")

    def test_a_never_seen_seq_older_than_a_full_window_is_stale(self) -> None:
        t: DedupTable[str] = DedupTable(2, 10)
        offer(t, "c", 5)
        offer(t, "c", 6)
        self.assertEqual(offer(t, "c", 4), "stale")
        self.assertNotIn(4, t.sessions["c"].answers)

    def test_window_one_is_latest_seq_only(self) -> None:
        """The Raft thesis's sessions (section 6.3), as the ShardMaster uses."""
        t: DedupTable[str] = DedupTable(1, 10)
        self.assertEqual(offer(t, "c", 5), "applied 5")
        self.assertEqual(offer(t, "c", 5), "applied 5")
        self.assertEqual(offer(t, "c", 4), "stale")
        self.assertEqual(offer(t, "c", 7), "applied 7")
        self.assertEqual(offer(t, "c", 5), "stale")


class SessionBoundTests(SynchronousTestCase):
    def test_least_recently_used_is_evicted(self) -> None:
        t: DedupTable[str] = DedupTable(4, 2)
        offer(t, "old", 1)
        offer(t, "mid", 1)
        offer(t, "old", 1)  # touching makes "mid" the least recent
        offer(t, "new", 1)
        self.assertEqual(list(t.sessions), ["old", "new"])

    def test_restore_refuses_a_second_session_for_a_client(self) -> None:
        t: DedupTable[str] = DedupTable(4, 2)
        t.restore("c", 0, {2: "b", 1: "a"})
        self.assertEqual(list(t.sessions["c"].answers), [1, 2])
        self.assertRaises(ValueError, t.restore, "c", 0, {})

    def test_bounds_must_be_positive(self) -> None:
        self.assertRaises(ValueError, DedupTable, 0, 1)
        self.assertRaises(ValueError, DedupTable, 1, 0)


class ExactlyOnceProperty(SynchronousTestCase):
    @settings(deadline=None, max_examples=200)
    @given(
        window=st.integers(min_value=1, max_value=5),
        seqs=st.lists(st.integers(min_value=1, max_value=12), max_size=40),
    )
    def test_no_seq_is_ever_applied_twice(self, window: int, seqs: list[int]) -> None:
        """Whatever order retries arrive in, each seq is applied at most once
        and a seq that was applied and is still stored answers as it did."""
        t: DedupTable[str] = DedupTable(window, 4)
        applied: list[int] = []
        for seq in seqs:
            before = dict(t.sessions["c"].answers) if "c" in t.sessions else {}
            answer = offer(t, "c", seq)
            if seq in before:
                self.assertEqual(answer, before[seq])
            elif answer != "stale":
                applied.append(seq)
        self.assertEqual(len(applied), len(set(applied)))
        self.assertLessEqual(len(t.sessions["c"].answers) if seqs else 0, window)

    @settings(deadline=None, max_examples=300)
    @given(
        window=st.integers(min_value=1, max_value=5),
        seqs=st.lists(st.integers(min_value=1, max_value=12), max_size=40),
        restore_at=st.integers(min_value=0, max_value=40),
    )
    def test_the_table_keeps_to_the_rules_it_states(
        self, window: int, seqs: list[int], restore_at: int
    ) -> None:
        """Against a model written from the module's rules (answers in seq
        order, the lowest evicted past the window and made the floor), every
        answer, the stored seqs and the floor agree after each offer, also
        across a rebuild from ``items`` (a snapshot) part way through."""
        t: DedupTable[str] = DedupTable(window, 4)
        model: dict[int, str] = {}
        floor = 0
        for i, seq in enumerate(seqs):
            if i == restore_at and "c" in t.sessions:
                copy: DedupTable[str] = DedupTable(window, 4)
                for client, session in t.items():
                    copy.restore(client, session.floor, dict(session.answers))
                t = copy
            if seq in model:
                expected = model[seq]
            elif seq <= floor or (len(model) >= window and seq < min(model)):
                expected = "stale"
            else:
                expected = model[seq] = f"applied {seq}"
                if len(model) > window:
                    oldest = min(model)
                    del model[oldest]
                    floor = max(floor, oldest)
            self.assertEqual(offer(t, "c", seq), expected, f"offer {i} of seq {seq}")
            session = t.sessions["c"]
            self.assertEqual(list(session.answers), sorted(model), f"stored seqs after offer {i}")
            self.assertEqual(session.floor, floor)
            self.assertEqual(session.newest, max(model, default=0))


class OneShotTests(SynchronousTestCase):
    """Callers without an identity get one per call, kept in a pool of
    their own so a flood of them never evicts a named client."""

    def test_ids_are_new_per_call_and_carry_the_prefix(self) -> None:
        a, b = OneShotIds(), OneShotIds()
        ids = [a.next(), a.next(), b.next()]
        self.assertEqual(len({client for client, _ in ids}), 3)
        self.assertEqual({seq for _, seq in ids}, {1})
        self.assertTrue(all(client.startswith(ONE_SHOT_PREFIX) for client, _ in ids))

    def test_a_flood_of_one_shot_calls_does_not_evict_named_clients(self) -> None:
        t: DedupTable[str] = DedupTable(4, 2, max_one_shot=3)
        offer(t, "alice", 1)
        offer(t, "bob", 1)
        ids = OneShotIds()
        for _ in range(100):
            offer(t, ids.next()[0], 1)
        self.assertEqual(list(t.sessions), ["alice", "bob"])
        self.assertEqual(len(t.one_shot), 3)
        self.assertEqual(len(t), 5)
        self.assertEqual(offer(t, "alice", 1), "applied 1")  # the stored answer: exactly once

    def test_items_and_restore_rebuild_the_same_table(self) -> None:
        t: DedupTable[str] = DedupTable(4, 2, max_one_shot=3)
        ids = OneShotIds()
        one = ids.next()[0]
        offer(t, "alice", 1)
        offer(t, one, 1)
        offer(t, "bob", 2)
        copy: DedupTable[str] = DedupTable(4, 2, max_one_shot=3)
        for client, session in t.items():
            copy.restore(client, session.floor, dict(session.answers))
        self.assertEqual(list(copy.sessions), ["alice", "bob"])
        self.assertEqual(list(copy.one_shot), [one])
        self.assertIn(one, copy)
        self.assertRaises(ValueError, copy.restore, one, 0, {})

    def test_without_a_one_shot_pool_they_are_ordinary_sessions(self) -> None:
        t: DedupTable[str] = DedupTable(1, 2)
        offer(t, OneShotIds().next()[0], 1)
        self.assertEqual((len(t.sessions), len(t.one_shot)), (1, 0))
