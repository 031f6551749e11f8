"""The native RPC protocol in simulated time, without sockets.

``SimRpcNetwork`` lets the real client libraries (``LeaderCaller``,
``MetadataClient``, the ShardMaster client...) call any service's
``MethodTable`` on a ``twisted.internet.task.Clock``, with seeded faults:

- what crosses it is what crosses the wire: requests and replies are encoded
  with ``surfshard.net.wire.encode_frame`` and decoded with ``decode_payload``
  (so nothing is shared by reference and only wire types survive), and the
  server side IS ``surfshard.net.server.RpcServerProtocol``: the same method
  lookup, schema validation, error mapping and refusal logging as a real
  node (unknown method -> UNKNOWN_METHOD, bad args -> BAD_REQUEST, a
  handler's ``SurfShardError`` -> its code, anything else -> INTERNAL);
- error replies become the typed exceptions through ``error_from_wire``;
- every request and reply is delivered after a random delay and may be
  dropped; a dropped one leaves the caller waiting until its timeout, when
  the call fails with ``Timeout``, as on a connection that went quiet;
- partitions, isolation and one-way cuts between named endpoints (server
  addresses and pool names): calling an endpoint one cannot reach, or an
  address nobody serves, fails with ``Unavailable`` after a short delay (a
  refused connection); messages in flight when a link is cut are lost;
- replacing or unregistering a server is a process death: its connections
  are lost, callers waiting on them get ``Unavailable`` and the handlers
  still running are cancelled, as ``RpcServerProtocol`` does.

Every random choice comes from one ``random.Random`` seeded from ``seed``,
so a run is a function of its seed (and of what the caller does).

``SimReplicaGroup`` builds on it: an n-node Raft-replicated service (any
state machine and ``ReplicaControl``) in simulated time, Raft messages over
``raft.testing.simnet``, client calls over a ``SimRpcNetwork``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from raft.testing.simnet import Reachability
from surfshard.errors import BadRequest, Internal, Timeout, Unavailable, error_from_wire
from surfshard.net import wire
from surfshard.net.interfaces import IPipelinedPool
from surfshard.net.methods import MethodTable, ReplySink
from surfshard.net.pool import encode_notification
from surfshard.net.server import RpcServerProtocol, ServerLimits
from surfshard.replica.membership import GroupMembership

__all__ = ["SimReplicaGroup", "SimRpcNetwork", "SimRpcPool", "resolve"]

log = Logger()


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


class _SimPeer:
    """What ``getPeer()`` returns: ``format_peer`` prints it as the name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return self.name


