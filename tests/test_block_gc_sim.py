"""Collections while writers upload and commit (seeded, simulated time):
``SURFSHARD_SEED=n`` replays a seed, ``SURFSHARD_SEEDS=k`` runs k of them.

Writers put blocks through ``BlockClient`` (new ones, and ones the stores
already hold, which they only ask for), wait up to ``UPLOAD_TO_COMMIT``
seconds, then commit a file naming them (or delete one). Collections run
all the while against a listing taken at a random moment of their run, and
block stores restart now and then. Whatever the interleaving, once a file
is committed every block it names must stay on some store, as long as the
grace period covers the writers' upload-to-commit time. The last test
shows the check has teeth: with a grace shorter than that time it finds
committed files whose blocks were collected.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from client.blocks import BlockClient
from raft.testing.simnet import sim_seeds
from surfshard.blocks.ring import BlockRing
from surfshard.blocks.store import BlockStore, blockstore_methods
from surfshard.testing.simrpc import SimRpcNetwork

#: The longest a writer takes from putting its blocks to committing the file.
UPLOAD_TO_COMMIT = 3.0


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class World:
    def __init__(self, test: SynchronousTestCase, seed: int, grace: float) -> None:
        self.seed = seed
        self.grace = grace
        self.rng = random.Random(f"gc-sim:{seed}")
        self.clock = task.Clock()
        self.net = SimRpcNetwork(self.clock, seed)
        self.addresses = ["store:1", "store:2", "store:3"]
        self.dirs = {a: test.mktemp() for a in self.addresses}
        self.stores: dict[str, BlockStore] = {}
        for a in self.addresses:
            self.start(a)
        self.client = BlockClient(None, self.net.pool("client"), ring=BlockRing(self.addresses, 2))  # type: ignore[arg-type]
        #: The committed file map: name -> (version, hashlist).
        self.files: dict[str, tuple[int, list[str]]] = {}
        #: Blocks writers pick from (so later writers reuse earlier blocks).
        self.pool = [self.rng.randbytes(self.rng.randrange(1, 300)) for _ in range(30)]
        self.violations: list[str] = []
        self.collections = 0
        self.dropped = 0

    def start(self, address: str) -> None:
        old = self.stores.get(address)
        if old is not None:
            old.close()
        store = BlockStore(self.dirs[address], fsync=False, clock=self.clock.seconds)
        self.stores[address] = store
        self.net.register(address, blockstore_methods(store))

    def pause(self, most: float) -> defer.Deferred:
        return task.deferLater(self.clock, self.rng.uniform(0, most), lambda: None)

    @defer.inlineCallbacks
    def writer(self, index: int, rounds: int) -> Any:
        for _ in range(rounds):
            name = f"f{self.rng.randrange(8)}"
            if self.rng.random() < 0.15 and name in self.files:
                version = self.files[name][0] + 1
                self.files[name] = (version, ["0"])
                yield self.pause(0.5)
                continue
            chosen = self.rng.sample(self.pool, self.rng.randrange(0, 4))
            if self.rng.random() < 0.3:
                fresh = self.rng.randbytes(50)
                self.pool.append(fresh)
                chosen.append(fresh)
            try:
                yield self.client.put({h(d): d for d in chosen})
            except Exception:  # a store restarting: this write is abandoned, as a client would retry
                continue
            yield self.pause(UPLOAD_TO_COMMIT)
            version = self.files.get(name, (0, []))[0] + 1
            self.files[name] = (version, [h(d) for d in chosen])
            self.check(f"after {name} v{version} committed by writer {index}")
            yield self.pause(0.5)

    def listing(self) -> defer.Deferred:
        # The listing is taken at some moment while the collection runs.
        return task.deferLater(
            self.clock,
            self.rng.uniform(0, 1.0),
            lambda: {n: [v, list(hs)] for n, (v, hs) in self.files.items()},
        )

    @defer.inlineCallbacks
    def collector(self, rounds: int) -> Any:
        for _ in range(rounds):
            yield self.pause(2.0)
            if self.rng.random() < 0.2:
                self.start(self.rng.choice(self.addresses))  # a store restarts: it forgets its touches
            report = yield self.client.collect(self.listing, grace=self.grace)
            self.collections += 1
            self.dropped += sum(row["removed"] for row in report["stores"].values())
            self.check(f"after collection {self.collections}")

    def check(self, when: str) -> None:
        held = set()
        for store in self.stores.values():
            held.update(store.list())  # listing touches nothing
        for name, (version, hashlist) in sorted(self.files.items()):
            if hashlist == ["0"]:
                continue
            lost = [b[:8] for b in hashlist if b not in held]
            if lost:
                self.violations.append(
                    f"seed {self.seed}, t={self.clock.seconds():.2f} {when}: {name} v{version} lost {lost}"
                )

    def run(self, writers: int = 4, rounds: int = 25, collections: int = 12) -> None:
        done = defer.gatherResults(
            [self.writer(i, rounds) for i in range(writers)] + [self.collector(collections)],
            consumeErrors=True,
        )
        for _ in range(200_000):  # bounded: 2,000 simulated seconds
            if done.called:
                break
            self.clock.advance(0.01)
        failures: list[Any] = []
        done.addErrback(failures.append)
        if failures:
            raise AssertionError(f"seed {self.seed}: {failures[0].getTraceback()}")
        if not done.called:
            raise AssertionError(f"seed {self.seed}: the writers and collections did not finish")
        self.check("at the end")


class CollectionsUnderWritersTests(SynchronousTestCase):
    def test_committed_files_keep_their_blocks(self) -> None:
        dropped = 0
        for seed in sim_seeds(6, env="SURFSHARD"):
            world = World(self, seed, grace=UPLOAD_TO_COMMIT + 2.0)
            world.run()
            self.assertEqual(world.violations[:3], [], f"seed {seed}")
            self.assertGreater(world.collections, 0)
            dropped += world.dropped
        self.assertGreater(dropped, 0, "no collection dropped anything: the test tested nothing")

    def test_a_grace_shorter_than_an_upload_is_caught(self) -> None:
        """The same world with a grace far below the writers' upload-to-commit
        time loses committed blocks, and the check sees it."""
        found = []
        for seed in range(4):
            world = World(self, seed, grace=0.1)
            world.run()
            found += world.violations
        self.assertNotEqual(found, [])
