"""``surfshard up``: every node of a config as local processes.

Each node runs as its own ``twistd`` process (exactly what an operator would
run on separate machines), logging to ``<data_dir>/logs/<node>.log``. The
launcher shows the cluster's state as it changes and, on Ctrl-C (or when
``--seconds`` runs out), stops the processes it started, by pid: SIGTERM,
then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.failure import Failure

from client.cluster import ClusterClient
from client.shardmaster_client import ShardMasterClient
from client.status import STATUS_TIMEOUT, cluster_nodes, collect_status, status_table
from surfshard import errors
from surfshard.config import ClusterConfig, NodeKind, NodeRef, node_name

#: Which twistd plugin runs each kind of node, and its arguments.
PLUGINS = {NodeKind.GROUP: "surfshard", NodeKind.SHARDMASTER: "shardmaster", NodeKind.BLOCKSTORE: "surfblock"}

STOP_GRACE = 10.0


def available_plugins() -> set[str]:
    from twisted.application.service import IServiceMaker

    return {p.tapname for p in getPlugins(IServiceMaker)}


def twistd_command() -> list[str]:
    """How to run twistd with this interpreter (works inside any venv)."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def node_argv(config_path: str, node: NodeRef, log_file: Path) -> list[str]:
    argv = [*twistd_command(), "--nodaemon", "--pidfile=", f"--logfile={log_file}", PLUGINS[node.kind]]
    argv += ["--config", config_path]
    if node.kind is NodeKind.GROUP:
        argv += ["--group", str(node.gid)]
    argv += ["--node", str(node.index)]
    return argv


class NodeProcess(protocol.ProcessProtocol):
    transport: Any  # an IProcessTransport once spawned (Twisted types it Optional)
    """One child process; ``ended`` fires with its exit status."""

    def __init__(self, node: NodeRef) -> None:
        self.node = node
        self.ended: defer.Deferred = defer.Deferred()
        self.exit: Any = None

    def processEnded(self, reason: Failure) -> None:
        self.exit = reason.value
        self.ended.callback(reason.value)


