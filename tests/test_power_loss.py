"""Power loss that really loses data (issue 12, item 5).

``raft.testing.powerloss`` keeps to the letter of POSIX: content is durable
as of a file's last fsync, names as of their directory's last fsync. On it:

- the fake itself, so the other tests can trust it;
- ``DiskStorage`` against ``MemoryStorage`` as the oracle, under random
  operations and power cuts: after every cut the disk must give back
  exactly what was synced;
- Raft clusters over it, leaders killed mid-write and every restart a cut,
  snapshots and compactions included: no acknowledged write is lost.

``python3 dev.py mutants`` removes each fsync and sync call of the durable
path in turn and runs these tests: each removal must fail one of them.
Seeds from ``raft.testing.simnet.sim_seeds`` (``RAFT_SEEDS``, ``RAFT_SEED``).
"""

from __future__ import annotations

import os
import random

from twisted.trial.unittest import SynchronousTestCase

from raft.storage import DiskStorage, MemoryStorage
from raft.testing.powerloss import PowerLossDiskStorage, PowerLossSyscalls
from raft.testing.simnet import SimCluster, sim_seeds
from raft.types import Entry, HardState, Snapshot, SnapshotMeta


class FakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.sys = PowerLossSyscalls()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write(self, name: str, data: bytes, *, sync: bool, flags: int = os.O_CREAT | os.O_WRONLY) -> None:
        fd = self.sys.open(self.path(name), flags)
        self.sys.write(fd, data)
        if sync:
            self.sys.fsync(fd)
        self.sys.close(fd)

    def sync_dir(self) -> None:
        fd = self.sys.open(self.dir, os.O_RDONLY)
        self.sys.fsync(fd)
        self.sys.close(fd)

    def read(self, name: str) -> bytes | None:
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def test_what_was_written_after_the_last_fsync_is_lost(self) -> None:
        self.write("a", b"one", sync=True)
        self.sync_dir()
        self.write("a", b"two", sync=False, flags=os.O_WRONLY | os.O_APPEND)
        self.assertEqual(self.read("a"), b"onetwo")
        self.sys.power_loss()
        self.assertEqual(self.read("a"), b"one")

    def test_a_new_name_needs_its_directory_fsynced(self) -> None:
        self.write("a", b"data", sync=True)
        self.sys.power_loss()
        self.assertIsNone(self.read("a"))
        self.write("b", b"data", sync=True)
        self.sync_dir()
        self.sys.power_loss()
        self.assertEqual(self.read("b"), b"data")

    def test_a_file_never_fsynced_comes_back_empty(self) -> None:
        self.write("a", b"data", sync=False)
        self.sync_dir()
        self.sys.power_loss()
        self.assertEqual(self.read("a"), b"")

    def test_a_rename_is_undone_without_a_directory_fsync(self) -> None:
        self.write("a", b"old", sync=True)
        self.sync_dir()
        self.write("a.tmp", b"new", sync=True)
        self.sys.replace(self.path("a.tmp"), self.path("a"))
        self.sys.power_loss()
        self.assertEqual(self.read("a"), b"old")
        self.assertEqual(self.read("a.tmp"), None)  # its name was never durable
        self.write("a.tmp", b"new", sync=True)
        self.sys.replace(self.path("a.tmp"), self.path("a"))
        self.sync_dir()
        self.sys.power_loss()
        self.assertEqual(self.read("a"), b"new")

    def test_files_there_before_count_as_durable(self) -> None:
        with open(self.path("old"), "wb") as f:
            f.write(b"kept")
        self.write("old", b"+", sync=False, flags=os.O_WRONLY | os.O_APPEND)
        self.sys.power_loss()
        self.assertEqual(self.read("old"), b"kept")


def _same(test: SynchronousTestCase, disk: DiskStorage, oracle: MemoryStorage, where: str) -> None:
    got, want = disk.load(), oracle.load()
    test.assertEqual(got[0], want[0], f"{where}: hard state")
    test.assertEqual(got[1], want[1], f"{where}: snapshot")
    test.assertEqual(got[2], want[2], f"{where}: entries")


