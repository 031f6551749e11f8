"""Tests for surfshard.net.port: one port serving the native protocol and HTTP,
told apart by the first bytes; the live bad-input tests of test_rpc run
again through the shared port."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from surfshard.net.pool import RpcClientPool
from surfshard.net.port import (
    HTTP_METHODS,
    NodePortFactory,
    NodeRoot,
    classify_first_bytes,
    listen,
    make_site,
    node_factory,
)
from surfshard.net.server import RpcServerFactory, RpcServerProtocol, ServerLimits
from surfshard.net.wire import FrameDecoder
from tests import test_rpc
from tests.test_rpc import LiveServer, Waits, capture_logs, make_table, request, wait_for

PEER = IPv4Address("TCP", "127.0.0.1", 5151)


class ClassifyTests(SynchronousTestCase):
    def test_http_methods(self):
        for method in HTTP_METHODS:
            self.assertEqual(classify_first_bytes(method + b" /x HTTP/1.1\r\n"), "http", method)
            # Too short to tell yet: every prefix of "METHOD ".
            for cut in range(len(method) + 1):
                self.assertIsNone(classify_first_bytes(method[:cut]), method[:cut])

    def test_native_frames(self):
        self.assertEqual(classify_first_bytes(b"\x00"), "native")
        self.assertEqual(classify_first_bytes(request(1, "echo")[:4]), "native")
        self.assertEqual(classify_first_bytes(b"\xff\xff\xff\xff"), "native")

    def test_near_misses_are_not_http(self):
        for head in (b"GET/", b"get ", b"GETS ", b"POSTX", b"OPTIONSS", b"X", b"G\x00"):
            self.assertEqual(classify_first_bytes(head), "native", head)


class FakeResource(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"status page"


def http_request(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".encode()


def parse_http(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


class SniffingTests(SynchronousTestCase):
    """The shared port with in-memory transports and a Clock."""

    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.clock = Clock()
        self.waits = Waits()
        self.rpc = RpcServerFactory(make_table(self.waits), self.clock)
        self.root = NodeRoot()
        self.factory = NodePortFactory(self.rpc, make_site(self.root, clock=self.clock), self.clock)
        self.factory.doStart()
        self.addCleanup(self.factory.doStop)

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER)
        protocol.makeConnection(transport)
        return protocol, transport

    def feed_bytewise(self, protocol: Any, data: bytes) -> None:
        for i in range(len(data)):
            protocol.dataReceived(data[i : i + 1])

    def test_native_one_byte_at_a_time(self):
        protocol, transport = self.connect()
        self.feed_bytewise(
            protocol, request(1, "add", {"a": 2, "b": 5}) + request(2, "echo", {"data": b"hi"})
        )
        self.assertEqual(
            list(FrameDecoder().feed(transport.value())), [{"id": 1, "ok": 7}, {"id": 2, "ok": b"hi"}]
        )

    def test_http_one_byte_at_a_time(self):
        protocol, transport = self.connect()
        self.feed_bytewise(protocol, http_request("/health"))
        status, headers, body = parse_http(transport.value())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body), {"ok": True})

    def test_native_hand_over_leaves_the_data_path(self):
        protocol, transport = self.connect()
        protocol.dataReceived(request(1, "add", {"a": 1}))
        # The transport now calls the RPC protocol's own method directly.
        self.assertIsInstance(protocol.dataReceived.__self__, RpcServerProtocol)
        self.assertEqual(len(self.rpc.connections), 1)
        # connectionLost goes through a one-line closure that counts the
        # connection out (``max_connections``): once per connection.
        self.assertEqual(self.factory.open_connections, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.factory.open_connections, 0)
        self.assertEqual(len(self.rpc.connections), 0)

    def test_later_layers_add_resources(self):
        self.root.add("status", FakeResource())
        self.assertRaises(ValueError, self.root.add, "status", FakeResource())
        self.assertRaises(ValueError, self.root.add, "a/b", FakeResource())
        protocol, transport = self.connect()
        protocol.dataReceived(http_request("/status"))
        self.assertEqual(parse_http(transport.value())[2], b"status page")
        protocol, transport = self.connect()
        protocol.dataReceived(http_request("/"))
        self.assertEqual(json.loads(parse_http(transport.value())[2]), {"paths": ["/health", "/status"]})
        protocol, transport = self.connect()
        protocol.dataReceived(http_request("/nothing-here"))
        self.assertEqual(parse_http(transport.value())[0], 404)

    def test_silent_connection_is_dropped(self):
        for head in (b"", b"PO"):
            protocol, transport = self.connect()
            if head:
                protocol.dataReceived(head)
            self.clock.advance(29.9)
            self.assertFalse(transport.disconnecting)
            self.clock.advance(0.2)
            self.assertTrue(transport.disconnecting, head)
            protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(len(self.logs.refused("silent connection")), 2)

    def test_closing_before_deciding_cancels_the_timer(self):
        protocol, _transport = self.connect()
        self.assertEqual(
            len([c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", None) == "_silent"]),
            1,
        )
        protocol.connectionLost(Failure(ConnectionError()))
        self.assertEqual(
            [c for c in self.clock.getDelayedCalls() if getattr(c.func, "__name__", None) == "_silent"], []
        )

    def test_deciding_cancels_the_first_bytes_timer(self):
        protocol, transport = self.connect()
        protocol.dataReceived(request(1, "add", {"a": 1}))
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.logs.refused("silent connection"), [])


class RawHTTPClient(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:
        self.done.callback(self.data)


@defer.inlineCallbacks
def http_get(endpoint: Any, path: str, timeout: float = 10.0):
    """One request over a fresh connection, read until the server closes."""
    client = RawHTTPClient()
    yield endpoint.connect(Factory.forProtocol(lambda: client))
    client.transport.write(http_request(path))
    raw = yield client.done.addTimeout(timeout, reactor)
    return parse_http(raw)


class PortLiveServer(LiveServer):
    """test_rpc's live server, listening through the shared node port."""


