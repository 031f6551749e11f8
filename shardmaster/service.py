"""The ShardMaster replica server: join/leave/move/query over Raft, one port."""

from __future__ import annotations

import itertools
import random
import uuid
from typing import Any

from twisted.internet import defer

from raft.node import RaftNode
from shardmaster.state import ShardMasterStateMachine, encode_join, encode_leave, encode_move, encode_servers
from surfshard import errors
from surfshard.config import ClusterConfig, NodeKind
from surfshard.net.methods import Access, MethodTable
from surfshard.net.schema import Arg, Value
from surfshard.replica.control import TIMEOUT_ARG, ReplicaControl
from surfshard.replica.dedup import validate_client
from surfshard.replica.service import ReplicaService

#: The longest a ``query`` for a map that does not exist yet may wait for it.
MAX_QUERY_WAIT = 30.0

CLIENT_ARGS = [
    Arg("client_id", str, required=False, min_len=1, max_len=128),
    Arg("seq", int, required=False, min=1),
]


class ShardMasterReplica(ReplicaControl):
    """The ShardMaster calls, as Deferred-returning methods.

    Before proposing, a write's arguments are checked on their own (types,
    gid and shard ranges, address syntax: ``encode_*``), for a fast clear
    error. Whether they fit the map (gid known or new, shard below the
    shard count) is decided only by the state machine at apply time: this
    node's applied map may be stale (a deposed or newly elected leader, a
    follower), and a retried write that already applied must get its first
    answer from the dedup table, not "group already exists".
    """

    def __init__(self, node: RaftNode, machine: ShardMasterStateMachine, *args: Any, **kwargs: Any) -> None:
        super().__init__(node, *args, **kwargs)
        self.machine = machine
        self._anonymous_id = f"anon-{uuid.uuid4().hex}"
        self._anonymous_seq = itertools.count(1)

    def _identity(self, client_id: str | None, seq: int | None) -> tuple[str, int]:
        if client_id is None or seq is None:
            return self._anonymous_id, next(self._anonymous_seq)
        return validate_client(client_id, seq)

    def _write(self, command: bytes, timeout: float | None) -> defer.Deferred:
        def attempt(remaining: float) -> defer.Deferred:
            return self.node.propose(command, timeout=remaining)

        return self.as_leader(attempt, timeout).addCallback(_map_number)

    def join(
        self, groups: dict, client_id: str | None = None, seq: int | None = None, timeout: float | None = None
    ):
        """Add groups ``{gid: [host:port...]}``; fires with the new map's number."""
        return self._write(encode_join(groups, *self._identity(client_id, seq)), timeout)

    def leave(
        self, gids: list, client_id: str | None = None, seq: int | None = None, timeout: float | None = None
    ):
        """Remove groups; their shards are rebalanced onto the others."""
        return self._write(encode_leave(gids, *self._identity(client_id, seq)), timeout)

    def move(
        self,
        shard: int,
        gid: int,
        client_id: str | None = None,
        seq: int | None = None,
        timeout: float | None = None,
    ):
        """Pin ``shard`` to group ``gid`` until the next join or leave."""
        return self._write(encode_move(shard, gid, *self._identity(client_id, seq)), timeout)

    def servers(
        self,
        gid: int,
        servers: list,
        client_id: str | None = None,
        seq: int | None = None,
        timeout: float | None = None,
    ):
        """Replace group ``gid``'s addresses (its membership changed)."""
        return self._write(encode_servers(gid, servers, *self._identity(client_id, seq)), timeout)

    def query(self, num: int = -1, wait: float = 0.0, timeout: float | None = None) -> defer.Deferred:
        """Map ``num`` (-1: the latest), after a ReadIndex round. With
        ``wait`` (seconds, at most ``MAX_QUERY_WAIT``) and no map ``num`` yet,
        the answer waits until there is one, this node stops leading, or
        ``wait`` passes, then is read again: a group leader's watch for the
        next map, one call a ``wait`` instead of one per poll."""
        wait = max(0.0, min(float(wait), MAX_QUERY_WAIT))

        @defer.inlineCallbacks
        def attempt(remaining: float):
            started = self.reactor.seconds()
            yield self.node.read(timeout=remaining)
            answer = self.machine.query(num)
            left = min(wait, remaining) - (self.reactor.seconds() - started)
            if num > answer.num and left > 0:
                yield self.wait_until(lambda: self.machine.latest.num >= num, left)
                yield self.node.read(timeout=max(remaining - (self.reactor.seconds() - started), 0.001))
                answer = self.machine.query(num)
            return answer.to_wire()

        return self.as_leader(attempt, timeout)

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(self.machine.stats())
        return status


def _map_number(result: Any) -> int:
    if isinstance(result, dict) and result.get("ok"):
        return int(result["num"])
    if isinstance(result, dict):
        # The state machine's refusal: {"ok": False, "code", "message"}; "ok"
        # is not a detail of the error.
        result = {k: v for k, v in result.items() if k != "ok"}
    raise errors.error_from_wire(result)


def shardmaster_methods(replica: ShardMasterReplica) -> MethodTable:
    t = MethodTable(service="shardmaster")
    addresses = Value(list, min_len=1, max_len=32, items=Value(str, min_len=1, max_len=300))
    t.add(
        "join",
        replica.join,
        [
            Arg("groups", Value(dict, min_len=1, max_len=1024, keys=Value(int), values=addresses)),
            *CLIENT_ARGS,
            TIMEOUT_ARG,
        ],
        access=(Access.ADMIN,),
    )
    t.add(
        "leave",
        replica.leave,
        [Arg("gids", Value(list, min_len=1, max_len=1024, items=Value(int))), *CLIENT_ARGS, TIMEOUT_ARG],
        access=(Access.ADMIN,),
    )
    t.add(
        "move",
        replica.move,
        [Arg("shard", int), Arg("gid", int), *CLIENT_ARGS, TIMEOUT_ARG],
        access=(Access.ADMIN,),
    )
    t.add(
        "servers",
        replica.servers,
        [Arg("gid", int), Arg("servers", addresses), *CLIENT_ARGS, TIMEOUT_ARG],
        access=(Access.ADMIN, Access.CLUSTER),
    )
    t.add(
        "query",
        replica.query,
        [
            Arg("num", int, default=-1),
            Arg("wait", float, required=False, min=0.0, max=MAX_QUERY_WAIT),
            TIMEOUT_ARG,
        ],
    )
    return t


class ShardMasterService(ReplicaService):
    """Replica ``index`` of the ShardMaster."""

    def __init__(
        self,
        cluster: ClusterConfig,
        index: int,
        reactor: Any,
        *,
        chaos: bool | None = None,
        fsync: bool | None = None,
        rng: random.Random | None = None,
        address: str | None = None,
    ) -> None:
        self.machine = ShardMasterStateMachine(cluster.shards)
        super().__init__(
            cluster,
            NodeKind.SHARDMASTER,
            0,
            index,
            self.machine,
            reactor,
            chaos=chaos,
            fsync=fsync,
            rng=rng,
            address=address,
        )
        self.table.include(shardmaster_methods(self.control))  # type: ignore[arg-type]

    def make_control(self, chaos: bool) -> ShardMasterReplica:
        return ShardMasterReplica(
            self.node,
            self.machine,
            self.raft_addresses,
            self.reactor,
            chaos=chaos,
            transfer=self._ask_transfer,
        )
