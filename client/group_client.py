"""What every client of a Raft-replicated SurfShard service holds: a leader
finder and an identity (client id + sequence numbers) for its writes."""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from surfshard.net.interfaces import IRpcPool
from surfshard.replica.leader_caller import LeaderCaller


class GroupClient:
    """Base of the per-service clients.

    Every write gets this client's id and the next sequence number, kept
    across retries, so a retried write whose first attempt committed is
    answered from the service's dedup table instead of being applied twice.
    """

    #: Whether the leader finder follows NOT_LEADER hints to addresses it
    #: was not given (``LeaderCaller.learn_members``).
    learns_members = False

    def __init__(
        self,
        pool: IRpcPool,
        addresses: Sequence[str],
        reactor: IReactorTime,
        *,
        client_id: str | None = None,
        seq: Iterator[int] | None = None,
        timeout: float = 30.0,
        attempt_timeout: float = 2.0,
        rng: random.Random | None = None,
    ) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        #: Sequence numbers of this client id. Clients of several groups
        #: under one id must share one counter (``ClusterClient`` does): a
        #: shard's dedup sessions move with it, so two counters would reuse
        #: numbers for different writes in one session.
        self.seq = seq if seq is not None else itertools.count(1)
        self.pool = pool
        self.caller = LeaderCaller(
            pool,
            addresses,
            reactor,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            rng=rng,
            learn_members=self.learns_members,
        )

    def write(
        self, method: str, args: dict[str, Any], seq: int | None = None, timeout: float | None = None
    ) -> defer.Deferred:
        """Call a write method on the leader with this client's identity
        (``seq``: a retry of an earlier attempt keeps that attempt's number)."""
        return self.caller.call(
            method, dict(args, client_id=self.client_id, seq=next(self.seq) if seq is None else seq), timeout
        )

    def read(self, method: str, args: dict[str, Any], timeout: float | None = None) -> defer.Deferred:
        return self.caller.call(method, args, timeout)

    @property
    def leader(self) -> str | None:
        """The address this client currently believes leads."""
        return self.caller.leader