class _ServerTransport:
    """The transport ``RpcServerProtocol`` writes its replies to. The
    protocol may batch several replies into one write; each frame is handed
    to the network as its own reply message."""

    def __init__(self, connection: _SimConnection) -> None:
        self._connection = connection

    def write(self, data: bytes) -> None:
        prefix = wire.LENGTH_PREFIX_BYTES
        offset = 0
        # Bounded: every pass consumes at least the prefix of one frame.
        while offset < len(data):
            length = int.from_bytes(data[offset : offset + prefix], "big")
            end = offset + prefix + length
            self._connection.net._send_reply(self._connection, data[offset:end])
            offset = end

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        # Not synchronously: the protocol closes from inside its own input path.
        self._connection.net.clock.callLater(0, self._connection.lose, "closed by the server")

    def abortConnection(self) -> None:
        self.loseConnection()

    def pauseProducing(self) -> None:
        # Whole frames arrive one per delivery; the protocol parks what is
        # over its in-flight cap in its own backlog.
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The simulated network has no send buffer to fill: the producer is
        never paused for writing."""

    def unregisterProducer(self) -> None:
        pass

    def getPeer(self) -> _SimPeer:
        return _SimPeer(self._connection.pool.name)

    def getHost(self) -> _SimPeer:
        return _SimPeer(self._connection.address)


class _PendingCall:
    __slots__ = ("deferred", "method", "timer")

    def __init__(self, deferred: ReplySink, method: str, timer: Any) -> None:
        self.deferred = deferred
        self.method = method
        self.timer = timer


class _SimConnection:
    """One pool's connection to one server: the client side's pending calls
    and the server side's ``RpcServerProtocol``."""

    def __init__(self, net: SimRpcNetwork, pool: SimRpcPool, address: str, server: _Server) -> None:
        self.net = net
        self.pool = pool
        self.address = address
        self.server = server
        self.alive = True
        self.pending: dict[int, _PendingCall] = {}
        self._next_id = 1
        self.protocol = RpcServerProtocol(server.table, net.clock, server.limits)
        self.protocol.makeConnection(_ServerTransport(self))
        server.connections[self] = None

    def call(self, method: str, args: Any, timeout: float | None) -> Deferred[Any]:
        call_id = self._next_id

        def forget(_d: Deferred[Any]) -> None:
            self.forget(call_id)

        d: Deferred[Any] = Deferred(forget)
        try:
            self.call_into(d, method, args, timeout)
        except BadRequest as e:
            return defer.fail(e)
        return d

    def call_into(self, sink: ReplySink, method: str, args: Any, timeout: float | None) -> int:
        """``RpcConnection.call_into``: the outcome goes to ``sink``; returns
        the call id (for ``forget``); raises BadRequest if it cannot be
        encoded, having sent nothing."""
        call_id = self._next_id
        self._next_id += 1
        try:
            frame = wire.encode_frame(
                {"id": call_id, "method": method, "args": {} if args is None else args},
                self.server.limits.max_frame_bytes,
            )
        except wire.FrameError as e:
            raise BadRequest(f"cannot send {method}: {e.message}") from None
        timer = None
        if timeout is not None:
            timer = self.net.clock.callLater(max(0.0, timeout), self._expire, call_id)
        self.pending[call_id] = _PendingCall(sink, method, timer)
        self.net._send_request(self, frame)
        return call_id

    def notify(self, method: str, args: Any) -> None:
        """Send a one-way request; a refusal that comes back is dropped
        (its negative id matches no pending call)."""
        frame = encode_notification(method, args, self.server.limits.max_frame_bytes)
        self.net._send_request(self, frame)

    def forget(self, call_id: int) -> None:
        """Drop a pending call: a late reply to it is ignored."""
        self._forget(call_id)

    def _forget(self, call_id: int) -> None:
        call = self.pending.pop(call_id, None)
        if call is not None and call.timer is not None and call.timer.active():
            call.timer.cancel()

    def _expire(self, call_id: int) -> None:
        call = self.pending.pop(call_id, None)
        if call is not None:
            self.net.timeouts += 1
            call.deferred.errback(Timeout(f"{call.method} to {self.address} got no reply in time"))

    def receive(self, frame: bytes) -> None:
        """A reply frame reached the client side."""
        try:
            reply = wire.decode_payload(frame[wire.LENGTH_PREFIX_BYTES :])
        except wire.FrameError as e:
            # A real client drops a connection whose stream it cannot read.
            self.lose(f"undecodable reply: {e.message}")
            return
        reply_id = reply.get("id")
        call = self.pending.pop(reply_id, None) if type(reply_id) is int else None
        if call is None:
            return  # late: the call timed out or was cancelled
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        self.net.replies += 1
        if "ok" in reply:
            call.deferred.callback(reply["ok"])
        elif "error" in reply:
            call.deferred.errback(error_from_wire(reply["error"]))
        else:
            call.deferred.errback(Internal(f"malformed reply to {call.method}"))

    def lose(self, why: str, notify_after: float = 0.0) -> None:
        """The connection is gone (server process died, protocol error): the
        server side stops at once (its running handlers are cancelled, as
        ``RpcServerProtocol`` does); the caller's pending calls fail with
        Unavailable ``notify_after`` seconds later, as with a TCP reset."""
        if not self.alive:
            return
        self.alive = False
        self.server.connections.pop(self, None)
        self.pool._forget_connection(self)
        self.protocol.connectionLost(Failure(ConnectionLost(why)))
        if notify_after > 0:
            self.net.clock.callLater(notify_after, self._lost, why)
        else:
            self._lost(why)

    def _lost(self, why: str) -> None:
        self._fail_pending(why)
        self.pool._connection_lost(self.address)

    def _fail_pending(self, why: str) -> None:
        pending, self.pending = self.pending, {}
        for call in pending.values():
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.deferred.errback(
                Unavailable(f"connection to {self.address} lost during {call.method}: {why}")
            )

    def close_quietly(self) -> None:
        """Client-side close: pending calls fail, the server sees a clean close."""
        if not self.alive:
            return
        self.alive = False
        self.server.connections.pop(self, None)
        self.protocol.connectionLost(Failure(ConnectionDone("client closed")))
        pending, self.pending = self.pending, {}
        for call in pending.values():
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.deferred.errback(Unavailable(f"the client pool is closed ({call.method} to {self.address})"))


