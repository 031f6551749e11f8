"""Round trips per second through the native RPC protocol, next to a bare
Twisted protocol moving the same bytes.

    python3 benchmarks/rpc.py [--seconds 5] [--rounds 3] [--payload 64] [--profile]

Server and client run in this one process, on one reactor, over 127.0.0.1:
a round trip costs the client's and the server's CPU together and nothing
runs in parallel on another core, so the ratio compares the total work per
call of the two stacks.

- native: an ``echo`` method in a MethodTable behind the shared node port
  (first-bytes sniffing included), called through RpcClientPool.call with a
  per-call timeout: CBOR encode/decode both ways, argument validation,
  dispatch, id matching, a Deferred per call, timeouts.
- bare: a Protocol that echoes length-prefixed frames, and a client that
  frames each request and parses each reply; it sends exactly the bytes the
  native client sends for a call, so both move the same bytes per call.

Each is run with 1 and with 64 calls in flight.  The machine may be shared,
so each measurement is cut into ``--rounds`` slices interleaved with the
other stack's, rates are counted per second of this process's CPU time
(user + system; wall-clock rates are printed too) and the best slice is
kept.  The ratio native/bare is computed from the CPU-time rates.

The last lines measure what CBOR alone costs per round trip (encode and
decode of one request and one reply, one cbor2 call each, nothing else)
against the bare round trip, which caps the ratio a protocol making those
calls can reach here; then the same for the native codec as the RPC layer
uses it (envelopes written by hand, the frames of one read decoded by one
cbor2 call), which is what caps this protocol.
The last line compares argument validation alone: the schema compiler's
generated validator against ``msgspec.convert(..., strict=True)`` into an
equivalent ``msgspec.Struct`` (turned back into the handler's keyword
arguments, as dispatch needs), on ``updatefile``'s arguments (skipped when
msgspec is not installed).
``--profile`` runs the native case under cProfile (64 in flight, or
``--profile-in-flight N``) and prints the top functions.  Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import time
from typing import Annotated

import cbor2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from surfshard.net import wire
from surfshard.net.methods import MethodTable
from surfshard.net.pool import RpcClientPool
from surfshard.net.port import listen, make_site, node_factory
from surfshard.net.schema import Arg
from surfshard.net.server import RpcServerFactory
from surfshard.replica.control import MAX_CALL_TIMEOUT

try:
    import msgspec
except ImportError:  # the comparison is skipped
    msgspec = None

if msgspec is not None:

    class UpdateArgs(msgspec.Struct, forbid_unknown_fields=True):
        """``updatefile``'s arguments as a msgspec Struct (see ``schema_cost``)."""

        name: str
        version: int
        hashlist: Annotated[list, msgspec.Meta(max_length=100_000)]
        client_id: str | None = None
        seq: int | None = None
        timeout: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_CALL_TIMEOUT)] | None = None


LEVELS = (1, 64)
_PREFIX = struct.Struct(">I")


# -- bare length-prefixed echo ------------------------------------------------


