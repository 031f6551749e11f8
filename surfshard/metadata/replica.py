"""One replica of a metadata group: the SurfStore file map behind Raft.

``MetadataReplica`` is the service logic shared by the native protocol and
the XML-RPC facade: writes become Raft proposals, reads wait for a ReadIndex
round, and Raft's failures become the wire's error codes. It knows nothing
of sockets; ``surfshard.metadata.service`` maps methods onto it.

A write that loses its leader mid-flight is proposed again with the same
client id and sequence number, so the dedup table answers it if the first
attempt did commit (see ``ReplicaControl.as_leader``).

Batching: while this node leads, the updates that reach it in one reactor
turn (from any connections) go into Raft as ONE batch entry (``OP_BATCH``),
each still checked, deduplicated and answered on its own when it is
applied. Raft's work per entry (proposal, waiter, log record, replication,
apply loop) is then paid once per turn instead of once per update, which is
most of a busy leader's cost per write after the RPC itself. An update
that finds no leader here takes the one-at-a-time path (wait or NOT_LEADER).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from raft.node import RaftNode
from surfshard import errors
from surfshard.keyspace import validate_filename
from surfshard.metadata.handoff import CHUNK_BYTES, cursor_from_wire
from surfshard.metadata.state import MAX_BATCH_BYTES, MAX_BATCH_COMMANDS, MetadataStateMachine
from surfshard.net.methods import ReplySink
from surfshard.replica.control import ReplicaControl
from surfshard.replica.dedup import OneShotIds


class MetadataReplica(ReplicaControl):
    """The SurfStore calls a metadata node answers, as Deferred-returning methods."""

    def __init__(
        self,
        node: RaftNode,
        machine: MetadataStateMachine,
        *args: Any,
        batch_updates: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(node, *args, **kwargs)
        self.machine = machine
        #: Pack the updates of one reactor turn into one Raft entry (module docstring).
        self.batch_updates = batch_updates
        # The batch being collected: commands, their callers, its byte size
        # and the longest timeout asked for; proposed by ``_propose_batch``.
        self._batch: list[bytes] = []
        self._batch_waiters: list[ReplySink] = []
        self._batch_bytes = 0
        self._batch_timeout = 0.0
        self._batch_default_timeout = False
        self._batch_timeouts: list[tuple[float, ReplySink]] = []
        #: When the batch's first update arrived (kept only while tracing).
        self._batch_arrived: float | None = None
        self._batch_call: Any = None
        #: Batches proposed, and the updates they carried (for status).
        self.batches_proposed = 0
        self.batched_updates = 0
        # Callers without an identity of their own get one per call from
        # this replica (see surfshard.replica.dedup).
        self.one_shot_ids = OneShotIds()

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
        # Cancelling (the caller left) only stops the wait: the update may
        # still be applied, as any proposal may.
        d: defer.Deferred = defer.Deferred(lambda _: None)
        self.updatefile_into(d, name, version, hashlist, client_id, seq, timeout)
        return d

    def updatefile_into(
        self,
        reply: ReplySink,
        name: str,
        version: int,
        hashlist: list[str],
        client_id: str | None = None,
        seq: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """``updatefile`` answering into ``reply`` (a Deferred, or the native
        server's ``Reply``: no Deferred per request). Raises BadRequest at
        once, before anything is proposed."""
        if client_id is None or seq is None:
            client_id, seq = self.one_shot_ids.next()
        # Remembered decoded by the state machine: applying it here skips
        # decoding and validating what was just encoded.
        command = self.machine.encode_update(name, version, hashlist, client_id, seq)
        batch = self._batch
        if batch:
            # Leading was checked when the batch began, this turn (were it
            # lost since, the batch's proposal fails and is retried as any).
            if len(batch) >= MAX_BATCH_COMMANDS or self._batch_bytes + len(command) > MAX_BATCH_BYTES:
                # Full in the middle of a read: proposed now, replicated with
                # the rest of the turn's batches (one Ready, one sync).
                self._propose_batch(at_turn_end=False)
                batch = self._batch
        if not batch and (not self.batch_updates or not self.is_leader()):
            self._propose_one_into(reply, command, timeout)
            return
        if not batch and self.node.tracer is not None:
            self._batch_arrived = time.monotonic()
        batch.append(command)
        self._batch_waiters.append(reply)
        self._batch_bytes += len(command)
        # The batch waits as long as its most patient caller (clamped once,
        # when proposing); each caller's own timeout is kept for the ones
        # that are shorter (``_expire_short``).
        if timeout is None:
            self._batch_default_timeout = True
        else:
            self._batch_timeouts.append((timeout, reply))
            if timeout > self._batch_timeout:
                self._batch_timeout = timeout
        if self._batch_call is None:
            self._batch_call = self.reactor.callLater(0, self._propose_batch)

    def _propose_one_into(
        self, reply: ReplySink, command: bytes, timeout: float | None, arrived: float | None = None
    ) -> None:
        """Propose one update as an entry of its own; its answer goes to ``reply``."""
        propose = self.node.propose
        if arrived is None and self.node.tracer is not None:
            arrived = time.monotonic()

        def attempt(remaining: float) -> defer.Deferred:
            return propose(command, timeout=remaining, arrived=arrived)

        d = self.as_leader(attempt, timeout, update_result)
        d.addCallbacks(self._one_applied, self._batch_failed, callbackArgs=(reply,), errbackArgs=([reply],))

    def _propose_batch(self, at_turn_end: bool = True) -> None:
        """Propose the batch collected so far (run by the reactor at the end
        of the turn, or early when the batch is full)."""
        if self._batch_call is not None and self._batch_call.active():
            self._batch_call.cancel()
        self._batch_call = None
        commands, waiters, timeouts = self._batch, self._batch_waiters, self._batch_timeouts
        timeout = self.clamp_timeout(self._batch_timeout)
        if self._batch_default_timeout:
            timeout = max(timeout, self.clamp_timeout(None))
        self._batch, self._batch_waiters, self._batch_bytes = [], [], 0
        self._batch_timeout, self._batch_default_timeout, self._batch_timeouts = 0.0, False, []
        if not commands:
            return
        self._expire_short(timeouts, timeout)
        arrived = self._batch_arrived
        if len(commands) == 1:
            self._propose_one_into(waiters[0], commands[0], timeout, arrived)
        else:
            self._propose_many(commands, waiters, timeout, arrived)
        if at_turn_end:
            # The turn is over: its batches' appends leave now, not one
            # reactor pass later.
            self.node.process_now()

    def _propose_many(
        self, commands: list[bytes], waiters: list[ReplySink], timeout: float, arrived: float | None
    ) -> None:
        batch = self.machine.encode_batch(commands)
        propose = self.node.propose
        self.batches_proposed += 1
        self.batched_updates += len(commands)

        def attempt(remaining: float) -> defer.Deferred:
            return propose(batch, timeout=remaining, arrived=arrived)

        d = self.as_leader(attempt, timeout)
        d.addCallbacks(
            self._batch_applied, self._batch_failed, callbackArgs=(waiters,), errbackArgs=(waiters,)
        )

    def _expire_short(self, timeouts: list[tuple[float, ReplySink]], batch_timeout: float) -> None:
        """Answer Timeout to each caller of a batch whose own timeout is
        shorter than the batch's, when it passes (the batch goes on for the
        others; the update may still be applied, as with any timeout)."""
        for timeout, waiter in timeouts:
            mine = self.clamp_timeout(timeout)
            if mine < batch_timeout:
                self.reactor.callLater(mine, _time_out, waiter, mine)

    def _batch_applied(self, result: Any, waiters: list[ReplySink]) -> None:
        results = result.get("results") if isinstance(result, dict) and result.get("ok") else None
        if type(results) is not list or len(results) != len(waiters):
            # The batch as a whole was refused (every replica alike): a bug
            # in what this node encoded, not the callers' fault.
            error: Exception = errors.Internal("a batch of updates got a malformed answer")
            if isinstance(result, dict) and not result.get("ok"):
                try:
                    update_result(result)
                except errors.SurfShardError as e:
                    error = e
            self._batch_failed(Failure(error), waiters)
            return
        to_version = update_result
        for waiter, answer in zip(waiters, results, strict=True):
            if waiter.called:
                continue  # cancelled
            if type(answer) is dict and answer.get("ok") is True:
                waiter.callback(answer["version"])  # the common case, inline
                continue
            try:
                version = to_version(answer)
            except errors.SurfShardError as e:
                waiter.errback(e)
            else:
                waiter.callback(version)

    @staticmethod
    def _one_applied(version: int, waiter: ReplySink) -> None:
        if not waiter.called:
            waiter.callback(version)

    @staticmethod
    def _batch_failed(failure: Failure, waiters: list[ReplySink]) -> None:
        for waiter in waiters:
            if not waiter.called:
                waiter.errback(failure)

    def getfileinfo(self, name: str, timeout: float | None = None) -> defer.Deferred:
        """Fires with ``[version, hashlist]`` (``[0, []]`` for an unknown file)
        once a ReadIndex round confirms this node still leads."""
        validate_filename(name)

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)
            d.addCallback(lambda _: fileinfo(self.machine.getfileinfo(name)))
            return d

        # A WRONG_GROUP from the state machine already carries the group's
        # map number, so the client can tell whose map is older.
        return self.as_leader(attempt, timeout)

    def getfileinfomap(self, timeout: float | None = None) -> defer.Deferred:
        """Fires with ``{name: [version, hashlist]}`` for every file, tombstones included."""

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)
            d.addCallback(lambda _: {n: fileinfo(i) for n, i in self.machine.getfileinfomap().items()})
            return d

        return self.as_leader(attempt, timeout)

    def listfiles(
        self, shard: int, after: str = "", limit: int = 1000, timeout: float | None = None
    ) -> defer.Deferred:
        """Fires with a page of ``shard``'s files in name order after
        ``after`` (``{"num", "shard", "served", "revision", "files": [[name,
        version, hashlist]...], "more"}``), read once a ReadIndex round
        confirms this node leads. ``served`` is false when the group does not
        serve the shard now (moving, or another group's)."""

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)

            def answer(_: Any) -> dict[str, Any]:
                page = self.machine.list_shard(shard, after, limit, MAX_LIST_HASHES)
                head = {"num": self.machine.config_num, "shard": shard}
                if page is None:
                    return {**head, "served": False}
                return {**head, "served": True, **page}

            d.addCallback(answer)
            return d

        return self.as_leader(attempt, timeout)

    def changes(
        self,
        shard: int,
        since: int = 0,
        limit: int = 1000,
        wait: float = 0.0,
        timeout: float | None = None,
    ) -> defer.Deferred:
        """Fires with the writes to ``shard`` after revision ``since``
        (``MetadataStateMachine.changes``, plus ``num``, ``shard`` and
        ``served`` as ``listfiles`` has them), read once a ReadIndex round
        confirms this node leads. With ``wait`` (seconds, at most
        ``MAX_WATCH``) and nothing new yet, the answer waits until the shard
        changes, stops being served here, or ``wait`` passes: a watch by
        long poll."""
        wait = max(0.0, min(float(wait), MAX_WATCH))

        def page() -> dict[str, Any]:
            found = self.machine.changes(shard, since, limit, MAX_LIST_HASHES)
            head = {"num": self.machine.config_num, "shard": shard}
            return {**head, "served": False} if found is None else {**head, "served": True, **found}

        @defer.inlineCallbacks
        def attempt(remaining: float):
            started = self.reactor.seconds()
            yield self.node.read(timeout=remaining)
            answer = page()
            idle = answer.get("served") and not answer.get("compacted") and not answer.get("changes")
            left = min(wait, remaining) - (self.reactor.seconds() - started)
            if idle and left > 0:
                yield self._watch(shard, since, left)
                yield self.node.read(timeout=max(remaining - (self.reactor.seconds() - started), 0.001))
                answer = page()
            return answer

        return self.as_leader(attempt, timeout)

    def _watch(self, shard: int, since: int, seconds: float) -> defer.Deferred:
        """Fires (with None) once ``shard``'s revision passes ``since`` here,
        the shard stops being served here, this node's role changes, or
        ``seconds`` pass."""

        def moved_on() -> bool:
            revision = self.machine.revision_of(shard)
            return revision is None or revision > since

        return self.wait_until(moved_on, seconds)

    def getshardfiles(self, shards: list[int], timeout: float | None = None) -> defer.Deferred:
        """Fires with ``{"num", "files", "missing"}`` once a ReadIndex round
        confirms this node leads: the files of the served ones of ``shards``,
        and the shards it does not serve now (so a cluster-wide listing never
        silently drops a shard in transit)."""

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)

            def answer(_: Any) -> dict[str, Any]:
                files, missing = self.machine.shard_files(shards)
                return {
                    "num": self.machine.config_num,
                    "files": {n: fileinfo(i) for n, i in files.items()},
                    "missing": missing,
                }

            d.addCallback(answer)
            return d

        return self.as_leader(attempt, timeout)

    def shard_fetch(
        self,
        num: int,
        shard: int,
        cursor: Any = None,
        max_bytes: int = CHUNK_BYTES,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A chunk of a shard leaving this group under map ``num`` (see
        ``surfshard.metadata.handoff``). Any replica that has applied map
        ``num`` answers (the copy is frozen); one that has not answers
        NOT_READY, and the caller tries another or waits."""
        if self.is_crashed():
            raise errors.Crashed("node is crashed")
        return self.machine.fetch_chunk(num, shard, cursor_from_wire(cursor), max_bytes)

    def shard_installed(self, num: int, shard: int, timeout: float | None = None) -> defer.Deferred:
        """Fires with whether this group has installed ``shard``, gained
        under map ``num``, once a ReadIndex round confirms this node leads
        (the source deletes its copy on a True, so a stale answer must not
        be possible)."""

        def attempt(remaining: float) -> defer.Deferred:
            d = self.node.read(timeout=remaining)
            d.addCallback(lambda _: self.machine.installed(num, shard))
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
        status["update_batches"] = self.batches_proposed
        status["batched_updates"] = self.batched_updates
        return status


#: Block hashes one listfiles page carries at most (about 6.6 MB of reply).
MAX_LIST_HASHES = 100_000
#: Longest a ``changes`` call waits for a change (a watch's long poll).
MAX_WATCH = 60.0


def _time_out(waiter: ReplySink, timeout: float) -> None:
    if not waiter.called:
        waiter.errback(errors.Timeout(f"no answer within {timeout:g}s; the update may still be applied"))


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
