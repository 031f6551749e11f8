"""A client for a whole cluster as its config describes it.

``ClusterClient`` owns the connection pool (with the client's TLS identity
when the config enables TLS) and hands out per-group metadata clients,
routing a filename to the group that serves its shard: the one group of a
static cluster, or the owner in the ShardMaster's latest map.
"""

from __future__ import annotations

import itertools
import random
import uuid
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from client.feed import list_all
from client.metadata_client import MetadataClient
from surfshard import errors
from surfshard.config import ClusterConfig
from surfshard.keyspace import shard_of
from surfshard.metadata.state import DEDUP_WINDOW
from surfshard.net.interfaces import IRpcPool
from surfshard.net.pool import RpcClientPool
from surfshard.net.tls import TLSFiles
from surfshard.replica.leader_caller import Backoff
from surfshard.shardmap import ShardMap

#: Longest one try on one group takes before the client looks at the shard
#: map again (the group may have handed the shard on and been shut down).
GROUP_ATTEMPT = 5.0
#: Files per listfiles page, and how many times a shard that changes while
#: it is being listed is listed again from the start.
LIST_PAGE = 2000
LIST_ATTEMPTS = 3

#: The certificate names a command-line client presents when TLS is on:
#: the client's, and the operator's for admin and chaos calls.
CLIENT_CERT_NAME = "client"
ADMIN_CERT_NAME = "admin"


