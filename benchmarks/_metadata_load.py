"""The load generator of benchmarks/metadata.py: a separate process.

    python benchmarks/_metadata_load.py ADDRESS ADDRESS ADDRESS
    python benchmarks/_metadata_load.py --etcd http://HOST:PORT

With ``--etcd`` each writer does the same compare-and-set against etcd
instead: a transaction through etcd's gRPC gateway (HTTP/1.1 + JSON, one
persistent connection per writer, sent to the endpoint given, the leader)
that puts the key only if its version (etcd's count of writes to the key)
is the one expected, reading it back otherwise.

Runs N concurrent writers, each a ``client.metadata_client.MetadataClient`` (its own
client id, sequence numbers and leader guess) over one shared
``RpcClientPool``, so the N calls in flight are pipelined on one connection
per server. Writer ``i`` cycles over its own few files and always writes
``version = previous + 1``: there are no conflicts, and every success is one
committed Raft entry. The same code drives SurfShard and the PySyncObj
cluster (whose front end speaks the same protocol).

It is driven by JSON lines on stdin and answers with JSON lines on stdout:

- ``{"cmd": "measure", "clients": N, "warmup": S, "seconds": S}``: start N
  writers, let them warm up, count successful writes and their latencies over
  the window, stop them; answers the figures.
- ``{"cmd": "start", "clients": N}``: start N writers and leave them running;
  answers after the first success.
- ``{"cmd": "wait_success", "after": T, "not_from": ADDR, "timeout": S}``:
  answers with the first write acknowledged at or after ``T``
  (``time.monotonic()``, the same clock in every process) by a node other
  than ``ADDR``, or ``{"timeout": true}``.
- ``{"cmd": "stop"}``: stop the writers (waits for their calls to end).
- ``{"cmd": "total"}``: successful writes since the process started.
- ``{"cmd": "exit"}``.

Its clock is ``time.monotonic`` (``use_monotonic_clock``) so its times and
the orchestrator's kill times are comparable. CPU time of this process is
reported with each measurement so a client-side bottleneck shows.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import sys
import uuid
from collections import Counter, deque
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor, stdio
from twisted.protocols.basic import LineReceiver
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from client.metadata_client import MetadataClient
from surfshard import errors
from surfshard.clock import use_monotonic_clock
from surfshard.net.pool import RpcClientPool

FILES_PER_WRITER = 8
#: A realistic small file: four 64-hex-character block hashes.
HASHLIST = [f"{i:064x}" for i in range(1, 5)]
#: What an etcd writer puts: the same four hashes, as the value's bytes.
ETCD_VALUE = base64.b64encode(" ".join(HASHLIST).encode()).decode()
#: After an error other than a version mismatch, wait this long before the
#: next write, so a down cluster is not hammered in a tight loop.
ERROR_PAUSE = 0.01


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Writer:
    """One client: writes its own files in turn, one call in flight."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.client = MetadataClient(
            load.pool,
            load.addresses,
            reactor,
            client_id=f"bench-{load.run_id}-{index}",
            timeout=10.0,
            attempt_timeout=2.0,
        )
        self.files = [f"bench-{load.run_id}/w{index}/f{k}" for k in range(FILES_PER_WRITER)]
        self.versions = [0] * FILES_PER_WRITER
        self.turn = 0
        self.running = True
        self.finished: defer.Deferred[None] = defer.Deferred()

    def next(self) -> None:
        if not self.running:
            self.finished.callback(None)
            return
        k = self.turn
        self.turn = (k + 1) % FILES_PER_WRITER
        started = reactor.seconds()
        d = self.client.updatefile(self.files[k], self.versions[k] + 1, HASHLIST)
        d.addCallbacks(self._ok, self._failed, callbackArgs=(k, started), errbackArgs=(k, started))

    def _ok(self, version: int, k: int, started: float) -> None:
        self.versions[k] = version
        self.load.record_ok(started, reactor.seconds(), self.client.leader)
        self.next()

    def _failed(self, failure: Any, k: int, started: float) -> None:
        error = failure.value
        self.load.record_error(type(error).__name__)
        if isinstance(error, errors.VersionMismatch) and isinstance(error.current, int):
            # Only possible if an earlier call timed out after committing.
            self.versions[k] = error.current
        reactor.callLater(ERROR_PAUSE, self.next)


