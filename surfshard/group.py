"""One replica of a metadata group: the SurfStore file map behind Raft.

``MetadataReplica`` is the service logic shared by the native protocol and
the XML-RPC facade: writes become Raft proposals, reads wait for a ReadIndex
round, and Raft's failures become the wire's error codes. It knows nothing
of sockets; ``surfshard.server`` maps methods onto it.

A write that loses its leader mid-flight is proposed again with the same
client id and sequence number, so the dedup table answers it if the first
attempt did commit (see ``ReplicaControl.as_leader``).
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from twisted.internet import defer

from surfshard import errors
from surfshard.keyspace import validate_filename
from surfshard.metadata import MetadataStateMachine
from surfshard.replica import ReplicaControl


class MetadataReplica(ReplicaControl):
    """The SurfStore calls a metadata node answers, as Deferred-returning methods."""

    def __init__(self, node: Any, machine: MetadataStateMachine, *args: Any, **kwargs: Any) -> None:
        super().__init__(node, *args, **kwargs)
        self.machine = machine
        # Callers without an identity of their own (XML-RPC) get one per call
        # from this replica, unique across restarts of the process.
        self._anonymous_id = f"xmlrpc-{uuid.uuid4().hex}"
        self._anonymous_seq = itertools.count(1)

    def updatefile(
        self,
        name: str,
        version: int,
        hashlist: list[str],
        client_id: str | None = None,
        seq: int | None = None,
        timeout: float | None = None,
    ) -> defer.Deferred:
        """Fires with the new version, or fails with VersionMismatch(current).
        Every argument is validated first (``BadRequest``), once: the native
        server's schema checks only types, and this is the leader's only
        pass over the hash list before it is applied."""
        if client_id is None or seq is None:
            client_id, seq = self._anonymous_id, next(self._anonymous_seq)
        # Remembered decoded by the state machine: applying it here skips
        # decoding and validating what was just encoded.
        command = self.machine.encode_update(name, version, hashlist, client_id, seq)
        propose = self.node.propose

        def attempt(remaining: float) -> defer.Deferred:
            return propose(command, timeout=remaining)

        return self.as_leader(attempt, timeout, self._update_result)

    def _update_result(self, result: Any) -> int:
        """The state machine's answer to an update as a version, or its error
        (WRONG_GROUP carrying this group's map number, see ``_name_map``)."""
        try:
            return update_result(result)
        except errors.WrongGroup as e:
            raise errors.WrongGroup(e.message, **{**e.details, "num": self.machine.config_num}) from None

    def getfileinfo(self, name: str, timeout: float | None = None) -> defer.Deferred:
        """Fires with ``[version, hashlist]`` (``[0, []]`` for an unknown file)
        once a ReadIndex round confirms this node still leads."""
        validate_filename(name)

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)
            d.addCallback(lambda _: fileinfo(self.machine.getfileinfo(name)))
            return d

        return self.as_leader(attempt, timeout).addErrback(self._name_map)

    def _name_map(self, failure: Any) -> Any:
        """WRONG_GROUP answers carry the shard map number this group is at,
        so a client can tell whether its own map is older or newer."""
        failure.trap(errors.WrongGroup)
        error = failure.value
        raise errors.WrongGroup(error.message, **{**error.details, "num": self.machine.config_num})

    def getfileinfomap(self, timeout: float | None = None) -> defer.Deferred:
        """Fires with ``{name: [version, hashlist]}`` for every file, tombstones included."""

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)
            d.addCallback(lambda _: {n: fileinfo(i) for n, i in self.machine.getfileinfomap().items()})
            return d

        return self.as_leader(attempt, timeout)

    def tester_getversion(self, name: str) -> int:
        """The version this replica has applied (committed state only), with
        no majority round: the SurfStore tester reads every node's own view."""
        validate_filename(name)
        return self.machine.version_of(name)

    def status(self) -> dict[str, Any]:
        status = super().status()
        status.update(self.machine.stats())
        return status


def update_result(result: Any) -> int:
    """Turn the state machine's answer to an update into a version or an error."""
    if isinstance(result, dict):
        if result.get("ok"):
            return int(result["version"])
        if result.get("code") == errors.ErrorCode.VERSION_MISMATCH.value:
            current = result.get("current")
            raise errors.VersionMismatch(f"version mismatch: stored version is {current}", current=current)
        raise errors.error_from_wire(result)
    raise errors.Internal(f"unexpected state machine result {result!r}")


def fileinfo(info: Any) -> list[Any]:
    if info is None:
        return [0, []]
    version, hashlist = info
    return [version, list(hashlist)]
