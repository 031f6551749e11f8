"""A metadata group following the ShardMaster's maps, one at a time.

The group's leader polls the ShardMaster for the map after the one the group
has applied. It also keeps the ShardMaster's list of this group's addresses
in step with the group's membership (``report_servers``). When that map only gives this group shards that were
unassigned (so they hold no data yet), the leader proposes a ``config``
command and every replica adopts them at the same log position. A map that
moves a shard holding data between groups needs shard migration, which is
not built yet: the group then stays at its current map, serving what it
has, and says so in its log (once per map).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from raft.node import RaftNode
from surfshard import errors
from surfshard.metadata.state import MetadataStateMachine, encode_config
from surfshard.replica.leader_caller import LeaderCaller
from surfshard.replica.loops import polling_loop
from surfshard.shardmap import UNASSIGNED, ShardMap

#: How often a leader asks the ShardMaster for the next map.
POLL_INTERVAL = 0.1
#: How long the ShardMaster holds that question when there is no next map
#: yet (``query``'s ``wait``): it answers as soon as the map is made, so a
#: move starts at once, and an idle group asks about once a second instead
#: of ten times (each a ReadIndex round on the ShardMaster's group).
NEXT_MAP_WAIT = 1.0
#: Least time between two reports of the group's addresses.
REPORT_INTERVAL = 1.0


def plan_config(gid: int, current: ShardMap, following: ShardMap) -> tuple[list[int], list[int], list[int]]:
    """``(adopt, incoming, outgoing)`` for moving group ``gid`` from
    ``current`` to ``following``: shards gained from nobody, shards gained
    from another group, shards given away."""
    adopt: list[int] = []
    incoming: list[int] = []
    outgoing: list[int] = []
    for shard, (old, new) in enumerate(zip(current.shards, following.shards, strict=True)):
        if new == gid and old != gid:
            (adopt if old == UNASSIGNED else incoming).append(shard)
        elif old == gid and new != gid:
            outgoing.append(shard)
    return adopt, incoming, outgoing


class ShardMapWatcher(service.Service):
    """Runs on every replica; acts only while its node leads."""

    log = Logger()

    def __init__(
        self,
        gid: int,
        node: RaftNode,
        machine: MetadataStateMachine,
        shardmaster: LeaderCaller,
        reactor: IReactorTime,
        interval: float = POLL_INTERVAL,
        servers: Callable[[], tuple[str, ...] | None] | None = None,
        next_map_wait: float = NEXT_MAP_WAIT,
    ) -> None:
        self.gid = gid
        self.node = node
        self.machine = machine
        self.shardmaster = shardmaster
        self.reactor = reactor
        self.interval = interval
        self.next_map_wait = next_map_wait
        #: Queries sent to the ShardMaster (for tests and benchmarks).
        self.queries = 0
        self._loop: task.LoopingCall | None = None
        self._maps: dict[int, ShardMap] = {0: ShardMap.initial(machine.nshards)}
        self._blocked_at: int | None = None
        #: The group's addresses as its membership has them (None: the
        #: membership never changed, the config's list stands).
        self.servers = servers
        self._reported_at = float("-inf")

    def startService(self) -> None:
        super().startService()
        self._loop = polling_loop(self._poll, self.reactor, self.interval, self.log, "shard map watcher poll")

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    @defer.inlineCallbacks
    def _map(self, num: int, wait: float = 0.0):
        cached = self._maps.get(num)
        if cached is not None:
            return cached
        args: dict[str, Any] = {"num": num}
        if wait > 0:
            args["wait"] = wait
        self.queries += 1
        wire = yield self.shardmaster.call("query", args, timeout=wait + 2.0)
        shard_map = ShardMap.from_wire(wire)
        if shard_map.num == num:
            self._maps = {k: v for k, v in self._maps.items() if k >= num - 1}
            self._maps[num] = shard_map
        return shard_map

    @defer.inlineCallbacks
    def report_servers(self, latest: ShardMap):
        """Leader: when the ShardMaster lists other addresses for this group
        than its membership has, send the ShardMaster the new list, so that
        clients and other groups (pulling shards) find the members."""
        servers = self.servers() if self.servers is not None else None
        listed = latest.groups.get(self.gid)
        if servers is None or listed is None or set(listed) == set(servers):
            return
        now = self.reactor.seconds()
        if now - self._reported_at < REPORT_INTERVAL:
            return
        self._reported_at = now
        try:
            num = yield self.shardmaster.call(
                "servers", {"gid": self.gid, "servers": list(servers)}, timeout=2.0
            )
        except errors.SurfShardError as e:
            self.log.info("reporting group {gid}'s addresses failed: {e}", gid=self.gid, e=e)
            return
        self._maps.pop(latest.num + 1, None)
        self.log.info(
            "group {gid}'s addresses are now {servers} in shard map {num}",
            gid=self.gid,
            servers=servers,
            num=num,
        )

    @defer.inlineCallbacks
    def _poll(self):
        if not self.node.is_leader or self.node.crashed:
            return
        if self.machine.moving:
            return  # maps are taken one at a time: this one's moves first
        current_num = self.machine.config_num
        try:
            following = yield self._map(current_num + 1, wait=self.next_map_wait)
            if following.num != current_num + 1:
                yield self.report_servers(following)
                return  # nothing newer yet
            current = yield self._map(current_num)
        except errors.BadRequest as e:
            # The ShardMaster no longer keeps the maps this group needs (it
            # fell further behind than the ShardMaster's history): say so
            # clearly, once; it cannot move on by itself.
            if self._blocked_at != -current_num:
                self._blocked_at = -current_num
                self.log.error(
                    "group {gid} is at shard map {num} and cannot take the next: {e}. "
                    "Raise the ShardMaster's history or re-create this group's replicas",
                    gid=self.gid,
                    num=current_num,
                    e=e,
                )
            return
        except errors.SurfShardError as e:
            self.log.debug("shard master not reachable: {e}", e=e)
            return
        adopt, incoming, outgoing = plan_config(self.gid, current, following)
        # The source of each gained shard is its owner under the current map
        # (the ShardMaster never leaves an assigned shard ownerless, so a
        # shard unassigned here was never owned: it starts empty).
        sources = [(s, current.shards[s], current.groups[current.shards[s]]) for s in incoming]
        targets = [(s, following.shards[s], following.groups[following.shards[s]]) for s in outgoing]
        try:
            result = yield self.node.propose(
                encode_config(following.num, adopt, sources, targets), timeout=5.0
            )
        except Exception as e:  # leadership lost, timeout: the next poll retries
            self.log.info("proposing shard map {num} failed: {e}", num=following.num, e=e)
            return
        if not isinstance(result, dict) or not result.get("ok"):
            if self._blocked_at != following.num:
                self._blocked_at = following.num
                self.log.warn(
                    "group {gid}: shard map {num} refused: {r}", gid=self.gid, num=following.num, r=result
                )
            return
        if adopt or incoming or outgoing:
            self.log.info(
                "group {gid} moved to shard map {num}: adopting {adopt}, pulling {incoming}, handing over {outgoing}",
                gid=self.gid,
                num=following.num,
                adopt=adopt,
                incoming=incoming,
                outgoing=outgoing,
            )
