"""Concurrent writers and readers against a real cluster, recording a history
for the linearizability checker (run as a subprocess by
``tests/test_migration_process.py``, so its reactor is its own).

    python tests/migration_load.py --config FILE --seconds S --clients N --files F --out HISTORY.json
        [--stop-file PATH]

Each client is a ``ClusterClient`` (routing by shard map, following moves);
it picks a file, then either writes the next version (compare-and-set) or
reads it, and records invocation and return times (``time.monotonic``) and
the outcome: ``ok``, ``mismatch`` with the current version, ``unknown``
(timed out: may or may not have applied), or the read's value. At the end
one final read of every file is recorded. Bounded: every loop stops at the
deadline, and every call has its own timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task

from client.cluster import ClusterClient
from surfshard import errors
from surfshard.config import load_config


def block(client: str, name: str, version: int) -> str:
    import hashlib

    return hashlib.sha256(f"{client}/{name}/{version}".encode()).hexdigest()


@defer.inlineCallbacks
def main(reactor: Any, options: argparse.Namespace) -> Any:
    cluster = load_config(options.config)
    ops: list[dict[str, Any]] = []
    stop_at = time.monotonic() + options.seconds
    stop_file = options.stop_file
    files = [f"load-{i}" for i in range(options.files)]

    @defer.inlineCallbacks
    def client_loop(k: int) -> Any:
        name = f"client{k}"
        rng = random.Random(f"{options.seed}:{name}")
        c = ClusterClient(cluster, reactor, timeout=options.call_timeout)
        last: dict[str, int] = {}
        try:
            while time.monotonic() < stop_at and not (stop_file and os.path.exists(stop_file)):
                fname = rng.choice(files)
                op: dict[str, Any] = {"client": name, "name": fname, "call": time.monotonic()}
                if rng.random() < 0.7:
                    version = last.get(fname, 0) + 1
                    hashlist = [block(name, fname, version)]
                    op.update(kind="update", args=[version, hashlist])
                    try:
                        yield c.updatefile(fname, version, hashlist)
                        op["result"] = "ok"
                        last[fname] = version
                    except errors.VersionMismatch as e:
                        op["result"], op["current"] = "mismatch", e.current
                        last[fname] = e.current or 0
                    except errors.SurfShardError as e:
                        op["result"], op["error"] = "unknown", str(e)
                else:
                    op.update(kind="get", args=[])
                    try:
                        info = yield c.getfileinfo(fname)
                        op["result"], op["value"] = "value", info
                        last[fname] = info[0]
                    except errors.SurfShardError as e:
                        op["result"], op["error"] = "unknown", str(e)
                op["return"] = time.monotonic()
                ops.append(op)
        finally:
            yield c.close()

    yield defer.gatherResults([client_loop(k) for k in range(options.clients)], consumeErrors=True)
    final = ClusterClient(cluster, reactor, timeout=options.final_timeout)
    for fname in files:
        op = {"client": "final", "name": fname, "kind": "get", "args": [], "call": time.monotonic()}
        info = yield final.getfileinfo(fname)
        op.update(result="value", value=info, **{"return": time.monotonic()})
        ops.append(op)
    yield final.close()
    with open(options.out, "w", encoding="utf-8") as f:
        json.dump(ops, f)
    counts: dict[str, int] = {}
    for op in ops:
        counts[op["result"]] = counts.get(op["result"], 0) + 1
    print(json.dumps(counts), flush=True)


def check_history(ops: list[dict[str, Any]]) -> Any:
    """The linearizability checker's verdict on a history this script
    wrote (``surfshard.testing.linearizability.CheckResult``)."""
    from surfshard.testing.linearizability import GET, UPDATE, HistoryRecorder, Mismatch

    recorder = HistoryRecorder()
    for op in sorted(ops, key=lambda o: o["call"]):
        if op["kind"] == "update":
            version, hashlist = op["args"]
            op_id = recorder.invoke(op["client"], UPDATE, op["name"], (version, hashlist), op["call"])
            if op["result"] == "ok":
                recorder.complete(op_id, True, op["return"])
            elif op["result"] == "mismatch":
                recorder.complete(op_id, Mismatch(op["current"]), op["return"])
            else:
                recorder.unknown(op_id)
        else:
            op_id = recorder.invoke(op["client"], GET, op["name"], (), op["call"])
            if op["result"] == "value":
                version, hashlist = op["value"]
                recorder.complete(op_id, (version, tuple(hashlist)) if version else None, op["return"])
            else:
                recorder.unknown(op_id)
    return recorder.check()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--call-timeout", type=float, default=20.0)
    parser.add_argument("--final-timeout", type=float, default=60.0)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--stop-file", help="also stop the writers once this file exists (--seconds stays the bound)"
    )
    task.react(main, [parser.parse_args()])
