"""The process-level assembly of one replica: ``ReplicaService``.

A metadata group replica and a ShardMaster replica are both "a state machine
behind a RaftNode behind one port". ``ReplicaService`` builds that shared
part (storage in the node's data directory, the Raft transport over the
native protocol, the method table, the HTTP side, the listening port) as a
``MultiService`` for twistd.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource

from raft.interfaces import IStateMachine
from raft.node import RaftNode
from raft.stats import StageTracer
from raft.storage import DiskStorage
from raft.types import RaftConfig
from surfshard.config import ClusterConfig, NodeKind, node_name, parse_address
from surfshard.net.methods import Access, MethodTable
from surfshard.net.pool import RpcClientPool
from surfshard.net.port import NodeRoot, listen_now, make_site, node_factory
from surfshard.net.server import RpcServerFactory, server_limits
from surfshard.net.tls import TLSFiles
from surfshard.observe.metrics import MetricsResource, node_registry
from surfshard.observe.statuspage import ClusterResource, ClusterView, PageResource
from surfshard.replica.access import server_access
from surfshard.replica.control import ReplicaControl, plain
from surfshard.replica.membership import GroupMembership
from surfshard.replica.raft_transport import RpcRaftTransport


class StatusResource(Resource):
    """``GET /status``: the node's status as JSON, for humans and scripts."""

    isLeaf = True

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self._status(), sort_keys=True).encode("utf-8")


