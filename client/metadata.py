"""The metadata client for one replica group (Deferred API).

Every write gets this client's id and the next sequence number, and keeps
them across retries: if a first attempt committed but its answer was lost,
the retry is answered from the group's dedup table instead of failing with a
false version mismatch.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from surfshard.leader import LeaderCaller


class MetadataClient:
    """SurfStore metadata calls against one replica group."""

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
        self.pool = pool
        self.caller = LeaderCaller(
            pool, addresses, reactor, timeout=timeout, attempt_timeout=attempt_timeout, rng=rng
        )

    def updatefile(self, name: str, version: int, hashlist: Sequence[str]) -> defer.Deferred:
        """Fires with the new version; fails with ``VersionMismatch`` (its
        ``current`` is the stored version) when ``version`` is not stored + 1."""
        args = {
            "name": name,
            "version": version,
            "hashlist": list(hashlist),
            "client_id": self.client_id,
            "seq": next(self._seq),
        }
        return self.caller.call("updatefile", args)

    def getfileinfo(self, name: str) -> defer.Deferred:
        """Fires with ``[version, hashlist]``; ``[0, []]`` for an unknown file."""
        return self.caller.call("getfileinfo", {"name": name})

    def getfileinfomap(self) -> defer.Deferred:
        """Fires with ``{name: [version, hashlist]}``."""
        return self.caller.call("getfileinfomap", {})

    def status(self, address: str, timeout: float = 2.0) -> defer.Deferred:
        """One node's status (role, term, leader, indexes), no leader needed."""
        return self.pool.call(address, "status", {}, timeout=timeout)

    @property
    def leader(self) -> str | None:
        return self.caller.leader
