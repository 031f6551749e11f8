"""The seams between the Raft driver and the world around it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface

from raft.types import Entry, HardState, Message, Snapshot


class IStateMachine(Interface):
    """What a replicated service plugs into ``raft.node.RaftNode``.

    ``apply`` must be deterministic: every replica applies the same commands
    in the same order and must reach the same state and the same results.
    """

    def apply(command: bytes) -> Any:
        """Apply one committed command; the return value is handed to the
        proposer's Deferred (so it should be CBOR-encodable data, or an
        exception instance to fail it)."""

    def snapshot() -> bytes:
        """Serialize the whole state as of the last applied command."""

    def restore(data: bytes) -> None:
        """Replace the whole state with a snapshot from ``snapshot()``."""


class ISnapshotCopy(Interface):
    """Optional for an ``IStateMachine``: snapshots encoded off the event
    loop. A node whose state machine provides it takes its periodic
    snapshots in a thread (``RaftNode``'s ``offload``)."""

    def snapshot_copy() -> Callable[[], bytes]:
        """A consistent copy of the state as of the last applied command,
        cheap next to encoding it; the function returned encodes the copy
        (the bytes ``snapshot()`` would return now) and may run in another
        thread while ``apply`` goes on."""


class IStorage(Interface):
    """Stable storage for one Raft node: hard state, log entries, snapshot.

    ``append`` may overwrite: entries whose index is <= the stored last index
    replace the stored suffix from that index on (a follower resolving a
    conflict). Nothing is durable until ``sync`` returns.
    """

    def load() -> tuple[HardState, Snapshot | None, list[Entry]]:
        """What was stored: the hard state, the latest snapshot (or None) and
        the entries after the snapshot, in index order."""

    def append(entries: list[Entry]) -> None:
        """Store entries, truncating any stored suffix they replace."""

    def set_hard_state(state: HardState) -> None:
        """Store the hard state."""

    def save_snapshot(snapshot: Snapshot) -> None:
        """Store a snapshot and drop every entry it covers (index <= its index);
        entries after it that agree with it stay. Durable when it returns,
        with everything stored before it: no ``sync()`` is needed after."""

    def sync() -> None:
        """Make everything stored so far durable (one fsync per batch)."""

    def close() -> None:
        """Release files."""

    fsyncs = Attribute("Number of fsync rounds performed (for tests and benchmarks).")


class ISnapshotFile(Interface):
    """Optional for an ``IStorage``: ``save_snapshot`` in two steps, so the
    slow one (writing the snapshot durably) runs off the event loop."""

    def write_snapshot(snapshot: Snapshot) -> None:
        """Make ``snapshot`` durable without touching the log. Safe to call
        from another thread while the event loop uses the storage. Does
        nothing if a snapshot at least as new was written already."""

    def install_written_snapshot(snapshot: Snapshot) -> None:
        """On the event loop, after ``write_snapshot(snapshot)`` returned:
        what ``save_snapshot`` does after writing (drop the entries it
        covers). Does nothing if a newer snapshot was saved since."""


class ITransport(Interface):
    """Delivers Raft messages between the nodes of one group.

    Delivery is best effort: messages may be lost, delayed, duplicated or
    reordered, and Raft copes. Received messages are handed to the handler
    registered with ``set_handler``; a reply the peer sends back (e.g. an
    error that it is crashed) is not a Raft message and is dropped.
    """

    def send(message: Message) -> None:
        """Send ``message`` to node ``message.to``, never blocking or raising."""

    def set_handler(handler: Any) -> None:
        """Register ``handler(message)`` for messages addressed to this node."""

    def flush() -> None:
        """Hand what ``send`` may have queued to the network now.

        The driver calls it after sending a Ready's messages: a transport is
        free to batch a Ready's messages, but not to hold them past this,
        because the driver lets the reactor write them before it applies."""
