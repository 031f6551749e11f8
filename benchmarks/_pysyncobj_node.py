"""One PySyncObj replica holding a SurfStore file map, for benchmarks/metadata.py.

    python benchmarks/_pysyncobj_node.py --raft HOST:PORT --peers HOST:PORT,HOST:PORT
        --listen HOST:PORT --front-ends RAFT=FRONT,... [--journal DIR] [--batch]

``FileMap`` is a ``SyncObj`` with one replicated method,
``updatefile(name, version, hashlist, client_id, seq)``: the same rule as
SurfShard's state machine (succeeds only when ``version`` is the stored
version + 1, else answers the current version) and the same dedup (a repeat
of a client's last sequence number gets the first answer), so the work per
committed entry is comparable.

The front end speaks SurfShard's native protocol (4-byte big-endian length,
one CBOR map; ``{"id", "method", "args"}`` -> ``{"id", "ok"}`` or
``{"id", "error": {"code", "message", ...}}``), so the very same load
generator (``MetadataClient`` over ``RpcClientPool``, pipelining many calls
on one connection) drives both systems. It is written the way a PySyncObj
user would write it: one blocking reader thread per connection, each
request handed to the replicated method with ``callback=`` (PySyncObj's
asynchronous API: the callback runs on PySyncObj's tick thread when the
entry is committed and applied, and writes the reply under a per-connection
lock). A node that is not the leader answers NOT_LEADER naming the leader's
front end, as a SurfShard node does, so clients talk to the leader directly
instead of paying PySyncObj's follower-to-leader forwarding hop; while no
leader is known the command is queued (``commandsWaitLeader``), like
SurfShard waiting out an election.

Durability: ``--journal DIR`` gives PySyncObj a ``journalFile`` (and a
``fullDumpFile`` for log compaction). PySyncObj's FileJournal writes each
entry into an mmap'ed file and never calls fsync or msync while running
(only on close), and its term/vote metadata is written with a plain write +
rename, no fsync: it survives a killed process (the page cache holds it) but
not a power cut. Without ``--journal`` the log lives in memory only.

Timings are set to match SurfShard's (see ``main``), including
``connectionRetryTime`` (1 s instead of PySyncObj's 5 s).

This is a benchmark helper, not product code: threads are PySyncObj's own
model, and the process is stopped with a signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import threading
from typing import Any

import cbor2
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

_PREFIX = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024


class FileMap(SyncObj):
    """The replicated SurfStore file map, with per-client dedup."""

    def __init__(self, self_address: str, partners: list[str], conf: SyncObjConf) -> None:
        # Set before SyncObj.__init__: its tick thread may apply journal
        # entries before the constructor returns.
        self.files: dict[str, tuple[int, list[str]]] = {}
        self.sessions: dict[str, tuple[int, dict[str, Any]]] = {}
        super().__init__(self_address, partners, conf)

    @replicated
    def updatefile(self, name: str, version: int, hashlist: list[str], client_id: str, seq: int) -> dict:
        last = self.sessions.get(client_id)
        if last is not None and last[0] == seq:
            return last[1]
        current = self.files.get(name, (0, None))[0]
        if version == current + 1:
            self.files[name] = (version, hashlist)
            result: dict[str, Any] = {"ok": True, "version": version}
        else:
            result = {"ok": False, "code": "VERSION_MISMATCH", "current": current}
        self.sessions[client_id] = (seq, result)
        return result


def _error(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"code": code, "message": message, **details}


class Connection:
    """One client connection: a reader thread; replies come from any thread."""

    def __init__(self, sock: socket.socket, node: Node) -> None:
        self.sock = sock
        self.node = node
        self.lock = threading.Lock()
        self.alive = True

    def send(self, frame: dict[str, Any]) -> None:
        payload = cbor2.dumps(frame)
        data = _PREFIX.pack(len(payload)) + payload
        with self.lock:
            if not self.alive:
                return
            try:
                self.sock.sendall(data)
            except OSError:
                self.alive = False

    def run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return
                buf += chunk
                pos = 0
                while len(buf) - pos >= 4:
                    (size,) = _PREFIX.unpack_from(buf, pos)
                    if size > MAX_FRAME:
                        return
                    if len(buf) - pos - 4 < size:
                        break
                    frame = cbor2.loads(buf[pos + 4 : pos + 4 + size])
                    pos += 4 + size
                    self.node.handle(self, frame)
                buf = buf[pos:]
        except (OSError, cbor2.CBORDecodeError):
            return
        finally:
            with self.lock:
                self.alive = False
            try:
                self.sock.close()
            except OSError:
                pass


class Node:
    """The front end of one replica."""

    def __init__(self, obj: FileMap, own_front: str, fronts: dict[str, str]) -> None:
        self.obj = obj
        self.own_front = own_front
        self.fronts = fronts  # raft address -> front-end address

    def leader_front(self) -> str | None:
        leader = self.obj._getLeader()
        return None if leader is None else self.fronts.get(leader.address)

    def handle(self, conn: Connection, frame: Any) -> None:
        if not isinstance(frame, dict) or not isinstance(frame.get("args"), dict):
            conn.send({"id": None, "error": _error("BAD_REQUEST", "malformed request")})
            return
        rid, method, args = frame.get("id"), frame.get("method"), frame["args"]
        if method == "updatefile":
            self.updatefile(conn, rid, args)
        elif method == "status":
            conn.send({"id": rid, "ok": self.status()})
        elif method == "ping":
            conn.send({"id": rid, "ok": True})
        else:
            conn.send({"id": rid, "error": _error("UNKNOWN_METHOD", f"no method {method!r}")})

    def status(self) -> dict[str, Any]:
        obj = self.obj
        # Plain attribute reads only: getStatus() iterates PySyncObj's
        # dicts, which its tick thread may be changing.
        role = "leader" if obj._isLeader() else "follower"
        return {
            "role": role,
            "leader_address": self.leader_front(),
            "commit": obj.raftCommitIndex,
            "applied": obj.raftLastApplied,
            "term": obj.raftCurrentTerm,
            "files": len(obj.files),
            "peers_connected": sum(1 for peer in obj.otherNodes if obj.isNodeConnected(peer)),
        }

    def updatefile(self, conn: Connection, rid: Any, args: dict[str, Any]) -> None:
        name, version, hashlist = args.get("name"), args.get("version"), args.get("hashlist")
        client_id, seq = args.get("client_id"), args.get("seq")
        if not (
            isinstance(name, str)
            and name
            and type(version) is int
            and version >= 1
            and isinstance(hashlist, list)
            and all(isinstance(h, str) for h in hashlist)
            and isinstance(client_id, str)
            and type(seq) is int
        ):
            conn.send({"id": rid, "error": _error("BAD_REQUEST", "bad updatefile arguments")})
            return
        obj = self.obj
        if not obj._isLeader():
            leader = self.leader_front()
            if leader is not None and leader != self.own_front:
                conn.send({"id": rid, "error": _error("NOT_LEADER", "not the leader", leader=leader)})
                return
            # No leader known: PySyncObj queues the command until one is elected.

        def done(result: Any, err: int) -> None:
            if err == FAIL_REASON.SUCCESS:
                if result.get("ok"):
                    conn.send({"id": rid, "ok": result["version"]})
                else:
                    error = _error("VERSION_MISMATCH", "version mismatch", current=result["current"])
                    conn.send({"id": rid, "error": error})
            elif err == FAIL_REASON.QUEUE_FULL:
                conn.send({"id": rid, "error": _error("UNAVAILABLE", "command queue full")})
            else:
                # MISSING_LEADER, NOT_LEADER, LEADER_CHANGED, DISCARDED: the
                # outcome is unknown; the client retries with the same seq.
                error = _error("NOT_LEADER", f"pysyncobj failure {err}", leader=self.leader_front())
                conn.send({"id": rid, "error": error})

        obj.updatefile(name, version, hashlist, client_id, seq, callback=done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raft", required=True, help="this node's PySyncObj address")
    parser.add_argument(
        "--peers", required=True, help="the other nodes' PySyncObj addresses, comma-separated"
    )
    parser.add_argument("--listen", required=True, help="front-end address")
    parser.add_argument(
        "--front-ends", required=True, help="RAFT=FRONT pairs for every node, comma-separated"
    )
    parser.add_argument("--journal", help="directory for the journal and full dump (default: memory only)")
    parser.add_argument("--batch", action="store_true", help="appendEntriesUseBatch (PySyncObj's default)")
    parser.add_argument("--tick", type=float, default=0.05)
    parser.add_argument("--heartbeat", type=float, default=0.1)
    parser.add_argument("--election-min", type=float, default=0.31)
    parser.add_argument("--election-max", type=float, default=0.6)
    parser.add_argument("--compaction-entries", type=int, default=10_000)
    # PySyncObj's default is 5 s, and only the node with the higher address
    # dials: a restarted node could wait 5 s for a peer. SurfShard's pool
    # redials with backoff from 50 ms, so about 1 s after a restart.
    parser.add_argument("--connection-retry", type=float, default=1.0)
    args = parser.parse_args(argv)

    fronts = dict(pair.split("=", 1) for pair in args.front_ends.split(","))
    options: dict[str, Any] = {
        "autoTickPeriod": args.tick,
        "appendEntriesPeriod": args.heartbeat,
        "raftMinTimeout": args.election_min,
        "raftMaxTimeout": args.election_max,
        "appendEntriesUseBatch": args.batch,
        "logCompactionMinEntries": args.compaction_entries,
        "dynamicMembershipChange": False,
        "commandsWaitLeader": True,
        "connectionRetryTime": args.connection_retry,
    }
    if args.journal:
        os.makedirs(args.journal, exist_ok=True)
        options["journalFile"] = os.path.join(args.journal, "journal.bin")
        options["fullDumpFile"] = os.path.join(args.journal, "dump.bin")
    obj = FileMap(args.raft, [p for p in args.peers.split(",") if p], SyncObjConf(**options))
    node = Node(obj, args.listen, fronts)

    host, port = args.listen.rsplit(":", 1)
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, int(port)))
    server.listen(128)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    print(f"pysyncobj node {args.raft} serving on {args.listen}", flush=True)
    # The accept loop keeps the main thread alive: PySyncObj's tick thread
    # exits when the main thread does.
    while True:
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Connection(sock, node).run, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
