"""A client for a whole cluster as its config describes it.

``ClusterClient`` owns the connection pool (with the client's TLS identity
when the config enables TLS) and hands out per-group metadata clients,
routing a filename to the group that serves its shard: the one group of a
static cluster, or the owner in the ShardMaster's latest map.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from client.metadata_client import MetadataClient
from surfshard import errors
from surfshard.config import ClusterConfig
from surfshard.net.interfaces import IRpcPool
from surfshard.net.pool import RpcClientPool
from surfshard.net.tls import TLSFiles
from surfshard.shardmap import ShardMap

#: The certificate name a command-line client presents when TLS is on.
CLIENT_CERT_NAME = "client"


def client_tls(cluster: ClusterConfig) -> TLSFiles | None:
    if cluster.tls is None:
        return None
    cert, key = cluster.tls.cert_paths(CLIENT_CERT_NAME)
    return TLSFiles(ca=str(cluster.tls.ca), cert=str(cert), key=str(key))


class ClusterClient:
    """Routes SurfStore calls by filename across the cluster's groups."""

    def __init__(
        self,
        cluster: ClusterConfig,
        reactor: IReactorTime,
        *,
        pool: IRpcPool | None = None,
        timeout: float = 30.0,
        client_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.pool = pool if pool is not None else RpcClientPool(reactor, tls=client_tls(cluster))
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.rng = rng or random.Random()
        self._groups: dict[tuple[str, ...], MetadataClient] = {}
        self._map: ShardMap | None = None
        self._shardmaster: Any = None

    def group_client(self, addresses: tuple[str, ...]) -> MetadataClient:
        """One MetadataClient per group (so its leader guess is kept)."""
        client = self._groups.get(addresses)
        if client is None:
            client = self._groups[addresses] = MetadataClient(
                self.pool,
                addresses,
                self.reactor,
                client_id=self.client_id,
                timeout=self.timeout,
                rng=self.rng,
            )
        return client

    @property
    def shardmaster(self) -> Any:
        if self._shardmaster is None:
            from client.shardmaster_client import ShardMasterClient

            self._shardmaster = ShardMasterClient(
                self.pool,
                self.cluster.shardmaster,
                self.reactor,
                client_id=self.client_id,
                timeout=self.timeout,
            )
        return self._shardmaster

    @defer.inlineCallbacks
    def shard_map(self, refresh: bool = False):
        """The latest shard map (cached until ``refresh``)."""
        if self._map is None or refresh:
            self._map = yield self.shardmaster.query(-1)
        return self._map

    @defer.inlineCallbacks
    def group_for(self, name: str, refresh: bool = False):
        """The metadata client of the group serving ``name``."""
        if self.cluster.static:
            (addresses,) = self.cluster.groups.values()
            return self.group_client(tuple(addresses))
        shard_map = yield self.shard_map(refresh)
        gid = shard_map.group_for(name)
        if gid == 0:
            raise errors.Unavailable(
                f"no group serves {name!r}: its shard is unassigned in map {shard_map.num}"
            )
        return self.group_client(tuple(shard_map.addresses_of(gid)))

    @defer.inlineCallbacks
    def _routed(self, name: str, call: Any):
        # One refresh of the map on WRONG_GROUP: the shard moved since we
        # cached it. A second WRONG_GROUP means a move is still in progress.
        client = yield self.group_for(name)
        try:
            result = yield call(client)
        except errors.WrongGroup:
            if self.cluster.static:
                raise
            client = yield self.group_for(name, refresh=True)
            result = yield call(client)
        return result

    def updatefile(self, name: str, version: int, hashlist: list[str]) -> defer.Deferred:
        return self._routed(name, lambda c: c.updatefile(name, version, hashlist))

    def getfileinfo(self, name: str) -> defer.Deferred:
        return self._routed(name, lambda c: c.getfileinfo(name))

    @defer.inlineCallbacks
    def getfileinfomap(self):
        """Every file of every group, merged."""
        if self.cluster.static:
            groups = [tuple(a) for a in self.cluster.groups.values()]
        else:
            shard_map = yield self.shard_map(refresh=True)
            groups = [tuple(shard_map.addresses_of(gid)) for gid in shard_map.assigned_gids()]
        merged: dict[str, Any] = {}
        for addresses in groups:
            part = yield self.group_client(addresses).getfileinfomap()
            merged.update(part)
        return merged

    def close(self) -> defer.Deferred:
        return self.pool.close()