def client_tls(cluster: ClusterConfig, *, admin: bool = False) -> TLSFiles | None:
    if cluster.tls is None:
        return None
    cert, key = cluster.tls.cert_paths(ADMIN_CERT_NAME if admin else CLIENT_CERT_NAME)
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
        admin: bool = False,
    ) -> None:
        """``admin``: present the admin certificate (TLS), for shard moves
        and chaos calls."""
        self.cluster = cluster
        self.reactor = reactor
        self.pool = pool if pool is not None else RpcClientPool(reactor, tls=client_tls(cluster, admin=admin))
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.rng = rng or random.Random()
        self._groups: dict[tuple[str, ...], MetadataClient] = {}
        #: One sequence counter for this client id on every group (see
        #: ``GroupClient.seq``).
        self._seq = itertools.count(1)
        self._map: ShardMap | None = None
        self._shardmaster: Any = None
        #: Per shard: how many of this client's updates may be in flight.
        self._gates: dict[int, defer.DeferredSemaphore] = {}

    def group_client(self, addresses: tuple[str, ...]) -> MetadataClient:
        """One MetadataClient per group (so its leader guess is kept)."""
        client = self._groups.get(addresses)
        if client is None:
            client = self._groups[addresses] = MetadataClient(
                self.pool,
                addresses,
                self.reactor,
                client_id=self.client_id,
                seq=self._seq,
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
                seq=self._seq,
                timeout=self.timeout,
                rng=self.rng,
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
        """Run ``call(group_client)`` on the group serving ``name``, following
        the shard while it moves: on WRONG_GROUP from a group at our map
        number or later, the map we hold is stale (refresh it); from a group
        behind us, that group has not caught up yet (wait and retry). Either
        way until the deadline; the call keeps its sequence number
        throughout, so a write applied before a move is not applied again."""
        if self.cluster.static:
            client = yield self.group_for(name)
            result = yield call(client, self.timeout)
            return result
        deadline = self.reactor.seconds() + self.timeout
        # Capped low: the wait is for a shard in transit, which serves again
        # as soon as it has arrived.
        backoff = Backoff(base=0.01, cap=0.1, rng=self.rng)
        refresh = False
        # Bounded: every turn waits a backoff step (or a slice of the
        # deadline on an unreachable group), and the deadline ends the loop.
        while True:
            client = yield self.group_for(name, refresh=refresh)
            remaining = deadline - self.reactor.seconds()
            try:
                # A slice of the time left: a group that stopped answering may
                # have handed the shard on and been shut down since our map.
                result = yield call(client, max(0.0, min(remaining, GROUP_ATTEMPT)))
                return result
            except errors.WrongGroup as e:
                held = self._map.num if self._map is not None else 0
                refresh = e.num is None or e.num >= held
                last: errors.SurfShardError = e
            except (errors.Timeout, errors.Unavailable) as e:
                refresh, last = True, e
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise errors.Timeout(
                    f"{name!r}: no group answered for its shard within {self.timeout:.1f}s ({last})"
                )
            yield task.deferLater(self.reactor, min(backoff.next_delay(), remaining), lambda: None)

    def updatefile(self, name: str, version: int, hashlist: list[str]) -> defer.Deferred:
        """At most ``DEDUP_WINDOW`` of this client's updates are in flight
        to one shard at a time (the rest wait their turn, in order): more
        could commit out of order past the shard's dedup window and be
        refused as stale, and no caller should have to know that."""
        shard = shard_of(name, self.cluster.shards)
        gate = self._gates.get(shard)
        if gate is None:
            gate = self._gates[shard] = defer.DeferredSemaphore(DEDUP_WINDOW)

        def send() -> defer.Deferred:
            # The number is taken once the update may go: the numbers in
            # flight to a shard are then its most recent ones.
            seq = next(self._seq)  # one number for every attempt, on any group
            return self._routed(name, lambda c, t: c.updatefile(name, version, hashlist, seq, t))

        # A Deferred of its own, that fires only with the outcome (the
        # semaphore's is "called" as soon as the update may go).
        running = gate.run(send)
        outcome: defer.Deferred = defer.Deferred(lambda _: running.cancel())

        def settle(result: Any) -> None:
            if not outcome.called:
                outcome.callback(result)

        running.addBoth(settle)
        return outcome

    def getfileinfo(self, name: str) -> defer.Deferred:
        return self._routed(name, lambda c, t: c.getfileinfo(name, t))

    @defer.inlineCallbacks
    def list_shard_at(self, group: MetadataClient, shard: int, timeout: float) -> Any:
        """``(files, revision)``: every file of ``shard`` from ``group``, a
        page at a time (``listfiles``: no reply has to hold a whole shard),
        all pages read at one revision of the shard: if it changed between
        pages, the listing starts again (a few times, then the latest pages
        are taken: every name is still in exactly one page). ``revision`` is
        the first page's: the listing holds every write up to it. None if
        the group does not serve the shard now."""
        files: dict[str, Any] = {}
        for attempt in range(LIST_ATTEMPTS):
            strict = attempt < LIST_ATTEMPTS - 1
            files = {}
            after, revision = "", None
            while True:  # bounded: each page moves ``after`` on, or ends
                page = yield group.listfiles(shard, after, LIST_PAGE, timeout)
                if not page.get("served"):
                    return None
                if revision is None:
                    revision = page["revision"]
                elif strict and page["revision"] != revision:
                    break  # the shard changed under us: list it again
                for entry in page["files"]:  # [name, version, hashlist, mod revision]
                    files[entry[0]] = [entry[1], entry[2]]
                if not page["more"] or not page["files"]:
                    return files, revision
                after = page["files"][-1][0]
        return files, revision

    @defer.inlineCallbacks
    def getfileinfomap(self):
        """Every file of every shard, merged (``client.feed.list_all``). A
        shard in transit between groups is waited for (within the timeout),
        never silently left out: if some shard is still missing at the
        deadline, ``Unavailable`` names the missing shards."""
        files, _cursor = yield list_all(self)
        return files

    def shard_owners(self, shard_map: ShardMap | None) -> dict[int, MetadataClient | None]:
        """shard -> the metadata client of the group serving it under
        ``shard_map`` (None: unassigned); a static cluster needs no map."""
        if self.cluster.static:
            (addresses,) = self.cluster.groups.values()
            return dict.fromkeys(range(self.cluster.shards), self.group_client(tuple(addresses)))
        assert shard_map is not None
        return {
            shard: (self.group_client(tuple(shard_map.addresses_of(gid))) if gid else None)
            for shard, gid in enumerate(shard_map.shards)
        }

    @defer.inlineCallbacks
    def per_shard(self, shards: list[int], fetch: Any):
        """``{shard: fetch(group, shard, timeout)}`` for every one of
        ``shards``, each asked of the group serving it, following moves until
        the client's timeout: a shard its group does not serve now (``fetch``
        gave None) or whose group does not answer is asked again after a
        backoff and a fresh map. Groups in parallel, a group's shards one
        after another; each call gets a slice of the time left
        (``GROUP_ATTEMPT``: a group that stopped answering may have handed
        its shards on and been shut down). ``Unavailable`` names the shards
        still missing at the deadline; other errors of ``fetch`` come out as
        they are."""
        deadline = self.reactor.seconds() + self.timeout
        backoff = Backoff(base=0.02, cap=0.5, rng=self.rng)
        done: dict[int, Any] = {}
        missing = list(shards)
        refresh = False
        # Bounded: a backoff step per turn, and the deadline.
        while True:
            shard_map = None if self.cluster.static else (yield self.shard_map(refresh=refresh))
            owners = self.shard_owners(shard_map)
            by_group: dict[Any, list[int]] = {}
            for shard in missing:
                if owners[shard] is not None:
                    by_group.setdefault(owners[shard], []).append(shard)

            @defer.inlineCallbacks
            def group_run(group: Any, mine: list[int]):
                for shard in mine:
                    slice_ = max(0.0, min(deadline - self.reactor.seconds(), GROUP_ATTEMPT))
                    try:
                        result = yield fetch(group, shard, slice_)
                    except (errors.Timeout, errors.Unavailable, errors.WrongGroup):
                        return  # that group is down or behind: its shards stay missing for now
                    if result is not None:
                        done[shard] = result

            try:
                yield defer.gatherResults([group_run(g, m) for g, m in by_group.items()], consumeErrors=True)
            except defer.FirstError as e:
                e.subFailure.raiseException()  # CursorExpired and the like, as they are
            missing = [s for s in missing if s not in done]
            if not missing:
                return done
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise errors.Unavailable(
                    f"shards {missing} were not served within {self.timeout:.1f}s "
                    "(moving between groups, or their group is down)",
                    shards=missing,
                )
            refresh = True
            yield task.deferLater(self.reactor, min(backoff.next_delay(), remaining), lambda: None)

    def close(self) -> defer.Deferred:
        return self.pool.close()
