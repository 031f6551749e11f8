"""CPU per message on a follower's path, and per write on a leader's, in one
process, no network: the numbers the floor comparison
(``benchmarks/floor.py``) says to bring down, measured without four
processes sharing two cores.

    python3 dev.py bench message_path [--node follower|leader|client] [--messages 20000]
        [--entries 1,64] [--rounds 5] [--profile] [--phases] [--tree DIR] [--instructions]

A follower as the replica service builds it (``RaftNode`` over
``DiskStorage`` with fsync off, ``RpcRaftTransport``, the metadata state
machine) behind an ``RpcServerProtocol`` with the ``raft`` method, fed the
frames a leader sends: one AppendEntries per frame carrying ``--entries``
updates (1: one writer; 64: a 64-writer batch), each committing the one
before. Per frame the follower decodes it, validates it, steps Raft,
appends to its log (written, not synced), encodes and "sends" its
acknowledgement (encoded as the pool would, not written to a socket), and
applies the entry it learnt committed. Frames are made before the clock
starts: the leader's work is not counted.

``--node leader`` runs the other end: a leader (the metadata replica over
its ``RaftNode``, as the service builds it) takes ``--entries`` updatefile
calls in one read, proposes them as one entry at the end of the turn,
encodes its AppendEntries for both followers (not written to sockets),
writes its log, takes both followers' acknowledgements as frames, commits,
applies and writes the replies to the client's transport.

``--node client`` measures the other end of a write: MetadataClients (the
client library) over one pool connection, each with one updatefile in
flight; a turn is one read of replies, whose callbacks make the writers'
next calls.

Prints CPU µs per frame and per update (``time.process_time``, best of
``--rounds``) and, with ``--profile``, the functions that take it
(``MP_SORT=ncalls MP_TOP=200`` in the environment lists them by calls
instead, the count of Python calls a message costs). These
are figures for comparing two trees on one machine (``--tree DIR`` runs the
same measurement against the code of another checkout, a worktree of the
commit before a change say, interleaved), never assertions. With
``--instructions`` it counts instructions under valgrind's callgrind
instead of timing: repeatable to the instruction on a machine whose
timings move by a third, blind to cache misses and the kernel.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HASHLIST = [f"{i:064x}" for i in range(1, 5)]


ADDRESSES = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}


def raft_node(workdir: str, raft_id: int, machine: Any, clock: Any) -> tuple[Any, Any]:
    """Raft node ``raft_id`` of 1, 2, 3 as the replica service builds it
    (fsync off, no snapshots in the run), over an ``RpcRaftTransport`` whose
    pool only encodes what it is given (the sockets are not measured)."""
    from raft.node import RaftNode
    from raft.storage import DiskStorage
    from raft.types import RaftConfig
    from surfshard.net.pool import encode_notification
    from surfshard.replica.raft_transport import RpcRaftTransport

    class EncodingPool:
        def notify(self, address: str, method: str, args: Any) -> bool:
            encode_notification(method, args)
            return True

    # Older trees (for --tree) took the clock for a timed flush of their own.
    extra = {"clock": clock} if "clock" in inspect.signature(RpcRaftTransport).parameters else {}
    transport = RpcRaftTransport(EncodingPool(), raft_id, ADDRESSES, group="g", **extra)  # type: ignore[arg-type]
    node = RaftNode(
        RaftConfig(id=raft_id, peers=(1, 2, 3)),
        DiskStorage(workdir, fsync=False),
        transport,
        machine,
        clock,
        snapshot_entries=10**9,
    )
    node.startService()
    return node, transport


def server(table: Any, clock: Any) -> tuple[Any, Any]:
    """A native-protocol connection serving ``table``, and its transport."""
    from twisted.internet.testing import StringTransport

    from surfshard.net.server import RpcServerProtocol, ServerLimits

    transport = StringTransport()
    proto = RpcServerProtocol(table, clock, ServerLimits(idle_timeout=None))
    proto.makeConnection(transport)
    return proto, transport


def timed(run: Any, profile: bool) -> tuple[float, str]:
    """CPU seconds ``run()`` took, and its profile's top functions if asked."""
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    run()
    if profiler is not None:
        profiler.disable()
    spent = time.process_time() - started
    text = ""
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(os.environ.get("MP_SORT", "tottime")).print_stats(
            int(os.environ.get("MP_TOP", "25"))
        )
        text = out.getvalue()
    return spent, text


