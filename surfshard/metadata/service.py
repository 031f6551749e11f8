"""The metadata group replica server: native methods and ``/RPC2`` on one port."""

from __future__ import annotations

import random
from typing import Any

from surfshard.blocks.ring import BlockRing
from surfshard.config import ClusterConfig, NodeKind
from surfshard.keyspace import MAX_FILENAME_BYTES, MAX_HASHLIST, MAX_SHARDS, MAX_VERSION
from surfshard.metadata.facade import RPC2
from surfshard.metadata.handoff import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from surfshard.metadata.migration import ShardMigrator
from surfshard.metadata.replica import MAX_WATCH, MetadataReplica
from surfshard.metadata.shardwatch import ShardMapWatcher
from surfshard.metadata.state import MAX_CHANGES_PAGE, MetadataStateMachine
from surfshard.net.methods import Access, MethodTable
from surfshard.net.schema import Arg, Value
from surfshard.replica.access import ClusterAccess
from surfshard.replica.control import TIMEOUT_ARG
from surfshard.replica.leader_caller import LeaderCaller
from surfshard.replica.service import ReplicaService

# The schemas check types and sizes only: the handlers run the keyspace and
# client validators (encode_update checks a hash list in the same pass that
# encodes it), so each argument is validated once, before anything is done.
NAME_ARG = Arg("name", str)


class MetadataService(ReplicaService):
    """Replica ``index`` of metadata group ``gid``."""

    def __init__(
        self,
        cluster: ClusterConfig,
        gid: int,
        index: int,
        reactor: Any,
        *,
        chaos: bool | None = None,
        fsync: bool | None = None,
        rng: random.Random | None = None,
        address: str | None = None,
    ) -> None:
        # A static cluster (no shard master) has one group serving every
        # shard; a sharded group starts owning none and learns its shards
        # from the shard map.
        owned = range(cluster.shards) if cluster.static else ()
        self.machine = MetadataStateMachine(cluster.shards, owned)
        super().__init__(
            cluster,
            NodeKind.GROUP,
            gid,
            index,
            self.machine,
            reactor,
            chaos=chaos,
            fsync=fsync,
            rng=rng,
            address=address,
        )
        self.table.include(metadata_methods(self.replica))
        self.migrator: ShardMigrator | None = None
        if not cluster.static:
            shardmaster = LeaderCaller(
                self.pool, cluster.shardmaster, reactor, timeout=2.0, rng=rng, learn_members=True
            )
            ShardMapWatcher(
                gid, self.node, self.machine, shardmaster, reactor, servers=self.membership.servers
            ).setServiceParent(self)
            self.migrator = ShardMigrator(gid, self.node, self.machine, self.pool, reactor)
            self.migrator.setServiceParent(self)
        access = ClusterAccess(cluster, self.name) if cluster.tls is not None else None
        rpc2 = RPC2(self.replica, forward=self.pool.call, access=access)
        self.root.add("RPC2", rpc2)
        # SurfStore's GetBlockStoreMap: where blocks live, from the config's ring.
        ring = BlockRing(cluster.blockstores, cluster.block_replicas)
        rpc2.surfstore.ring = ring
        self.table.add(
            "getblockstoremap",
            lambda hashes: ring.map(hashes),
            [Arg("hashes", Value(list, max_len=100_000, items=Value(str, min_len=64, max_len=64)))],
        )

    @property
    def replica(self) -> MetadataReplica:
        return self.control  # type: ignore[return-value]

    def make_control(self, chaos: bool) -> MetadataReplica:
        return MetadataReplica(
            self.node,
            self.machine,
            self.raft_addresses,
            self.reactor,
            chaos=chaos,
            transfer=self._ask_transfer,
        )


def metadata_methods(replica: MetadataReplica) -> MethodTable:
    """The SurfStore methods of a metadata replica, with their argument
    schemas (the common replica calls are added by ``ReplicaControl``)."""
    t = MethodTable(service="metadata")
    t.add(
        "updatefile",
        replica.updatefile_into,
        [
            NAME_ARG,
            Arg("version", int),
            Arg("hashlist", list, max_len=MAX_HASHLIST),
            Arg("client_id", str, required=False),
            Arg("seq", int, required=False),
            TIMEOUT_ARG,
        ],
        # Answered through a Reply: no Deferred per write on a busy leader.
        takes_reply=True,
    )
    t.add("getfileinfo", replica.getfileinfo, [NAME_ARG, TIMEOUT_ARG])
    t.add("getfileinfomap", replica.getfileinfomap, [TIMEOUT_ARG])
    t.add("tester_getversion", replica.tester_getversion, [NAME_ARG])
    t.add(
        "getshardfiles",
        replica.getshardfiles,
        [Arg("shards", list, max_len=MAX_SHARDS, items=Value(int, min=0, max=MAX_SHARDS - 1)), TIMEOUT_ARG],
    )
    t.add(
        "listfiles",
        replica.listfiles,
        [
            Arg("shard", int, min=0, max=MAX_SHARDS - 1),
            Arg("after", str, required=False, max_len=MAX_FILENAME_BYTES),
            Arg("limit", int, required=False, min=1, max=10_000),
            TIMEOUT_ARG,
        ],
    )
    t.add(
        "changes",
        replica.changes,
        [
            Arg("shard", int, min=0, max=MAX_SHARDS - 1),
            Arg("since", int, required=False, min=0, max=MAX_VERSION),
            Arg("limit", int, required=False, min=1, max=MAX_CHANGES_PAGE),
            Arg("wait", float, required=False, min=0.0, max=MAX_WATCH),
            TIMEOUT_ARG,
        ],
    )
    # Shard migration, between the groups' leaders (see surfshard.metadata.handoff).
    shard_args = [Arg("num", int, min=1), Arg("shard", int, min=0, max=MAX_SHARDS - 1)]
    t.add(
        "shard_fetch",
        replica.shard_fetch,
        [
            *shard_args,
            Arg("cursor", Value(list, nullable=True, max_len=2), required=False),
            Arg("max_bytes", int, required=False, min=MIN_CHUNK_BYTES, max=MAX_CHUNK_BYTES),
            TIMEOUT_ARG,
        ],
        access=(Access.CLUSTER,),
    )
    t.add("shard_installed", replica.shard_installed, [*shard_args, TIMEOUT_ARG], access=(Access.CLUSTER,))
    return t
