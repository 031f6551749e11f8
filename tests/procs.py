"""Real server processes for tests: ports, configs, start/stop, polling, logs.

The process-level tests (SurfStore acceptance, restart from disk, bad input
against a live node, the twistd plugin) start real ``twistd`` processes on
127.0.0.1 and drive them with blocking clients from a ``SynchronousTestCase``.
This module is what they share:

- ``free_ports``: loopback ports that were free a moment ago;
- ``write_surfstore_config`` / ``write_toml_config``: a config in a temp dir
  (node data directories then live beside it, in the same temp dir);
- ``Cluster``: the nodes of one group, each a ``NodeProcess`` started via
  ``run-server.sh`` or the venv's ``twistd``, logging to a file; every process
  it started is SIGKILLed by pid in ``cleanup`` (register it with
  ``addCleanup``), even when the test failed half way;
- ``wait_until``: poll a predicate with a deadline (never sleep-to-wait);
- ``xmlrpc_proxy`` (with a socket timeout) and ``NativeClient`` (the
  length-prefixed CBOR protocol over a plain blocking socket).

Everything here blocks: it must not be used from reactor-driven tests.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.trial.unittest import FailTest

from surfshard.errors import Unavailable, error_from_wire
from surfshard.net import wire

T = TypeVar("T")

#: twisted.web's access log lines, e.g. ``"127.0.0.1" - - [...] "POST /RPC2 HTTP/1.1" 200 129``.
_ACCESS_LOG = re.compile(r'\] "\S+ /\S* HTTP/1\.[01]" \d{3} ')

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_SERVER = REPO_ROOT / "run-server.sh"
#: The twistd that run-server.sh execs; without it the script would first
#: build a virtualenv, which a test must not do behind the user's back.
RUN_SERVER_TWISTD = REPO_ROOT / ".venv" / "bin" / "twistd"

#: How long a started node may take to answer its first ping. Generous: on a
#: loaded 2-core machine importing Twisted and friends takes a while.
START_TIMEOUT = 30.0
#: Lines of each node's log attached to a failure message.
LOG_TAIL_LINES = 40

# Ports already handed out by this process: never hand one out twice, even
# if its node has exited and the kernel would call it free again.
_handed_out: set[int] = set()


class WaitTimeout(FailTest):
    """``wait_until`` ran out of time. A FailTest, so trial reports a failure
    (the system did not do what the test expected), not an error."""


class NodeExited(FailTest):
    """A node process exited while the test expected it to serve."""


class PortCollision(NodeExited):
    """A node could not listen because something else took its port between
    ``free_ports`` and the node's start."""


# ---------------------------------------------------------------------------
# Polling
# ---------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition not met",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy
    value, and return that value; raise ``WaitTimeout`` after ``timeout``.

    The predicate runs at least once, and once more at the deadline, so a
    short timeout on a slow machine still gets a fair last look. ``message``
    (or a callable producing it, for diagnostics that are costly to build)
    goes into the failure, along with the last value the predicate returned.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError("timeout must be >= 0 and interval > 0")
    deadline = time.monotonic() + timeout
    # Bounded: at most timeout/interval + 2 looks (the wait between looks is
    # at least ``interval`` unless the deadline is nearer).
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    else:
        value = predicate()
        if value:
            return value
    text = message() if callable(message) else message
    raise WaitTimeout(f"{text} (waited {timeout:.1f}s; last value {value!r})")


def holds_for(predicate: Callable[[], bool], duration: float, interval: float = 0.05) -> tuple[bool, Any]:
    """Check that ``predicate`` stays true for ``duration`` seconds of polling.

    Returns ``(True, None)`` if it held at every look, else ``(False, when)``
    with the seconds elapsed at the first look where it did not. Used for
    "no leader emerges" checks, which no single look can establish.
    """
    start = time.monotonic()
    deadline = start + duration
    for _ in range(int(duration / interval) + 2):
        if not predicate():
            return False, round(time.monotonic() - start, 3)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True, None
        time.sleep(min(interval, remaining))
    return True, None


# ---------------------------------------------------------------------------
# Ports and configs
# ---------------------------------------------------------------------------


