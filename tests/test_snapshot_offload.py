"""Snapshots off the event loop (issue 12, item 3).

A node whose state machine provides ``ISnapshotCopy`` copies its state on
the event loop, encodes and writes the copy through ``offload`` (a thread in
production), and compacts its log once the write is durable. Entries go on
being applied meanwhile. ``DiskStorage`` splits ``save_snapshot`` into the
write (``ISnapshotFile.write_snapshot``, safe from a thread) and the
compaction (``install_written_snapshot``, on the event loop).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import cbor2
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from raft.interfaces import ISnapshotCopy, ISnapshotFile
from raft.node import RaftNode, _default_offload
from raft.storage import DiskStorage, MemoryStorage
from raft.testing.simnet import RecordingStateMachine
from raft.types import Entry, RaftConfig, Snapshot, SnapshotMeta
from surfshard.metadata.state import MetadataStateMachine, encode_update

H = "a" * 64


class NullTransport:
    def send(self, message: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def set_handler(self, handler: Any) -> None:
        pass


class HeldOffload:
    """An offload that keeps the work until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = []

    def __call__(self, work: Callable[[], Any]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.jobs.append((work, d))
        return d

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for work, d in jobs:
            defer.maybeDeferred(work).chainDeferred(d)


class NodeTests(SynchronousTestCase):
    def node(self, storage: Any) -> tuple[RaftNode, RecordingStateMachine, HeldOffload, Clock]:
        clock = Clock()
        offload = HeldOffload()
        sm = RecordingStateMachine()
        node = RaftNode(
            RaftConfig(id=1, peers=(1,)),
            storage,
            NullTransport(),  # type: ignore[arg-type]
            sm,
            clock,
            snapshot_entries=5,
            offload=offload,
        )
        node.startService()
        self.addCleanup(node.stopService)
        node.campaign()
        clock.advance(0)
        self.assertTrue(node.is_leader)
        return node, sm, offload, clock

    def propose(self, node: RaftNode, clock: Clock, n: int, tag: str) -> None:
        for k in range(n):
            node.propose(f"{tag}{k}".encode())
        clock.advance(0)

    def check(self, storage: Any) -> None:
        node, sm, offload, clock = self.node(storage)
        self.propose(node, clock, 6, "a")
        self.assertEqual(len(offload.jobs), 1, "the snapshot did not go through offload")
        copied = node.applied_index
        self.assertEqual(node.core.snapshot_meta.index, 0, "compacted before the write")
        # Applies go on while the snapshot is being written; no second job.
        self.propose(node, clock, 6, "b")
        self.assertEqual(node.applied_index, copied + 6)
        self.assertEqual(len(offload.jobs), 1)
        offload.run_all()
        # The snapshot is of the index copied, not of what was applied since.
        self.assertEqual(node.core.snapshot_meta.index, copied)
        _, snapshot, entries = storage.load()
        self.assertEqual(snapshot.meta.index, copied)
        self.assertEqual(cbor2.loads(snapshot.data), sm.applied[: copied - 1])  # less the leader's no-op
        self.assertEqual(entries[0].index, copied + 1)
        # The next one starts once enough was applied since.
        self.propose(node, clock, 1, "c")
        self.assertEqual(len(offload.jobs), 1)

    def test_memory_storage(self) -> None:
        self.check(MemoryStorage())

    def test_disk_storage_writes_in_the_offloaded_work(self) -> None:
        storage = DiskStorage(self.mktemp(), fsync=False)
        self.addCleanup(storage.close)
        self.check(storage)

    def test_a_failed_write_stops_the_node(self) -> None:
        storage = DiskStorage(self.mktemp(), fsync=False)
        self.addCleanup(storage.close)
        node, _, offload, clock = self.node(storage)
        self.propose(node, clock, 6, "a")

        def broken(snapshot: Snapshot) -> None:
            raise OSError("disk full")

        storage.write_snapshot = broken  # type: ignore[method-assign]
        offload.run_all()
        self.assertIsNotNone(node.fatal_error)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_power_off_drops_a_snapshot_in_flight(self) -> None:
        from twisted.internet import task

        clock = Clock()
        storage = MemoryStorage()
        node = RaftNode(
            RaftConfig(id=1, peers=(1,)),
            storage,
            NullTransport(),  # type: ignore[arg-type]
            RecordingStateMachine(),
            clock,
            snapshot_entries=5,
            offload=lambda work: task.deferLater(clock, 1.0, work),
        )
        node.startService()
        node.campaign()
        clock.advance(0)
        for k in range(6):
            node.propose(b"x%d" % k)
        clock.advance(0)
        self.assertIsNotNone(node._snapshot_job)
        node.power_off()
        clock.advance(2.0)
        self.assertIsNone(storage.load()[1])


class DefaultOffloadTests(TestCase):
    def test_a_reactor_with_threads_encodes_in_a_thread(self) -> Any:
        main = threading.get_ident()
        d = _default_offload(reactor)(threading.get_ident)
        d.addCallback(lambda ident: self.assertNotEqual(ident, main))
        return d

    def test_simulated_time_runs_it_a_turn_later(self) -> None:
        clock = Clock()
        ran: list[int] = []
        d = _default_offload(clock)(lambda: ran.append(1))
        self.assertEqual(ran, [])
        clock.advance(0)
        self.assertEqual(ran, [1])
        self.assertTrue(d.called)


class MetadataCopyTests(SynchronousTestCase):
    def test_the_copy_is_the_state_when_it_was_taken(self) -> None:
        m = MetadataStateMachine(4)
        verifyObject(ISnapshotCopy, m)
        for i in range(50):
            m.apply(encode_update(f"f{i}", 1, [H], "c", i + 1))
        expected = m.snapshot()
        encode = m.snapshot_copy()
        for i in range(50):
            m.apply(encode_update(f"f{i}", 2, [H], "c", 100 + i))
        m.apply(encode_update("new", 1, [H], "c", 999))
        self.assertEqual(encode(), expected)
        self.assertNotEqual(m.snapshot(), expected)

    def test_the_encoding_is_canonical_cbor(self) -> None:
        # Slice by slice, the same bytes as one canonical cbor2 call.
        from surfshard.metadata import state

        m = MetadataStateMachine(2)
        names = [f"n{i}" for i in range(3 * state._SNAPSHOT_SLICE)] + ["é" * 20, "x" * 300, "z"]
        for i, name in enumerate(names):
            m.apply(encode_update(name, 1, [H] * (1 + i % 3), "c", i + 1))
        data = m.snapshot()
        self.assertEqual(data, cbor2.dumps(cbor2.loads(data), canonical=True))
        copy = MetadataStateMachine(2)
        copy.restore(data)
        self.assertEqual(copy.getfileinfomap(), m.getfileinfomap())


class SnapshotFileTests(SynchronousTestCase):
    def open(self, directory: str) -> DiskStorage:
        storage = DiskStorage(directory, fsync=False)
        storage.load()
        return storage

    def fill(self, storage: DiskStorage, last: int) -> None:
        storage.append([Entry(1, i, b"e%d" % i) for i in range(1, last + 1)])
        storage.sync()

    def test_provides_the_interface(self) -> None:
        storage = self.open(self.mktemp())
        self.addCleanup(storage.close)
        verifyObject(ISnapshotFile, storage)

    def test_write_then_install_is_save(self) -> None:
        storage = self.open(self.mktemp())
        self.addCleanup(storage.close)
        self.fill(storage, 10)
        snapshot = Snapshot(SnapshotMeta(6, 1), b"six")
        storage.write_snapshot(snapshot)
        self.assertEqual(storage.load()[1], None, "the log changed before the install")
        storage.install_written_snapshot(snapshot)
        _, snap, entries = storage.load()
        self.assertEqual((snap, [e.index for e in entries]), (snapshot, [7, 8, 9, 10]))

    def test_a_crash_between_write_and_install_recovers_the_snapshot(self) -> None:
        directory = self.mktemp()
        storage = self.open(directory)
        self.fill(storage, 10)
        snapshot = Snapshot(SnapshotMeta(6, 1), b"six")
        storage.write_snapshot(snapshot)
        storage.simulate_crash()
        storage = self.open(directory)
        self.addCleanup(storage.close)
        _, snap, entries = storage.load()
        self.assertEqual((snap, [e.index for e in entries]), (snapshot, [7, 8, 9, 10]))

    def test_an_older_write_never_replaces_a_newer_snapshot(self) -> None:
        directory = self.mktemp()
        storage = self.open(directory)
        self.fill(storage, 10)
        newer = Snapshot(SnapshotMeta(8, 1), b"eight")
        storage.save_snapshot(newer)
        older = Snapshot(SnapshotMeta(6, 1), b"six")
        storage.write_snapshot(older)
        storage.install_written_snapshot(older)
        storage.close()
        storage = self.open(directory)
        self.addCleanup(storage.close)
        self.assertEqual(storage.load()[1], newer)

    def test_install_skips_a_snapshot_whose_file_was_replaced(self) -> None:
        directory = self.mktemp()
        storage = self.open(directory)
        self.fill(storage, 10)
        background = Snapshot(SnapshotMeta(6, 1), b"six")
        storage.write_snapshot(background)
        leader = Snapshot(SnapshotMeta(9, 1), b"nine")  # from the leader, meanwhile
        storage.save_snapshot(leader)
        storage.install_written_snapshot(background)
        storage.close()
        storage = self.open(directory)
        self.addCleanup(storage.close)
        _, snap, entries = storage.load()
        self.assertEqual((snap, [e.index for e in entries]), (leader, [10]))

    def test_install_keeps_entries_appended_but_not_yet_synced(self) -> None:
        # The event loop goes on appending while the file is written: the
        # install must make those durable before it rewrites the log.
        directory = self.mktemp()
        storage = self.open(directory)
        self.fill(storage, 10)
        snapshot = Snapshot(SnapshotMeta(6, 1), b"six")
        storage.write_snapshot(snapshot)
        storage.append([Entry(1, 11, b"e11")])
        storage.append([Entry(1, 12, b"e12")])  # frames the record of 11
        storage.install_written_snapshot(snapshot)
        storage.append([Entry(1, 13, b"e13")])
        storage.sync()
        storage.close()
        storage = self.open(directory)
        self.addCleanup(storage.close)
        _, snap, entries = storage.load()
        self.assertEqual((snap, [e.index for e in entries]), (snapshot, [7, 8, 9, 10, 11, 12, 13]))


class StaggerTests(SynchronousTestCase):
    def test_replicas_take_their_first_snapshot_at_different_points(self) -> None:
        # Node k of n waits k/n of a period more the first time, so the
        # replicas of a group never all encode a snapshot at once.
        due = []
        for node_id in (1, 2, 3):
            clock = Clock()
            offload = HeldOffload()
            node = RaftNode(
                RaftConfig(id=node_id, peers=(node_id,)),
                MemoryStorage(),
                NullTransport(),  # type: ignore[arg-type]
                RecordingStateMachine(),
                clock,
                snapshot_entries=30,
                offload=offload,
            )
            node._snapshot_stagger = RaftNode(
                RaftConfig(id=node_id, peers=(1, 2, 3)),
                MemoryStorage(),
                NullTransport(),  # type: ignore[arg-type]
                RecordingStateMachine(),
                clock,
                snapshot_entries=30,
            )._snapshot_stagger
            node.startService()
            self.addCleanup(node.stopService)
            node.campaign()
            clock.advance(0)
            for k in range(100):
                node.propose(b"%d" % k)
                clock.advance(0)
                if offload.jobs:
                    due.append(node.applied_index)
                    break
        self.assertEqual(due, [30, 40, 50])
