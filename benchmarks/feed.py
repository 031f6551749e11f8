"""The change feed: how long a re-sync with nothing to do takes on a large
namespace, and how fast a change reaches a folder that watches.

A cluster of one 3-replica metadata group (8 shards) and three block stores
on 127.0.0.1, fsync off.

1. Watch: ``surfshard sync --watch 30 B`` runs; 100 times a new file is
   written in folder A and ``surfshard sync A`` run; the time from that
   sync's return to the file's appearance in B (median, p99).
2. No-change re-sync: the namespace is filled with ``--files`` files
   (default 1,000,000); then, in one client process, a full listing
   (``client.feed.list_all``, what a first sync does) and a follow-up with
   nothing changed (``changes_since``, what a re-sync does), each timed
   (median of 5) with the RPC calls it made counted.

The folder scan of a re-sync (hashing the local files) is not part of (2):
it is O(the folder), not O(the namespace).

    python3 dev.py bench feed           # --files N, --changes N
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import metadata as bench  # noqa: E402  (processes, ports, waiting)

FILL = r"""
import sys, time
from twisted.internet import defer, task
from client.cluster import ClusterClient
from surfshard.config import load_config

N, WRITERS = int(sys.argv[2]), 256
H = "ab" * 32

@defer.inlineCallbacks
def main(reactor):
    c = ClusterClient(load_config(sys.argv[1]), reactor, timeout=60)
    todo = iter(range(N))
    @defer.inlineCallbacks
    def writer():
        for i in todo:
            yield c.updatefile(f"n{i:07d}", 1, [H])
    t0 = time.monotonic()
    yield defer.gatherResults([writer() for _ in range(WRITERS)])
    print(f"filled {N} files in {time.monotonic() - t0:.1f} s", flush=True)
    yield c.close()

task.react(main)
"""

MEASURE = r"""
import json, statistics, sys, time
from twisted.internet import defer, task
from client.cluster import ClusterClient
from client.feed import changes_since, list_all
from surfshard.config import load_config

@defer.inlineCallbacks
def main(reactor):
    c = ClusterClient(load_config(sys.argv[1]), reactor, timeout=120)
    calls = [0]
    def counting(real):
        def counted(*a, **k):
            calls[0] += 1
            return real(*a, **k)
        return counted
    for method in ("call", "call_into"):
        setattr(c.pool, method, counting(getattr(c.pool, method)))
    out = {}
    for what in ("listing", "changes"):
        times, counts = [], []
        for _ in range(5):
            calls[0] = 0
            t0 = time.perf_counter()
            if what == "listing":
                files, cursor = yield list_all(c)
                out["files"] = len(files)
            else:
                changed, _ = yield changes_since(c, cursor)
                out["changed"] = len(changed)
            times.append(time.perf_counter() - t0)
            counts.append(calls[0])
        out[what] = {"median_s": statistics.median(times), "calls": statistics.median(counts)}
    print(json.dumps(out), flush=True)
    yield c.close()

task.react(main)
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--files", type=int, default=1_000_000, help="namespace size for the re-sync (default 1M)"
    )
    parser.add_argument("--changes", type=int, default=100, help="changes timed for the watch (default 100)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="surfshard-feedbench-"))
    procs = bench.Processes()
    try:
        ports = bench.free_ports(6)
        group = [f"{bench.HOST}:{p}" for p in ports[:3]]
        stores = [f"{bench.HOST}:{p}" for p in ports[3:]]
        config = work / "cluster.toml"
        config.write_text(
            '[cluster]\nname = "feedbench"\nshards = 8\n'
            f'data_dir = "{work / "data"}"\n'
            "[groups.1]\nnodes = [" + ", ".join(f'"{a}"' for a in group) + "]\n"
            "[blockstores]\nnodes = [" + ", ".join(f'"{a}"' for a in stores) + "]\nreplicas = 2\n"
            "[raft]\nfsync = false\nsnapshot_entries = 100000\n"
        )
        twistd = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
        ]
        for i in range(3):
            for key, plugin, extra in (("group", "surfshard", ["--group", "1"]), ("store", "surfblock", [])):
                procs.start(
                    f"{key}-{i}",
                    [*twistd, f"--logfile={work / f'{key}-{i}.log'}", plugin, "--config", str(config), *extra]
                    + ["--node", str(i)],
                    work / f"{key}-{i}.out",
                )

        def leader() -> bool:
            return any((bench.try_status(a) or {}).get("role") == "leader" for a in group)

        bench.wait_for(leader, 60.0, "a leader")
        cli = [sys.executable, "-m", "client.cli"]
        a, b = work / "a", work / "b"
        a.mkdir()
        b.mkdir()
        watcher = procs.start(
            "watch", [*cli, "sync", "--config", str(config), "--watch", "30", str(b)], work / "watch.out"
        )
        bench.wait_for(lambda: (b / ".surfshard-cursor").exists(), 60.0, "the watcher's first sync")
        delays: list[float] = []
        from client.sync import sync_folder
        from surfshard.config import load_config

        cluster = load_config(config)
        for k in range(args.changes):
            name = f"change-{k:03d}.txt"
            (a / name).write_text(f"change {k}\n")
            # In this process: it returns once the server acknowledged the write.
            sync_folder(a, cluster)
            synced = time.monotonic()
            bench.wait_for(lambda name=name: (b / name).exists(), 30.0, f"{name} in B", interval=0.002)
            delays.append(time.monotonic() - synced)
        if watcher.poll() is not None:
            raise SystemExit("the watcher exited")
        procs.stop("watch")
        delays.sort()
        print(
            f"watch: a change synced from A reached B (sync --watch 30) in median {statistics.median(delays) * 1000:.0f} ms, "
            f"p99 {bench.percentile(delays, 99) * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms over {len(delays)} changes",
            flush=True,
        )
        fill = subprocess.run(
            [sys.executable, "-c", FILL, str(config), str(args.files)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if fill.returncode != 0:
            raise SystemExit(f"filling the namespace failed: {fill.stderr[-2000:]}")
        print(fill.stdout.strip(), flush=True)
        measured = subprocess.run(
            [sys.executable, "-c", MEASURE, str(config)], cwd=ROOT, capture_output=True, text=True
        )
        if measured.returncode != 0:
            raise SystemExit(f"measuring failed: {measured.stderr[-2000:]}")
        import json

        r: dict[str, Any] = json.loads(measured.stdout.strip().splitlines()[-1])
        listing, changes = r["listing"], r["changes"]
        print(
            f"namespace of {r['files']:,} files in 8 shards: full listing {listing['median_s']:.2f} s "
            f"({listing['calls']:.0f} calls); no-change re-sync {changes['median_s'] * 1000:.0f} ms "
            f"({changes['calls']:.0f} calls, {r['changed']} changes) = "
            f"{listing['median_s'] / changes['median_s']:.0f}x faster than listing",
            flush=True,
        )
        return 0
    finally:
        procs.stop_all()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