def free_ports(count: int, host: str = HOST, attempts: int = 50) -> list[int]:
    """``count`` distinct loopback ports that were free when asked.

    All sockets stay bound until every port is chosen, so the ports are
    distinct; a port this process handed out before is skipped (its node may
    still be starting). A node that still finds its port taken exits and
    its ``NodeProcess`` reports a ``PortCollision``.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(attempts):
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in _handed_out and port not in ports:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < count:
        raise RuntimeError(f"could not find {count} free ports in {attempts} attempts")
    _handed_out.update(ports)
    return ports


def addresses_of(ports: Sequence[int], host: str = HOST) -> list[str]:
    return [f"{host}:{p}" for p in ports]


def write_surfstore_config(directory: Path, ports: Sequence[int], name: str = "surfstore") -> Path:
    """SurfStore's ``M: N`` / ``metadataK: host:port`` format. Node data then
    goes to ``directory/data/<name>``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"M: {len(ports)}"]
    lines += [f"metadata{i}: {a}" for i, a in enumerate(addresses_of(ports))]
    path = directory / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_toml_config(
    directory: Path,
    ports: Sequence[int],
    *,
    name: str = "test",
    chaos: bool = False,
    fsync: bool = True,
    raft: dict[str, int] | None = None,
) -> Path:
    """A static single-group TOML cluster (group 1, one shard per node count
    is irrelevant: a static group serves every shard). ``raft`` overrides
    timings (tick_ms, heartbeat_ticks, election_ticks, snapshot_entries)."""
    directory.mkdir(parents=True, exist_ok=True)
    nodes = ", ".join(f'"{a}"' for a in addresses_of(ports))
    timings = {"fsync": fsync, **(raft or {})}
    raft_lines = [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in timings.items()]
    text = "\n".join(
        [
            "[cluster]",
            f'name = "{name}"',
            "shards = 4",
            f'data_dir = "data/{name}"',
            f"chaos = {'true' if chaos else 'false'}",
            "",
            "[groups.1]",
            f"nodes = [{nodes}]",
            "",
            "[raft]",
            *raft_lines,
            "",
        ]
    )
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def twistd_command() -> list[str]:
    """How to run twistd from the Python running the tests (CI's venv or
    ours): the ``twistd`` script beside ``sys.executable``, else the module."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
    ]


def twistd_node_argv(config: Path, index: int, *, group: int = 1, chaos: bool = False) -> list[str]:
    """argv of one metadata replica run directly by twistd, logging to stdout."""
    argv = [
        *twistd_command(),
        "--nodaemon",
        "--pidfile=",
        "--logfile=-",
        "surfshard",
        "--config",
        str(config),
        "--group",
        str(group),
        "--node",
        str(index),
    ]
    return [*argv, "--chaos"] if chaos else argv


def run_server_argv(config: Path, index: int) -> list[str]:
    """argv of ``run-server.sh CONFIG ID`` (it execs twistd, so the pid we
    get is the server's own)."""
    return [str(RUN_SERVER), str(config), str(index)]


def run_server_available() -> str | None:
    """None if run-server.sh can be used here, else why not (for a skip)."""
    if not os.access(RUN_SERVER, os.X_OK):
        return f"{RUN_SERVER} is missing or not executable"
    if not RUN_SERVER_TWISTD.exists():
        return f"{RUN_SERVER_TWISTD} is missing (run `python3 dev.py setup`)"
    return None


class NodeProcess:
    """One server process, its log file, and its pid.

    Only ever signals its own pid, and reaps it, so no zombie or stray server
    outlives the test. The process gets a session of its own so a Ctrl-C on
    the test run does not reach it half way through an assertion.
    """

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, address: str) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.address = address
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"=== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL and reap: the process is gone when this returns."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kernel problem, not ours
            raise RuntimeError(f"{self.name} (pid {self.pid}) survived SIGKILL for {timeout}s") from None

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (twistd shuts down cleanly), then SIGKILL after ``timeout``."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines that say something: the HTTP access log
        (one line per XML-RPC poll) is left out."""
        useful = [line for line in self.log_text().splitlines() if not _ACCESS_LOG.search(line)]
        return "\n".join(useful[-lines:])

    def describe(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"{self.name} {self.address} pid {self.pid} ({state})"


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class _TimeoutTransport(xmlrpc.client.Transport):
    """xmlrpc.client's transport with a socket timeout (the stock one waits
    forever, which would hang a test on a node that blocks by design)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        connection = super().make_connection(host)
        connection.timeout = self._timeout
        return connection


