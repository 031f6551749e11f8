"""CPU cost of the Raft layer per committed entry, leader and follower, with
no sockets and no service on top.

    .venv/bin/python benchmarks/raft_core.py [--seconds 2] [--rounds 3] [--batches 1,16,64]
        [--storage disk|memory] [--payload 160] [--no-cbor] [--profile BATCH] [--top 30]

What runs: three ``raft.node.RaftNode`` (ids 1..3) in one process, with
``DiskStorage(fsync=False)`` in a temp dir (``--storage memory`` for
``MemoryStorage``), a state machine that only counts, and a transport that
does what the real one costs the Raft layer: ``Message.to_wire()`` and
``cbor2.dumps`` on the sender, ``cbor2.loads`` and ``Message.from_wire`` on
the receiver (``--no-cbor`` leaves the CBOR out). Node 1 is elected, then
B clients (B = the batch size) each propose a small command, wait for its
answer and propose the next one: closed loop, so a leader Ready carries
about B new entries.

The reactor is a minimal one of this file: calls scheduled while the
calls of one iteration run wait for the next iteration (as in Twisted's
real reactor, unlike ``task.Clock``), and its time follows the real elapsed
time, so the 50 ms ticks (heartbeats, elections) come as often as in a real
server. Every call is charged to the node that scheduled it (the transport
schedules a delivery on the receiver's account; of the clients' work only
their ``RaftNode.propose`` calls count, on the leader's account), and timed
with ``time.process_time``: "us/entry" is a node's CPU
microseconds per entry committed in the measured window. The two followers
are averaged. "msgs/entry" counts the Raft messages the leader sends per
entry (appends, heartbeats, ...); the followers send about as many back.

Each batch size runs ``--rounds`` times (fresh cluster each time) for
``--seconds`` after a short warm-up; the table gives the median of the rounds.
``--profile B`` runs batch size B once with the leader's calls (or, with
``--profile-node follower``, node 2's) under cProfile instead and prints the
top functions.
Figures are printed, never asserted; they depend on the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cbor2
from zope.interface import implementer

from raft.interfaces import IStateMachine, IStorage, ITransport
from raft.node import RaftNode
from raft.storage import DiskStorage, MemoryStorage
from raft.types import Message, RaftConfig, Role

PEERS = (1, 2, 3)
LEADER = 1
#: The account the clients' own work (making commands, scheduling) is
#: charged to: not Raft's.
CLIENTS = 0


# ---------------------------------------------------------------------------
# A minimal reactor that charges each call to a node
# ---------------------------------------------------------------------------


class _Call:
    """What ``callLater`` returns (the part of ``IDelayedCall`` the driver uses)."""

    __slots__ = ("_active", "args", "func", "owner", "time")

    def __init__(self, time_: float, owner: int, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.time = time_
        self.owner = owner
        self.func = func
        self.args = args
        self._active = True

    def getTime(self) -> float:
        return self.time

    def active(self) -> bool:
        return self._active

    def cancel(self) -> None:
        self._active = False

    def delay(self, seconds: float) -> None:
        self.time += seconds

    def reset(self, seconds: float) -> None:
        raise NotImplementedError("not used by the driver")


class Scheduler:
    """One timeline for every node. ``iterate()`` runs the calls that were
    due when it started; their zero-delay calls wait for the next one."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, _Call]] = []
        self._seq = 0
        #: CPU seconds charged to each owner.
        self.cpu: Counter[int] = Counter()
        #: When set, the calls charged to ``profiled_owner`` run under it.
        self.profiler: cProfile.Profile | None = None
        self.profiled_owner = 0

    def schedule(self, owner: int, delay: float, func: Callable[..., Any], args: tuple[Any, ...]) -> _Call:
        call = _Call(self.now + delay if delay > 0 else self.now, owner, func, args)
        self._seq += 1
        heapq.heappush(self._heap, (call.time, self._seq, call))
        return call

    def iterate(self, advance: float) -> int:
        self.now += advance
        heap = self._heap
        due: list[_Call] = []
        while heap and heap[0][0] <= self.now:
            due.append(heapq.heappop(heap)[2])
        clock = time.process_time
        cpu = self.cpu
        profiler = self.profiler
        for call in due:
            if not call._active:
                continue
            call._active = False
            if profiler is not None and call.owner == self.profiled_owner:
                profiler.enable()
                call.func(*call.args)
                profiler.disable()
                continue
            t0 = clock()
            call.func(*call.args)
            cpu[call.owner] += clock() - t0
        return len(due)


class NodeClock:
    """A node's view of the scheduler (its ``IReactorTime``): everything it
    schedules is charged to it."""

    def __init__(self, scheduler: Scheduler, owner: int) -> None:
        self._scheduler = scheduler
        self._owner = owner

    def seconds(self) -> float:
        return self._scheduler.now

    def callLater(self, delay: float, func: Callable[..., Any], *args: Any, **kw: Any) -> _Call:
        if kw:
            return self._scheduler.schedule(self._owner, delay, lambda: func(*args, **kw), ())
        return self._scheduler.schedule(self._owner, delay, func, args)

    def getDelayedCalls(self) -> list[_Call]:
        return []


