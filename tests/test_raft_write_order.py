"""The order in which RaftNode writes, sends and applies.

One real node, its peers played by the test: every ``storage.append``,
``storage.sync`` and ``transport.send`` lands in one event list, so the
order Raft's safety depends on is checked directly:

- a follower writes and syncs entries before it acknowledges them;
- a leader may send its appends before its own write of them (thesis
  10.2.1), but counts itself towards a commit only once they are written;
- votes are on disk before the messages that rely on them leave;
- a Ready is sent, then applied, in one pass: an acknowledgement leaves
  before the apply of what it commits, and no reactor pass lies between;
- ``process_now`` sends a proposal's appends in the caller's pass.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from raft.interfaces import ITransport
from raft.node import RaftNode
from raft.storage import MemoryStorage
from raft.types import Entry, Message, MessageType, RaftConfig

Event = tuple[Any, ...]


class RecordingStorage(MemoryStorage):
    def __init__(self, events: list[Event]) -> None:
        super().__init__()
        self.events = events

    def append(self, entries: list[Entry]) -> None:
        self.events.append(("write", tuple(e.index for e in entries)))
        super().append(entries)

    def sync(self) -> None:
        self.events.append(("sync",))
        super().sync()


@implementer(ITransport)
class RecordingTransport:
    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.sent: list[Message] = []
        self.handler: Any = None

    def send(self, message: Message) -> None:
        self.sent.append(message)
        self.events.append(("send", message.type, message.to, tuple(e.index for e in message.entries)))

    def flush(self) -> None:
        pass

    def set_handler(self, handler: Any) -> None:
        self.handler = handler


class NullMachine:
    def __init__(self, events: list[Event] | None = None) -> None:
        self.applied: list[bytes] = []
        self.events = events

    def apply(self, command: bytes) -> bytes:
        self.applied.append(command)
        if self.events is not None:
            self.events.append(("apply", command))
        return command

    def snapshot(self) -> bytes:
        return b""

    def restore(self, data: bytes) -> None:
        pass


class WriteOrderTests(SynchronousTestCase):
    def node(self, node_id: int) -> tuple[RaftNode, RecordingTransport, list[Event], Clock]:
        events: list[Event] = []
        clock = Clock()
        transport = RecordingTransport(events)
        node = RaftNode(
            RaftConfig(id=node_id, peers=(1, 2, 3)),
            RecordingStorage(events),
            transport,
            NullMachine(events),
            clock,
        )
        node.startService()
        self.addCleanup(node.stopService)
        return node, transport, events, clock

    def reply(self, node: RaftNode, clock: Clock, message: Message) -> None:
        node._on_message(message)
        clock.advance(0)

    def elect(self, node: RaftNode, transport: RecordingTransport, clock: Clock) -> None:
        """Make node 1 leader with node 2's votes, its no-op acknowledged."""
        node.campaign()
        clock.advance(0)
        for _ in range(3):  # pre-vote, then vote (bounded)
            if node.is_leader:
                break
            request = next(m for m in reversed(transport.sent) if m.to == 2)
            kind = {MessageType.PRE_VOTE: MessageType.PRE_VOTE_RESP, MessageType.VOTE: MessageType.VOTE_RESP}
            self.reply(node, clock, Message(type=kind[request.type], to=1, frm=2, term=request.term))
        self.assertTrue(node.is_leader, "node 1 was not elected")
        # Both followers take the new leader's no-op: their progress leaves
        # probing, so a new entry is sent at once.
        for peer in (2, 3):
            ack = Message(
                type=MessageType.APPEND_RESP, to=1, frm=peer, term=node.core.term, index=node.core.last_index
            )
            self.reply(node, clock, ack)

    def test_vote_is_written_before_the_vote_request_leaves(self) -> None:
        node, transport, events, clock = self.node(1)
        node.campaign()
        clock.advance(0)
        request = next(m for m in transport.sent if m.to == 2)
        self.reply(node, clock, Message(type=MessageType.PRE_VOTE_RESP, to=1, frm=2, term=request.term))
        vote_sent = events.index(next(e for e in events if e[0] == "send" and e[1] == MessageType.VOTE))
        self.assertIn(("sync",), events[:vote_sent], f"the vote left before it was synced: {events}")

    def test_leader_sends_appends_before_its_own_write_and_commits_after_it(self) -> None:
        node, transport, events, clock = self.node(1)
        self.elect(node, transport, clock)
        del events[:]
        d = node.propose(b"x")
        index = node.core.last_index
        clock.advance(0)
        sends = [i for i, e in enumerate(events) if e[0] == "send" and index in e[3]]
        writes = [i for i, e in enumerate(events) if e == ("write", (index,))]
        self.assertEqual(len(writes), 1, events)
        self.assertTrue(sends and sends[0] < writes[0], f"appends did not leave first: {events}")
        self.assertIn(("sync",), events[writes[0] :], "the leader never synced its entry")
        self.assertNoResult(d)
        # One follower's acknowledgement and the leader's own written copy
        # make a majority of three.
        self.reply(
            node,
            clock,
            Message(type=MessageType.APPEND_RESP, to=1, frm=2, term=node.core.term, index=index),
        )
        self.assertEqual(self.successResultOf(d), b"x")

    def test_follower_writes_and_syncs_before_it_acknowledges(self) -> None:
        node, transport, events, clock = self.node(2)
        append = Message(
            type=MessageType.APPEND,
            to=2,
            frm=1,
            term=1,
            log_term=0,
            index=0,
            entries=[Entry(1, 1, b"a"), Entry(1, 2, b"b")],
            commit=0,
        )
        self.reply(node, clock, append)
        ack = next(i for i, e in enumerate(events) if e[0] == "send" and e[1] == MessageType.APPEND_RESP)
        self.assertIn(("write", (1, 2)), events[:ack], events)
        self.assertIn(("sync",), events[events.index(("write", (1, 2))) : ack], events)

    def test_power_off_between_a_leaders_send_and_its_write_writes_nothing(self) -> None:
        # The crash window of sending first: the leader dies (power loss or
        # SIGKILL) right after its appends left. Nothing more may reach its
        # disk (a clean stopService writes them; a power loss cannot), so
        # the simulated clusters exercise a leader whose own log lacks an
        # entry its followers hold.
        node, transport, events, clock = self.node(1)
        self.elect(node, transport, clock)
        storage = node.storage
        assert isinstance(storage, RecordingStorage)
        index = node.core.last_index + 1
        real_send = transport.send

        def send_then_die(message: Message) -> None:
            real_send(message)
            if any(e.index == index for e in message.entries) and node.running:
                node.power_off()

        transport.send = send_then_die  # type: ignore[method-assign]
        d = node.propose(b"x")
        clock.advance(0)
        clock.advance(1.0)
        self.assertFalse(node.running)
        self.assertNotIn(("write", (index,)), events, events)
        storage.simulate_crash()
        _, _, entries = storage.load()
        self.assertNotIn(index, [e.index for e in entries])
        self.failureResultOf(d)  # the proposer learns nothing was settled here

    # -- within one pass of the node (one clock.advance(0)) ----------------

    def test_follower_acknowledges_then_applies_in_the_same_pass(self) -> None:
        node, transport, events, clock = self.node(2)
        first = Message(
            type=MessageType.APPEND,
            to=2,
            frm=1,
            term=1,
            log_term=0,
            index=0,
            entries=[Entry(1, 1, b"a")],
            commit=0,
        )
        self.reply(node, clock, first)
        del events[:]
        # The next append commits entry 1: one pass writes entry 2, acks it
        # and applies entry 1, the acknowledgement first.
        second = Message(
            type=MessageType.APPEND,
            to=2,
            frm=1,
            term=1,
            log_term=1,
            index=1,
            entries=[Entry(1, 2, b"b")],
            commit=1,
        )
        node._on_message(second)
        node.process_now()  # exactly the one pass the message scheduled
        kinds = [e[0] if e[0] != "send" else e[1] for e in events]
        self.assertIn(("apply", b"a"), events, f"entry 1 was not applied in the pass: {events}")
        ack = kinds.index(MessageType.APPEND_RESP)
        self.assertLess(ack, events.index(("apply", b"a")), f"applied before acknowledging: {events}")
        self.assertLess(events.index(("write", (2,))), ack, events)

    def test_process_now_sends_a_proposal_without_a_reactor_pass(self) -> None:
        node, transport, events, clock = self.node(1)
        self.elect(node, transport, clock)
        del events[:]
        d = node.propose(b"x")
        d.addErrback(lambda _: None)  # never committed here: dropped at stop
        index = node.core.last_index
        node.process_now()  # no clock.advance: the caller's own pass
        sent_to = {e[2] for e in events if e[0] == "send" and index in e[3]}
        self.assertEqual(sent_to, {2, 3}, events)
        self.assertIn(("write", (index,)), events, events)
        # Nothing is left scheduled for that proposal: a pass finds no work.
        del events[:]
        clock.advance(0)
        self.assertEqual([e for e in events if e[0] in ("send", "write")], [], events)

    def test_process_now_from_a_proposals_answer_does_not_nest(self) -> None:
        node, transport, events, clock = self.node(1)
        self.elect(node, transport, clock)
        nested: list[int] = []
        inside: list[bool] = []  # whether "y" left from within the answer

        def answered(_result: object) -> None:
            # Runs while the node handles the Ready that applied "x".
            node.propose(b"y").addErrback(lambda _: None)  # dropped at stop
            nested.append(node.core.last_index)
            node.process_now()  # must not re-enter: "y" waits for its pass
            inside.append(any(e[0] == "send" and nested[0] in e[3] for e in events))

        d = node.propose(b"x")
        d.addCallback(answered)
        index = node.core.last_index
        clock.advance(0)
        self.reply(
            node, clock, Message(type=MessageType.APPEND_RESP, to=1, frm=2, term=node.core.term, index=index)
        )
        self.assertEqual(inside, [False], "a Ready was handled within another's answers")
        # "y" was sent in the pass after (reply() advances the clock once).
        self.assertTrue(any(e[0] == "send" and nested[0] in e[3] for e in events), f"y never left: {events}")
