"""Raft messages between the replicas of a group, over the native protocol.

Each message is one ``raft`` call to the peer's port. The reply carries
nothing (Raft's answers are messages of their own, sent back the same way),
so a failed or lost call is simply dropped: Raft tolerates loss, and the next
heartbeat or retransmission repairs it.
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
from surfshard.rpc import Arg

#: A Raft message frame stays well under the 16 MiB frame limit: appends are
#: capped by RaftConfig.max_bytes_per_msg, snapshots go in chunks.
RAFT_CALL_TIMEOUT = 5.0


@implementer(ITransport)
class RpcRaftTransport:
    """ITransport over an ``RpcClientPool``; ``addresses`` maps Raft ids to
    ``host:port``. ``group`` tags every message so a misconfigured peer from
    another group is refused instead of disturbing this one."""

    log = Logger()

    def __init__(self, pool: Any, node_id: int, addresses: Mapping[int, str], group: str) -> None:
        self.pool = pool
        self.node_id = node_id
        self.addresses = dict(addresses)
        self.group = group
        self._handler: Callable[[Message], None] | None = None
        self.sent = 0
        self.send_failures = 0

    def set_handler(self, handler: Callable[[Message], None]) -> None:
        self._handler = handler

    def send(self, message: Message) -> None:
        address = self.addresses.get(message.to)
        if address is None:
            self.log.warn("dropping raft message to unknown node {to}", to=message.to)
            return
        self.sent += 1
        d = self.pool.call(
            address, "raft", {"group": self.group, "msg": message.to_wire()}, timeout=RAFT_CALL_TIMEOUT
        )
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        # Expected while a peer is down or crashed: Raft retries on its own.
        self.send_failures += 1

    # -- server side --------------------------------------------------------

    def deliver(self, group: str, msg: dict[str, Any]) -> None:
        """The ``raft`` method's handler: validate, then hand to Raft."""
        if group != self.group:
            raise errors.BadRequest(f"raft message for group {group!r} reached group {self.group!r}")
        try:
            message = Message.from_wire(msg)
        except ValueError as e:
            raise errors.BadRequest(f"malformed raft message: {e}") from None
        if message.to != self.node_id:
            raise errors.BadRequest(f"raft message for node {message.to} reached node {self.node_id}")
        if message.frm not in self.addresses or message.frm == self.node_id:
            raise errors.BadRequest(f"raft message from unknown node {message.frm}")
        if self._handler is None:
            raise errors.Unavailable("raft node is not running")
        try:
            self._handler(message)
        except NodeCrashed:
            raise errors.Crashed("node is crashed") from None

    @staticmethod
    def method_args() -> list[Arg]:
        return [Arg("group", str, max_len=64), Arg("msg", dict)]
