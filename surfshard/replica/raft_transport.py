"""Raft messages between the replicas of a group, over the native protocol.

Wire form (peer traffic only; clients never send it): all the messages for
one peer that Raft produces in one reactor turn travel as ONE one-way
request, ``{"id", "method": "raft", "args": {"group", "msgs": [msg, ...]},
"noreply": true}`` (see ``surfshard.net.pool.encode_notification``).  The
receiver sends nothing back when it takes them: Raft's answers are messages
of their own, sent back the same way, so a reply per message only cost a
frame each way.  A refusal still comes back as an error reply (a crashed
node answers CRASHED and changes nothing; a message for another group or
node is BAD_REQUEST), which the sender only counts.  Lost or refused
messages are simply dropped: Raft tolerates loss, and the next heartbeat or
retransmission repairs it.

The ``raft`` method also takes the older single-message form ``{"group",
"msg": msg}`` as an ordinary call, answered with an empty reply.

A batch is validated whole before any of it reaches Raft: one malformed
message refuses the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from raft.errors import NodeCrashed
from raft.interfaces import ITransport
from raft.types import Message
from surfshard import errors
from surfshard.net import wire
from surfshard.net.interfaces import IPipelinedPool
from surfshard.net.methods import TRUSTED, CallContext
from surfshard.net.schema import Arg, Value

#: Messages in one batch, at most (a receiver refuses longer batches).
MAX_BATCH_MESSAGES = 1024
#: A batch is closed once its messages' payloads add up to this much, so
#: that a batch stays well under the 16 MiB frame limit: appends are capped
#: by RaftConfig.max_bytes_per_msg (1 MiB), snapshots go in chunks.
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: Allowance per message and per entry for what is not payload bytes.
_MESSAGE_OVERHEAD = 128
_ENTRY_OVERHEAD = 24


def _payload_size(message: Message) -> int:
    """An upper estimate of the message's encoded size."""
    size = _MESSAGE_OVERHEAD + len(message.data) + len(message.context)
    for entry in message.entries:
        size += _ENTRY_OVERHEAD + (len(entry.data) if entry.data else 0)
    return size