def build(workdir: str) -> tuple[Any, Any, Any]:
    """A follower (raft id 2 of 1, 2, 3) and the protocol a leader talks to."""
    from twisted.internet.task import Clock

    from surfshard.metadata.state import MetadataStateMachine
    from surfshard.net.methods import MethodTable
    from surfshard.replica.raft_transport import RpcRaftTransport

    clock = Clock()
    node, transport = raft_node(workdir, 2, MetadataStateMachine(1), clock)
    table = MethodTable(service="bench")
    table.add("raft", transport.deliver_from, RpcRaftTransport.method_args(), pass_context=True)
    proto, _ = server(table, clock)
    return node, proto, clock


def frames(count: int, entries: int) -> list[bytes]:
    from raft.types import Entry, Message, MessageType
    from surfshard.metadata.state import encode_batch, encode_update
    from surfshard.net.pool import encode_notification

    out = []
    index = 0
    for i in range(count):
        updates = [encode_update(f"f{i}-{k}", 1, HASHLIST, f"c{k}", i + 1) for k in range(entries)]
        data = updates[0] if entries == 1 else encode_batch(updates)
        message = Message(
            type=MessageType.APPEND,
            to=2,
            frm=1,
            term=1,
            log_term=1 if index else 0,
            index=index,
            entries=[Entry(1, index + 1, data)],
            commit=index,
        )
        index += 1
        out.append(encode_notification("raft", {"group": "g", "msgs": [message.to_wire()]}))
    return out


