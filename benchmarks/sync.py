"""``surfshard sync`` next to ``cp -r`` and ``rsync`` on the same folders.

A cluster of one 3-replica metadata group and three block stores (2 copies
of each block; fsync off, as neither cp nor rsync fsyncs) on 127.0.0.1.
Two folders are measured:

- about 200 MB of mixed sizes (5 MB, 200 KB and 10 KB files);
- 10,000 small files (1 KiB each).

For each: the first sync up from folder A (MB/s, files/s), the first sync
down into an empty folder B, a no-change re-sync of A, and, in the same
run, ``cp -r`` of A and ``rsync -a`` of A into a new folder. Then the bytes
a one-block edit of a 5 MB file sends, and what the other folder then
fetches. rsync comes from Debian's packages
(installed here if missing and we may).

    python3 dev.py bench sync            # --quick: a tenth of the data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import metadata as bench  # noqa: E402  (processes, ports, waiting)


def ensure_rsync() -> str | None:
    if shutil.which("rsync"):
        return None
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "rsync"], capture_output=True, timeout=300)
    return None if shutil.which("rsync") else "rsync is not installed (Debian: apt-get install rsync)"


def make_mixed(folder: Path, scale: float, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    for count, size in (
        (int(20 * scale), 5_000_000),
        (int(250 * scale), 200_000),
        (int(2000 * scale), 10_000),
    ):
        for i in range(max(count, 1)):
            (folder / f"f{size}-{i}.bin").write_bytes(rng.randbytes(size))


def make_small(folder: Path, scale: float, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    for i in range(max(int(10_000 * scale), 1)):
        (folder / f"small-{i:05d}.txt").write_bytes(rng.randbytes(1024))


def folder_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.iterdir() if p.is_file() and p.name != "index.txt"]
    return len(files), sum(p.stat().st_size for p in files)


def timed(argv: list[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, **kwargs)
    elapsed = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {done.stderr[-2000:]}")
    return elapsed, done


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the data")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    no_rsync = ensure_rsync()
    work = Path(tempfile.mkdtemp(prefix="surfshard-syncbench-"))
    procs = bench.Processes()
    try:
        ports = bench.free_ports(6)
        group = [f"{bench.HOST}:{p}" for p in ports[:3]]
        stores = [f"{bench.HOST}:{p}" for p in ports[3:]]
        config = work / "cluster.toml"
        config.write_text(
            '[cluster]\nname = "syncbench"\nshards = 4\n'
            f'data_dir = "{work / "data"}"\n'
            "[groups.1]\nnodes = [" + ", ".join(f'"{a}"' for a in group) + "]\n"
            "[blockstores]\nnodes = [" + ", ".join(f'"{a}"' for a in stores) + "]\nreplicas = 2\n"
            "[raft]\nfsync = false\n"
        )
        twistd = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
        ]
        for i in range(3):
            procs.start(
                f"group-{i}",
                [
                    *twistd,
                    f"--logfile={work / f'group-{i}.log'}",
                    "surfshard",
                    "--config",
                    str(config),
                    "--group",
                    "1",
                    "--node",
                    str(i),
                ],
                work / f"group-{i}.out",
            )
            procs.start(
                f"store-{i}",
                [
                    *twistd,
                    f"--logfile={work / f'store-{i}.log'}",
                    "surfblock",
                    "--config",
                    str(config),
                    "--node",
                    str(i),
                ],
                work / f"store-{i}.out",
            )

        def leader() -> bool:
            return any((bench.try_status(a) or {}).get("role") == "leader" for a in group)

        bench.wait_for(leader, 60.0, "a leader")
        sync = [sys.executable, "-m", "client.cli", "sync", "--config", str(config), "--json"]
        rng = random.Random(1)
        rows = []
        for key, label, make in (
            ("mixed", "~200 MB mixed", make_mixed),
            ("small", "10,000 small", make_small),
        ):
            a, b = work / f"{key}-a", work / f"{key}-b"
            make(a, scale, rng)
            b.mkdir()
            files, size = folder_bytes(a)
            up, _ = timed([*sync, str(a)], cwd=str(ROOT))
            down, _ = timed([*sync, str(b)], cwd=str(ROOT))
            again, _ = timed([*sync, str(a)], cwd=str(ROOT))
            cp, _ = timed(["cp", "-r", str(a), str(work / f"{key}-cp")])
            rsync = None
            if no_rsync is None:
                rsync, _ = timed(["rsync", "-a", f"{a}/", str(work / f"{key}-rsync")])
            rows.append((label, files, size, up, down, again, cp, rsync))
            print(
                f"{label}: {files} files, {size / 1e6:.0f} MB: sync up {up:.1f} s ({size / 1e6 / up:.0f} MB/s, "
                f"{files / up:.0f} files/s), down {down:.1f} s, no-change re-sync {again:.2f} s; cp -r {cp:.2f} s"
                + (
                    f", rsync {rsync:.2f} s (sync up is {up / rsync:.1f}x rsync)"
                    if rsync
                    else f"; {no_rsync}"
                ),
                flush=True,
            )
        # One block of a 5 MB file changes: what goes over the wire. The
        # other folder first takes what the later folders put on the
        # cluster, so what it fetches after the edit is the edit alone.
        timed([*sync, str(work / "mixed-b")], cwd=str(ROOT))
        mixed = work / "mixed-a"
        target = sorted(mixed.glob("f5000000-*"))[0]
        with open(target, "r+b") as f:
            f.seek(4096 * 300)
            f.write(b"edited!")
        _, done = timed([*sync, str(mixed)], cwd=str(ROOT))
        sent = json.loads(done.stdout)["bytes_sent"]
        print(f"one-block edit of a 5 MB file: {sent} bytes sent (2 copies of one 4 KiB block = 8,192)")
        _, done = timed([*sync, str(work / "mixed-b")], cwd=str(ROOT))
        taken = json.loads(done.stdout)
        print(
            f"... and on the other folder: {taken['bytes_down']} bytes fetched, "
            f"{taken['bytes_reused']} taken from the file's old version"
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
