"""Why the Raft layer could not do what was asked.

These are Raft's own: the layers above translate them into their wire error
codes (``raft`` knows nothing of the services built on it).
"""

from __future__ import annotations


class RaftError(Exception):
    pass


class NotLeaderError(RaftError):
    """Only the leader accepts proposals and reads; ``leader`` is the id of
    the leader this node believes in, or None."""

    def __init__(self, leader: int | None) -> None:
        super().__init__(f"not the leader (leader: {leader})")
        self.leader = leader


class ProposalDropped(RaftError):
    """The proposal was accepted but then lost to a leader change before it
    committed: it may or may not be applied later (outcome unknown)."""


class ReadAborted(RaftError):
    """Leadership was lost before a ReadIndex read was confirmed."""


class NodeCrashed(RaftError):
    """The node is (simulated) crashed and refuses all work."""


class RaftTimeout(RaftError):
    """The call did not complete within its timeout; a write's outcome is unknown."""


class StorageCorrupt(RaftError):
    """Stable storage holds a record that fails its checksum before the tail:
    refusing to start is safer than silently losing acknowledged entries."""
