#!/usr/bin/env python3
"""Set up a development environment and run SurfShard from it.

    python3 dev.py up [ARGS...]     start a whole local cluster (surfshard up ARGS)
    python3 dev.py test [ARGS...]   run the whole test suite with trial
    python3 dev.py check            ruff (lint and format) and mypy over the tree
    python3 dev.py bench NAME       run benchmarks/NAME.py
    python3 dev.py mutants          remove each fsync/sync of Raft's durable path in turn;
                                    every removal must fail a test (tests/mutants.py)
    python3 dev.py setup            only create or refresh .venv

Both create ``.venv`` on first use (and refresh it when setup.py changes), so
a second run reuses the environment. Only Python 3.11+ is needed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".surfshard-setup-hash"


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be run by an older python3
        sys.exit("SurfShard needs Python 3.11 or newer")
    wanted = hashlib.sha256((ROOT / "setup.py").read_bytes()).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing surfshard and its test dependencies into .venv", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip", "setuptools", "wheel"], check=True)
    # compat mode puts the source tree on sys.path with a .pth file, so the
    # twistd plugins in twisted/plugins/ are found from the working tree.
    subprocess.run(
        pip + ["-e", ".[test,bench]", "--config-settings", "editable_mode=compat"],
        check=True,
        cwd=ROOT,
    )
    STAMP.write_text(wanted)


SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)\s*$")


def run_tests(args: list[str]) -> int:
    jobs = [] if any(a.startswith("-j") or a.startswith("--jobs") for a in args) else ["-j2"]
    targets = [a for a in args if not a.startswith("-")] or ["tests"]
    options = [a for a in args if a.startswith("-")]
    cmd = [str(PY), "-m", "twisted.trial", *jobs, *options, *targets]
    print("dev.py:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    counts: dict[str, int] = {}
    verdict = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = SUMMARY.match(line.strip())
        if m:
            verdict = m.group(1)
            for part in m.group(2).split(","):
                key, _, value = part.strip().partition("=")
                if value.isdigit():
                    counts[key] = int(value)
    rc = proc.wait()
    passed = counts.get("successes", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    if verdict is None or passed == 0:
        return rc or 1
    return rc


def run_checks() -> int:
    """ruff check, ruff format --check, mypy (settings in ruff.toml and
    mypy.ini); every one runs, and the result fails if any failed."""
    failed = []
    for name, cmd in (
        ("ruff check", [str(BIN / "ruff"), "check", "."]),
        ("ruff format", [str(BIN / "ruff"), "format", "--check", "."]),
        ("mypy", [str(BIN / "mypy")]),
    ):
        print(f"dev.py: {name}", flush=True)
        if subprocess.call(cmd, cwd=ROOT) != 0:
            failed.append(name)
    print("checks: " + (f"FAILED ({', '.join(failed)})" if failed else "all passed"), flush=True)
    return 1 if failed else 0


def hand_over(argv: list[str]) -> int:
    """Become ``argv`` (exec), so that Ctrl-C reaches only the program that
    stops its own children by pid. Waiting on it instead would have this
    process's Ctrl-C handling kill it (subprocess.call does) mid-clean-up,
    leaving its children running."""
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "execv"):
        os.execv(argv[0], argv)  # does not return
    return subprocess.call(argv)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    ensure_env()
    if command == "setup":
        return 0
    if command == "test":
        return run_tests(rest)
    if command == "check":
        return run_checks()
    if command == "up":
        return hand_over([str(BIN / "surfshard"), "up", *rest])
    if command == "mutants":
        return hand_over([str(PY), str(ROOT / "tests" / "mutants.py"), *rest])
    if command == "bench":
        if not rest:
            sys.exit("usage: python3 dev.py bench NAME [ARGS...]")
        return hand_over([str(PY), str(ROOT / "benchmarks" / f"{rest[0]}.py"), *rest[1:]])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
