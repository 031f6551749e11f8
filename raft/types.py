"""Plain data exchanged between the Raft core, its driver, storage and peers.

Everything here is a small slotted dataclass with a ``to_wire``/``from_wire``
pair that maps it onto CBOR-friendly builtins (dicts of str, int, bytes,
lists), so a transport can ship messages without knowing their shape and
storage can write records without pickling.

A batch of entries goes on the wire as columns, not as one list per entry:
the entries of an append (or of a WAL record) are contiguous, so their
indexes follow from the first one, their terms are almost always one value,
and what is left is a flat list of payloads. CBOR encodes a flat list of
byte strings far faster than a list of ``[term, index, data]`` triples
(no container per entry; ``benchmarks/raft_core.py`` measures it), and decoding needs no per-entry checks beyond the payload's type.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
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


# Not frozen: a frozen dataclass costs three object.__setattr__ calls per
# construction, and the log builds one per entry. Treat entries
# as immutable all the same: the log, storage and Ready batches share them.
@dataclass(slots=True, unsafe_hash=True)
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


_NONE_TYPE = type(None)
_DATA_TYPES = frozenset((bytes, _NONE_TYPE))


def entries_to_columns(entries: Sequence[Entry]) -> tuple[int | list[int], list[bytes | None]]:
    """The terms and payloads of contiguous ``entries``: ``(terms, datas)``
    where ``terms`` is one int when every entry has that term, else a flat
    run-length list ``[term, count, term, count, ...]``."""
    terms = [e.term for e in entries]
    first = terms[0]
    datas = [e.data for e in entries]
    if terms.count(first) == len(terms):
        return first, datas
    runs: list[int] = []
    run_term, run_len = first, 0
    for t in terms:
        if t == run_term:
            run_len += 1
        else:
            runs += (run_term, run_len)
            run_term, run_len = t, 1
    runs += (run_term, run_len)
    return runs, datas


def entries_from_columns(first_index: int, terms: Any, datas: Any) -> list[Entry]:
    """Inverse of ``entries_to_columns`` for entries starting at
    ``first_index``; raises ``ValueError`` on anything malformed (the input
    comes from a peer or from disk)."""
    if type(datas) is not list:
        raise ValueError("entry payloads must be a list")
    if not set(map(type, datas)) <= _DATA_TYPES:
        raise ValueError("entry data must be bytes or None")
    count = len(datas)
    indexes = range(first_index, first_index + count)
    if type(terms) is int:
        if terms < 0:
            raise ValueError("entry terms must be non-negative integers")
        return list(map(Entry, repeat(terms, count), indexes, datas))
    if type(terms) is not list or len(terms) % 2 or not set(map(type, terms)) <= {int}:
        raise ValueError("entry terms must be an integer or a list of (term, count) runs")
    counts = terms[1::2]
    if terms and (min(terms) < 0 or min(counts) < 1):
        raise ValueError("entry terms must be non-negative integers and run lengths positive")
    if sum(counts) != count:
        # Checked before expanding: a bogus run length must not allocate.
        raise ValueError(f"entry term runs cover {sum(counts)} entries, not {count}")
    expanded: list[int] = []
    for k in range(0, len(terms), 2):
        expanded += repeat(terms[k], terms[k + 1])
    return list(map(Entry, expanded, indexes, datas))


def check_contiguous(entries: Sequence[Entry], first_index: int) -> bool:
    """Whether ``entries`` are numbered ``first_index, first_index + 1, ...``."""
    return [e.index for e in entries] == list(range(first_index, first_index + len(entries)))


def entries_problem(entries: Sequence[Any], first_index: int, min_term: int, max_term: int) -> str:
    """What is wrong with a batch of entries from a peer ("" if nothing):
    they must be ``Entry`` objects numbered from ``first_index``, with terms
    non-decreasing within [min_term, max_term] and bytes-or-None payloads.
    Whole-batch checks in C loops: a follower runs this on every entry."""
    if set(map(type, entries)) != {Entry} and not all(isinstance(e, Entry) for e in entries):
        return "entries are not log entries"
    if not check_contiguous(entries, first_index):
        return "entries not contiguous after index"
    terms = [e.term for e in entries]
    if terms[0] < min_term or terms[-1] > max_term or (len(terms) > 1 and terms != sorted(terms)):
        return "entry terms out of order"
    if not set(map(type, [e.data for e in entries])) <= _DATA_TYPES:
        return "entry data not bytes"
    return ""


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
        """CBOR-friendly form. Entries go as columns (see the module doc):
        ``et`` terms, ``ed`` payloads, numbered from ``index + 1``."""
        w: dict[str, Any] = {"type": self.type.value, "to": self.to, "frm": self.frm, "term": self.term}
        # Zero/empty fields are left off: heartbeats are the bulk of idle
        # traffic and should stay small on the wire.
        if self.log_term:
            w["log_term"] = self.log_term
        if self.index:
            w["index"] = self.index
        entries = self.entries
        if entries:
            if not check_contiguous(entries, self.index + 1):
                raise ValueError(f"message entries do not follow index {self.index} contiguously")
            w["et"], w["ed"] = entries_to_columns(entries)
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
        malformed so a bad peer frame is refused, never half-applied.
        Unknown keys are ignored."""
        if not isinstance(w, dict):
            raise ValueError("raft message must be a map")
        try:
            mtype = _MESSAGE_TYPES[w["type"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad raft message type: {w.get('type')!r}") from e
        fields: dict[str, Any] = {}
        for name, value in w.items():
            kind = _WIRE_FIELDS.get(name)
            if kind is None:
                continue
            if kind is int:
                if type(value) is not int or value < 0:
                    raise ValueError(f"raft message field {name!r} must be a non-negative integer")
            elif kind is bytes:
                if type(value) is not bytes:
                    raise ValueError(f"raft message field {name!r} must be bytes")
            elif kind is bool:
                if type(value) is not bool:
                    raise ValueError(f"raft message field {name!r} must be a boolean")
            fields[name] = value
        entries: list[Entry] = []
        if "ed" in w:
            entries = entries_from_columns(fields.get("index", 0) + 1, w.get("et"), w["ed"])
        meta = w.get("snapshot_meta")
        snapshot_meta = None
        if meta is not None:
            try:
                snapshot_meta = SnapshotMeta.from_wire(meta)
            except (TypeError, KeyError) as e:
                raise ValueError(f"malformed raft message snapshot_meta: {e}") from e
        get = fields.get
        return cls(
            mtype,
            get("to", 0),
            get("frm", 0),
            get("term", 0),
            get("log_term", 0),
            get("index", 0),
            entries,
            get("commit", 0),
            get("reject", False),
            get("reject_hint", 0),
            get("hint_term", 0),
            get("context", b""),
            snapshot_meta,
            get("offset", 0),
            get("data", b""),
            get("done", False),
        )


_MESSAGE_TYPES: dict[str, MessageType] = {t.value: t for t in MessageType}
#: The scalar fields of a message on the wire and their types (``et``/``ed``
#: and ``snapshot_meta`` are parsed on their own).
_WIRE_FIELDS: dict[str, type] = {
    "to": int,
    "frm": int,
    "term": int,
    "log_term": int,
    "index": int,
    "commit": int,
    "reject": bool,
    "reject_hint": int,
    "hint_term": int,
    "context": bytes,
    "offset": int,
    "data": bytes,
    "done": bool,
}


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
    #: The largest snapshot a follower assembles from chunks; a chunk that
    #: would take it past this is rejected (and logged), so a broken or
    #: forged leader cannot make it buffer without end.
    max_snapshot_bytes: int = 4 << 30