class ReplicaService(service.MultiService):
    """One replica process: RaftNode + state machine + port.

    Subclasses (or callers) add their own methods to ``self.table`` and
    resources to ``self.root`` before the service starts.
    """

    log = Logger()
    name: str  # type: ignore[assignment]  # Service declares name = None; always set here

    def __init__(
        self,
        cluster: ClusterConfig,
        kind: NodeKind,
        gid: int,
        index: int,
        state_machine: IStateMachine,
        reactor: Any,
        *,
        chaos: bool | None = None,
        fsync: bool | None = None,
        listen_interface: str | None = None,
        rng: random.Random | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__()
        addresses = cluster.nodes_of(kind, gid)
        if index < 0 or (index >= len(addresses) and address is None):
            raise ValueError(
                f"node index {index} out of range: the config lists {len(addresses)} nodes "
                "(a node added to a running group also needs its address)"
            )
        self.cluster = cluster
        self.kind = kind
        self.gid = gid
        self.index = index
        self.name = node_name(kind, gid, index)
        self.address = address if address is not None else addresses[index]
        self.reactor = reactor
        # Raft ids are 1-based so that "no node" can never be confused with
        # node 0. The config's nodes are the group's bootstrap members; the
        # address book follows membership changes from there
        # (surfshard.replica.membership keeps ``control.addresses`` and the
        # transport's in step): this is only where it starts.
        bootstrap = {i + 1: a for i, a in enumerate(addresses)}
        raft_id = index + 1
        self.raft_addresses = {**bootstrap, raft_id: self.address}
        timings = cluster.raft
        self.tls_files = _tls_files(cluster, self.name)
        self.pool = RpcClientPool(reactor, tls=self.tls_files)
        # Raft's peers get a pool of their own whose reconnect backoff stops
        # at the heartbeat interval: a restarted follower is reached at the
        # next heartbeat, not after the client pool's backoff of seconds.
        heartbeat = timings.tick_ms / 1000.0 * timings.heartbeat_ticks
        self.peer_pool = RpcClientPool(
            reactor, tls=self.tls_files, backoff_initial=heartbeat / 4, backoff_max=heartbeat
        )
        self.data_dir = Path(cluster.node_data_dir(kind, gid, index))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.storage = DiskStorage(
            str(self.data_dir / "raft"), fsync=timings.fsync if fsync is None else fsync
        )
        self.transport = RpcRaftTransport(
            self.peer_pool, raft_id, self.raft_addresses, group=self.name.rsplit("-", 1)[0]
        )
        self.state_machine = state_machine
        self.node = RaftNode(
            RaftConfig(
                id=raft_id,
                peers=tuple(sorted(bootstrap)),
                election_ticks=timings.election_ticks,
                heartbeat_ticks=timings.heartbeat_ticks,
                max_snapshot_bytes=cluster.limits.max_snapshot_bytes,
            ),
            self.storage,
            self.transport,
            state_machine,
            reactor,
            tick_interval=timings.tick_ms / 1000.0,
            snapshot_entries=timings.snapshot_entries,
            rng=rng,
        )
        self.node.setServiceParent(self)
        # A leader's process that dies closes its connections: its
        # followers campaign at once instead of an election timeout later.
        self.peer_pool.on_connection_lost(self._peer_connection_lost)
        # Stage timestamps of every Nth entry, for benchmarks/breakdown.py.
        trace_every = int(os.environ.get("SURFSHARD_TRACE_EVERY", "0") or 0)
        if trace_every > 0:
            self.node.tracer = StageTracer(trace_every)
        self.table = MethodTable(service=self.name)
        self.table.add(
            "raft",
            self.transport.deliver_from,
            RpcRaftTransport.method_args(),
            essential=True,
            pass_context=True,
            access=(Access.PEER,),
        )
        self.table.add("ping", lambda: True, essential=True)
        self.control = self.make_control(cluster.chaos if chaos is None else chaos)
        self.control.add_methods(self.table)
        self.membership = GroupMembership(
            self.control,
            reactor,
            on_addresses=self._addresses_changed,
            pool=self.pool,
            seeds=tuple(a for a in addresses if a != self.address),
        )
        self.membership.add_methods(self.table)
        self.membership.setServiceParent(self)
        self.root = NodeRoot()
        self.root.add("status", StatusResource(self.status))
        self.rpc_factory: RpcServerFactory | None = None
        self.root.add("metrics", MetricsResource(node_registry(self)))
        self.root.add("cluster", ClusterResource(ClusterView(cluster, self.pool, self.name, self.reactor)))
        self.root.index = PageResource()
        host, self.port_number = parse_address(self.address)
        self.listen_interface = host if listen_interface is None else listen_interface
        self.listening_port: Any = None

    def make_control(self, chaos: bool) -> ReplicaControl:
        return ReplicaControl(
            self.node, self.raft_addresses, self.reactor, chaos=chaos, transfer=self._ask_transfer
        )

    def _ask_transfer(self, leader: int, to: int) -> defer.Deferred:
        return self.pool.call(self.control.addresses[leader], "transfer_leadership", {"to": to}, timeout=2.0)

    def _addresses_changed(self, book: dict[int, str]) -> None:
        self.transport.addresses = dict(book)

    def _peer_connection_lost(self, address: str) -> None:
        for raft_id, peer_address in self.transport.addresses.items():
            if peer_address == address and raft_id != self.node.config.id:
                self.node.peer_unreachable(raft_id)

    def status(self) -> dict[str, Any]:
        status = self.control.status()
        status.update(
            name=self.name, kind=self.kind.value, gid=self.gid, index=self.index, address=self.address
        )
        return plain(status)

    def startService(self) -> None:
        super().startService()
        rpc = self.rpc_factory = RpcServerFactory(
            self.table, self.reactor, server_limits(self.cluster), **server_access(self.cluster, self.name)
        )
        rpc.add_buffer_source(lambda: self.node.buffered_bytes)
        factory = node_factory(
            rpc,
            make_site(self.root, clock=self.reactor, max_body=self.cluster.limits.max_http_body),
            self.reactor,
            tls=self.tls_files,
            max_connections=self.cluster.limits.max_connections,
        )
        try:
            self.listening_port = listen_now(self.reactor, self.port_number, factory, self.listen_interface)
        except Exception as e:
            self.log.critical(
                "{name}: cannot listen on {address}: {e}", name=self.name, address=self.address, e=e
            )
            raise
        self.log.info(
            "{name} serving on {address}, state in {data_dir}",
            name=self.name,
            address=self.address,
            data_dir=str(self.data_dir),
        )

    @defer.inlineCallbacks
    def stopService(self):
        if self.listening_port is not None:
            yield self.listening_port.stopListening()
            self.listening_port = None
        yield self.pool.close()
        yield self.peer_pool.close()
        yield super().stopService()
        self.storage.close()


def _tls_files(cluster: ClusterConfig, name: str) -> TLSFiles | None:
    if cluster.tls is None:
        return None
    cert, key = cluster.tls.cert_paths(name)
    return TLSFiles(ca=str(cluster.tls.ca), cert=str(cert), key=str(key))
