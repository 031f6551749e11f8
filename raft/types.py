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

import cbor2


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


class EntryKind(enum.IntEnum):
    """What a log entry holds (etcd's ``EntryType``, hashicorp's ``LogType``)."""

    #: A command for the state machine (or, with ``data`` None, a leader's no-op).
    NORMAL = 0
    #: A new group membership (``Membership.encode``), in force from the
    #: moment the entry is appended to a log, committed or not (thesis 4.1).
    MEMBERSHIP = 1


# Not frozen: a frozen dataclass costs three object.__setattr__ calls per
# construction, and the log builds one per entry. Treat entries
# as immutable all the same: the log, storage and Ready batches share them.
@dataclass(slots=True, unsafe_hash=True)
class Entry:
    """A log entry. ``data`` is opaque to Raft; ``None`` marks the no-op a new
    leader appends to commit entries of earlier terms (§5.4.2). ``kind`` is
    ``EntryKind.MEMBERSHIP`` for a membership change, whose ``data`` Raft
    reads itself and never hands to the state machine."""

    term: int
    index: int
    data: bytes | None = None
    kind: int = EntryKind.NORMAL

    def to_wire(self) -> list[Any]:
        if self.kind:
            return [self.term, self.index, self.data, int(self.kind)]
        return [self.term, self.index, self.data]

    @classmethod
    def from_wire(cls, w: Any) -> Entry:
        if not isinstance(w, list) or len(w) not in (3, 4):
            raise ValueError("an entry is [term, index, data] or [term, index, data, kind]")
        term, index, data = w[:3]
        if not (isinstance(term, int) and isinstance(index, int)):
            raise ValueError("entry term/index must be integers")
        if data is not None and not isinstance(data, bytes):
            raise ValueError("entry data must be bytes or None")
        kind = _entry_kind(w[3]) if len(w) == 4 else EntryKind.NORMAL
        return cls(term, index, data, kind)


def _entry_kind(value: Any) -> EntryKind:
    if type(value) is not int or value not in _ENTRY_KINDS:
        raise ValueError(f"unknown entry kind {value!r}")
    return _ENTRY_KINDS[value]


_ENTRY_KINDS = {k.value: k for k in EntryKind}


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


def kinds_column(entries: Sequence[Entry]) -> list[int] | None:
    """The kinds of ``entries`` that are not NORMAL, as a flat list
    ``[position, kind, ...]`` (positions from 0), or None when all are
    NORMAL: membership changes are rare, so the column is usually absent."""
    if not any(e.kind for e in entries):
        return None
    out: list[int] = []
    for pos, e in enumerate(entries):
        if e.kind:
            out += (pos, int(e.kind))
    return out


def entries_from_columns(first_index: int, terms: Any, datas: Any, kinds: Any = None) -> list[Entry]:
    """Inverse of ``entries_to_columns`` (and ``kinds_column``) for entries
    starting at ``first_index``; raises ``ValueError`` on anything malformed
    (the input comes from a peer or from disk)."""
    entries = _entries_from_columns(first_index, terms, datas)
    if kinds is not None:
        if type(kinds) is not list or len(kinds) % 2 or not set(map(type, kinds)) <= {int}:
            raise ValueError("entry kinds must be a list of (position, kind) pairs")
        for k in range(0, len(kinds), 2):
            pos = kinds[k]
            if not 0 <= pos < len(entries):
                raise ValueError(f"entry kind for position {pos} of {len(entries)} entries")
            entries[pos].kind = _entry_kind(kinds[k + 1])
    return entries


def _entries_from_columns(first_index: int, terms: Any, datas: Any) -> list[Entry]:
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


def _ids(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and v > 0 for v in value):
        raise ValueError(f"{what} must be a list of positive integers")
    return tuple(sorted(value))


