"""The ShardMaster client (Deferred API): join/leave/move/query.

Like the metadata client it follows the leader, retries with backoff and
keeps (client id, sequence number) across retries, so a retried ``join``
is answered from the ShardMaster's dedup table rather than refused as
"group already exists".
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from surfshard.leader import LeaderCaller
from surfshard.shardmap import ShardMap


class ShardMasterClient:
    def __init__(
        self,
        pool: Any,
        addresses: Sequence[str],
        reactor: IReactorTime,
        *,
        client_id: str | None = None,
        timeout: float = 30.0,
        attempt_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        self._seq = itertools.count(1)
        self.caller = LeaderCaller(
            pool, addresses, reactor, timeout=timeout, attempt_timeout=attempt_timeout, rng=rng
        )

    def _write(self, method: str, args: dict[str, Any]) -> defer.Deferred:
        args = dict(args, client_id=self.client_id, seq=next(self._seq))
        return self.caller.call(method, args)

    def join(self, groups: Mapping[int, Sequence[str]]) -> defer.Deferred:
        """Fires with the new map's number."""
        return self._write("join", {"groups": {int(g): list(a) for g, a in groups.items()}})

    def leave(self, gids: Iterable[int]) -> defer.Deferred:
        return self._write("leave", {"gids": [int(g) for g in gids]})

    def move(self, shard: int, gid: int) -> defer.Deferred:
        return self._write("move", {"shard": shard, "gid": gid})

    def query(self, num: int = -1) -> defer.Deferred:
        """Fires with the ``ShardMap`` numbered ``num`` (-1: the latest)."""
        return self.caller.call("query", {"num": num}).addCallback(ShardMap.from_wire)
