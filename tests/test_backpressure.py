"""Write-side backpressure in the native server (issue 18): a peer that
pipelines requests and does not read the replies makes the server stop
reading, so the excess waits in the kernel's socket buffers instead of the
node's memory; the server reads again once the peer catches up, and drops a
peer that reads nothing for too long."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from surfshard import errors
from surfshard.net import wire
from surfshard.net.methods import MethodTable
from surfshard.net.pool import MAX_UNSENT_BYTES, RpcConnection
from surfshard.net.port import NodeRoot, make_site
from surfshard.net.schema import Arg
from surfshard.net.server import FLUSH_BYTES, RpcServerFactory, RpcServerProtocol, ServerLimits

REPLY = b"x" * 64 * 1024


def table(calls: list[int]) -> MethodTable:
    t = MethodTable("bp")

    def big(n: int) -> bytes:
        calls.append(n)
        return REPLY

    t.add("big", big, [Arg("n", int)])
    return t


def requests(first: int, count: int) -> bytes:
    return b"".join(wire.encode_request(i, "big", {"n": i}) for i in range(first, first + count))


class BufferedTransport(StringTransport):
    """A transport that, like Twisted's TCP transport, pauses its producer
    once more than ``limit`` bytes are waiting to be sent (``drain`` plays
    the peer reading them)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.writes = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        if self.producer is not None and len(self.value()) > self.limit:
            self.producer.pauseProducing()

    def drain(self) -> int:
        taken = len(self.value())
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return taken


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.calls: list[int] = []
        self.clock = Clock()
        self.proto = RpcServerProtocol(
            table(self.calls), self.clock, ServerLimits(stalled_reader_timeout=60.0)
        )
        self.transport = BufferedTransport(limit=256 * 1024)
        self.proto.makeConnection(self.transport)

    def test_registers_as_the_transports_producer(self) -> None:
        self.assertIs(self.transport.producer, self.proto)
        self.assertTrue(self.transport.streaming)

    def test_one_read_of_many_small_requests_does_not_queue_all_their_replies(self) -> None:
        """1,000 requests in one read would ask for 64 MB of replies: the
        corked replies are written every FLUSH_BYTES, the transport pushes
        back, and the rest of the read waits unanswered."""
        self.proto.dataReceived(requests(1, 1000))
        self.assertTrue(self.proto.write_blocked)
        self.assertEqual(self.transport.producerState, "paused")  # we stopped reading
        self.assertLess(len(self.transport.value()), self.transport.limit + FLUSH_BYTES + len(REPLY) + 1024)
        self.assertLess(len(self.calls), 20)
        # The peer reads: the held requests are answered, in bounded steps.
        answered = 0
        for _ in range(2000):  # bounded: each drain answers a few
            answered += self.transport.drain()
            if not self.proto.write_blocked and len(self.calls) == 1000:
                break
        self.assertEqual(len(self.calls), 1000)
        self.assertEqual(self.transport.producerState, "producing")  # reading again
        self.assertGreater(answered + len(self.transport.value()), 1000 * len(REPLY))

    def test_a_peer_that_reads_nothing_is_dropped_after_the_timeout(self) -> None:
        self.proto.dataReceived(requests(1, 50))
        self.assertTrue(self.proto.write_blocked)
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_a_peer_that_reads_in_time_is_kept(self) -> None:
        self.proto.dataReceived(requests(1, 5))  # 5 replies: one more than the buffer takes
        self.assertTrue(self.proto.write_blocked)
        self.clock.advance(30)
        self.transport.drain()
        self.clock.advance(60)
        self.assertFalse(self.transport.disconnecting)


