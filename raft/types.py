"""Plain data exchanged between the Raft core, its driver, storage and peers.

Everything here is a small slotted dataclass with a ``to_wire``/``from_wire``
pair that maps it onto CBOR-friendly builtins (dicts of str, int, bytes,
lists), so a transport can ship messages without knowing their shape and
storage can write records without pickling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class MessageType(enum.StrEnum):
    PRE_VOTE = "pre_vote"
    PRE_VOTE_RESP = "pre_vote_resp"
    VOTE = "vote"
    VOTE_RESP = "vote_resp"
    APPEND = "append"
    APPEND_RESP = "append_resp"
    HEARTBEAT = "heartbeat"
    HEARTBEAT_RESP = "heartbeat_resp"
    SNAPSHOT = "snapshot"  # one chunk of an InstallSnapshot
    SNAPSHOT_RESP = "snapshot_resp"
    TIMEOUT_NOW = "timeout_now"  # leader transfer: start an election now


@dataclass(slots=True, frozen=True)
class Entry:
    """A log entry. ``data`` is opaque to Raft; ``None`` marks the no-op a new
    leader appends to commit entries of earlier terms (§5.4.2)."""

    term: int
    index: int
    data: bytes | None = None

    def to_wire(self) -> list[Any]:
        return [self.term, self.index, self.data]

    @classmethod
    def from_wire(cls, w: Any) -> Entry:
        term, index, data = w
        if not (isinstance(term, int) and isinstance(index, int)):
            raise ValueError("entry term/index must be integers")
        if data is not None and not isinstance(data, bytes):
            raise ValueError("entry data must be bytes or None")
        return cls(term, index, data)


@dataclass(slots=True, frozen=True)
class HardState:
    """What must be on stable storage before any message that depends on it
    is sent: the current term, the vote cast in it, and the commit index."""

    term: int = 0
    vote: int | None = None
    commit: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"term": self.term, "vote": self.vote, "commit": self.commit}

    @classmethod
    def from_wire(cls, w: Any) -> HardState:
        return cls(int(w["term"]), w["vote"], int(w["commit"]))


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    voters: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "term": self.term, "voters": list(self.voters)}

    @classmethod
    def from_wire(cls, w: Any) -> SnapshotMeta:
        return cls(int(w["index"]), int(w["term"]), tuple(int(v) for v in w["voters"]))


@dataclass(slots=True, frozen=True)
class Snapshot:
    """The state machine's state as of ``meta.index`` (inclusive)."""

    meta: SnapshotMeta
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"meta": self.meta.to_wire(), "data": self.data}

    @classmethod
    def from_wire(cls, w: Any) -> Snapshot:
        return cls(SnapshotMeta.from_wire(w["meta"]), bytes(w["data"]))