# ---------------------------------------------------------------------------
# Transport and state machine
# ---------------------------------------------------------------------------


class Wire:
    """Delivers messages between the nodes' transports, serialized."""

    def __init__(self, scheduler: Scheduler, use_cbor: bool) -> None:
        self.scheduler = scheduler
        self.use_cbor = use_cbor
        self.transports: dict[int, LoopTransport] = {}
        #: Messages sent by each node, by type.
        self.sent: Counter[tuple[int, str]] = Counter()

    def send(self, message: Message) -> None:
        self.sent[(message.frm, message.type.value)] += 1
        wire = message.to_wire()
        payload = cbor2.dumps(wire) if self.use_cbor else wire
        self.scheduler.schedule(message.to, 0.0, self._deliver, (message.to, payload))

    def _deliver(self, to: int, payload: Any) -> None:
        wire = cbor2.loads(payload) if self.use_cbor else payload
        handler = self.transports[to].handler
        if handler is not None:
            handler(Message.from_wire(wire))


@implementer(ITransport)
class LoopTransport:
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.handler: Callable[[Message], None] | None = None

    def send(self, message: Message) -> None:
        self.wire.send(message)

    def set_handler(self, handler: Any) -> None:
        self.handler = handler

    def flush(self) -> None:
        """Nothing to do: ``send`` hands each message over at once."""


@implementer(IStateMachine)
class CountingMachine:
    """Applies a command by counting it: the state machine's own cost stays
    out of the figures."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, command: bytes) -> Any:
        self.applied += 1
        return self.applied

    def snapshot(self) -> bytes:
        return self.applied.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.applied = int.from_bytes(data, "big")


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------


class Cluster:
    def __init__(self, storage_kind: str, use_cbor: bool, workdir: str) -> None:
        self.scheduler = Scheduler()
        self.wire = Wire(self.scheduler, use_cbor)
        self.machines: dict[int, CountingMachine] = {}
        self.storages: list[IStorage] = []
        self.nodes: dict[int, RaftNode] = {}
        for i in PEERS:
            transport = LoopTransport(self.wire)
            self.wire.transports[i] = transport
            storage: IStorage
            if storage_kind == "disk":
                storage = DiskStorage(os.path.join(workdir, f"node-{i}"), fsync=False)
            else:
                storage = MemoryStorage()
            self.storages.append(storage)
            self.machines[i] = CountingMachine()
            self.nodes[i] = RaftNode(
                RaftConfig(i, PEERS),
                storage,
                transport,
                self.machines[i],
                NodeClock(self.scheduler, i),  # type: ignore[arg-type]
            )
        self._last = time.perf_counter()

    def start(self) -> None:
        for node in self.nodes.values():
            node.startService()
        self.nodes[LEADER].campaign()
        deadline = time.perf_counter() + 10.0
        while self.nodes[LEADER].core.role != Role.LEADER or any(
            n.core.leader != LEADER for n in self.nodes.values()
        ):
            if time.perf_counter() > deadline:
                raise RuntimeError("node 1 was not elected")
            self.step()

    def step(self) -> None:
        """One reactor iteration; simulated time follows real time."""
        now = time.perf_counter()
        advance, self._last = now - self._last, now
        if not self.scheduler.iterate(advance):
            # Nothing due: jump to the next timer (an idle real reactor sleeps).
            self._last = time.perf_counter()
            self.scheduler.iterate(0.001)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stopService()
        for storage in self.storages:
            storage.close()


class ClosedLoopClients:
    """``count`` clients, each proposing its next command once the last is
    answered (in the next reactor iteration, as a reply and a new request
    would). Only ``RaftNode.propose`` is charged to the leader; the rest of
    a client's work goes to the ``CLIENTS`` account."""

    def __init__(self, cluster: Cluster, count: int, payload: int) -> None:
        self.cluster = cluster
        self.leader = cluster.nodes[LEADER]
        self.clock = NodeClock(cluster.scheduler, CLIENTS)
        self.acked = 0
        self.errors = 0
        # A pool of distinct commands, made up front.
        self._commands = [
            (b"client-%04d cmd-%05d " % (k % count, k)).ljust(payload, b"x") for k in range(4096)
        ]
        self._seq = 0
        for client in range(count):
            self.clock.callLater(0, self._propose, client)

    def _propose(self, client: int) -> None:
        self._seq += 1
        command = self._commands[self._seq % len(self._commands)]
        scheduler = self.cluster.scheduler
        if scheduler.profiler is not None and scheduler.profiled_owner == LEADER:
            scheduler.profiler.enable()
            d = self.leader.propose(command, timeout=5.0)
            scheduler.profiler.disable()
        else:
            t0 = time.process_time()
            d = self.leader.propose(command, timeout=5.0)
            scheduler.cpu[LEADER] += time.process_time() - t0
        d.addCallbacks(self._answered, self._failed, callbackArgs=(client,), errbackArgs=(client,))

    def _answered(self, _result: Any, client: int) -> None:
        self.acked += 1
        self.clock.callLater(0, self._propose, client)

    def _failed(self, _failure: Any, client: int) -> None:
        self.errors += 1
        self.clock.callLater(0, self._propose, client)


