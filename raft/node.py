"""The Twisted driver of a Raft node.

``RaftNode`` gives an I/O-free ``raft.core.RaftCore`` what it lacks: a clock
(a ``LoopingCall`` on the injected ``IReactorTime``), stable storage
(``IStorage``), a transport (``ITransport``) and a state machine
(``IStateMachine``) to apply committed commands to.  It turns the core's
``Ready`` batches into I/O in the order Raft's safety needs (persist, then
send, then apply) and turns proposals and linearizable reads into Deferreds.

Group commit: a proposal or a peer message only marks the node dirty and
schedules one ``callLater(0, ...)``; everything that arrived in the same
reactor turn is handled in ONE ``Ready``, hence one ``storage.sync()`` and
one AppendEntries batch per follower. A caller that already batches a turn
by itself (the metadata replica) may run that pass at once
(``process_now``) instead of a reactor pass later.

Within a Ready, messages leave before the apply: persist, send (the
transport's ``flush`` hands them to the sockets), then apply the committed
entries and answer their callers, all in the same pass. A follower's
acknowledgement (on the leader's critical path) so never waits behind
applying the batch it commits, and a leader's next AppendEntries goes out
before it applies and answers the batch a follower just acknowledged. (This
used to take two reactor turns, to let the reactor write the sockets before
the apply; since the transports write at once when nothing is queued, the
second turn only cost a pass: ``docs/performance.md``.) A leader goes one
step further (Ongaro's thesis, 10.2.1): its appends leave before its own
write of the same entries, which it then does while the followers write
theirs, so one fsync instead of two lies on the path of a write.

Timeouts of proposals and reads share one reactor timer (a heap of
deadlines): a timer per proposal, created and cancelled on every write, is work per
write a busy leader need not do.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from raft.core import RaftCore
from raft.errors import NodeCrashed, NotLeaderError, ProposalDropped, RaftTimeout, ReadAborted
from raft.interfaces import ISnapshotCopy, ISnapshotFile, IStateMachine, IStorage, ITransport
from raft.stats import SIZE_BUCKETS, Histogram, StageTracer
from raft.types import (
    Entry,
    Membership,
    Message,
    MessageType,
    RaftConfig,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
)

#: ``callback(role, leader)`` run after every change of this node's role or of
#: the leader it believes in (the new values; ``leader`` may be None).
RoleObserver = Callable[[Role, "int | None"], None]
#: ``callback(entry, result)`` run after each committed entry is applied
#: (no-ops included, with result None): for metrics and test harnesses.
ApplyObserver = Callable[[Entry, Any], None]
#: ``callback(membership)`` run when the membership in force on this node
#: changes (a change appended to its log, truncated away, or installed
#: with a snapshot), and once at start.
MembershipObserver = Callable[[Membership], None]


_PROPOSAL = "proposal"
_READ = "read"


class _Waiter:
    """One caller waiting on the node: a Deferred, and what its timeout says.

    Settling is idempotent so a timeout racing an apply (or a stop) can never
    fire a Deferred twice. The timeout itself is the node's (one timer for
    all waiters, see ``RaftNode._watch_deadline``).
    """

    __slots__ = ("_forget", "deferred", "index", "term", "timeout", "what")

    def __init__(
        self, term: int, index: int, forget: Callable[[_Waiter], None], what: str, timeout: float | None
    ) -> None:
        self.term = term
        self.index = index
        self.what = what
        self.timeout = timeout
        self._forget = forget
        # Cancelling only abandons the wait: a proposal already in the log
        # may still be applied, which is the caller's to live with.
        self.deferred: defer.Deferred[Any] = defer.Deferred(self._cancelled)

    def _cancelled(self, _deferred: defer.Deferred[Any]) -> None:
        self._forget(self)

    @property
    def settled(self) -> bool:
        return self.deferred.called

    def expire(self) -> None:
        self._forget(self)
        self.fail(RaftTimeout(f"{self.what} did not complete within {self.timeout} s"))

    def succeed(self, result: Any) -> None:
        if not self.deferred.called:
            self.deferred.callback(result)

    def fail(self, error: BaseException | Failure) -> None:
        if not self.deferred.called:
            self.deferred.errback(error)


class RaftNode(service.Service):
    """One member of a Raft group, driven by the reactor it is given.

    A simulated crash (``crash()``) freezes the node in place, the way the
    SurfStore tests expect: it keeps its memory, ignores ticks, refuses peers'
    messages and new work; ``restore()`` resumes exactly where it stopped.  A
    real restart is ``stopService()`` and a new ``RaftNode`` over the same
    storage (the storage is not closed by ``stopService``: its owner closes it).
    """

    log = Logger()

    def __init__(
        self,
        config: RaftConfig,
        storage: IStorage,
        transport: ITransport,
        state_machine: IStateMachine,
        reactor: IReactorTime,
        *,
        tick_interval: float = 0.05,
        snapshot_entries: int = 10000,
        rng: random.Random | None = None,
        offload: Callable[[Callable[[], Any]], defer.Deferred[Any]] | None = None,
    ) -> None:
        if tick_interval <= 0:
            raise ValueError("tick_interval must be positive")
        if snapshot_entries < 1:
            raise ValueError("snapshot_entries must be at least 1")
        self.config = config
        self.storage = storage
        self.transport = transport
        self.state_machine = state_machine
        self.reactor = reactor
        self.tick_interval = tick_interval
        self.snapshot_entries = snapshot_entries
        self._rng = rng
        #: Runs a function away from the event loop and fires with its
        #: result: a thread of the reactor's pool, or, on a reactor without
        #: threads (simulated time), the next turn of its clock, so the
        #: simulations go through the same interleavings in one thread.
        self._offload = offload or _default_offload(reactor)
        #: The periodic snapshot being encoded and written away from the
        #: event loop, if any (at most one at a time).
        self._snapshot_job: defer.Deferred[Any] | None = None
        #: How much later than every ``snapshot_entries`` this node takes its
        #: first snapshot: node k of n, k/n of the period (0 on the first).
        peers = sorted(config.peers)
        self._snapshot_stagger = (
            peers.index(config.id) * snapshot_entries // len(peers) if config.id in peers else 0
        )
        self._core: RaftCore | None = None
        self._ticker: task.LoopingCall | None = None
        self._process_call: IDelayedCall | None = None
        #: A Ready is being handled (``process_now`` must not nest in it).
        self._in_ready = False
        #: (term, vote) as last written: what a message may rely on.
        self._durable_vote: tuple[int, int | None] = (0, None)
        self._crashed = False
        #: The exception that made the node fail-stop (storage error, bug), if any.
        self.fatal_error: Failure | None = None
        self._applied = 0
        self._snapshot_index = 0
        self._proposals: dict[int, _Waiter] = {}
        self._reads_unconfirmed: dict[bytes, _Waiter] = {}
        self._reads_confirmed: list[_Waiter] = []
        self._read_seq = 0
        # The term in which we last found every waiter current while leading:
        # until the role or term changes there is nothing stale to drop.
        self._waiters_checked_term = -1
        # (deadline, sequence, waiter) of waiters with a timeout; settled
        # ones are dropped lazily. One timer, armed for the earliest.
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._deadline_seq = 0
        # Compact the heap once it grows past this (twice what was live at
        # the last compaction, plus slack).
        self._deadlines_limit = 256
        self._deadline_call: IDelayedCall | None = None
        self._deadline_at = math.inf
        #: (waiter, succeeded, result or error) to settle once the Ready is done.
        self._settle: list[tuple[_Waiter, bool, Any]] = []
        self._role = Role.FOLLOWER
        self._leader: int | None = None
        #: Callbacks ``(role, leader)`` run when the role or known leader changes.
        self.on_role_change: list[RoleObserver] = []
        #: The longest silence (seconds) seen between two messages of one
        #: leader in one term, on this node as a follower.
        self.max_leader_gap = 0.0
        #: For metrics (``surfshard.observe.metrics``): how long each write of a
        #: Ready to storage took (append + sync), elections this node
        #: started, leader changes it saw, proposals made on it, and each
        #: periodic snapshot's duration and size.
        self.stats_persist_seconds = Histogram()
        self.stats_elections = 0
        self.stats_leader_changes = 0
        self.stats_proposals = 0
        self.stats_snapshot_seconds = Histogram()
        self.stats_snapshot_bytes = Histogram(SIZE_BUCKETS)
        #: Stage timestamps of sampled entries (None: not tracing; see
        #: ``benchmarks/breakdown.py``). ``arrived`` given to ``propose`` is
        #: when the first request of the entry reached the node.
        self.tracer: StageTracer | None = None
        self._last_leader_contact: tuple[int, int, float] | None = None
        #: Callbacks ``(entry, result)`` run after each entry is applied.
        self.on_apply: list[ApplyObserver] = []
        #: Callbacks ``(membership)`` (see ``MembershipObserver``).
        self.on_membership_change: list[MembershipObserver] = []
        self._membership_seen: Membership | None = None

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        hard_state, snapshot, entries = self.storage.load()
        if hard_state is not None:
            self._durable_vote = (hard_state.term, hard_state.vote)
        if snapshot is not None:
            self.state_machine.restore(snapshot.data)
            self._applied = self._snapshot_index = snapshot.meta.index
        self._core = RaftCore(
            self.config, hard_state=hard_state, snapshot=snapshot, entries=entries, rng=self._rng
        )
        self._role, self._leader = self._core.role, self._core.leader
        self._notify_membership_change()
        self.transport.set_handler(self._on_message)
        super().startService()  # type: ignore[no-untyped-call]
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.tick_interval, now=False)
        # Entries committed before the restart but not in the snapshot are
        # handed out by the first Ready: apply them without waiting for a tick.
        self._schedule()

    def stopService(self) -> defer.Deferred[None] | None:
        """A clean stop: waits for a snapshot being written."""
        return self._stop(flush=True)

    def power_off(self) -> None:
        """Stop as a power loss or SIGKILL would: nothing more reaches the
        storage. Called from within the transport's ``send`` of a leader's
        appends, it hits the crash window of thesis 10.2.1 (the entries left,
        the leader's own write of them never happens), which tests must be
        able to hit. Pair it with the storage's own power loss
        (``simulate_crash``)."""
        self._stop(flush=False)

    def _stop(self, *, flush: bool) -> defer.Deferred[None] | None:
        job, self._snapshot_job = self._snapshot_job, None
        if job is not None and not flush:
            job.cancel()  # simulated time: the work never runs (a thread would run on)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._process_call is not None and self._process_call.active():
            self._process_call.cancel()
        self._process_call = None
        self._stop_deadline_timer()
        result: defer.Deferred[None] | None = super().stopService()  # type: ignore[no-untyped-call]
        # After ``running`` is cleared: a callback that retries at once is refused.
        self._fail_all(ProposalDropped("node stopped"), ReadAborted("node stopped"))
        if job is not None and flush and not job.called:
            # A snapshot being written: its owner closes the storage once we
            # have stopped, so stop only when the write is over (its result
            # is dropped: a stopped node compacts nothing).
            waiting: defer.Deferred[None] = defer.Deferred()
            job.addBoth(lambda _: waiting.callback(None))
            return waiting
        return result

    # -- simulated crash -----------------------------------------------------

    def crash(self) -> None:
        """Freeze: ignore ticks and peers, refuse new work, keep everything."""
        self._crashed = True
        self.log.info("raft node {id}: crashed (simulated)", id=self.config.id)

    def restore(self) -> None:
        """Resume a crashed node from the state it froze in."""
        if self.fatal_error is not None:
            raise NodeCrashed("node stopped after a fatal error; restart it instead")
        self._crashed = False
        self.log.info("raft node {id}: restored", id=self.config.id)
        self._schedule()

    @property
    def crashed(self) -> bool:
        return self._crashed

    # -- public API ---------------------------------------------------------

    @property
    def core(self) -> RaftCore:
        """The core, for status and tests; never mutate it from outside."""
        if self._core is None:
            raise RuntimeError("RaftNode not started")
        return self._core

    @property
    def node_id(self) -> int:
        return self.config.id

    @property
    def is_leader(self) -> bool:
        """Whether this node's core believes it leads (a crashed leader still
        reports what it believed when it froze, as SurfStore's isLeader does)."""
        return self._core is not None and self._core.role == Role.LEADER

    @property
    def leader_id(self) -> int | None:
        return None if self._core is None else self._core.leader

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for a snapshot being received in chunks (part of the
        node's memory budget)."""
        return 0 if self._core is None else self._core.incoming_snapshot_bytes

    def propose(
        self, command: bytes, timeout: float | None = None, *, arrived: float | None = None
    ) -> defer.Deferred[Any]:
        """Replicate ``command``; fires with ``IStateMachine.apply``'s result.

        Fails with NotLeaderError (at once), NodeCrashed, ProposalDropped
        (leadership lost: outcome unknown), RaftTimeout (outcome unknown), or
        the exception instance ``apply`` returned.
        """
        if not isinstance(command, bytes):
            return defer.fail(TypeError("a proposal must be bytes"))
        core = self._core
        if core is None or self._crashed or not self.running or self.fatal_error is not None:
            return defer.fail(self._refusal() or NodeCrashed("node is not running"))
        self.stats_proposals += 1
        try:
            index, term = core.propose(command)
        except NotLeaderError as e:
            return defer.fail(e)
        if self.tracer is not None:
            self.tracer.mark(index, "proposed")
            if arrived is not None:
                self.tracer.mark(index, "arrived", arrived)
        proposals = self._proposals
        if index in proposals:  # cannot normally happen: the old term's waiters are failed on step-down
            proposals.pop(index).fail(ProposalDropped(f"index {index} was reused by term {term}"))
        waiter = _Waiter(term, index, self._forget_proposal, _PROPOSAL, timeout)
        proposals[index] = waiter
        if timeout is not None:
            self._watch_deadline(waiter, timeout)
        if self._process_call is None:
            self._schedule()
        return waiter.deferred

    @property
    def membership(self) -> Membership:
        """The membership in force on this node (the newest in its log)."""
        return self.core.membership

    def change_membership(self, new: Membership, timeout: float | None = None) -> defer.Deferred[Any]:
        """Replicate a change to membership ``new`` (one voter added or
        removed at most; see ``raft.core``); fires with ``new`` once the
        change is committed and applied here.

        Fails like ``propose``, and with ``ValueError`` (at once) when the
        change is not allowed now."""
        refused = self._refusal()
        if refused is not None:
            return defer.fail(refused)
        core = self.core
        try:
            index, term = core.propose_membership(new)
        except (NotLeaderError, ValueError, TypeError) as e:
            return defer.fail(e)
        self.log.info(
            "raft node {id}: proposed membership {new} at index {index}",
            id=self.config.id,
            new=new.describe(),
            index=index,
        )
        waiter = _Waiter(term, index, self._forget_proposal, _PROPOSAL, timeout)
        self._proposals[index] = waiter
        if timeout is not None:
            self._watch_deadline(waiter, timeout)
        self._schedule()
        return waiter.deferred

    def read(self, timeout: float | None = None) -> defer.Deferred[None]:
        """Fires (with None) once a linearizable read may run against the
        state machine (ReadIndex: leadership confirmed by a majority after the
        call and the state machine has applied the commit index seen then).
        Fails with NotLeaderError, NodeCrashed, ReadAborted or RaftTimeout."""
        refused = self._refusal()
        if refused is not None:
            return defer.fail(refused)
        core = self.core
        self._read_seq += 1
        context = self._read_seq.to_bytes(8, "big")
        try:
            core.read_index(context)
        except NotLeaderError as e:
            return defer.fail(e)
        waiter = _Waiter(core.term, 0, self._forget_read, _READ, timeout)
        self._reads_unconfirmed[context] = waiter
        if timeout is not None:
            self._watch_deadline(waiter, timeout)
        self._schedule()
        return waiter.deferred

    def transfer_leader(self, to: int) -> None:
        """Hand leadership to ``to`` (thesis 3.10); proposals are refused
        meanwhile.  Raises NotLeaderError if this node is not the leader."""
        refused = self._refusal()
        if refused is not None:
            raise refused
        if to not in self.core.voters:
            raise ValueError(f"{to} is not a voter of this group")
        if not self.is_leader:
            raise NotLeaderError(self.leader_id)
        self.core.transfer_leader(to)
        self._schedule()

    def send_heartbeat(self) -> None:
        """Leader: run a heartbeat round now (SurfStore's SendHeartbeat)."""
        refused = self._refusal()
        if refused is not None:
            raise refused
        if not self.is_leader:
            raise NotLeaderError(self.leader_id)
        self.core.broadcast_heartbeat()
        self._schedule()

    def campaign(self) -> None:
        """Start an election now (tests and operators)."""
        refused = self._refusal()
        if refused is not None:
            raise refused
        self.core.campaign()
        self._schedule()

    def peer_unreachable(self, peer: int) -> None:
        """The connection to Raft node ``peer`` was lost (the transport's
        owner calls this); see ``RaftCore.leader_unreachable``."""
        if self._refusal() is None:
            self.core.leader_unreachable(peer)

    def take_snapshot(self) -> Snapshot | None:
        """Snapshot the state machine as of the last applied entry and compact
        the log now (None if nothing was applied since the last snapshot)."""
        if self._core is None or self._applied <= self._snapshot_index:
            return None
        snapshot = self._core.compact(self._applied, self.state_machine.snapshot())
        # Durable when it returns (IStorage); and were it lost, the entries
        # it replaces would still be on disk: no sync() here.
        self.storage.save_snapshot(snapshot)
        self._snapshot_index = snapshot.meta.index
        return snapshot

    def _snapshot_in_background(self) -> None:
        """Take a snapshot without stalling the event loop: copy the state
        here, encode it and write it durably through ``offload`` (a thread),
        then compact the log back here once it is durable. Entries go on
        being applied meanwhile; the snapshot is of the index copied."""
        core = self.core
        index = self._applied
        term = core.log_term(index)
        if term is None:  # pragma: no cover - applied entries are in the log or the snapshot
            return
        meta = SnapshotMeta.of(index, term, core.membership_at(index))
        encode = ISnapshotCopy(self.state_machine).snapshot_copy()
        storage = self.storage
        writes = ISnapshotFile.providedBy(storage)

        def work() -> Snapshot:
            snapshot = Snapshot(meta, bytes(encode()))
            if writes:
                ISnapshotFile(storage).write_snapshot(snapshot)
            return snapshot

        started = time.perf_counter()
        job = self._snapshot_job = self._offload(work)
        job.addCallbacks(self._snapshot_written, self._snapshot_failed, callbackArgs=(writes, started))

    def _snapshot_written(self, snapshot: Snapshot, written: bool, started: float) -> None:
        self._snapshot_job = None
        seconds = time.perf_counter() - started
        self.stats_snapshot_seconds.observe(seconds)
        self.stats_snapshot_bytes.observe(len(snapshot.data))
        self.log.info(
            "raft node {id}: snapshot at index {index}, {size} bytes, {ms:.0f} ms off the event loop",
            id=self.config.id,
            index=snapshot.meta.index,
            size=len(snapshot.data),
            ms=seconds * 1000,
        )
        if not self.running or self._core is None or self.fatal_error is not None:
            return
        if snapshot.meta.index <= self._snapshot_index:
            return  # a snapshot from the leader got there first
        try:
            self._core.compact(snapshot.meta.index, snapshot.data)
            if written:
                ISnapshotFile(self.storage).install_written_snapshot(snapshot)
            else:
                self.storage.save_snapshot(snapshot)
        except Exception:
            self._fail_stop(Failure())
            return
        self._snapshot_index = snapshot.meta.index

    def _snapshot_failed(self, failure: Failure) -> None:
        self._snapshot_job = None
        if failure.check(defer.CancelledError):
            return
        if self.running and self.fatal_error is None:
            self._fail_stop(failure)

    def status(self) -> dict[str, Any]:
        if self._core is None:
            return {"id": self.config.id, "running": False, "crashed": self._crashed}
        status = dict(self._core.status())
        status["crashed"] = self._crashed
        status["running"] = bool(self.running)
        status["log_size"] = self._core.last_index - self._core.snapshot_meta.index
        status["max_leader_gap_ms"] = round(self.max_leader_gap * 1000, 1)
        if self.tracer is not None:
            status["trace"] = {str(i): dict(r) for i, r in self.tracer.records.items()}
        return status

    # -- reactor-facing callbacks ------------------------------------------------

    def _refusal(self) -> Exception | None:
        if self.fatal_error is not None:
            return NodeCrashed(f"node stopped after a fatal error: {self.fatal_error.getErrorMessage()}")
        if self._crashed:
            return NodeCrashed("node is crashed")
        if not self.running or self._core is None:
            return NodeCrashed("node is not running")
        return None

    def _on_message(self, message: Message) -> None:
        """Transport handler.  Raises NodeCrashed when crashed or stopped
        (the message is not looked at); any other exception is a bug that the
        transport logs."""
        core = self._core
        if self._crashed or not self.running or core is None or self.fatal_error is not None:
            raise NodeCrashed("node is crashed")
        kind = message.type
        if kind is MessageType.APPEND or kind is MessageType.HEARTBEAT or kind is MessageType.SNAPSHOT:
            self._note_leader_contact(message)
        tracer = self.tracer
        if tracer is not None:
            if kind is MessageType.APPEND and message.entries:
                tracer.mark_range(message.entries[0].index, message.entries[-1].index, "received")
            elif kind is MessageType.APPEND_RESP and not message.reject:
                tracer.mark_range(message.index - 1023, message.index, "ack_received")
        core.step(message)
        if self._process_call is None and core.has_ready():
            self._schedule()

    def _note_leader_contact(self, message: Message) -> None:
        """Track the longest silence between two messages of one leader (same
        term): how close a busy leader came to losing its followers. A
        status figure for operators and for tests of starvation."""
        now = self.reactor.seconds()
        last = self._last_leader_contact
        if last is not None and last[0] == message.term and last[1] == message.frm:
            gap = now - last[2]
            if gap > self.max_leader_gap:
                self.max_leader_gap = gap
        self._last_leader_contact = (message.term, message.frm, now)

    def _tick(self) -> None:
        if self._crashed or self._core is None or self.fatal_error is not None:
            return
        try:
            self._core.tick()
        except Exception:
            self._fail_stop(Failure())
            return
        if self._core.has_ready():
            self._schedule()

    def _schedule(self) -> None:
        if self._process_call is None and self.running and not self._crashed and self.fatal_error is None:
            self._process_call = self.reactor.callLater(0, self._process)

    def process_now(self) -> None:
        """Handle now the Ready that proposals or messages scheduled for the
        end of this reactor turn.

        For a caller that batches by itself and is already at the end of its
        turn (the metadata replica proposes what one turn collected from a
        ``callLater(0)``): its proposal's appends then leave in the same
        pass instead of one reactor pass later. Anything proposed after this
        call is scheduled as usual; called from a callback of the node's own
        processing (a proposal's answer), it leaves the pass scheduled."""
        call = self._process_call
        if call is not None and call.active() and not self._in_ready:
            call.cancel()
            self._process()

    def _process(self) -> None:
        self._process_call = None
        core = self._core
        if self._crashed or not self.running or core is None or self.fatal_error is not None:
            return
        self._in_ready = True
        try:
            if core.has_ready():
                self._handle_ready(core.ready(), self._start_ready)
        except Exception:
            self._fail_stop(Failure())
            return
        finally:
            self._in_ready = False
        self._notify_role_change()
        if core.membership is not self._membership_seen:
            self._notify_membership_change()
        if core.has_ready():
            # Work produced by advance() (e.g. a commit the leader's own
            # persisted entries completed) goes in the next turn, batched
            # with whatever else arrives meanwhile.
            self._schedule()

    # -- the Ready loop -----------------------------------------------------------

    def _handle_ready(self, rd: Ready, step: Callable[[Ready], None]) -> None:
        # Callers' Deferreds fire only after core.advance(): their callbacks
        # may propose or read again, which must find the core between Readys.
        try:
            step(rd)
        finally:
            settle, self._settle = self._settle, []
            for waiter, ok, value in settle:
                if ok:
                    waiter.succeed(value)
                else:
                    waiter.fail(value)

    def _start_ready(self, rd: Ready) -> None:
        if (
            rd.messages
            and rd.entries
            and rd.snapshot is None
            and self.core.role == Role.LEADER
            and (rd.hard_state is None or (rd.hard_state.term, rd.hard_state.vote) == self._durable_vote)
        ):
            # A leader's appends may leave before its own write (thesis
            # 10.2.1): it counts itself towards a commit only once advance()
            # sees its entries persisted, and nothing it sends depends on a
            # term or vote not yet on disk. Its write (and sync) then runs
            # while the followers write theirs.
            self._send(rd.messages)
            if not self.running:
                return  # powered off as the appends left: nothing more is written
            self._persist(rd)
            self._finish_ready(rd)
            return
        # 1. Persist before anything that depends on it leaves the node.
        self._persist(rd)
        # 2. Send.
        if rd.messages:
            self._send(rd.messages)
        self._finish_ready(rd)

    def _persist(self, rd: Ready) -> None:
        started = time.perf_counter()
        self._persist_unmeasured(rd)
        self.stats_persist_seconds.observe(time.perf_counter() - started)
        if self.tracer is not None and rd.entries:
            self.tracer.mark_range(rd.entries[0].index, rd.entries[-1].index, "persisted")

    def _persist_unmeasured(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.storage.save_snapshot(rd.snapshot)
        if rd.entries:
            self.storage.append(rd.entries)
        if rd.hard_state is not None:
            self.storage.set_hard_state(rd.hard_state)
        if rd.must_sync:
            self.storage.sync()
        if rd.hard_state is not None:
            self._durable_vote = (rd.hard_state.term, rd.hard_state.vote)

    def _send(self, messages: list[Message]) -> None:
        send = self.transport.send
        for message in messages:
            send(message)
        self.transport.flush()
        tracer = self.tracer
        if tracer is not None:
            for m in messages:
                if m.type is MessageType.APPEND and m.entries:
                    tracer.mark_range(m.entries[0].index, m.entries[-1].index, "sent")
                elif m.type is MessageType.APPEND_RESP and not m.reject:
                    tracer.mark_range(m.index - 1023, m.index, "acked")

    def _finish_ready(self, rd: Ready) -> None:
        core = self.core
        # 3. Install a snapshot received from the leader.
        if rd.snapshot is not None and rd.snapshot.meta.index > self._applied:
            self.state_machine.restore(rd.snapshot.data)
            self._applied = self._snapshot_index = rd.snapshot.meta.index
            for index in [i for i in self._proposals if i <= self._applied]:
                self._settle.append(
                    (
                        self._proposals.pop(index),
                        False,
                        ProposalDropped(f"entry {index} was replaced by an installed snapshot"),
                    )
                )
        # 4. Apply committed entries, settling the proposals they answer.
        if rd.committed_entries:
            tracer = self.tracer
            if tracer is not None:
                tracer.mark_range(rd.committed_entries[0].index, rd.committed_entries[-1].index, "committed")
            self._apply(rd.committed_entries)
            if tracer is not None:
                tracer.mark_range(rd.committed_entries[0].index, rd.committed_entries[-1].index, "applied")
        # Proposals left over from a term we no longer lead cannot be
        # answered by us any more (they may still commit: outcome unknown).
        self._drop_stale_waiters(core)
        # 5. Reads whose heartbeat round a majority acknowledged.
        for read_state in rd.read_states:
            waiter = self._reads_unconfirmed.pop(read_state.context, None)
            if waiter is not None and not waiter.settled:
                waiter.index = read_state.index
                self._reads_confirmed.append(waiter)
        self._serve_reads()
        core.advance(rd)
        # 6. Compact once enough has been applied since the last snapshot
        #    (the first time after a start, later by a share of the period
        #    that differs by node: replicas that snapshot at the same index
        #    would all spend their CPU on it at once).
        due = self.snapshot_entries + self._snapshot_stagger
        if self._applied - self._snapshot_index >= due and self._snapshot_job is None:
            self._snapshot_stagger = 0
            if ISnapshotCopy.providedBy(self.state_machine):
                self._snapshot_in_background()
            else:
                self.take_snapshot()

    def _apply(self, entries: list[Entry]) -> None:
        # One loop over the batch with everything it touches in locals: this
        # runs once per committed entry on every node.
        applied = self._applied
        apply = self.state_machine.apply
        observers = self.on_apply
        proposals = self._proposals
        settle = self._settle
        for entry in entries:
            index = entry.index
            if index <= applied:
                continue  # already covered by an installed snapshot
            if index != applied + 1:
                raise RuntimeError(f"committed entry {index} does not follow applied index {applied}")
            result: Any = None
            if entry.kind:
                # A membership change: Raft's own, already in force since it
                # was appended; the state machine never sees it.
                result = Membership.decode(entry.data)
            elif entry.data is not None:
                try:
                    result = apply(entry.data)
                except Exception as e:
                    # A state machine must return errors, not raise them; failing
                    # the proposer keeps the node up (every replica does the same).
                    self.log.failure("state machine raised applying entry {index}", index=index)
                    result = e
            applied = self._applied = index
            if observers:
                for observer in list(observers):
                    try:
                        observer(entry, result)
                    except Exception:
                        self.log.failure("apply observer {observer!r} failed", observer=observer)
            waiter = proposals.pop(index, None) if proposals else None
            if waiter is None:
                continue
            if waiter.term != entry.term:
                error = ProposalDropped(
                    f"entry {index} of term {waiter.term} was replaced by term {entry.term}"
                )
                settle.append((waiter, False, error))
            else:
                settle.append((waiter, not isinstance(result, Exception), result))

    def _drop_stale_waiters(self, core: RaftCore) -> None:
        leading = core.role == Role.LEADER
        if leading and core.term == self._waiters_checked_term:
            return  # every waiter was made by this leadership
        self._waiters_checked_term = core.term if leading else -1
        for index, waiter in list(self._proposals.items()):
            if not leading or waiter.term != core.term:
                del self._proposals[index]
                error = ProposalDropped(
                    f"leadership of term {waiter.term} lost before entry {index} committed"
                )
                self._settle.append((waiter, False, error))
        for context, waiter in list(self._reads_unconfirmed.items()):
            if not leading or waiter.term != core.term:
                del self._reads_unconfirmed[context]
                aborted = ReadAborted(f"leadership of term {waiter.term} lost before the read was confirmed")
                self._settle.append((waiter, False, aborted))

    def _serve_reads(self) -> None:
        if not self._reads_confirmed:
            return
        waiting = []
        for waiter in self._reads_confirmed:
            if waiter.settled:
                continue
            if waiter.index <= self._applied:
                self._settle.append((waiter, True, None))
            else:
                waiting.append(waiter)
        self._reads_confirmed = waiting

    # -- timeouts ----------------------------------------------------------------

    def _watch_deadline(self, waiter: _Waiter, timeout: float) -> None:
        deadline = self.reactor.seconds() + timeout
        heap = self._deadlines
        if len(heap) > self._deadlines_limit:
            # Mostly settled waiters: rebuild rather than let the heap grow
            # with the request rate times the timeout.
            heap[:] = [item for item in heap if not item[2].deferred.called]
            heapq.heapify(heap)
            self._deadlines_limit = 2 * len(heap) + 256
        self._deadline_seq = seq = self._deadline_seq + 1
        heapq.heappush(heap, (deadline, seq, waiter))
        if deadline < self._deadline_at:
            self._arm_deadline_timer(deadline)

    def _arm_deadline_timer(self, deadline: float) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_at = deadline
        self._deadline_call = self.reactor.callLater(
            max(0.0, deadline - self.reactor.seconds()), self._expire_due
        )

    def _expire_due(self) -> None:
        self._deadline_call = None
        self._deadline_at = math.inf
        heap = self._deadlines
        # A timer can fire a hair early in float arithmetic: allow for it.
        now = self.reactor.seconds() + 1e-9
        while heap and heap[0][0] <= now:
            waiter = heapq.heappop(heap)[2]
            if not waiter.settled:
                waiter.expire()
        while heap and heap[0][2].settled:
            heapq.heappop(heap)
        # (A callback of an expired waiter may have armed the timer already,
        # for a later deadline than what is left.)
        if heap and heap[0][0] < self._deadline_at:
            self._arm_deadline_timer(heap[0][0])

    def _stop_deadline_timer(self) -> None:
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        self._deadline_at = math.inf

    # -- bookkeeping ----------------------------------------------------------

    def _forget_proposal(self, waiter: _Waiter) -> None:
        if self._proposals.get(waiter.index) is waiter:
            del self._proposals[waiter.index]

    def _forget_read(self, waiter: _Waiter) -> None:
        for context, w in list(self._reads_unconfirmed.items()):
            if w is waiter:
                del self._reads_unconfirmed[context]
        if waiter in self._reads_confirmed:
            self._reads_confirmed.remove(waiter)

    def _fail_all(self, proposal_error: Exception, read_error: Exception) -> None:
        proposals, self._proposals = self._proposals, {}
        unconfirmed, self._reads_unconfirmed = self._reads_unconfirmed, {}
        confirmed, self._reads_confirmed = self._reads_confirmed, []
        for waiter in proposals.values():
            waiter.fail(proposal_error)
        for waiter in [*unconfirmed.values(), *confirmed]:
            waiter.fail(read_error)

    def _fail_stop(self, failure: Failure) -> None:
        """Storage or a bug broke the Ready loop half-way: continuing could
        send messages about state that was never persisted, so stop for good."""
        self.fatal_error = failure
        self.log.failure("raft node {id}: fatal error, node stopped", failure, id=self.config.id)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._stop_deadline_timer()
        error = NodeCrashed(f"node stopped after a fatal error: {failure.getErrorMessage()}")
        self._fail_all(error, error)

    def _notify_membership_change(self) -> None:
        membership = self._membership_seen = self.core.membership
        for observer in list(self.on_membership_change):
            try:
                observer(membership)
            except Exception:
                self.log.failure("membership observer {observer!r} failed", observer=observer)

    def _notify_role_change(self) -> None:
        core = self._core
        if core is None or (core.role, core.leader) == (self._role, self._leader):
            return
        if core.role == Role.CANDIDATE and self._role != Role.CANDIDATE:
            self.stats_elections += 1
            last = self._last_leader_contact
            silent = (
                f"{(self.reactor.seconds() - last[2]) * 1000:.0f} ms after the last leader message"
                if last
                else "with no leader yet"
            )
            self.log.info(
                "raft node {id}: election for term {term}, {silent}",
                id=self.config.id,
                term=core.term,
                silent=silent,
            )
        if core.leader != self._leader and core.leader is not None:
            self.stats_leader_changes += 1
            self.log.info(
                "raft node {id}: leader is now node {leader} (term {term}, commit {commit}, applied {applied})",
                id=self.config.id,
                leader=core.leader,
                term=core.term,
                commit=core.commit_index,
                applied=self._applied,
            )
        self._role, self._leader = core.role, core.leader
        for observer in list(self.on_role_change):
            try:
                observer(self._role, self._leader)
            except Exception:
                self.log.failure("role-change observer {observer!r} failed", observer=observer)


def _default_offload(reactor: Any) -> Callable[[Callable[[], Any]], defer.Deferred[Any]]:
    if IReactorThreads.providedBy(reactor):
        return lambda work: threads.deferToThreadPool(reactor, reactor.getThreadPool(), work)
    return lambda work: task.deferLater(reactor, 0, work)