class LoopbackTests(TestCase):
    """Over a real socket: a client that pipelines requests with 64 KiB
    replies and never reads them."""

    def setUp(self) -> None:
        self.calls: list[int] = []
        self.factory = RpcServerFactory(table(self.calls), reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def test_unread_replies_stay_bounded_and_flow_once_read(self) -> Any:
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        count = 3000  # 190 MB of replies if they were all queued
        data = requests(1, count)
        sent = 0
        for _ in range(2000):  # bounded: stops when the server stops reading
            try:
                sent += sock.send(data[sent : sent + 65536])
            except BlockingIOError:
                yield deferLater(reactor, 0.01, lambda: None)
                if self.factory.connections and next(iter(self.factory.connections)).write_blocked:
                    break
            if sent >= len(data):
                break
        for _ in range(300):  # poll with a deadline (3 s)
            if self.factory.connections and next(iter(self.factory.connections)).write_blocked:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        (server,) = self.factory.connections
        self.assertTrue(server.write_blocked)
        queued = server.buffered_bytes()  # what the node's memory budget counts, from the TCP transport
        self.assertGreater(queued, 0)
        self.assertLess(queued, 8 * 1024 * 1024, "replies piled up in the server's memory")
        self.assertLess(len(self.calls), count)
        # Now read everything: the server answers every request it gets.
        got = 0
        sock.setblocking(False)
        for _ in range(6000):  # bounded: 60 s at most
            try:
                chunk = sock.recv(1 << 20)
                got += len(chunk)
            except BlockingIOError:
                yield deferLater(reactor, 0.01, lambda: None)
            if sent < len(data):
                try:
                    sent += sock.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
            if got >= count * len(REPLY):
                break
        self.assertEqual(len(self.calls), count)
        self.assertGreaterEqual(got, count * len(REPLY))


class HttpBodyLimitTests(TestCase):
    """HTTP request bodies are bounded whatever their framing (issue 18)."""

    LIMIT = 1024 * 1024

    def setUp(self) -> None:
        root = NodeRoot()
        root.add("RPC2", _Echo())
        self.port = reactor.listenTCP(
            0, make_site(root, clock=reactor, max_body=self.LIMIT), interface="127.0.0.1"
        )
        self.addCleanup(self.port.stopListening)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        return sock

    @inlineCallbacks
    def pump(self, sock: socket.socket, body_chunks: Any, limit_bytes: int) -> Any:
        """Send chunks until the server closes; (bytes sent, reply)."""
        sent, reply, closed = 0, b"", False
        pending = b""
        for _ in range(5000):  # bounded: 50 s at most
            try:
                data = sock.recv(65536)
                if not data:
                    closed = True
                reply += data
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed = True
            if closed:
                break
            if not pending and sent < limit_bytes:
                pending = next(body_chunks, b"")
            if pending:
                try:
                    n = sock.send(pending)
                    sent += n
                    pending = pending[n:]
                except BlockingIOError:
                    yield deferLater(reactor, 0.01, lambda: None)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
            else:
                yield deferLater(reactor, 0.01, lambda: None)
        self.closed = closed
        return sent, reply

    @inlineCallbacks
    def test_a_chunked_body_past_the_limit_gets_413_without_being_buffered(self) -> Any:
        sock = self.connect()
        sock.send(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: text/xml\r\n\r\n"
        )
        piece = b"x" * 65536
        chunks = iter([b"%x\r\n%s\r\n" % (len(piece), piece)] * 3200)  # 200 MiB, chunked
        sent, reply = yield self.pump(sock, chunks, 200 * 1024 * 1024)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply[:100])
        # What was sent past the limit sat in kernel buffers, not in the node.
        self.assertLess(sent, self.LIMIT + 16 * 1024 * 1024)

    @inlineCallbacks
    def test_a_declared_length_past_the_limit_is_refused_before_the_body(self) -> Any:
        sock = self.connect()
        sock.send(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (200 * 1024 * 1024))
        sent, reply = yield self.pump(sock, iter([]), 0)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413"), reply[:100])

    @inlineCallbacks
    def test_request_line_and_headers_are_bounded(self) -> Any:
        # Twisted's HTTPChannel bounds them (16 KiB a line, 16 KiB of
        # headers): past that the connection gets a 400 and is closed.
        for head in (
            b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n",
            b"POST /RPC2 HTTP/1.1\r\n"
            + b"X-Pad: "
            + b"b" * 8000
            + b"\r\n"
            + b"X-Pad2: "
            + b"c" * 9000
            + b"\r\n",
        ):
            sock = self.connect()
            sent, reply = yield self.pump(sock, iter([head, b"\r\n"]), len(head) + 2)
            # Refused and closed (the 400 may be lost to the reset of a
            # socket closed with our bytes unread).
            self.assertTrue(self.closed, "the connection was kept open")
            self.assertTrue(reply.startswith(b"HTTP/1.1 400") or not reply, reply[:80])

    @inlineCallbacks
    def test_a_body_within_the_limit_is_served(self) -> Any:
        sock = self.connect()
        body = b"y" * 1000
        sock.send(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n" + body
        )
        sent, reply = yield self.pump(sock, iter([]), 0)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:100])
        self.assertTrue(reply.endswith(b"1000"), reply[-50:])


class _Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        return str(len(request.content.read())).encode()


