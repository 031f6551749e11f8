"""Nothing acknowledged is lost when a majority is SIGKILLed mid-load, and
nothing is applied twice.

A 3-node group (TOML config, ``[raft] fsync = true``) takes a write load:
several writers, each updating a file of its own with sequential versions
over the native protocol, each write carrying the writer's client id and a
sequence number that stays the same across retries (so a retry of a write
that did commit is answered from the dedup table). In the middle of the load
the leader and one follower are SIGKILLed, by pid, and restarted on the same
data directories. At the end every node is SIGKILLed and restarted once
more, cold, so the answers can only come from disk.

Checked: every acknowledged version is there with its contents; a writer's
file is never more than its one in-flight write ahead of its
acknowledgements; no retry was refused as a version mismatch; re-sending an
acknowledged write after the cold restart is answered from the (persisted)
dedup table instead of being applied again or refused.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from tests import procs

NODES = 3
WRITERS = 4
#: Acknowledged writes per writer before the kill, and after the restart.
BEFORE_KILL = 5
AFTER_RESTART = 5
#: How long the majority stays down (writers keep trying meanwhile).
DOWN_FOR = 1.0
#: Server-side bound on one call, and the socket timeout around it.
CALL_TIMEOUT = 2.0
SOCKET_TIMEOUT = 5.0
#: Writers give up on a single write after this long (the test then fails).
WRITE_DEADLINE = 40.0
PROGRESS_DEADLINE = 30.0


def contents(writer: int, version: int) -> list[str]:
    """The hashlist writer ``writer`` stores as ``version``."""
    return [hashlib.sha256(f"w{writer}/v{version}/{k}".encode()).hexdigest() for k in range(1 + version % 3)]


class Writer:
    """One client writing versions 1, 2, 3... of its own file, each write
    retried (same client id and seq) across nodes until it is answered.

    ``acked`` is the last version the group acknowledged; ``in_flight`` is
    the version being written when the writer stopped without an answer
    (None if it stopped between writes). ``problems`` collects answers that
    must never happen: a version mismatch on a file no one else writes.
    """

    def __init__(self, index: int, addresses: list[str], stop: threading.Event) -> None:
        self.index = index
        self.name = f"writer-{index}.bin"
        self.client_id = f"test-writer-{index}-{uuid.uuid4().hex}"
        self.addresses = addresses
        self.stop = stop
        self.acked = 0
        self.ack_times: list[float] = []
        self.in_flight: int | None = None
        self.attempts = 0
        self.problems: list[str] = []
        self.clients = {a: procs.NativeClient(a, SOCKET_TIMEOUT) for a in addresses}
        self._target = addresses[index % len(addresses)]
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            version = 1
            # Bounded: the stop event ends it, and every write has a deadline.
            while not self.stop.is_set() and version < 10_000:
                self.in_flight = version
                if not self.write(version, seq=version):
                    return
                self.in_flight = None
                self.acked = version
                self.ack_times.append(time.monotonic())
                version += 1
        except BaseException as e:  # a bug in the test itself: make it visible
            self.problems.append(f"writer crashed: {e!r}")
        finally:
            for client in self.clients.values():
                client.close()

    def write(self, version: int, seq: int) -> bool:
        """True once acknowledged; False if it gave up (deadline or a wrong answer)."""
        deadline = time.monotonic() + WRITE_DEADLINE
        args = {
            "name": self.name,
            "version": version,
            "hashlist": contents(self.index, version),
            "client_id": self.client_id,
            "seq": seq,
            "timeout": CALL_TIMEOUT,
        }
        # Bounded by the deadline (each attempt is bounded by the timeouts).
        while time.monotonic() < deadline:
            self.attempts += 1
            try:
                answer = self.clients[self._target].call("updatefile", args)
            except errors.VersionMismatch as e:
                self.problems.append(f"v{version} (seq {seq}) refused as a version mismatch: {e}")
                return False
            except errors.NotLeader as e:
                if e.leader in self.clients and e.leader != self._target:
                    self._target = e.leader
                    continue
                self._next_node()
            except (errors.Unavailable, errors.Timeout, errors.Crashed):
                self._next_node()
            else:
                if answer != version:
                    self.problems.append(f"v{version} answered {answer!r}")
                    return False
                return True
            # A short pause between retries. Told to stop, the writer leaves
            # this write unanswered: it stays counted as in flight.
            if self.stop.wait(0.05):
                return False
        self.problems.append(f"v{version} not acknowledged within {WRITE_DEADLINE}s")
        return False

    def _next_node(self) -> None:
        i = self.addresses.index(self._target)
        self._target = self.addresses[(i + 1) % len(self.addresses)]

    def acks_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.ack_times if start < t < end)


class RestartFromDiskTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = procs.Cluster.toml(Path(self.mktemp()), NODES, name="restart", chaos=False, fsync=True)
        self.addCleanup(self.cluster.cleanup)
        self.stop = threading.Event()
        # Runs before the cluster cleanup (cleanups run last-in first-out):
        # writers stop before the processes go.
        self.writers: list[Writer] = []
        self.addCleanup(self.stop_writers)

    def stop_writers(self) -> None:
        self.stop.set()
        for w in self.writers:
            w.thread.join(WRITE_DEADLINE + SOCKET_TIMEOUT)

    def native(self, i: int) -> procs.NativeClient:
        client = self.cluster.native(i, SOCKET_TIMEOUT)
        self.addCleanup(client.close)
        return client

    def leader(self) -> int:
        """The node that leads and proves it with a linearizable read."""

        def proven() -> int | None:
            for i in self.cluster.running():
                try:
                    with procs.NativeClient(self.cluster.addresses[i], SOCKET_TIMEOUT) as c:
                        if c.call("is_leader"):
                            c.call("getfileinfomap", {"timeout": CALL_TIMEOUT})
                            return i + 1  # node 0 is falsy
                except errors.SurfShardError:
                    continue
            return None

        return procs.wait_until(proven, 10.0, 0.05, "no leader proved itself") - 1

    def wait_for_writers(self, target: Any, what: str) -> None:
        def progressed() -> bool:
            for w in self.writers:
                if w.problems:
                    raise self.failureException(f"writer {w.index}: {w.problems}")
            return all(target(w) for w in self.writers)

        procs.wait_until(
            progressed,
            PROGRESS_DEADLINE,
            0.05,
            lambda: f"{what}: acked {[w.acked for w in self.writers]}",
        )

    def check_files(self, leader: int, where: str) -> dict[str, Any]:
        files = self.native(leader).call("getfileinfomap", {"timeout": CALL_TIMEOUT})
        for w in self.writers:
            version, hashlist = files.get(w.name, [0, []])
            allowed = {w.acked} | ({w.in_flight} if w.in_flight is not None else set())
            self.assertIn(
                version,
                allowed,
                f"{where}: {w.name} is at v{version}; acknowledged v{w.acked}, in flight {w.in_flight}",
            )
            self.assertEqual(hashlist, contents(w.index, version), f"{where}: {w.name} v{version} contents")
        return files

    def wait_all_nodes(self, files: dict[str, Any]) -> None:
        """Every node applies the same versions (tester_getversion is
        committed state, read without a majority round)."""
        expected = {w.name: files[w.name][0] for w in self.writers}

        def lagging() -> dict[int, dict[str, int]]:
            lag = {}
            for i in range(NODES):
                with procs.NativeClient(self.cluster.addresses[i], SOCKET_TIMEOUT) as c:
                    seen = {n: c.call("tester_getversion", {"name": n}) for n in expected}
                if seen != expected:
                    lag[i] = seen
            return lag

        procs.wait_until(lambda: not lagging(), 10.0, 0.1, lambda: f"nodes lag {expected}: {lagging()}")

    def test_kill_majority_mid_load_then_cold_restart(self) -> None:
        cluster = self.cluster
        with cluster.logs_on_failure():
            cluster.start_all()
            self.leader()

            self.writers = [Writer(k, cluster.addresses, self.stop) for k in range(WRITERS)]
            for w in self.writers:
                w.start()
            self.wait_for_writers(lambda w: w.acked >= BEFORE_KILL, "load before the kill")

            # SIGKILL the leader and one follower: the group has lost its majority.
            leader = self.leader()
            victims = [leader, (leader + 1) % NODES]
            for i in victims:
                cluster.kill(i)
            killed_at = time.monotonic()
            acked_at_kill = [w.acked for w in self.writers]

            # With one node of three up nothing can commit, however hard the
            # writers retry. (A reply already on its way when the kill landed
            # may arrive just after it.)
            def acked_while_down() -> int:
                return sum(w.acks_between(killed_at + 0.5, float("inf")) for w in self.writers)

            held, when = procs.holds_for(lambda: acked_while_down() == 0, DOWN_FOR)
            self.assertTrue(held, f"a write was acknowledged {when}s into the majority outage")

            for i in victims:
                cluster.start(i, wait=False)
            for i in victims:
                cluster.wait_serving(i)
            self.wait_for_writers(
                lambda w: w.acked >= acked_at_kill[w.index] + AFTER_RESTART, "load after the restart"
            )
            self.stop_writers()
            for w in self.writers:
                self.assertEqual(w.problems, [], f"writer {w.index}")
                self.assertFalse(w.thread.is_alive(), f"writer {w.index} did not stop")
            # The outage made writers retry (the same seq, on other nodes).
            retries = sum(w.attempts - w.acked for w in self.writers)
            self.assertGreater(retries, 0, "no write was retried across the outage")
            files = self.check_files(self.leader(), "after the majority restart")
            self.wait_all_nodes(files)

            # Cold: every node SIGKILLed, then all restarted from their data dirs.
            for i in range(NODES):
                cluster.kill(i)
            for i in range(NODES):
                cluster.start(i, wait=False)
            for i in range(NODES):
                cluster.wait_serving(i)
            leader = self.leader()
            self.assertEqual(self.check_files(leader, "after the cold restart"), files)
            self.wait_all_nodes(files)

            # The dedup table came back from disk too: the last acknowledged
            # write, sent again with its seq, gets its first answer back.
            client = self.native(leader)
            for w in self.writers:
                again = client.call(
                    "updatefile",
                    {
                        "name": w.name,
                        "version": w.acked,
                        "hashlist": contents(w.index, w.acked),
                        "client_id": w.client_id,
                        "seq": w.acked,
                        "timeout": CALL_TIMEOUT,
                    },
                )
                self.assertEqual(again, w.acked, f"{w.name}: a retried write after restart")
            self.assertEqual(self.check_files(leader, "after the retries"), files)
