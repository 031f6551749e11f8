"""A seeded simulated network and cluster harness for testing Raft (and
anything built on it) in simulated time, without sockets.

``SimNetwork`` hands each node an ``ITransport`` whose messages are
delivered through ``clock.callLater`` after a random delay, and may be
dropped, duplicated or (through the random delays) reordered; partitions cut
links.  Every random choice comes from one ``random.Random(seed)``, so a run
is a function of its seed and can be replayed.

``SimCluster`` builds n ``RaftNode``s over one network and one ``Clock`` with
in-memory storage that outlives restarts, and checks Raft's safety
invariants as it runs.  Layers above pass their own state machine factory.

Seeds: ``sim_seeds(default)`` reads ``RAFT_SEED`` (replay one seed) or
``RAFT_SEEDS`` (how many seeds to run), so a failing seed printed in an
assertion message can be replayed with ``RAFT_SEED=<n> trial ...``.
"""

from __future__ import annotations

import functools
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import cbor2
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from raft.errors import NodeCrashed, NotLeaderError
from raft.interfaces import ISnapshotCopy, IStateMachine, IStorage, ITransport
from raft.node import RaftNode
from raft.types import Entry, Membership, Message, MessageType, RaftConfig, Role

log = Logger()


def sim_seeds(default_count: int, env: str = "RAFT") -> list[int]:
    """The seeds a randomized test should run: ``RAFT_SEED=n`` replays seed n
    alone; otherwise ``RAFT_SEEDS`` (default ``default_count``) seeds starting
    at ``RAFT_SEED_BASE`` (default 0), to explore beyond the CI seeds. Layers
    above use their own prefix (``env="SURFSHARD"``: ``SURFSHARD_SEED``...)."""
    one = os.environ.get(f"{env}_SEED", "").strip()
    if one:
        return [int(one)]
    count = int(os.environ.get(f"{env}_SEEDS", "").strip() or default_count)
    base = int(os.environ.get(f"{env}_SEED_BASE", "").strip() or 0)
    return list(range(base, base + count))


class InvariantViolation(AssertionError):
    """A Raft safety property failed in a simulation (the message names the seed)."""


# -- the network -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkFaults:
    """How one direction of a link misbehaves (probabilities in [0, 1], seconds)."""

    drop: float = 0.0
    dup: float = 0.0
    delay: tuple[float, float] = (0.001, 0.005)
    long_delay_prob: float = 0.0
    long_delay: tuple[float, float] = (0.2, 1.0)

    def __post_init__(self) -> None:
        for p in (self.drop, self.dup, self.long_delay_prob):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probability out of range: {p}")
        for lo, hi in (self.delay, self.long_delay):
            if not 0.0 <= lo <= hi:
                raise ValueError(f"bad delay range: ({lo}, {hi})")


RELIABLE = LinkFaults()
#: Roughly the MIT 6.824 labrpc unreliable mode: 10% loss, up to 27 ms of
#: delay, a few duplicates and a few messages held back long enough to arrive
#: after much newer ones.
UNRELIABLE = LinkFaults(drop=0.1, dup=0.02, delay=(0.0, 0.027), long_delay_prob=0.02, long_delay=(0.2, 1.0))


@implementer(ITransport)
class SimTransport:
    """One node's end of a ``SimNetwork``."""

    def __init__(self, network: SimNetwork, node_id: int) -> None:
        self.network = network
        self.node_id = node_id
        self.handler: Callable[[Message], None] | None = None

    def send(self, message: Message) -> None:
        self.network._send(self.node_id, message)

    def set_handler(self, handler: Any) -> None:
        self.handler = handler

    def flush(self) -> None:
        """Nothing to do: ``send`` hands each message over at once."""


K = TypeVar("K")


