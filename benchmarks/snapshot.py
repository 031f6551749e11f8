"""Snapshots of a large state under a steady write load (issue 12, item 3).

A 3-node metadata group starts from a snapshot holding ``--files`` files
(1,000,000 by default, written into each node's data directory before it
starts), with ``snapshot_entries`` small enough that it snapshots every few
seconds, while ``--clients`` writers keep writing. Printed: snapshots taken,
elections (term changes), the largest silence a follower saw between two
messages of its leader (``max_leader_gap_ms``), and the writers' throughput
and latency.

``--tree DIR`` runs the nodes from another checkout of this repository
(``git worktree add /tmp/base <commit>``), so the code before a change and
after it are measured in one run: ``--tree`` runs first, then this tree.

    python3 dev.py bench snapshot                     # this tree only
    python3 dev.py bench snapshot --tree /tmp/base    # before, then after
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import metadata as bench  # noqa: E402  (benchmarks/metadata.py: processes, load generator)


def seed_state(files: int) -> bytes:
    """A one-shard metadata state of ``files`` files, as a snapshot."""
    from surfshard.metadata.state import MetadataStateMachine

    machine = MetadataStateMachine(1)
    hashes = (f"{7:064x}",)
    shard = machine._shards[0]  # filled directly: applying a million updates would take minutes
    for i in range(files):
        shard.files[f"seed/{i:08d}"] = (1, hashes)
    shard.revision = files
    return machine.snapshot()


def prepare(workdir: Path, files: int, snapshot_entries: int, fsync: bool) -> tuple[Path, list[str]]:
    from raft.storage import DiskStorage
    from raft.types import HardState, Snapshot, SnapshotMeta
    from surfshard.config import NodeKind, load_config

    addresses = [f"{bench.HOST}:{p}" for p in bench.free_ports(3)]
    config = workdir / "cluster.toml"
    nodes = ", ".join(f'"{a}"' for a in addresses)
    config.write_text(
        "[cluster]\n"
        'name = "snapbench"\n'
        "shards = 1\n"
        f'data_dir = "{workdir / "data"}"\n\n'
        "[groups.1]\n"
        f"nodes = [{nodes}]\n\n"
        "[raft]\n"
        f"fsync = {'true' if fsync else 'false'}\n"
        f"snapshot_entries = {snapshot_entries}\n"
    )
    t0 = time.monotonic()
    data = seed_state(files)
    print(
        f"seed state: {files} files, {len(data) / 2**20:.0f} MB of snapshot ({time.monotonic() - t0:.1f} s)"
    )
    cluster = load_config(config)
    for i in range(3):
        storage = DiskStorage(str(Path(cluster.node_data_dir(NodeKind.GROUP, 1, i)) / "raft"), fsync=False)
        storage.load()
        storage.save_snapshot(Snapshot(SnapshotMeta(1, 1, (1, 2, 3)), data))
        storage.set_hard_state(HardState(1, None, 1))
        storage.sync()
        storage.close()
    return config, addresses


def run(tree: Path, args: argparse.Namespace, label: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="surfshard-snapbench-"))
    procs = bench.Processes()
    try:
        config, addresses = prepare(workdir, args.files, args.snapshot_entries, args.fsync)
        env = dict(os.environ, PYTHONPATH=str(tree))
        for i in range(3):
            argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--nodaemon"]
            argv += ["--pidfile=", f"--logfile={workdir / f'node-{i}.log'}"]
            argv += ["surfshard", "--config", str(config), "--group", "1", "--node", str(i)]
            procs.start(f"node-{i}", argv, workdir / f"node-{i}.out", cwd=tree, env=env)

        def leader() -> dict[str, Any] | None:
            statuses = [bench.try_status(a) for a in addresses]
            if all(statuses) and sum(s["role"] == "leader" for s in statuses) == 1:  # type: ignore[index]
                return next(s for s in statuses if s and s["role"] == "leader")
            return None

        first = bench.wait_for(leader, 180.0, "a leader (restoring the seed snapshot takes a while)")
        load = bench.LoadGenerator(procs, "load", addresses, workdir / "load.log")
        try:
            statuses0 = [bench.try_status(a) for a in addresses]
            result = load.ask(
                {"cmd": "measure", "clients": args.clients, "warmup": 1.0, "seconds": args.seconds},
                args.seconds + 120,
            )
        finally:
            load.close()

        # A node busy writing a snapshot on its event loop may not answer
        # at once: ask until all three do (the stall itself is the figure).
        def all_status() -> list[dict[str, Any]] | None:
            got = [bench.try_status(a) for a in addresses]
            return got if all(got) else None  # type: ignore[return-value]

        statuses = bench.wait_for(all_status, 120.0, "every node to answer its status")
        snapshots = [s.get("snapshot_index") for s in statuses if s]
        gaps = [s["max_leader_gap_ms"] for s in statuses if s and s["role"] != "leader"]
        terms = [s["term"] for s in statuses if s]
        out = {
            "label": label,
            "ops": result["throughput"],
            "p50_ms": result["p50_ms"],
            "p99_ms": result["p99_ms"],
            "max_ms": result.get("max_ms", float("nan")),
            "term_before": first["term"],
            "terms_after": terms,
            "gap_ms": max(gaps) if gaps else float("nan"),
            "snapshots_seen": snapshots,
            "applied_before": [s["applied"] for s in statuses0 if s],
            "applied_after": [s["applied"] for s in statuses if s],
        }
        print(
            f"{label}: {out['ops']:.0f} writes/s p50 {out['p50_ms']:.1f} ms p99 {out['p99_ms']:.1f} ms; "
            f"terms {first['term']} -> {terms}; largest leader gap on a follower {out['gap_ms']:.0f} ms; "
            f"snapshot index now {snapshots}",
            flush=True,
        )
        return out
    finally:
        procs.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--snapshot-entries", type=int, default=2000)
    parser.add_argument(
        "--fsync", action="store_true", help="fsync on (default off: the disk is not the point)"
    )
    parser.add_argument("--tree", type=Path, help="also run the nodes from this checkout, first")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    results = []
    if args.tree is not None:
        results.append(run(args.tree.resolve(), args, f"before ({args.tree})"))
    results.append(run(ROOT, args, "this tree"))
    print(
        "\nheartbeat interval 100 ms, elections after 300-600 ms of silence; "
        f"{args.files} files, snapshot every {args.snapshot_entries} entries, {args.clients} writers"
    )
    for r in results:
        elections = max(r["terms_after"]) - r["term_before"]
        print(
            f"  {r['label']:<24} largest gap {r['gap_ms']:>6.0f} ms  elections {elections}  "
            f"{r['ops']:>7.0f} writes/s  p99 {r['p99_ms']:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
