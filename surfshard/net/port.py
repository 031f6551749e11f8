"""One port, two protocols: native RPC frames and HTTP, told apart by the
first bytes of each connection (the way etcd serves gRPC and HTTP on one
port).

An HTTP request starts with a method token and a space (``GET /...``); a
native frame starts with a 4-byte big-endian length, whose first byte is 0
or 1 for any frame under the 16 MiB default limit and never an uppercase
ASCII letter for any plausible limit.  Whatever is not HTTP goes to the
native protocol, whose decoder refuses (and logs) garbage.

The decision is made once per connection: the sniffing protocol then hands
the transport to the chosen protocol and steps out of the data path, so a
native connection pays nothing per frame for sharing the port.  Wrapped in
TLS (``surfshard.net.tls.wrap_server_factory``) the sniffing happens on the
decrypted stream, so both protocols work over TLS on the same port.
"""

from __future__ import annotations

import json
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.server import Request, Site

from surfshard.net.server import RpcServerFactory, format_peer
from surfshard.net.tls import TLSFiles, wrap_server_factory

__all__ = [
    "HTTP_METHODS",
    "HealthResource",
    "NodePortFactory",
    "NodeRoot",
    "classify_first_bytes",
    "listen",
    "make_site",
    "node_factory",
]

log = Logger()