class Reachability(Generic[K]):
    """Who reaches whom in a simulated network: a partition into groups,
    endpoints isolated from everyone, and cut links, the three combined.

    ``unlisted_reach_all`` is what a partition does to an endpoint that
    none of its groups lists: reach no one (a Raft node left out of every
    group) or everyone (an RPC test's clients, which keep talking to both
    sides of a partitioned group). An endpoint always reaches itself.
    """

    def __init__(self, unlisted_reach_all: bool) -> None:
        self._unlisted_reach_all = unlisted_reach_all
        self._groups: dict[K, int] | None = None
        self._isolated: set[K] = set()
        self._cut: set[tuple[K, K]] = set()

    def partition(self, *groups: Iterable[K]) -> None:
        """Listed endpoints reach only their own group (unlisted ones: see
        the class). Replaces any earlier partition, isolation or cut."""
        self._isolated.clear()
        self._cut.clear()
        self._groups = {member: gi for gi, group in enumerate(groups) for member in group}

    def isolate(self, endpoint: K) -> None:
        """Cut ``endpoint`` off from everyone (on top of any partition)."""
        self._isolated.add(endpoint)

    @property
    def isolated(self) -> frozenset[K]:
        """Endpoints currently cut off by ``isolate``."""
        return frozenset(self._isolated)

    def reconnect(self, endpoint: K) -> None:
        """Undo ``isolate(endpoint)`` and any ``cut`` touching it (not a partition)."""
        self._isolated.discard(endpoint)
        self._cut = {link for link in self._cut if endpoint not in link}

    def cut(self, a: K, b: K, *, both_ways: bool = True) -> None:
        """Drop everything a -> b (and b -> a unless ``both_ways`` is False)."""
        self._cut.add((a, b))
        if both_ways:
            self._cut.add((b, a))

    def heal(self) -> None:
        """Everyone reaches everyone again (loss and delays stay as set)."""
        self._groups = None
        self._isolated.clear()
        self._cut.clear()

    def connected(self, frm: K, to: K) -> bool:
        if frm == to:
            return True
        if frm in self._isolated or to in self._isolated or (frm, to) in self._cut:
            return False
        if self._groups is not None:
            g, h = self._groups.get(frm), self._groups.get(to)
            if g is None or h is None:
                return self._unlisted_reach_all
            return g == h
        return True


class SimNetwork(Reachability[int]):
    """Seeded lossy, delaying, duplicating, reordering, partitionable network.

    Every message is serialized to CBOR and parsed back on delivery (so what
    the core sends must survive the real wire format, and no two receivers
    share a mutable object).  Connectivity is checked both when a message is
    sent and when it arrives, so a partition also eats messages in flight.
    """

    def __init__(self, clock: IReactorTime, seed: int, faults: LinkFaults = RELIABLE) -> None:
        self.clock = clock
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self._link_faults: dict[tuple[int, int], LinkFaults] = {}
        self._transports: dict[int, SimTransport] = {}
        #: Who reaches whom: a node no partition group lists reaches no one.
        Reachability.__init__(self, unlisted_reach_all=False)
        #: Messages sent, keyed by (type, from, to).
        self.sent: Counter[tuple[MessageType, int, int]] = Counter()
        self.delivered = 0
        self.dropped = 0
        self.duplicated = 0
        #: Deliveries the receiver refused because it was crashed or stopped.
        self.refused = 0
        #: AppendEntries responses that rejected (backtracking steps).
        self.append_rejects = 0
        #: Exceptions a receiving handler raised (other than NodeCrashed): bugs.
        self.delivery_errors: list[Failure] = []

    # -- transports and delivery ---------------------------------------------------

    def transport(self, node_id: int) -> SimTransport:
        """The transport of ``node_id`` (the same object across restarts)."""
        if node_id not in self._transports:
            self._transports[node_id] = SimTransport(self, node_id)
        return self._transports[node_id]

    def _send(self, frm: int, message: Message) -> None:
        try:
            payload = cbor2.dumps(message.to_wire())
        except Exception:
            self.delivery_errors.append(Failure())
            log.failure("simnet: message from {frm} cannot be encoded", frm=frm)
            return
        to = message.to
        self.sent[(message.type, frm, to)] += 1
        if message.type == MessageType.APPEND_RESP and message.reject:
            self.append_rejects += 1
        faults = self._link_faults.get((frm, to), self.faults)
        rng = self.rng
        if not self.connected(frm, to) or rng.random() < faults.drop:
            self.dropped += 1
            return
        copies = 2 if faults.dup and rng.random() < faults.dup else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            if faults.long_delay_prob and rng.random() < faults.long_delay_prob:
                delay = rng.uniform(*faults.long_delay)
            else:
                delay = rng.uniform(*faults.delay)
            self.clock.callLater(delay, self._deliver, frm, to, payload)

    def _deliver(self, frm: int, to: int, payload: bytes) -> None:
        transport = self._transports.get(to)
        if not self.connected(frm, to) or transport is None or transport.handler is None:
            self.dropped += 1
            return
        message = Message.from_wire(cbor2.loads(payload))
        try:
            transport.handler(message)
        except NodeCrashed:
            self.refused += 1
            return
        except Exception:
            self.delivery_errors.append(Failure())
            log.failure(
                "simnet: node {to} failed handling {type} from {frm}", to=to, type=message.type, frm=frm
            )
            return
        self.delivered += 1

    # -- faults -----------------------------------------------------------------------

    def set_reliable(self) -> None:
        """No loss, no duplicates, short random delays; per-link faults cleared."""
        self.faults = RELIABLE
        self._link_faults.clear()

    def set_unreliable(self, **overrides: Any) -> None:
        """``UNRELIABLE`` with any ``LinkFaults`` field overridden, on every link."""
        self.faults = replace(UNRELIABLE, **overrides)
        self._link_faults.clear()

    def set_link(self, frm: int, to: int, faults: LinkFaults | None) -> None:
        """Faults of the one direction frm -> to (None: back to the network's)."""
        if faults is None:
            self._link_faults.pop((frm, to), None)
        else:
            self._link_faults[(frm, to)] = faults

    # -- connectivity -------------------------------------------------------------------

    # -- counters -------------------------------------------------------------------------

    def reset_counters(self) -> None:
        self.sent.clear()
        self.delivered = self.dropped = self.duplicated = self.refused = self.append_rejects = 0

    def count(
        self,
        types: MessageType | Iterable[MessageType] | None = None,
        *,
        frm: int | None = None,
        to: int | None = None,
    ) -> int:
        """Messages sent (dropped or not) of the given type(s), optionally
        only from ``frm`` and/or to ``to``."""
        if isinstance(types, MessageType):
            types = (types,)
        wanted = None if types is None else set(types)
        return sum(
            n
            for (mtype, f, t), n in self.sent.items()
            if (wanted is None or mtype in wanted) and (frm is None or f == frm) and (to is None or t == to)
        )