class BareEchoServer(Protocol):
    """Echo each whole frame back: framing only, nothing decoded."""

    def connectionMade(self) -> None:
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        write = self.transport.write
        while end - pos >= 4:
            (length,) = _PREFIX.unpack_from(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            write(buf[pos:stop])
            pos = stop
        self._buf = buf[pos:]


class BareClient(Protocol):
    """Keeps ``in_flight`` requests outstanding; frames each request and
    takes each reply's payload out, as any length-prefixed client must."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.count = 0
        self.running = True
        self._buf = b""
        self._outstanding = 0
        self.done: defer.Deferred[None] = defer.Deferred()

    def send(self) -> None:
        self._outstanding += 1
        payload = self.payload
        self.transport.write(_PREFIX.pack(len(payload)) + payload)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _PREFIX.unpack_from(buf, pos)
            stop = pos + 4 + length
            if stop > end:
                break
            reply = buf[pos + 4 : stop]
            del reply
            pos = stop
            self.count += 1
            self._outstanding -= 1
            if self.running:
                self.send()
            elif self._outstanding == 0 and not self.done.called:
                self.done.callback(None)
        self._buf = buf[pos:]


class Meter:
    """Counts calls over one slice of time, in wall and CPU seconds."""

    def __init__(self, count: int) -> None:
        self.count0 = count
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def rates(self, count: int) -> tuple[float, float]:
        calls = count - self.count0
        return calls / (time.perf_counter() - self.wall0), calls / max(1e-9, time.process_time() - self.cpu0)


class BareRun:
    @defer.inlineCallbacks
    def start(self, in_flight: int, payload: bytes):
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(BareEchoServer)
        )
        self.client = BareClient(payload)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port).connect(
            Factory.forProtocol(lambda: self.client)
        )
        for _ in range(in_flight):
            self.client.send()

    def count(self) -> int:
        return self.client.count

    def pause(self) -> None:
        self.client.running = False

    @defer.inlineCallbacks
    def resume(self, in_flight: int):
        yield self.client.done
        self.client.done = defer.Deferred()
        self.client.running = True
        for _ in range(in_flight):
            self.client.send()

    @defer.inlineCallbacks
    def stop(self):
        self.client.running = False
        yield self.client.done
        self.client.transport.loseConnection()
        yield self.port.stopListening()


# -- native --------------------------------------------------------------------


def echo_table() -> MethodTable:
    table = MethodTable("bench")
    table.add("echo", lambda data: data, [Arg("data", bytes, max_len=1 << 20)])
    return table


class NativeRun:
    @defer.inlineCallbacks
    def start(self, in_flight: int, payload: bytes):
        rpc = RpcServerFactory(echo_table(), reactor)
        self.port = yield listen(
            reactor, 0, node_factory(rpc, make_site(clock=reactor), reactor), "127.0.0.1"
        )
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.pool = RpcClientPool(reactor)
        self.args = {"data": payload}
        yield self.pool.call(self.address, "echo", self.args, timeout=10)  # connect outside the timing
        self.calls = 0
        self.outstanding = 0
        self.running = True
        self.done: defer.Deferred[None] = defer.Deferred()
        for _ in range(in_flight):
            self.issue()

    def issue(self) -> None:
        self.outstanding += 1
        self.pool.call(self.address, "echo", self.args, timeout=10).addCallbacks(self.answered, self.failed)

    def answered(self, _result: object) -> None:
        self.calls += 1
        self.outstanding -= 1
        if self.running:
            self.issue()
        elif self.outstanding == 0 and not self.done.called:
            self.done.callback(None)

    def failed(self, failure) -> None:
        print("call failed:", failure.getErrorMessage(), file=sys.stderr)
        self.running = False
        self.answered(None)

    def count(self) -> int:
        return self.calls

    def pause(self) -> None:
        self.running = False

    @defer.inlineCallbacks
    def resume(self, in_flight: int):
        yield self.done
        self.done = defer.Deferred()
        self.running = True
        for _ in range(in_flight):
            self.issue()

    @defer.inlineCallbacks
    def stop(self):
        self.running = False
        yield self.done
        yield self.pool.close()
        yield self.port.stopListening()


def sleep(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@defer.inlineCallbacks
def measure(level: int, seconds: float, rounds: int, payload: bytes):
    """Interleave slices of both stacks; best (wall, cpu) rate of each."""
    runs = {"bare": BareRun(), "native": NativeRun()}
    best = {name: (0.0, 0.0) for name in runs}
    for run in runs.values():
        yield run.start(level, payload)
        run.pause()
    for _ in range(rounds):
        for name, run in runs.items():
            yield run.resume(level)
            yield sleep(0.05)  # let the pipeline fill
            meter = Meter(run.count())
            yield sleep(seconds / rounds)
            wall, cpu = meter.rates(run.count())
            run.pause()
            best[name] = (max(best[name][0], wall), max(best[name][1], cpu))
    for run in runs.values():
        yield run.stop()
    return best


def cbor_floor(payload: bytes, seconds: float) -> float:
    """Seconds per round trip spent in CBOR alone (best of a few batches)."""
    request = {"id": 12345, "method": "echo", "args": {"data": payload}}
    reply = {"id": 12345, "ok": payload}
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.process_time()
        for _ in range(2000):
            cbor2.loads(cbor2.dumps(request))
            cbor2.loads(cbor2.dumps(reply))
        best = min(best, (time.process_time() - start) / 2000)
    return best


def codec_cost(payload: bytes, seconds: float, batch: int = max(LEVELS)) -> float:
    """Seconds per round trip in the native codec as the RPC layer uses it:
    ``wire.encode_request`` and ``encode_reply``, and a ``FrameDecoder``
    fed ``batch`` frames per read each way (best of a few batches)."""
    args = {"data": payload}
    best = float("inf")
    deadline = time.perf_counter() + seconds
    rounds = max(1, 2000 // batch)
    while time.perf_counter() < deadline:
        start = time.process_time()
        for r in range(rounds):
            ids = range(r * batch + 1, (r + 1) * batch + 1)
            requests = b"".join(wire.encode_request(i, "echo", args) for i in ids)
            frames = list(wire.FrameDecoder().feed(requests))
            replies = b"".join(wire.encode_reply(f["id"], f["args"]["data"]) for f in frames)
            for _ in wire.FrameDecoder().feed(replies):
                pass
        best = min(best, (time.process_time() - start) / (rounds * batch))
    return best


def schema_cost(seconds: float) -> tuple[float, float | None]:
    """Seconds per validation of one ``updatefile`` argument map: the
    compiled ``Schema`` and msgspec (None when msgspec is missing)."""
    from surfshard.metadata.service import NAME_ARG
    from surfshard.net.schema import Schema
    from surfshard.replica.control import TIMEOUT_ARG

    schema = Schema(
        [
            NAME_ARG,
            Arg("version", int),
            Arg("hashlist", list, max_len=100_000),
            Arg("client_id", str, required=False),
            Arg("seq", int, required=False),
            TIMEOUT_ARG,
        ]
    )
    args = {
        "name": "notes/report.txt",
        "version": 7,
        "hashlist": ["ab" * 32] * 4,
        "client_id": "0123456789abcdef0123456789abcdef",
        "seq": 42,
        "timeout": 9.5,
    }

    def rate(validate) -> float:
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            for _ in range(1000):
                validate(args)
            n += 1000
        return (time.process_time() - start) / n

    ours = rate(schema.validate)
    if msgspec is None:
        return ours, None
    convert, asdict = msgspec.convert, msgspec.structs.asdict

    def with_msgspec(a):
        return asdict(convert(a, UpdateArgs, strict=True))

    return ours, rate(with_msgspec)


@defer.inlineCallbacks
def run_profile(seconds: float, payload: bytes, in_flight: int):
    run = NativeRun()
    profile = cProfile.Profile()
    yield run.start(in_flight, payload)
    profile.enable()
    yield sleep(seconds)
    profile.disable()
    calls = run.count()
    yield run.stop()
    print(f"\nprofile of native, {in_flight} in flight ({calls} calls):")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(25)


@defer.inlineCallbacks
def main(options: argparse.Namespace):
    payload = b"x" * options.payload
    frame = wire.encode_frame({"id": 1, "method": "echo", "args": {"data": payload}})
    print(
        f"loopback, one process; {options.seconds:.1f}s per stack and level in {options.rounds} interleaved "
        f"slices; payload {options.payload} bytes ({len(frame)}-byte request frames)"
    )
    print("rates are calls per CPU-second of this process (best slice); wall-clock calls/s in brackets")
    try:
        bare_cpu_64 = native_cpu_64 = None
        for level in LEVELS:
            best = yield measure(level, options.seconds, options.rounds, payload)
            (native_wall, native_cpu), (bare_wall, bare_cpu) = best["native"], best["bare"]
            if level == max(LEVELS):
                bare_cpu_64, native_cpu_64 = bare_cpu, native_cpu
            print(
                f"{level:>3} in flight: native {native_cpu:>9,.0f} ({native_wall:>9,.0f})   "
                f"bare {bare_cpu:>9,.0f} ({bare_wall:>9,.0f})   native/bare {native_cpu / bare_cpu:.2f}"
            )
        floor = cbor_floor(payload, 1.0)
        codec = codec_cost(payload, 1.0)
        bare_rt = 1.0 / bare_cpu_64
        print(
            f"CBOR alone: {floor * 1e6:.1f} us per round trip vs {bare_rt * 1e6:.1f} us for a whole bare round trip "
            f"at {max(LEVELS)} in flight: with one cbor2 call per message and everything else free, "
            f"native/bare <= {bare_rt / (bare_rt + floor):.2f}"
        )
        native_rt = 1.0 / native_cpu_64
        print(
            f"native codec (hand-written envelopes, {max(LEVELS)} frames decoded per cbor2 call): "
            f"{codec * 1e6:.1f} us per round trip; native/bare <= {bare_rt / (bare_rt + codec):.2f} with "
            f"everything else free. A native round trip costs {native_rt * 1e6:.1f} us: "
            f"{(native_rt - bare_rt - codec) * 1e6:.1f} us beyond the bare round trip and the codec go to "
            "dispatch, validation, Deferreds, timeouts and the pool"
        )
        ours, theirs = schema_cost(1.0)
        print(
            f"argument validation (updatefile): compiled schema {ours * 1e6:.2f} us per call"
            + (
                f", msgspec.convert(strict=True) + asdict {theirs * 1e6:.2f} us: ratio {theirs / ours:.2f}"
                if theirs is not None
                else " (msgspec not installed: no comparison)"
            )
        )
        if options.profile:
            yield run_profile(options.seconds, payload, options.profile_in_flight)
    finally:
        reactor.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="time per stack and level (default 5; 4 of them)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved slices per measurement (default 3)"
    )
    parser.add_argument("--payload", type=int, default=64, help="bytes echoed per call (default 64)")
    parser.add_argument("--profile", action="store_true", help="also profile a native run")
    parser.add_argument(
        "--profile-in-flight",
        type=int,
        default=max(LEVELS),
        help="calls in flight when profiling (default 64)",
    )
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.payload < 0 or options.rounds < 1 or options.profile_in_flight < 1:
        parser.error(
            "--seconds must be positive, --rounds and --profile-in-flight at least 1, --payload not negative"
        )
    return options


if __name__ == "__main__":
    reactor.callWhenRunning(main, parse_args())
    reactor.run()
