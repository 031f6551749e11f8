"""The ShardMaster client (Deferred API): join/leave/move/query.

Like the metadata client it follows the leader, retries with backoff and
keeps (client id, sequence number) across retries, so a retried ``join``
is answered from the ShardMaster's dedup table rather than refused as
"group already exists".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from twisted.internet import defer

from client.group_client import GroupClient
from surfshard.shardmap import ShardMap


class ShardMasterClient(GroupClient):
    #: Callers know the ShardMaster from the config, where it started; its
    #: replicas added since are found through the NOT_LEADER answers of
    #: the ones that are still there.
    learns_members = True

    def join(self, groups: Mapping[int, Sequence[str]]) -> defer.Deferred:
        """Fires with the new map's number."""
        return self.write("join", {"groups": {g: list(a) for g, a in groups.items()}})

    def leave(self, gids: Iterable[int]) -> defer.Deferred:
        return self.write("leave", {"gids": list(gids)})

    def move(self, shard: int, gid: int) -> defer.Deferred:
        return self.write("move", {"shard": shard, "gid": gid})

    def servers(self, gid: int, servers: Sequence[str]) -> defer.Deferred:
        """Replace group ``gid``'s addresses; fires with the map's number."""
        return self.write("servers", {"gid": gid, "servers": list(servers)})

    def members(self) -> defer.Deferred:
        """Fires with the ShardMaster's membership (``members``: voters and
        learners with their ids and addresses)."""
        return self.read("members", {})

    def query(self, num: int = -1) -> defer.Deferred:
        """Fires with the ``ShardMap`` numbered ``num`` (-1: the latest)."""
        return self.read("query", {"num": num}).addCallback(ShardMap.from_wire)
