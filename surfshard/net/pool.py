"""The client side of the native protocol: ``RpcConnection`` (one pipelined
connection) and ``RpcClientPool`` (one connection per ``host:port``,
connected lazily, reconnected with capped exponential backoff and jitter).

Error replies become the typed exceptions of ``surfshard.errors``.  A call
may hand its outcome to any ``ReplySink`` (``call_into``) instead of a
Deferred, which the hot paths use.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from surfshard.config import parse_address
from surfshard.errors import (
    BadRequest,
    Internal,
    SurfShardError,
    Timeout,
    Unavailable,
    error_from_wire,
)
from surfshard.net import wire
from surfshard.net.interfaces import IPipelinedPool
from surfshard.net.methods import ReplySink
from surfshard.net.schema import _short_repr
from surfshard.net.server import format_peer, tune_socket, write_now
from surfshard.net.tls import TLSFiles, client_options_from_files

log = Logger()

# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


#: Ids of one-way requests: negative, so that a refusal coming back is told
#: apart from a late reply to a call (positive ids); process-wide, so that
#: no two are alike on one connection.  (At a million a second, 2**63 of
#: them last 290,000 years.)
_notification_ids = itertools.count(-1, -1)


def encode_notification(
    method: str, args: Mapping[str, Any] | None = None, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """The frame of a one-way request: ``{"id", "method", "args",
    "noreply": true}`` with a fresh negative id.  A server runs it like any
    request but sends nothing back unless it refuses it (bad arguments,
    unknown method, a handler's error): then an error reply with that id.
    Raises ``wire.FrameError`` if it cannot be encoded."""
    return wire.encode_request(
        next(_notification_ids), method, {} if args is None else args, max_frame_bytes, noreply=True
    )


@implementer(IPushProducer)
class RpcConnection(Protocol):
    """The client side of one native connection, with pipelined calls.

    Call timeouts share one timer per connection (a heap of deadlines)
    instead of one reactor timer per call: with many calls in flight,
    scheduling and cancelling a timer per call was a large part of a round
    trip's cost.

    Backpressure: the connection is its transport's push producer. While the
    peer is not reading what we send (the transport's buffer is full),
    one-way requests (Raft's messages: Raft sends them again) are dropped,
    and calls are still written until ``MAX_UNSENT_BYTES`` more are waiting,
    then refused with Unavailable, so a stuck peer cannot grow our memory.
    """

    #: Set by ``makeConnection``: a TCP transport or its TLS wrapper. Typed
    #: ``Any`` because Twisted declares it ``ITransport | None``, while this
    #: protocol also uses the producer and abort methods of a connected one.
    transport: Any

    def __init__(self, clock: IReactorTime, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.peer = "unknown"
        self.connected = False
        #: The peer has not read what we sent (see the class docstring).
        self.write_blocked = False
        self._blocked_bytes = 0
        #: One-way requests dropped because the peer was not reading.
        self.dropped_notifications = 0
        #: Replies received (a TLS failure before the first one counts as a
        #: failed connection attempt).
        self.replies = 0
        #: Error replies to one-way requests, and the last one as an exception.
        self.refused_notifications = 0
        self.last_refusal: SurfShardError | None = None
        self._decoder = wire.FrameDecoder(max_frame_bytes)
        # call id -> (Deferred or other ReplySink, method name)
        self._pending: dict[int, tuple[ReplySink, str]] = {}
        self._next_id = 1
        # (deadline, call id) of calls with a timeout; entries of calls that
        # finished are dropped lazily.
        self._deadlines: list[tuple[float, int]] = []
        self._timer: Any = None
        self._timer_at = math.inf
        # Requests made while we handle a batch of replies (typically the
        # callers' next calls) go out in one write at the end of it.
        self._out: list[bytes] | None = None
        #: Flushes ``_out`` at the end of the reactor turn (see ``call``).
        self._turn_call: Any = None
        self._lost_reason: Failure | None = None
        self._on_lost: list[Callable[[Failure], object]] = []

    def connectionMade(self) -> None:
        self.connected = True
        self.peer = format_peer(self.transport)
        tune_socket(self.transport)
        self.transport.registerProducer(self, True)

    # -- backpressure (IPushProducer, driven by our transport) -----------------

    def pauseProducing(self) -> None:
        """The peer is not reading: our transport's buffer is full."""
        self.write_blocked = True
        self._blocked_bytes = 0

    def resumeProducing(self) -> None:
        self.write_blocked = False

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` cleans up."""

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered, timed out or cancelled."""
        return len(self._pending)

    def call(
        self, method: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """Send one request; the Deferred fires with the result, or fails with
        the typed error the server answered, Unavailable if the connection is
        or goes down, Timeout after ``timeout`` seconds.  Cancelling it
        forgets the call (a late reply is ignored)."""
        if not self.connected:
            return defer.fail(Unavailable(f"not connected to {self.peer}"))
        call_id = self._next_id
        pending = self._pending

        def cancel(_d: Deferred[Any]) -> None:
            pending.pop(call_id, None)

        d: Deferred[Any] = Deferred(cancel)
        try:
            self._send_call(call_id, d, method, args, timeout)
        except wire.FrameError as e:
            return defer.fail(BadRequest(f"cannot send {method}: {e.message}"))
        except Unavailable as e:
            return defer.fail(e)
        return d

    def call_into(
        self,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """``call`` for a caller that already holds what its own caller waits
        on: the outcome goes to ``sink.callback(result)`` or
        ``sink.errback(exception)`` (a Deferred is such a sink), and no
        Deferred is made for the call. Returns the call id, for ``forget``.
        Raises Unavailable if not connected, BadRequest if the request cannot
        be encoded (nothing is sent then)."""
        if not self.connected:
            raise Unavailable(f"not connected to {self.peer}")
        call_id = self._next_id
        try:
            self._send_call(call_id, sink, method, args, timeout)
        except wire.FrameError as e:
            raise BadRequest(f"cannot send {method}: {e.message}") from None
        return call_id

    def forget(self, call_id: int) -> None:
        """Drop a call made with ``call_into``: a late reply is ignored and
        its sink is never called."""
        self._pending.pop(call_id, None)

    def _send_call(
        self,
        call_id: int,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> None:
        self._next_id = call_id + 1
        frame = wire.encode_request(call_id, method, {} if args is None else args, self.max_frame_bytes)
        if self.write_blocked:
            if self._blocked_bytes + len(frame) > MAX_UNSENT_BYTES:
                raise Unavailable(
                    f"{self.peer} is not reading what we send ({self._blocked_bytes} bytes waiting): {method} not sent"
                )
            self._blocked_bytes += len(frame)
        pending = self._pending
        pending[call_id] = (sink, method)
        if timeout is not None:
            # One timer per connection: a heap of (deadline, call id).
            deadline = self.clock.seconds() + timeout
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(pending) + 256:
                self._compact_deadlines()
            heapq.heappush(deadlines, (deadline, call_id))
            if deadline < self._timer_at:
                self._schedule(deadline)
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            # Calls made outside a read (a timer, another connection's
            # reply) go out together at the end of the reactor turn.
            self._out = [frame]
            self._turn_call = self.clock.callLater(0, self._end_turn)

    def _end_turn(self) -> None:
        self._turn_call = None
        out, self._out = self._out, None
        if out and self.connected:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def notify(self, method: str, args: Mapping[str, Any] | None = None) -> bool:
        """Send a one-way request (``"noreply": true``): the server answers
        it only if it refuses it, and such refusals are only counted
        (``refused_notifications``, ``last_refusal``).  False if not
        connected; raises ``wire.FrameError`` if it cannot be encoded."""
        if not self.connected:
            return False
        return self.send_notification(encode_notification(method, args, self.max_frame_bytes))

    def send_notification(self, frame: bytes) -> bool:
        """Write a frame made by ``encode_notification``; False (dropped) while
        the peer is not reading what we send."""
        if self.write_blocked:
            self.dropped_notifications += 1
            return False
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            # Raft's transport already sends once per reactor turn.
            write_now(self.transport, frame)
        return True

    # -- timeouts --------------------------------------------------------------

    def _compact_deadlines(self) -> None:
        """Mostly answered calls: rebuild rather than let the heap grow with
        the call rate times the timeout."""
        pending = self._pending
        deadlines = self._deadlines
        deadlines[:] = [entry for entry in deadlines if entry[1] in pending]
        heapq.heapify(deadlines)

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        deadlines = self._deadlines
        pending = self._pending
        now = self.clock.seconds()
        # A timer can fire a hair early in float arithmetic: allow for it.
        while deadlines and deadlines[0][0] <= now + 1e-9:
            _, call_id = heapq.heappop(deadlines)
            call = pending.pop(call_id, None)
            if call is not None:
                call[0].errback(Timeout(f"{call[1]} to {self.peer} got no reply in time"))
        while deadlines and deadlines[0][1] not in pending:
            heapq.heappop(deadlines)
        if deadlines and self._timer is None:
            self._schedule(deadlines[0][0])

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf
        self._deadlines = []

    # -- replies ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        opened = self._out is None
        if opened:
            self._out = []
        try:
            self._read(self._decoder.feed(data))
        finally:
            if opened:
                out, self._out = self._out, None
                if out and self.connected:
                    write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))

    def _read(self, frames: Iterator[dict[Any, Any]]) -> None:
        pending = self._pending
        while True:
            try:
                for frame in frames:
                    call_id = frame.get("id")
                    call = pending.pop(call_id, None) if type(call_id) is int else None
                    if call is None:
                        if type(call_id) is not int:
                            # We only send int ids: this is not a reply of ours.
                            self._protocol_error(f"reply without a usable id: {_short_repr(frame)}")
                            return
                        if call_id < 0:
                            self._notification_refused(frame)
                        continue  # normal after a timeout or cancel: the reply came late
                    self.replies += 1
                    if "ok" in frame:
                        call[0].callback(frame["ok"])
                    elif "error" in frame:
                        call[0].errback(error_from_wire(frame["error"]))
                    else:
                        call[0].errback(Internal(f"malformed reply to {call[1]}"))
                return
            except wire.FrameError as e:
                if e.recoverable and type(e.frame_id) is int:
                    # One reply we refuse to decode (CBOR tags): fail that call only.
                    call = pending.pop(e.frame_id, None)
                    if call is not None:
                        call[0].errback(Internal(f"reply to {call[1]} could not be decoded: {e.message}"))
                    frames = self._decoder.feed(b"")
                    continue
                self._protocol_error(f"undecodable reply stream: {e.message}")
                return

    def _notification_refused(self, frame: dict[Any, Any]) -> None:
        """The server refused a one-way request (negative ids are ours for
        those): there is no caller to tell, so count it for status and tests."""
        self.refused_notifications += 1
        error = frame.get("error")
        if type(error) is dict:
            self.last_refusal = error_from_wire(error)

    def _protocol_error(self, why: str) -> None:
        log.warn("rpc: dropping connection to {peer}: {why}", peer=self.peer, why=why)
        self.transport.abortConnection()

    # -- loss ------------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._lost_reason = reason
        self._stop_timer()
        if self._turn_call is not None and self._turn_call.active():
            self._turn_call.cancel()
        self._turn_call = None
        self._out = None
        # Owners (the pool) learn first, so that callers reacting to the
        # failures below already get a fresh connection for their retries.
        callbacks, self._on_lost = self._on_lost, []
        for notify in callbacks:
            notify(reason)
        pending, self._pending = self._pending, {}
        why = reason.getErrorMessage()
        for d, method in pending.values():
            d.errback(Unavailable(f"connection to {self.peer} lost during {method}: {why}"))

    def notify_lost(self, callback: Callable[[Failure], object]) -> None:
        """Call ``callback(reason)`` when the connection is gone (at once if
        it already is)."""
        if self._lost_reason is not None:
            callback(self._lost_reason)
        else:
            self._on_lost.append(callback)

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.notify_lost(lambda _reason: d.callback(None))
        return d


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, max_frame_bytes: int) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes

    def buildProtocol(self, addr: Any) -> RpcConnection:
        proto = RpcConnection(self.clock, self.max_frame_bytes)
        proto.factory = self
        return proto


class _Peer:
    """Connection state for one address."""

    __slots__ = (
        "address",
        "connecting",
        "connection",
        "failures",
        "last_error",
        "queued",
        "queued_bytes",
        "retry_at",
        "waiters",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.connection: RpcConnection | None = None
        self.connecting: Deferred[Any] | None = None
        self.waiters: list[Deferred[RpcConnection]] = []
        # One-way request frames waiting for the connection being made.
        self.queued: list[bytes] = []
        self.queued_bytes = 0
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""


#: One-way requests a pool holds for one peer while it connects: beyond
#: either bound more are dropped (their senders tolerate loss).
#: Bytes of calls a connection still writes while its peer is not reading
#: (beyond them, calls fail with Unavailable).
MAX_UNSENT_BYTES = 32 * 1024 * 1024

MAX_QUEUED_NOTIFICATIONS = 256
MAX_QUEUED_NOTIFICATION_BYTES = 32 * 1024 * 1024


@implementer(IPipelinedPool)
class RpcClientPool:
    """One lazily made, reused connection per ``host:port``.

    After a failed connect (or TLS handshake) calls to that address fail
    fast with Unavailable until a backoff delay has passed:
    ``backoff_initial * 2**(failures-1)``, capped at
    ``backoff_max``, scaled by a random factor in [0.5, 1] so that many
    clients do not reconnect in lockstep.  The first call after the delay
    tries again.
    """

    def __init__(
        self,
        reactor: Any,
        tls: TLSFiles | None = None,
        *,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._factory = _ClientFactory(reactor, max_frame_bytes)
        self._peers: dict[str, _Peer] = {}
        self._tls_creators: dict[str, Any] = {}
        self._closed = False
        self._lost_observers: list[Callable[[str], object]] = []

    # -- public --------------------------------------------------------------

    def call(
        self, address: str, method: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """Call ``method`` on the node at ``address``; see RpcConnection.call.
        ``timeout`` covers connecting as well as the call itself."""
        peer = self._peers.get(address)
        if peer is not None and peer.connection is not None and peer.connection.connected:
            return peer.connection.call(method, args, timeout)
        if self._closed:
            return defer.fail(Unavailable("the client pool is closed"))
        if peer is None:
            try:
                parse_address(address)
            except ValueError as e:
                return defer.fail(BadRequest(str(e)))
            peer = self._peers[address] = _Peer(address)
        now = self.reactor.seconds()
        if peer.retry_at > now:
            return defer.fail(
                Unavailable(
                    f"{address} is unavailable (next attempt in {peer.retry_at - now:.2f}s): {peer.last_error}"
                )
            )
        started = now
        waiter = self._wait_for_connection(peer)
        if timeout is not None:
            waiter.addTimeout(
                timeout, self.reactor, onTimeoutCancel=self._connect_timed_out(address, timeout)
            )

        def send(connection: RpcConnection) -> Deferred[Any]:
            remaining = None if timeout is None else timeout - (self.reactor.seconds() - started)
            if remaining is not None and remaining <= 0:
                return defer.fail(Timeout(f"{method} to {address} ran out of time while connecting"))
            return connection.call(method, args, remaining)

        return waiter.addCallback(send)

    def call_into(
        self,
        address: str,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[RpcConnection, int] | None:
        """``call``'s fast path for a caller holding its own sink (see
        ``RpcConnection.call_into``): sends on an established connection and
        returns it with the call id (to ``forget`` the call); None, having
        sent nothing, when there is no such connection (use ``call``, which
        connects). Raises BadRequest if the request cannot be encoded."""
        peer = self._peers.get(address)
        if peer is None:
            return None
        connection = peer.connection
        if connection is None or not connection.connected:
            return None
        return connection, connection.call_into(sink, method, args, timeout)

    def notify(self, address: str, method: str, args: Mapping[str, Any] | None = None) -> bool:
        """Send a one-way request (see ``RpcConnection.notify``) to the node
        at ``address``; never waits.  True once it is written, or queued
        behind the connection being made (sent when it is up, dropped if it
        fails); False if it was dropped at once: the pool is closed, the
        address is bad, the address is backing off after failed connects,
        or too much is queued for it already.  Raises ``wire.FrameError``
        (e.g. FrameTooLarge) if it cannot be encoded."""
        frame = encode_notification(method, args, self._factory.max_frame_bytes)
        peer = self._peers.get(address)
        if peer is not None:
            connection = peer.connection
            if connection is not None and connection.connected:
                return connection.send_notification(frame)
        if self._closed:
            return False
        if peer is None:
            try:
                parse_address(address)
            except ValueError:
                return False
            peer = self._peers[address] = _Peer(address)
        if peer.retry_at > self.reactor.seconds():
            return False
        if (
            len(peer.queued) >= MAX_QUEUED_NOTIFICATIONS
            or peer.queued_bytes + len(frame) > MAX_QUEUED_NOTIFICATION_BYTES
        ):
            return False
        peer.queued.append(frame)
        peer.queued_bytes += len(frame)
        if peer.connecting is None:
            self._connect(peer)
        # (A connect that failed at once has dropped the queue already.)
        return bool(peer.queued) and peer.queued[-1] is frame

    def on_connection_lost(self, callback: Callable[[str], object]) -> None:
        """See ``IPipelinedPool.on_connection_lost``."""
        self._lost_observers.append(callback)

    def connection(self, address: str) -> RpcConnection | None:
        """The live connection to ``address``, if any (for tests and status)."""
        peer = self._peers.get(address)
        return peer.connection if peer is not None else None

    def close(self) -> Deferred[None]:
        """Close every connection; fires once all are gone."""
        self._closed = True
        waits: list[Deferred[Any]] = []
        for peer in list(self._peers.values()):
            if peer.connecting is not None:
                peer.connecting.cancel()
            connection = peer.connection
            if connection is not None:
                waits.append(connection.when_lost())
                connection.transport.loseConnection()
                # A peer that does not complete the close must not hold us.
                abort = self.reactor.callLater(1.0, connection.transport.abortConnection)
                connection.notify_lost(functools.partial(_cancel_timer, abort))
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- connecting ----------------------------------------------------------

    def _connect_timed_out(self, address: str, timeout: float) -> Callable[[Any, float], Any]:
        def convert(result: Any, _timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                return Failure(Unavailable(f"could not connect to {address} within {timeout}s"))
            return result

        return convert

    def _wait_for_connection(self, peer: _Peer) -> Deferred[RpcConnection]:
        def forget(waiter: Deferred[RpcConnection]) -> None:
            if waiter in peer.waiters:
                peer.waiters.remove(waiter)

        waiter: Deferred[RpcConnection] = Deferred(forget)
        peer.waiters.append(waiter)
        if peer.connecting is None:
            self._connect(peer)
        return waiter

    def _connect(self, peer: _Peer) -> None:
        try:
            endpoint = self._endpoint(peer.address)
        except Exception as e:
            self._connect_failed(Failure(e), peer)
            return
        attempt = endpoint.connect(self._factory)
        peer.connecting = attempt
        attempt.addCallbacks(self._connected, self._connect_failed, callbackArgs=(peer,), errbackArgs=(peer,))

    def _connected(self, connection: RpcConnection, peer: _Peer) -> None:
        peer.connecting = None
        if self._closed:
            connection.transport.abortConnection()
            self._fail_waiters(peer, Unavailable("the client pool is closed"))
            return
        peer.connection = connection
        connection.notify_lost(lambda reason: self._lost(connection, peer, reason))
        queued, peer.queued, peer.queued_bytes = peer.queued, [], 0
        if queued:
            connection.transport.write(b"".join(queued))
        waiters, peer.waiters = peer.waiters, []
        for waiter in waiters:
            waiter.callback(connection)

    def _lost(self, connection: RpcConnection, peer: _Peer, reason: Failure) -> None:
        if peer.connection is connection:
            peer.connection = None
        if reason.check(SSL.Error) and not connection.replies:
            # The TLS handshake failed (with TLS 1.3 a refused client
            # certificate shows only after "connecting"): a failed connect.
            self._note_failure(peer, reason)
        else:
            peer.failures = 0
        if not self._closed:
            for observer in list(self._lost_observers):
                try:
                    observer(peer.address)
                except Exception:
                    log.failure("connection-lost observer {observer!r} failed", observer=observer)

    def _connect_failed(self, reason: Failure, peer: _Peer) -> None:
        peer.connecting = None
        self._note_failure(peer, reason)
        self._fail_waiters(peer, Unavailable(f"cannot connect to {peer.address}: {peer.last_error}"))

    def _note_failure(self, peer: _Peer, reason: Failure) -> None:
        peer.failures += 1
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(peer.failures - 1, 30))
        peer.retry_at = self.reactor.seconds() + delay * self._rng.uniform(0.5, 1.0)
        peer.last_error = (
            reason.getErrorMessage() if not reason.check(CancelledError) else "connect cancelled"
        )

    def _fail_waiters(self, peer: _Peer, error: SurfShardError) -> None:
        # One-way requests have no one to tell: they are dropped.
        peer.queued, peer.queued_bytes = [], 0
        waiters, peer.waiters = peer.waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        host, port = parse_address(address)
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        if self.tls is not None:
            creator = self._tls_creators.get(host)
            if creator is None:
                creator = self._tls_creators[host] = client_options_from_files(self.tls, host)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


def _cancel_timer(timer: Any, _reason: object) -> None:
    if timer.active():
        timer.cancel()