def xmlrpc_proxy(address: str, timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
    """A ServerProxy for ``http://address/RPC2``. Not thread-safe: one per thread."""
    return xmlrpc.client.ServerProxy(
        f"http://{address}/RPC2", transport=_TimeoutTransport(timeout), allow_none=True
    )


class NativeClient:
    """The native protocol over one blocking socket: ``call`` sends one
    request and waits for its reply. Error replies raise the typed
    ``SurfShardError``; a broken or silent connection raises ``Unavailable``
    (after which the client reconnects on the next call)."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._decoder = wire.FrameDecoder()
        self._ids = itertools.count(1)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            host, _, port = self.address.rpartition(":")
            try:
                self._sock = socket.create_connection((host, int(port)), timeout=self.timeout)
            except OSError as e:
                raise Unavailable(f"cannot connect to {self.address}: {e}") from e
            self._decoder = wire.FrameDecoder()
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def send_bytes(self, data: bytes) -> None:
        """Raw bytes on the connection (for bad-input tests)."""
        sock = self._connect()
        try:
            sock.sendall(data)
        except OSError as e:
            self.close()
            raise Unavailable(f"send to {self.address} failed: {e}") from e

    def read_frame(self, timeout: float | None = None) -> dict[Any, Any]:
        """The next frame from the server; ``Unavailable`` if the connection
        closes or nothing whole arrives within the timeout."""
        sock = self._connect()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        pending = list(self._decoder.feed(b""))
        # Bounded by the deadline: every pass either returns or waits on recv.
        while not pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise Unavailable(f"no reply from {self.address} in time")
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                self.close()
                raise Unavailable(f"connection to {self.address} failed: {e}") from e
            if not data:
                self.close()
                raise Unavailable(f"{self.address} closed the connection")
            pending = list(self._decoder.feed(data))
        frame = pending[0]
        if len(pending) > 1:  # pragma: no cover - we keep one request in flight
            raise AssertionError(f"unexpected extra frames from {self.address}: {pending[1:]!r}")
        return frame

    def call_raw(self, request: dict[str, Any], timeout: float | None = None) -> dict[Any, Any]:
        """Send one request map as-is; return the reply frame as-is."""
        self.send_bytes(wire.encode_frame(request))
        return self.read_frame(timeout)

    def call(self, method: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        request_id = next(self._ids)
        reply = self.call_raw({"id": request_id, "method": method, "args": args or {}}, timeout)
        if reply.get("id") != request_id:
            self.close()
            raise AssertionError(f"reply id {reply.get('id')!r} for request {request_id}: {reply!r}")
        if "error" in reply:
            raise error_from_wire(reply["error"])
        return reply.get("ok")

    def __enter__(self) -> NativeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_connection_error(e: BaseException) -> bool:
    """Errors that mean "no answer from that node", not "it said no"."""
    if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE)


# ---------------------------------------------------------------------------
# A group of nodes
# ---------------------------------------------------------------------------


class Cluster:
    """The nodes of one metadata group (gid 1) described by one config file.

    ``launcher`` is ``"run-server"`` (``run-server.sh CONFIG ID``, which turns
    chaos calls on) or ``"twistd"`` (the venv's twistd with ``--chaos`` only if
    ``chaos`` is set). Nodes are not started until ``start(i)``. Call
    ``cleanup`` from ``addCleanup``: it SIGKILLs every process this cluster
    started that is still alive, by pid.
    """

    def __init__(
        self,
        directory: Path,
        config: Path,
        ports: Sequence[int],
        *,
        launcher: str = "twistd",
        chaos: bool = False,
        write_config: Callable[[Sequence[int]], Path] | None = None,
    ) -> None:
        if launcher not in ("run-server", "twistd"):
            raise ValueError(f"unknown launcher {launcher!r}")
        self.directory = Path(directory).resolve()
        self.launcher = launcher
        self.chaos = chaos
        # Rewrites the config for new ports, so start_all can retry after a
        # port collision.
        self._write_config = write_config
        self.nodes: list[NodeProcess] = []
        self._configure(Path(config), ports)

    def _configure(self, config: Path, ports: Sequence[int]) -> None:
        self.config = config = config.resolve()
        self.ports = list(ports)
        self.addresses = addresses_of(ports)
        self.nodes = []
        for i, address in enumerate(self.addresses):
            argv = (
                run_server_argv(config, i)
                if self.launcher == "run-server"
                else twistd_node_argv(config, i, chaos=self.chaos)
            )
            log = self.directory / "logs" / f"node{i}.log"
            self.nodes.append(NodeProcess(f"node{i}", argv, log, address))

    @classmethod
    def surfstore(cls, directory: Path, size: int, *, launcher: str = "run-server") -> Cluster:
        """A SurfStore ``M: N`` config (chaos calls on, default Raft timings)."""
        directory = Path(directory).resolve()

        def write(ports: Sequence[int]) -> Path:
            return write_surfstore_config(directory, ports)

        ports = free_ports(size)
        return cls(directory, write(ports), ports, launcher=launcher, chaos=True, write_config=write)

    @classmethod
    def toml(cls, directory: Path, size: int, *, chaos: bool = False, **options: Any) -> Cluster:
        """A static one-group TOML config; ``options`` go to ``write_toml_config``."""
        directory = Path(directory).resolve()

        def write(ports: Sequence[int]) -> Path:
            return write_toml_config(directory, ports, chaos=chaos, **options)

        ports = free_ports(size)
        return cls(directory, write(ports), ports, launcher="twistd", chaos=chaos, write_config=write)

    def __len__(self) -> int:
        return len(self.nodes)

    # -- processes --------------------------------------------------------

    def start(self, i: int, wait: bool = True, timeout: float = START_TIMEOUT) -> NodeProcess:
        """Start node ``i``; with ``wait``, return once it answers a ping."""
        node = self.nodes[i]
        node.start()
        if wait:
            self.wait_serving(i, timeout)
        return node

    def wait_serving(self, i: int, timeout: float = START_TIMEOUT) -> None:
        """Until node ``i`` answers on its port (XML-RPC ping; a crashed node's
        fault counts as an answer). Fails at once if the process exits."""
        node = self.nodes[i]

        def serving() -> bool:
            if not node.running:
                log = node.log_text()
                kind = PortCollision if "Address already in use" in log else NodeExited
                raise kind(f"{node.describe()} exited while starting\n{self.logs_report([i])}")
            try:
                xmlrpc_proxy(node.address, timeout=2.0).surfstore.ping()
            except xmlrpc.client.Fault:
                return True
            except Exception as e:
                if is_connection_error(e):
                    return False
                raise
            return True

        wait_until(
            serving, timeout, 0.1, lambda: f"{node.describe()} never answered\n{self.logs_report([i])}"
        )

    def start_all(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Start every node at once and wait until all of them serve.

        If a node finds its port taken (something grabbed it after
        ``free_ports``), every node is killed, the data directories (which
        hold nothing yet) are removed, and the group starts again on new
        ports with a rewritten config, up to ``attempts`` times.
        """
        for attempt in range(1, attempts + 1):
            for node in self.nodes:
                node.start()
            try:
                for i in range(len(self.nodes)):
                    self.wait_serving(i, timeout)
                return
            except PortCollision:
                if attempt == attempts or self._write_config is None:
                    raise
            self.cleanup()
            shutil.rmtree(self.directory / "data", ignore_errors=True)
            ports = free_ports(len(self.nodes))
            self._configure(self._write_config(ports), ports)

    def kill(self, i: int) -> None:
        self.nodes[i].kill()

    def pause(self, i: int) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing (a GC
        pause or an overloaded host, as peers see it)."""
        self.nodes[i].signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        self.nodes[i].signal(signal.SIGCONT)

    def terminate(self, i: int) -> int | None:
        return self.nodes[i].terminate()

    def running(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.running]

    def cleanup(self) -> None:
        """SIGKILL whatever is left, by pid, and reap it. Never raises for a
        node that already exited."""
        problems = []
        for node in self.nodes:
            try:
                node.kill()
            except Exception as e:  # pragma: no cover - keep killing the others
                problems.append(f"{node.describe()}: {e}")
        if problems:  # pragma: no cover
            raise RuntimeError("; ".join(problems))

    # -- diagnostics ------------------------------------------------------

    def logs_report(self, which: Sequence[int] | None = None, lines: int = LOG_TAIL_LINES) -> str:
        indexes = range(len(self.nodes)) if which is None else which
        parts = []
        for i in indexes:
            node = self.nodes[i]
            parts.append(f"----- {node.describe()}, log {node.log_path} (last {lines} lines) -----")
            parts.append(node.log_tail(lines))
        return "\n".join(parts)

    @contextlib.contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Attach every node's log tail to a failing assertion (and print it
        for an unexpected error), so a CI failure explains itself."""
        try:
            yield
        except NodeExited:
            raise  # carries the logs already
        except AssertionError as e:
            raise FailTest(f"{e}\n\n{self.logs_report()}") from e
        except Exception:
            print(self.logs_report(), file=sys.stderr)
            raise

    # -- clients ----------------------------------------------------------

    def proxy(self, i: int, timeout: float = 10.0) -> xmlrpc.client.ServerProxy:
        return xmlrpc_proxy(self.addresses[i], timeout)

    def native(self, i: int, timeout: float = 10.0) -> NativeClient:
        return NativeClient(self.addresses[i], timeout)

    def is_leader(self, i: int) -> bool | None:
        """Node ``i``'s ``surfstore.isLeader`` (None if it does not answer)."""
        try:
            return bool(self.proxy(i, timeout=2.0).surfstore.isLeader())
        except Exception as e:
            if is_connection_error(e):
                return None
            raise

    def leaders(self, among: Sequence[int] | None = None) -> list[int]:
        """The nodes (of ``among``, default all running) answering isLeader true."""
        indexes = self.running() if among is None else among
        return [i for i in indexes if self.is_leader(i)]

    def wait_for_leader(self, among: Sequence[int], timeout: float = 5.0) -> int:
        """Until exactly one node of ``among`` says it leads; return it."""

        def one() -> int | None:
            found = self.leaders(among)
            return found[0] + 1 if len(found) == 1 else None  # +1: node 0 is falsy

        return wait_until(one, timeout, 0.05, f"no single leader among nodes {list(among)}") - 1