@dataclass(slots=True)
class Message:
    """One Raft RPC or response; which fields matter depends on ``type``
    (the shape of etcd's ``raftpb.Message``).

    - append: ``log_term``/``index`` describe the entry before ``entries``;
      ``commit`` is the leader's commit index.
    - append_resp: ``index`` is the last index matched on success; on
      ``reject`` it echoes the probed index and ``reject_hint``/``hint_term``
      carry the fast-backtracking hint (§5.3).
    - vote/pre_vote: ``log_term``/``index`` are the candidate's last entry;
      ``context`` is ``b"transfer"`` for a leader-transfer campaign.
    - heartbeat/heartbeat_resp: ``context`` carries a ReadIndex round's id.
    - snapshot: ``snapshot_meta`` plus ``data`` bytes at ``offset``;
      ``done`` on the last chunk. snapshot_resp: ``index`` is the offset
      received so far, or the snapshot index once installed.
    """

    type: MessageType
    to: int
    frm: int
    term: int = 0
    log_term: int = 0
    index: int = 0
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    hint_term: int = 0
    context: bytes = b""
    snapshot_meta: SnapshotMeta | None = None
    offset: int = 0
    data: bytes = b""
    done: bool = False

    def to_wire(self) -> dict[str, Any]:
        w: dict[str, Any] = {"type": self.type.value, "to": self.to, "frm": self.frm, "term": self.term}
        # Zero/empty fields are left off: heartbeats are the bulk of idle
        # traffic and should stay small on the wire.
        if self.log_term:
            w["log_term"] = self.log_term
        if self.index:
            w["index"] = self.index
        if self.entries:
            w["entries"] = [e.to_wire() for e in self.entries]
        if self.commit:
            w["commit"] = self.commit
        if self.reject:
            w["reject"] = True
        if self.reject_hint:
            w["reject_hint"] = self.reject_hint
        if self.hint_term:
            w["hint_term"] = self.hint_term
        if self.context:
            w["context"] = self.context
        if self.snapshot_meta is not None:
            w["snapshot_meta"] = self.snapshot_meta.to_wire()
        if self.offset:
            w["offset"] = self.offset
        if self.data:
            w["data"] = self.data
        if self.done:
            w["done"] = True
        return w

    @classmethod
    def from_wire(cls, w: Any) -> Message:
        """Parse a message from a peer; raises ``ValueError`` on anything
        malformed so a bad peer frame is refused, never half-applied."""
        if not isinstance(w, dict):
            raise ValueError("raft message must be a map")
        try:
            mtype = MessageType(w["type"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"bad raft message type: {w.get('type')!r}") from e

        def _int(name: str) -> int:
            v = w.get(name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"raft message field {name!r} must be a non-negative integer")
            return v

        def _bytes(name: str) -> bytes:
            v = w.get(name, b"")
            if not isinstance(v, bytes):
                raise ValueError(f"raft message field {name!r} must be bytes")
            return v

        def _bool(name: str) -> bool:
            v = w.get(name, False)
            if not isinstance(v, bool):
                raise ValueError(f"raft message field {name!r} must be a boolean")
            return v

        entries_w = w.get("entries", [])
        if not isinstance(entries_w, list):
            raise ValueError("raft message entries must be a list")
        try:
            entries = [Entry.from_wire(e) for e in entries_w]
            meta = w.get("snapshot_meta")
            snapshot_meta = SnapshotMeta.from_wire(meta) if meta is not None else None
        except (TypeError, KeyError) as e:
            raise ValueError(f"malformed raft message: {e}") from e
        return cls(
            type=mtype,
            to=_int("to"),
            frm=_int("frm"),
            term=_int("term"),
            log_term=_int("log_term"),
            index=_int("index"),
            entries=entries,
            commit=_int("commit"),
            reject=_bool("reject"),
            reject_hint=_int("reject_hint"),
            hint_term=_int("hint_term"),
            context=_bytes("context"),
            snapshot_meta=snapshot_meta,
            offset=_int("offset"),
            data=_bytes("data"),
            done=_bool("done"),
        )


@dataclass(slots=True, frozen=True)
class ReadState:
    """A ReadIndex read that is now safe: once the state machine has applied
    ``index``, the read identified by ``context`` may be served."""

    index: int
    context: bytes


@dataclass(slots=True, frozen=True)
class SoftState:
    """Volatile state the driver cares about; not persisted."""

    leader: int | None
    role: Role


@dataclass(slots=True)
class Ready:
    """One batch of work the core hands to its driver (etcd's ``Ready``).

    The driver must, in order: persist ``snapshot`` (if any), ``entries`` and
    ``hard_state`` (fsync if ``must_sync``); only then send ``messages``;
    apply ``committed_entries`` (and install ``snapshot`` into the state
    machine); serve ``read_states`` once applied; then call
    ``core.advance(ready)``.
    """

    soft_state: SoftState | None = None
    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    committed_entries: list[Entry] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    read_states: list[ReadState] = field(default_factory=list)
    must_sync: bool = False


@dataclass(slots=True, frozen=True)
class RaftConfig:
    """Tunables of one Raft node, in ticks (the driver decides a tick's length).

    The defaults, with the driver's default tick of 50 ms, give heartbeats
    every 100 ms (10 RPCs per follower per second when idle, SurfStore's
    budget) and election timeouts drawn from [300, 600) ms.
    """

    id: int
    peers: tuple[int, ...]  # every voter, this node included
    election_ticks: int = 6
    heartbeat_ticks: int = 2
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 256
    max_bytes_per_msg: int = 1 << 20
    max_inflight_msgs: int = 64
    snapshot_chunk_bytes: int = 256 * 1024