# -- a state machine for tests ----------------------------------------------------------


@implementer(IStateMachine, ISnapshotCopy)
class RecordingStateMachine:
    """Records every command it applies, in order. Its periodic snapshots
    are taken in the background (``ISnapshotCopy``): in the simulations the
    encoding runs a clock turn later, while applies go on.

    ``apply`` returns the number of commands applied so far (so a proposer
    learns its command's position); a command starting with ``b"!error"``
    returns a ``ValueError`` instance instead, to exercise errbacks.
    """

    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.restores = 0

    def apply(self, command: bytes) -> Any:
        self.applied.append(command)
        if command.startswith(b"!error"):
            return ValueError(f"refused {command!r}")
        return len(self.applied)

    def snapshot(self) -> bytes:
        return cbor2.dumps(self.applied)

    def snapshot_copy(self) -> Callable[[], bytes]:
        copy = list(self.applied)
        return lambda: cbor2.dumps(copy)

    def restore(self, data: bytes) -> None:
        self.applied = list(cbor2.loads(data))
        self.restores += 1


def _memory_storage(node_id: int) -> IStorage:
    from raft.storage import MemoryStorage  # imported late: storage is optional for importers of simnet

    return MemoryStorage()


# -- the cluster harness ---------------------------------------------------------------------


