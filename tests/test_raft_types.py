"""The wire form of Raft messages and entry batches (``raft.types``): what
one node sends another must come back equal through CBOR, and anything a
bad peer could send is refused with ``ValueError`` before it is used."""

from __future__ import annotations

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from raft.types import (
    Entry,
    Message,
    MessageType,
    SnapshotMeta,
    entries_from_columns,
    entries_problem,
    entries_to_columns,
)


def through_cbor(m: Message) -> Message:
    return Message.from_wire(cbor2.loads(cbor2.dumps(m.to_wire())))


def append(entries: list[Entry], index: int = 4, **kw: object) -> Message:
    return Message(
        MessageType.APPEND, to=2, frm=1, term=7, index=index, log_term=3, entries=entries, commit=4, **kw
    )


@st.composite
def entry_runs(draw: st.DrawFn) -> tuple[int, list[Entry]]:
    first = draw(st.integers(1, 10**12))
    terms = sorted(draw(st.lists(st.integers(0, 2**40), min_size=1, max_size=40)))
    datas = draw(
        st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=len(terms), max_size=len(terms))
    )
    return first, [Entry(t, first + k, d) for k, (t, d) in enumerate(zip(terms, datas, strict=True))]


class EntryColumnsTests(SynchronousTestCase):
    @settings(deadline=None, max_examples=60)
    @given(entry_runs())
    def test_round_trip(self, run: tuple[int, list[Entry]]) -> None:
        first, entries = run
        terms, datas = entries_to_columns(entries)
        wire = cbor2.loads(cbor2.dumps([terms, datas]))
        self.assertEqual(entries_from_columns(first, *wire), entries)

    def test_one_term_is_one_integer(self) -> None:
        terms, datas = entries_to_columns([Entry(5, 1, b"a"), Entry(5, 2, None)])
        self.assertEqual((terms, datas), (5, [b"a", None]))

    def test_mixed_terms_are_runs(self) -> None:
        entries = [Entry(2, 10), Entry(2, 11), Entry(3, 12), Entry(5, 13), Entry(5, 14)]
        terms, _ = entries_to_columns(entries)
        self.assertEqual(terms, [2, 2, 3, 1, 5, 2])
        self.assertEqual(entries_from_columns(10, terms, [None] * 5), entries)

    def test_malformed_columns_refused(self) -> None:
        self.assertEqual(entries_from_columns(1, 1, [b"a"]), [Entry(1, 1, b"a")])
        for terms, datas, why in [
            (1, (b"a",), "payloads not a list"),
            (1, [b"a", "text"], "payload not bytes"),
            (1, [1], "payload an int"),
            (-1, [b"a"], "negative term"),
            ("1", [b"a"], "term not an int"),
            (True, [b"a"], "term a boolean"),
            ([1, 2], [b"a"], "runs cover 2 entries, 1 payload"),
            ([1], [b"a"], "odd run list"),
            ([1, 0, 2, 1], [b"a"], "empty run"),
            ([1, -1, 2, 2], [b"a"], "negative run length"),
            ([1, True], [b"a"], "run length a boolean"),
            ([1, 10**15], [b"a"], "huge run length (must not allocate)"),
        ]:
            with self.assertRaises(ValueError, msg=why):
                entries_from_columns(1, terms, datas)


class MessageWireTests(SynchronousTestCase):
    def test_round_trip_of_every_shape(self) -> None:
        meta = SnapshotMeta(9, 2, (1, 2, 3))
        messages = [
            append([Entry(3, 5, b"x"), Entry(7, 6, None), Entry(7, 7, b"")]),
            append([]),
            Message(
                MessageType.APPEND_RESP, to=1, frm=2, term=7, index=4, reject=True, reject_hint=2, hint_term=3
            ),
            Message(MessageType.HEARTBEAT, to=3, frm=1, term=7, commit=9, context=b"ri:4"),
            Message(MessageType.VOTE, to=2, frm=1, term=8, index=10, log_term=7, context=b"transfer"),
            Message(
                MessageType.SNAPSHOT, to=2, frm=1, term=7, snapshot_meta=meta, offset=10, data=b"z", done=True
            ),
            Message(MessageType.TIMEOUT_NOW, to=2, frm=1, term=7),
        ]
        for m in messages:
            self.assertEqual(through_cbor(m), m)

    def test_entries_are_numbered_from_the_index(self) -> None:
        m = through_cbor(append([Entry(7, 5, b"a"), Entry(7, 6, b"b")]))
        self.assertEqual([(e.index, e.term, e.data) for e in m.entries], [(5, 7, b"a"), (6, 7, b"b")])

    def test_entries_must_follow_the_index_to_be_sent(self) -> None:
        for entries in ([Entry(7, 6, b"a")], [Entry(7, 5, b"a"), Entry(7, 7, b"b")]):
            self.assertRaises(ValueError, append(entries).to_wire)

    def test_malformed_messages_refused(self) -> None:
        good = append([Entry(7, 5, b"a")]).to_wire()
        self.assertEqual(Message.from_wire(good).entries, [Entry(7, 5, b"a")])
        cases = {
            "not a map": [1, 2],
            "no type": {k: v for k, v in good.items() if k != "type"},
            "unknown type": {**good, "type": "gossip"},
            "type not a string": {**good, "type": ["append"]},
            "negative term": {**good, "term": -1},
            "boolean index": {**good, "index": True},
            "string commit": {**good, "commit": "4"},
            "reject not a boolean": {**good, "reject": 1},
            "context not bytes": {**good, "context": "ri:1"},
            "payload not bytes": {**good, "ed": ["a"]},
            "payloads without terms": {k: v for k, v in good.items() if k != "et"},
            "bad snapshot meta": {**good, "snapshot_meta": {"index": 1}},
        }
        for why, wire in cases.items():
            with self.assertRaises(ValueError, msg=why):
                Message.from_wire(wire)

    def test_unknown_keys_are_ignored(self) -> None:
        wire = {**append([]).to_wire(), "future_field": [1, 2, 3]}
        self.assertEqual(Message.from_wire(wire), append([]))


class EntriesProblemTests(SynchronousTestCase):
    def test_good_batch(self) -> None:
        self.assertEqual(entries_problem([Entry(2, 5, b"a"), Entry(3, 6, None)], 5, 2, 3), "")

    def test_each_problem_is_named(self) -> None:
        cases = [
            ([Entry(2, 5), (2, 6, None)], "not log entries"),
            ([Entry(2, 6)], "not contiguous"),
            ([Entry(2, 5), Entry(2, 7)], "not contiguous"),
            ([Entry(2, 5), Entry(2, 5)], "not contiguous"),
            ([Entry(1, 5)], "terms out of order"),  # below the previous entry's term
            ([Entry(4, 5)], "terms out of order"),  # beyond the message's term
            ([Entry(3, 5), Entry(2, 6)], "terms out of order"),
            ([Entry(2, 5, "text")], "data not bytes"),  # type: ignore[arg-type]
        ]
        for entries, expected in cases:
            self.assertIn(expected, entries_problem(entries, 5, 2, 3), entries)