class StorageOracleTests(SynchronousTestCase):
    """DiskStorage under random work and power cuts gives back exactly what
    MemoryStorage (whose ``simulate_crash`` keeps what was synced) does."""

    def run_seed(self, seed: int) -> None:
        rng = random.Random(seed)
        directory = self.mktemp()
        power = PowerLossSyscalls()
        disk = PowerLossDiskStorage(directory, power)
        oracle = MemoryStorage()
        for store in (disk, oracle):
            store.load()
        term = 1

        def bounds() -> tuple[int, int]:
            _, snap, entries = oracle.load()
            first = snap.meta.index if snap else 0
            return first, entries[-1].index if entries else first

        for step in range(400):
            where = f"seed={seed} (replay with RAFT_SEED={seed}) step={step}"
            snap_index, last = bounds()
            roll = rng.random()
            if roll < 0.45:
                # Append, sometimes over a suffix (as under a new leader).
                first = max(snap_index, last - rng.randrange(3)) + 1
                if rng.random() < 0.2:
                    term += 1
                entries = [
                    Entry(term, i, b"e%d-%d" % (i, step)) for i in range(first, first + rng.randint(1, 5))
                ]
                for store in (disk, oracle):
                    store.append(entries)
            elif roll < 0.6:
                state = HardState(term, rng.choice([None, 1, 2]), rng.randint(0, last))
                for store in (disk, oracle):
                    store.set_hard_state(state)
            elif roll < 0.8:
                for store in (disk, oracle):
                    store.sync()
            elif roll < 0.88:
                if last > snap_index:
                    index = rng.randint(snap_index + 1, last)
                    entry_term = next(e.term for e in oracle.load()[2] if e.index == index)
                    snapshot = Snapshot(SnapshotMeta(index, entry_term), b"state@%d" % index)
                    for store in (disk, oracle):
                        store.save_snapshot(snapshot)
            else:
                disk.simulate_crash()  # the process dies and the power goes
                oracle.simulate_crash()
                disk = PowerLossDiskStorage(directory, power)
                _same(self, disk, oracle, where)
        disk.close()

    def test_disk_gives_back_what_was_synced_after_every_cut(self) -> None:
        for seed in sim_seeds(8):
            self.run_seed(seed)


class ClusterTests(SynchronousTestCase):
    """Raft over DiskStorage with real power cuts: leaders and followers
    killed at random moments, every restart a cut, compactions going on."""

    def run_seed(self, seed: int) -> None:
        base = self.mktemp()
        powers: dict[int, PowerLossSyscalls] = {}

        def open_storage(i: int) -> DiskStorage:
            power = powers.setdefault(i, PowerLossSyscalls())
            return PowerLossDiskStorage(os.path.join(base, str(i)), power)

        c = SimCluster(3, seed, storage_factory=open_storage, reopen_storage=True, snapshot_entries=12)
        self.addCleanup(c.shutdown)
        c.wait_for_leader()
        rng = c.rng
        for it in range(120):
            for i in c.believed_leaders():
                c.submit(i, b"p%d-%d" % (it, i))
            c.run(rng.uniform(0.0, 0.02) if rng.random() < 0.9 else rng.uniform(0.05, 0.4))
            running = [i for i in c.ids if c.node(i).running]
            if rng.random() < 0.25 and running:
                c.stop(rng.choice(running), power_loss=True)
            down = [i for i in c.ids if not c.node(i).running]
            if len(down) > 1 or (down and rng.random() < 0.5):
                c.start(rng.choice(down))
        for i in c.ids:
            if not c.node(i).running:
                c.start(i)
        c.one(b"end", 3, timeout=20.0)
        c.check_invariants()
        c.check_acked_applied()
        self.assertGreater(sum(p.cuts for p in powers.values()), 0)

    def test_no_acknowledged_write_is_lost_to_power_cuts(self) -> None:
        for seed in sim_seeds(4):
            try:
                self.run_seed(seed)
            except Exception as e:
                raise self.failureException(f"seed={seed} (replay with RAFT_SEED={seed}): {e}") from e