class Launcher:
    """Starts, watches and stops a local cluster."""

    log = Logger()

    def __init__(
        self, cluster: ClusterConfig, config_path: str, reactor: Any, console: Console | None = None
    ) -> None:
        self.cluster = cluster
        self.config_path = os.path.abspath(config_path)
        self.reactor = reactor
        self.console = console or _console()
        self.children: dict[str, NodeProcess] = {}
        self.client = ClusterClient(cluster, reactor, timeout=10.0, admin=True)
        #: For the status display's look at the membership, on the same
        #: connections with a short timeout: a ShardMaster still electing
        #: must not hold the display up for long.
        self._members: ShardMasterClient | None = (
            ShardMasterClient(self.client.pool, cluster.shardmaster, reactor, timeout=STATUS_TIMEOUT)
            if cluster.shardmaster and not cluster.static
            else None
        )
        self._last_view: Any = None
        self.log_dir = Path(cluster.data_dir) / "logs"

    def start(self) -> None:
        plugins = available_plugins()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.cluster.tls is None:
            self.console.print(
                "[yellow]TLS is off: every node trusts whoever reaches its port (any client can make Raft, "
                "admin and chaos calls). To turn it on:\n"
                f"  surfshard certs --config {self.config_path} --out certs\n"
                '  then add  [tls] ca = "certs/ca.pem"  cert_dir = "certs"  to the config '
                "(configs/local-tls.toml is the local cluster with TLS on)[/yellow]"
            )
        for node in self.cluster.all_nodes():
            plugin = PLUGINS[node.kind]
            name = node_name(node.kind, node.gid, node.index)
            if plugin not in plugins:
                self.console.print(
                    f"[yellow]skipping {name}: no '{plugin}' twistd plugin in this version[/yellow]"
                )
                continue
            child = NodeProcess(node)
            log_file = self.log_dir / f"{name}.log"
            argv = node_argv(self.config_path, node, log_file)
            self.reactor.spawnProcess(
                child, argv[0], argv, env=os.environ.copy(), childFDs={0: "w", 1: 1, 2: 2}
            )
            self.children[name] = child
            child.ended.addCallback(self._ended, name)
            self.console.print(
                f"started {name} on {node.address} (pid {child.transport.pid}, log {log_file})"
            )

    def _ended(self, reason: Any, name: str) -> None:
        code = getattr(reason, "exitCode", None)
        sig = getattr(reason, "signal", None)
        if not self._stopping:
            self.console.print(
                f"[red]{name} exited (code {code}, signal {sig}); see {self.log_dir / (name + '.log')}[/red]"
            )

    _stopping = False

    @defer.inlineCallbacks
    def show_status(self):
        started = [c.node for c in self.children.values()]
        nodes, removed = list(started), frozenset[str]()
        if self._members is not None:
            # Replicas added since the config (started by hand, as ``member
            # add`` prints) are shown too, and the config's removed ones as such.
            members, removed = yield cluster_nodes(self.cluster, self._members)
            configured = {ref.address for ref in self.cluster.all_nodes()}
            nodes += [ref for ref in members if ref.address not in configured]
        rows = yield collect_status(self.cluster, self.client.pool, nodes)
        view = [
            (
                n.address,
                s.get("role") if s else e,
                s.get("term") if s else None,
                s.get("crashed") if s else None,
                n.address in removed,
            )
            for n, s, e in rows
        ]
        if view != self._last_view:
            self._last_view = view
            self.console.print(status_table(rows, title=f"cluster {self.cluster.name}", removed=removed))

    @defer.inlineCallbacks
    def join_groups(self, deadline: float = 60.0):
        """On a fresh cluster, join every group of the config to the
        ShardMaster in one step, so their shards are assigned at once."""
        if self.cluster.static or not self.cluster.shardmaster:
            return None
        if not any(c.node.kind is NodeKind.SHARDMASTER for c in self.children.values()):
            return None
        sm = self.client.shardmaster
        end = self.reactor.seconds() + deadline
        while True:
            try:
                latest = yield sm.query(-1)
                break
            except errors.SurfShardError as e:
                if self.reactor.seconds() > end:
                    self.console.print(f"[red]shard master did not answer: {e}[/red]")
                    return None
        if latest.groups:
            self.console.print(f"shard map {latest.num} already has groups {sorted(latest.groups)}")
            return latest
        groups = {gid: list(addresses) for gid, addresses in sorted(self.cluster.groups.items())}
        num = yield sm.join(groups)
        self.console.print(f"joined groups {sorted(groups)}: shard map {num}")
        return num

    @defer.inlineCallbacks
    def stop(self):
        """SIGTERM every child we started, SIGKILL what is left after the grace period."""
        self._stopping = True
        alive = [c for c in self.children.values() if c.exit is None]
        for child in alive:
            try:
                child.transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                pass
        ended = defer.DeferredList([c.ended for c in alive], consumeErrors=True)
        timer = self.reactor.callLater(STOP_GRACE, lambda: [_kill(c) for c in alive if c.exit is None])
        yield ended
        if timer.active():
            timer.cancel()
        yield self.client.close()
        self.console.print(f"stopped {len(alive)} node(s)")


def _console() -> Console:
    c = Console()
    return c if c.is_terminal else Console(width=160)


def _kill(child: NodeProcess) -> None:
    try:
        child.transport.signalProcess("KILL")
    except error.ProcessExitedAlready:
        pass


def run_up(
    reactor: Any, cluster: ClusterConfig, config_path: str, seconds: float | None, interval: float = 2.0
):
    """The body of ``surfshard up`` (for ``task.react``)."""
    launcher = Launcher(cluster, config_path, reactor)
    launcher.start()
    if not launcher.children:
        launcher.console.print("[red]nothing to start[/red]")
        return defer.succeed(1)
    #: Fires with the exit status once every node has stopped.
    done: defer.Deferred = defer.Deferred()
    stopping: list[defer.Deferred] = []

    def stop_nodes() -> defer.Deferred:
        """Stop every node, once; then ``done`` fires with 0."""
        if not stopping:
            if poll.running:
                poll.stop()
            stopped = launcher.stop()
            stopped.addCallbacks(lambda _: done.callback(0), done.errback)
            stopping.append(stopped)
        return stopping[0]

    # Ctrl-C and SIGTERM stop the reactor: its own handlers take both
    # signals. (They are installed when it starts running, after this
    # function; a SIGTERM handler set here was replaced, and a SIGTERM left
    # every node running.) Whatever stops the reactor, the nodes stop first:
    # it waits for a "before shutdown" trigger's Deferred.
    reactor.addSystemEventTrigger("before", "shutdown", stop_nodes)
    poll = task.LoopingCall(launcher.show_status)
    poll.clock = reactor
    poll.start(interval, now=False).addErrback(
        lambda f: launcher.console.print(f"status poll failed: {f.value}")
    )
    if seconds is not None:
        reactor.callLater(seconds, stop_nodes)
    launcher.console.print("[bold]Ctrl-C stops every node[/bold]")
    launcher.join_groups().addErrback(
        lambda f: launcher.console.print(f"[red]joining groups failed: {f.value}[/red]")
    )
    return done
