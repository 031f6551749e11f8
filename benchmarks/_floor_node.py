"""One node of the floor group, for benchmarks/floor.py: the message pattern of
a replicated write with nothing else in it.

    python benchmarks/_floor_node.py --index I --fronts A0,A1,A2 --peers P0,P1,P2
        --dir DIR [--fsync]

Node 0 leads, always. It takes ``updatefile`` calls in SurfShard's native
protocol (so the very same load generator drives it), and for every read
from a client connection:

1. splits the frames and decodes them all in one ``cbor2.loads`` call (the
   least any server must do to know what it was asked);
2. sends the raw request bytes, as one numbered batch, to both followers
   (one ``send`` each, straight to the socket);
3. appends the batch to its own log file (``os.write``; with ``--fsync``
   also ``os.fdatasync``), after the sends, so its write overlaps theirs;
4. answers every request of the batch ``ok: version`` once one follower has
   acknowledged it (a majority of three with the leader), one write per
   client connection.

A follower appends each batch it receives the same way (one write and one
sync for everything one read brought) and acknowledges the highest batch
number. The log files are preallocated, as SurfShard's WAL is.

There is no election, no term, no state machine, no validation of
arguments, no exactly-once table, no change feed, no Deferred: only the
hops, the codec and the disk a replicated write cannot do without. What it
reaches on a machine is the ceiling for any Raft on this stack (Python,
Twisted, CBOR frames) on that machine. Each node also answers ``status``
(as SurfShard does, for the benchmark's harness) and a follower answers
``updatefile`` with NOT_LEADER naming node 0.

This is a benchmark helper, not product code: stopped with a signal.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections import deque
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cbor2
from twisted.internet import protocol, reactor

from surfshard.net.server import write_now
from surfshard.net.wire import encode_reply

_PREFIX = struct.Struct(">I")
_BATCH = struct.Struct(">IQ")  # length of what follows, batch number
_ACK = struct.Struct(">Q")
PREALLOCATE = 256 * 1024 * 1024
MAX_FRAME = 16 * 1024 * 1024


def _array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 | n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    return b"\x9a" + n.to_bytes(4, "big")


class Log:
    """An append-only, preallocated file; ``sync`` makes it durable."""

    def __init__(self, path: str, fsync: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(self.fd, 0, PREALLOCATE)
        self.offset = 0
        self.fsync = fsync

    def append(self, data: bytes) -> None:
        self.offset += os.pwrite(self.fd, data, self.offset)
        if self.fsync:
            os.fdatasync(self.fd)


class Node:
    def __init__(self, index: int, fronts: list[str], log: Log) -> None:
        self.index = index
        self.fronts = fronts
        self.log = log
        self.committed = 0
        self.next_batch = 1
        #: (batch number, [(connection, reply frame), ...]) not yet acknowledged.
        self.pending: deque[tuple[int, list[tuple[Front, bytes]]]] = deque()
        self.followers: list[Any] = []  # transports to the followers, once connected

    def status(self) -> dict[str, Any]:
        return {
            "role": "leader" if self.index == 0 else "follower",
            "leader_address": self.fronts[0],
            "term": 1,
            "commit": self.committed,
            "applied": self.committed,
            "peers_connected": 2 if self.index != 0 or len(self.followers) == 2 else len(self.followers),
        }

    def propose(self, body: bytes, replies: list[tuple[Front, bytes]]) -> None:
        number = self.next_batch
        self.next_batch += 1
        batch = _BATCH.pack(len(body) + 8, number) + body
        for transport in self.followers:
            write_now(transport, batch)
        self.pending.append((number, replies))
        self.log.append(batch)

    def acked(self, number: int) -> None:
        if number <= self.committed:
            return
        self.committed = number
        out: dict[Front, list[bytes]] = {}
        pending = self.pending
        while pending and pending[0][0] <= number:
            for conn, frame in pending.popleft()[1]:
                out.setdefault(conn, []).append(frame)
        for conn, frames in out.items():
            if conn.transport is not None and conn.transport.connected:
                write_now(conn.transport, b"".join(frames))


class Front(protocol.Protocol):
    """A client connection (native protocol)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buf = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        payloads: list[bytes] = []
        while end - pos >= 4:
            (size,) = _PREFIX.unpack_from(buf, pos)
            if size > MAX_FRAME:
                self.transport.loseConnection()
                return
            if end - pos - 4 < size:
                break
            payloads.append(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
        self.buf = buf[pos:]
        if not payloads:
            return
        try:
            requests = cbor2.loads(_array_head(len(payloads)) + b"".join(payloads))
        except (cbor2.CBORDecodeError, ValueError, RecursionError):
            self.transport.loseConnection()
            return
        node = self.node
        replies: list[tuple[Front, bytes]] = []
        immediate: list[bytes] = []
        for request in requests:
            args = request.get("args") if type(request) is dict else None
            if type(args) is not dict:
                error = {"code": "BAD_REQUEST", "message": "a request is a map with an args map"}
                immediate.append(_frame({"id": None, "error": error}))
                continue
            rid, method = request.get("id"), request.get("method")
            if method == "updatefile" and node.index == 0 and type(args.get("version")) is int:
                replies.append((self, encode_reply(rid, args["version"])))
            elif method == "updatefile" and node.index == 0:
                error = {"code": "BAD_REQUEST", "message": "version must be an integer"}
                immediate.append(_frame({"id": rid, "error": error}))
            elif method == "updatefile":
                error = {"code": "NOT_LEADER", "message": "not the leader", "leader": node.fronts[0]}
                immediate.append(_frame({"id": rid, "error": error}))
            elif method == "status":
                immediate.append(encode_reply(rid, node.status()))
            else:
                immediate.append(
                    _frame({"id": rid, "error": {"code": "UNKNOWN_METHOD", "message": str(method)}})
                )
        if immediate:
            write_now(self.transport, b"".join(immediate))
        if replies:
            node.propose(buf[:pos], replies)


def _frame(message: dict[str, Any]) -> bytes:
    payload = cbor2.dumps(message)
    return _PREFIX.pack(len(payload)) + payload


class Replication(protocol.Protocol):
    """Follower side of the leader's link: append each batch, acknowledge."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buf = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end, last = 0, len(buf), 0
        while end - pos >= 12:
            size, number = _BATCH.unpack_from(buf, pos)
            if not 8 <= size <= MAX_FRAME:
                self.transport.loseConnection()
                return
            if end - pos - 4 < size:
                break
            pos += 4 + size
            last = number
        self.buf = buf[pos:]
        if last:
            self.node.log.append(buf[:pos])
            self.node.committed = last
            write_now(self.transport, _ACK.pack(last))


class Acks(protocol.Protocol):
    """Leader side of a link to a follower: read its acknowledgements."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.buf = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.node.followers.append(self.transport)

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data
        whole = len(buf) - len(buf) % 8
        self.buf = buf[whole:]
        if whole:
            (number,) = _ACK.unpack_from(buf, whole - 8)
            self.node.acked(number)


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--fronts", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args(argv)
    fronts, peers = args.fronts.split(","), args.peers.split(",")
    os.makedirs(args.dir, exist_ok=True)
    node = Node(args.index, fronts, Log(os.path.join(args.dir, "log"), args.fsync))

    host, port = _host_port(fronts[args.index])
    reactor.listenTCP(port, _Factory(lambda: Front(node)), interface=host)
    if args.index == 0:
        for peer in peers[1:]:
            host, port = _host_port(peer)
            _connect(host, port, node)
    else:
        host, port = _host_port(peers[args.index])
        reactor.listenTCP(port, _Factory(lambda: Replication(node)), interface=host)
    print(f"floor node {args.index} serving on {fronts[args.index]}", flush=True)
    reactor.run()
    return 0


class _Factory(protocol.Factory):
    def __init__(self, make: Any) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.make()


def _connect(host: str, port: int, node: Node) -> None:
    """Dial a follower, again every 50 ms until it answers."""

    class Dialer(protocol.ClientFactory):
        def buildProtocol(self, addr: Any) -> protocol.Protocol:
            return Acks(node)

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            reactor.callLater(0.05, connector.connect)

    reactor.connectTCP(host, port, Dialer())


if __name__ == "__main__":
    sys.exit(main())
