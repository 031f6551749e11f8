"""The server side of the native protocol: one ``RpcServerProtocol`` per
connection, dispatching pipelined requests to a ``MethodTable``.

Requests are ``{"id", "method", "args"}`` (plus ``"noreply": true`` for
one-way peer messages, answered only when refused); replies are
``{"id", "ok": result}`` or ``{"id", "error": {"code", "message", ...}}``,
in completion order.  Everything refused (undecodable streams, malformed
requests, unknown methods, bad arguments, stalled connections) is logged
with the peer address and why, and never takes more than the one
connection down.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import task, tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from surfshard.config import ClusterConfig
from surfshard.errors import (
    BadRequest,
    Busy,
    Forbidden,
    Internal,
    SurfShardError,
    UnknownMethod,
)
from surfshard.net import wire
from surfshard.net.methods import OPEN, TRUSTED, Authorizer, CallContext, Caller, MethodTable, Reply
from surfshard.net.schema import _MISSING, _TYPE_NAMES, _WIRE_TYPES, _describe, _Invalid, _short_repr

log = Logger()

log = Logger()


#: Request ids are ints that fit in 64 bits, or short strings.
_MAX_ID_STR = 128
_MIN_ID_INT = -(2**63)
_MAX_ID_INT = 2**64 - 1
_REQUEST_KEYS = frozenset({"id", "method", "args", "noreply"})

#: How often a server counts the bytes its connections hold (the memory budget).
ACCOUNT_INTERVAL = 0.1

#: Corked replies are written once they reach this many bytes (or at the
#: end of the read), so the transport can push back within one read.
FLUSH_BYTES = 256 * 1024

#: How long a connection we are closing may take to flush before we abort it
#: (a peer that never reads must not hold the socket open forever).
CLOSE_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class ServerLimits:
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    #: Requests a connection may have running; beyond it we stop reading
    #: from the socket (TCP pushes back on the client) until some finish.
    max_in_flight: int = 256
    #: Close a connection that has sent part of a frame and then nothing
    #: for this many seconds (slow or half-open peers).  None disables it.
    idle_timeout: float | None = 30.0
    #: Close a connection whose peer has read none of our replies for this
    #: many seconds while they pile up (see ``pauseProducing``). None
    #: disables it.
    stalled_reader_timeout: float | None = 60.0
    #: Bytes the node may hold in its connections' buffers (requests read
    #: and not yet handled, replies not yet taken by their peers), summed
    #: over all connections every ``ACCOUNT_INTERVAL``. Past it, new
    #: requests other than essential ones (Raft, ping) are answered BUSY.
    #: None disables it.
    memory_budget: int | None = 512 * 1024 * 1024


def server_limits(cluster: ClusterConfig) -> ServerLimits:
    """The ``ServerLimits`` of a node of ``cluster`` (its ``[limits]``)."""
    limits = cluster.limits
    return ServerLimits(
        max_in_flight=limits.max_in_flight,
        stalled_reader_timeout=float(limits.stalled_reader_timeout),
        memory_budget=limits.memory_budget,
    )


def format_peer(transport: Any) -> str:
    """``host:port`` of the other end, for logs."""
    try:
        address = transport.getPeer()
    except Exception:
        return "unknown"
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Dead-peer detection in the kernel: probe an idle connection after 15 s
#: (every 5 s, 3 misses), and drop one whose sent data stays unacknowledged
#: for 30 s.  A peer host that vanished (power loss, partition) would
#: otherwise hold a connection, and every call on it, for hours.  A paused
#: but living process still has its kernel acknowledge, so it is not dropped.
#:
#: TCP_NODELAY: Nagle's algorithm holds a small segment while an earlier one
#: is unacknowledged, and the peer delays its ACK (40 ms on Linux) unless it
#: has data to send back.  One-way requests (Raft traffic) get no reply for
#: the ACK to ride on, so without this every other batch waited 40 ms.
#: Writes are already gathered per reactor turn, so it adds no small packets.
_SOCKET_OPTIONS = [
    (name, value)
    for name, value in (
        ("TCP_NODELAY", 1),
        ("TCP_KEEPIDLE", 15),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 30_000),
    )
    if hasattr(socket, name)
]


def tune_socket(transport: Any) -> bool:
    """Turn on no-delay, keepalive and the dead-peer timeouts above for the
    TCP socket under ``transport`` (looking through a TLS wrapper); False if
    there is no socket to tune (test transports)."""
    for _ in range(3):  # TCP, or TLS around TCP: bounded walk down the wrappers
        sock = getattr(transport, "socket", None)
        if sock is not None:
            break
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    else:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _SOCKET_OPTIONS:
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        return False
    return True


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent to the socket at once when the
    transport holds nothing unsent.

    Twisted's ``write`` only buffers: it registers for writability and
    sends on the reactor's next pass, so each message costs two
    ``epoll_ctl`` calls and an extra pass (``docs/performance.md``). Callers
    collect what one reactor turn produces and hand it here once, so the
    batching of that pass is kept. Anything the socket does not take, and
    every transport that is not plain TCP (TLS, tests), goes through
    ``write`` as before, so order and backpressure are unchanged."""
    # Only a TCP transport itself: a wrapper (TLS's among them) hands
    # unknown attributes down to the TCP transport under it, whose
    # writeSomeData would put plaintext on the wire.
    if (
        not isinstance(transport, tcp.Connection)
        or transport.TLS
        or transport.dataBuffer
        # Twisted's private buffer of writes not yet joined: a Twisted that
        # has no such attribute gets the plain ``write`` (it may buffer
        # elsewhere), never an AttributeError on every message.
        or getattr(transport, "_tempDataBuffer", True)
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    sent = transport.writeSomeData(data)
    if not isinstance(sent, int):  # a connection error: let write report it the usual way
        transport.write(data)
    elif sent < len(data):
        transport.write(data[sent:])


def _usable_id(request_id: Any) -> bool:
    kind = type(request_id)
    if kind is int:
        return _MIN_ID_INT <= request_id <= _MAX_ID_INT
    return kind is str and 0 < len(request_id) <= _MAX_ID_STR


@implementer(IPushProducer)
class RpcServerProtocol(Protocol):
    """One server-side connection of the native protocol.

    Backpressure both ways, so a slow or hostile peer costs the node bounded
    memory: at most ``max_in_flight`` requests run at once (beyond that,
    reading stops until some finish); and the protocol is the push producer
    of its own transport, so when the replies the peer has not read pass the
    transport's buffer size, Twisted pauses it and it stops reading requests
    until the peer has taken them (the excess waits in the kernel's socket
    buffers, not in Python). A peer that reads nothing for
    ``stalled_reader_timeout`` seconds is disconnected, with a log line.
    """

    #: Set by ``makeConnection``: a TCP transport or its TLS wrapper. Typed
    #: ``Any`` because Twisted declares it ``ITransport | None``, while this
    #: protocol also uses the producer and abort methods of a connected one.
    transport: Any
    #: The factory that built it, whose memory budget applies (None when
    #: built directly, e.g. in tests).
    server_factory: RpcServerFactory | None = None

    def __init__(self, table: MethodTable, clock: IReactorTime, limits: ServerLimits | None = None) -> None:
        self.table = table
        self.clock = clock
        self.limits = limits = limits or ServerLimits()
        self.peer = "unknown"
        self._decoder = wire.FrameDecoder(limits.max_frame_bytes)
        self._max_frame_bytes = limits.max_frame_bytes
        # The table's name -> Method dict, looked up once per request.
        self._methods = table._methods
        # Requests whose handler returned a Deferred that has not fired yet.
        # (A synchronous handler finishes before the next frame is read.)
        self._running: dict[int | str, Deferred[Any] | Reply] = {}
        self._backlog: deque[dict[Any, Any]] = deque()
        # Replies produced while we are handling a batch of input go out in
        # one write at the end of it, not one write per reply.
        self._out: list[bytes] | None = None
        self._out_bytes = 0
        #: Flushes ``_out`` at the end of the reactor turn (see ``_send``).
        self._turn_call: Any = None
        self._paused = False
        #: The transport holds more unsent replies than its buffer size.
        self._write_blocked = False
        self._stall_timer: Any = None
        self._closing = False
        self._lost = False
        self._last_rx = 0.0
        self._idle_timer: Any = None
        self._abort_timer: Any = None
        self._on_lost: list[Callable[[Failure], object]] = []
        #: Who is calling (from the TLS certificate, learnt on the first
        #: call that needs it); TRUSTED when the factory checks nothing.
        self._caller: Caller | None = None

    def caller(self) -> Caller:
        """Who is at the other end: what the factory's ``identify`` makes of
        the transport (its verified certificate), TRUSTED without one."""
        caller = self._caller
        if caller is None:
            factory = self.server_factory
            identify = factory.identify if factory is not None else None
            caller = self._caller = identify(self.transport) if identify is not None else TRUSTED
        return caller

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = format_peer(self.transport)
        # The kernel reaps peers that vanished (see tune_socket); the idle
        # timeout covers peers that are there but stuck mid-frame.
        tune_socket(self.transport)
        self.transport.registerProducer(self, True)

    # -- write-side backpressure (IPushProducer, driven by our transport) -----

    def pauseProducing(self) -> None:
        """Our transport's buffer of unsent replies is full: stop reading
        requests (those already read wait in the backlog)."""
        if self._write_blocked or self._lost:
            return
        self._write_blocked = True
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        timeout = self.limits.stalled_reader_timeout
        if timeout is not None and self._stall_timer is None:
            self._stall_timer = self.clock.callLater(timeout, self._stalled)

    def resumeProducing(self) -> None:
        """The peer took our replies: read again (after the backlog)."""
        if not self._write_blocked:
            return
        self._write_blocked = False
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        if not self._lost and not self._closing:
            self._drain_backlog()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` cleans up."""

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._write_blocked and not self._lost:
            self._refuse(
                "stalled reader",
                f"read none of our replies for {self.limits.stalled_reader_timeout:.0f}s",
            )
            self._closing = True
            self._backlog.clear()
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._decoder.buffered and not self._closing:
            self._refuse(
                "truncated frame",
                f"connection closed with {self._decoder.buffered} bytes of an unfinished frame",
            )
        self._lost = True
        self._out = None
        for timer in (self._idle_timer, self._abort_timer, self._stall_timer, self._turn_call):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._abort_timer = self._stall_timer = None
        self._backlog.clear()
        running = list(self._running.values())
        self._running.clear()
        # Nobody is left to answer: tell the handlers to stop waiting.
        for d in running:
            d.cancel()
        callbacks, self._on_lost = self._on_lost, []
        for notify in callbacks:
            notify(reason)

    def notify_lost(self, callback: Callable[[Failure], object]) -> None:
        self._on_lost.append(callback)

    @property
    def in_flight(self) -> int:
        """Requests whose handlers have not finished."""
        return len(self._running)

    @property
    def paused(self) -> bool:
        """True while we stopped reading (the in-flight cap, or replies the
        peer has not read)."""
        return self._paused

    @property
    def write_blocked(self) -> bool:
        """True while the peer has not read enough of our replies."""
        return self._write_blocked

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_rx = self.clock.seconds()
        opened = self._out is None
        if opened:
            self._out = []
        try:
            self._read(self._decoder.feed(data))
        finally:
            if opened:
                self._flush()
                self._out = None
        if self._decoder.buffered and self._idle_timer is None and not (self._paused or self._closing):
            self._arm_idle_timer(self.limits.idle_timeout)

    def _read(self, frames: Iterator[dict[Any, Any]]) -> None:
        limit = self.limits.max_in_flight
        while True:
            try:
                for frame in frames:
                    if self._closing:
                        return
                    if self._paused or len(self._running) >= limit:
                        self._hold(frame)
                    else:
                        self._handle(frame)
                return
            except wire.FrameError as e:
                if e.recoverable and _usable_id(e.frame_id):
                    # Well-framed but refused (CBOR tags): answer it, read on.
                    self._reject(e.frame_id, "malformed request", BadRequest(e.message))
                    frames = self._decoder.feed(b"")
                    continue
                self._refuse("undecodable stream", e.message, reason=e.reason)
                self._close()
                return

    def _hold(self, frame: dict[Any, Any]) -> None:
        """Over the in-flight cap: park the frame and stop reading.

        The backlog is bounded by what was already read when we paused."""
        self._backlog.append(frame)
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def buffered_bytes(self) -> int:
        """Bytes this connection holds: a partial request read, and replies
        its transport has not sent yet (read from the TCP transport's
        buffers where it has them; a wrapper without them counts 0)."""
        transport = self.transport
        unsent = len(getattr(transport, "dataBuffer", b"")) + int(getattr(transport, "_tempDataLen", 0))
        return self._decoder.buffered + unsent

    def _drain_backlog(self) -> None:
        corked = self._out is None
        if corked:
            self._out = []
        try:
            while (
                self._backlog
                and len(self._running) < self.limits.max_in_flight
                and not self._closing
                and not self._write_blocked
            ):
                self._handle(self._backlog.popleft())
        finally:
            if corked:
                self._flush()
                self._out = None
        if (
            not self._backlog
            and self._paused
            and not self._write_blocked
            and not self._closing
            and not self._lost
        ):
            self._paused = False
            self._last_rx = self.clock.seconds()
            self.transport.resumeProducing()
            if self._decoder.buffered and self._idle_timer is None:
                self._arm_idle_timer(self.limits.idle_timeout)

    def _handle(self, frame: dict[Any, Any]) -> None:
        request_id = frame.get("id", _MISSING)
        if type(request_id) is not int or not _MIN_ID_INT <= request_id <= _MAX_ID_INT:
            if not _usable_id(request_id):
                self._refuse(
                    "request without a usable id",
                    f"id is {_short_repr(request_id) if request_id is not _MISSING else 'missing'}",
                )
                self._close()
                return
        method_name = frame.get("method")
        args = frame.get("args")
        # A one-way request ("noreply": true) is answered only if refused.
        reply = len(frame) == 3
        if not reply and (len(frame) != 4 or frame.get("noreply") is not True):
            method_name = None  # malformed: reported below
        if type(method_name) is not str or type(args) is not dict:
            self._reject(request_id, "malformed request", BadRequest(self._request_problem(frame)))
            return
        running = self._running
        if running and request_id in running:
            self._reject(
                request_id,
                "duplicate request id",
                BadRequest(f"request id {_short_repr(request_id)} is already in flight"),
            )
            return
        method = self._methods.get(method_name)
        if method is None:
            self._reject(
                request_id,
                "unknown method",
                UnknownMethod(f"no method {_short_repr(method_name)}"),
                method=method_name,
            )
            return
        factory = self.server_factory
        if factory is not None:
            counts = factory.requests
            counts[method_name] = counts.get(method_name, 0) + 1
        if method.access is not OPEN and factory is not None and factory.authorize is not None:
            caller = self.caller()
            why = factory.authorize(caller, method.access)
            if why is not None:
                self._reject(
                    request_id,
                    "forbidden",
                    Forbidden(f"{method_name} is not for {caller.role} {caller.name!r}: {why}"),
                    method=method_name,
                )
                return
        if factory is not None and factory.shedding and not method.essential:
            self._count_error(method_name, "BUSY")
            self._send(
                self._error_frame(
                    request_id, Busy(f"node over its memory budget ({factory.buffered_bytes} bytes buffered)")
                )
            )
            return
        try:
            kwargs = method.schema._fast(args)
            if kwargs is None:
                kwargs = method.schema.validate_generic(args)  # says what is wrong
        except _Invalid as e:
            self._reject(
                request_id, "invalid arguments", BadRequest(_describe("args", e)), method=method_name
            )
            return
        except Exception:  # a check callable with a bug: that request fails, not the connection
            self._send_error(Failure(), request_id, method_name)
            return
        if method.takes_reply:
            sink = running[request_id] = Reply(self, request_id, method_name, not reply)
            try:
                method.handler(sink, **kwargs)
            except Exception:
                failure = Failure()
                if not sink.called:
                    sink.errback(failure)
                else:
                    log.failure("rpc: {method} raised after answering", failure, method=method_name)
            return
        try:
            if method.pass_context:
                result = method.handler(
                    CallContext(self.peer, method_name, request_id, self.transport, self.caller()), **kwargs
                )
            else:
                result = method.handler(**kwargs)
        except Exception:
            self._send_error(Failure(), request_id, method_name)
            return
        # type() first: isinstance against Deferred (an ABC subclass) is slow.
        if type(result) is not Deferred and (type(result) in _WIRE_TYPES or not isinstance(result, Deferred)):
            if reply:
                self._send_ok(result, request_id, method_name)
            return
        running[request_id] = result
        result.addCallbacks(
            self._finish_ok if reply else self._finish_quietly,
            self._finish_error,
            callbackArgs=(request_id, method_name),
            errbackArgs=(request_id, method_name),
        )

    @staticmethod
    def _request_problem(frame: dict[Any, Any]) -> str:
        unknown = [k for k in frame if k not in _REQUEST_KEYS]
        if unknown:
            return f"unknown request field(s) {', '.join(sorted(_short_repr(k, 40) for k in unknown)[:5])}"
        if "noreply" in frame and frame["noreply"] is not True:
            return f"noreply must be true if present, got {_short_repr(frame['noreply'])}"
        if "method" not in frame:
            return "request has no method"
        if type(frame["method"]) is not str:
            return f"method must be a str, got {_short_repr(frame['method'])}"
        if "args" not in frame:
            return "request has no args"
        return f"args must be a map, got {_TYPE_NAMES.get(type(frame['args']), type(frame['args']).__name__)}"

    # -- output --------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(frame)
            self._out_bytes += len(frame)
            if self._out_bytes >= FLUSH_BYTES:
                # Replies of one read are written together, but not without
                # bound: the transport must see them to push back (a read of
                # small requests can ask for far more than it holds).
                self._flush()
        else:
            # A reply outside a read (a write committed, a read confirmed):
            # the others of this reactor turn go with it, at its end.
            self._out = [frame]
            self._out_bytes = len(frame)
            self._turn_call = self.clock.callLater(0, self._end_turn)

    def _end_turn(self) -> None:
        self._turn_call = None
        if self._out is not None and not self._lost:
            self._flush()
        self._out = None

    def _flush(self) -> None:
        out = self._out
        if out:
            self._out_bytes = 0
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _finish_ok(self, result: Any, request_id: int | str, method_name: str) -> None:
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            return
        try:
            frame = wire.encode_reply(request_id, result, self._max_frame_bytes)
        except wire.FrameError:
            self._send_ok(result, request_id, method_name)  # logs why, sends INTERNAL
        else:
            self._send(frame)
        if self._backlog:
            self._drain_backlog()

    def _finish_quietly(self, result: Any, request_id: int | str, method_name: str) -> None:
        """A one-way request's handler finished: nothing to send."""
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            return
        if self._backlog:
            self._drain_backlog()

    def _finish_error(self, failure: Failure, request_id: int | str, method_name: str) -> None:
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            # Cancelled because the peer left, or answered already.
            if not failure.check(CancelledError):
                log.failure(
                    "rpc: {method} from {peer} failed after the connection closed",
                    failure,
                    method=method_name,
                    peer=self.peer,
                )
            return
        self._send_error(failure, request_id, method_name)
        if self._backlog:
            self._drain_backlog()

    def _send_ok(self, result: Any, request_id: int | str, method_name: str) -> None:
        try:
            frame = wire.encode_reply(request_id, result, self._max_frame_bytes)
        except wire.FrameError as e:
            log.error(
                "rpc: reply to {method} from {peer} cannot be sent: {why}",
                method=method_name,
                peer=self.peer,
                why=e.message,
            )
            frame = self._error_frame(
                request_id, Internal(f"the reply to {method_name} could not be encoded")
            )
        self._send(frame)

    def _count_error(self, method: Any, code: str) -> None:
        factory = self.server_factory
        if factory is not None:
            key = (method if isinstance(method, str) and method in self._methods else "-", code)
            factory.errors[key] = factory.errors.get(key, 0) + 1

    def _send_error(self, failure: Failure, request_id: int | str, method_name: str) -> None:
        error = failure.value
        self._count_error(method_name, error.code.value if isinstance(error, SurfShardError) else "INTERNAL")
        if isinstance(error, SurfShardError):
            if isinstance(error, (BadRequest, Forbidden)):
                self._refuse(f"{method_name} call", str(error), request_id=request_id, method=method_name)
        else:
            log.failure(
                "rpc: {method} (id {request_id}) from {peer} raised",
                failure,
                method=method_name,
                request_id=request_id,
                peer=self.peer,
            )
            # The caller learns that it failed, not our internals.
            error = Internal(f"internal error in {method_name}")
        self._send(self._error_frame(request_id, error))

    def _error_frame(self, request_id: int | str, error: SurfShardError) -> bytes:
        try:
            return wire.encode_frame(
                {"id": request_id, "error": error.to_wire()}, self.limits.max_frame_bytes, strict=True
            )
        except wire.FrameError:
            # Details that cannot be encoded are dropped, the code survives.
            plain = {"code": error.code.value, "message": str(error.message)[:1000]}
            return wire.encode_frame({"id": request_id, "error": plain})

    def _reject(self, request_id: int | str, what: str, error: SurfShardError, **fields: Any) -> None:
        self._count_error(fields.get("method"), error.code.value)
        self._refuse(what, error.message, request_id=request_id, **fields)
        self._send(self._error_frame(request_id, error))

    def _refuse(self, what: str, why: str, **fields: Any) -> None:
        log.warn("rpc: refused {what} from {peer}: {why}", what=what, peer=self.peer, why=why, **fields)

    # -- closing and timers --------------------------------------------------

    def _close(self) -> None:
        """Stop reading, flush what was written, then close; abort if the
        peer will not take the flush."""
        if self._closing:
            return
        self._closing = True
        self._backlog.clear()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._flush()
        self.transport.loseConnection()
        if not self._lost:
            self._abort_timer = self.clock.callLater(CLOSE_GRACE_SECONDS, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self._lost:
            self.transport.abortConnection()

    def _arm_idle_timer(self, delay: float | None) -> None:
        if delay is None:
            return
        self._idle_timer = self.clock.callLater(delay, self._idle_check)

    def _idle_check(self) -> None:
        """A partial frame is waiting: close if nothing arrived for the whole
        timeout, else check again when it would have run out."""
        self._idle_timer = None
        timeout = self.limits.idle_timeout
        if self._closing or self._lost or self._paused or not self._decoder.buffered or timeout is None:
            return
        quiet = self.clock.seconds() - self._last_rx
        if quiet >= timeout - 1e-9:
            self._refuse(
                "idle connection",
                f"{self._decoder.buffered} bytes of a partial frame and nothing for {quiet:.1f}s",
            )
            self._close()
            self.transport.abortConnection()
        else:
            self._arm_idle_timer(timeout - quiet)


class RpcServerFactory(ServerFactory):
    """Builds server connections for one method table; tracks them so a
    service can report or close them."""

    noisy = False

    def __init__(
        self,
        table: MethodTable,
        clock: IReactorTime,
        limits: ServerLimits | None = None,
        *,
        identify: Callable[[Any], Caller] | None = None,
        authorize: Authorizer | None = None,
    ) -> None:
        self.table = table
        self.clock = clock
        self.limits = limits or ServerLimits()
        #: Who a connection's peer is (from its transport: the TLS
        #: certificate), and whether it may call a method that is not open
        #: to all. Both None: the network is trusted, nothing is checked.
        self.identify = identify
        self.authorize = authorize
        self.connections: set[RpcServerProtocol] = set()
        #: For metrics: requests by method, and refusals and failures by
        #: (method, error code) ("-" for a method that does not exist).
        self.requests: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        #: The bytes held in all connections' buffers at the last count, and
        #: whether that is over the budget (new non-essential work is shed).
        self.buffered_bytes = 0
        self.shedding = False
        self._accounting: task.LoopingCall | None = None
        self._sources: list[Callable[[], int]] = []

    def add_buffer_source(self, source: Callable[[], int]) -> None:
        """Count ``source()`` bytes in the budget too: buffers the node
        holds outside these connections (HTTP bodies being read, a Raft
        snapshot arriving in chunks)."""
        self._sources.append(source)

    def startFactory(self) -> None:
        if self.limits.memory_budget is not None and self._accounting is None:
            self._accounting = task.LoopingCall(self.account)
            self._accounting.clock = self.clock
            self._accounting.start(ACCOUNT_INTERVAL, now=False)

    def stopFactory(self) -> None:
        if self._accounting is not None and self._accounting.running:
            self._accounting.stop()
        self._accounting = None

    def account(self) -> None:
        """Count the bytes held in every connection's buffers and shed new
        work while they pass the budget (a sample every ACCOUNT_INTERVAL:
        counting per request would cost more than it saves)."""
        total = sum(proto.buffered_bytes() for proto in self.connections)
        total += sum(source() for source in self._sources)
        self.buffered_bytes = total
        budget = self.limits.memory_budget
        shedding = budget is not None and total > budget
        if shedding != self.shedding:
            self.shedding = shedding
            if shedding:
                log.warn(
                    "rpc: {total} bytes buffered over {n} connections, over the budget of {budget}: "
                    "answering BUSY to new work",
                    total=total,
                    n=len(self.connections),
                    budget=budget,
                )
            else:
                log.info("rpc: back under the memory budget ({total} bytes buffered)", total=total)

    def buildProtocol(self, addr: Any) -> RpcServerProtocol:
        proto = RpcServerProtocol(self.table, self.clock, self.limits)
        proto.factory = self
        proto.server_factory = self
        self.connections.add(proto)
        proto.notify_lost(lambda _reason: self.connections.discard(proto))
        return proto
