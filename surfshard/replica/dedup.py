# -*- test-case-name: tests.test_dedup -*-
"""Exactly-once answers for retried commands: one deduplication table for
every replicated state machine (the metadata shards and the ShardMaster).

Every write carries ``(client_id, seq)``. A table keeps, per client, the
answers to that client's ``window`` most recent sequence numbers and a
``floor``:

- a seq already answered gets the stored first answer again, without being
  applied again, so a retried CAS never reports a false version mismatch;
- a seq that is not stored and is at or below ``floor``, or below every
  stored seq of a full window, is *stale*: it is refused and not applied.
  Such a seq may have been applied long ago (its answer since forgotten) or
  never; to the client "stale" means "not applied by this call, outcome of
  earlier attempts unknown";
- any other seq is *new*: the caller applies it and ``record``s its answer;
  when the window overflows, the lowest stored seq (never the one just
  recorded) is evicted and becomes the new floor.

With ``window > 1`` this is the Kafka idempotent-producer scheme: a client
may have up to ``window`` writes in flight and have them commit in any order.
With ``window == 1`` it is the Raft thesis's "latest seq only" session
(section 6.3): any seq below the latest is stale.

The number of sessions is bounded (``max_sessions``); the least recently
used is evicted first. Recency is insertion order of a dict, touched in log
order, so every replica evicts the same one. A client evicted while a retry
is pending loses exactly-once for that retry: the retry is applied as new.

Callers with no identity of their own (XML-RPC writers, native calls
without a client id) get one identity *per call* from the node that takes
the call, named with ``ONE_SHOT_PREFIX``: a shared identity would make
their writes one client's, refused as stale once more than ``window`` of
them commit out of order. Such one-shot sessions live in a pool of their
own (``max_one_shot``, least recently used evicted first), so a flood of
them never evicts a named client's session. They need to live only as long
as a retry of their one call may come (a forward to a new leader).

Everything here must stay deterministic: it runs inside ``apply``.
Encoding is left to each state machine, whose snapshot formats differ.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any, Generic, TypeVar

from surfshard.errors import BadRequest
from surfshard.keyspace import MAX_VERSION

A = TypeVar("A")

#: Client ids starting with this are one call each (see the module docstring).
ONE_SHOT_PREFIX = "call:"

#: Longest client id accepted, in UTF-8 bytes (a UUID is 32 hex characters).
MAX_CLIENT_ID_BYTES = 128


def validate_client(client_id: Any, seq: Any) -> tuple[str, int]:
    """Accept a dedup identity: a non-empty client id string and a seq >= 1."""
    if (
        type(client_id) is str
        and type(seq) is int
        and 0 < len(client_id) <= MAX_CLIENT_ID_BYTES
        and client_id.isascii()  # then its UTF-8 size is its length
        and 1 <= seq <= MAX_VERSION
    ):
        return client_id, seq
    return validate_client_id(client_id), validate_seq(seq)


def validate_client_id(client_id: Any) -> str:
    """Accept a client id: a non-empty string of at most MAX_CLIENT_ID_BYTES."""
    if not isinstance(client_id, str) or not client_id:
        raise BadRequest("client id must be a non-empty string")
    if len(client_id.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_BYTES:
        raise BadRequest(f"client id is longer than {MAX_CLIENT_ID_BYTES} bytes")
    return client_id


def validate_seq(seq: Any) -> int:
    """Accept a write's sequence number: an integer 1 .. MAX_VERSION."""
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_VERSION:
        raise BadRequest(f"seq must be an integer 1..{MAX_VERSION}, not {seq!r}")
    return seq


