"""Append throughput of raft.storage.DiskStorage, fsync on and off, with
group commit batches of 1, 16 and 64 entries per sync().

    python3 benchmarks/storage.py [--seconds 1.2] [--payload 128] [--dir DIR]

A second table puts the WAL's preallocation (``DiskStorage.WAL_PREALLOCATE``)
beside plain appends, fsync on and one entry per sync, with one storage
alone and with three writing at once in three processes (a replica group
on one disk, as in ``benchmarks/metadata.py``).

For each run the baseline is the cheapest way to make the same bytes
durable: raw os.write + os.fsync of exactly the bytes each sync() wrote, batch
by batch, to a plain file. The ratio (storage / baseline) is what framing,
CBOR encoding and bookkeeping cost on top of the disk. Figures are printed,
never asserted; they depend on the machine and its disk.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raft.storage import DiskStorage
from raft.types import Entry, HardState

BATCH_SIZES = (1, 16, 64)


def run_storage(
    directory: str, fsync: bool, batch: int, payload: bytes, seconds: float, preallocate: bool = True
) -> dict:
    """Append batches (entries + hard state, one sync each, as a Raft driver
    does per Ready) until ``seconds`` pass; returns counts and the bytes each
    sync wrote so the baseline can replay them."""
    storage = DiskStorage(directory, fsync=fsync, preallocate=None if preallocate else 0)
    try:
        storage.load()
        sync_sizes: list[int] = []
        index = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            before = storage.wal_bytes
            storage.append([Entry(1, index + i + 1, payload) for i in range(batch)])
            index += batch
            storage.set_hard_state(HardState(1, 1, index))
            storage.sync()
            sync_sizes.append(storage.wal_bytes - before)
        elapsed = time.perf_counter() - start
        return {"entries": index, "fsyncs": storage.fsyncs, "elapsed": elapsed, "sync_sizes": sync_sizes}
    finally:
        storage.close()


def run_baseline(path: str, fsync: bool, sync_sizes: list[int]) -> float:
    """Seconds to os.write (+ os.fsync) the same byte counts, batch by batch."""
    chunks = {n: os.urandom(n) for n in set(sync_sizes)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for n in sync_sizes:
            os.write(fd, chunks[n])
            if fsync:
                os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)


def _one_of_several(args: tuple[str, bool, bytes, float], results: multiprocessing.Queue) -> None:
    directory, preallocate, payload, seconds = args
    result = run_storage(directory, True, 1, payload, seconds, preallocate)
    results.put(1e6 * result["elapsed"] / max(1, result["fsyncs"]))


def preallocation_table(root: str, payload: bytes, seconds: float) -> None:
    """µs per durable one-entry sync, preallocated WAL against plain appends,
    alone and three processes at once; the modes alternate, twice each."""
    print()
    print("WAL preallocation, fsync on, 1 entry per sync: us per sync (mean of each process)")
    context = multiprocessing.get_context("fork")
    for round_ in (1, 2):
        for preallocate in (False, True):
            row = []
            for procs in (1, 3):
                results: multiprocessing.Queue = context.Queue()
                workers = [
                    context.Process(
                        target=_one_of_several,
                        args=(
                            (
                                os.path.join(root, f"p{round_}-{preallocate}-{procs}-{i}"),
                                preallocate,
                                payload,
                                seconds,
                            ),
                            results,
                        ),
                    )
                    for i in range(procs)
                ]
                for w in workers:
                    w.start()
                times = sorted(results.get(timeout=60 + 2 * seconds) for _ in workers)
                for w in workers:
                    w.join()
                row.append(
                    f"{procs} process{'es' if procs > 1 else ''}: " + ", ".join(f"{t:.0f}" for t in times)
                )
            label = "preallocated" if preallocate else "appends"
            print(f"  round {round_}, {label:>12}: " + "; ".join(row))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.2, help="time per storage run (default 1.2)")
    parser.add_argument("--payload", type=int, default=128, help="bytes of data per entry (default 128)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 10 or args.payload < 0:
        parser.error("--seconds must be in (0, 10] and --payload >= 0")
    payload = os.urandom(args.payload)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="raft-storage-bench-") as root:
        print(f"DiskStorage appends, {args.payload}-byte entries, {args.seconds:g} s per run, in {root}")
        header = (
            f"{'fsync':>5} {'batch':>5} {'appends/s':>11} {'entries/fsync':>13} "
            f"{'us/sync':>8} {'raw appends/s':>13} {'storage/raw':>11}"
        )
        print(header)
        print("-" * len(header))
        for fsync in (True, False):
            for batch in BATCH_SIZES:
                name = f"{'on' if fsync else 'off'}-{batch}"
                result = run_storage(os.path.join(root, name), fsync, batch, payload, args.seconds)
                raw = run_baseline(os.path.join(root, name + ".raw"), fsync, result["sync_sizes"])
                rate = result["entries"] / result["elapsed"]
                raw_rate = result["entries"] / raw if raw > 0 else float("inf")
                per_fsync = result["entries"] / max(1, result["fsyncs"])
                us_per_sync = 1e6 * result["elapsed"] / max(1, result["fsyncs"])
                print(
                    f"{'on' if fsync else 'off':>5} {batch:>5} {rate:>11,.0f} {per_fsync:>13.1f} "
                    f"{us_per_sync:>8.0f} {raw_rate:>13,.0f} {rate / raw_rate:>11.2f}"
                )
        preallocation_table(root, payload, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
