# -*- test-case-name: tests.test_migration_sim -*-
"""The leader's side of shard migration: pull each incoming shard from the
group that held it; delete each outgoing shard once its new owner has it.

``ShardMigrator`` runs on every replica of a group and acts only while its
node leads. Everything it acts on is replicated state
(``MetadataStateMachine.incoming()`` and ``outgoing()``, see
``surfshard.metadata.handoff``), so a new leader, or a node restarted from
its snapshot, picks up exactly where the last one stopped. Each incoming
shard is pulled on its own: a shard whose source is down blocks only
itself, and a shard serves as soon as its last chunk is committed.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from raft.node import RaftNode
from raft.types import Role
from surfshard import errors
from surfshard.metadata.handoff import CHUNK_BYTES, Incoming, cursor_from_wire, cursor_to_wire
from surfshard.metadata.state import MetadataStateMachine, encode_delete, encode_install
from surfshard.net.interfaces import IRpcPool
from surfshard.replica.leader_caller import LeaderCaller
from surfshard.replica.loops import guarded, polling_loop

#: How often a leader looks for shards to pull or release while some are in
#: transit; the interval is part of how long a moving shard pauses.
POLL_INTERVAL = 0.02
#: How often it looks when none is: only a safety net. A move starts at
#: once, on the state machine's cue (``on_moving``) or when this node
#: becomes leader, so an idle replica is not woken 50 times a second.
IDLE_INTERVAL = 1.0
#: How long a source waits before asking again whether a target has
#: installed a shard it said it had not.
RELEASE_RECHECK = 0.2
#: Per call: one chunk fetched, one chunk committed.
CALL_TIMEOUT = 5.0


class ShardMigrator(service.Service):
    """Pulls incoming shards and asks sources to delete, while leading."""

    log = Logger()

    def __init__(
        self,
        gid: int,
        node: RaftNode,
        machine: MetadataStateMachine,
        pool: IRpcPool,
        reactor: IReactorTime,
        *,
        interval: float = POLL_INTERVAL,
        chunk_bytes: int = CHUNK_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.gid = gid
        self.node = node
        self.machine = machine
        self.pool = pool
        self.reactor = reactor
        self.interval = interval
        self.chunk_bytes = chunk_bytes
        #: The callers' backoff jitter (a simulation passes a seeded one).
        self.rng = rng or random.Random()
        self._loop: task.LoopingCall | None = None
        self._soon: IDelayedCall | None = None
        #: Shards with a pull or a delete running: shard -> its Deferred.
        self._active: dict[tuple[str, int], defer.Deferred[Any]] = {}
        #: Figures for status pages and benchmarks.
        self.polls = 0
        self.chunks_installed = 0
        self.shards_installed = 0
        self.bytes_pulled = 0
        self._last_note: dict[int, str] = {}
        #: Outgoing shard -> when to next ask its target whether it arrived.
        self._release_after: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop = polling_loop(
            self._poll, self.reactor, max(IDLE_INTERVAL, self.interval), self.log, "shard migrator poll"
        )
        self.machine.on_moving.append(self.poke)
        self.node.on_role_change.append(self._role_changed)
        self.poke()

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self.poke in self.machine.on_moving:
            self.machine.on_moving.remove(self.poke)
        if self._role_changed in self.node.on_role_change:
            self.node.on_role_change.remove(self._role_changed)
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        for d in list(self._active.values()):
            d.cancel()
        self._active.clear()
        return super().stopService()  # type: ignore[no-untyped-call]

    def _leading(self) -> bool:
        return bool(self.running) and self.node.is_leader and not self.node.crashed

    def poke(self, delay: float = 0.0) -> None:
        """Look for work ``delay`` seconds from now (or sooner if already due)."""
        if not self.running:
            return
        if self._soon is not None and self._soon.active():
            if self._soon.getTime() <= self.reactor.seconds() + delay:
                return
            self._soon.cancel()
        self._soon = self.reactor.callLater(delay, self._poll_soon)

    def _role_changed(self, role: Role, _leader: int | None) -> None:
        if role == Role.LEADER:
            self.poke()

    def _poll_soon(self) -> None:
        self._soon = None
        guarded(self._poll, self.log, "shard migrator poll")()

    def _poll(self) -> None:
        self.polls += 1
        if not self._leading():
            return
        for shard, incoming in self.machine.incoming().items():
            self._start(("pull", shard), self._pull, shard, incoming)
        now = self.reactor.seconds()
        for shard, (num, target, addresses) in self.machine.outgoing().items():
            if self._release_after.get(shard, 0.0) <= now:
                self._start(("release", shard), self._release, shard, num, target, addresses)
        if self.machine.moving or self._active:
            self.poke(self.interval)

    def _start(self, key: tuple[str, int], job: Any, *args: Any) -> None:
        if key in self._active:
            return
        d = job(*args)
        self._active[key] = d

        def done(result: Any) -> None:
            self._active.pop(key, None)
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.log.failure("shard migration job {key} failed", result, key=key)

        d.addBoth(done)

    def _note(self, shard: int, format: str, **fields: Any) -> None:
        """Log a line about ``shard`` once, not at every poll while it repeats."""
        line = format.format(gid=self.gid, shard=shard, **fields)
        if self._last_note.get(shard) != line:
            self._last_note[shard] = line
            self.log.info("{line}", line=line)

    def _caller(self, addresses: tuple[str, ...]) -> LeaderCaller:
        return LeaderCaller(self.pool, addresses, self.reactor, timeout=CALL_TIMEOUT, rng=self.rng)

    @defer.inlineCallbacks
    def _pull(self, shard: int, incoming: Incoming) -> Any:
        """Fetch and commit chunks until the shard is installed, or this node
        stops leading, or the move is over (then the loop just ends; the
        next poll starts again from the committed cursor)."""
        source = self._caller(incoming.addresses)
        num = incoming.num
        self._note(
            shard,
            "group {gid}: pulling shard {shard} from group {source} (shard map {num})",
            source=incoming.source,
            num=num,
        )
        # Bounded: each turn commits a chunk (the cursor moves on), or ends.
        while self._leading():
            current = self.machine.incoming().get(shard)
            if current is None or current.num != num:
                return
            start = current.cursor
            try:
                chunk = yield source.call(
                    "shard_fetch",
                    {
                        "num": num,
                        "shard": shard,
                        "cursor": cursor_to_wire(start),
                        "max_bytes": self.chunk_bytes,
                    },
                    timeout=CALL_TIMEOUT,
                )
                command = self._install_command(num, shard, start, chunk)
            except errors.SurfShardError as e:
                # The source is down or not at map ``num`` yet: this shard
                # waits; the others go on. The next poll tries again.
                self._note(shard, "group {gid}: shard {shard} not fetched yet: {e}", e=e)
                return
            try:
                result = yield self.node.propose(command, timeout=CALL_TIMEOUT)
            except Exception as e:  # leadership lost, timeout: the next leader (or poll) resumes
                self.log.info(
                    "group {gid}: chunk of shard {shard} not committed: {e}", gid=self.gid, shard=shard, e=e
                )
                return
            if not isinstance(result, dict) or not result.get("ok"):
                self.log.warn(
                    "group {gid}: chunk of shard {shard} refused: {r}", gid=self.gid, shard=shard, r=result
                )
                return
            if result.get("applied"):
                self.chunks_installed += 1
                self.bytes_pulled += len(command)
            if result.get("installed") == shard:
                self.shards_installed += 1
                self.log.info(
                    "group {gid}: shard {shard} installed from group {source} (shard map {num})",
                    gid=self.gid,
                    shard=shard,
                    source=incoming.source,
                    num=num,
                )
                return

    @staticmethod
    def _install_command(num: int, shard: int, start: Any, chunk: Any) -> bytes:
        """The install command for a fetched chunk. The state machine checks
        every entry when it applies it; this only checks the reply's shape."""
        if not isinstance(chunk, dict) or not isinstance(chunk.get("files"), list):
            raise errors.BadRequest("malformed shard_fetch reply")
        end = cursor_from_wire(chunk.get("next"), "shard_fetch next")
        return encode_install(
            num,
            shard,
            start,
            end,
            chunk["files"],
            chunk.get("sessions"),
            chunk.get("revision"),
            chunk.get("history"),
            chunk.get("compacted"),
        )

    @defer.inlineCallbacks
    def _release(self, shard: int, num: int, target: int, addresses: tuple[str, ...]) -> Any:
        """Once the target has installed ``shard`` (asked of its leader, a
        linearizable read), delete the frozen copy through this group's log."""
        try:
            installed = yield self._caller(addresses).call("shard_installed", {"num": num, "shard": shard})
        except errors.SurfShardError as e:
            self._note(
                shard,
                "group {gid}: cannot ask group {target} about shard {shard} yet: {e}",
                target=target,
                e=e,
            )
            return
        if installed is not True:
            # Not there yet: ask again a little later (the target is busy
            # pulling; each question costs it a ReadIndex round).
            self._release_after[shard] = self.reactor.seconds() + RELEASE_RECHECK
            return
        if not self._leading():
            return
        try:
            result = yield self.node.propose(encode_delete(num, shard), timeout=CALL_TIMEOUT)
        except Exception as e:  # leadership lost, timeout: the next poll tries again
            self.log.info(
                "group {gid}: delete of shard {shard} not committed: {e}", gid=self.gid, shard=shard, e=e
            )
            return
        if isinstance(result, dict) and result.get("deleted"):
            self.log.info(
                "group {gid}: shard {shard} handed over to group {target} and deleted here (shard map {num})",
                gid=self.gid,
                shard=shard,
                target=target,
                num=num,
            )

    def status(self) -> dict[str, Any]:
        return {
            "chunks_installed": self.chunks_installed,
            "shards_installed": self.shards_installed,
            "bytes_pulled": self.bytes_pulled,
        }