class EtcdWriter(Writer):
    """A writer doing its compare-and-set as an etcd transaction."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.endpoint = load.addresses[0].encode("ascii") + b"/v3/kv/txn"
        self.leader = load.addresses[0]
        self.files = [
            base64.b64encode(f"bench-{load.run_id}/w{index}/f{k}".encode()).decode()
            for k in range(FILES_PER_WRITER)
        ]
        self.versions = [0] * FILES_PER_WRITER
        self.turn = 0
        self.running = True
        self.finished = defer.Deferred()

    def next(self) -> None:
        if not self.running:
            self.finished.callback(None)
            return
        k = self.turn
        self.turn = (k + 1) % FILES_PER_WRITER
        started = reactor.seconds()
        key = self.files[k]
        body = json.dumps(
            {
                "compare": [
                    {"key": key, "result": "EQUAL", "target": "VERSION", "version": str(self.versions[k])}
                ],
                "success": [{"request_put": {"key": key, "value": ETCD_VALUE}}],
                "failure": [{"request_range": {"key": key}}],
            }
        ).encode()
        d = self.load.agent.request(
            b"POST",
            self.endpoint,
            Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(io.BytesIO(body)),
        )
        d.addCallback(readBody)
        d.addCallback(self._answered, k)
        d.addCallbacks(self._ok, self._failed, callbackArgs=(k, started), errbackArgs=(k, started))

    def _answered(self, raw: bytes, k: int) -> int:
        answer = json.loads(raw)
        if answer.get("succeeded"):
            return self.versions[k] + 1
        if "error" in answer or "header" not in answer:
            raise RuntimeError(str(answer)[:200])
        kvs = answer.get("responses", [{}])[0].get("response_range", {}).get("kvs", [])
        current = int(kvs[0].get("version", 0)) if kvs else 0
        raise errors.VersionMismatch("etcd: version mismatch", current=current)

    def _ok(self, version: int, k: int, started: float) -> None:
        self.versions[k] = version
        self.load.record_ok(started, reactor.seconds(), self.leader)
        self.next()


class Load:
    def __init__(self, addresses: list[str], out: Any, etcd: bool = False) -> None:
        self.addresses = addresses
        self.etcd = etcd
        if etcd:
            http_pool = HTTPConnectionPool(reactor, persistent=True)
            http_pool.maxPersistentPerHost = 1024
            self.agent = Agent(reactor, pool=http_pool)
        self.out = out
        self.pool = RpcClientPool(reactor, backoff_initial=0.02, backoff_max=0.5)
        self.run_id = uuid.uuid4().hex[:8]
        self.next_index = 0
        self.writers: list[Writer] = []
        #: Successes since the process started (warm-up included), so the
        #: orchestrator can divide the servers' CPU time by all writes.
        self.total_ok = 0
        self.reset()
        #: (ack time, address) of recent successes, for wait_success.
        self.recent: deque[tuple[float, str | None]] = deque(maxlen=100_000)
        self.watch: tuple[float, str, defer.Deferred] | None = None

    def reset(self) -> None:
        self.ok = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_ok: defer.Deferred | None = None

    def record_ok(self, started: float, now: float, address: str | None) -> None:
        self.ok += 1
        self.total_ok += 1
        self.latencies.append(now - started)
        self.recent.append((now, address))
        if self.first_ok is not None and not self.first_ok.called:
            self.first_ok.callback(None)
        if self.watch is not None and now >= self.watch[0] and address != self.watch[1]:
            _, _, d = self.watch
            self.watch = None
            d.callback((now, address))

    def record_error(self, name: str) -> None:
        self.errors[name] += 1

    def start(self, clients: int) -> None:
        for _ in range(clients):
            writer = (EtcdWriter if self.etcd else Writer)(self, self.next_index)
            self.next_index += 1
            self.writers.append(writer)
            writer.next()

    @defer.inlineCallbacks
    def stop(self):
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.running = False
        yield defer.gatherResults([w.finished for w in writers])

    @defer.inlineCallbacks
    def measure(self, clients: int, warmup: float, seconds: float):
        self.start(clients)
        yield sleep(warmup)
        self.reset()
        cpu0, t0 = cpu_seconds(), reactor.seconds()
        yield sleep(seconds)
        ok, latencies, errs = self.ok, sorted(self.latencies), dict(self.errors)
        elapsed, cpu = reactor.seconds() - t0, cpu_seconds() - cpu0
        yield self.stop()
        return {
            "clients": clients,
            "ok": ok,
            "seconds": elapsed,
            "throughput": ok / elapsed,
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "errors": errs,
            "client_cpu": cpu / elapsed,
            "total_ok": self.total_ok,
        }

    @defer.inlineCallbacks
    def start_and_wait(self, clients: int):
        self.reset()
        self.first_ok = defer.Deferred()
        self.start(clients)
        yield self.first_ok
        return {"started": clients}

    def wait_success(self, after: float, not_from: str, timeout: float) -> defer.Deferred:
        for when, address in self.recent:
            if when >= after and address != not_from:
                return defer.succeed({"t": when, "address": address, "errors": dict(self.errors)})
        d: defer.Deferred = defer.Deferred()
        self.watch = (after, not_from, d)
        timer = reactor.callLater(timeout, lambda: d.called or d.callback(None))

        def done(result: Any) -> dict[str, Any]:
            if timer.active():
                timer.cancel()
            self.watch = None
            if result is None:
                return {"timeout": True, "errors": dict(self.errors)}
            return {"t": result[0], "address": result[1], "errors": dict(self.errors)}

        return d.addCallback(done)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class Control(LineReceiver):
    delimiter = b"\n"

    def __init__(self, load: Load) -> None:
        self.load = load

    def lineReceived(self, line: bytes) -> None:
        request = json.loads(line)
        cmd = request["cmd"]
        load = self.load
        if cmd == "measure":
            d = load.measure(request["clients"], request["warmup"], request["seconds"])
        elif cmd == "start":
            d = load.start_and_wait(request["clients"])
        elif cmd == "wait_success":
            d = load.wait_success(request["after"], request["not_from"], request["timeout"])
        elif cmd == "total":
            d = defer.succeed({"total_ok": load.total_ok})
        elif cmd == "stop":
            d = load.stop().addCallback(lambda _: {"stopped": True})
        elif cmd == "exit":
            reactor.stop()
            return
        else:
            d = defer.succeed({"error": f"unknown command {cmd!r}"})
        d.addErrback(lambda f: {"error": f.getErrorMessage()})
        d.addCallback(self.answer)

    def answer(self, result: dict[str, Any]) -> None:
        self.sendLine(json.dumps(result).encode())

    def connectionLost(self, reason: Any) -> None:
        # The orchestrator went away (or closed our stdin): stop.
        if reactor.running:
            reactor.stop()


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    use_monotonic_clock(reactor)
    etcd = argv[0] == "--etcd"
    load = Load(argv[1:] if etcd else argv, None, etcd=etcd)
    stdio.StandardIO(Control(load))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