class _Server:
    __slots__ = ("address", "connections", "limits", "table")

    def __init__(self, address: str, table: MethodTable, limits: ServerLimits) -> None:
        self.address = address
        self.table = table
        self.limits = limits
        # A dict, not a set: iteration order must not depend on object ids,
        # or a seeded run would not replay.
        self.connections: dict[_SimConnection, None] = {}


# ---------------------------------------------------------------------------
# Pools and the network
# ---------------------------------------------------------------------------


@implementer(IPipelinedPool)
class SimRpcPool:
    """The client side for one named endpoint: ``RpcClientPool``'s seam
    (``IRpcPool`` and ``IPipelinedPool``) over the simulated network."""

    def __init__(self, net: SimRpcNetwork, name: str) -> None:
        self.net = net
        self.name = name
        self.closed = False
        self._connections: dict[str, _SimConnection] = {}
        self._lost_observers: list[Callable[[str], object]] = []

    def on_connection_lost(self, callback: Callable[[str], object]) -> None:
        self._lost_observers.append(callback)

    def _connection_lost(self, address: str) -> None:
        if not self.closed:
            for observer in list(self._lost_observers):
                try:  # as the real pool: one observer's bug stops no other
                    observer(address)
                except Exception:
                    log.failure("connection-lost observer {observer!r} failed", observer=observer)

    def call(
        self, address: str, method: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """Fires with the result; fails with the typed error the server
        answered, ``Unavailable`` (unreachable, no such server, connection
        lost) or ``Timeout`` (no reply within ``timeout`` seconds).
        Cancelling it forgets the call (the server may still run it)."""
        if self.closed:
            return defer.fail(Unavailable("the client pool is closed"))
        net = self.net
        net.requests += 1
        server = net._servers.get(address)
        if server is None or not net.connected(self.name, address):
            net.refused += 1
            why = "nothing serves it" if server is None else "unreachable"
            return net._refuse(f"cannot connect to {address} from {self.name}: {why}", timeout, method)
        connection = self._connections.get(address)
        if connection is None or not connection.alive or connection.server is not server:
            connection = self._connections[address] = _SimConnection(net, self, address, server)
        return connection.call(method, args, timeout)

    def _established(self, address: str) -> _SimConnection | None:
        connection = self._connections.get(address)
        if connection is None or not connection.alive or self.closed:
            return None
        if self.net._servers.get(address) is not connection.server:
            return None
        return connection

    def call_into(
        self,
        address: str,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[_SimConnection, int] | None:
        """See ``IPipelinedPool.call_into``: None (nothing sent) without an
        established connection, as ``RpcClientPool`` does."""
        connection = self._established(address)
        if connection is None or not self.net.connected(self.name, address):
            return None  # ``call`` then refuses it as unreachable, as before
        self.net.requests += 1
        return connection, connection.call_into(sink, method, args, timeout)

    def notify(self, address: str, method: str, args: Mapping[str, Any] | None = None) -> bool:
        """See ``IPipelinedPool.notify``."""
        if self.closed:
            return False
        server = self.net._servers.get(address)
        if server is None or not self.net.connected(self.name, address):
            return False
        connection = self._connections.get(address)
        if connection is None or not connection.alive or connection.server is not server:
            connection = self._connections[address] = _SimConnection(self.net, self, address, server)
        connection.notify(method, args)
        return True

    def _forget_connection(self, connection: _SimConnection) -> None:
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]

    def close(self) -> Deferred[None]:
        """Fail every pending call with Unavailable and refuse new ones."""
        self.closed = True
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            connection.close_quietly()
        return defer.succeed(None)


class SimRpcNetwork(Reachability[str]):
    """Seeded, lossy, delaying, partitionable native RPC on one ``Clock``.

    Endpoints are strings: server addresses (``register``) and pool names
    (``pool``). ``partition(*groups)`` confines the endpoints it lists to
    their own group; endpoints it does not list (typically the clients)
    still reach everyone, so a test can partition the replicas of a group
    and keep clients talking to both sides. ``isolate`` and ``cut`` work on
    top of that.
    """

    def __init__(
        self,
        clock: IReactorTime,
        seed: int,
        *,
        delay: tuple[float, float] = (0.001, 0.005),
        drop_request: float = 0.0,
        drop_reply: float = 0.0,
        refuse_delay: float = 0.002,
    ) -> None:
        self.clock = clock
        self.seed = seed
        self.rng = random.Random(f"simrpc:{seed}")
        self.delay = (0.0, 0.0)
        self.drop_request = 0.0
        self.drop_reply = 0.0
        self.refuse_delay = refuse_delay
        self.set_faults(delay=delay, drop_request=drop_request, drop_reply=drop_reply)
        self._servers: dict[str, _Server] = {}
        # Endpoints no partition group lists (the clients) reach everyone.
        Reachability.__init__(self, unlisted_reach_all=True)
        # Counters, for tests that must show a fault actually happened.
        self.requests = 0
        self.replies = 0
        self.refused = 0
        self.timeouts = 0
        self.requests_dropped = 0
        self.replies_dropped = 0

    # -- servers and clients ------------------------------------------------

    def register(self, address: str, table: MethodTable, limits: ServerLimits | None = None) -> None:
        """Serve ``table`` at ``address``. Replacing an existing server is a
        restart: its connections are lost first."""
        self.unregister(address)
        self._servers[address] = _Server(address, table, limits or ServerLimits())

    def unregister(self, address: str) -> None:
        """Stop serving ``address`` (a process death): connections to it are
        lost, new calls are refused."""
        server = self._servers.pop(address, None)
        if server is None:
            return
        for connection in list(server.connections):
            # Callers learn of it shortly after, not inside the code that
            # stopped the server.
            connection.lose(f"{address} went away", notify_after=self._delay())

    def serves(self, address: str) -> bool:
        return address in self._servers

    def pool(self, client_name: str) -> SimRpcPool:
        """A client pool calling from endpoint ``client_name``."""
        return SimRpcPool(self, client_name)

    # -- faults -------------------------------------------------------------

    def set_faults(
        self,
        *,
        delay: tuple[float, float] | None = None,
        drop_request: float | None = None,
        drop_reply: float | None = None,
    ) -> None:
        """Change the delay range and drop probabilities (unchanged if None)."""
        if delay is not None:
            lo, hi = delay
            if not 0.0 <= lo <= hi:
                raise ValueError(f"bad delay range {delay!r}")
            self.delay = (lo, hi)
        for name, p in (("drop_request", drop_request), ("drop_reply", drop_reply)):
            if p is not None:
                if not 0.0 <= p <= 1.0:
                    raise ValueError(f"{name} must be a probability, not {p!r}")
                setattr(self, name, p)

    # -- delivery -------------------------------------------------------------

    def _delay(self) -> float:
        return self.rng.uniform(*self.delay)

    def _refuse(self, why: str, timeout: float | None, method: str) -> Deferred[Any]:
        """A refused connection: Unavailable shortly, unless the caller's
        timeout runs out first."""
        d: Deferred[Any] = Deferred()
        if timeout is not None and timeout < self.refuse_delay:
            self.clock.callLater(
                max(0.0, timeout), d.errback, Timeout(f"{method} got no reply in time: {why}")
            )
        else:
            self.clock.callLater(self.refuse_delay, d.errback, Unavailable(why))
        return d

    def _send_request(self, connection: _SimConnection, frame: bytes) -> None:
        if self.rng.random() < self.drop_request:
            self.requests_dropped += 1
            return
        self.clock.callLater(self._delay(), self._deliver_request, connection, frame)

    def _deliver_request(self, connection: _SimConnection, frame: bytes) -> None:
        if not connection.alive or not self.connected(connection.pool.name, connection.address):
            self.requests_dropped += 1
            return
        # Runs the real server-side dispatch: decode, look up, validate, call.
        connection.protocol.dataReceived(frame)

    def _send_reply(self, connection: _SimConnection, frame: bytes) -> None:
        if self.rng.random() < self.drop_reply:
            self.replies_dropped += 1
            return
        self.clock.callLater(self._delay(), self._deliver_reply, connection, frame)

    def _deliver_reply(self, connection: _SimConnection, frame: bytes) -> None:
        if not connection.alive or not self.connected(connection.address, connection.pool.name):
            self.replies_dropped += 1
            return
        connection.receive(frame)


# ---------------------------------------------------------------------------
# A Raft-replicated service in simulated time
# ---------------------------------------------------------------------------

#: ``make_control(node, state_machine, addresses, reactor, chaos, transfer)``:
#: the service's ``ReplicaControl`` (or subclass) for one freshly started node.
ControlFactory = Callable[..., Any]
#: ``services(i, node, state_machine, pool)``: the background services of
#: replica ``i`` (started by the group, stopped with the node).
ServicesFactory = Callable[[int, Any, Any, Any], list[Any]]


class SimReplicaGroup:
    """n replicas of one Raft-replicated service in simulated time.

    ``raft.testing.simnet.SimCluster`` runs the Raft nodes (ids 1..n; Raft messages
    over its ``SimNetwork``); each live node also gets a control object from
    ``make_control`` (e.g. a ``MetadataReplica``) whose method table
    (``ping``, the common replica calls, then ``methods(control)``) is
    served at ``address_of(i)`` on a ``SimRpcNetwork``, as a real process
    serves it on its port. A restart builds the node, the state machine, the
    control object and the table anew, over the same storage.

    Connectivity methods here act on the replicas only (Raft messages and
    replica-to-replica RPCs such as leadership-transfer requests); clients
    keep reaching every replica unless a test also cuts them in ``rpc``.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        *,
        machine_factory: Callable[[int], Any],
        make_control: ControlFactory,
        methods: Callable[[Any], MethodTable] | None = None,
        chaos: bool = True,
        address_of: Callable[[int], str] = lambda i: f"n{i}:1",
        transfer_timeout: float = 2.0,
        rpc: SimRpcNetwork | None = None,
        services: ServicesFactory | None = None,
        **cluster_kwargs: Any,
    ) -> None:
        from raft.testing.simnet import SimCluster  # late: keeps simrpc importable without raft's test tools

        self.seed = seed
        # A shared network brings its clock (a task.Clock in simulation).
        clock: Any = rpc.clock if rpc is not None else None
        self.cluster = SimCluster(
            n, seed, state_machine_factory=machine_factory, clock=clock, **cluster_kwargs
        )
        self.clock = self.cluster.clock
        self.ids = list(self.cluster.ids)
        #: The RPC network: this group's own, or one shared by a world of groups.
        self.rpc = rpc if rpc is not None else SimRpcNetwork(self.clock, seed)
        self._services_factory = services
        #: Per live replica, the background services a process would run
        #: beside it (e.g. a shard-map watcher), restarted with it.
        self.services: dict[int, list[Any]] = {}
        self.addresses: dict[int, str] = {i: address_of(i) for i in self.ids}
        self.id_of: dict[str, int] = {a: i for i, a in self.addresses.items()}
        self.chaos = chaos
        self.transfer_timeout = transfer_timeout
        self._make_control = make_control
        self._methods = methods
        #: Each replica's own client pool (for replica-to-replica calls).
        self.node_pools = {i: self.rpc.pool(self.addresses[i]) for i in self.ids}
        self.controls: dict[int, Any] = {}
        #: Each live replica's membership calls and upkeep.
        self.memberships: dict[int, GroupMembership] = {}
        self.sync()

    # -- replicas ---------------------------------------------------------------

    def sync(self) -> None:
        """Attach a control object and serve a table for every running node
        whose control object is missing or belongs to an older node (after
        ``cluster.start`` or ``cluster.converge`` restarted it directly)."""
        for i in self.ids:
            node = self.cluster.nodes.get(i)
            if node is None or not node.running:
                continue
            control = self.controls.get(i)
            if control is None or control.node is not node:
                self._attach(i)

    def _attach(self, i: int) -> None:
        node = self.cluster.nodes[i]
        pool = self.node_pools[i]

        def transfer(leader: int, to: int) -> Deferred[Any]:
            return pool.call(self.addresses[leader], "transfer_leadership", {"to": to}, self.transfer_timeout)

        control = self._make_control(
            node, self.cluster.state_machines[i], self.addresses, self.clock, self.chaos, transfer
        )
        table = MethodTable(service=f"sim-{self.addresses[i]}")
        table.add("ping", lambda: True)
        control.add_methods(table)
        membership = GroupMembership(control, self.clock)
        membership.add_methods(table)
        self.memberships[i] = membership
        if self._methods is not None:
            table.include(self._methods(control))
        self.controls[i] = control
        self.rpc.register(self.addresses[i], table)
        self._stop_services(i)
        started = [membership]
        if self._services_factory is not None:
            started += self._services_factory(i, node, self.cluster.state_machines[i], pool)
        for s in started:
            s.startService()
        self.services[i] = started

    def _stop_services(self, i: int) -> None:
        for s in self.services.pop(i, []):
            if s.running:
                s.stopService()

    def control(self, i: int) -> Any:
        return self.controls[i]

    def node(self, i: int) -> Any:
        return self.cluster.nodes[i]

    def start(self, i: int) -> None:
        self.cluster.start(i)
        self._attach(i)

    def stop(self, i: int) -> None:
        """A process death: the node stops, its port stops answering."""
        self._stop_services(i)
        self.cluster.stop(i)
        self.rpc.unregister(self.addresses[i])

    def restart(self, i: int) -> None:
        self.stop(i)
        self.start(i)

    def add(self, i: int, address: str) -> None:
        """Start a new server ``i`` at ``address``; it becomes a member once
        the leader adds it (``member_add``)."""
        self.addresses[i] = address
        self.id_of[address] = i
        self.node_pools[i] = self.rpc.pool(address)
        self.ids.append(i)
        self.cluster.add_node(i)
        self._attach(i)

    def retire(self, i: int) -> None:
        """Stop a removed server for good."""
        self.stop(i)
        self.cluster.retire(i)
        self.ids.remove(i)

    def crash(self, i: int) -> None:
        """SurfStore's simulated crash: frozen, still answering CRASHED."""
        self.cluster.crash(i)

    def restore(self, i: int) -> None:
        self.cluster.restore(i)

    # -- connectivity (between replicas) ------------------------------------------

    def partition(self, *groups: Iterable[int]) -> None:
        """Replicas reach only the replicas of their own group (a replica in
        no group reaches none); clients still reach every replica."""
        self.cluster.net.partition(*[list(g) for g in groups])
        listed = {i for g in groups for i in g}
        rpc_groups = [[self.addresses[i] for i in g] for g in groups]
        rpc_groups += [[self.addresses[i]] for i in self.ids if i not in listed]
        self.rpc.partition(*rpc_groups)

    def isolate(self, i: int) -> None:
        """Cut replica i off from the other replicas (not from clients)."""
        self.cluster.net.isolate(i)
        for j in self.ids:
            if j != i:
                self.rpc.cut(self.addresses[i], self.addresses[j])

    def reconnect(self, i: int) -> None:
        self.cluster.net.reconnect(i)
        self.rpc.reconnect(self.addresses[i])

    def heal(self) -> None:
        self.cluster.net.heal()
        self.rpc.heal()

    # -- time and leaders ------------------------------------------------------------

    def run(self, seconds: float, step: float = 0.005) -> None:
        """Advance simulated time in small steps (checking Raft's invariants)."""
        self.cluster.run(seconds, step)

    def run_until(self, predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> bool:
        return self.cluster.run_until(predicate, timeout, step)

    def wait_for_leader(self, timeout: float = 10.0) -> int:
        return self.cluster.wait_for_leader(timeout)

    def leader_address(self) -> str | None:
        leader = self.cluster.leader()
        return None if leader is None else self.addresses[leader]

    def converge(self, timeout: float = 30.0) -> None:
        """Heal everything, bring every node back, run until all applied
        everything committed."""
        self.rpc.heal()
        self.cluster.converge(timeout)
        self.sync()

    def settle(self, deferreds: Iterable[Deferred[Any]], timeout: float, step: float = 0.005) -> bool:
        """Run until every Deferred has fired (True) or ``timeout`` passes."""
        pending = list(deferreds)
        return self.run_until(lambda: all(d.called for d in pending), timeout, step)

    def stop_all(self) -> None:
        for i in list(self.services):
            self._stop_services(i)
        for pool in self.node_pools.values():
            pool.close()
        self.cluster.stop_all()


def resolve(d: Deferred[Any]) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)`` of a fired Deferred,
    consuming a failure (for tests driving the clock by hand)."""
    if not d.called:
        raise AssertionError("the Deferred has not fired")
    box: list[tuple[bool, Any]] = []
    d.addCallbacks(lambda r: box.append((True, r)), lambda f: box.append((False, f.value)))
    return box[0]
