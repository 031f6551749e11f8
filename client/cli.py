"""The ``surfshard`` command: one entry point, a subcommand per job.

Every subcommand takes ``--config`` (default: the built-in local cluster)
and ``--json`` for scripts; errors go to stderr with a non-zero exit status.
Network work runs on the Twisted reactor through ``task.react``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from twisted.internet import defer, task

from surfshard import errors
from surfshard.config import ClusterConfig, ConfigError, NodeKind, default_config_path, load_config, node_name
from surfshard.keyspace import TOMBSTONE

if TYPE_CHECKING:
    from surfshard.replica.leader_caller import LeaderCaller

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Errors are never wrapped: a path or a message split across lines defeats
# grep and the scripts that read them.
err_console = Console(stderr=True, soft_wrap=True)


def console() -> Console:
    """stdout console; wide enough for the status table when piped."""
    c = Console()
    return c if c.is_terminal else Console(width=160)


def _load(args: argparse.Namespace) -> ClusterConfig:
    return load_config(args.config or default_config_path())


def _emit(args: argparse.Namespace, value: Any, human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(value, sort_keys=True, default=str))
    else:
        human()


def _react(body: Callable[[Any], defer.Deferred]) -> int:
    """Run ``body(reactor)`` on the reactor; SurfShard errors become exit 1."""
    outcome: dict[str, int] = {}

    @defer.inlineCallbacks
    def main(reactor: Any):
        try:
            code = yield body(reactor)
        except errors.SurfShardError as e:
            err_console.print(f"[red]error:[/red] {escape(str(e))}")
            code = EXIT_FAILED
        outcome["code"] = EXIT_OK if code is None else code

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code) if isinstance(e.code, int) else EXIT_FAILED
    return outcome.get("code", EXIT_FAILED)


# -- subcommands --------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from client.launcher import run_up

    cluster = _load(args)
    return _react(
        lambda reactor: run_up(reactor, cluster, str(args.config or default_config_path()), args.seconds)
    )


def cmd_status(args: argparse.Namespace) -> int:
    from client.cluster import ClusterClient
    from client.status import cluster_status, status_json, status_table

    cluster = _load(args)

    @defer.inlineCallbacks
    def body(reactor: Any):
        client = ClusterClient(cluster, reactor)
        try:
            rows, removed = yield cluster_status(cluster, client.pool, client.shardmaster)
        finally:
            yield client.close()
        _emit(
            args,
            status_json(rows, removed),
            lambda: console().print(status_table(rows, title=f"cluster {cluster.name}", removed=removed)),
        )
        # A replica taken out of its group is not a failure when it is down.
        down = [node for node, status, _ in rows if status is None and node.address not in removed]
        return EXIT_FAILED if down else EXIT_OK

    return _react(body)


def _with_client(args: argparse.Namespace, call: Callable[[Any], defer.Deferred]) -> int:
    from client.cluster import ClusterClient

    cluster = _load(args)

    @defer.inlineCallbacks
    def body(reactor: Any):
        client = ClusterClient(cluster, reactor, timeout=args.timeout)
        try:
            result = yield call(client)
        finally:
            yield client.close()
        return result

    return _react(body)


def cmd_get(args: argparse.Namespace) -> int:
    if args.output is not None:
        return _download(args)

    @defer.inlineCallbacks
    def call(client: Any):
        version, hashlist = yield client.getfileinfo(args.name)
        _emit(
            args,
            {"name": args.name, "version": version, "hashlist": hashlist},
            lambda: print(f"{args.name}\tversion {version}\t{' '.join(hashlist) or '(no blocks)'}"),
        )
        return EXIT_OK

    return _with_client(args, call)


def _download(args: argparse.Namespace) -> int:
    """``get NAME --output PATH``: the file's content, from its blocks, to
    PATH (into it when it is a folder) whole or not at all, or to stdout
    with ``-``."""
    from client.blocks import BlockClient
    from client.sync import atomic_file

    cluster = _load(args)
    if not cluster.blockstores:
        err_console.print(
            f"[red]error:[/red] {escape(str(cluster.source))} names no block stores (\\[blockstores]): "
            "a file's content cannot be read through it"
        )
        return EXIT_FAILED
    to_stdout = args.output == "-"
    if to_stdout and args.json:
        err_console.print(
            "usage: surfshard get NAME --output -: the content goes to stdout, so --json cannot"
        )
        return EXIT_USAGE
    path = Path(args.output)
    if not to_stdout and path.is_dir():
        path = path / args.name.rsplit("/", 1)[-1]

    @defer.inlineCallbacks
    def call(client: Any):
        version, hashlist = yield client.getfileinfo(args.name)
        if version == 0:
            err_console.print(f"[red]error:[/red] no file {escape(args.name)!r} on the cluster")
            return EXIT_FAILED
        if hashlist == [TOMBSTONE]:
            err_console.print(f"[red]error:[/red] {escape(args.name)!r} was deleted (version {version})")
            return EXIT_FAILED
        blocks = BlockClient(cluster, client.pool)
        try:
            if to_stdout:
                out = sys.stdout.buffer
                size = yield blocks.read_file(hashlist, out.write)
                out.flush()
            else:
                with atomic_file(path) as f:
                    size = yield blocks.read_file(hashlist, f.write)
        except OSError as e:
            where = "stdout" if to_stdout else str(path)
            err_console.print(
                f"[red]error:[/red] cannot write {escape(where)}: {escape(e.strerror or str(e))}"
            )
            return EXIT_FAILED
        _emit(
            args,
            {
                "name": args.name,
                "version": version,
                "bytes": size,
                "output": args.output if to_stdout else str(path),
            },
            lambda: None if to_stdout else print(f"{args.name}\tversion {version}\t{size} bytes to {path}"),
        )
        return EXIT_OK

    return _with_client(args, call)


def cmd_put(args: argparse.Namespace) -> int:
    @defer.inlineCallbacks
    def call(client: Any):
        try:
            version = yield client.updatefile(args.name, args.version, args.hashes)
        except errors.VersionMismatch as e:
            current = e.current
            _emit(
                args,
                {"name": args.name, "ok": False, "current": current},
                lambda: err_console.print(f"version mismatch: {args.name} is at version {current}"),
            )
            return EXIT_FAILED
        _emit(
            args,
            {"name": args.name, "ok": True, "version": version},
            lambda: print(f"{args.name}\tversion {version}"),
        )
        return EXIT_OK

    return _with_client(args, call)


def cmd_ls(args: argparse.Namespace) -> int:
    @defer.inlineCallbacks
    def call(client: Any):
        files = yield client.getfileinfomap()

        def human() -> None:
            for name in sorted(files):
                version, hashlist = files[name]
                state = "deleted" if hashlist == ["0"] else f"{len(hashlist)} blocks"
                print(f"{version}\t{state}\t{name}")

        _emit(args, files, human)
        return EXIT_OK

    return _with_client(args, call)


def cmd_backup(args: argparse.Namespace) -> int:
    from client.backup import take_backup, write_backup

    cluster = _load(args)

    @defer.inlineCallbacks
    def call(client: Any):
        files, cursor = yield take_backup(client)
        path = Path(args.file)
        try:
            write_backup(path, files, cluster=cluster.name, shards=cluster.shards, cursor=cursor)
        except OSError as e:
            err_console.print(f"[red]error:[/red] cannot write {escape(str(path))}: {escape(str(e))}")
            return EXIT_FAILED
        deleted = sum(1 for _v, h in files.values() if h == ["0"])
        value = {"file": str(path), "files": len(files) - deleted, "deleted": deleted, "cursor": cursor}
        _emit(
            args,
            value,
            lambda: print(
                f"{value['files']} files (and {deleted} deletions) backed up to {path}; "
                "their blocks stay on the block stores: `surfshard blocks gc --keep` keeps them"
            ),
        )
        return EXIT_OK

    return _with_client(args, call)


def cmd_versions(args: argparse.Namespace) -> int:
    """A synced folder's earlier versions (``client.sync.Versions``):
    listed, or one put back. Local only: the next sync sends a restored
    file as an edit."""
    from client.sync import DEFAULT_KEEP_VERSIONS_DAYS, VERSIONS_NAME, Versions

    base = Path(args.basedir)
    if not base.is_dir():
        err_console.print(f"[red]error:[/red] {escape(str(base))} is not a folder")
        return EXIT_FAILED
    versions = Versions(base, 0 if args.no_keep else DEFAULT_KEEP_VERSIONS_DAYS, datetime.datetime.now)
    entries = versions.entries(args.name)
    if not args.restore:
        _emit(
            args,
            [{"name": n, "replaced": when.isoformat(), "kept": k} for n, when, k in entries],
            lambda: print(
                "\n".join(f"{n}\t{when:%Y-%m-%d %H:%M:%S}\t{VERSIONS_NAME}/{k}" for n, when, k in entries)
                or f"no earlier versions kept in {base / VERSIONS_NAME}"
            ),
        )
        return EXIT_OK
    if args.name is None:
        err_console.print("usage: surfshard versions BASEDIR NAME --restore [--at YYYYMMDD-HHMMSS]")
        return EXIT_USAGE
    if args.at is not None:
        entries = [e for e in entries if f"{e[1]:%Y%m%d-%H%M%S}" == args.at]
    if not entries:
        at = f" replaced at {args.at}" if args.at else ""
        err_console.print(
            f"[red]error:[/red] no version of {escape(args.name)!r}{at} is kept in {escape(str(base))}"
        )
        return EXIT_FAILED
    name, when, kept = entries[-1]
    try:
        before = versions.restore(name, kept)
    except OSError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e.strerror or e))}; nothing was changed")
        return EXIT_FAILED
    _emit(
        args,
        {"name": name, "restored": kept, "kept": before},
        lambda: print(
            f"{name}: put back as it was before {when:%Y-%m-%d %H:%M:%S}"
            + (f" (what was there is kept as {VERSIONS_NAME}/{before})" if before else "")
            + "; the next sync sends it"
        ),
    )
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from client.backup import BackupError, read_backup, restore
    from client.blocks import BlockClient
    from client.sync import Ignore, IgnorePatternError

    try:
        Ignore(args.only or ())
    except IgnorePatternError as e:
        err_console.print(f"usage: surfshard restore FILE --only PATTERN: {escape(str(e))}")
        return EXIT_USAGE
    cluster = _load(args)
    try:
        header, files = read_backup(Path(args.file))
    except BackupError as e:
        err_console.print(f"[red]error:[/red] {escape(e.message)}; nothing was restored")
        return EXIT_FAILED
    if not cluster.blockstores:
        # A SurfStore-style config: its blocks live on stores it does not name.
        err_console.print(
            f"[yellow]note:[/yellow] {escape(str(cluster.source))} has no \\[blockstores]: "
            "the files' blocks are not checked"
        )
    if header.get("cluster") != cluster.name:
        err_console.print(
            f"[yellow]note:[/yellow] the backup is of cluster {escape(str(header.get('cluster')))!r}, "
            f"restoring into {escape(cluster.name)!r}"
        )

    def unchecked(hashes: list[str]) -> defer.Deferred:
        return defer.succeed((set(hashes), []))

    @defer.inlineCallbacks
    def call(client: Any):
        present = BlockClient(cluster, client.pool).present if cluster.blockstores else unchecked
        report = yield restore(client, present, files, dry_run=args.dry_run, only=args.only)
        _emit(args, report, lambda: _say_restored(report, header))
        failed = report["blocks_missing"] or report["changed_meanwhile"] or report["unreachable"]
        return EXIT_FAILED if failed else EXIT_OK

    return _with_client(args, call)


def _say_restored(report: dict[str, Any], header: dict[str, Any]) -> None:
    verb = "would bring back" if report["dry_run"] else "brought back"
    for name in report["restored"]:
        print(f"{'would restore' if report['dry_run'] else 'restored'}: {name}")
    print(
        f"backup of {header.get('taken')}, {report['chosen']} files looked at: "
        f"{verb} {len(report['restored'])} files, "
        f"{report['unchanged']} unchanged; left as they are: {report['not_in_backup']} files the backup "
        f"does not have, {report['left_deleted']} it has as deleted"
        + (" (dry run: nothing written)" if report["dry_run"] else "")
    )
    for name in report["blocks_missing"]:
        err_console.print(f"[red]not restored[/red] {escape(name)}: some of its blocks are on no block store")
    for name in report["changed_meanwhile"]:
        err_console.print(f"[yellow]not restored[/yellow] {escape(name)}: written by someone else meanwhile")
    for store in report["unreachable"]:
        err_console.print(
            f"[red]not reached:[/red] {escape(store)}: files with blocks only there were left out"
        )


def cmd_chaos(args: argparse.Namespace) -> int:
    from client.chaos import chaos_call, node_label, random_schedule
    from client.cluster import ClusterClient
    from client.status import cluster_nodes, cluster_status, status_json, status_table

    cluster = _load(args)
    if args.action in ("crash", "restore") and not args.target:
        err_console.print(f"usage: surfshard chaos {args.action} HOST:PORT")
        return EXIT_USAGE

    @defer.inlineCallbacks
    def body(reactor: Any):
        client = ClusterClient(cluster, reactor, admin=True)
        say = (lambda line: err_console.print(line)) if args.json else print
        try:
            # The group members now (replicas added or removed since the
            # config was written), not only the config's.
            nodes, gone = yield cluster_nodes(cluster, client.shardmaster)
            known = {n.address: n for n in nodes}
            if args.target and args.target not in known:
                err_console.print(f"[red]error:[/red] {args.target} is not a node of {cluster.source}")
                return EXIT_USAGE
            if args.action == "random":
                seed = args.seed if args.seed is not None else int(reactor.seconds() * 1000) % (2**31)
                members = [n for n in nodes if n.address not in gone]
                actions = yield random_schedule(
                    reactor, cluster, client.pool, args.seconds, seed, say, nodes=members
                )
                value: Any = {"seed": seed, "actions": actions}
            else:
                node = known[args.target]
                yield chaos_call(client.pool, args.target, args.action)
                say(f"{args.action}: {node_label(node)} ({args.target})")
                value = {"action": args.action, "target": args.target}
            rows, removed = yield cluster_status(cluster, client.pool, client.shardmaster)
            value["status"] = status_json(rows, removed)
        finally:
            yield client.close()
        _emit(args, value, lambda: console().print(status_table(rows, title="after chaos", removed=removed)))
        return EXIT_OK

    return _react(body)


def shard_map_table(shard_map: Any) -> Any:
    """Shards grouped into runs with their hash range, owner and its nodes."""
    from rich.table import Table

    from surfshard.keyspace import shard_range

    table = Table(title=f"shard map {shard_map.num} ({shard_map.nshards} shards)")
    for column in ("shards", "hash range", "group", "nodes"):
        table.add_column(column)
    runs: list[tuple[int, int, int]] = []
    for shard, gid in enumerate(shard_map.shards):
        if runs and runs[-1][2] == gid and runs[-1][1] == shard - 1:
            runs[-1] = (runs[-1][0], shard, gid)
        else:
            runs.append((shard, shard, gid))
    for first, last, gid in runs:
        lo = shard_range(first, shard_map.nshards)[0]
        hi = shard_range(last, shard_map.nshards)[1]
        nodes = " ".join(shard_map.groups.get(gid, ())) if gid else "-"
        table.add_row(
            str(first) if first == last else f"{first}-{last}",
            f"{lo:016x}..{hi - 1:016x}",
            str(gid) if gid else "[yellow]unassigned[/yellow]",
            nodes,
        )
    return table


def _member_usage(problem: str) -> int:
    err_console.print(
        "usage: surfshard admin member list GROUP | add GROUP HOST:PORT | remove GROUP ID | lead GROUP ID "
        "(GROUP: a group id, or shardmaster): " + escape(problem)
    )
    return EXIT_USAGE


#: ``member``'s name for the ShardMaster's own replicas.
SHARDMASTER_GROUP = "shardmaster"


def cmd_member(args: argparse.Namespace, cluster: ClusterConfig) -> int:
    """``surfshard admin member list|add|remove GROUP ...``: the membership
    of a metadata group (GROUP its id) or of the ShardMaster (GROUP
    ``shardmaster``), through its leader (``surfshard.replica.membership``)."""
    from client.cluster import ClusterClient
    from surfshard.replica.leader_caller import LeaderCaller

    rest = list(args.params)
    if len(rest) < 2 or rest[0] not in ("list", "add", "remove", "lead"):
        return _member_usage("say list, add, remove or lead, then the group")
    verb = rest[0]
    of_shardmaster = rest[1] == SHARDMASTER_GROUP
    gid = 0
    if of_shardmaster:
        if not cluster.shardmaster:
            return _member_usage(f"{cluster.source} has no [shardmaster]")
    else:
        try:
            gid = int(rest[1])
        except ValueError:
            return _member_usage(f"{rest[1]!r} is not a group id or {SHARDMASTER_GROUP}")
        if gid not in cluster.groups:
            return _member_usage(f"{cluster.source} has no group {gid} (groups: {sorted(cluster.groups)})")
    what = "the ShardMaster" if of_shardmaster else f"group {gid}"
    label = "ShardMaster" if of_shardmaster else f"group {gid}"
    if verb == "list" and len(rest) != 2:
        return _member_usage("list takes only the group")
    if verb == "add":
        if len(rest) != 3:
            return _member_usage("add takes the group and the new node's HOST:PORT")
        from surfshard.config import parse_address

        try:
            parse_address(rest[2])
        except ValueError as e:
            return _member_usage(str(e))
    if verb in ("remove", "lead"):
        if len(rest) != 3 or not rest[2].isdigit() or not 1 <= int(rest[2]) <= 1 << 16:
            return _member_usage(f"{verb} takes the group and the node's id (see member list)")

    @defer.inlineCallbacks
    def body(reactor: Any):
        client = ClusterClient(cluster, reactor, timeout=args.timeout, admin=verb != "list")
        try:
            if of_shardmaster:
                # The client's own: it finds replicas added since the config
                # through the NOT_LEADER answers of the listed ones.
                caller = client.shardmaster.caller
            else:
                # Where the group is: the ShardMaster's list (it follows the
                # membership) and the config's.
                addresses = list(cluster.groups[gid])
                if cluster.shardmaster:
                    try:
                        shard_map = yield client.shardmaster.query(-1)
                        addresses = [*shard_map.groups.get(gid, ()), *addresses]
                    except errors.SurfShardError:
                        pass
                caller = LeaderCaller(
                    client.pool, list(dict.fromkeys(addresses)), reactor, timeout=args.timeout
                )
            if verb == "add":
                result = yield caller.call("member_add", {"address": rest[2]}, timeout=args.timeout)
            elif verb == "remove":
                result = yield caller.call("member_remove", {"node": int(rest[2])}, timeout=args.timeout)
            elif verb == "lead":
                result = yield _hand_over(reactor, caller, int(rest[2]), args.timeout, what)
            else:
                result = None
            listing = yield caller.call("members", {}, timeout=args.timeout)
            leader = listing.get("leader_address")
            if "match" not in listing and leader:
                # The leader's answer also says how far each log is.
                try:
                    listing = yield client.pool.call(leader, "members", {}, timeout=args.timeout)
                except errors.SurfShardError:
                    pass
        finally:
            yield client.close()

        def human() -> None:
            out = console()
            if verb == "add":
                node_id = result["id"]
                if result["added"]:
                    out.print(f"added node {node_id} to {what} as a learner at {rest[2]}")
                else:
                    out.print(f"{rest[2]} is already node {node_id} of {what}")
                config = f" --config {args.config}" if args.config else ""
                name = node_name(NodeKind.SHARDMASTER if of_shardmaster else NodeKind.GROUP, gid, node_id - 1)
                if cluster.tls is not None:
                    out.print(
                        "with TLS on, give it a certificate first:\n"
                        f"  surfshard certs{config} --out {cluster.tls.cert_dir} "
                        f"--node {name} --address {rest[2]}"
                    )
                plugin = f"shardmaster{config}" if of_shardmaster else f"surfshard{config} --group {gid}"
                out.print(
                    "start it (it catches up, then the leader makes it a voter):\n"
                    f"  twistd -n {plugin} --node {node_id - 1} --address {rest[2]}"
                )
            elif verb == "remove":
                node_id = result["id"]
                said = "removed node" if result["removed"] else "no longer a member:"
                out.print(f"{said} {node_id} of {what}; stop its process")
            elif verb == "lead":
                out.print(f"node {result['leader']} leads {what} now ({result['address']})")
            out.print(members_table(label, listing))

        _emit(args, {"result": result, "members": listing}, human)
        return EXIT_OK

    return _react(body)


#: How often ``member lead`` asks whether the new leader has taken over.
LEAD_POLL = 0.1
#: How long ``member lead`` waits for the new leader: a transfer that has
#: not finished within an election timeout (at most a few seconds) is
#: dropped by the leader, and asking again would hold writes up again.
LEAD_WAIT = 5.0


@defer.inlineCallbacks
def _hand_over(reactor: Any, caller: LeaderCaller, to: int, timeout: float, what: str):
    """Ask the leader to hand leadership to node ``to`` (Raft's leadership
    transfer, as etcd's ``move-leader``), once, then wait until it leads:
    ``{"leader": to, "address": ...}``; Timeout if it has not taken over in
    time (a node that is down, say: the leader then drops the transfer and
    goes on leading)."""
    yield caller.call("transfer_leadership", {"to": to}, timeout=timeout)
    deadline = reactor.seconds() + min(timeout, LEAD_WAIT)
    while True:  # bounded by the deadline
        listing = yield caller.call("members", {}, timeout=max(0.1, deadline - reactor.seconds()))
        if listing.get("leader") == to:
            return {"leader": to, "address": listing.get("leader_address")}
        if reactor.seconds() >= deadline:
            raise errors.Timeout(
                f"node {to} of {what} did not take over (is it up and caught up?); "
                f"node {listing.get('leader')} still leads"
            )
        yield task.deferLater(reactor, LEAD_POLL, lambda: None)


def members_table(what: str, listing: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{what} members" + (" (a change is in progress)" if listing.get("pending") else ""))
    for column in ("id", "address", "role", "log"):
        table.add_column(column)
    match = listing.get("match") or {}
    last = listing.get("last_index")
    for role in ("voters", "learners"):
        for m in listing.get(role, []):
            i = m["id"]
            role_name = "leader" if i == listing.get("leader") else role[:-1]
            caught = match.get(str(i))
            log = f"{caught}/{last}" if caught is not None and last is not None else "-"
            table.add_row(str(i), str(m.get("address") or "?"), role_name, log)
    return table


def cmd_admin(args: argparse.Namespace) -> int:
    from client.cluster import ClusterClient

    cluster = _load(args)
    if args.action == "member":
        return cmd_member(args, cluster)
    if not cluster.shardmaster:
        err_console.print(
            f"[red]error:[/red] {escape(str(cluster.source))} has no \\[shardmaster]: it is a static cluster"
        )
        return EXIT_USAGE
    action, rest = args.action, args.params
    try:
        if action in ("show",):
            if rest:
                raise ValueError("show takes no arguments")
        elif action == "query":
            if len(rest) > 1:
                raise ValueError("query takes at most one map number")
            num = int(rest[0]) if rest else -1
        elif action == "join":
            if not rest:
                raise ValueError("join needs GID [HOST:PORT...]")
            gid = int(rest[0])
            addresses = rest[1:] or list(cluster.groups.get(gid, ()))
            if not addresses:
                raise ValueError(f"group {gid} is not in the config: name its replicas (HOST:PORT...)")
            groups = {gid: addresses}
        elif action == "leave":
            if not rest:
                raise ValueError("leave needs at least one GID")
            gids = [int(g) for g in rest]
        elif action == "move":
            if len(rest) != 2:
                raise ValueError("move needs SHARD GID")
            shard, gid = int(rest[0]), int(rest[1])
    except ValueError as e:
        err_console.print(f"usage: surfshard admin {action} ...: {escape(str(e))}")
        return EXIT_USAGE

    @defer.inlineCallbacks
    def body(reactor: Any):
        client = ClusterClient(cluster, reactor, timeout=args.timeout, admin=action not in ("show", "query"))
        sm = client.shardmaster
        try:
            if action == "show":
                shard_map = yield sm.query(-1)
            elif action == "query":
                shard_map = yield sm.query(num)
            else:
                if action == "join":
                    new_num = yield sm.join(groups)
                elif action == "leave":
                    new_num = yield sm.leave(gids)
                else:
                    new_num = yield sm.move(shard, gid)
                shard_map = yield sm.query(new_num)
            group_rows: list[Any] = []
            if action == "show" and not args.json:
                from client.status import collect_status

                group_rows = yield collect_status(
                    cluster, client.pool, [n for n in cluster.all_nodes() if n.kind == NodeKind.GROUP]
                )
        finally:
            yield client.close()

        def human() -> None:
            console().print(shard_map_table(shard_map))
            if group_rows:
                from client.status import group_moves_table

                console().print(group_moves_table(group_rows))

        _emit(args, shard_map.to_wire(), human)
        return EXIT_OK

    return _react(body)


def cmd_certs(args: argparse.Namespace) -> int:
    from client.cluster import ADMIN_CERT_NAME, CLIENT_CERT_NAME
    from surfshard.config import parse_address
    from surfshard.net.tls import generate_dev_pki
    from surfshard.replica.access import ADMIN, CLIENT, NODE, node_of

    cluster = _load(args)
    names: dict[str, str] = {}
    if args.node:
        # One node added to a running group or to the ShardMaster: its
        # certificate only, from the CA already in --out (the others stay).
        found = node_of(cluster, args.node)
        if found is None or found[0] is NodeKind.BLOCKSTORE or not args.address:
            err_console.print(
                "usage: surfshard certs --node group-GID-INDEX|shardmaster-INDEX --address HOST:PORT: "
                f"a node of one of the groups {sorted(cluster.groups)}"
                + (" or of the ShardMaster" if cluster.shardmaster else "")
                + ", with its address"
            )
            return EXIT_USAGE
        if not (Path(args.out) / "ca.key").exists():
            err_console.print(
                f"[red]error:[/red] no CA in {escape(args.out)}: run surfshard certs without --node first"
            )
            return EXIT_FAILED
        names[args.node] = parse_address(args.address)[0]
        roles = {args.node: NODE}
    else:
        for node in cluster.all_nodes():
            names[node_name(node.kind, node.gid, node.index)] = parse_address(node.address)[0]
        roles = {**dict.fromkeys(names, NODE), CLIENT_CERT_NAME: CLIENT, ADMIN_CERT_NAME: ADMIN}
    out = generate_dev_pki(args.out, list(roles), {n: h for n, h in names.items()}, roles=roles)
    _emit(
        args,
        {name: {"ca": f.ca, "cert": f.cert, "key": f.key} for name, f in out.items()},
        lambda: print(
            f"wrote a development CA and {len(out)} certificate{'' if len(out) == 1 else 's'} to {args.out}\n"
            f'enable TLS with:\n\n[tls]\nca = "{args.out}/ca.pem"\ncert_dir = "{args.out}"'
        ),
    )
    return EXIT_OK


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_sync(args: argparse.Namespace) -> int:
    from client.sync import (
        DEFAULT_KEEP_VERSIONS_DAYS,
        MAX_KEEP_VERSIONS_DAYS,
        IndexFileError,
        TerminalProgress,
        summary,
        sync_folder,
    )
    from client.watch import watch

    if args.dry_run and args.watch:
        err_console.print("usage: surfshard sync: --dry-run plans one sync; it does not go with --watch")
        return EXIT_USAGE
    if args.keep_versions is None:
        args.keep_versions = DEFAULT_KEEP_VERSIONS_DAYS
    if not (math.isfinite(args.keep_versions) and 0 <= args.keep_versions <= MAX_KEEP_VERSIONS_DAYS):
        err_console.print(
            f"usage: surfshard sync --keep-versions DAYS: 0 (keep none) to {MAX_KEEP_VERSIONS_DAYS:.0f}"
        )
        return EXIT_USAGE
    cluster = _load(args)
    options: dict[str, Any] = {"block_size": args.block_size, "keep_versions_days": args.keep_versions}
    try:
        if args.watch:
            # A service manager stops a watch with SIGTERM: the same clean
            # end as Ctrl-C (a sync cut short is finished by the next one).
            previous = signal.signal(signal.SIGTERM, _interrupt)
            try:
                watch(args.basedir, cluster, args.watch, **options)
            except KeyboardInterrupt:
                pass  # the way a watch ends: whatever it had synced stays synced
            finally:
                signal.signal(signal.SIGTERM, previous)
            return EXIT_OK
        progress = TerminalProgress() if sys.stderr.isatty() and not args.json else None
        try:
            result = sync_folder(args.basedir, cluster, progress=progress, dry_run=args.dry_run, **options)
        finally:
            if progress is not None:
                progress.close()
    except IndexFileError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}; nothing in the folder was changed")
        return EXIT_FAILED
    except errors.SurfShardError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    for name, why in sorted(result.skipped.items()):
        err_console.print(f"[yellow]skipped[/yellow] {escape(name)}: {why}")
    for name in result.conflicts:
        if result.dry_run:
            err_console.print(
                f"[yellow]conflict:[/yellow] your edit of {escape(name)} would be kept as a copy"
            )
        else:
            err_console.print(f"[yellow]conflict:[/yellow] your edit is kept as {escape(name)}")
    if result.dry_run and not args.json:
        for what, names in (
            ("send", result.uploaded),
            ("fetch", result.downloaded),
            ("delete here", result.deleted_local),
            ("delete there", result.deleted_remote),
        ):
            for name in names:
                print(f"would {what}: {name}")
    for name, why in sorted(result.incomplete.items()):
        err_console.print(f"[red]not synced[/red] {escape(name)}: {why}; the next sync tries again")
    _emit(args, result.to_json(), lambda: print(summary(result)))
    return EXIT_FAILED if result.incomplete else EXIT_OK


def cmd_blocks(args: argparse.Namespace) -> int:
    from client.blocks import DEFAULT_GC_GRACE, BlockClient
    from client.cluster import ClusterClient
    from surfshard.blocks.store import MAX_GC_GRACE

    cluster = _load(args)
    if not cluster.blockstores:
        err_console.print(f"[red]error:[/red] {escape(str(cluster.source))} has no \\[blockstores]")
        return EXIT_USAGE

    grace = DEFAULT_GC_GRACE if args.grace is None else args.grace
    keep: frozenset[str] = frozenset()
    if args.keep and args.action != "gc":
        err_console.print("usage: --keep BACKUP goes with surfshard blocks gc")
        return EXIT_USAGE
    for backup in args.keep or ():
        from client.backup import BackupError, read_backup

        try:
            _header, kept = read_backup(Path(backup))
        except BackupError as e:
            err_console.print(f"[red]error:[/red] {escape(e.message)}; nothing was collected")
            return EXIT_FAILED
        keep = keep.union(h for _v, hashes in kept.values() if hashes != ["0"] for h in hashes)
    if args.action == "scrub" and args.hashes:
        err_console.print("usage: surfshard blocks scrub")
        return EXIT_USAGE
    if args.action == "gc" and (args.hashes or not 0 <= grace <= MAX_GC_GRACE):
        err_console.print(
            f"usage: surfshard blocks gc [--grace SECONDS] [--dry-run] (SECONDS from 0 to {MAX_GC_GRACE:.0f}, a week)"
        )
        return EXIT_USAGE

    @defer.inlineCallbacks
    def body(reactor: Any):
        # Dropping or reading back every block is an operator's call (with
        # TLS: the admin certificate).
        client = ClusterClient(cluster, reactor, admin=args.action in ("gc", "scrub"))
        value: Any
        try:
            blocks = BlockClient(cluster, client.pool)
            if args.action == "where":
                try:
                    value = blocks.where(args.hashes)
                except errors.BadRequest as e:
                    err_console.print(f"usage: surfshard blocks where HASH...: {escape(e.message)}")
                    return EXIT_USAGE
            elif args.action == "gc":
                value = yield blocks.collect(client.getfileinfomap, grace, args.dry_run, keep)
            elif args.action == "scrub":
                value = yield blocks.scrub()
            else:
                value = yield blocks.repair()
        finally:
            yield client.close()
        if args.action == "where":
            _emit(args, value, lambda: print(json.dumps(value, indent=1)))
            return EXIT_OK
        if args.action == "gc":
            _emit(args, value, lambda: _say_collected(value))
            return EXIT_FAILED if value["unreachable"] else EXIT_OK
        if args.action == "scrub":
            _emit(args, value, lambda: _say_scrubbed(value))
            return (
                EXIT_FAILED
                if value["unreachable"] or value["repair"]["unreadable"] or value["lost"]
                else EXIT_OK
            )
        _emit(args, value, lambda: _say_repaired(value))
        # Not done while a store could not be reached or a block not read.
        return EXIT_FAILED if value["unreachable"] or value["unreadable"] else EXIT_OK

    return _react(body)


def _say_collected(report: dict[str, Any]) -> None:
    grace = report["grace"]
    span = f"{grace:g} s" if grace < 3600 else f"{grace / 3600:g} h"
    print(
        f"{report['files']} files"
        + (
            f" and the backups given ({report['kept_for_backups']} blocks)"
            if report["kept_for_backups"]
            else ""
        )
        + f" name {report['named']} blocks; a block written or asked for "
        f"in the {span} before this run is kept even if no file names it"
        + (" (dry run: nothing dropped)" if report["dry_run"] else "")
    )
    for store, row in report["stores"].items():
        line = (
            f"  {store}: {row['held']} blocks, {row['unnamed']} named by no file: "
            f"{row['removed']} {'to drop' if report['dry_run'] else 'dropped'}, {row['kept']} kept as recent"
        )
        if "freed" in row:
            line += f"; {row['packs']} pack(s) rewritten, {row['freed']:,} bytes freed"
        print(line)
        if row["restarted"]:
            print(
                f"    {store} started within the grace period: it keeps every block until it has run that long"
            )
    for store in report["unreachable"]:
        err_console.print(
            f"[red]not reached:[/red] {escape(store)}: its blocks stay; run the gc again once it is up"
        )


def _say_scrubbed(report: dict[str, Any]) -> None:
    for store, row in report["stores"].items():
        bad = len(row["corrupt"])
        print(f"{store}: {row['checked']} blocks read back, {bad} corrupt" + (" (dropped)" if bad else ""))
    _say_repaired(report["repair"])
    for block in report["lost"]:
        err_console.print(f"[red]lost:[/red] block {block}: every copy was corrupt")


def _say_repaired(report: dict[str, Any]) -> None:
    print(f"{report['blocks']} blocks found on the block stores, {report['copied']} copies put back")
    for store in report["unreachable"]:
        err_console.print(
            f"[red]not reached:[/red] {escape(store)}: run `surfshard blocks repair` again once it is up"
        )
    if report["unreadable"]:
        err_console.print(
            f"[red]{report['unreadable']} copies not made:[/red] no block store that answers has the block"
        )


# -- parser -------------------------------------------------------------------


def _version() -> str:
    """The installed distribution's version (what a bug report should name)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("surfshard")
    except PackageNotFoundError:
        return "(not installed: running from a source tree)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surfshard", description="SurfShard: sharded, fault-tolerant SurfStore metadata"
    )
    parser.add_argument("--version", action="version", version=f"surfshard {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="cluster config (default: the built-in local cluster)")
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        p.set_defaults(func=func)
        return p

    p = command("up", cmd_up, "start every node of the config locally, show state; Ctrl-C stops all")
    p.add_argument("--seconds", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    command("status", cmd_status, "each node: role, term, leader, commit/applied index, shards served")
    for name, func, help in (
        ("get", cmd_get, "getfileinfo NAME, routed by filename"),
        ("put", cmd_put, "updatefile NAME VERSION HASH..., routed by filename"),
        ("ls", cmd_ls, "getfileinfomap over all shards"),
    ):
        p = command(name, func, help)
        p.add_argument(
            "--timeout", type=float, default=30.0, help="give up after this many seconds (default 30)"
        )
        if name in ("get", "put"):
            p.add_argument("name", metavar="NAME")
        if name == "get":
            p.add_argument(
                "-o",
                "--output",
                metavar="PATH",
                help="write the file's content to PATH (a file, or a folder to put it in; - for stdout)",
            )
        if name == "put":
            p.add_argument("version", metavar="VERSION", type=int)
            p.add_argument("hashes", metavar="HASH", nargs="*", help='block hashes; "0" alone deletes')
    p = command("chaos", cmd_chaos, "crash or restore nodes (ChaosMonkey); needs chaos enabled on the nodes")
    p.add_argument("action", choices=["crash", "restore", "random"])
    p.add_argument("target", nargs="?", metavar="HOST:PORT")
    p.add_argument("--seconds", type=float, default=30.0, help="random: how long to run (default 30)")
    p.add_argument("--seed", type=int, help="random: schedule seed (printed, for replay)")
    p = command(
        "admin",
        cmd_admin,
        "ShardMaster: show | query [NUM] | join GID [HOST:PORT...] (default: the config's replicas of GID) | "
        "leave GID... | move SHARD GID; "
        "replicas of a group or the ShardMaster: member list GROUP | member add GROUP HOST:PORT | "
        "member remove GROUP ID | member lead GROUP ID (hand leadership over; GROUP: a group id, "
        "or shardmaster)",
    )
    p.add_argument("action", choices=["show", "query", "join", "leave", "move", "member"])
    p.add_argument("params", nargs="*", metavar="ARG")
    p.add_argument("--timeout", type=float, default=30.0, help="give up after this many seconds (default 30)")
    p = command("sync", cmd_sync, "sync a folder with the cluster (SurfStore's client; index.txt in it)")
    p.add_argument("basedir", metavar="BASEDIR")
    p.add_argument("--block-size", type=int, default=4096, help="bytes per block (default 4096)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="sync again every SECONDS until Ctrl-C")
    p.add_argument(
        "--dry-run", action="store_true", help="say what a sync would send, fetch and delete; change nothing"
    )
    p.add_argument(
        "--keep-versions",
        type=float,
        metavar="DAYS",
        # None: client.sync's default, read when a sync runs (importing it
        # here would cost every command its start-up).
        help="keep a file this sync replaces or deletes (a change made elsewhere) in .surfshard-versions "
        "for DAYS days (default 30; 0 keeps none)",
    )
    p = command(
        "blocks",
        cmd_blocks,
        "block stores: where HASH... (GetBlockStoreMap) | repair (copy blocks back) | "
        "scrub (read every block back, drop bad copies, repair) | gc (drop blocks no file names)",
    )
    p.add_argument("action", choices=["where", "repair", "scrub", "gc"])
    p.add_argument("hashes", nargs="*", metavar="HASH")
    p.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="gc: keep blocks written or asked for this recently (default one day: uploads in progress)",
    )
    p.add_argument("--dry-run", action="store_true", help="gc: report, drop nothing")
    p.add_argument(
        "--keep",
        action="append",
        metavar="BACKUP",
        help="gc: also keep the blocks this backup (surfshard backup) names; may be given again",
    )
    p = command(
        "versions",
        cmd_versions,
        "a synced folder's earlier versions (what syncs replaced or deleted): list them, or put one back",
    )
    p.add_argument("basedir", metavar="BASEDIR")
    p.add_argument("name", metavar="NAME", nargs="?", help="only this file's versions")
    p.add_argument("--restore", action="store_true", help="put NAME's newest kept version (or --at's) back")
    p.add_argument(
        "--at", metavar="YYYYMMDD-HHMMSS", help="with --restore: the version replaced at that time"
    )
    p.add_argument(
        "--no-keep", action="store_true", help="with --restore: do not keep what is there now as a version"
    )
    p = command("backup", cmd_backup, "write every file's name, version and blocks to FILE (JSON Lines)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    p = command(
        "restore",
        cmd_restore,
        "bring back the files of a backup the cluster no longer has (as new versions; never deletes)",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--dry-run", action="store_true", help="say what would be brought back; write nothing")
    p.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="only files this pattern matches (.gitignore rules: photos/, *.jpg); may be given again",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    p = command("certs", cmd_certs, "generate a development CA and a certificate per node and client")
    p.add_argument("--out", required=True, help="directory for ca.pem and NAME.pem/NAME.key")
    p.add_argument(
        "--node",
        help="only a certificate for this node added to a running group or to the ShardMaster "
        "(group-GID-INDEX or shardmaster-INDEX)",
    )
    p.add_argument("--address", help="with --node: the node's HOST:PORT")
    return parser


def options_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the subcommand's options moved before its positional
    arguments, so ``surfshard admin move 0 2 --config F`` and ``surfshard
    admin move --config F 0 2`` both work (argparse cannot take options
    between the positionals of a subcommand whose last one takes several)."""
    if not argv or argv[0].startswith("-"):
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparser = sub.choices.get(argv[0])
    if subparser is None:
        return argv
    takes_value = {
        flag for action in subparser._actions if action.nargs != 0 for flag in action.option_strings
    }
    options: list[str] = []
    positionals: list[str] = []
    rest = iter(argv[1:])
    for token in rest:
        if token == "--":
            positionals.extend(rest)
            break
        if token.startswith("-") and len(token) > 1 and not token[1:].isdigit():
            options.append(token)
            if token in takes_value:  # "--config F": the value goes with it
                value = next(rest, None)
                if value is not None:
                    options.append(value)
        else:
            positionals.append(token)
    return [argv[0], *options, *positionals]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(options_first(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.func(args)
    except ConfigError as e:
        err_console.print(f"[red]config error:[/red] {escape(str(e))}")
        return EXIT_USAGE
    except OSError as e:
        err_console.print(f"[red]error:[/red] {escape(str(e))}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
