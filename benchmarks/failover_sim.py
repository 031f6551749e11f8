"""Failover time in simulated time: from a leader's crash to a new leader
that the rest of the cluster follows, with default timing (50 ms ticks,
election timeouts drawn from [300, 600) ms), over many seeds.

    python3 dev.py bench failover_sim [--seeds 100] [--nodes 3]

Prints the median, p99 and max in simulated milliseconds (the figures do not
depend on the machine: every run is a function of its seed).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raft.testing.simnet import measure_failover, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="number of seeds (default 100)")
    parser.add_argument("--nodes", type=int, default=3, help="cluster size (default 3)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.nodes < 2:
        parser.error("need at least 1 seed and 2 nodes")
    samples = [measure_failover(seed, n=args.nodes) for seed in range(args.seeds)]
    stats = summarize(samples)
    worst = max(range(len(samples)), key=samples.__getitem__)
    print(f"failover (leader crash -> new leader), {args.nodes} nodes, {args.seeds} seeds, simulated time:")
    print(f"  median {stats['median'] * 1000:.0f} ms")
    print(f"  p99    {stats['p99'] * 1000:.0f} ms")
    print(f"  max    {stats['max'] * 1000:.0f} ms (seed {worst})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
