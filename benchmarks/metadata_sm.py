"""Microseconds per updatefile in the metadata layer, without sockets or Raft.

    .venv/bin/python benchmarks/metadata_sm.py [--baseline REV] [--writes N] [--repeats R]

What is timed (64 writers, each writing its own file with version = seq, so
no conflicts; after 32 writes per writer the dedup windows are full, as in a
long run):

- ``encode_update``: building the Raft command (validating the arguments);
- ``apply follower``: ``MetadataStateMachine.apply`` of commands it did not
  encode (decode + validate + apply), what every follower does;
- ``apply leader``: ``apply`` on the node that encoded the command (the tree
  may remember what it encoded and skip decoding; else as a follower);
- ``apply follower, batches of 64``: the same writes as the batch entries a
  leader proposes when 64 updates reach it in one reactor turn (trees with
  ``encode_batch`` only);
- ``replica 1`` / ``replica 64``: ``MetadataReplica.updatefile`` over a stub
  RaftNode that commits at once (apply + fire the proposal's Deferred), one
  write in flight at a time or 64 proposed before a commit (the simulated
  clock is advanced by 0 before each commit: the end of a reactor turn,
  when a batching tree proposes);
- ``server 64``: what the native server runs per request around that: the
  method table's argument schema, the handler, and turning the result into
  the reply map (the frame encoding is left out: it is rpc.py's).

``--baseline REV`` (default: the commit before this work) runs the same
measurements in a child process against ``git archive REV surfshard raft``,
so before and after come from one run on the same machine load; ``--now
REV`` measures a revision the same way instead of the working tree (which
may hold other people's unfinished changes, e.g. to rpc.py's schemas). Each figure
is the best of ``--repeats`` (the machine is shared: the best is the least
disturbed). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer

ROOT = Path(__file__).resolve().parent.parent
#: The commit before the metadata-layer optimisation.
DEFAULT_BASELINE = "13dad6d"
WRITERS = 64
#: Hashes per write: what benchmarks/_metadata_load.py writes (``--hashes``
#: for bigger files: 1,024 is a 4 MiB file).
HASHES = 4


def workload(writes: int, hashes: int = HASHES) -> list[tuple[str, int, list[str], str, int]]:
    """``(name, version, hashlist, client_id, seq)`` for ``writes`` updates."""
    hashlist = [f"{i:064x}" for i in range(1, hashes + 1)]
    out = []
    for j in range(writes):
        writer, round_ = j % WRITERS, j // WRITERS + 1
        out.append((f"bench/w{writer:02d}/file.bin", round_, list(hashlist), f"{writer:032x}", round_))
    return out


class StubNode:
    """What MetadataReplica uses of a RaftNode: a leader that commits a
    proposal when ``commit`` is called (apply, then fire its Deferred)."""

    node_id = 1
    leader_id = 1
    crashed = False
    is_leader = True
    tracer = None  # no stage timestamps

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.pending: list[tuple[bytes, Any]] = []

    def propose(self, command: bytes, timeout: float | None = None, arrived: float | None = None) -> Any:
        d: Any = defer.Deferred()
        self.pending.append((command, d))
        return d

    def process_now(self) -> None:
        """The end of a reactor turn: nothing to send here."""

    def commit(self) -> None:
        pending, self.pending = self.pending, []
        apply = self.machine.apply
        for command, d in pending:
            d.callback(apply(command))


def best_of(repeats: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeats))


def measure(writes: int, repeats: int, hashes: int = HASHES) -> dict[str, float]:
    """Microseconds per write for each path, in the tree on sys.path."""
    from twisted.internet import task

    from surfshard.metadata import state as metadata_module
    from surfshard.metadata.replica import MetadataReplica
    from surfshard.metadata.service import metadata_methods
    from surfshard.metadata.state import MetadataStateMachine, encode_update

    work = workload(writes, hashes)
    results: dict[str, float] = {}

    def per_write(seconds: float) -> float:
        return seconds / writes * 1e6

    def time_encode() -> float:
        start = time.perf_counter()
        for args in work:
            encode_update(*args)
        return per_write(time.perf_counter() - start)

    results["encode_update"] = best_of(repeats, time_encode)
    commands = [encode_update(*args) for args in work]

    def time_apply(leader: bool) -> float:
        machine = MetadataStateMachine(1)
        apply = machine.apply
        elapsed = 0.0
        # As on a leader: 64 encoded (proposed), then those 64 applied.
        for k in range(0, writes, WRITERS):
            if leader and hasattr(machine, "encode_update"):
                fresh = [machine.encode_update(*args) for args in work[k : k + WRITERS]]
            else:
                fresh = [bytes(c) for c in commands[k : k + WRITERS]]  # not the encoder's objects
            start = time.perf_counter()
            for command in fresh:
                apply(command)
            elapsed += time.perf_counter() - start
        assert machine.version_of(work[-1][0]) == work[-1][1], "the writes did not apply"
        return per_write(elapsed)

    results["apply follower"] = best_of(repeats, lambda: time_apply(False))
    results["apply leader"] = best_of(repeats, lambda: time_apply(True))

    encode_batch = getattr(metadata_module, "encode_batch", None)
    if encode_batch is not None:  # trees that batch a turn's updates into one entry

        def time_apply_batches() -> float:
            machine = MetadataStateMachine(1)
            batches = [encode_batch(commands[k : k + WRITERS]) for k in range(0, writes, WRITERS)]
            start = time.perf_counter()
            for batch in batches:
                machine.apply(batch)
            elapsed = time.perf_counter() - start
            assert machine.version_of(work[-1][0]) == work[-1][1], "the batches did not apply"
            return per_write(elapsed)

        results["apply follower, batches of 64"] = best_of(repeats, time_apply_batches)

    def replica() -> tuple[Any, StubNode, task.Clock]:
        machine = MetadataStateMachine(1)
        node = StubNode(machine)
        clock = task.Clock()
        return MetadataReplica(node, machine, {1: "127.0.0.1:1"}, clock), node, clock

    def time_replica(in_flight: int) -> float:
        rep, node, clock = replica()
        answers: list[int] = []
        update = rep.updatefile
        start = time.perf_counter()
        for k in range(0, writes, in_flight):
            for name, version, hashlist, client_id, seq in work[k : k + in_flight]:
                update(name, version, hashlist, client_id, seq, 30.0).addCallback(answers.append)
            clock.advance(0)  # the end of the reactor turn: a batching tree proposes now
            node.commit()
        elapsed = time.perf_counter() - start
        assert len(answers) == writes and answers[-1] == work[-1][1], "updates did not all succeed"
        return per_write(elapsed)

    results["replica 1 in flight"] = best_of(repeats, lambda: time_replica(1))
    results["replica 64 in flight"] = best_of(repeats, lambda: time_replica(64))

    def time_server(in_flight: int) -> float:
        rep, node, clock = replica()
        method = metadata_methods(rep).get("updatefile")
        assert method is not None
        validate, handler = method.schema.validate, method.handler
        takes_reply = getattr(method, "takes_reply", False)

        def call(kwargs: dict[str, Any]) -> Any:
            if not takes_reply:
                return handler(**kwargs)
            d: Any = defer.Deferred()  # stands in for the server's Reply
            handler(d, **kwargs)
            return d

        replies: list[dict[str, Any]] = []

        def reply(result: Any, request_id: int) -> None:
            replies.append({"id": request_id, "ok": result})

        def error(failure: Any, request_id: int) -> None:
            replies.append({"id": request_id, "error": str(failure.value)})

        requests = [
            {
                "name": name,
                "version": version,
                "hashlist": hashlist,
                "client_id": client_id,
                "seq": seq,
                "timeout": 1.95,
            }
            for name, version, hashlist, client_id, seq in work
        ]
        start = time.perf_counter()
        for k in range(0, writes, in_flight):
            for i in range(k, min(k + in_flight, writes)):
                call(validate(requests[i])).addCallbacks(reply, error, callbackArgs=(i,), errbackArgs=(i,))
            clock.advance(0)
            node.commit()
        elapsed = time.perf_counter() - start
        assert len(replies) == writes and all("ok" in r for r in replies), replies[:3]
        return per_write(elapsed)

    results["server 64 in flight"] = best_of(repeats, lambda: time_server(64))
    return results


def measure_tree(rev: str, writes: int, repeats: int, hashes: int) -> dict[str, float]:
    """Run ``measure`` in a child process on ``git archive rev`` of the packages."""
    with tempfile.TemporaryDirectory(prefix="metadata-sm-") as tree:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "surfshard", "raft"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--tree",
                tree,
                "--writes",
                str(writes),
                "--repeats",
                str(repeats),
                "--hashes",
                str(hashes),
                "--json-only",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baseline", default=DEFAULT_BASELINE, help="git revision to compare with ('' for none)"
    )
    parser.add_argument(
        "--now", default="", help="git revision to measure as 'now' (default: the working tree)"
    )
    parser.add_argument("--writes", type=int, default=64 * 100, help="writes per measurement (default 6400)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="measurements per figure, best taken (default 7)"
    )
    parser.add_argument(
        "--hashes", type=int, default=HASHES, help=f"block hashes per write (default {HASHES})"
    )
    parser.add_argument("--tree", help=argparse.SUPPRESS)  # child: import surfshard from here
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.writes < WRITERS or args.repeats < 1 or args.hashes < 1:
        parser.error(f"need --writes >= {WRITERS}, --repeats >= 1 and --hashes >= 1")
    sys.path.insert(0, args.tree or str(ROOT))
    if args.json_only:
        print(json.dumps(measure(args.writes, args.repeats, args.hashes)))
        return 0
    before = measure_tree(args.baseline, args.writes, args.repeats, args.hashes) if args.baseline else {}
    after = (
        measure_tree(args.now, args.writes, args.repeats, args.hashes)
        if args.now
        else measure(args.writes, args.repeats, args.hashes)
    )
    print(
        f"us per updatefile, best of {args.repeats} x {args.writes} writes"
        f" ({WRITERS} writers, {args.hashes} hashes each)"
    )
    head = f"{'path':<26} {args.now or 'now':>8}"
    if before:
        head += f" {args.baseline:>10} {'speed-up':>9}"
    print(head)
    for key in dict.fromkeys([*before, *after]):
        now = after.get(key)
        line = f"{key:<26} {now:8.2f}" if now is not None else f"{key:<26} {'-':>8}"
        if before:
            then = before.get(key)
            line += f" {then:10.2f}" if then is not None else f" {'-':>10}"
            if then is not None and now is not None:
                line += f" {then / now:8.2f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
