# -*- test-case-name: tests.test_blocks,tests.test_block_gc -*-
"""Blocks on the cluster's block stores, replicated by placement.

``BlockClient`` puts each block on the first ``replicas`` stores of its
clockwise walk on the ring (``surfshard.blocks.ring``) that answer, so a
store that is down is stepped over and the copy lands on the next one; it
reads a block from the first store of the same walk that has a good copy,
so a missing block, a store that is down or a corrupt copy (which the store
reports and never serves) sends it on to the next. Calls are batched per
store (``putblocks``/``getblocks``, up to ``MAX_BATCH_BYTES`` each).

``repair`` copies every block back onto its placement stores (after a store
was down or was replaced): it walks every store's blocks a page at a time.

``scrub`` has every store read back all its blocks, dropping the copies
found corrupt (as a read that finds one does), then repairs.

``collect`` drops the blocks no file names any more (old versions, deleted
files) from every store: ``surfshard blocks gc``. Why it cannot drop a
block a writer is about to name is in ``surfshard.blocks.store``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from surfshard import errors
from surfshard.blocks.ring import BlockRing
from surfshard.blocks.store import MAX_BATCH_BLOCKS, MAX_BATCH_BYTES, MAX_GC_GRACE, MAX_LIST
from surfshard.config import ClusterConfig
from surfshard.keyspace import TOMBSTONE
from surfshard.net.interfaces import IRpcPool

__all__ = ["BlockClient", "block_hash"]

log = Logger()

#: One call to one store waits at most this long.
CALL_TIMEOUT = 30.0
#: A scrub call reads back up to 64 MiB (``SCRUB_PAGE_BYTES``).
SCRUB_TIMEOUT = 300.0
#: Rewriting a store's packs copies their live blocks: give it longer.
COMPACT_TIMEOUT = 3600.0
#: Blocks per putblocks call, and such calls in flight per store.
PUT_BATCH_BLOCKS = 256
PUTS_IN_FLIGHT = 4
#: Blocks ``read_file`` holds at once (4 MiB of 4 KiB blocks).
READ_BATCH_BLOCKS = 1024
#: ``surfshard blocks gc``'s default grace period: a block written or asked
#: for this recently is kept even if no file names it yet (an upload of a
#: large folder names its first blocks only once its files commit).
DEFAULT_GC_GRACE = 24 * 3600.0


def block_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _batches(
    items: Sequence[tuple[str, bytes]], max_blocks: int = MAX_BATCH_BLOCKS
) -> Iterable[list[tuple[str, bytes]]]:
    batch: list[tuple[str, bytes]] = []
    size = 0
    for item in items:
        if batch and (len(batch) >= max_blocks or size + len(item[1]) > MAX_BATCH_BYTES // 4):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    if batch:
        yield batch


class BlockClient:
    """The block stores of ``cluster`` seen through ``pool``."""

    def __init__(self, cluster: ClusterConfig, pool: IRpcPool, *, ring: BlockRing | None = None) -> None:
        self.ring = ring or BlockRing(
            cluster.blockstores, max(cluster.block_replicas, 1 if cluster.blockstores else 0)
        )
        self.pool = pool
        #: Bytes sent to and received from stores, every copy counted (for
        #: sync's summary), and the bytes of the blocks sent: each block once
        #: however many stores took a copy.
        self.sent = 0
        self.received = 0
        self.stored = 0
        #: Copies that had to land past their placement (a store was down).
        self.misplaced = 0

    def where(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        """SurfStore's GetBlockStoreMap: store -> the blocks it should hold."""
        return self.ring.map(hashes)

    @defer.inlineCallbacks
    def has(self, store: str, hashes: Sequence[str]) -> Any:
        found: set[str] = set()
        for i in range(0, len(hashes), 50_000):
            got = yield self.pool.call(
                store, "hasblocks", {"hashes": list(hashes[i : i + 50_000])}, CALL_TIMEOUT
            )
            found.update(got)
        return found

    @defer.inlineCallbacks
    def put(self, blocks: dict[str, bytes]) -> Any:
        """Store every block on ``replicas`` stores (checked against its hash
        by each store); only blocks a store lacks are sent. Fails with
        Unavailable if some block found fewer than ``replicas`` stores up.
        Returns the bytes sent, every copy counted; ``stored`` also grows by
        the bytes of the blocks some store took, each block once."""
        for h, data in blocks.items():
            if block_hash(data) != h:
                raise errors.BadRequest(f"block given as {h} has hash {block_hash(data)}")
        need = {h: self.ring.replicas for h in blocks}
        walks = {h: self.ring.candidates(h) for h in blocks}
        sent = 0
        taken: set[str] = set()
        depth = 0
        # Round k asks each block's k-th candidate; a block leaves once it
        # has its copies. Bounded by the number of stores.
        while any(need.values()) and depth < len(self.ring.stores):
            by_store: dict[str, list[str]] = {}
            for h, missing in need.items():
                if missing and depth < len(walks[h]):
                    by_store.setdefault(walks[h][depth], []).append(h)
            results = yield defer.DeferredList(
                [self._put_on(store, hs, blocks) for store, hs in by_store.items()], consumeErrors=True
            )
            for (ok, value), (store, hs) in zip(results, by_store.items(), strict=True):
                if not ok:
                    log.warn(
                        "block store {store} did not take blocks: {why}",
                        store=store,
                        why=value.getErrorMessage(),
                    )
                    continue
                sent += sum(len(blocks[h]) for h in value)
                taken.update(value)
                for h in hs:
                    need[h] -= 1
                    if depth >= self.ring.replicas:
                        self.misplaced += 1
            depth += 1
        short = [h for h, missing in need.items() if missing]
        if short:
            raise errors.Unavailable(
                f"{len(short)} blocks found fewer than {self.ring.replicas} block stores up",
                blocks=short[:10],
            )
        self.sent += sent
        self.stored += sum(len(blocks[h]) for h in taken)
        return sent

    @defer.inlineCallbacks
    def _put_on(self, store: str, hashes: list[str], blocks: dict[str, bytes]) -> Any:
        present = yield self.has(store, hashes)
        todo = [(h, blocks[h]) for h in hashes if h not in present]
        # Several batches in flight per store: its thread pool writes them
        # at once (creating block files is kernel time, not the GIL's).
        semaphore = defer.DeferredSemaphore(PUTS_IN_FLIGHT)

        def put(batch: list[tuple[str, bytes]]) -> defer.Deferred:
            args = {"blocks": [[h, d] for h, d in batch]}
            return semaphore.run(self.pool.call, store, "putblocks", args, CALL_TIMEOUT)

        batches = list(_batches(todo, PUT_BATCH_BLOCKS))
        yield defer.gatherResults([put(b) for b in batches], consumeErrors=True)
        return [h for h, _ in todo]

    @defer.inlineCallbacks
    def get(self, hashes: Iterable[str]) -> Any:
        """``{hash: data}`` for every hash, each read from the first store of
        its walk with a good copy; Unavailable naming the blocks no store
        could give."""
        got, lost = yield self.get_available(hashes)
        if lost:
            raise errors.Unavailable(
                f"{len(lost)} blocks are on no block store that answers", blocks=lost[:10]
            )
        return got

    @defer.inlineCallbacks
    def read_file(
        self, hashes: Sequence[str], write: Callable[[bytes], object], batch: int = READ_BATCH_BLOCKS
    ) -> Any:
        """Hand the blocks of a file's ``hashes`` to ``write`` in order,
        fetching ``batch`` blocks at a time (memory bounded by a batch, not
        by the file); Unavailable, naming the blocks, if some block is on no
        store that answers (what was written before it stays written: the
        caller writes to a temporary file). Fires with the bytes written."""
        written = 0
        for start in range(0, len(hashes), batch):
            part = hashes[start : start + batch]
            got = yield self.get(part)
            for h in part:
                write(got[h])
                written += len(got[h])
        return written

    @defer.inlineCallbacks
    def get_available(self, hashes: Iterable[str]) -> Any:
        """``({hash: data}, [hash...])``: the blocks some store gave (each
        from the first store of its walk with a good copy), and the ones no
        store could give, in the order asked."""
        wanted = list(dict.fromkeys(hashes))
        walks = {h: self.ring.candidates(h) for h in wanted}
        got: dict[str, bytes] = {}
        depth = 0
        while len(got) < len(wanted) and depth < len(self.ring.stores):
            by_store: dict[str, list[str]] = {}
            for h in wanted:
                if h not in got and depth < len(walks[h]):
                    by_store.setdefault(walks[h][depth], []).append(h)
            results = yield defer.DeferredList(
                [self._get_from(store, hs) for store, hs in by_store.items()], consumeErrors=True
            )
            for (ok, value), store in zip(results, by_store, strict=True):
                if not ok:
                    log.warn(
                        "block store {store} could not be read: {why}",
                        store=store,
                        why=value.getErrorMessage(),
                    )
                    continue
                got.update(value)
            depth += 1
        lost = [h for h in wanted if h not in got]
        self.received += sum(len(d) for d in got.values())
        return got, lost

    @defer.inlineCallbacks
    def _get_from(self, store: str, hashes: list[str]) -> Any:
        out: dict[str, bytes] = {}
        # Block sizes are unknown before reading: ask in pages of a few
        # hundred (4 KiB blocks make a reply of about 1 MiB).
        for i in range(0, len(hashes), 256):
            answer = yield self.pool.call(store, "getblocks", {"hashes": hashes[i : i + 256]}, CALL_TIMEOUT)
            for h in answer.get("corrupt", []):
                log.error(
                    "block store {store} holds a corrupt copy of {hash}; reading another", store=store, hash=h
                )
            for h, data in answer["blocks"].items():
                if block_hash(data) == h:  # checked again here: never trust a copy blindly
                    out[h] = data
                else:
                    log.error("block store {store} sent a bad copy of {hash}", store=store, hash=h)
        return out

    @defer.inlineCallbacks
    def repair(self) -> Any:
        """Copy every block found on any store onto each of its placement
        stores that lacks it. Returns ``{"blocks": seen, "copied": n,
        "unreachable": [store...], "unreadable": n}``: the stores that could
        not be listed, checked or written (a repair once they are up finishes
        the job), and the blocks a store lacks that no store could give."""
        seen: set[str] = set()
        tally = {"copied": 0, "unreadable": 0}
        unreachable: set[str] = set()
        for store in self.ring.stores:
            after = ""
            while True:
                try:
                    page = yield self.pool.call(
                        store, "listblocks", {"after": after, "limit": MAX_LIST}, CALL_TIMEOUT
                    )
                except errors.SurfShardError as e:
                    log.warn("repair: cannot list {store}: {e}", store=store, e=e)
                    unreachable.add(store)
                    break
                if not page:
                    break
                after = page[-1]
                new = [h for h in page if h not in seen]
                seen.update(new)
                yield self._repair_blocks(new, tally, unreachable)
        return {"blocks": len(seen), **tally, "unreachable": sorted(unreachable)}

    @defer.inlineCallbacks
    def _repair_blocks(self, hashes: list[str], tally: dict[str, int], unreachable: set[str]) -> Any:
        by_store: dict[str, list[str]] = {}
        for h in hashes:
            for store in self.ring.placement(h):
                by_store.setdefault(store, []).append(h)
        for store, hs in by_store.items():
            if store in unreachable:
                continue  # still down: the next repair gets it
            try:
                present = yield self.has(store, hs)
            except errors.SurfShardError as e:
                log.warn("repair: cannot check {store}: {e}", store=store, e=e)
                unreachable.add(store)
                continue
            missing = [h for h in hs if h not in present]
            if not missing:
                continue
            blocks, lost = yield self.get_available(missing)
            tally["unreadable"] += len(lost)
            try:
                for batch in _batches(list(blocks.items())):
                    yield self.pool.call(
                        store, "putblocks", {"blocks": [[h, d] for h, d in batch]}, CALL_TIMEOUT
                    )
                    tally["copied"] += len(batch)
            except errors.SurfShardError as e:
                log.warn("repair: cannot write to {store}: {e}", store=store, e=e)
                unreachable.add(store)

    @defer.inlineCallbacks
    def present(self, hashes: list[str]) -> Any:
        """``(the set of ``hashes`` some store has, the stores that did not
        answer)``: every store is asked, since a copy may lie past its
        placement (a store was down when it was written)."""
        found: set[str] = set()
        unreachable: list[str] = []
        for store in self.ring.stores:
            try:
                found |= yield self.has(store, hashes)
            except errors.SurfShardError as e:
                log.warn("cannot ask {store} for blocks: {e}", store=store, e=e)
                unreachable.append(store)
        return found, unreachable

    @defer.inlineCallbacks
    def scrub(self) -> Any:
        """Have every store read back and check each of its blocks, dropping
        the copies found corrupt, then ``repair`` to put good copies back.
        Returns ``{"stores": {store: {"checked": n, "corrupt": [...]}},
        "unreachable": [...], "repair": repair's report, "lost": [...]}``,
        ``lost`` the blocks no store has a good copy of any more."""
        stores: dict[str, dict[str, Any]] = {}
        unreachable: set[str] = set()
        for store in self.ring.stores:
            row: dict[str, Any] = {"checked": 0, "corrupt": []}
            after = ""
            try:
                while True:  # bounded: each call moves ``after`` on, or ends
                    page = yield self.pool.call(store, "scrubblocks", {"after": after}, SCRUB_TIMEOUT)
                    row["checked"] += page["checked"]
                    row["corrupt"] += page["corrupt"]
                    if not page["last"]:
                        break
                    after = page["last"]
            except errors.SurfShardError as e:
                log.warn("scrub: cannot check {store}: {e}", store=store, e=e)
                unreachable.add(store)
            stores[store] = row
        repaired = yield self.repair()
        unreachable.update(repaired["unreachable"])
        # A block whose every copy was bad is gone: say which (a file naming
        # it cannot be read back whole until someone writes that block again).
        bad = sorted({h for row in stores.values() for h in row["corrupt"]})
        still, silent = (yield self.present(bad)) if bad else (set(), [])
        unreachable.update(silent)
        lost = [h for h in bad if h not in still]
        return {"stores": stores, "unreachable": sorted(unreachable), "repair": repaired, "lost": lost}

    @defer.inlineCallbacks
    def collect(
        self,
        list_files: Callable[[], Any],
        grace: float = DEFAULT_GC_GRACE,
        dry_run: bool = False,
        keep: frozenset[str] = frozenset(),
    ) -> Any:
        """Drop from every store the blocks no file names (``list_files()``:
        a Deferred of ``{name: [version, hashlist]}`` for every shard, which
        fails rather than leave a shard out), keeping any block written or
        asked for within ``grace`` seconds before the listing began, on any
        store, and the blocks of ``keep`` (those backups name). Then rewrite
        the packs that left mostly dead.

        In order: each store's clock (the cutoff is the store's own, taken
        before the listing); the listing; each store's unnamed blocks, asked
        without dropping, so a block touched on one store is kept on all;
        then the drop and the rewrite. A store that does not answer is left
        as it is (and named). Returns the report ``surfshard blocks gc``
        prints."""
        if not 0 <= grace <= MAX_GC_GRACE:
            raise errors.BadRequest(f"the grace period must be between 0 and {MAX_GC_GRACE:.0f} seconds")
        cutoffs: dict[str, float] = {}
        report: dict[str, Any] = {"dry_run": dry_run, "grace": grace, "stores": {}, "unreachable": []}
        unreachable: set[str] = set()
        for store in self.ring.stores:
            try:
                clock = yield self.pool.call(store, "gcclock", {}, CALL_TIMEOUT)
            except errors.SurfShardError as e:
                log.warn("gc: cannot reach {store}: {e}", store=store, e=e)
                unreachable.add(store)
                continue
            cutoffs[store] = clock["now"] - grace
        files = yield list_files()
        named = {h for _version, hashes in files.values() for h in hashes if h != TOMBSTONE} | keep
        report["files"] = sum(1 for _version, hashes in files.values() if hashes != [TOMBSTONE])
        report["named"] = len(named)
        report["kept_for_backups"] = len(keep)
        unnamed: dict[str, list[str]] = {}
        touched: set[str] = set()
        for store, before in cutoffs.items():
            row = report["stores"][store] = {
                "held": 0,
                "unnamed": 0,
                "kept": 0,
                "removed": 0,
                "restarted": False,
            }
            found: list[str] = []
            after = ""
            try:
                while True:  # bounded: each page moves ``after`` on, or ends
                    page = yield self.pool.call(
                        store, "listblocks", {"after": after, "limit": MAX_LIST}, CALL_TIMEOUT
                    )
                    if not page:
                        break
                    after = page[-1]
                    row["held"] += len(page)
                    loose = [h for h in page if h not in named]
                    row["unnamed"] += len(loose)
                    if not loose:
                        continue
                    answer = yield self.pool.call(
                        store, "gcsweep", {"hashes": loose, "before": before, "dry_run": True}, CALL_TIMEOUT
                    )
                    found += answer["removed"]
                    touched.update(answer["kept"])
                    row["restarted"] = row["restarted"] or answer["restarted"]
            except errors.SurfShardError as e:
                log.warn("gc: cannot list {store}: {e}", store=store, e=e)
                unreachable.add(store)
                del report["stores"][store]
                continue
            unnamed[store] = found
        for store, found in unnamed.items():
            row = report["stores"][store]
            todo = [h for h in found if h not in touched]
            row["kept"] = row["unnamed"] - len(todo)
            if dry_run:
                row["removed"] = len(todo)
                continue
            try:
                for i in range(0, len(todo), MAX_LIST):
                    answer = yield self.pool.call(
                        store,
                        "gcsweep",
                        {"hashes": todo[i : i + MAX_LIST], "before": cutoffs[store], "dry_run": False},
                        CALL_TIMEOUT,
                    )
                    row["removed"] += len(answer["removed"])
                    row["kept"] += len(answer["kept"])
                compacted = yield self.pool.call(store, "gccompact", {}, COMPACT_TIMEOUT)
            except errors.SurfShardError as e:
                log.warn("gc: cannot finish on {store}: {e}", store=store, e=e)
                unreachable.add(store)
                continue
            row["freed"] = compacted["freed"]
            row["packs"] = compacted["packs"]
        report["unreachable"] = sorted(unreachable)
        return report
