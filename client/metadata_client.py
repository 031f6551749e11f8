"""The metadata client for one replica group (Deferred API)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import defer

from client.group_client import GroupClient


class MetadataClient(GroupClient):
    """SurfStore metadata calls against one replica group, on its leader."""

    def updatefile(
        self,
        name: str,
        version: int,
        hashlist: Sequence[str],
        seq: int | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred:
        """Fires with the new version; fails with ``VersionMismatch`` (its
        ``current`` is the stored version) when ``version`` is not stored + 1."""
        args = {"name": name, "version": version, "hashlist": list(hashlist)}
        return self.write("updatefile", args, seq, timeout)

    def getfileinfo(self, name: str, timeout: float | None = None) -> defer.Deferred:
        """Fires with ``[version, hashlist]``; ``[0, []]`` for an unknown file."""
        return self.read("getfileinfo", {"name": name}, timeout)

    def getfileinfomap(self) -> defer.Deferred:
        """Fires with ``{name: [version, hashlist]}``."""
        return self.read("getfileinfomap", {})

    def getshardfiles(self, shards: Sequence[int], timeout: float | None = None) -> defer.Deferred:
        """Fires with ``{"num", "files": {name: [version, hashlist]}, "missing":
        [shard...]}``: the files of those of ``shards`` the group serves now,
        and the ones it does not (moving, or not its own)."""
        return self.read("getshardfiles", {"shards": list(shards)}, timeout)

    def listfiles(
        self, shard: int, after: str = "", limit: int = 1000, timeout: float | None = None
    ) -> defer.Deferred:
        """A page of ``shard``'s files in name order after ``after`` (see
        ``MetadataReplica.listfiles``)."""
        return self.read("listfiles", {"shard": shard, "after": after, "limit": limit}, timeout)

    def changes(
        self, shard: int, since: int, limit: int = 1000, wait: float = 0.0, timeout: float | None = None
    ) -> defer.Deferred:
        """The writes to ``shard`` after revision ``since`` (see
        ``MetadataReplica.changes``); ``wait`` makes it a long poll."""
        args: dict[str, Any] = {"shard": shard, "since": since, "limit": limit}
        if wait:
            args["wait"] = float(wait)
        return self.read("changes", args, timeout)

    def status(self, address: str, timeout: float = 2.0) -> defer.Deferred:
        """One node's status (role, term, leader, indexes), no leader needed."""
        return self.pool.call(address, "status", {}, timeout=timeout)