class SharedPortLiveTests(test_rpc.LiveTests):
    """Every live bad-input, pool and pipelining test of test_rpc, with the
    server behind the shared port (first-bytes sniffing in front)."""

    def make_server(self, rpc: RpcServerFactory) -> Deferred[LiveServer]:
        factory = node_factory(rpc, make_site(clock=reactor), reactor, first_bytes_timeout=2.0)
        return PortLiveServer(self, factory, rpc).start()

    @defer.inlineCallbacks
    def test_http_and_native_on_one_port(self):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port.getHost().port)
        steady = test_rpc.SteadyCaller(self.pool, self.server.address)
        for _ in range(3):
            status, _headers, body = yield http_get(endpoint, "/health")
            self.assertEqual((status, json.loads(body)), (200, {"ok": True}))
        yield wait_for(lambda: steady.answers >= 3, "native answers on the same port")
        yield steady.stop()
        self.assertEqual(steady.errors, [])

    @defer.inlineCallbacks
    def test_silent_connection_is_dropped_and_logged(self):
        raw = yield self.server.open_raw()
        yield wait_for(lambda: raw.closed, "the silent connection to be dropped")
        self.assertEqual(len(self.logs.refused("silent connection")), 1)


class ListenTests(TestCase):
    @defer.inlineCallbacks
    def test_listen_helper(self):
        rpc = RpcServerFactory(make_table(), reactor, ServerLimits())
        port = yield listen(reactor, 0, node_factory(rpc, make_site(clock=reactor), reactor), "127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = RpcClientPool(reactor)
        self.addCleanup(pool.close)
        address = f"127.0.0.1:{port.getHost().port}"
        self.assertEqual((yield pool.call(address, "add", {"a": 20, "b": 22}, timeout=5)), 42)
        status, _headers, body = yield http_get(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), "/health"
        )
        self.assertEqual(status, 200)