class OneShotIds:
    """Identities for callers that have none: ``(client_id, 1)``, a new
    client id per call, unique across processes and restarts."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = f"{ONE_SHOT_PREFIX}{uuid.uuid4().hex}-"
        self._count = itertools.count(1)

    def next(self) -> tuple[str, int]:
        return f"{self._prefix}{next(self._count)}", 1


class DedupSession(Generic[A]):
    """One client's remembered answers."""

    __slots__ = ("answers", "floor", "newest")

    def __init__(self, floor: int = 0) -> None:
        #: Invariant: every stored seq is > floor.
        self.floor = floor
        #: seq -> answer. Invariant: in ascending seq order (the oldest first)
        #: and at most the table's ``window`` entries.
        self.answers: dict[int, A] = {}
        #: The highest seq stored (0 before any). Invariant: the last key of
        #: ``answers`` whenever it has one (eviction takes the first key,
        #: never the last). Kept so that ``record`` need not build an
        #: iterator to find it: it runs for every write on every replica.
        self.newest = 0

    def is_stale(self, seq: int, window: int) -> bool:
        """Not stored and too old to tell whether it was applied: at or
        below the floor, or older than a full window (storing it would evict
        it at once, so a retry could not be told it applied)."""
        answers = self.answers
        return seq not in answers and (
            seq <= self.floor or (len(answers) >= window and seq < next(iter(answers)))
        )


class DedupTable(Generic[A]):
    """Sessions by client id, least recently used first."""

    __slots__ = ("max_one_shot", "max_sessions", "one_shot", "sessions", "window")

    def __init__(self, window: int, max_sessions: int, max_one_shot: int = 0) -> None:
        if window < 1 or max_sessions < 1 or max_one_shot < 0:
            raise ValueError("window and max_sessions must be >= 1, max_one_shot >= 0")
        self.window = window
        self.max_sessions = max_sessions
        #: 0: one-shot ids are ordinary sessions (the ShardMaster's table).
        self.max_one_shot = max_one_shot
        #: Named clients' sessions. Invariant: insertion order is recency
        #: order (least recent first); at most ``max_sessions``.
        self.sessions: dict[str, DedupSession[A]] = {}
        #: One-shot sessions (ids with ONE_SHOT_PREFIX), the same way; at
        #: most ``max_one_shot``. No id is in both.
        self.one_shot: dict[str, DedupSession[A]] = {}

    def __len__(self) -> int:
        return len(self.sessions) + len(self.one_shot)

    def __contains__(self, client: object) -> bool:
        return client in self.sessions or client in self.one_shot

    def items(self) -> list[tuple[str, DedupSession[A]]]:
        """Every session, named ones first, each pool least recent first
        (the order ``restore`` rebuilds the same table from)."""
        return [*self.sessions.items(), *self.one_shot.items()]

    def _pool(self, client: str) -> tuple[dict[str, DedupSession[A]], int]:
        if self.max_one_shot and client.startswith(ONE_SHOT_PREFIX):
            return self.one_shot, self.max_one_shot
        return self.sessions, self.max_sessions

    def touch(self, client: str) -> DedupSession[A]:
        """The session of ``client``, made the most recently used (created
        if new; the least recently used of its pool beyond the pool's bound
        evicted)."""
        # _pool, inline: this runs for every write on every replica.
        if self.max_one_shot and client.startswith(ONE_SHOT_PREFIX):
            sessions, bound = self.one_shot, self.max_one_shot
        else:
            sessions, bound = self.sessions, self.max_sessions
        session = sessions.pop(client, None)
        if session is None:
            session = DedupSession()
        sessions[client] = session
        while len(sessions) > bound:
            del sessions[next(iter(sessions))]
        return session

    def record(self, session: DedupSession[A], seq: int, answer: A) -> None:
        """Store the answer to a new ``seq`` (one ``is_stale`` said False for)."""
        answers = session.answers
        answers[seq] = answer
        if seq > session.newest:
            session.newest = seq
        else:  # a late seq (writes committed out of order): rare
            answers = session.answers = dict(sorted(answers.items()))
        if len(answers) > self.window:
            oldest = next(iter(answers))
            del answers[oldest]
            if oldest > session.floor:
                session.floor = oldest

    def restore(self, client: str, floor: int, answers: dict[int, A]) -> None:
        """Put back a session read from a snapshot or a shard transfer (the
        caller has validated it; sessions are restored in recency order)."""
        if client in self:
            raise ValueError(f"client {client!r} has two sessions")
        session: DedupSession[A] = DedupSession(floor)
        session.answers = dict(sorted(answers.items()))
        session.newest = max(session.answers, default=0)
        self._pool(client)[0][client] = session
