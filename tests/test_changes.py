"""The change feed and cursors (``MetadataReplica.changes``, ``client.feed``).

- State machine: revisions and mod revisions, the feed in revision order,
  superseded writes without their hash lists, compaction, a revision from
  the future refused, the feed through a snapshot and through a shard move.
- A simulated cluster (tests/simworld.py) with shards moving, leaders
  restarting and cut off: a client following the feed from revision 0 sees
  every acknowledged write exactly once, in version order per file, and ends
  with the servers' map; a cursor taken before a move is still good after.
- Bad input: garbage cursors, another cluster's cursor, a cursor ahead of
  the shards, limits out of bounds.

``SURFSHARD_SEED=N`` replays a seed.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from client.feed import (
    Cursor,
    CursorError,
    CursorExpired,
    changes_since,
    list_all,
    wait_for_change,
    writes_since,
)
from surfshard import errors
from surfshard.errors import BadRequest
from surfshard.keyspace import shard_of
from surfshard.metadata import state as metadata
from surfshard.metadata.state import MetadataStateMachine, encode_update
from surfshard.testing.simrpc import resolve
from tests.test_migration_sim import UNKNOWN_OUTCOME, WorldCase, block, world_seeds

NSHARDS = 4
H = [f"{i:064x}" for i in range(1, 10)]


class Writer:
    def __init__(self, machine: MetadataStateMachine, client: str = "w") -> None:
        self.machine = machine
        self.client = client
        self.seq = 0

    def update(self, name: str, version: int, hashes: list[str]) -> dict[str, Any]:
        self.seq += 1
        return self.machine.apply(encode_update(name, version, hashes, self.client, self.seq))


def names_in(shard: int, count: int) -> list[str]:
    out = []
    for i in range(10_000):
        if shard_of(f"f{i}", NSHARDS) == shard:
            out.append(f"f{i}")
            if len(out) == count:
                return out
    raise AssertionError("not enough names")


class StateFeedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.m = MetadataStateMachine(NSHARDS, range(NSHARDS))
        self.w = Writer(self.m)
        self.a, self.b = names_in(0, 2)

    def test_writes_in_revision_order_with_mod_revisions(self) -> None:
        self.w.update(self.a, 1, [H[0]])
        self.w.update(self.b, 1, [H[1]])
        self.w.update(self.a, 2, [H[2]])
        self.w.update(self.a, 2, [H[3]])  # a mismatch: no revision
        page = self.m.changes(0, 0, 100, 1000)
        assert page is not None
        self.assertEqual(page["revision"], 3)
        self.assertEqual(
            page["changes"], [[1, self.a, 1, None], [2, self.b, 1, [H[1]]], [3, self.a, 2, [H[2]]]]
        )
        self.assertEqual((page["next"], page["more"]), (3, False))
        listing = self.m.list_shard(0, "", 10, 1000)
        assert listing is not None
        self.assertEqual({f[0]: f[3] for f in listing["files"]}, {self.a: 3, self.b: 2})
        after = self.m.changes(0, 3, 100, 1000)
        assert after is not None
        self.assertEqual((after["changes"], after["more"]), ([], False))

    def test_pages(self) -> None:
        for v in range(1, 8):
            self.w.update(self.a, v, [H[0]])
        first = self.m.changes(0, 2, 3, 1000)
        assert first is not None
        self.assertEqual([c[0] for c in first["changes"]], [3, 4, 5])
        self.assertTrue(first["more"])
        rest = self.m.changes(0, first["next"], 3, 1000)
        assert rest is not None
        self.assertEqual([c[0] for c in rest["changes"]], [6, 7])
        self.assertFalse(rest["more"])

    def test_ahead_of_the_shard_is_refused(self) -> None:
        self.w.update(self.a, 1, [H[0]])
        with self.assertRaises(BadRequest):
            self.m.changes(0, 5, 10, 1000)
        unserved = MetadataStateMachine(NSHARDS, [1])
        self.assertIsNone(unserved.changes(0, 0, 10, 1000))

    def test_compaction(self) -> None:
        self.patch(metadata, "HISTORY_ENTRIES", 3)
        for v in range(1, 7):
            self.w.update(self.a, v, [H[0]])
        old = self.m.changes(0, 1, 10, 1000)
        self.assertEqual(old, {"compacted": True, "revision": 6, "oldest": 3})
        recent = self.m.changes(0, 3, 10, 1000)
        assert recent is not None
        self.assertEqual([c[0] for c in recent["changes"]], [4, 5, 6])

    def test_feed_survives_a_snapshot(self) -> None:
        self.w.update(self.a, 1, [H[0]])
        self.w.update(self.b, 1, [H[1]])
        self.w.update(self.a, 2, [H[2]])
        copy = MetadataStateMachine(NSHARDS)
        copy.restore(self.m.snapshot())
        self.assertEqual(copy.changes(0, 0, 100, 1000), self.m.changes(0, 0, 100, 1000))
        self.assertEqual(copy.list_shard(0, "", 10, 1000), self.m.list_shard(0, "", 10, 1000))
        # and through the encoding that runs off the event loop
        copy2 = MetadataStateMachine(NSHARDS)
        copy2.restore(self.m.snapshot_copy()())
        self.assertEqual(copy2.changes(0, 0, 100, 1000), self.m.changes(0, 0, 100, 1000))
        # the copy goes on from the same revision
        Writer(copy2, "w2").update(self.b, 2, [H[4]])
        page = copy2.changes(0, 3, 10, 1000)
        assert page is not None
        self.assertEqual(page["changes"], [[4, self.b, 2, [H[4]]]])


class WorldFeedTests(WorldCase):
    def test_a_cursor_taken_before_a_move_is_good_after_it(self) -> None:
        w = self.world(gids=(1, 2))
        w.join(1)
        w.wait_settled()
        c = w.client("c")
        names = [f"file-{i}" for i in range(30)]
        self.write_files(w, c, names)
        files, cursor = w.value(list_all(c))
        self.assertEqual(set(files), set(names))
        w.join(2)
        w.wait_settled()
        self.write_files(w, c, names[:10], version=2)
        changes, after = w.value(changes_since(c, cursor))
        self.assertEqual(set(changes), set(names[:10]))
        self.assertTrue(all(v == [2, [block(i, 2)]] for i, v in enumerate(changes[n] for n in names[:10])))
        self.assertTrue(all(a >= b for a, b in zip(after.revisions, cursor.revisions, strict=True)))
        nothing, same = w.value(changes_since(c, after))
        self.assertEqual((nothing, same.revisions), ({}, after.revisions))
        # a watch wakes when a write lands, not at its timeout
        d = wait_for_change(c, after, 30.0)
        w.run(0.5)
        self.assertFalse(d.called)
        c.updatefile(names[3], 3, [block(3, 3)])
        started = w.clock.seconds()
        self.assertTrue(w.run_until(lambda: d.called, 5.0))
        self.assertLess(w.clock.seconds() - started, 2.0)
        self.assertEqual(resolve(d), (True, True))

    def test_bad_cursors_and_limits(self) -> None:
        w = self.world(gids=(1,))
        w.join(1)
        w.wait_settled()
        c = w.client("c")
        self.write_files(w, c, ["a", "b"])
        _files, cursor = w.value(list_all(c))
        text = cursor.encode()
        self.assertEqual(Cursor.decode(text, w.config), cursor)
        for bad in ("", "garbage", "ssc1.", "ssc1.!!!!", text[:-2] + ("AA" if text[-2:] != "AA" else "BB")):
            with self.assertRaises(CursorError, msg=bad):
                Cursor.decode(bad, w.config)
        other = Cursor("another", cursor.nshards, 1, cursor.revisions).encode()
        with self.assertRaisesRegex(CursorError, "another"):
            Cursor.decode(other, w.config)
        ahead = Cursor(cursor.cluster, cursor.nshards, 1, tuple(r + 1000 for r in cursor.revisions))
        d = changes_since(c, ahead)
        self.assertTrue(w.run_until(lambda: d.called, 30))
        ok, value = resolve(d)
        self.assertFalse(ok)
        self.assertIsInstance(value, CursorExpired)
        group = c.group_client(tuple(w.groups[1].addresses[i] for i in w.groups[1].ids))
        for args in (
            {"shard": 0, "since": -1},
            {"shard": 0, "limit": 0},
            {"shard": 0, "limit": 10_001},
            {"shard": 0, "wait": 61.0},
            {"shard": w.nshards * 1000},
        ):
            d = group.read("changes", args, 5.0)
            self.assertTrue(w.run_until(lambda d=d: d.called, 10))
            ok, value = resolve(d)
            self.assertFalse(ok, args)
            self.assertIsInstance(value, errors.BadRequest, args)


class FeedUnderChaosTests(WorldCase):
    """A client follows the feed from revision 0 while others write, shards
    move, leaders restart and are cut off."""

    CLIENTS = 5
    FILES = [f"feed-{i}" for i in range(20)]

    def run_seed(self, seed: int) -> Counter[str]:
        w = self.world(seed, gids=(1, 2, 3), snapshot_entries=40, chunk_bytes=4096)
        w.join(1, 2)
        w.wait_settled()
        stats: Counter[str] = Counter()
        acked: set[tuple[str, int]] = set()
        now = w.clock.seconds
        stop_at = now() + 10.0

        @defer.inlineCallbacks
        def writer(name: str) -> Any:
            rng = random.Random(f"feed:{seed}:{name}")
            c = w.client(name, timeout=6.0)
            last: dict[str, int] = {}
            while now() < stop_at:  # bounded by the clock
                fname = rng.choice(self.FILES)
                version = last.get(fname, 0) + 1
                try:
                    yield c.updatefile(fname, version, [block(hash((name, fname)) % 10**6, version)])
                except errors.VersionMismatch as e:
                    last[fname] = e.current
                except UNKNOWN_OUTCOME:
                    stats["unknown"] += 1
                else:
                    acked.add((fname, version))
                    last[fname] = version
                yield task.deferLater(w.clock, rng.uniform(0.0, 0.05), lambda: None)

        seen: dict[str, list[int]] = defaultdict(list)
        follower = w.client("follower", timeout=10.0)
        cursor = [Cursor(w.config.name, w.nshards, 0, (0,) * w.nshards)]

        @defer.inlineCallbacks
        def follow() -> Any:
            while now() < stop_at + 2:  # bounded by the clock
                try:
                    writes, after = yield writes_since(follower, cursor[0])
                except (errors.Timeout, errors.Unavailable):
                    stats["follow_retry"] += 1
                    continue
                for _shard, _revision, name, version, _hashes in writes:
                    seen[name].append(version)
                cursor[0] = after
                stats["polls"] += 1
                yield task.deferLater(w.clock, 0.2, lambda: None)

        loops = [writer(f"w{k}") for k in range(self.CLIENTS)]
        following = follow()
        rng = random.Random(f"feed-nemesis:{seed}")
        while now() < stop_at:  # bounded by the clock
            r = rng.random()
            if r < 0.3:
                w.admin.move(rng.randrange(w.nshards), rng.choice((1, 2, 3))).addErrback(lambda f: None)
                stats["move"] += 1
            group = rng.choice(list(w.groups.values()))
            leader = group.cluster.leader()
            if leader is not None and r < 0.5:
                group.restart(leader)
                stats["restart"] += 1
            elif leader is not None and r < 0.65:
                group.cluster.net.isolate(leader)
                stats["isolate"] += 1
            w.run(rng.uniform(0.3, 0.8))
            for g in w.groups.values():
                g.cluster.net.heal()
        self.assertTrue(w.settle([*loops, following], 40.0), f"SURFSHARD_SEED={seed}: loops did not end")
        w.wait_settled(60)
        writes, _after = w.value(writes_since(follower, cursor[0]))
        for _shard, _revision, name, version, _hashes in writes:
            seen[name].append(version)
        # Every write the feed shows is one version more than the last, per
        # file: no write twice, none missed, none out of order.
        for name, versions in seen.items():
            self.assertEqual(versions, list(range(1, len(versions) + 1)), f"SURFSHARD_SEED={seed}: {name}")
        shown = {(n, v) for n, vs in seen.items() for v in vs}
        self.assertLessEqual(
            acked, shown, f"SURFSHARD_SEED={seed}: acknowledged writes missing from the feed"
        )
        final = w.value(w.client("final").getfileinfomap())
        self.assertEqual({n: v[0] for n, v in final.items()}, {n: vs[-1] for n, vs in seen.items()})
        stats["acked"] = len(acked)
        return stats

    def test_a_follower_sees_every_acknowledged_write_once_and_in_order(self) -> None:
        totals: Counter[str] = Counter()
        for seed in world_seeds(2):
            totals.update(self.run_seed(seed))
        self.assertGreater(totals["acked"], 100, totals)
        self.assertGreater(totals["move"], 2, totals)


class ListingUnderMovesTests(WorldCase):
    def test_a_paged_listing_taken_while_shards_move_is_a_snapshot_per_shard(self) -> None:
        import client.cluster as cluster_module

        # Pages of three files, so that writes land between the pages of one
        # shard; and enough attempts that the strict path always succeeds.
        self.patch(cluster_module, "LIST_PAGE", 3)
        self.patch(cluster_module, "LIST_ATTEMPTS", 1000)
        w = self.world(gids=(1, 2))
        w.join(1, 2)
        w.wait_settled()
        names = [f"page-{i}" for i in range(40)]
        writer, lister = w.client("writer"), w.client("lister")
        self.write_files(w, writer, names)
        stop = [False]

        @defer.inlineCallbacks
        def keep_writing() -> Any:
            rng = random.Random(3)
            versions = dict.fromkeys(names, 1)
            while not stop[0]:  # bounded: stopped below
                name = rng.choice(names)
                try:
                    yield writer.updatefile(name, versions[name] + 1, [block(1, versions[name] + 1)])
                    versions[name] += 1
                except errors.SurfShardError:
                    pass
                yield task.deferLater(w.clock, 0.002, lambda: None)

        loop = keep_writing()
        listings = []
        for k in range(6):
            if k % 2 == 0:
                w.admin.move(k % w.nshards, 1 + k % 2).addErrback(lambda f: None)
            listings.append(w.value(list_all(lister), within=60))
        stop[0] = True
        self.assertTrue(w.settle([loop], 20))
        w.wait_settled(60)
        # The feed from revision 0 replays each shard; its state at the
        # listing's revision must be exactly what the listing holds.
        writes, _ = w.value(writes_since(lister, Cursor(w.config.name, w.nshards, 0, (0,) * w.nshards)))
        for files, cursor in listings:
            for shard in range(w.nshards):
                at = cursor.revisions[shard]
                state = {}
                for s, revision, name, version, _h in writes:
                    if s == shard and revision <= at:
                        state[name] = version
                listed = {n: v[0] for n, v in files.items() if shard_of(n, w.nshards) == shard}
                self.assertEqual(listed, state, f"shard {shard} at revision {at}")
