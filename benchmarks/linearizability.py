"""Throughput of the linearizability checker on generated histories.

    python3 dev.py bench linearizability [--seed N] [--quick]

Histories come from a real sequential execution: each client runs one call
at a time, every call takes effect at a random point inside its
[call, return] window, and results are computed by applying the calls in
the order of those points, so every history is linearizable and the checker
must search it to the end. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from surfshard.testing.linearizability import GET, UNKNOWN, UPDATE, Mismatch, Operation, check


def generate(
    rng: random.Random, names: int, ops_per_name: int, clients: int, unknown_rate: float
) -> list[Operation]:
    """A linearizable history: ``clients`` clients, each with one call in
    flight at a time, spread over ``names`` files."""
    total = names * ops_per_name
    filenames = [f"file-{i}" for i in range(names)]
    free_at = [0.0] * clients
    pending: list[tuple[float, int, Operation]] = []  # (linearization point, seq, op)
    for seq in range(total):
        client = min(range(clients), key=lambda c: (free_at[c], c))
        call = free_at[client] + rng.uniform(0.0, 0.5)
        point = call + rng.uniform(0.0, 2.0)
        ret = point + rng.uniform(0.0, 2.0)
        free_at[client] = ret
        name = rng.choice(filenames)
        kind = UPDATE if rng.random() < 0.5 else GET
        op = Operation(client, kind, name, (), None, call, ret)
        pending.append((point, seq, op))
    pending.sort(key=lambda p: (p[0], p[1]))
    state: dict[str, tuple[int, tuple[str, ...]]] = {}
    history = []
    for _, seq, op in pending:
        stored = state.get(op.name)
        stored_version = stored[0] if stored else 0
        if op.kind == GET:
            op.result = None if stored is None else (stored[0], list(stored[1]))
        else:
            version = (
                stored_version + 1 if rng.random() < 0.7 else max(1, stored_version + rng.randint(-2, 2))
            )
            hashlist = [hashlib.sha256(str(seq).encode()).hexdigest()]
            op.args = (version, hashlist)
            applied = version == stored_version + 1
            if applied:
                state[op.name] = (version, tuple(hashlist))
            op.result = True if applied else Mismatch(stored_version)
            if rng.random() < unknown_rate:
                op.result = UNKNOWN
                op.return_time = math.inf
        history.append(op)
    rng.shuffle(history)
    return history


def corrupt(rng: random.Random, history: list[Operation], stale: bool) -> list[Operation]:
    """A copy with one late read corrupted: it returns a version never
    written or, with ``stale``, a value overwritten before the read began.
    Either is provably not linearizable."""
    reads = sorted(
        (op for op in history if op.kind == GET and op.result is not None and op.result[0] > 2),
        key=lambda op: op.call_time,
    )
    victim = reads[len(reads) * 3 // 4]
    version, hashlist = victim.result
    if stale:
        writes = {
            op.args[0]: op
            for op in history
            if op.kind == UPDATE and op.name == victim.name and op.result is True
        }
        overwritten = max(
            v for v in writes if v + 1 in writes and writes[v + 1].return_time < victim.call_time
        )
        result = (overwritten, list(writes[overwritten].args[1]))
    else:
        result = (version + 1000, list(hashlist))
    return [
        Operation(op.client, op.kind, op.name, op.args, result, op.call_time, op.return_time)
        if op is victim
        else op
        for op in history
    ]


def run(label: str, history: list[Operation], expect_ok: bool) -> None:
    start = time.perf_counter()
    result = check(history)
    elapsed = time.perf_counter() - start
    verdict = "ok" if result.ok else "rejected"
    if result.ok != expect_ok:
        verdict += " (unexpected)"
    print(
        f"{label:<52} {len(history):>7} ops  {elapsed:8.3f} s  {len(history) / elapsed:>10,.0f} ops/s  {verdict}",
        flush=True,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smaller histories")
    args = parser.parse_args(argv)
    scale = 4 if args.quick else 1
    print(f"seed={args.seed}")
    cases = [
        ("1 file, 2000 ops, 5 clients", 1, 2000, 5, 0.0),
        ("1 file, 5000 ops, 5 clients", 1, 5000, 5, 0.0),
        ("1 file, 2000 ops, 10 clients", 1, 2000, 10, 0.0),
        ("1 file, 2000 ops, 5 clients, 5% unknown", 1, 2000, 5, 0.05),
        ("1 file, 2000 ops, 20 clients, 2% unknown", 1, 2000, 20, 0.02),
        ("1 file, 20000 ops, 20 clients, 5% unknown", 1, 20000, 20, 0.05),
        ("1 file, 5000 ops, 50 clients, 20% unknown", 1, 5000, 50, 0.20),
        ("300 files, 20000 ops, 20 clients", 300, 20000 // 300, 20, 0.0),
        ("300 files, 20000 ops, 20 clients, 2% unknown", 300, 20000 // 300, 20, 0.02),
    ]
    for label, names, ops_per_name, clients, unknown_rate in cases:
        rng = random.Random(f"{args.seed}-{label}")
        history = generate(rng, names, max(1, ops_per_name // scale), clients, unknown_rate)
        run(label, history, True)
        if names == 1:
            run("  + a read of a version never written", corrupt(rng, history, stale=False), False)
            run("  + a read of an older version", corrupt(rng, history, stale=True), False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
