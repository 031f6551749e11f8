"""Leader-side bookkeeping: per-follower replication progress (etcd's
``tracker.Progress`` and ``Inflights``) and the ReadIndex round tracker
(etcd's ``readOnly``, with heartbeat rounds shared by batched reads)."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from raft.types import ReadState, Snapshot


class ProgressState(enum.StrEnum):
    # Send one append at a time and wait for its answer: we do not know
    # where the follower's log matches ours.
    PROBE = "probe"
    # The follower's log matches through ``match``: stream appends
    # optimistically, up to the inflight window.
    REPLICATE = "replicate"
    # The entries the follower needs are compacted: an InstallSnapshot is
    # in flight, nothing else is sent until it completes.
    SNAPSHOT = "snapshot"


class Inflights:
    """The last index of each append sent to a follower and not yet
    acknowledged, oldest first; bounded so a slow follower cannot make the
    leader buffer an unbounded amount of traffic."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._last_indexes: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._last_indexes)

    def full(self) -> bool:
        return len(self._last_indexes) >= self.capacity

    def add(self, last_index: int) -> None:
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        """An ack through ``index`` frees every append that ended at or
        before it."""
        while self._last_indexes and self._last_indexes[0] <= index:
            self._last_indexes.popleft()

    def free_first_one(self) -> None:
        if self._last_indexes:
            self._last_indexes.popleft()

    def reset(self) -> None:
        self._last_indexes.clear()


class Progress:
    """What the leader knows about one follower's log."""

    def __init__(self, next_index: int, max_inflight: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        # In probe state: an append is outstanding, wait for its answer (or
        # a heartbeat response) before probing again.
        self.probe_sent = False
        # Heard from since the last check-quorum round.
        self.recent_active = False
        self.inflights = Inflights(max_inflight)
        # Snapshot state: the snapshot being sent and the bytes of it the
        # follower has acknowledged.
        self.snapshot: Snapshot | None = None
        self.snapshot_offset = 0
        # No chunk was acknowledged since the last heartbeat answer.
        self.snapshot_stalled = False
        # The highest commit index sent to this follower (etcd's
        # ``sentCommit``). Only a hint for when to send a commit update on
        # its own: a lost message is repaired by the next heartbeat, which
        # always carries the commit index.
        self.sent_commit = 0

    @property
    def pending_snapshot(self) -> int:
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.state = state
        self.inflights.reset()
        self.snapshot = None
        self.snapshot_offset = 0
        self.snapshot_stalled = False

    def become_probe(self) -> None:
        # After a snapshot, the follower has at least the snapshot's entries.
        if self.state == ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1
        # What we sent may not have arrived (the follower rejected or
        # restarted): let the next append carry the commit index again.
        self.sent_commit = min(self.sent_commit, self.next - 1)

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.snapshot = snapshot

    def maybe_update(self, index: int) -> bool:
        """An ack that the follower matches through ``index``; False if it
        is stale (we already knew)."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def optimistic_update(self, last_sent: int) -> None:
        self.next = last_sent + 1

    def commit_sent(self, commit: int) -> None:
        if commit > self.sent_commit:
            self.sent_commit = commit

    def can_bump_commit(self, commit: int) -> bool:
        """Whether sending ``commit`` could raise the follower's commit index:
        it is above what we sent, and what we sent did not already cover
        every entry we sent (the follower commits at most what it has)."""
        return commit > self.sent_commit and self.sent_commit < self.next - 1

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected the append whose previous index was
        ``rejected``; ``match_hint`` is the highest index at which our logs
        may agree. False if the rejection is stale."""
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def describe(self) -> dict[str, object]:
        return {
            "match": self.match,
            "next": self.next,
            "state": self.state.value,
            "inflight": len(self.inflights),
            "recent_active": self.recent_active,
        }


@dataclass(slots=True)
class ReadRound:
    """One heartbeat round confirming leadership for a batch of reads."""

    round_id: int
    reads: list[ReadState]
    acks: set[int] = field(default_factory=set)


class ReadIndexTracker:
    """ReadIndex (thesis 6.4) on the leader.

    Reads asked for between two flushes wait in ``queued``; a flush opens
    one round for all of them, tagged with a round id the heartbeats carry
    and the followers echo. When a majority (the leader included) has acked
    a round, that round and every earlier one are safe: the leader was
    still leader after all of them were asked.
    """

    def __init__(self, self_id: int, quorum: int) -> None:
        self._self_id = self_id
        self._quorum = quorum
        #: Whose acks count (None: everyone's, before a membership is set).
        self._voters: frozenset[int] | None = None
        self._next_round_id = 1
        self.queued: list[ReadState] = []
        self._rounds: dict[int, ReadRound] = {}

    def set_voters(self, voters: frozenset[int], quorum: int) -> None:
        """The voters changed: only their acks count from now on, toward
        their majority (a leader that is no longer a voter does not count
        itself either)."""
        self._voters = voters
        self._quorum = quorum
        for rnd in self._rounds.values():
            rnd.acks &= voters

    def reset(self) -> None:
        self.queued.clear()
        self._rounds.clear()

    def enqueue(self, read: ReadState) -> None:
        self.queued.append(read)

    def pending_count(self) -> int:
        return len(self.queued) + sum(len(r.reads) for r in self._rounds.values())

    def open_round(self) -> int | None:
        """Put the queued reads in a new round; returns its id (None when
        nothing was queued)."""
        if not self.queued:
            return None
        round_id = self._next_round_id
        self._next_round_id += 1
        me = {self._self_id} if self._voters is None or self._self_id in self._voters else set()
        self._rounds[round_id] = ReadRound(round_id, self.queued, me)
        self.queued = []
        return round_id

    def latest_round(self) -> int | None:
        return max(self._rounds) if self._rounds else None

    def ack(self, peer: int, round_id: int) -> list[ReadState]:
        """``peer`` acknowledged our leadership in round ``round_id`` (and so
        in every earlier round); returns the reads that became safe."""
        if self._voters is not None and peer not in self._voters:
            return []
        confirmed = 0
        for rid, rnd in self._rounds.items():
            if rid <= round_id:
                rnd.acks.add(peer)
                if len(rnd.acks) >= self._quorum:
                    confirmed = max(confirmed, rid)
        if not confirmed:
            return []
        return self._release_through(confirmed)

    def _release_through(self, round_id: int) -> list[ReadState]:
        safe: list[ReadState] = []
        for rid in sorted(r for r in self._rounds if r <= round_id):
            safe.extend(self._rounds.pop(rid).reads)
        return safe

    @staticmethod
    def encode(round_id: int) -> bytes:
        return b"ri:%d" % round_id

    @staticmethod
    def decode(context: bytes) -> int | None:
        if not context.startswith(b"ri:"):
            return None
        digits = context[3:]
        if not digits.isdigit() or len(digits) > 20:
            return None
        return int(digits)
