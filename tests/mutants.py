"""Remove each fsync and sync call of Raft's durable path, one at a time,
and run the tests that should notice: every removal must fail at least one
of them (``python3 dev.py mutants``).

The durable path is every call in ``DiskStorage`` (``raft/storage.py``,
from its class line on) and ``RaftNode`` (``raft/node.py``) that makes data
durable: ``*.fsync(...)``, ``*.fdatasync(...)``, ``self._fsync_directory()`` and
``*.sync()``. ``Syscalls.fsync`` (the seam itself) and ``MemoryStorage``
(the oracle) are not on it. Each mutant runs in a copy of the tree, so the
working tree is never changed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests.test_power_loss",
    "tests.test_raft_storage",
    "tests.test_raft_write_order",
    "tests.test_snapshot_offload",
    "tests.test_raft_cluster",
]
CALL = re.compile(
    r"^(\s*)((self\.)?(_sys|storage)?\.?(fsync\(|fdatasync\(|sync\(\)|_fsync_directory\(\)).*)$"
)


def sites() -> list[tuple[str, int, str]]:
    """(file, line number, code) of every call on the durable path."""
    found = []
    for name, start in (("raft/storage.py", "class DiskStorage"), ("raft/node.py", "class RaftNode")):
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        begin = next(i for i, line in enumerate(lines) if line.startswith(start))
        for i in range(begin, len(lines)):
            line = lines[i]
            stripped = line.strip()
            if stripped.startswith(("#", "def ")) or not CALL.match(line):
                continue
            if "self." not in stripped and not stripped.startswith("os."):
                continue
            found.append((name, i + 1, stripped))
    return found


def run_mutant(name: str, lineno: int, jobs: int) -> tuple[bool, str]:
    """(killed, the failing tests' names or the summary)."""
    with tempfile.TemporaryDirectory(prefix="surfshard-mutant-") as tmp:
        copy = Path(tmp) / "tree"
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for f in files:
            src = ROOT / f
            if src.is_file():
                dst = copy / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        target = copy / name
        lines = target.read_text(encoding="utf-8").splitlines(keepends=True)
        indent = re.match(r"\s*", lines[lineno - 1]).group(0)  # type: ignore[union-attr]
        lines[lineno - 1] = f"{indent}pass  # mutant: removed\n"
        target.write_text("".join(lines), encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", f"-j{jobs}", *TESTS],
            cwd=copy,
            env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": tmp},
            capture_output=True,
            text=True,
            timeout=900,
        )
        out = result.stdout
        failed = sorted(set(re.findall(r"^(tests\.\S+\.test_\w+)$", out, re.M)))
        summary = next(
            (line for line in reversed(out.splitlines()) if line.startswith(("PASSED", "FAILED"))), ""
        )
        return result.returncode != 0, (
            ", ".join(failed[:4]) + (" ..." if len(failed) > 4 else "")
        ) or summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2, help="trial jobs per mutant (default 2)")
    parser.add_argument("--list", action="store_true", help="only list the call sites")
    args = parser.parse_args()
    found = sites()
    for name, lineno, code in found:
        print(f"{name}:{lineno}: {code}")
    if args.list:
        return 0
    survivors = 0
    for name, lineno, code in found:
        t0 = time.monotonic()
        killed, detail = run_mutant(name, lineno, args.jobs)
        survivors += not killed
        verdict = "killed" if killed else "SURVIVED"
        print(f"{verdict:8} {name}:{lineno} {code}  ({time.monotonic() - t0:.0f} s) {detail}", flush=True)
    print(f"{len(found)} mutants, {len(found) - survivors} killed, {survivors} survived")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