def run_once(
    batch: int,
    seconds: float,
    warmup: float,
    args: argparse.Namespace,
    profiler: cProfile.Profile | None = None,
    profiled_node: int = LEADER,
) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="raft-core-bench-")
    cluster = Cluster(args.storage, not args.no_cbor, workdir)
    try:
        cluster.start()
        clients = ClosedLoopClients(cluster, batch, args.payload)
        end_warmup = time.perf_counter() + warmup
        while time.perf_counter() < end_warmup:
            cluster.step()
        sched = cluster.scheduler
        sched.profiler, sched.profiled_owner = profiler, profiled_node
        sched.cpu.clear()
        cluster.wire.sent.clear()
        committed0 = {i: m.applied for i, m in cluster.machines.items()}
        readies0 = cluster.nodes[LEADER].storage.fsyncs
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            cluster.step()
        elapsed = time.perf_counter() - start
        committed = {i: cluster.machines[i].applied - committed0[i] for i in PEERS}
        entries = max(1, committed[LEADER])
        followers = [i for i in PEERS if i != LEADER]
        leader_msgs = sum(n for (frm, _t), n in cluster.wire.sent.items() if frm == LEADER)
        return {
            "entries": committed[LEADER],
            "entries_per_s": committed[LEADER] / elapsed,
            "leader_us": sched.cpu[LEADER] * 1e6 / entries,
            "follower_us": statistics.mean(sched.cpu[i] * 1e6 / max(1, committed[i]) for i in followers),
            "msgs_per_entry": leader_msgs / entries,
            "entries_per_sync": entries / max(1, cluster.nodes[LEADER].storage.fsyncs - readies0),
            "errors": clients.errors,
            "sent": dict(Counter({t: n for (frm, t), n in cluster.wire.sent.items() if frm == LEADER})),
        }
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def profile(batch: int, args: argparse.Namespace) -> None:
    profiler = cProfile.Profile()
    node = LEADER if args.profile_node == "leader" else LEADER + 1
    result = run_once(batch, args.seconds, 0.3, args, profiler, node)
    total = pstats.Stats(profiler).total_tt
    print(
        f"batch {batch}: {result['entries']} entries; {args.profile_node} (node {node}) under cProfile: "
        f"{total * 1e6 / max(1, result['entries']):.1f} us/entry (inflated by the profiler)"
    )
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(args.top)
        print(f"\n--- by {order} ---")
        print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per round (default 2)")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per round (default 0.5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per batch size (default 3)")
    parser.add_argument("--batches", default="1,16,64", help="client counts = entries per Ready (1,16,64)")
    parser.add_argument("--storage", choices=("disk", "memory"), default="disk")
    parser.add_argument("--payload", type=int, default=160, help="command size in bytes (default 160)")
    parser.add_argument("--no-cbor", action="store_true", help="leave CBOR out of the transport")
    parser.add_argument("--profile", type=int, metavar="BATCH", help="cProfile one run of this batch size")
    parser.add_argument(
        "--profile-node",
        choices=("leader", "follower"),
        default="leader",
        help="whose calls --profile covers",
    )
    parser.add_argument("--top", type=int, default=30, help="functions to print with --profile")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, args)
        return 0
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    print(
        f"raft layer CPU per committed entry: 3 nodes in one process, storage={args.storage} (no fsync), "
        f"cbor={'off' if args.no_cbor else 'on'}, payload {args.payload} B; "
        f"median of {args.rounds} x {args.seconds:g} s"
    )
    print(
        f"{'batch':>5} | {'leader us':>9} {'follower us':>11} | {'entries/s':>9} "
        f"{'msgs/entry':>10} {'entries/sync':>12} | per round (leader us)"
    )
    for batch in batches:
        runs = [run_once(batch, args.seconds, args.warmup, args) for _ in range(args.rounds)]

        def med(key: str, rs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[key] for r in rs)

        per_round = " ".join(f"{r['leader_us']:.1f}" for r in runs)
        errors = sum(r["errors"] for r in runs)
        print(
            f"{batch:>5} | {med('leader_us'):>9.1f} {med('follower_us'):>11.1f} | "
            f"{med('entries_per_s'):>9.0f} {med('msgs_per_entry'):>10.2f} {med('entries_per_sync'):>12.1f} | "
            f"{per_round}" + (f"  ({errors} errors)" if errors else "")
        )
        sent = runs[-1]["sent"]
        print(f"{'':>5}   leader sent (last round): {', '.join(f'{t} {n}' for t, n in sorted(sent.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