class ClientSideTests(SynchronousTestCase):
    """The client connection (and Raft's peer traffic over it) when the peer
    does not read what we send."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.connection = RpcConnection(self.clock)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def test_registers_as_the_transports_producer(self) -> None:
        self.assertIs(self.transport.producer, self.connection)

    def test_one_way_requests_are_dropped_while_the_peer_does_not_read(self) -> None:
        self.assertTrue(self.connection.notify("raft", {"m": 1}))
        self.connection.pauseProducing()
        written = len(self.transport.value())
        self.assertFalse(self.connection.notify("raft", {"m": 2}))
        self.assertEqual(len(self.transport.value()), written)
        self.assertEqual(self.connection.dropped_notifications, 1)
        self.connection.resumeProducing()
        self.assertTrue(self.connection.notify("raft", {"m": 3}))

    def test_calls_past_the_unsent_budget_fail_fast(self) -> None:
        self.connection.pauseProducing()
        big = {"blob": b"z" * (4 * 1024 * 1024)}
        results = [self.connection.call("put", big, timeout=10) for _ in range(10)]
        failed = [d for d in results if d.called]
        self.assertTrue(failed, "every call was queued while the peer read nothing")
        self.assertLessEqual(len(self.transport.value()), MAX_UNSENT_BYTES + 5 * 1024 * 1024)
        for d in failed:
            self.failureResultOf(d, errors.Unavailable)
        for d in results:
            if not d.called:
                d.cancel()
                self.failureResultOf(d)
        self.connection.resumeProducing()
        d = self.connection.call("put", big, timeout=10)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)


class TcpLikeTransport(StringTransport):
    """Keeps what it was given to send where Twisted's TCP transport does
    (``dataBuffer``, ``_tempDataLen``), which is what the budget counts."""

    _tempDataLen = 0

    @property
    def dataBuffer(self) -> bytes:
        return self.value()


class MemoryBudgetTests(SynchronousTestCase):
    """A node-wide budget over the bytes its connections hold: past it, new
    work is answered BUSY (retryable) while Raft and health checks go on."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.calls: list[int] = []
        t = table(self.calls)
        t.add("raft", lambda: True, essential=True)
        self.factory = RpcServerFactory(t, self.clock, ServerLimits(memory_budget=1024 * 1024))
        self.factory.startFactory()
        self.addCleanup(self.factory.stopFactory)
        self.hog = self.factory.buildProtocol(None)
        self.hog_transport = TcpLikeTransport()
        self.hog.makeConnection(self.hog_transport)
        self.other = self.factory.buildProtocol(None)
        self.other_transport = StringTransport()
        self.other.makeConnection(self.other_transport)

    def call(self, method: str, args: dict[str, Any]) -> dict[Any, Any]:
        self.other_transport.clear()
        self.other.dataReceived(wire.encode_request(77, method, args))
        return wire.decode_payload(self.other_transport.value()[wire.LENGTH_PREFIX_BYTES :])

    def test_new_work_is_shed_while_buffers_pass_the_budget(self) -> None:
        self.hog.dataReceived(requests(1, 20))  # 1.3 MB of replies the peer never takes
        self.assertGreater(self.hog.buffered_bytes(), 1024 * 1024)
        self.clock.advance(0.1)
        self.assertTrue(self.factory.shedding)
        answer = self.call("big", {"n": 0})
        self.assertEqual(answer["error"]["code"], "BUSY")
        self.assertIsInstance(errors.error_from_wire(answer["error"]), errors.Busy)
        self.assertEqual(self.call("raft", {}), {"id": 77, "ok": True})  # essential: served
        # The peer takes its replies: the node serves again.
        self.hog_transport.clear()
        self.clock.advance(0.1)
        self.assertFalse(self.factory.shedding)
        self.assertIn("ok", self.call("big", {"n": 1}))

    def test_busy_is_retried_by_the_leader_caller(self) -> None:
        from surfshard.replica.leader_caller import RETRYABLE

        self.assertIn(errors.Busy, RETRYABLE)

    def test_other_buffers_count_towards_the_budget(self) -> None:
        # A Raft snapshot arriving in chunks, an HTTP body being read: held
        # outside the native connections, counted all the same.
        held = [0]
        self.factory.add_buffer_source(lambda: held[0])
        self.clock.advance(0.1)
        self.assertFalse(self.factory.shedding)
        held[0] = 2 * 1024 * 1024
        self.clock.advance(0.1)
        self.assertTrue(self.factory.shedding)
        self.assertEqual(self.call("big", {"n": 0})["error"]["code"], "BUSY")
        held[0] = 0
        self.clock.advance(0.1)
        self.assertFalse(self.factory.shedding)


