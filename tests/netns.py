"""Hosts of our own on one machine: Linux network namespaces joined by a
bridge, for tests of what crosses a real network (issue 12, item 6).

``Lab(n)`` makes a hub namespace holding a bridge and ``n`` host
namespaces, each with a veth pair to the bridge and an address
``10.X.Y.i`` of a /24 chosen for the run. Processes run inside a host
with ``ip netns exec``; links are cut with ``iptables`` DROP rules inside
the hosts (silent loss, as a real partition: senders time out), healed by
flushing them; pauses are SIGSTOP/SIGCONT and kills SIGKILL, of the pids
the lab started. ``close()`` kills every process it started and deletes
every namespace it made, whatever happened before (tests call it from
``addCleanup``). Nothing it does leaves the namespaces.

Needs root, ``ip`` (iproute2) and ``iptables``; ``Lab.unavailable()`` says
why a machine cannot, for a test to skip with.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


class Lab:
    """``n`` hosts on one bridge, in namespaces named ``ss<pid>-<k>-...``."""

    _count = 0

    def __init__(self, n: int, seed: int) -> None:
        Lab._count += 1
        self.tag = f"ss{os.getpid() % 100000}-{Lab._count}"
        rng = random.Random(seed)
        # A /24 of its own inside 10/8, so labs of concurrent runs never meet.
        self.prefix = f"10.{rng.randrange(100, 250)}.{rng.randrange(1, 250)}"
        self.hub = f"{self.tag}-hub"
        self.hosts = [f"{self.tag}-h{i}" for i in range(n)]
        self.addresses = [f"{self.prefix}.{i + 1}" for i in range(n)]
        self.made: list[str] = []
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.cuts: set[frozenset[int]] = set()

    @staticmethod
    def unavailable() -> str | None:
        """Why this machine cannot run a lab, or None if it can."""
        if os.name != "posix" or not hasattr(os, "geteuid"):
            return "network namespaces are Linux-only"
        if os.geteuid() != 0:
            return "making network namespaces needs root"
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (Debian: iproute2, iptables)"
        probe = f"ssprobe{os.getpid()}"
        try:
            _run("ip", "netns", "add", probe)
            try:
                _run("ip", "-n", probe, "link", "add", "br0", "type", "bridge")
                _run("ip", "netns", "exec", probe, "iptables", "-A", "INPUT", "-s", "10.0.0.1", "-j", "DROP")
            finally:
                _run("ip", "netns", "del", probe)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            return f"cannot make a namespace with a bridge and iptables here: {e} {detail.decode(errors='replace')}"
        return None

    # -- topology ---------------------------------------------------------------

    def open(self) -> None:
        _run("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(zip(self.hosts, self.addresses, strict=True)):
            _run("ip", "netns", "add", host)
            self.made.append(host)
            _run("ip", "-n", host, "link", "set", "lo", "up")
            inside, outside = f"eth{i}", f"p{i}"
            _run("ip", "-n", self.hub, "link", "add", outside, "type", "veth", "peer", "name", inside)
            _run("ip", "-n", self.hub, "link", "set", inside, "netns", host)
            _run("ip", "-n", self.hub, "link", "set", outside, "master", "br0")
            _run("ip", "-n", self.hub, "link", "set", outside, "up")
            _run("ip", "-n", host, "addr", "add", f"{address}/24", "dev", inside)
            _run("ip", "-n", host, "link", "set", inside, "up")

    def close(self) -> None:
        for key in list(self.procs):
            self.kill(key)
        for ns in reversed(self.made):
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _run("ip", "netns", "del", ns)
        self.made.clear()

    # -- processes ----------------------------------------------------------------

    def start(
        self, key: str, host: int, argv: Sequence[str], log: Path, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Run ``argv`` inside host ``host`` (``ip netns exec`` execs it, so
        the pid is the program's own)."""
        if key in self.procs and self.procs[key].poll() is None:
            raise RuntimeError(f"{key} is already running")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[host], *argv],
                stdin=subprocess.DEVNULL,
                stdout=kwargs.pop("stdout", out),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )
        self.procs[key] = proc
        return proc

    def signal(self, key: str, sig: int) -> None:
        proc = self.procs[key]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def kill(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies all the same, but be sure
                os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    # -- faults -------------------------------------------------------------------

    def _drop(self, host: int, other: int, action: str) -> None:
        ns, peer = self.hosts[host], self.addresses[other]
        for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
            _run("ip", "netns", "exec", ns, "iptables", action, chain, flag, peer, "-j", "DROP")

    def cut(self, a: int, b: int) -> None:
        """Lose every packet between hosts ``a`` and ``b``, both ways."""
        link = frozenset((a, b))
        if a == b or link in self.cuts:
            return
        self._drop(a, b, "-A")
        self._drop(b, a, "-A")
        self.cuts.add(link)

    def partition(self, *sides: Iterable[int]) -> None:
        """Cut every link between hosts on different sides."""
        groups = [list(side) for side in sides]
        for i, side in enumerate(groups):
            for other in groups[i + 1 :]:
                for a in side:
                    for b in other:
                        self.cut(a, b)

    def heal(self) -> None:
        for host in {h for link in self.cuts for h in link}:
            _run("ip", "netns", "exec", self.hosts[host], "iptables", "-F")
        self.cuts.clear()
