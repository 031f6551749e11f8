"""The I/O-free Raft core: a deterministic state machine in the manner of
etcd's raft (``raft.go``).

It is fed logical clock ticks (``tick``), peer messages (``step``) and
client requests (``propose``, ``read_index``, ``transfer_leader``) and hands
back, through ``ready()``, one ``Ready`` batch at a time: what to persist,
what to send, what is committed. It never touches a clock, a socket or a
file; the driver (``raft.node``) does, and calls ``advance(ready)`` once a
batch is done. The Ready contract (persist, then send, then apply) is what
lets the core answer votes and appends in the same batch as the state they
depend on.

Implemented from the Raft paper and Ongaro's thesis: elections with
randomized timeouts (§5.2), pre-vote and check-quorum with leader lease
(thesis 9.6), replication with batching, pipelining and fast backtracking
(§5.3), commitment of current-term entries only (§5.4.2), ReadIndex (thesis
6.4), leader transfer (thesis 3.10), chunked InstallSnapshot (§7), and
membership change one server at a time with learners (thesis chapter 4).

Membership. ``RaftConfig.peers`` is only the bootstrap; after that the
members are what the log says. A change is an ``EntryKind.MEMBERSHIP`` entry
holding the whole new ``Membership``, and it is in force on a server as soon
as the entry is in its log, committed or not (thesis 4.1): a truncated entry
takes its membership with it. Each change adds or removes at most one voter,
so every majority of the old voters meets every majority of the new; a new
one is accepted only when the previous change has committed and the leader
has committed an entry of its own term (the fix of thesis 4.1's single-server
bug). A new server joins as a learner, replicated to but not counted, and
becomes a voter in a later change once it has caught up. A leader that
removes itself goes on leading without counting itself until the change
commits, then steps down.

A leader's new commit index never costs a message of its own right away:
it rides on the next append, and a follower that no append reached learns
it on the leader's next tick (``_send_commit_updates``) or heartbeat.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from raft.errors import NotLeaderError
from raft.log import LogError, RaftLog
from raft.progress import Progress, ProgressState, ReadIndexTracker
from raft.types import (
    Entry,
    EntryKind,
    HardState,
    Membership,
    Message,
    MessageType,
    RaftConfig,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
    entries_problem,
    single_change_problem,
)

_logger = logging.getLogger(__name__)

#: ``Message.context`` of the votes of a leader-transfer campaign: they
#: override the leader lease, because the leader itself asked for them.
TRANSFER_CONTEXT = b"transfer"

_VOTE_REQUESTS = (MessageType.VOTE, MessageType.PRE_VOTE)
_FROM_LEADER = (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT)


@dataclass(slots=True)
class _IncomingSnapshot:
    """A snapshot a follower is assembling from chunks. Keyed by the
    sending leader and its term too: two leaders may serialize the same
    state differently, so chunks from different senders never mix."""

    key: tuple[int, int, SnapshotMeta]
    data: bytearray


def _validate_config(config: RaftConfig) -> tuple[int, ...]:
    peers = tuple(sorted(set(config.peers)))
    if len(peers) != len(config.peers):
        raise ValueError(f"duplicate ids in peers {config.peers}")
    if not peers:
        raise ValueError("the bootstrap peers may not be empty")
    if not isinstance(config.id, int) or isinstance(config.id, bool) or config.id <= 0:
        raise ValueError(f"node id must be a positive integer: {config.id!r}")
    if any(not isinstance(p, int) or isinstance(p, bool) or p <= 0 for p in peers):
        raise ValueError(f"peer ids must be positive integers: {peers}")
    if config.heartbeat_ticks < 1 or config.election_ticks <= config.heartbeat_ticks:
        raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
    if config.max_entries_per_msg < 1 or config.max_bytes_per_msg < 1 or config.max_inflight_msgs < 1:
        raise ValueError("message limits and inflight window must be positive")
    if config.snapshot_chunk_bytes < 1:
        raise ValueError("snapshot_chunk_bytes must be positive")
    if config.max_snapshot_bytes < config.snapshot_chunk_bytes:
        raise ValueError("max_snapshot_bytes must hold at least one chunk")
    return peers


class RaftCore:
    """One Raft node's protocol state (see the module docstring for the
    Ready contract). Every method is cheap, synchronous and deterministic
    given the ``rng``; nothing here blocks or does I/O."""

    def __init__(
        self,
        config: RaftConfig,
        *,
        hard_state: HardState = HardState(),  # noqa: B008 -- frozen dataclass, safe as a default
        snapshot: Snapshot | None = None,
        entries: Sequence[Entry] = (),
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = config
        self._id = config.id
        bootstrap = Membership(_validate_config(config))
        self._rng = rng if rng is not None else random.Random()

        if snapshot is None or not snapshot.meta.voters:
            meta = snapshot.meta if snapshot is not None else SnapshotMeta()
            snapshot = Snapshot(
                SnapshotMeta.of(meta.index, meta.term, bootstrap), snapshot.data if snapshot else b""
            )
        # The latest snapshot we hold, sent to followers that lag behind it.
        self._snapshot = snapshot
        self._log = RaftLog(snapshot.meta.index, snapshot.meta.term, entries, hard_state.commit)
        if hard_state.term < self._log.last_term:
            raise LogError(
                f"hard state term {hard_state.term} is below the last log term {self._log.last_term}"
            )
        if hard_state.vote is not None and (type(hard_state.vote) is not int or hard_state.vote <= 0):
            raise LogError(f"hard state vote {hard_state.vote!r} is not a node id")
        #: Membership entries in the log after the snapshot, in index order:
        #: (index, term, membership). The membership in force is the last
        #: one's, or the snapshot's when there is none.
        self._conf_log: list[tuple[int, int, Membership]] = []
        for e in entries:
            if e.kind == EntryKind.MEMBERSHIP:
                self._conf_log.append((e.index, e.term, Membership.decode(e.data)))
        # Set by _use_membership (below): the members (voters and learners,
        # what a leader replicates to), the voters, and a voters' majority.
        self._membership = snapshot.meta.membership
        self._peers: tuple[int, ...] = ()
        self._voters: frozenset[int] = frozenset()
        self._quorum = 1
        self._has_followers = False

        self._term = hard_state.term
        self._vote: int | None = hard_state.vote
        self._role = Role.FOLLOWER
        self._leader: int | None = None

        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = self._cfg.election_ticks
        self._votes: dict[int, bool] = {}
        self._progress: dict[int, Progress] = {}
        self._lead_transferee: int | None = None
        self._reads = ReadIndexTracker(self._id, self._quorum)
        self._use_membership(self._conf_log[-1][2] if self._conf_log else self._membership)
        # Reads asked of a leader before it committed an entry of its term:
        # its commit index may still be behind the previous leader's.
        self._deferred_reads: list[bytes] = []
        self._incoming_snapshot: _IncomingSnapshot | None = None
        # Leader: new entries wait for the next ready() so that proposals
        # made together leave in one message per follower. A new commit index
        # does not send anything by itself: it rides on the next append, or
        # goes out on the next tick (see _send_commit_updates).
        self._bcast_entries = False

        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._unpersisted_snapshot: Snapshot | None = None
        self._prev_soft = SoftState(None, Role.FOLLOWER)
        self._prev_hard = hard_state
        #: Messages refused as malformed or misaddressed (for tests/metrics).
        self.refused = 0

        self._reset(self._term)

    # -- read-only state ---------------------------------------------------

    @property
    def id(self) -> int:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> int | None:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader(self) -> int | None:
        return self._leader

    @property
    def commit_index(self) -> int:
        return self._log.committed

    @property
    def applied_index(self) -> int:
        return self._log.applied

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self._snapshot.meta

    @property
    def peers(self) -> tuple[int, ...]:
        """Every member now (voters and learners)."""
        return self._peers

    @property
    def voters(self) -> frozenset[int]:
        return self._voters

    @property
    def membership(self) -> Membership:
        """The membership in force: the newest in the log, committed or not."""
        return self._membership

    @property
    def membership_pending(self) -> bool:
        """Whether the newest membership change is not yet committed."""
        return bool(self._conf_log) and self._conf_log[-1][0] > self._log.committed

    def match_of(self, node: int) -> int | None:
        """Leader: the highest index known to be in ``node``'s log (None
        off the leader, or for a server it does not replicate to)."""
        if self._role != Role.LEADER:
            return None
        pr = self._progress.get(node)
        return None if pr is None else pr.match

    def membership_at(self, index: int) -> Membership:
        """The membership in force once the log holds entries through
        ``index`` (``index`` at or after the snapshot)."""
        for i, _term, m in reversed(self._conf_log):
            if i <= index:
                return m
        return self._snapshot.meta.membership

    @property
    def incoming_snapshot_bytes(self) -> int:
        """Bytes of a snapshot being assembled from chunks (0 if none)."""
        inc = self._incoming_snapshot
        return 0 if inc is None else len(inc.data)

    @property
    def lead_transferee(self) -> int | None:
        """The peer a leader transfer is in progress to, if any."""
        return self._lead_transferee

    def log_term(self, index: int) -> int | None:
        """Term of the entry at ``index`` (None if compacted or absent)."""
        return self._log.term(index)

    def log_entries(self, lo: int, hi: int) -> list[Entry]:
        """In-memory entries [lo, hi), clipped to what the log holds."""
        lo = max(lo, self._log.first_index)
        return self._log.slice(lo, hi) if lo < hi else []

    def status(self) -> dict[str, object]:
        st: dict[str, object] = {
            "id": self._id,
            "term": self._term,
            "vote": self._vote,
            "role": self._role.value,
            "leader": self._leader,
            "commit": self._log.committed,
            "applied": self._log.applied,
            "last_index": self._log.last_index,
            "snapshot_index": self._snapshot.meta.index,
            "voters": sorted(self._voters),
            "learners": list(self._membership.learners),
        }
        if self._role == Role.LEADER:
            st["progress"] = {pid: pr.describe() for pid, pr in self._progress.items() if pid != self._id}
            st["lead_transferee"] = self._lead_transferee
            st["pending_reads"] = self._reads.pending_count() + len(self._deferred_reads)
        return st

    # -- inputs ------------------------------------------------------------

    def tick(self) -> None:
        """One logical clock tick."""
        if self._role == Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def campaign(self) -> None:
        """Start an election now (a pre-vote round first when enabled)."""
        self._hup(transfer=False)

    def leader_unreachable(self, peer: int) -> bool:
        """The driver lost its connection to ``peer``: as a rule the process
        there died (a crash or SIGKILL closes its sockets at once). If
        ``peer`` is our leader, stop counting on it: its lease here ends,
        so this server answers candidates, and it campaigns within a tick or
        a few instead of an election timeout after the leader's last
        message. Only with pre-vote and check-quorum, which keep this
        harmless when the leader is in fact alive: the voters still hearing
        it refuse the pre-vote, and its next message makes it our leader
        again.

        The followers of a dead leader all hear of it at once, so they take
        turns instead of drawing lots: the one with the lowest id campaigns
        at its next tick, the next one a tick later, and so on. By then the
        first has won (if its log allows) and its heartbeat resets the
        others; two campaigns in one tick would split the vote and cost an
        election timeout. True if ``peer`` was our leader."""
        if (
            self._role != Role.FOLLOWER
            or self._leader is None
            or self._leader != peer
            or not (self._cfg.pre_vote and self._cfg.check_quorum)
        ):
            return False
        _logger.info(f"raft node {self._id}: lost the connection to leader {peer} (term {self._term})")
        self._leader = None
        others = sorted(v for v in self._voters if v != peer)
        turn = others.index(self._id) if self._id in others else len(others)
        wait = min(1 + turn, self._randomized_election_timeout)
        self._election_elapsed = max(self._election_elapsed, self._randomized_election_timeout - wait)
        return True

    def broadcast_heartbeat(self) -> None:
        """Leader: send a heartbeat round now; others: nothing."""
        if self._role == Role.LEADER:
            self._bcast_heartbeat()

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append ``data`` to the leader's log; returns its (index, term).
        It is replicated with the next ``ready()``."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if self._lead_transferee is not None:
            # The transferee is about to take over: send the client there.
            raise NotLeaderError(self._lead_transferee)
        if not isinstance(data, bytes):
            raise TypeError(f"proposal data must be bytes, not {type(data).__name__}")
        index = self._log.append_new(self._term, data)
        # With no one to send to, the entry commits once persisted (advance).
        self._bcast_entries = self._has_followers
        return index, self._term

    def propose_membership(self, new: Membership) -> tuple[int, int]:
        """Append a change to membership ``new`` (one voter added or removed
        at most, see the module docstring); returns its (index, term).
        Raises ``NotLeaderError`` off the leader and ``ValueError`` when the
        change is not allowed now (another one is pending, the leader has not
        committed in its term yet, or it changes too much)."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if self._lead_transferee is not None:
            raise NotLeaderError(self._lead_transferee)
        if not isinstance(new, Membership):
            raise TypeError("propose_membership takes a Membership")
        if self.membership_pending:
            raise ValueError("another membership change is not committed yet")
        if not self._committed_in_current_term():
            raise ValueError("the leader has not committed an entry of its term yet; try again")
        problem = single_change_problem(self._membership, new)
        if problem:
            raise ValueError(problem)
        index = self._log.last_index + 1
        self._log.append([Entry(self._term, index, new.encode(), EntryKind.MEMBERSHIP)])
        self._conf_log.append((index, self._term, new))
        self._use_membership(new)
        self._bcast_entries = self._has_followers
        return index, self._term

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point; it shows up later as a
        ``ReadState`` with this ``context`` in ``Ready.read_states``."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if not isinstance(context, bytes):
            raise TypeError("read context must be bytes")
        if not self._committed_in_current_term():
            self._deferred_reads.append(context)
            return
        self._enqueue_read(context)

    def transfer_leader(self, to: int) -> None:
        """Hand leadership to ``to`` (thesis 3.10). Proposals are refused
        until the transfer completes or is aborted (after one election
        timeout)."""
        if self._role != Role.LEADER:
            raise NotLeaderError(self._leader)
        if to not in self._voters:
            raise ValueError(f"cannot transfer leadership to {to}: not a voter")
        if self._lead_transferee is not None:
            if self._lead_transferee == to:
                return
            self._abort_leader_transfer()
        if to == self._id:
            return
        self._election_elapsed = 0
        self._lead_transferee = to
        pr = self._progress[to]
        if pr.match == self._log.last_index:
            self._send_timeout_now(to)
        else:
            self._send_append(to)

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Record a snapshot of the state machine as of ``index`` (already
        applied) and drop the log entries it covers."""
        if index <= self._log.snapshot_index:
            raise ValueError(f"log already compacted through {self._log.snapshot_index}")
        if index > self._log.applying:
            raise ValueError(f"cannot snapshot at {index}: only applied through {self._log.applying}")
        membership = self.membership_at(index)
        term = self._log.compact(index)
        # Everything compacted was persisted and applied by the driver.
        self._log.snapshot_persisted(index)
        self._snapshot = Snapshot(SnapshotMeta.of(index, term, membership), bytes(data))
        self._conf_log = [c for c in self._conf_log if c[0] > index]
        return self._snapshot

    def step(self, msg: Message) -> None:
        """Handle one message from a peer. Misaddressed or malformed ones are
        refused (logged, counted), never half-applied."""
        problem = self._check_message(msg)
        if problem:
            self._refuse(msg, problem)
            return
        if not self._step_term(msg):
            return
        if msg.type in _VOTE_REQUESTS:
            self._handle_vote_request(msg)
        elif self._role == Role.LEADER:
            self._step_leader(msg)
        elif self._role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(msg)
        else:
            self._step_follower(msg)

    # -- Ready ---------------------------------------------------------------

    def has_ready(self) -> bool:
        # Field by field, without building SoftState/HardState: the driver
        # asks after every message it hands us.
        if self._msgs or self._read_states or self._unpersisted_snapshot is not None:
            return True
        soft, hard, log = self._prev_soft, self._prev_hard, self._log
        if self._leader != soft.leader or self._role != soft.role:
            return True
        if self._term != hard.term or self._vote != hard.vote or log.committed != hard.commit:
            return True
        if log.handed < log.last_index or log.has_committed_to_hand():
            return True
        return self._role == Role.LEADER and (self._bcast_entries or bool(self._reads.queued))

    def ready(self) -> Ready:
        """Everything accumulated since the previous ``ready()``. Hand each
        Ready back to ``advance`` in order once it has been processed."""
        self._flush()
        rd = Ready()
        prev_soft, prev_hard, log = self._prev_soft, self._prev_hard, self._log
        if self._leader != prev_soft.leader or self._role != prev_soft.role:
            rd.soft_state = self._prev_soft = SoftState(self._leader, self._role)
        if self._term != prev_hard.term or self._vote != prev_hard.vote or log.committed != prev_hard.commit:
            rd.hard_state = self._prev_hard = self._hard_state()
            rd.must_sync = self._term != prev_hard.term or self._vote != prev_hard.vote
        if log.handed < log.last_index:
            rd.entries = log.unhanded_entries()
            log.mark_handed()
        if self._unpersisted_snapshot is not None:
            rd.snapshot = self._unpersisted_snapshot
            self._unpersisted_snapshot = None
        if log.has_committed_to_hand():
            rd.committed_entries = log.committed_to_hand()
        if self._msgs:
            rd.messages = self._msgs
            self._msgs = []
        if self._read_states:
            rd.read_states = self._read_states
            self._read_states = []
        rd.must_sync = rd.must_sync or bool(rd.entries) or rd.snapshot is not None
        return rd

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied ``ready``."""
        if ready.snapshot is not None:
            self._log.snapshot_persisted(ready.snapshot.meta.index)
            self._log.applied_to(ready.snapshot.meta.index)
        if ready.entries:
            last = ready.entries[-1]
            self._log.stable_to(last.index, last.term)
        if ready.committed_entries:
            self._log.applied_to(ready.committed_entries[-1].index)
        if self._role == Role.LEADER:
            # Persist before ack: the leader's own entries count towards a
            # quorum only once they are on its disk.
            if self._progress[self._id].maybe_update(self._log.stable):
                self._maybe_commit()

    # -- message intake ------------------------------------------------------

    def _check_message(self, m: Message) -> str:
        if not isinstance(m, Message) or not isinstance(m.type, MessageType):
            return "not a raft message"
        if m.to != self._id:
            return f"addressed to {m.to}"
        # Not only members: a server learns of a membership that adds it
        # from the very leader whose messages it must take to learn it.
        if type(m.frm) is not int or m.frm <= 0 or m.frm == self._id:
            return f"from bad node id {m.frm}"
        if not isinstance(m.term, int) or m.term < 0:
            return "bad term"
        if m.term == 0 and not (m.type == MessageType.PRE_VOTE_RESP and m.reject):
            # Only a node that never saw an election refuses a pre-vote at
            # term 0; everything else is sent in some term >= 1.
            return "missing term"
        if m.type in _FROM_LEADER and m.term == self._term and self._leader not in (None, m.frm):
            # Election safety makes this impossible from an honest peer;
            # strangers are let in (a joining server's first leader is one).
            return f"claims to lead term {m.term}, led by {self._leader}"
        if m.type == MessageType.APPEND and m.entries:
            problem = entries_problem(m.entries, m.index + 1, m.log_term, m.term)
            if problem:
                return f"append {problem}"
        elif m.type == MessageType.SNAPSHOT:
            meta = m.snapshot_meta
            if meta is None or meta.term > m.term or meta.index <= 0:
                return "snapshot chunk without a valid snapshot_meta"
        return ""

    def _refuse(self, m: Message, reason: str) -> None:
        self.refused += 1
        _logger.warning(
            "raft node {id}: refused {type} from {frm}: {reason}".format(
                id=self._id, type=getattr(m, "type", "?"), frm=getattr(m, "frm", "?"), reason=reason
            )
        )

    def _step_term(self, m: Message) -> bool:
        """Apply the term rules common to every role; False if the message
        is to be dropped."""
        if m.term > self._term:
            if m.type in _VOTE_REQUESTS:
                forced = m.context == TRANSFER_CONTEXT
                if not forced and self._in_lease():
                    # Leader lease: we heard from a live leader less than an
                    # election timeout ago, so this candidate is disruptive
                    # (e.g. just rejoined from a partition). Ignore it
                    # without adopting its term.
                    return False
            if m.type == MessageType.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MessageType.PRE_VOTE_RESP and not m.reject:
                pass  # granted for a term we have not started yet
            elif m.type in _FROM_LEADER:
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
            return True
        if m.term < self._term:
            if (self._cfg.check_quorum or self._cfg.pre_vote) and m.type in (
                MessageType.APPEND,
                MessageType.HEARTBEAT,
            ):
                # A stale leader (e.g. healed partition) may never hear a
                # higher term otherwise when pre-vote keeps us from
                # campaigning: tell it ours so it steps down.
                self._send(Message(MessageType.APPEND_RESP, to=m.frm, frm=self._id, term=self._term))
            elif m.type == MessageType.PRE_VOTE:
                self._send(
                    Message(MessageType.PRE_VOTE_RESP, to=m.frm, frm=self._id, term=self._term, reject=True)
                )
            return False
        return True

    def _in_lease(self) -> bool:
        return (
            self._cfg.check_quorum
            and self._leader is not None
            and self._election_elapsed < self._cfg.election_ticks
        )

    def _handle_vote_request(self, m: Message) -> None:
        resp_type = MessageType.VOTE_RESP if m.type == MessageType.VOTE else MessageType.PRE_VOTE_RESP
        can_vote = (
            self._vote == m.frm
            or (self._vote is None and self._leader is None)
            or (m.type == MessageType.PRE_VOTE and m.term > self._term)
        )
        if can_vote and self._log.is_up_to_date(m.index, m.log_term):
            self._send(Message(resp_type, to=m.frm, frm=self._id, term=m.term))
            if m.type == MessageType.VOTE:
                self._election_elapsed = 0
                self._vote = m.frm
        else:
            self._send(Message(resp_type, to=m.frm, frm=self._id, term=self._term, reject=True))

    def _step_follower(self, m: Message) -> None:
        if m.type in _FROM_LEADER:
            self._election_elapsed = 0
            self._leader = m.frm
            self._handle_from_leader(m)
        elif m.type == MessageType.TIMEOUT_NOW:
            _logger.info(f"raft node {self._id}: leader {m.frm} asked us to take over (term {self._term})")
            self._hup(transfer=True)

    def _step_candidate(self, m: Message) -> None:
        if m.type in _FROM_LEADER:
            # Someone won this term.
            self._become_follower(m.term, m.frm)
            self._handle_from_leader(m)
        elif m.type == MessageType.PRE_VOTE_RESP and self._role == Role.PRE_CANDIDATE:
            # Granted answers carry the term we would campaign in; refusals
            # carry the voter's term, which is ours (higher ones already
            # made us follower).
            wanted = self._term if m.reject else self._term + 1
            if m.term == wanted:
                self._poll(m.frm, not m.reject)
        elif m.type == MessageType.VOTE_RESP and self._role == Role.CANDIDATE:
            self._poll(m.frm, not m.reject)

    def _step_leader(self, m: Message) -> None:
        pr = self._progress.get(m.frm)
        if pr is None:
            return  # not a member (any more): nothing of ours to track
        if m.type == MessageType.APPEND_RESP:
            pr.recent_active = True
            self._handle_append_resp(m, pr)
        elif m.type == MessageType.HEARTBEAT_RESP:
            pr.recent_active = True
            self._handle_heartbeat_resp(m, pr)
        elif m.type == MessageType.SNAPSHOT_RESP:
            pr.recent_active = True
            self._handle_snapshot_resp(m, pr)
        elif m.type in _FROM_LEADER:
            self._refuse(m, f"another leader in our term {self._term}")

    # -- elections -----------------------------------------------------------

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            if self._may_campaign():
                self._hup(transfer=False)
            else:
                # No word from a leader for an election timeout: forget it,
                # which also ends its lease here, so that this server (a
                # learner, or a voter whose log has not told it so yet)
                # answers the next candidate instead of ignoring it.
                self._leader = None

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_ticks:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                if not self._quorum_active():
                    _logger.info(
                        f"raft node {self._id}: lost contact with a quorum, stepping down (term {self._term})"
                    )
                    self._become_follower(self._term, None)
                    return
                for pid, pr in self._progress.items():
                    pr.recent_active = pid == self._id
            if self._lead_transferee is not None:
                _logger.info(f"raft node {self._id}: leader transfer to {self._lead_transferee} timed out")
                self._abort_leader_transfer()
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()
        self._send_commit_updates()

    def _quorum_active(self) -> bool:
        voters = self._voters
        return (
            sum(1 for pid, pr in self._progress.items() if pr.recent_active and pid in voters) >= self._quorum
        )

    def _hup(self, *, transfer: bool) -> None:
        if self._role == Role.LEADER:
            return
        if not self._may_campaign():
            _logger.info(
                f"raft node {self._id}: not a voter ({self._membership.describe()}), not campaigning"
            )
            return
        if self._cfg.pre_vote and not transfer:
            self._campaign(pre_vote=True, transfer=False)
        else:
            self._campaign(pre_vote=False, transfer=transfer)

    def _campaign(self, *, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            self._become_pre_candidate()
            vote_type, vote_term = MessageType.PRE_VOTE, self._term + 1
        else:
            self._become_candidate()
            vote_type, vote_term = MessageType.VOTE, self._term
        if self._poll(self._id, True):
            return  # single-voter group: already decided
        for pid in sorted(self._voters):
            if pid == self._id:
                continue
            self._send(
                Message(
                    vote_type,
                    to=pid,
                    frm=self._id,
                    term=vote_term,
                    index=self._log.last_index,
                    log_term=self._log.last_term,
                    context=TRANSFER_CONTEXT if transfer else b"",
                )
            )

    def _poll(self, voter: int, granted: bool) -> bool:
        """Count a vote; returns True if the election was decided."""
        if voter not in self._voters:
            return False  # a learner's or a stranger's answer counts for nothing
        self._votes.setdefault(voter, granted)
        yes = sum(1 for v in self._votes.values() if v)
        no = len(self._votes) - yes
        if yes >= self._quorum:
            if self._role == Role.PRE_CANDIDATE:
                self._campaign(pre_vote=False, transfer=False)
            else:
                self._become_leader()
            return True
        if no > len(self._voters) - self._quorum:
            self._become_follower(self._term, None)
            return True
        return False

    # -- role changes --------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
        self._leader = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = self._rng.randrange(
            self._cfg.election_ticks, 2 * self._cfg.election_ticks
        )
        self._lead_transferee = None
        self._votes = {}
        next_index = self._log.last_index + 1
        # Our own progress is kept even when we are not a member: a leader
        # that removed itself leads until that change commits.
        self._progress = {
            pid: Progress(next_index, self._cfg.max_inflight_msgs) for pid in {*self._peers, self._id}
        }
        self._progress[self._id].match = self._log.stable
        # Reads in flight die with the leadership they were confirming; the
        # driver sees the role change in soft_state and fails them.
        self._reads.reset()
        self._deferred_reads = []
        self._bcast_entries = False

    def _become_follower(self, term: int, leader: int | None) -> None:
        was = self._role
        self._reset(term)
        self._role = Role.FOLLOWER
        self._leader = leader
        if was == Role.LEADER:
            _logger.info(f"raft node {self._id}: no longer leader (term {term}, leader {leader})")

    def _become_pre_candidate(self) -> None:
        # Not a reset: the term and vote stay until a real election starts.
        self._role = Role.PRE_CANDIDATE
        self._votes = {}
        self._leader = None

    def _become_candidate(self) -> None:
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role = Role.LEADER
        self._leader = self._id
        me = self._progress[self._id]
        me.become_replicate()
        me.recent_active = True
        _logger.info(f"raft node {self._id}: became leader for term {self._term}")
        # The no-op of §5.4.2/thesis 6.4: committing it commits every
        # earlier entry and tells us the cluster's commit index.
        self._log.append([Entry(self._term, self._log.last_index + 1, None)])
        self._bcast_entries = len(self._peers) > 1

    # -- leader: replication -------------------------------------------------

    def _flush(self) -> None:
        """Send what proposals, reads and commits accumulated since the last
        Ready: one append per follower for all of them."""
        if self._role != Role.LEADER:
            return
        round_id = self._reads.open_round()
        if round_id is not None:
            self._bcast_heartbeat(ReadIndexTracker.encode(round_id))
        if self._bcast_entries:
            self._bcast_entries = False
            for pid in self._progress:
                if pid != self._id:
                    self._send_all_appends(pid, send_if_empty=False)

    def _send_commit_updates(self) -> None:
        """Tell followers a commit index that no append carried yet.

        Sending one append per commit (and getting its answer) was half the
        Raft traffic per write at low load; the commit index rides on the
        next append instead, and a follower learns it at the latest one tick
        later, here. Clients do not wait for this: the leader answers them
        once it has applied the entry itself."""
        committed = self._log.committed
        for pid, pr in self._progress.items():
            if pid != self._id and pr.can_bump_commit(committed):
                self._send_append(pid)

    def _send_all_appends(self, to: int, send_if_empty: bool) -> None:
        """Fill the follower's pipeline (bounded by the inflight window and
        by the log's end)."""
        pr = self._progress[to]
        last = self._log.last_index
        if not send_if_empty and pr.next > last:
            return  # nothing new for it (the usual case after an ack)
        sent = self._send_append(to, send_if_empty=send_if_empty)
        limit = self._cfg.max_inflight_msgs
        while sent and limit > 0 and pr.next <= last:
            sent = self._send_append(to, send_if_empty=False)
            limit -= 1

    def _send_append(self, to: int, *, send_if_empty: bool = True) -> bool:
        pr = self._progress[to]
        if pr.is_paused():
            return False
        if pr.next > self._log.last_index + 1:
            pr.next = self._log.last_index + 1
        prev = pr.next - 1
        prev_term = self._log.term(prev)
        if prev_term is None:
            # The entries this follower needs are compacted away.
            return self._start_snapshot(to, pr)
        entries: list[Entry] = []
        if pr.state != ProgressState.REPLICATE or not pr.inflights.full():
            entries = self._log.slice(
                pr.next,
                self._log.last_index + 1,
                self._cfg.max_entries_per_msg,
                self._cfg.max_bytes_per_msg,
            )
        if not entries and not send_if_empty:
            return False
        commit = self._log.committed
        self._send(
            Message(
                MessageType.APPEND,
                to=to,
                frm=self._id,
                term=self._term,
                index=prev,
                log_term=prev_term,
                entries=entries,
                commit=commit,
            )
        )
        pr.commit_sent(commit)
        if entries:
            if pr.state == ProgressState.REPLICATE:
                last = entries[-1].index
                pr.optimistic_update(last)
                pr.inflights.add(last)
            elif pr.state == ProgressState.PROBE:
                pr.probe_sent = True
        return True

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            match_hint = self._match_hint(m)
            if pr.maybe_decr_to(m.index, match_hint):
                if pr.state == ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        if m.index > self._log.last_index:
            self._refuse(m, f"acknowledges index {m.index} beyond our last {self._log.last_index}")
            return
        if not pr.maybe_update(m.index):
            return
        if pr.state == ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state == ProgressState.SNAPSHOT and pr.match >= pr.pending_snapshot:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state == ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        # A new commit index is not sent by itself (see _send_commit_updates).
        self._maybe_commit()
        self._send_all_appends(m.frm, send_if_empty=False)
        if m.frm == self._lead_transferee and pr.match == self._log.last_index:
            self._send_timeout_now(m.frm)

    def _match_hint(self, m: Message) -> int:
        """Fast backtracking (§5.3): the highest index at which our log may
        match the follower's, from its hint. With a conflicting term we skip
        the follower's whole run of that term, or jump to the end of ours."""
        if m.hint_term == 0:
            return m.reject_hint  # the follower's log is shorter: its last index
        last_of_term = self._log.last_index_of_term(m.hint_term)
        if last_of_term is not None:
            return last_of_term
        return m.reject_hint - 1

    def _handle_heartbeat_resp(self, m: Message, pr: Progress) -> None:
        pr.probe_sent = False
        if pr.state == ProgressState.REPLICATE and pr.inflights.full():
            # An ack may have been lost: let one more append through.
            pr.inflights.free_first_one()
        if pr.state == ProgressState.SNAPSHOT:
            self._maybe_resend_snapshot_chunk(m.frm, pr)
        elif pr.match < self._log.last_index:
            self._send_append(m.frm)
        round_id = ReadIndexTracker.decode(m.context)
        if round_id is not None:
            self._read_states.extend(self._reads.ack(m.frm, round_id))

    def _maybe_commit(self) -> bool:
        progress = self._progress
        matches = sorted((progress[v].match for v in self._voters), reverse=True)
        if not self._log.maybe_commit(matches[self._quorum - 1], self._term):
            return False
        if len(progress) > len(self._peers) and not self.membership_pending:
            self._drop_departed()
        if self._id not in self._voters and not self.membership_pending:
            # Thesis 4.2.2: a leader removed by a change steps down once
            # that change is committed (it has told the others by now or
            # will at their next election: it no longer counts anyway).
            _logger.info(f"raft node {self._id}: removed from the group, stepping down (term {self._term})")
            self._send_commit_updates()
            self._become_follower(self._term, None)
            return True
        if self._deferred_reads:
            deferred, self._deferred_reads = self._deferred_reads, []
            for context in deferred:
                self._enqueue_read(context)
        return True

    def _committed_in_current_term(self) -> bool:
        return self._log.term(self._log.committed) == self._term

    def _enqueue_read(self, context: bytes) -> None:
        read = ReadState(self._log.committed, context)
        if self._voters == {self._id}:
            self._read_states.append(read)
        else:
            self._reads.enqueue(read)

    def _bcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            # Re-ask for the newest unconfirmed read round, in case its
            # heartbeats or their answers were lost.
            latest = self._reads.latest_round()
            context = ReadIndexTracker.encode(latest) if latest is not None else b""
        for pid, pr in self._progress.items():
            if pid == self._id:
                continue
            commit = min(pr.match, self._log.committed)
            self._send(
                Message(
                    MessageType.HEARTBEAT,
                    to=pid,
                    frm=self._id,
                    term=self._term,
                    commit=commit,
                    context=context,
                )
            )
            pr.commit_sent(commit)

    # -- leader: transfer ----------------------------------------------------

    def _send_timeout_now(self, to: int) -> None:
        self._send(Message(MessageType.TIMEOUT_NOW, to=to, frm=self._id, term=self._term))

    def _abort_leader_transfer(self) -> None:
        self._lead_transferee = None

    # -- leader: snapshots ---------------------------------------------------

    def _start_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            # Do not stream a snapshot at a node that may well be down;
            # its first heartbeat answer brings us back here.
            return False
        _logger.info(
            f"raft node {self._id}: sending snapshot {self._snapshot.meta.index} to {to} (its next {pr.next})"
        )
        pr.become_snapshot(self._snapshot)
        self._send_snapshot_chunk(to, pr)
        return True

    def _send_snapshot_chunk(self, to: int, pr: Progress) -> None:
        snap = pr.snapshot
        assert snap is not None
        offset = min(pr.snapshot_offset, len(snap.data))
        chunk = snap.data[offset : offset + self._cfg.snapshot_chunk_bytes]
        pr.snapshot_stalled = False
        self._send(
            Message(
                MessageType.SNAPSHOT,
                to=to,
                frm=self._id,
                term=self._term,
                snapshot_meta=snap.meta,
                offset=offset,
                data=chunk,
                done=offset + len(chunk) >= len(snap.data),
            )
        )

    def _maybe_resend_snapshot_chunk(self, to: int, pr: Progress) -> None:
        # A chunk (or its ack) may be lost: resend after two heartbeat
        # answers in a row saw no progress, not on every one (which would
        # keep two chunks in flight).
        if pr.snapshot_stalled:
            self._send_snapshot_chunk(to, pr)
        else:
            pr.snapshot_stalled = True

    def _handle_snapshot_resp(self, m: Message, pr: Progress) -> None:
        current = pr.state == ProgressState.SNAPSHOT and pr.snapshot is not None
        if m.done:
            if m.reject or m.index > self._log.last_index:
                return
            pr.maybe_update(m.index)
            if pr.state == ProgressState.SNAPSHOT:
                pr.become_probe()
                if pr.match >= pr.next - 1:
                    pr.become_replicate()
            self._send_all_appends(m.frm, send_if_empty=True)
            return
        if not current or pr.snapshot is None or m.snapshot_meta != pr.snapshot.meta:
            return  # about a snapshot we are no longer sending
        total = len(pr.snapshot.data)
        if m.reject:
            pr.snapshot_offset = min(m.index, total)
            self._send_snapshot_chunk(m.frm, pr)
        elif pr.snapshot_offset < m.index <= total:
            pr.snapshot_offset = m.index
            self._send_snapshot_chunk(m.frm, pr)

    # -- follower: appends, heartbeats, snapshots -----------------------------

    def _handle_from_leader(self, m: Message) -> None:
        if m.type == MessageType.APPEND:
            self._handle_append(m)
        elif m.type == MessageType.HEARTBEAT:
            self._log.commit_to(m.commit)
            self._send(
                Message(
                    MessageType.HEARTBEAT_RESP, to=m.frm, frm=self._id, term=self._term, context=m.context
                )
            )
        else:
            self._handle_snapshot_chunk(m)

    def _handle_append(self, m: Message) -> None:
        if m.index < self._log.committed:
            # Everything through our commit index matches any leader's log.
            self._send(
                Message(
                    MessageType.APPEND_RESP,
                    to=m.frm,
                    frm=self._id,
                    term=self._term,
                    index=self._log.committed,
                )
            )
            return
        entries = m.entries
        conf_entries = [e for e in entries if e.kind] if entries else []
        try:
            new_confs = [(e.index, e.term, Membership.decode(e.data)) for e in conf_entries]
        except ValueError as e:
            self._refuse(m, f"bad membership entry: {e}")
            return
        try:
            last_new = self._log.maybe_append(m.index, m.log_term, m.commit, entries)
        except LogError as e:
            self._refuse(m, str(e))
            return
        if last_new is not None and (new_confs or (self._conf_log and self._conf_log[-1][0] > m.index)):
            self._track_membership(new_confs)
        if last_new is not None:
            self._send(
                Message(MessageType.APPEND_RESP, to=m.frm, frm=self._id, term=self._term, index=last_new)
            )
            return
        if m.index > self._log.last_index:
            hint, hint_term = self._log.last_index, 0
        else:
            hint_term = self._log.term(m.index) or 0
            hint = self._log.first_index_of_term(hint_term, m.index) if hint_term else m.index
        self._send(
            Message(
                MessageType.APPEND_RESP,
                to=m.frm,
                frm=self._id,
                term=self._term,
                index=m.index,
                reject=True,
                reject_hint=hint,
                hint_term=hint_term,
            )
        )

    def _handle_snapshot_chunk(self, m: Message) -> None:
        meta = m.snapshot_meta
        assert meta is not None  # checked in _check_message

        def reply(index: int, *, done: bool = False, reject: bool = False) -> None:
            self._send(
                Message(
                    MessageType.SNAPSHOT_RESP,
                    to=m.frm,
                    frm=self._id,
                    term=self._term,
                    index=index,
                    snapshot_meta=meta,
                    done=done,
                    reject=reject,
                )
            )

        if meta.index <= self._log.committed:
            # We already have (at least) this state.
            self._incoming_snapshot = None
            reply(self._log.committed, done=True)
            return
        key = (m.frm, m.term, meta)
        inc = self._incoming_snapshot
        if inc is None or inc.key != key:
            if m.offset != 0:
                reply(0, reject=True)
                return
            inc = self._incoming_snapshot = _IncomingSnapshot(key, bytearray())
        have = len(inc.data)
        if m.offset > have:
            reply(have, reject=True)
            return
        end = m.offset + len(m.data)
        if end > self._cfg.max_snapshot_bytes:
            _logger.warning(
                f"raft node {self._id}: refused a snapshot chunk from {m.frm}: the snapshot would pass "
                f"max_snapshot_bytes ({self._cfg.max_snapshot_bytes})"
            )
            self._incoming_snapshot = None
            # done + reject: the leader stops streaming and retries only on
            # its stall timer, so a snapshot we cannot take costs a few
            # chunks per retry, not a busy loop.
            reply(0, done=True, reject=True)
            return
        if end > have:
            inc.data += m.data[have - m.offset :]
        if m.done and end == len(inc.data):
            self._incoming_snapshot = None
            self._install_snapshot(Snapshot(meta, bytes(inc.data)))
            reply(self._log.committed, done=True)
        else:
            reply(len(inc.data))

    def _install_snapshot(self, snap: Snapshot) -> None:
        meta = snap.meta
        if self._log.match_term(meta.index, meta.term):
            # Our log already has the snapshot's last entry, hence all before
            # it: just learn that they are committed.
            self._log.commit_to(meta.index)
            return
        _logger.info(f"raft node {self._id}: installing snapshot at index {meta.index} term {meta.term}")
        self._log.restore(meta.index, meta.term)
        self._snapshot = snap
        self._unpersisted_snapshot = snap
        self._conf_log = []
        self._use_membership(meta.membership)

    # -- membership ------------------------------------------------------------

    def _track_membership(self, appended: list[tuple[int, int, Membership]]) -> None:
        """After an append: forget membership entries the log no longer
        holds (truncated by a conflict), take the appended ones, and put the
        newest in force."""
        log = self._log
        kept = {c[0]: c for c in self._conf_log if log.match_term(c[0], c[1])}
        for c in appended:
            if log.match_term(c[0], c[1]):
                kept[c[0]] = c
        self._conf_log = [kept[i] for i in sorted(kept)]
        newest = self._conf_log[-1][2] if self._conf_log else self._snapshot.meta.membership
        if newest != self._membership:
            self._use_membership(newest)

    def _may_campaign(self) -> bool:
        """Voters campaign; learners do not. Nor does a removed server, once
        it knows its removal committed; before that it may still be needed
        (thesis 4.2.2, figure 4.6: a leader that removed itself stepped
        down before the change committed, and the one voter left needs this
        server's log). It then does not count its own vote (``_poll``)."""
        if self._id in self._voters:
            return True
        if not self.membership_pending:
            return False
        return self._id in self.membership_at(self._conf_log[-1][0] - 1).voters

    def _drop_departed(self) -> None:
        """Leader: stop replicating to servers no longer members. Not before
        their removal commits: until then they get the log too, so a removed
        server learns of its removal (and stops campaigning) in most cases."""
        for pid in [p for p in self._progress if p != self._id and p not in self._peers]:
            # A last append tells it the commit index: knowing its removal
            # committed, it stops campaigning (``_may_campaign``).
            self._send_append(pid)
            del self._progress[pid]

    def _use_membership(self, m: Membership) -> None:
        """Put ``m`` in force: who is replicated to, who votes, how many
        make a quorum, and, on a leader, whose progress is tracked."""
        before = self._membership
        self._membership = m
        self._peers = m.members
        self._voters = frozenset(m.voters)
        self._quorum = len(m.voters) // 2 + 1
        self._has_followers = any(p != self._id for p in self._peers)
        self._reads.set_voters(self._voters, self._quorum)
        if self._role == Role.LEADER:
            next_index = self._log.last_index + 1
            for pid in self._peers:
                if pid not in self._progress:
                    pr = self._progress[pid] = Progress(next_index, self._cfg.max_inflight_msgs)
                    pr.recent_active = True  # give it an election timeout to answer
            if not self.membership_pending:
                self._drop_departed()
            if self._lead_transferee is not None and self._lead_transferee not in self._voters:
                self._abort_leader_transfer()
        if m != before:
            _logger.info(f"raft node {self._id}: membership now {m.describe()} (was {before.describe()})")

    # -- plumbing --------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._log.committed)