class _Slow(Resource):
    """Answers POSTs only when the test says so, to hold a read body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        self.waiting.append(request)
        return NOT_DONE_YET


class NodeLimitsLiveTests(TestCase):
    """The shared port's node-wide bounds, on 127.0.0.1: open connections
    (``max_connections``) and HTTP bodies counted in the memory budget."""

    LIMIT = 3

    def setUp(self) -> None:
        from surfshard.net.port import node_factory

        self.slow = _Slow()
        root = NodeRoot()
        root.add("slow", self.slow)
        self.rpc = RpcServerFactory(table([]), reactor, ServerLimits())
        self.site = make_site(root, clock=reactor)
        self.factory = node_factory(self.rpc, self.site, reactor, max_connections=self.LIMIT)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        return sock

    @inlineCallbacks
    def until(self, predicate: Any, what: str) -> Any:
        for _ in range(500):  # bounded: 5 s
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    @staticmethod
    def closed(sock: socket.socket) -> bool:
        try:
            return sock.recv(1) == b""
        except BlockingIOError:
            return False
        except ConnectionResetError:
            return True

    @inlineCallbacks
    def test_connections_past_the_limit_are_closed_and_the_node_still_serves(self) -> Any:
        held = [self.connect() for _ in range(self.LIMIT)]
        yield self.until(lambda: self.factory.open_connections == self.LIMIT, "three open connections")
        extra = self.connect()
        yield self.until(lambda: self.closed(extra), "the fourth connection to be closed")
        self.assertEqual(self.factory.refused_connections, 1)
        self.assertFalse(any(self.closed(s) for s in held))
        # One held connection is served; once one goes, a new one is taken.
        held[0].sendall(wire.encode_request(1, "big", {"n": 1}))
        got = bytearray()

        def replied() -> bool:
            try:
                got.extend(held[0].recv(1 << 20))
            except BlockingIOError:
                pass
            return len(got) >= len(REPLY)

        yield self.until(replied, "a reply on a held connection")
        held[1].close()
        yield self.until(lambda: self.factory.open_connections == self.LIMIT - 1, "a connection to close")
        fresh = self.connect()
        yield self.until(lambda: self.factory.open_connections == self.LIMIT, "the new connection")
        self.assertFalse(self.closed(fresh))

    @inlineCallbacks
    def test_an_http_body_being_handled_counts_towards_the_budget(self) -> Any:
        sock = self.connect()
        body = b"z" * 100_000
        sock.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        yield self.until(lambda: self.slow.waiting, "the request to arrive")
        self.rpc.account()
        self.assertGreaterEqual(self.rpc.buffered_bytes, len(body))
        request = self.slow.waiting.pop()
        request.write(b"done")
        request.finish()
        self.rpc.account()
        self.assertEqual(self.rpc.buffered_bytes, 0)


class BlockStoreUploadTests(HttpBodyLimitTests):
    """The block store's XML-RPC upload path (``surfstore.putblock`` at
    ``/RPC2``) under the same body bound, on a real BlockStoreService; the
    three tests of HttpBodyLimitTests run against it."""

    def setUp(self) -> None:
        from pathlib import Path

        from surfshard.blocks.store import BlockStoreService
        from surfshard.config import load_config

        directory = Path(self.mktemp())
        directory.mkdir()
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
        probe.close()
        (directory / "c.toml").write_text(
            f"""[cluster]
name = "bp"
shards = 1
data_dir = "data"
[groups.1]
nodes = ["127.0.0.1:1"]
[blockstores]
nodes = ["127.0.0.1:{free}"]
[limits]
max_http_body = {self.LIMIT}
""",
            encoding="utf-8",
        )
        self.service = BlockStoreService(load_config(directory / "c.toml"), 0, reactor, fsync=False)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.listening_port

    @inlineCallbacks
    def test_a_body_within_the_limit_is_served(self) -> Any:
        # A real putblock of 1,000 bytes, answered by the store.
        import xmlrpc.client

        body = xmlrpc.client.dumps((xmlrpc.client.Binary(b"q" * 1000),), "surfstore.putblock").encode()
        sock = self.connect()
        sock.send(
            b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        sent, reply = yield self.pump(sock, iter([]), 0)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:100])
        self.assertIn(b"<boolean>1</boolean>", reply)