HTTP_METHODS = (b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH", b"TRACE", b"CONNECT")
_HTTP_PREFIXES = tuple(method + b" " for method in HTTP_METHODS)
#: Enough bytes to recognise the longest method token and its space.
SNIFF_BYTES = max(len(prefix) for prefix in _HTTP_PREFIXES)
#: How long a new connection may stay silent before it is dropped.
DEFAULT_FIRST_BYTES_TIMEOUT = 30.0
#: HTTP keep-alive connections idle longer than this are closed.
DEFAULT_HTTP_TIMEOUT = 60.0
#: The largest HTTP request body a node reads (XML-RPC calls, block uploads).
DEFAULT_MAX_HTTP_BODY = 16 * 1024 * 1024

HTTP = "http"
NATIVE = "native"


def classify_first_bytes(head: bytes) -> str | None:
    """``"http"``, ``"native"``, or None while ``head`` is too short to tell."""
    head = head[:SNIFF_BYTES]
    if head.startswith(_HTTP_PREFIXES):
        return HTTP
    if any(prefix.startswith(head) for prefix in _HTTP_PREFIXES):
        return None
    return NATIVE


# ---------------------------------------------------------------------------
# HTTP side
# ---------------------------------------------------------------------------


def _json_response(request: Request, body: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


class HealthResource(Resource):
    """``/health``: the process is up and serving HTTP."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json_response(request, {"ok": True})


class NodeRoot(Resource):
    """The root of a node's HTTP side.  Later layers hang their resources
    here: ``root.add("RPC2", xmlrpc_resource)``, ``root.add("status", ...)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.add("health", HealthResource())
        #: What ``/`` serves (None: the list of paths, as JSON).
        self.index: IResource | None = None

    def add(self, path: str, resource: IResource) -> None:
        """Serve ``resource`` at ``/path`` (one path segment)."""
        if not path or "/" in path:
            raise ValueError(f"{path!r} is not a single path segment")
        if path.encode("utf-8") in self.children:
            raise ValueError(f"/{path} is already served")
        self.putChild(path.encode("utf-8"), resource)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self.index if self.index is not None else self
        return NoResource()

    def render_GET(self, request: Request) -> bytes:
        paths = sorted("/" + name.decode("utf-8", "replace") for name in self.children)
        return _json_response(request, {"paths": paths})


def make_site(
    root: NodeRoot | None = None,
    *,
    clock: IReactorTime,
    timeout: float = DEFAULT_HTTP_TIMEOUT,
    max_body: int = DEFAULT_MAX_HTTP_BODY,
) -> Site:
    """A Site over ``root`` whose timers run on ``clock``, refusing request
    bodies over ``max_body`` bytes (413) however they are framed.

    Form parsing is off: nothing on a node takes form uploads, and parsing
    them would buffer whole multipart bodies in memory.
    """
    site = _NodeSite(
        root or NodeRoot(),
        timeout=timeout,
        reactor=clock,
        parsePOSTFormSubmission=False,
        requestFactory=_BoundedRequest,
    )
    site.max_body = max_body
    return site


class _NodeSite(Site):
    """No access log: status polls and XML-RPC calls come several times a
    second (lines that would drown the node's own log), and the reactor's
    clock is monotonic in servers, so their dates would be wrong anyway.
    Refusals are logged where they are made."""

    max_body = DEFAULT_MAX_HTTP_BODY
    #: Bytes of request bodies read and not yet answered, over all requests
    #: (part of the node's memory budget).
    body_bytes = 0

    def log(self, request: Any) -> None:
        pass


_TOO_LARGE = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n"
    b"Connection: close\r\n\r\nrequest body too large\r\n"
)


class _BoundedRequest(Request):
    """A request whose body may not pass the site's ``max_body``, whatever
    its framing: a declared ``Content-Length`` over it is refused before any
    of the body is read, and a chunked (or unframed) body as soon as it
    passes it. The refusal is a 413 and a closed connection (nothing past
    the limit is buffered), and is logged."""

    _received = 0
    _held = 0
    _refused = False

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body", DEFAULT_MAX_HTTP_BODY))

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._too_large(f"declared Content-Length {length}")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit():
            self._too_large(f"a body past {self._limit()} bytes")
            return
        self._hold(len(data))
        super().handleContentChunk(data)

    def _hold(self, n: int) -> None:
        site = getattr(self.channel, "site", None)
        if isinstance(site, _NodeSite):
            site.body_bytes += n
            self._held += n

    def _release(self) -> None:
        if self._held:
            site = getattr(self.channel, "site", None)
            if isinstance(site, _NodeSite):
                site.body_bytes -= self._held
            self._held = 0

    def finish(self) -> None:
        self._release()
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._release()
        super().connectionLost(reason)

    def _too_large(self, what: str) -> None:
        self._refused = True
        self._release()
        transport: Any = self.channel.transport
        log.warn(
            "port: refused HTTP request from {peer}: {what}, over the limit of {limit} bytes",
            peer=format_peer(transport),
            what=what,
            limit=self._limit(),
        )
        transport.write(_TOO_LARGE)
        transport.loseConnection()


# ---------------------------------------------------------------------------
# The shared port
# ---------------------------------------------------------------------------


class _SniffingProtocol(Protocol):
    """Reads until the first bytes say which protocol this is, then hands
    the transport (and the bytes read so far) to that protocol for good."""

    #: Set by ``makeConnection``: a TCP transport or its TLS wrapper. Typed
    #: ``Any`` because Twisted declares it ``ITransport | None``, while this
    #: protocol also uses the producer and abort methods of a connected one.
    transport: Any

    def __init__(self, factory: NodePortFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.peer = "unknown"
        self._head = b""
        self._timer: Any = None
        self._decided = False

    def connectionMade(self) -> None:
        self.factory.open_connections += 1
        self.peer = format_peer(self.transport)
        timeout = self.factory.first_bytes_timeout
        if timeout is not None:
            self._timer = self.factory.clock.callLater(timeout, self._silent)

    def dataReceived(self, data: bytes) -> None:
        self._head += data
        kind = classify_first_bytes(self._head)
        if kind is not None:
            self._hand_over(kind)

    def _hand_over(self, kind: str) -> None:
        self._decided = True
        self._cancel_timer()
        factory = self.factory.site if kind == HTTP else self.factory.rpc
        inner = factory.buildProtocol(self.addr)
        if inner is None:
            log.warn("port: refused {kind} connection from {peer}: no protocol", kind=kind, peer=self.peer)
            self.transport.loseConnection()
            return
        # The transport keeps calling *our* methods; pointing them at the
        # inner protocol's bound methods takes us out of the data path.
        self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        factory = self.factory

        def lost(reason: Failure = connectionDone) -> None:
            factory.open_connections -= 1
            inner.connectionLost(reason)

        self.connectionLost = lost  # type: ignore[method-assign]
        for optional in ("readConnectionLost", "writeConnectionLost"):
            method = getattr(inner, optional, None)
            if method is not None:
                setattr(self, optional, method)
        head, self._head = self._head, b""
        inner.makeConnection(self.transport)
        if head:
            inner.dataReceived(head)

    def _silent(self) -> None:
        self._timer = None
        if not self._decided:
            log.warn(
                "port: refused {what} from {peer}: {why}",
                what="silent connection",
                peer=self.peer,
                why=f"{len(self._head)} bytes in {self.factory.first_bytes_timeout}s, not enough to tell the protocol",
            )
            self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Only reached before a hand-over (afterwards ``lost`` is called).
        self.factory.open_connections -= 1
        self._cancel_timer()
        if reason.check(SSL.Error):
            log.warn(
                "port: refused {what} from {peer}: {why}",
                what="TLS peer",
                peer=self.peer,
                why=_ssl_reason(reason),
            )


def _ssl_reason(reason: Failure) -> str:
    error = reason.value
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        return "; ".join(" ".join(str(part) for part in item if part) for item in args[0] if item)
    return reason.getErrorMessage() or type(error).__name__


class NodePortFactory(ServerFactory):
    """Serves the native protocol (``rpc``) and HTTP (``site``) on one port."""

    noisy = False

    def __init__(
        self,
        rpc: RpcServerFactory,
        site: Site,
        clock: IReactorTime,
        *,
        first_bytes_timeout: float | None = DEFAULT_FIRST_BYTES_TIMEOUT,
        max_connections: int | None = None,
    ) -> None:
        self.rpc = rpc
        self.site = site
        self.clock = clock
        self.first_bytes_timeout = first_bytes_timeout
        self.max_connections = max_connections
        #: Connections open now (counted from connectionMade to connectionLost).
        self.open_connections = 0
        #: Connections closed at once because ``max_connections`` were open.
        self.refused_connections = 0
        if isinstance(site, _NodeSite):
            rpc.add_buffer_source(lambda: site.body_bytes)

    def buildProtocol(self, addr: Any) -> _SniffingProtocol | None:
        if self.max_connections is not None and self.open_connections >= self.max_connections:
            # Returning None makes Twisted close the socket at once. Logged
            # for the first refusal of a flood and then every 1,000th.
            if self.refused_connections % 1000 == 0:
                log.warn(
                    "port: refused a connection from {peer}: {n} connections open, the limit "
                    "(max_connections) ({refused} refused so far)",
                    peer=f"{getattr(addr, 'host', '?')}:{getattr(addr, 'port', '?')}",
                    n=self.open_connections,
                    refused=self.refused_connections + 1,
                )
            self.refused_connections += 1
            return None
        return _SniffingProtocol(self, addr)

    # The inner factories are never listened on directly: start and stop
    # them with us (the Site schedules its log-timestamp timer on start).
    def startFactory(self) -> None:
        self.rpc.doStart()
        self.site.doStart()

    def stopFactory(self) -> None:
        self.site.doStop()
        self.rpc.doStop()


def node_factory(
    rpc: RpcServerFactory,
    site: Site,
    clock: IReactorTime,
    *,
    tls: TLSFiles | None = None,
    first_bytes_timeout: float | None = DEFAULT_FIRST_BYTES_TIMEOUT,
    max_connections: int | None = None,
) -> IProtocolFactory:
    """The factory to listen with: the shared port, inside TLS if ``tls``,
    keeping at most ``max_connections`` open."""
    factory: IProtocolFactory = NodePortFactory(
        rpc, site, clock, first_bytes_timeout=first_bytes_timeout, max_connections=max_connections
    )
    if tls is not None:
        factory = wrap_server_factory(factory, tls)
    return factory


def listen(
    reactor: Any, port: int, factory: IProtocolFactory, interface: str = ""
) -> Deferred[IListeningPort]:
    """Listen on TCP ``interface:port`` (port 0: any free port; an IPv6
    interface listens on IPv6)."""
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, interface=interface).listen(factory)
    return TCP4ServerEndpoint(reactor, port, interface=interface).listen(factory)


def listen_now(reactor: Any, port: int, factory: IProtocolFactory, interface: str = "") -> IListeningPort:
    """Listen on TCP ``interface:port`` and return the port, or raise.

    A TCP endpoint listens at once, so a service can know in
    ``startService`` whether it has its port: one it cannot have must fail
    twistd's start-up (non-zero exit with the reason), not leave a process
    running with no port, which is what a failed Deferred nobody waits for
    would do.
    """
    outcome: list[Any] = []
    listen(reactor, port, factory, interface).addBoth(outcome.append)
    if not outcome:  # pragma: no cover - an endpoint that listens later
        raise RuntimeError(f"listening on {interface}:{port} did not complete at once")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
