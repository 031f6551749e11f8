"""A simulated sharded cluster: a ShardMaster group and several metadata
groups on one seeded ``Clock`` and one simulated RPC network, each replica
running what a ``twistd surfshard`` process runs beside its Raft node (the
shard-map watcher and the shard migrator), and clients using the real
``ClusterClient``.

``SimWorld.run`` advances time in small steps and checks, at every step,
Raft's invariants in every group and the sharding invariant: no shard is
served by two groups (judged on each group's most advanced replica, whose
applied state is the group's latest committed state).

Replay a failing seed with ``SURFSHARD_SEED=N``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from client.cluster import ClusterClient
from client.shardmaster_client import ShardMasterClient
from raft.testing.simnet import InvariantViolation
from shardmaster.service import ShardMasterReplica, shardmaster_methods
from shardmaster.state import ShardMasterStateMachine
from surfshard.config import ClusterConfig, RaftTimings
from surfshard.metadata.handoff import CHUNK_BYTES
from surfshard.metadata.migration import ShardMigrator
from surfshard.metadata.replica import MetadataReplica
from surfshard.metadata.service import metadata_methods
from surfshard.metadata.shardwatch import ShardMapWatcher
from surfshard.metadata.state import MetadataStateMachine
from surfshard.replica.leader_caller import LeaderCaller
from surfshard.testing.simrpc import SimReplicaGroup, SimRpcNetwork, resolve

STEP = 0.005


def group_addresses(gid: int, n: int = 3) -> list[str]:
    return [f"g{gid}-n{i}.sim:7000" for i in range(1, n + 1)]


class SimWorld:
    """The ShardMaster (``shardmaster``) and metadata groups (``groups[gid]``)
    of one cluster in simulated time. Groups start empty and serve nothing
    until they join (``join``)."""

    def __init__(
        self,
        seed: int,
        gids: Iterable[int] = (1, 2, 3),
        *,
        nshards: int = 10,
        replicas: int = 3,
        chunk_bytes: int = CHUNK_BYTES,
        snapshot_entries: int = 10_000,
    ) -> None:
        self.seed = seed
        self.nshards = nshards
        self.rpc = SimRpcNetwork(_clock(), seed)
        self.clock = self.rpc.clock
        self.chunk_bytes = chunk_bytes
        sm_addresses = [f"sm-n{i}.sim:7000" for i in range(1, replicas + 1)]
        self.shardmaster = SimReplicaGroup(
            replicas,
            seed,
            machine_factory=lambda _i: ShardMasterStateMachine(nshards),
            make_control=lambda node, machine, addresses, reactor, chaos, transfer: ShardMasterReplica(
                node, machine, addresses, reactor, chaos=chaos, transfer=transfer
            ),
            methods=shardmaster_methods,
            address_of=lambda i: sm_addresses[i - 1],
            rpc=self.rpc,
        )
        self.sm_addresses = tuple(sm_addresses)
        self.groups: dict[int, SimReplicaGroup] = {}
        for gid in gids:
            self.groups[gid] = self._group(gid, replicas, snapshot_entries)
        self.config = ClusterConfig(
            source="simworld",
            format="toml",
            name="simworld",
            shards=nshards,
            data_dir=Path("/nonexistent"),
            chaos=True,
            shardmaster=self.sm_addresses,
            groups={gid: tuple(group_addresses(gid, replicas)) for gid in self.groups},
            blockstores=(),
            tls=None,
            raft=RaftTimings(),
        )
        # Every source of chance is seeded (ids and backoff jitter included):
        # one seed, one run, so a failure replays from the seed it prints.
        self.admin = ShardMasterClient(
            self.rpc.pool("admin"),
            self.sm_addresses,
            self.clock,
            timeout=20.0,
            client_id=f"admin-{seed}",
            rng=random.Random(f"{seed}:admin"),
        )
        self._client_numbers = itertools.count(1)
        #: Per group: (highest applied index seen on any replica, its serving shards).
        self._high: dict[int, tuple[int, frozenset[int]]] = {}

    def _group(self, gid: int, replicas: int, snapshot_entries: int) -> SimReplicaGroup:
        addresses = group_addresses(gid, replicas)

        def services(i: int, node: Any, machine: Any, pool: Any) -> list[Any]:
            shardmaster = LeaderCaller(
                pool,
                self.sm_addresses,
                self.clock,
                timeout=2.0,
                rng=random.Random(f"{self.seed}:{gid}:{i}:sm"),
                learn_members=True,  # as MetadataService's
            )
            return [
                ShardMapWatcher(
                    gid,
                    node,
                    machine,
                    shardmaster,
                    self.clock,
                    interval=0.05,
                    # Looked up at each call: a restart attaches a new one.
                    servers=lambda: self.groups[gid].memberships[i].servers(),
                ),
                ShardMigrator(
                    gid,
                    node,
                    machine,
                    pool,
                    self.clock,
                    interval=0.05,
                    chunk_bytes=self.chunk_bytes,
                    rng=random.Random(f"{self.seed}:{gid}:{i}:migrator"),
                ),
            ]

        return SimReplicaGroup(
            replicas,
            self.seed * 1000 + gid,
            machine_factory=lambda _i: MetadataStateMachine(self.nshards, owned=[]),
            make_control=lambda node, machine, addrs, reactor, chaos, transfer: MetadataReplica(
                node, machine, addrs, reactor, chaos=chaos, transfer=transfer
            ),
            methods=metadata_methods,
            address_of=lambda i: addresses[i - 1],
            rpc=self.rpc,
            services=services,
            snapshot_entries=snapshot_entries,
        )

    # -- clients and admin ---------------------------------------------------------

    def client(self, name: str, timeout: float = 30.0) -> ClusterClient:
        return ClusterClient(
            self.config,
            self.clock,
            pool=self.rpc.pool(name),
            timeout=timeout,
            # Unique per call (a name may be used twice) yet the same every run.
            client_id=f"{name}-{self.seed}-{next(self._client_numbers)}",
            rng=random.Random(f"{self.seed}{name}"),
        )

    def join(self, *gids: int) -> int:
        return self.value(self.admin.join({gid: group_addresses(gid) for gid in gids}))

    def leave(self, *gids: int) -> int:
        return self.value(self.admin.leave(list(gids)))

    def move(self, shard: int, gid: int) -> int:
        return self.value(self.admin.move(shard, gid))

    def value(self, d: Deferred[Any], within: float = 30.0) -> Any:
        if not self.run_until(lambda: d.called, within):
            raise self.fail(f"no answer within {within}s")
        ok, value = resolve(d)
        if not ok:
            raise self.fail(f"expected a result, got {value!r}")
        return value

    # -- the state of the world ----------------------------------------------------------

    @staticmethod
    def _most_advanced(group: SimReplicaGroup) -> Any:
        """The state machine of the replica of ``group`` that applied the most."""
        nodes = group.cluster.nodes
        best = max(group.ids, key=lambda i: nodes[i].applied_index if i in nodes else -1)
        return group.cluster.state_machines[best]

    def latest_machine(self, gid: int) -> MetadataStateMachine:
        """The state machine of group ``gid``'s most advanced replica."""
        return self._most_advanced(self.groups[gid])  # type: ignore[no-any-return]

    def latest_map(self) -> Any:
        """The ShardMaster's newest committed map, read from its most
        advanced replica rather than asked through a client: a nemesis that
        has taken the ShardMaster's majority down must not block on it."""
        return self._most_advanced(self.shardmaster).latest

    def serving(self) -> dict[int, frozenset[int]]:
        """Per group, the shards it serves in its latest committed state: the
        state of the furthest applied index any of its replicas ever reached
        (replicas apply one log, so that is the most advanced state; a replica
        replaying after a restart is behind it)."""
        for gid in self.groups:
            group = self.groups[gid]
            for i, node in group.cluster.nodes.items():
                if node.running and node.applied_index > self._high.get(gid, (-1, frozenset()))[0]:
                    machine = group.cluster.state_machines[i]
                    self._high[gid] = (node.applied_index, machine.owned_shards)  # type: ignore[attr-defined]
        return {gid: self._high.get(gid, (0, frozenset()))[1] for gid in self.groups}

    def settled(self, num: int | None = None) -> bool:
        """Every group has taken the ShardMaster's latest map (or ``num``)
        and has nothing in transit, and every shard of it is served."""
        sm_leader = self.shardmaster.cluster.leader()
        if sm_leader is None:
            return False
        sm = self.shardmaster.cluster.state_machines[sm_leader]
        target = num if num is not None else sm.latest.num  # type: ignore[attr-defined]
        latest = sm.query(target)  # type: ignore[attr-defined]
        if latest.num != target:
            return False
        for gid, group in self.groups.items():
            leader = group.cluster.leader()
            if leader is None:
                return False
            machine = group.cluster.state_machines[leader]
            if machine.config_num < target or machine.moving:  # type: ignore[attr-defined]
                return False
            if machine.owned_shards != frozenset(s for s, g in enumerate(latest.shards) if g == gid):  # type: ignore[attr-defined]
                return False
        return True

    def wait_settled(self, within: float = 60.0) -> None:
        if not self.run_until(self.settled, within):
            raise self.fail(f"shards did not settle within {within}s: {self.describe()}")

    def describe(self) -> str:
        parts = []
        for gid in self.groups:
            m = self.latest_machine(gid)
            parts.append(
                f"g{gid}: map {m.config_num} serving {sorted(m.owned_shards)} moving {m.transfers()}"
            )
        return "; ".join(parts)

    # -- time ----------------------------------------------------------------------------

    def fail(self, message: str) -> InvariantViolation:
        return InvariantViolation(f"SURFSHARD_SEED={self.seed} t={self.clock.seconds():.3f}: {message}")

    def _check(self) -> None:
        for group in [self.shardmaster, *self.groups.values()]:
            group.cluster._check_monotonic()
            group.cluster._raise_if_broken()
        owner: dict[int, int] = {}
        for gid, shards in self.serving().items():
            for shard in shards:
                if shard in owner:
                    raise self.fail(
                        f"shard {shard} served by groups {owner[shard]} and {gid}: {self.describe()}"
                    )
                owner[shard] = gid

    def run(self, seconds: float, step: float = STEP) -> None:
        for _ in range(max(1, math.ceil(seconds / step - 1e-9))):
            self.clock.advance(step)  # type: ignore[attr-defined]
            self._check()

    def run_until(self, predicate: Callable[[], bool], timeout: float, step: float = STEP) -> bool:
        for _ in range(max(1, math.ceil(timeout / step - 1e-9))):
            if predicate():
                return True
            self.clock.advance(step)  # type: ignore[attr-defined]
            self._check()
        return predicate()

    def settle(self, deferreds: Iterable[Deferred[Any]], timeout: float) -> bool:
        pending = list(deferreds)
        return self.run_until(lambda: all(d.called for d in pending), timeout)

    def stop_all(self) -> None:
        for group in [*self.groups.values(), self.shardmaster]:
            group.stop_all()


def _clock() -> Any:
    from twisted.internet.task import Clock

    return Clock()