class SimCluster:
    """n RaftNodes (ids 1..n) over one SimNetwork and one Clock.

    Storage objects live for the cluster's lifetime, so ``restart(i)`` (stop
    the service, build a new RaftNode over the same storage, a fresh state
    machine from the factory) behaves like a process restart.  Cheap safety
    checks run on every apply and role change, and ``run`` raises
    ``InvariantViolation`` (naming the seed) as soon as one fails;
    ``check_invariants`` adds the expensive log checks.
    """

    def __init__(
        self,
        n: int = 3,
        seed: int = 0,
        *,
        config_overrides: dict[str, Any] | None = None,
        state_machine_factory: Callable[[int], IStateMachine] | None = None,
        storage_factory: Callable[[int], IStorage] | None = None,
        tick_interval: float = 0.05,
        snapshot_entries: int = 10000,
        faults: LinkFaults = RELIABLE,
        start: bool = True,
        reopen_storage: bool = False,
        clock: Clock | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a cluster needs at least one node")
        self.seed = seed
        #: Several clusters may share one clock (a world of groups); each
        #: still has its own network between its nodes.
        self.clock = clock if clock is not None else Clock()
        self.net = SimNetwork(self.clock, seed, faults)
        #: The one random stream of the simulation (shared with the network).
        self.rng = self.net.rng
        #: The group's members now: the bootstrap, plus servers added with
        #: ``add_node``, less those retired with ``retire``.
        self.ids: list[int] = list(range(1, n + 1))
        #: Every node's bootstrap membership (``RaftConfig.peers``).
        self.bootstrap = tuple(self.ids)
        #: Membership changes applied anywhere, by log index.
        self.memberships: dict[int, Membership] = {}
        self.config_overrides = dict(config_overrides or {})
        self.state_machine_factory = state_machine_factory or (lambda _i: RecordingStateMachine())
        self.tick_interval = tick_interval
        self.snapshot_entries = snapshot_entries
        self.storage_factory = storage_factory or _memory_storage
        #: Whether a stopped node's storage is closed and a new one opened by
        #: the factory on restart (DiskStorage: a real process restart), or the
        #: same object is handed to the new RaftNode (MemoryStorage).
        self.reopen_storage = reopen_storage
        self.storages: dict[int, IStorage] = {i: self.storage_factory(i) for i in self.ids}
        self.nodes: dict[int, RaftNode] = {}
        self.state_machines: dict[int, IStateMachine] = {}
        #: Election safety record: term -> the one node that led it.
        self.leaders_by_term: dict[int, int] = {}
        #: State machine safety record: index -> (term, data) applied there.
        self.committed: dict[int, tuple[int, bytes | None]] = {}
        self._index_of_command: dict[bytes, int] = {}
        #: Commands whose proposal was acknowledged (Deferred fired with a result).
        self.acked: list[bytes] = []
        self.violations: list[str] = []
        self._progress_seen: dict[int, tuple[RaftNode, tuple[int, int, int]]] = {}
        if start:
            for i in self.ids:
                self.start(i)

    # -- failures --------------------------------------------------------------------------

    def fail(self, message: str) -> InvariantViolation:
        return InvariantViolation(f"seed={self.seed} t={self.clock.seconds():.3f}: {message}")

    def _violation(self, message: str) -> None:
        self.violations.append(f"t={self.clock.seconds():.3f}: {message}")

    def _check_monotonic(self) -> None:
        """Within one incarnation of a node, term, commit and applied index
        never go back (across a power-loss restart only what was synced counts)."""
        for i, node in self.nodes.items():
            if not node.running:
                continue
            core = node.core
            now = (core.term, core.commit_index, node.applied_index)
            before = self._progress_seen.get(i)
            if before is not None and before[0] is node:
                if any(a < b for a, b in zip(now, before[1], strict=True)):
                    self._violation(f"node {i} went back from (term, commit, applied) {before[1]} to {now}")
            self._progress_seen[i] = (node, now)

    def _raise_if_broken(self) -> None:
        if self.violations:
            raise self.fail("; ".join(self.violations[:5]))
        if self.net.delivery_errors:
            raise self.fail(f"a node raised handling a message: {self.net.delivery_errors[0].getTraceback()}")
        for i, node in self.nodes.items():
            if node.fatal_error is not None:
                raise self.fail(f"node {i} fail-stopped: {node.fatal_error.getTraceback()}")

    # -- node lifecycle ----------------------------------------------------------------------

    def config(self, i: int) -> RaftConfig:
        return RaftConfig(id=i, peers=self.bootstrap, **self.config_overrides)

    def add_node(self, i: int) -> RaftNode:
        """Start a new server ``i`` (with the bootstrap config, as a joining
        server starts): it joins once a leader adds it to the membership."""
        if i in self.storages:
            raise ValueError(f"node {i} exists already; ids are never reused")
        self.storages[i] = self.storage_factory(i)
        self.ids.append(i)
        return self.start(i)

    def retire(self, i: int) -> None:
        """Stop a server removed from the membership for good. Its storage
        stays, and the log checks still read it."""
        self.stop(i, power_loss=False)
        self.ids.remove(i)

    def voters_at(self, index: int) -> tuple[int, ...]:
        """The voters that committed ``index``: those of the newest
        membership change applied at or before it (the bootstrap before any)."""
        changes = [k for k in self.memberships if k <= index]
        return self.memberships[max(changes)].voters if changes else self.bootstrap

    def start(self, i: int) -> RaftNode:
        """Start node i (a fresh RaftNode over its storage)."""
        old = self.nodes.get(i)
        if old is not None and old.running:
            raise ValueError(f"node {i} is already running")
        sm = self.state_machine_factory(i)
        node = RaftNode(
            self.config(i),
            self.storages[i],
            self.net.transport(i),
            sm,
            self.clock,
            tick_interval=self.tick_interval,
            snapshot_entries=self.snapshot_entries,
            rng=random.Random(self.rng.getrandbits(64)),
        )
        node.on_role_change.append(functools.partial(self._role_observer, node))
        node.on_apply.append(functools.partial(self._apply_observer, node))
        self.nodes[i] = node
        self.state_machines[i] = sm
        node.startService()
        return node

    def stop(self, i: int, power_loss: bool = True) -> None:
        """Stop node i's service: a process death.  The storage survives; with
        ``power_loss`` (and a storage that can simulate it) whatever was not
        synced is lost too, which catches acknowledging before ``sync()``."""
        node = self.nodes[i]
        if node.running:
            storage = self.storages[i]
            simulate_crash = getattr(storage, "simulate_crash", None)
            if power_loss and simulate_crash is not None:
                # Nothing more is written: not even a leader's entries sent
                # and not yet on its disk.
                node.power_off()
                simulate_crash()
            else:
                node.stopService()
                if self.reopen_storage:
                    storage.close()
            if self.reopen_storage:
                self.storages[i] = self.storage_factory(i)
            # A dead process's sockets close: the peers it can reach hear
            # of it one network delay later (RaftNode.peer_unreachable).
            for j in self.ids:
                if j != i and self.net.connected(i, j):
                    delay = self.rng.uniform(*self.net.faults.delay)
                    self.clock.callLater(delay, self._peer_lost, j, i)

    def _peer_lost(self, j: int, i: int) -> None:
        node = self.nodes.get(j)
        if node is not None and node.running and not node.crashed:
            node.peer_unreachable(i)

    def restart(self, i: int, power_loss: bool = True) -> RaftNode:
        self.stop(i, power_loss)
        return self.start(i)

    def crash(self, i: int) -> None:
        """Simulated crash: freeze node i in memory (SurfStore's crash)."""
        self.nodes[i].crash()

    def restore(self, i: int) -> None:
        self.nodes[i].restore()

    def is_live(self, i: int) -> bool:
        node = self.nodes.get(i)
        return node is not None and bool(node.running) and not node.crashed

    def live_ids(self) -> list[int]:
        return [i for i in self.ids if self.is_live(i)]

    def node(self, i: int) -> RaftNode:
        return self.nodes[i]

    def sm(self, i: int) -> IStateMachine:
        return self.state_machines[i]

    # -- time ----------------------------------------------------------------------------------

    def run(self, seconds: float, step: float = 0.01) -> None:
        """Advance simulated time by ``seconds`` in ``step``-sized increments
        (small steps, so zero-delay calls do not all collapse into one)."""
        for _ in range(max(1, math.ceil(seconds / step - 1e-9))):
            self.clock.advance(step)
            self._check_monotonic()
            self._raise_if_broken()

    def run_until(self, predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
        """Advance time until ``predicate()`` holds (True) or ``timeout``
        simulated seconds pass (False)."""
        for _ in range(max(1, math.ceil(timeout / step - 1e-9))):
            if predicate():
                return True
            self.clock.advance(step)
            self._check_monotonic()
            self._raise_if_broken()
        return predicate()

    # -- leaders -------------------------------------------------------------------------------

    def believed_leaders(self) -> list[int]:
        """Live nodes that believe they lead (a cut-off old leader included),
        newest term first."""
        found = [i for i in self.live_ids() if self.nodes[i].is_leader]
        return sorted(found, key=lambda i: -self.nodes[i].core.term)

    def reaches_majority(self, i: int) -> bool:
        """Whether node i and the live nodes it can talk to (both ways) form a
        majority of the cluster."""
        voters = self.nodes[i].core.voters
        reach = sum(
            1
            for j in self.live_ids()
            if j in voters and (j == i or (self.net.connected(i, j) and self.net.connected(j, i)))
        )
        return reach * 2 > len(voters)

    def leaders(self) -> list[int]:
        """Believed leaders that reach a majority: the ones that can commit."""
        return [i for i in self.believed_leaders() if self.reaches_majority(i)]

    def leader(self) -> int | None:
        """The leader (of the highest term) that reaches a majority, if any."""
        found = self.leaders()
        return found[0] if found else None

    def wait_for_leader(self, timeout: float = 5.0) -> int:
        """Run until a live leader exists whose term every live node it can
        reach has caught up with; raise (with the seed) if none in time."""
        if not self.run_until(self._stable_leader, timeout):
            raise self.fail(f"no leader within {timeout} s; status: {self.status()}")
        leader = self.leader()
        assert leader is not None
        return leader

    def _stable_leader(self) -> bool:
        leader = self.leader()
        if leader is None:
            return False
        term = self.nodes[leader].core.term
        return all(
            self.nodes[i].core.term == term and self.nodes[i].leader_id == leader
            for i in self.live_ids()
            if self.net.connected(leader, i) and self.net.connected(i, leader)
        )

    def terms(self) -> dict[int, int]:
        return {i: node.core.term for i, node in self.nodes.items()}

    def status(self) -> dict[int, dict[str, Any]]:
        return {i: node.status() for i, node in self.nodes.items()}

    # -- proposals -------------------------------------------------------------------------------

    def submit(self, i: int, command: bytes, timeout: float | None = None) -> defer.Deferred[Any]:
        """``propose`` for fire-and-forget clients: a failure is swallowed (the
        Deferred fires with the exception instance), acks are still recorded."""
        d = self.propose(i, command, timeout)
        d.addErrback(lambda f: f.value)
        return d

    def propose(self, i: int, command: bytes, timeout: float | None = None) -> defer.Deferred[Any]:
        """Propose on node i; an acknowledged command is remembered so
        ``check_acked_applied`` can demand it on every live node."""
        d = self.nodes[i].propose(command, timeout)

        def acked(result: Any) -> Any:
            self.acked.append(command)
            return result

        d.addCallback(acked)
        return d

    def read(self, i: int, timeout: float | None = None) -> defer.Deferred[Any]:
        """A linearizable read on node i, checked: when it fires, node i must
        have applied every command acknowledged before the read was asked
        (else an InvariantViolation is raised by the next ``run`` step).
        Failures are swallowed: the Deferred fires with the exception."""
        node = self.nodes[i]
        acked_before = list(self.acked)

        def served(_: None) -> None:
            for command in acked_before:
                index = self._index_of_command.get(command)
                if index is None or node.applied_index < index:
                    self._violation(
                        f"stale read on node {i}: {command!r} (index {index}) was acknowledged before "
                        f"the read but node {i} has applied only up to {node.applied_index}"
                    )
                    return None
            return None

        d = node.read(timeout)
        d.addCallbacks(served, lambda f: f.value)
        return d

    def applied_on(self, command: bytes) -> list[int]:
        """Live nodes whose state machine has applied ``command``."""
        index = self._index_of_command.get(command)
        if index is None:
            return []
        return [i for i in self.live_ids() if self.nodes[i].applied_index >= index]

    def one(
        self, command: bytes, expected: int | None = None, timeout: float = 10.0, retry: bool = True
    ) -> int:
        """The MIT lab's ``one()``: get ``command`` committed and applied on at
        least ``expected`` live nodes (default: all), proposing it to whoever
        leads, retrying while no leader takes it.  Returns its log index."""
        expected = len(self.ids) if expected is None else expected
        deadline = self.clock.seconds() + timeout
        proposed = False

        def done() -> bool:
            return len(self.applied_on(command)) >= expected

        while self.clock.seconds() < deadline and not done():
            if proposed and not retry:
                self.run_until(done, deadline - self.clock.seconds())
                break
            leader = self.leader()
            if leader is None:
                self.run(0.05)
                continue
            refused: list[Failure] = []

            def note_refusal(f: Failure, refused: list[Failure] = refused) -> None:
                if f.check(NotLeaderError, NodeCrashed):
                    refused.append(f)

            self.propose(leader, command).addErrback(note_refusal)
            proposed = True

            # Wait for the outcome in the state machines.  A refused proposal
            # (never in any log) is retried at once; a dropped one may still
            # commit, so it gets the full 2 s before being proposed again.
            def settled(refused: list[Failure] = refused) -> bool:
                return done() or bool(refused)

            self.run_until(settled, min(2.0, deadline - self.clock.seconds()))
        if done():
            return self._index_of_command[command]
        raise self.fail(
            f"one({command!r}) failed to reach {expected} nodes: applied on {self.applied_on(command)}, "
            f"status {self.status()}"
        )

    def n_committed(self, index: int) -> tuple[int, bytes | None]:
        """How many live nodes applied ``index``, and its command."""
        count = sum(1 for i in self.live_ids() if self.nodes[i].applied_index >= index)
        term_data = self.committed.get(index)
        return count, (term_data[1] if term_data else None)

    # -- invariants ------------------------------------------------------------------------------

    def _role_observer(self, node: RaftNode, role: Role, _leader: int | None) -> None:
        self._on_role_change(node, role)

    def _apply_observer(self, node: RaftNode, entry: Entry, _result: Any) -> None:
        self._on_apply(node, entry)

    def _on_role_change(self, node: RaftNode, role: Role) -> None:
        if role != Role.LEADER:
            return
        term = node.core.term
        other = self.leaders_by_term.setdefault(term, node.node_id)
        if other != node.node_id:
            self._violation(f"two leaders in term {term}: {other} and {node.node_id}")

    def _on_apply(self, node: RaftNode, entry: Entry) -> None:
        seen = self.committed.setdefault(entry.index, (entry.term, entry.data))
        if seen != (entry.term, entry.data):
            self._violation(
                f"node {node.node_id} applied {(entry.term, entry.data)!r} at index {entry.index}, "
                f"another node applied {seen!r}"
            )
        if entry.kind:
            self.memberships[entry.index] = Membership.decode(entry.data)
        elif entry.data is not None:
            self._index_of_command.setdefault(entry.data, entry.index)

    def check_invariants(self) -> None:
        """Every safety check (raises InvariantViolation naming the seed):
        election safety and state machine safety (recorded as the run goes),
        log matching between every pair of persisted logs, committed entries
        present in every log that reaches them, leader completeness for the
        newest leader, and recording state machines holding prefixes of one
        history."""
        self._raise_if_broken()
        logs: dict[int, dict[int, Entry]] = {}
        commits: dict[int, int] = {}
        snapshot_indexes: dict[int, int] = {}
        for i, storage in self.storages.items():
            hard_state, snapshot, entries = storage.load()
            logs[i] = {e.index: e for e in entries}
            commits[i] = hard_state.commit
            snapshot_indexes[i] = snapshot.meta.index if snapshot is not None else 0
        self._check_log_matching(logs)
        self._check_committed_on_majority(logs, snapshot_indexes)
        for i, log_ in logs.items():
            for index, entry in log_.items():
                seen = self.committed.get(index)
                if index <= commits[i] and seen is not None and seen != (entry.term, entry.data):
                    self._violation(
                        f"node {i} persisted {entry!r} at committed index {index}, applied was {seen!r}"
                    )
        self._check_leader_completeness(logs)
        self._check_recorded_histories()
        self._raise_if_broken()

    def _check_committed_on_majority(
        self, logs: dict[int, dict[int, Entry]], snapshot_indexes: dict[int, int]
    ) -> None:
        """Whatever was applied anywhere is stored (in the log or covered by a
        snapshot) on a majority: persist-before-ack on leader and followers."""
        for index, (term, data) in self.committed.items():
            holding = set()
            for i, log_ in logs.items():
                entry = log_.get(index)
                if snapshot_indexes.get(i, 0) >= index or (
                    entry is not None and (entry.term, entry.data) == (term, data)
                ):
                    holding.add(i)
            # Committed by a majority of the voters in force then, or of a
            # later membership's (a leader commits older entries with the
            # newest voters it has).
            quorums = [self.voters_at(index), *(m.voters for k, m in self.memberships.items() if k > index)]
            if not any(len(holding & set(q)) * 2 > len(q) for q in quorums):
                holders = len(holding)
                self._violation(f"committed index {index} {(term, data)!r} is stored on only {holders} nodes")
                return

    def _check_log_matching(self, logs: dict[int, dict[int, Entry]]) -> None:
        ids = sorted(logs)
        for x, a in enumerate(ids):
            for b in ids[x + 1 :]:
                la, lb = logs[a], logs[b]
                common = [i for i in la if i in lb and la[i].term == lb[i].term]
                if not common:
                    continue
                top = max(common)
                for index in range(top, 0, -1):
                    ea, eb = la.get(index), lb.get(index)
                    if ea is None or eb is None:
                        break  # below one node's snapshot
                    if ea != eb:
                        self._violation(
                            f"log matching: nodes {a} and {b} agree on term at index {top} "
                            f"but differ at {index}: {ea!r} vs {eb!r}"
                        )
                        return

    def _check_leader_completeness(self, logs: dict[int, dict[int, Entry]]) -> None:
        if not self.leaders_by_term:
            return
        term = max(self.leaders_by_term)
        leader = self.leaders_by_term[term]
        node = self.nodes[leader]
        if not (node.running and node.is_leader and node.core.term == term):
            return
        snapshot_index = node.core.snapshot_meta.index
        log_ = logs[leader]
        for index, (entry_term, data) in self.committed.items():
            if index <= snapshot_index:
                continue
            entry = log_.get(index)
            if entry is None or (entry.term, entry.data) != (entry_term, data):
                self._violation(
                    f"leader completeness: leader {leader} of term {term} lacks committed "
                    f"index {index} {(entry_term, data)!r} (has {entry!r})"
                )
                return

    def _check_recorded_histories(self) -> None:
        histories = [
            (i, sm.applied) for i, sm in self.state_machines.items() if isinstance(sm, RecordingStateMachine)
        ]
        if len(histories) < 2:
            return
        longest_id, longest = max(histories, key=lambda h: len(h[1]))
        for i, history in histories:
            if history != longest[: len(history)]:
                self._violation(f"state machine of node {i} is not a prefix of node {longest_id}'s history")
                return

    def check_acked_applied(self) -> None:
        """Every acknowledged proposal is applied on every live node."""
        for command in self.acked:
            index = self._index_of_command.get(command)
            if index is None:
                raise self.fail(f"acknowledged {command!r} was never applied anywhere")
            behind = [i for i in self.live_ids() if self.nodes[i].applied_index < index]
            if behind:
                raise self.fail(f"acknowledged {command!r} (index {index}) not applied on nodes {behind}")

    def converge(self, timeout: float = 30.0) -> None:
        """Heal the network, make it reliable, restore and start every node,
        then run until every live node has applied everything committed
        anywhere (raising if not within ``timeout``)."""
        self.net.heal()
        self.net.set_reliable()
        for i in self.ids:
            node = self.nodes.get(i)
            if node is None or not node.running:
                self.start(i)
            elif node.crashed:
                node.restore()

        def caught_up() -> bool:
            top = max(self.committed, default=0)
            leader = self.leader()
            if leader is None:
                return False
            target = max(top, self.nodes[leader].core.commit_index)
            return all(self.nodes[i].applied_index >= target for i in self.ids)

        if not self.run_until(caught_up, timeout):
            raise self.fail(f"cluster did not converge within {timeout} s: {self.status()}")

    def stop_all(self) -> None:
        """Stop every running node (storage stays open)."""
        for i in self.ids:
            node = self.nodes.get(i)
            if node is not None and node.running:
                node.stopService()

    def shutdown(self) -> None:
        """Stop every node and close every storage (test cleanup)."""
        self.stop_all()
        for storage in self.storages.values():
            storage.close()


def measure_failover(seed: int, n: int = 3, limit: float = 10.0) -> float:
    """Simulated seconds from a leader's crash to a new leader the rest of the
    cluster follows, with default timing and a reliable network (``limit`` if
    none was elected by then)."""
    cluster = SimCluster(n, seed)
    try:
        old = cluster.wait_for_leader(10.0)
        cluster.run(cluster.rng.uniform(0.3, 1.0))  # a random point of the heartbeat cycle
        cluster.crash(old)
        start = cluster.clock.seconds()

        def new_leader() -> bool:
            leader = cluster.leader()
            return leader is not None and leader != old and cluster._stable_leader()

        cluster.run_until(new_leader, limit)
        return cluster.clock.seconds() - start
    finally:
        cluster.shutdown()


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, p99 and max of a list of durations (for benchmarks)."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p99": p99, "max": ordered[-1], "n": float(len(ordered))}