@implementer(ITransport)
class RpcRaftTransport:
    """ITransport over an ``RpcClientPool``; ``addresses`` maps Raft ids to
    ``host:port``. ``group`` tags every message so a misconfigured peer from
    another group is refused instead of disturbing this one.

    ``send`` only queues: the queue for each peer goes out as one one-way
    ``raft`` request at ``flush``, which Raft's driver calls after sending
    every message of one ``Ready`` (``ITransport``), so a whole Ready (an
    AppendEntries and a heartbeat for the same follower, say) costs one
    frame per peer. (No timed call backs this up: one per Ready, always
    cancelled by the driver's flush, was work on every message.)"""

    log = Logger()

    def __init__(
        self,
        pool: IPipelinedPool,
        node_id: int,
        addresses: Mapping[int, str],
        group: str,
    ) -> None:
        self.pool = pool
        self.node_id = node_id
        self.addresses = dict(addresses)
        self.group = group
        self._handler: Callable[[Message], None] | None = None
        self._outbox: dict[str, list[Message]] = {}
        #: Messages handed to ``send`` / batches written or queued by the pool.
        self.sent = 0
        self.batches = 0
        #: Messages dropped here (pool closed or backing off, too large).
        self.send_failures = 0
        #: Messages taken from peers.
        self.received = 0

    def set_handler(self, handler: Callable[[Message], None]) -> None:
        self._handler = handler

    def send(self, message: Message) -> None:
        address = self.addresses.get(message.to)
        if address is None:
            self.log.warn("dropping raft message to unknown node {to}", to=message.to)
            return
        self.sent += 1
        queue = self._outbox.get(address)
        if queue is None:
            self._outbox[address] = [message]
        else:
            queue.append(message)

    def flush(self) -> None:
        """Send what is queued now (normally run by the reactor)."""
        outbox, self._outbox = self._outbox, {}
        for address, messages in outbox.items():
            for batch in self._batches(messages):
                self._send_batch(address, batch)

    def pending(self) -> int:
        """Messages queued and not yet flushed."""
        return sum(len(q) for q in self._outbox.values())

    @staticmethod
    def _batches(messages: list[Message]) -> list[list[Message]]:
        if len(messages) == 1:
            return [messages]
        batches: list[list[Message]] = [[]]
        size = 0
        for message in messages:
            cost = _payload_size(message)
            current = batches[-1]
            if current and (size + cost > MAX_BATCH_BYTES or len(current) >= MAX_BATCH_MESSAGES):
                current = []
                batches.append(current)
                size = 0
            current.append(message)
            size += cost
        return batches

    def _send_batch(self, address: str, batch: list[Message]) -> None:
        args = {"group": self.group, "msgs": [m.to_wire() for m in batch]}
        try:
            sent = self.pool.notify(address, "raft", args)
        except wire.FrameError as e:
            if len(batch) > 1:
                # The estimate was wrong: halve (bounded: log2 of the batch).
                middle = len(batch) // 2
                self._send_batch(address, batch[:middle])
                self._send_batch(address, batch[middle:])
                return
            self.log.error(
                "dropping a raft {type} message to {address}: {why}",
                type=batch[0].type.value,
                address=address,
                why=e.message,
            )
            sent = False
        if sent:
            self.batches += 1
        else:
            # Expected while a peer is down: Raft retries on its own.
            self.send_failures += len(batch)

    # -- server side --------------------------------------------------------

    def deliver_from(
        self, ctx: CallContext, group: str, msg: dict[str, Any] | None = None, msgs: list[Any] | None = None
    ) -> None:
        """The ``raft`` method's handler: ``deliver``, with the sender taken
        from the caller's certificate. Without TLS (a trusted caller) the
        messages' ``frm`` is taken as it is."""
        caller = ctx.caller
        sender = None
        if caller.role != TRUSTED.role:
            prefix = f"{self.group}-"
            index = caller.name[len(prefix) :] if caller.name.startswith(prefix) else ""
            sender = int(index) + 1 if index.isdigit() else -1
        self.deliver(group, msg, msgs, sender=sender)

    def deliver(
        self,
        group: str,
        msg: dict[str, Any] | None = None,
        msgs: list[Any] | None = None,
        *,
        sender: int | None = None,
    ) -> None:
        """Validate every message, then hand them to Raft in order. With a
        ``sender`` (the raft id the caller's certificate names), a message
        claiming to be from anyone else is refused, and none of the batch is
        delivered."""
        if group != self.group:
            raise errors.BadRequest(f"raft message for group {group!r} reached group {self.group!r}")
        if (msg is None) == (msgs is None):
            raise errors.BadRequest("a raft request carries either msg or msgs")
        wires = [msg] if msgs is None else msgs
        messages = [self._parse(w, i) for i, w in enumerate(wires)]
        if sender is not None:
            for message in messages:
                if message.frm != sender:
                    self.log.warn(
                        "raft: refused a message claiming to be from node {frm} of {group}: "
                        "the caller's certificate is for raft id {sender}",
                        frm=message.frm,
                        group=self.group,
                        sender=sender,
                    )
                    raise errors.Forbidden(
                        f"raft message says it is from node {message.frm}, the caller's certificate "
                        f"is of {'node ' + str(sender) if sender > 0 else 'no node of this group'}"
                    )
        handler = self._handler
        if handler is None:
            raise errors.Unavailable("raft node is not running")
        for message in messages:
            try:
                handler(message)
            except NodeCrashed:
                # Raised before the node looks at the message: none of the
                # batch changed its state (a node crashes only between calls).
                raise errors.Crashed("node is crashed") from None
            self.received += 1

    def _parse(self, w: Any, index: int) -> Message:
        try:
            message = Message.from_wire(w)
        except (ValueError, TypeError, KeyError, OverflowError) as e:
            raise errors.BadRequest(f"malformed raft message [{index}]: {e}") from None
        if message.to != self.node_id:
            raise errors.BadRequest(f"raft message for node {message.to} reached node {self.node_id}")
        if message.frm not in self.addresses or message.frm == self.node_id:
            raise errors.BadRequest(f"raft message from unknown node {message.frm}")
        return message

    @staticmethod
    def method_args() -> list[Arg]:
        return [
            Arg("group", str, max_len=64),
            Arg("msg", dict, required=False),
            Arg(
                "msgs", Value(list, min_len=1, max_len=MAX_BATCH_MESSAGES, items=Value(dict)), required=False
            ),
        ]
