"""What a collection costs a block store: ``BlockStore.sweep`` and
``BlockStore.compact`` on one store, in one process.

    python3 dev.py bench gc [--blocks 200000] [--size 4096] [--dead 0.5] [--dir DIR]

Fills a store with ``--blocks`` blocks of ``--size`` bytes (fsync on, in
batches as ``putblocks`` writes them), then drops a ``--dead`` share of them
the way ``surfshard blocks gc`` does (sweeps of 10,000 hashes) and rewrites
the packs. Prints the time and rate of each step next to the baseline of
copying the same live bytes with plain reads and writes (``shutil``'s copy
of a file of that size, synced), and the store's memory for its index and
touches (``tracemalloc``), so the figures compare within one run. Printed,
never asserted: they depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from surfshard.blocks.store import MAX_LIST, BlockStore

BATCH = 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--dead", type=float, default=0.5)
    parser.add_argument("--dir", help="where the store goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="gc-bench-", dir=args.dir)
    rng = random.Random(1)
    try:
        now = [0.0]
        tracemalloc.start()
        store = BlockStore(os.path.join(workdir, "store"), fsync=True, clock=lambda: now[0])
        started = time.perf_counter()
        for first in range(0, args.blocks, BATCH):
            batch = []
            for _ in range(min(BATCH, args.blocks - first)):
                data = rng.randbytes(args.size)
                batch.append([hashlib.sha256(data).hexdigest(), data])
            store.put_many(batch)
        del batch
        filled = time.perf_counter() - started
        memory, _peak = tracemalloc.get_traced_memory()  # the store's alone: nothing else is kept
        tracemalloc.stop()
        hashes = store.list(limit=args.blocks)
        total = store.usage()["pack_bytes"]
        print(
            f"{args.blocks:,} blocks of {args.size} bytes: {total / 1e6:,.1f} MB of packs in {filled:.1f} s"
        )
        print(
            f"  the store's memory (index, touches): {memory / 1e6:,.1f} MB, {memory / args.blocks:.0f} bytes a block"
        )

        now[0] = 10.0  # every touch is now older than the cutoff below
        dead = rng.sample(hashes, int(len(hashes) * args.dead))
        started = time.perf_counter()
        for i in range(0, len(dead), MAX_LIST):
            store.sweep(dead[i : i + MAX_LIST], before=5.0)
        swept = time.perf_counter() - started
        print(f"sweep of {len(dead):,} blocks: {swept:.2f} s ({len(dead) / swept:,.0f} blocks/s)")

        started = time.perf_counter()
        report = store.compact()
        compacted = time.perf_counter() - started
        live = total - report["freed"]
        print(
            f"rewrite of {report['packs']} pack(s): {compacted:.1f} s, {report['moved']:,} live blocks "
            f"({live / 1e6:,.1f} MB) copied, {report['freed'] / 1e6:,.1f} MB freed, "
            f"{live / 1e6 / compacted:,.1f} MB/s"
        )
        store.close()

        # The baseline: the same live bytes copied by the file system alone, synced.
        src = os.path.join(workdir, "baseline-src")
        with open(src, "wb") as f:
            left = live
            while left > 0:
                chunk = min(left, 8 << 20)
                f.write(os.urandom(chunk))
                left -= chunk
        started = time.perf_counter()
        dst = os.path.join(workdir, "baseline-dst")
        shutil.copyfile(src, dst)
        fd = os.open(dst, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        copied = time.perf_counter() - started
        print(
            f"baseline: a plain copy of {live / 1e6:,.1f} MB, synced: {copied:.1f} s, {live / 1e6 / copied:,.1f} MB/s"
        )
        print(f"rewrite / plain copy: {compacted / copied:.2f}x the time")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