def measure(count: int, entries: int, profile: bool) -> tuple[float, str]:
    workdir = tempfile.mkdtemp(prefix="message-path-")
    try:
        node, proto, clock = build(workdir)
        made = frames(count, entries)
        warm = made[: count // 10]
        for frame in warm:
            proto.dataReceived(frame)
            clock.advance(0)
        rest = made[len(warm) :]

        def run() -> None:
            for frame in rest:
                proto.dataReceived(frame)
                clock.advance(0)

        spent, text = timed(run, profile)
        applied = node.status()["applied"]
        node.stopService()
        if applied < count - 1:
            raise RuntimeError(f"the follower applied {applied} of {count} entries: the bench is broken")
        return spent / len(rest) * 1e6, text
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure_leader(count: int, writers: int, profile: bool, phases: bool = False) -> tuple[float, str]:
    """CPU per write on a leader (raft id 1) serving ``writers`` updatefile
    calls a turn: their frames arrive in one read, the turn proposes them
    (one Raft entry), the AppendEntries are encoded for both followers, and
    both followers' acknowledgements come in; the commit, apply and the
    replies (written to the client's transport) follow. With ``phases``,
    the text says how a turn splits between its three reads (a clock read
    around each: a few tenths of a µs more in all)."""
    from twisted.internet.task import Clock

    from raft.types import Message, MessageType
    from surfshard.metadata.replica import MetadataReplica
    from surfshard.metadata.service import metadata_methods
    from surfshard.metadata.state import MetadataStateMachine
    from surfshard.net.pool import encode_notification
    from surfshard.net.wire import encode_request
    from surfshard.replica.raft_transport import RpcRaftTransport

    workdir = tempfile.mkdtemp(prefix="message-path-")
    try:
        clock = Clock()
        machine = MetadataStateMachine(1)
        node, transport = raft_node(workdir, 1, machine, clock)
        replica = MetadataReplica(node, machine, ADDRESSES, clock)
        table = metadata_methods(replica)
        table.add("raft", transport.deliver_from, RpcRaftTransport.method_args(), pass_context=True)
        client_proto, client = server(table, clock)
        peer_proto, _ = server(table, clock)
        # Elected with node 2's votes (bounded: a pre-vote, then a vote).
        node.campaign()
        clock.advance(0)
        # A pre-vote is asked for the next term; the vote, once a candidate, in it.
        for kind, ahead in ((MessageType.PRE_VOTE_RESP, 1), (MessageType.VOTE_RESP, 0)):
            if not node.is_leader:
                node._on_message(Message(type=kind, to=1, frm=2, term=node.core.term + ahead))
                clock.advance(0)
        if not node.is_leader:
            raise RuntimeError("the bench's leader was not elected")
        term, base = node.core.term, node.core.last_index

        def ack(frm: int, index: int) -> bytes:
            message = Message(type=MessageType.APPEND_RESP, to=1, frm=frm, term=term, index=index)
            return encode_notification("raft", {"group": "g", "msgs": [message.to_wire()]})

        peer_proto.dataReceived(ack(2, base) + ack(3, base))
        clock.advance(0)
        turns = []
        for i in range(count):
            calls = b"".join(
                encode_request(
                    w + 1,
                    "updatefile",
                    {
                        "name": f"f{i}-{w}",
                        "version": 1,
                        "hashlist": HASHLIST,
                        "client_id": f"c{w}",
                        "seq": i + 1,
                    },
                )
                for w in range(writers)
            )
            turns.append((calls, ack(2, base + i + 1), ack(3, base + i + 1)))
        warm = max(1, count // 10)

        def run(part: list[tuple[bytes, bytes, bytes]]) -> None:
            for calls, first, second in part:
                client_proto.dataReceived(calls)
                clock.advance(0)
                peer_proto.dataReceived(first)
                clock.advance(0)
                peer_proto.dataReceived(second)
                clock.advance(0)
                client.clear()

        split = [0.0, 0.0, 0.0]

        def run_split(part: list[tuple[bytes, bytes, bytes]]) -> None:
            now = time.process_time
            for calls, first, second in part:
                t0 = now()
                client_proto.dataReceived(calls)
                clock.advance(0)
                t1 = now()
                peer_proto.dataReceived(first)
                clock.advance(0)
                t2 = now()
                peer_proto.dataReceived(second)
                clock.advance(0)
                t3 = now()
                client.clear()
                split[0] += t1 - t0
                split[1] += t2 - t1
                split[2] += t3 - t2

        run(turns[:warm])
        spent, text = timed(lambda: (run_split if phases else run)(turns[warm:]), profile)
        if phases:
            a, b, c = (x / (count - warm) * 1e6 for x in split)
            text += (
                f"per turn: the request's read {a:.1f} us (decode, checks, proposal, both AppendEntries, "
                f"the log write), the first acknowledgement {b:.1f} us (commit, apply, replies), "
                f"the second {c:.1f} us\n"
            )
        if node.status()["applied"] < base + count:
            raise RuntimeError("the leader did not apply every write: the bench is broken")
        node.stopService()
        return spent / ((count - warm) * writers) * 1e6, text
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure_client(count: int, writers: int, profile: bool) -> tuple[float, str]:
    """CPU per write on a client (the load generator's path, its own
    bookkeeping left out): ``writers`` MetadataClients over one
    RpcClientPool connection, each with one updatefile in flight. A turn is
    one read holding a reply to every writer; each writer's callback makes
    its next call, and the turn's calls go out in one write."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from client.metadata_client import MetadataClient
    from surfshard.net.pool import RpcClientPool, RpcConnection, _Peer
    from surfshard.net.wire import encode_reply

    clock = Clock()
    address = ADDRESSES[1]
    pool = RpcClientPool(clock)
    connection = RpcConnection(clock)
    transport = StringTransport()
    connection.makeConnection(transport)
    # The pool's own connect goes through the reactor's TCP endpoints; the
    # measured path starts once a connection is up, so hand it one directly
    # (as tests/test_rpc_fastpath.py reaches its peers).
    peer = pool._peers[address] = _Peer(address)
    peer.connection = connection

    class Writer:
        def __init__(self, index: int) -> None:
            self.client = MetadataClient(pool, [address], clock, client_id=f"c{index}", timeout=10.0)
            self.client.caller.leader = address
            self.name = f"w{index}/f"
            self.version = 0

        def next(self) -> None:
            self.client.updatefile(self.name, self.version + 1, HASHLIST).addCallback(self.ok)

        def ok(self, version: int) -> None:
            self.version = version
            self.next()

    team = [Writer(w) for w in range(writers)]
    for writer in team:
        writer.next()
    transport.clear()
    # Call ids go 1, 2, ... in the order the calls are made: turn t answers
    # the ids of turn t - 1's calls, in the same order.
    turns = [b"".join(encode_reply(t * writers + w + 1, t + 1) for w in range(writers)) for t in range(count)]
    warm = max(1, count // 10)

    def run(part: list[bytes]) -> None:
        for replies in part:
            connection.dataReceived(replies)
            transport.clear()

    run(turns[:warm])
    spent, text = timed(lambda: run(turns[warm:]), profile)
    if any(writer.version != count for writer in team):
        raise RuntimeError("a writer missed a reply: the bench is broken")
    return spent / ((count - warm) * writers) * 1e6, text


def count_instructions(trees: dict[str, str], levels: list[int], messages: int, node: str) -> int:
    """Instructions per message (per turn for a leader or client), counted
    by callgrind: the same process run for ``messages`` and for twice as
    many, the difference divided by the extra messages, so start-up and
    set-up cancel out. The count does not see cache misses or the kernel,
    but it repeats to the instruction whatever else the machine runs."""
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian's valgrind): nothing counted")
        return 1
    print(f"{node}: instructions per message (callgrind, {messages} and {2 * messages} messages):")
    counts: dict[tuple[str, int], float] = {}
    for entries in levels:
        for name, path in trees.items():
            totals = []
            for n in (messages, 2 * messages):
                argv1 = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
                argv1 += [sys.executable, str(Path(__file__).resolve()), "--one", str(entries)]
                argv1 += ["--count", str(n), "--node", node]
                done = subprocess.run(argv1, cwd=path, capture_output=True, text=True, check=True)
                refs = [line for line in done.stderr.splitlines() if "I   refs:" in line or "I refs:" in line]
                if not refs:
                    raise RuntimeError(f"callgrind printed no instruction count:\n{done.stderr[-2000:]}")
                totals.append(int(refs[-1].rsplit(":", 1)[1].replace(",", "").strip()))
            per = (totals[1] - totals[0]) / messages
            counts[(name, entries)] = per
            print(
                f"  {name:<10} {entries:>3} update(s) per message: {per:12,.0f} per message, {per / entries:10,.0f} per update"
            )
        if len(trees) == 2:
            a, b = (counts[(n, entries)] for n in trees)
            print(f"  this tree / --tree: {a / b:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--entries", default="1,64", help="updates per AppendEntries (default 1,64)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="leader: split a turn between its three reads (request, each ack)",
    )
    parser.add_argument("--tree", help="also run another checkout (a worktree), interleaved")
    parser.add_argument(
        "--node",
        choices=("follower", "leader", "client"),
        default="follower",
        help="whose path (leader, client: CPU per write with --entries writers a turn)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions under valgrind's callgrind instead of timing (repeatable on a noisy machine)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # internal: exact message count
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.entries.split(",")]
    if args.one:
        # The code measured is the working directory's (this tree, or --tree).
        sys.path.insert(0, os.getcwd())
        entries = int(args.one)
        count = args.count or (args.messages if entries == 1 else max(200, args.messages // entries))
        if args.node in ("leader", "client"):
            if args.node == "leader":
                per_write, text = measure_leader(count, entries, args.profile, args.phases)
            else:
                per_write, text = measure_client(count, entries, args.profile)
            us = per_write * entries  # per turn, as the follower's figure is per message
        else:
            us, text = measure(count, entries, args.profile)
        print(f"{us:.3f}")
        if text:
            print(text, file=sys.stderr)
        return 0
    trees = {"this tree": str(ROOT)}
    if args.tree:
        trees["--tree"] = str(Path(args.tree).resolve())
    if args.instructions:
        return count_instructions(trees, levels, args.messages, args.node)
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.rounds):
        for name, path in trees.items():
            for entries in levels:
                argv1 = [sys.executable, str(Path(__file__).resolve())]
                argv1 += ["--one", str(entries), "--messages", str(args.messages), "--node", args.node]
                if args.profile:
                    argv1.append("--profile")
                if args.phases:
                    argv1.append("--phases")
                done = subprocess.run(argv1, cwd=path, capture_output=True, text=True, check=True)
                us = float(done.stdout.strip())
                key = (name, entries)
                best[key] = min(best.get(key, us), us)
                if (args.profile or args.phases) and done.stderr:
                    print(f"--- {name}, {entries} update(s) per AppendEntries\n{done.stderr}")
    what = "follower CPU per AppendEntries" if args.node == "follower" else f"{args.node} CPU per turn"
    print(f"{what} (best of {args.rounds} rounds), process_time:")
    for entries in levels:
        for name in trees:
            us = best[(name, entries)]
            print(
                f"  {name:<10} {entries:>3} update(s) per message: {us:8.1f} us per message, {us / entries:7.2f} us per update"
            )
        if len(trees) == 2:
            a, b = (best[(n, entries)] for n in trees)
            print(f"  this tree / --tree: {a / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