@dataclass(slots=True, frozen=True)
class Membership:
    """Who is in a Raft group (thesis chapter 4; hashicorp's ``Configuration``).

    ``voters`` elect leaders and make up quorums; ``learners`` receive the
    log but neither vote nor count toward a commit, so a new server catches
    up without weakening the group (etcd's learners). ``addresses`` pairs
    ids with where to reach them: opaque to Raft, carried so that every
    replica, and a server joining, learns them from the log itself.

    Invariants: ids are positive, sorted, voters and learners disjoint;
    ``max_id`` is at least every id ever used, so an id is never reused for
    a different server (a removed server's stale messages cannot pass for
    the new one's)."""

    voters: tuple[int, ...]
    learners: tuple[int, ...] = ()
    addresses: tuple[tuple[int, str], ...] = ()
    max_id: int = 0

    def __post_init__(self) -> None:
        if set(self.voters) & set(self.learners):
            raise ValueError(
                f"ids {sorted(set(self.voters) & set(self.learners))} are both voter and learner"
            )
        top = max((*self.voters, *self.learners), default=0)
        if self.max_id < top:
            object.__setattr__(self, "max_id", top)

    @property
    def members(self) -> tuple[int, ...]:
        """Every member, voters and learners, sorted."""
        return tuple(sorted((*self.voters, *self.learners)))

    def address_of(self, node: int) -> str | None:
        for i, address in self.addresses:
            if i == node:
                return address
        return None

    def with_learner(self, node: int, address: str) -> Membership:
        """``node`` added as a learner at ``address``."""
        if node in self.voters or node in self.learners:
            raise ValueError(f"node {node} is already a member")
        addresses = tuple(sorted((*self.addresses, (node, address))))
        return Membership(self.voters, _ids((*self.learners, node), "learners"), addresses, self.max_id)

    def promoted(self, node: int) -> Membership:
        """Learner ``node`` made a voter."""
        if node not in self.learners:
            raise ValueError(f"node {node} is not a learner")
        learners = tuple(i for i in self.learners if i != node)
        return Membership(tuple(sorted((*self.voters, node))), learners, self.addresses, self.max_id)

    def without(self, node: int) -> Membership:
        """``node`` removed, voter or learner."""
        if node not in self.voters and node not in self.learners:
            raise ValueError(f"node {node} is not a member")
        return Membership(
            tuple(i for i in self.voters if i != node),
            tuple(i for i in self.learners if i != node),
            tuple(p for p in self.addresses if p[0] != node),
            self.max_id,
        )

    def to_wire(self) -> dict[str, Any]:
        w: dict[str, Any] = {"voters": list(self.voters)}
        if self.learners:
            w["learners"] = list(self.learners)
        if self.addresses:
            w["addresses"] = [[i, a] for i, a in self.addresses]
        if self.max_id:
            w["max_id"] = self.max_id
        return w

    @classmethod
    def from_wire(cls, w: Any) -> Membership:
        """Parse (from a peer, a log entry or disk); ``ValueError`` if malformed."""
        if not isinstance(w, dict):
            raise ValueError("a membership must be a map")
        voters = _ids(w.get("voters", []), "voters")
        learners = _ids(w.get("learners", []), "learners")
        pairs = w.get("addresses", [])
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and type(p[0]) is int and isinstance(p[1], str) for p in pairs
        ):
            raise ValueError("membership addresses must be [id, address] pairs")
        max_id = w.get("max_id", 0)
        if type(max_id) is not int or max_id < 0:
            raise ValueError("membership max_id must be a non-negative integer")
        return cls(voters, learners, tuple(sorted((i, a) for i, a in pairs)), max_id)

    def encode(self) -> bytes:
        """The payload of an ``EntryKind.MEMBERSHIP`` entry."""
        return cbor2.dumps(self.to_wire())

    @classmethod
    def decode(cls, data: bytes | None) -> Membership:
        if data is None:
            raise ValueError("a membership entry has no data")
        try:
            w = cbor2.loads(data)
        except Exception as e:
            raise ValueError(f"membership entry is not CBOR: {e}") from None
        return cls.from_wire(w)

    def describe(self) -> str:
        return f"voters {list(self.voters)}, learners {list(self.learners)}"


def single_change_problem(old: Membership, new: Membership) -> str:
    """Why going from ``old`` to ``new`` in one step is unsafe ("" if it is
    not): at most one voter added or removed (so any majority of the old
    voters and any majority of the new ones overlap, thesis 4.1), and at
    least one voter left."""
    if not new.voters:
        return "a group needs at least one voter"
    changed = set(old.voters) ^ set(new.voters)
    if len(changed) > 1:
        return f"voters {sorted(changed)} change at once; change one server at a time"
    if new.max_id < old.max_id:
        return "max_id may not go back"
    return ""


@dataclass(slots=True, frozen=True)
class SnapshotMeta:
    """Where a snapshot stands in the log, and the membership in force at
    ``index`` (so a server restored from it knows its group)."""

    index: int = 0
    term: int = 0
    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()
    addresses: tuple[tuple[int, str], ...] = ()
    max_id: int = 0

    def __post_init__(self) -> None:
        top = max((*self.voters, *self.learners), default=0)
        if self.max_id < top:
            object.__setattr__(self, "max_id", top)

    @classmethod
    def of(cls, index: int, term: int, membership: Membership) -> SnapshotMeta:
        return cls(
            index, term, membership.voters, membership.learners, membership.addresses, membership.max_id
        )

    @property
    def membership(self) -> Membership:
        return Membership(self.voters, self.learners, self.addresses, self.max_id)

    def to_wire(self) -> dict[str, Any]:
        w = self.membership.to_wire()
        w["index"] = self.index
        w["term"] = self.term
        return w

    @classmethod
    def from_wire(cls, w: Any) -> SnapshotMeta:
        m = Membership.from_wire(w)
        return cls(int(w["index"]), int(w["term"]), m.voters, m.learners, m.addresses, m.max_id)


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
            kinds = kinds_column(entries)
            if kinds is not None:
                w["ek"] = kinds
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
            entries = entries_from_columns(fields.get("index", 0) + 1, w.get("et"), w["ed"], w.get("ek"))
        meta = w.get("snapshot_meta")
        snapshot_meta = None
        if meta is not None:
            try:
                snapshot_meta = SnapshotMeta.from_wire(meta)
            except (TypeError, KeyError, ValueError) as e:
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
    #: The group's first voters, before any membership change (the
    #: bootstrap; etcd's ``--initial-cluster``). Later the log and snapshots
    #: say who the members are. A server joining a running group is
    #: started with the same bootstrap and need not be among it.
    peers: tuple[int, ...]
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
