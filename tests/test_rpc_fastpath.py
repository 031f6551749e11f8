"""Tests for the RPC hot path: generated argument validators (checked
against the generic validator they replace), one-way requests on the server
and through the client pool, and the Raft transport that uses them (batches
per reactor turn, no reply per message, crashed nodes refusing)."""

from __future__ import annotations

import math
import os
import random
import socket
from typing import Any

from hypothesis import given, seed, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from raft.errors import NodeCrashed
from raft.types import Entry, Message, MessageType
from surfshard import errors
from surfshard.net import wire
from surfshard.net.methods import MethodTable
from surfshard.net.pool import RpcClientPool, encode_notification
from surfshard.net.schema import Arg, Schema, Value, _Invalid
from surfshard.net.server import RpcServerFactory, RpcServerProtocol, ServerLimits
from surfshard.replica.raft_transport import MAX_BATCH_BYTES, RpcRaftTransport
from tests.test_rpc import PEER, capture_logs, make_table, read_frames, request, wait_for

SEED = int(os.environ.get("SURFSHARD_SEED", "20240501"))


# ---------------------------------------------------------------------------
# Generated validators
# ---------------------------------------------------------------------------

NAMES = ["a", "b", "c"]


def _checked(value: Any) -> None:
    # A check callable: refuses one particular value.
    if value in ("bad", -2, b"bad"):
        raise ValueError("refused by check")


def _limit(draw: Any, lo: int, hi: int) -> int | None:
    return draw(st.none() | st.integers(lo, hi))


@st.composite
def value_specs(draw: Any, depth: int = 0) -> Value:
    """A random but legal Value (constraints only where Value allows them)."""
    kinds = ["number", "sized", "bool", "mixed"] + (["list", "map_fields", "map_kv"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    nullable = draw(st.booleans())
    check = _checked if draw(st.integers(0, 5)) == 0 else None
    if kind == "number":
        types = draw(st.sampled_from([int, float, (int, float)]))
        bounds = st.none() | st.integers(-3, 3) | st.sampled_from([-0.5, 0.5, 2.5])
        return Value(types, nullable=nullable, min=draw(bounds), max=draw(bounds), check=check)
    if kind == "sized":
        return Value(
            draw(st.sampled_from([str, bytes])),
            nullable=nullable,
            min_len=_limit(draw, 0, 3),
            max_len=_limit(draw, 0, 5),
            max_bytes=_limit(draw, 0, 8),
            check=check,
        )
    if kind == "bool":
        return Value(bool, nullable=nullable, check=check)
    if kind == "mixed":
        types = draw(st.sampled_from([(str, int), (bytes, list), (str, bytes, dict), (int, bool, str)]))
        return Value(types, nullable=nullable, max_len=_limit(draw, 0, 4), max_bytes=_limit(draw, 0, 6))
    if kind == "list":
        items = draw(st.none() | value_specs(depth + 1))
        return Value(
            list, nullable=nullable, min_len=_limit(draw, 0, 2), max_len=_limit(draw, 0, 4), items=items
        )
    if kind == "map_fields":
        return Value(dict, nullable=nullable, fields=draw(arg_lists(depth + 1)), max_len=_limit(draw, 0, 4))
    keys = draw(st.none() | st.just(Value(str, max_len=1)) | st.just(Value(int, min=0)))
    values = draw(st.none() | value_specs(depth + 1))
    return Value(dict, nullable=nullable, keys=keys, values=values)


@st.composite
def arg_lists(draw: Any, depth: int = 0) -> list[Arg]:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    args = []
    for name in names:
        mode = draw(st.sampled_from(["required", "optional", "default"]))
        value = draw(value_specs(depth))
        if mode == "default":
            args.append(Arg(name, value, default=draw(st.sampled_from([0, "d", None]))))
        else:
            args.append(Arg(name, value, required=mode == "required"))
    return args


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 4),
    st.sampled_from([0.5, -0.5, 2.0, 3.5, math.nan, math.inf, -math.inf]),
    st.text(alphabet="ab\u20ac", max_size=6),
    st.sampled_from(["bad", "\ud800"]),  # a check's refusal; a lone surrogate
    st.binary(max_size=6),
)
inputs = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.sampled_from(NAMES + ["x"]) | st.integers(0, 2), children, max_size=4)
    ),
    max_leaves=12,
)
arg_maps = st.dictionaries(st.sampled_from(NAMES + ["x"]), inputs, max_size=4) | inputs


def near(value: Value, depth: int = 0) -> st.SearchStrategy[Any]:
    """Inputs on and around ``value``'s bounds (and of the wrong type),
    where a generated check that is off by one or lets NaN through shows."""
    options: list[st.SearchStrategy[Any]] = []
    concrete = value.types - {type(None)}
    if type(None) in value.types:
        options.append(st.none())
    if bool in concrete:
        options.append(st.booleans())
    if concrete & {int, float}:
        options.append(st.integers(-3, 4))
    if float in concrete:
        options.append(st.floats(-3, 4))
    bounds = [b for b in (value.min, value.max) if b is not None]
    if bounds:
        edges = [b + d for b in bounds for d in (-1, -0.5, 0, 0.5, 1)]
        options.append(st.sampled_from([*edges, *(int(e) for e in edges)]))
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    lengths = [n for n in (value.min_len, value.max_len, value.max_bytes) if n is not None]
    top = max(lengths, default=3) + 2
    if str in concrete:
        options.append(st.text(alphabet="a\u20ac\U0001f600", max_size=top))
    if bytes in concrete:
        options.append(st.binary(max_size=top))
    if list in concrete and depth < 3:
        item = near(value.items, depth + 1) if value.items is not None else scalars
        options.append(st.lists(item, max_size=top))
    if dict in concrete and depth < 3:
        if value.fields is not None:
            options.append(maps_for(value.fields.args, depth + 1))
        else:
            keys = near(value.keys, depth + 1) if value.keys is not None else st.sampled_from(["a", 0, 1])
            items = near(value.values, depth + 1) if value.values is not None else scalars
            options.append(st.dictionaries(keys, items, max_size=top))
    # Mostly values of the right type, so that most maps pass and a check
    # that lets too much through shows; sometimes anything at all.
    return st.one_of(*options, *options, *options, scalars)


def maps_for(args: tuple[Arg, ...] | list[Arg], depth: int = 0) -> st.SearchStrategy[Any]:
    """Argument maps for a schema: each argument present or not, near its
    bounds, sometimes an unknown one too."""
    known = st.fixed_dictionaries({}, optional={a.name: near(a.value, depth) for a in args})
    unknown = st.fixed_dictionaries({"x": scalars}, optional={a.name: near(a.value, depth) for a in args})
    return st.one_of(known, known, known, unknown)


def same(a: Any, b: Any) -> bool:
    """Equality that takes NaN as equal to itself and types as exact."""
    if type(a) is not type(b):
        return False
    if type(a) is float and math.isnan(a):
        return math.isnan(b)
    if type(a) is dict:
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if type(a) is list:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class GeneratedValidatorTests(SynchronousTestCase):
    @seed(SEED)
    @settings(deadline=None, max_examples=800)
    @given(args=arg_lists(), data=st.data())
    def test_generated_agrees_with_generic(self, args, data):
        schema = Schema(args)
        samples = data.draw(st.lists(maps_for(args) | maps_for(args) | arg_maps, min_size=1, max_size=8))
        for given_args in samples:
            try:
                expected = schema.validate_generic(given_args)
            except _Invalid:
                expected = None
            fast = schema._fast(given_args)
            self.assertTrue(
                same(fast, expected),
                f"{args} on {given_args!r}: {fast!r} != {expected!r}; SURFSHARD_SEED={SEED}",
            )
            # And the public entry point: same result, or the generic error.
            try:
                result = schema.validate(given_args)
            except _Invalid:
                result = None
            self.assertTrue(same(result, expected))

    def assert_agree(self, value: Value, inputs: list[Any]) -> int:
        """Every input, as the argument of a one-argument schema (required,
        optional and defaulted): generated and generic agree.  Returns how
        many were accepted, so a grid that accepts nothing is noticed."""
        accepted = 0
        for arg in (Arg("a", value), Arg("a", value, required=False), Arg("a", value, default="d")):
            schema = Schema([arg])
            for x in inputs:
                for given_args in ({"a": x}, {"a": x, "b": 1}, {}):
                    try:
                        expected = schema.validate_generic(given_args)
                        accepted += 1
                    except _Invalid:
                        expected = None
                    fast = schema._fast(given_args)
                    self.assertTrue(same(fast, expected), f"{value.type_name} {arg} {given_args!r}: {fast!r}")
        return accepted

    def test_number_bounds_grid(self):
        inputs = [
            -2,
            -1,
            0,
            1,
            2,
            3,
            -1.0,
            0.5,
            2.0,
            2.5,
            3.5,
            math.nan,
            math.inf,
            -math.inf,
            True,
            None,
            "1",
        ]
        inputs += [2**70, -(2**70)]
        for types in (int, float, (int, float)):
            for lo in (None, -1, 0.5, 2):
                for hi in (None, 0, 2, 2.5):
                    for nullable in (False, True):
                        value = Value(types, min=lo, max=hi, nullable=nullable)
                        self.assertGreater(self.assert_agree(value, inputs), 0)

    def test_size_bounds_grid(self):
        inputs: list[Any] = [None, 1, "\ud800", "\ud800" * 3]
        for n in range(9):
            inputs += [
                "a" * n,
                "\u20ac" * n,
                "\U0001f600" * n,
                "a\u20ac" * n,
                b"x" * n,
                ["a"] * n,
                dict.fromkeys(range(n)),
            ]
        for types in (str, bytes, list, dict, (str, bytes), (str, int), (bytes, list, dict)):
            for min_len in (None, 0, 2):
                for max_len in (None, 0, 3):
                    for max_bytes in (None, 0, 4, 7):
                        for nullable in (False, True):
                            value = Value(
                                types,
                                min_len=min_len,
                                max_len=max_len,
                                max_bytes=max_bytes,
                                nullable=nullable,
                            )
                            self.assertGreater(self.assert_agree(value, inputs), 0)

    def test_contents_grid(self):
        items = (None, Value(int, min=0), Value(str, max_len=1, nullable=True))
        lists = [[], [0], [-1], ["a"], ["ab"], [None], [0, "a"], [1, 2, 3, 4], ["a"] * 5, [[0]], [{"a": 0}]]
        for item in items:
            for max_len in (None, 2, 4):
                for nullable in (False, True):
                    self.assert_agree(
                        Value(list, items=item, max_len=max_len, nullable=nullable), [*lists, None, {}]
                    )
        maps: list[Any] = [
            {},
            {"a": 0},
            {"a": -1},
            {"a": "x"},
            {0: 0},
            {"a": 0, "b": 1},
            {"b": 1},
            {"a": None},
        ]
        maps += [{1: "a"}, {"a": [0]}, [], None]
        for keys in (None, Value(str, max_len=1), Value(int, min=0)):
            for values in (None, Value(int, min=0), Value(str, nullable=True)):
                self.assert_agree(Value(dict, keys=keys, values=values, max_len=2), maps)
        for fields in ([Arg("a", int, min=0)], [Arg("a", int, default=5), Arg("b", int, required=False)]):
            for nullable in (False, True):
                self.assertGreater(self.assert_agree(Value(dict, fields=fields, nullable=nullable), maps), 0)

    def test_checks_grid(self):
        value = Value(str, max_len=3, check=_checked)
        self.assert_agree(value, ["bad", "ok", "long!", None, 3])
        self.assert_agree(Value(int, min=-5, check=_checked), [-2, -3, 0, -6, "bad"])

    def test_updatefile_like_schema(self):
        schema = Schema(
            [
                Arg("name", str, min_len=1, max_bytes=4096),
                Arg("version", int, min=1),
                Arg("hashlist", Value(list, max_len=1000, items=Value(str, max_len=64))),
                Arg("client_id", str, required=False, min_len=1, max_len=128),
                Arg("timeout", float, required=False, min=0.0, max=60.0),
            ]
        )
        good = {"name": "f", "version": 3, "hashlist": ["a" * 64] * 3, "timeout": 2}
        self.assertEqual(schema._fast(good), good)
        for bad in (
            {**good, "version": 0},
            {**good, "version": True},
            {**good, "hashlist": ["a" * 65]},
            {**good, "hashlist": ["a", 1]},
            {**good, "name": "\u20ac" * 1366},  # 4098 UTF-8 bytes
            {**good, "timeout": math.nan},
            {**good, "client_id": ""},
            {k: v for k, v in good.items() if k != "name"},
            {**good, "extra": 1},
        ):
            self.assertIsNone(schema._fast(bad), bad)
            self.assertRaises(_Invalid, schema.validate, bad)

    def test_defaults_are_filled_and_nested_maps_copied(self):
        inner = Schema([Arg("x", int, default=1)])
        schema = Schema([Arg("m", Value(dict, fields=inner.args)), Arg("n", int, default=7)])
        given_args = {"m": {}}
        out = schema.validate(given_args)
        self.assertEqual(out, {"m": {"x": 1}, "n": 7})
        self.assertEqual(given_args, {"m": {}})  # the caller's map is not touched


# ---------------------------------------------------------------------------
# One-way requests: server side
# ---------------------------------------------------------------------------


class OneWayServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = capture_logs(self)
        self.clock = Clock()
        self.seen: list[Any] = []
        self.waits: dict[str, defer.Deferred[Any]] = {}
        table = make_table()
        table.add("record", lambda value: self.seen.append(value), [Arg("value", int)])
        table.add("later", self.later, [Arg("key", str)])
        self.server = RpcServerProtocol(table, self.clock, ServerLimits())
        self.transport = StringTransport(peerAddress=PEER)
        self.server.makeConnection(self.transport)

    def later(self, key: str) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waits[key] = d
        return d

    def exchange(self, data: bytes) -> list[dict[str, Any]]:
        self.server.dataReceived(data)
        return read_frames(self.transport, self.clock)

    def test_success_sends_nothing(self):
        frames = b"".join(request(-i, "record", {"value": i}, noreply=True) for i in range(1, 4))
        self.assertEqual(self.exchange(frames), [])
        self.assertEqual(self.seen, [1, 2, 3])
        self.assertEqual(self.transport.value(), b"")

    def test_refusals_are_answered_and_logged(self):
        [bad_args] = self.exchange(request(-1, "record", {"value": "x"}, noreply=True))
        self.assertEqual(bad_args, {"id": -1, "error": bad_args["error"]})
        self.assertEqual(bad_args["error"]["code"], "BAD_REQUEST")
        [unknown] = self.exchange(request(-2, "nope", {}, noreply=True))
        self.assertEqual(unknown["error"]["code"], "UNKNOWN_METHOD")
        [handler] = self.exchange(request(-3, "fail", {"kind": "not_leader"}, noreply=True))
        self.assertEqual(handler["error"]["code"], "NOT_LEADER")
        self.assertEqual(len(self.logs.refused("invalid arguments")), 1)
        self.assertEqual(len(self.logs.refused("unknown method")), 1)
        self.assertEqual(self.seen, [])
        self.assertFalse(self.transport.disconnecting)

    def test_noreply_must_be_true(self):
        for i, value in enumerate([False, 1, "yes", None, []]):
            [reply] = self.exchange(request(i, "record", {"value": 1}, noreply=value))
            self.assertEqual(reply["error"]["code"], "BAD_REQUEST")
            self.assertIn("noreply must be true", reply["error"]["message"])
        [reply] = self.exchange(request(9, "record", {"value": 1}, noreply=True, extra=1))
        self.assertIn("unknown request field(s) 'extra'", reply["error"]["message"])
        self.assertEqual(self.seen, [])
        self.assertEqual(len(self.logs.refused("malformed request")), 6)

    def test_deferred_handler(self):
        self.assertEqual(self.exchange(request(-1, "later", {"key": "ok"}, noreply=True)), [])
        self.assertEqual(self.exchange(request(-2, "later", {"key": "bad"}, noreply=True)), [])
        self.assertEqual(self.server.in_flight, 2)
        self.waits["ok"].callback("fine")
        self.assertEqual(read_frames(self.transport, self.clock), [])
        self.waits["bad"].errback(errors.Crashed("node is crashed"))
        [reply] = read_frames(self.transport, self.clock)
        self.assertEqual(reply["id"], -2)
        self.assertEqual(reply["error"]["code"], "CRASHED")
        self.assertEqual(self.server.in_flight, 0)

    def test_plain_requests_still_answered(self):
        self.assertEqual(self.exchange(request(5, "record", {"value": 5})), [{"id": 5, "ok": None}])


# ---------------------------------------------------------------------------
# One-way requests through the pool, live on 127.0.0.1
# ---------------------------------------------------------------------------


class NotifyLiveTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = capture_logs(self)
        self.seen: list[int] = []
        table = MethodTable("notify")
        table.add("record", lambda value: self.seen.append(value), [Arg("value", int)])
        self.factory = RpcServerFactory(table, reactor)
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(self.factory)
        self.addCleanup(self.port.stopListening)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.pool = RpcClientPool(reactor, backoff_initial=0.5, backoff_max=1.0, rng=random.Random(SEED))
        self.addCleanup(self.pool.close)

    @defer.inlineCallbacks
    def test_queued_while_connecting_then_sent_in_order(self):
        for i in range(5):
            self.assertTrue(self.pool.notify(self.address, "record", {"value": i}))
        yield wait_for(lambda: len(self.seen) == 5, "five one-way requests to arrive")
        self.assertEqual(self.seen, list(range(5)))
        # On the live connection, in order with calls; no reply to any of them.
        self.assertTrue(self.pool.notify(self.address, "record", {"value": 5}))
        yield self.pool.call(self.address, "record", {"value": 6}, timeout=5)
        self.assertEqual(self.seen, list(range(7)))
        self.assertEqual(self.pool.connection(self.address).replies, 1)

    @defer.inlineCallbacks
    def test_no_delay_on_both_ends(self):
        # One-way requests get no reply for the peer's delayed ACK to ride
        # on: with Nagle on, a second small frame would wait 40 ms for it.
        yield self.pool.call(self.address, "record", {"value": 1}, timeout=5)
        [server_side] = self.factory.connections
        for transport in (server_side.transport, self.pool.connection(self.address).transport):
            self.assertEqual(transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    @defer.inlineCallbacks
    def test_refusals_are_counted(self):
        self.assertTrue(self.pool.notify(self.address, "record", {"value": "not an int"}))
        self.assertTrue(self.pool.notify(self.address, "nope"))
        yield wait_for(
            lambda: (
                self.pool.connection(self.address) is not None
                and self.pool.connection(self.address).refused_notifications == 2
            ),
            "two refusals",
        )
        connection = self.pool.connection(self.address)
        self.assertIsInstance(connection.last_refusal, errors.UnknownMethod)
        self.assertEqual(self.seen, [])
        self.assertEqual(len(self.logs.refused("invalid arguments")), 1)

    @defer.inlineCallbacks
    def test_unreachable_peer_drops_then_backs_off(self):
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            RpcServerFactory(MethodTable(), reactor)
        )
        dead = f"127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        self.assertTrue(self.pool.notify(dead, "record", {"value": 1}))  # queued
        peer = self.pool._peers[dead]
        yield wait_for(lambda: peer.failures == 1, "the connect to fail")
        self.assertEqual(peer.queued, [])
        self.assertFalse(self.pool.notify(dead, "record", {"value": 2}))  # backing off
        self.assertFalse(self.pool.notify("no-port", "record", {"value": 3}))

    def test_too_large_raises(self):
        pool = RpcClientPool(reactor, max_frame_bytes=100)
        self.assertRaises(wire.FrameTooLarge, pool.notify, self.address, "record", {"value": b"x" * 200})

    @defer.inlineCallbacks
    def test_closed_pool_drops(self):
        yield self.pool.close()
        self.assertFalse(self.pool.notify(self.address, "record", {"value": 1}))

    def test_notification_ids_are_negative_and_distinct(self):
        decoder = wire.FrameDecoder()
        frames = list(decoder.feed(encode_notification("m") + encode_notification("m", {"a": 1})))
        ids = [f["id"] for f in frames]
        self.assertTrue(all(i < 0 for i in ids))
        self.assertEqual(len(set(ids)), 2)
        self.assertEqual(frames[1], {"id": ids[1], "method": "m", "args": {"a": 1}, "noreply": True})


# ---------------------------------------------------------------------------
# Raft transport
# ---------------------------------------------------------------------------


def heartbeat(frm: int, to: int, term: int = 1) -> Message:
    return Message(type=MessageType.HEARTBEAT, to=to, frm=frm, term=term, commit=3)


def append(frm: int, to: int, payload: int, entries: int = 1) -> Message:
    return Message(
        type=MessageType.APPEND,
        to=to,
        frm=frm,
        term=2,
        index=5,
        log_term=2,
        entries=[Entry(2, 6 + i, b"x" * payload) for i in range(entries)],
        commit=5,
    )


class RecordingPool:
    """What the transport needs of a pool: ``reactor`` and ``notify``."""

    def __init__(self, clock: Clock, limit: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.reactor = clock
        self.limit = limit
        self.sent: list[tuple[str, str, dict[str, Any]]] = []
        self.accept = True

    def notify(self, address: str, method: str, args: dict[str, Any]) -> bool:
        wire.encode_request(-1, method, args, self.limit, noreply=True)  # raises like the real one
        self.sent.append((address, method, args))
        return self.accept


ADDRESSES = {1: "127.0.0.1:1", 2: "127.0.0.1:2", 3: "127.0.0.1:3"}


class RaftTransportBatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = RecordingPool(self.clock)
        self.transport = RpcRaftTransport(self.pool, 1, ADDRESSES, "g1")

    def test_one_request_per_peer_per_flush(self):
        self.transport.send(append(1, 2, 10))
        self.transport.send(heartbeat(1, 3))
        self.transport.send(heartbeat(1, 2))
        self.clock.advance(1)
        self.assertEqual(self.pool.sent, [])  # queued until the driver flushes, whatever the time
        self.assertEqual(self.transport.pending(), 3)
        self.transport.flush()
        self.assertEqual(
            [(a, m) for a, m, _ in self.pool.sent], [(ADDRESSES[2], "raft"), (ADDRESSES[3], "raft")]
        )
        to_two = self.pool.sent[0][2]
        self.assertEqual(to_two["group"], "g1")
        self.assertEqual([Message.from_wire(w) for w in to_two["msgs"]], [append(1, 2, 10), heartbeat(1, 2)])
        self.assertEqual((self.transport.sent, self.transport.batches), (3, 2))
        self.transport.flush()
        self.assertEqual(len(self.pool.sent), 2)  # flushed once

    def test_large_batches_are_split_by_size(self):
        messages = [append(1, 2, 1024 * 1024) for _ in range(9)]
        for m in messages:
            self.transport.send(m)
        self.transport.flush()
        self.assertGreater(len(self.pool.sent), 2)
        got = [w for _, _, args in self.pool.sent for w in args["msgs"]]
        self.assertEqual([Message.from_wire(w) for w in got], messages)
        for _, _, args in self.pool.sent:
            batch = [Message.from_wire(w) for w in args["msgs"]]
            self.assertLessEqual(sum(len(e.data) for m in batch for e in m.entries), MAX_BATCH_BYTES)

    def test_frame_limit_halves_then_drops_one_too_large(self):
        self.pool.limit = 3000
        logs = capture_logs(self)
        small = [append(1, 2, 600) for _ in range(4)]
        huge = append(1, 2, 5000)
        for m in [*small, huge]:
            self.transport.send(m)
        self.transport.flush()
        got = [Message.from_wire(w) for _, _, args in self.pool.sent for w in args["msgs"]]
        self.assertEqual(got, small)
        self.assertEqual(self.transport.send_failures, 1)
        self.assertTrue([e for e in logs.events if "dropping a raft" in e.get("log_format", "")])

    def test_dropped_by_the_pool_counts_as_failures(self):
        self.pool.accept = False
        self.transport.send(heartbeat(1, 2))
        self.transport.send(heartbeat(1, 2))
        self.transport.flush()
        self.assertEqual(self.transport.send_failures, 2)

    def test_unknown_destination_is_dropped(self):
        self.transport.send(heartbeat(1, 9))
        self.transport.flush()
        self.assertEqual(self.pool.sent, [])


class RaftTransportDeliverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.got: list[Message] = []
        self.crashed = False
        clock = Clock()
        self.transport = RpcRaftTransport(RecordingPool(clock), 2, ADDRESSES, "g1")
        self.transport.set_handler(self.handle)

    def handle(self, message: Message) -> None:
        if self.crashed:
            raise NodeCrashed("node is crashed")
        self.got.append(message)

    def test_batch_in_order(self):
        msgs = [heartbeat(1, 2, term=t) for t in (1, 2, 3)]
        self.transport.deliver("g1", msgs=[m.to_wire() for m in msgs])
        self.assertEqual(self.got, msgs)
        self.transport.deliver("g1", msg=heartbeat(3, 2).to_wire())  # the single form
        self.assertEqual(self.got[-1], heartbeat(3, 2))

    def test_one_bad_message_refuses_the_whole_batch(self):
        good = heartbeat(1, 2).to_wire()
        for bad, fragment in [
            ({"type": "nonsense", "to": 2, "frm": 1}, "malformed raft message [1]"),
            ({**good, "to": 3}, "for node 3 reached node 2"),
            ({**good, "frm": 2}, "from unknown node 2"),
            ({**good, "term": -1}, "malformed raft message [1]"),
            ({**good, "snapshot_meta": {"index": math.inf, "term": 1, "voters": []}}, "malformed"),
        ]:
            with self.assertRaises(errors.BadRequest) as caught:
                self.transport.deliver("g1", msgs=[good, bad])
            self.assertIn(fragment, caught.exception.message)
        self.assertEqual(self.got, [])

    def test_wrong_group_and_shape(self):
        wire_msg = heartbeat(1, 2).to_wire()
        self.assertRaises(errors.BadRequest, self.transport.deliver, "g2", msgs=[wire_msg])
        self.assertRaises(errors.BadRequest, self.transport.deliver, "g1")
        self.assertRaises(errors.BadRequest, self.transport.deliver, "g1", msg=wire_msg, msgs=[wire_msg])
        self.assertEqual(self.got, [])

    def test_crashed_node_refuses_without_taking_anything(self):
        self.crashed = True
        with self.assertRaises(errors.Crashed):
            self.transport.deliver("g1", msgs=[heartbeat(1, 2).to_wire(), heartbeat(3, 2).to_wire()])
        self.assertEqual((self.got, self.transport.received), ([], 0))

    def test_schema_bounds_the_batch(self):
        schema = Schema(RpcRaftTransport.method_args())
        self.assertRaises(_Invalid, schema.validate, {"group": "g1", "msgs": []})
        self.assertRaises(_Invalid, schema.validate, {"group": "g1", "msgs": [1]})
        self.assertRaises(_Invalid, schema.validate, {"group": "g1", "msgs": [{}] * 1025})
        self.assertEqual(schema.validate({"group": "g1", "msgs": [{}]}), {"group": "g1", "msgs": [{}]})


class RaftTransportLiveTests(TestCase):
    """Two transports over real sockets, wired as ReplicaService does."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = capture_logs(self)
        self.got: dict[int, list[Message]] = {1: [], 2: []}
        self.crashed = {1: False, 2: False}
        self.ports: dict[int, Any] = {}
        self.tables: dict[int, MethodTable] = {}
        for node in (1, 2):
            self.tables[node] = MethodTable(f"node{node}")
            self.ports[node] = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
                RpcServerFactory(self.tables[node], reactor)
            )
            self.addCleanup(self.ports[node].stopListening)
        addresses = {n: f"127.0.0.1:{p.getHost().port}" for n, p in self.ports.items()}
        self.pools: dict[int, RpcClientPool] = {}
        self.transports: dict[int, RpcRaftTransport] = {}
        for node in (1, 2):
            self.pools[node] = RpcClientPool(reactor, rng=random.Random(SEED))
            self.addCleanup(self.pools[node].close)
            transport = RpcRaftTransport(self.pools[node], node, addresses, "g1")
            transport.set_handler(lambda m, node=node: self.handle(node, m))
            self.tables[node].add("raft", transport.deliver, RpcRaftTransport.method_args())
            self.transports[node] = transport
        self.addresses = addresses

    def handle(self, node: int, message: Message) -> None:
        if self.crashed[node]:
            raise NodeCrashed("node is crashed")
        self.got[node].append(message)

    @defer.inlineCallbacks
    def test_messages_flow_both_ways_without_replies(self):
        for term in range(1, 41):
            self.transports[1].send(heartbeat(1, 2, term=term))
            if term % 10 == 0:
                self.transports[2].send(heartbeat(2, 1, term=term))
                # As Raft's driver does after a Ready's messages.
                self.transports[1].flush()
                self.transports[2].flush()
                yield wait_for(lambda t=term: len(self.got[2]) == t, f"{term} messages at node 2")
        yield wait_for(lambda: len(self.got[1]) == 4, "the answers at node 1")
        self.assertEqual([m.term for m in self.got[2]], list(range(1, 41)))
        self.assertEqual([m.term for m in self.got[1]], [10, 20, 30, 40])
        self.assertEqual(self.transports[1].batches, 4)  # one frame per flush
        connection = self.pools[1].connection(self.addresses[2])
        self.assertEqual((connection.replies, connection.refused_notifications), (0, 0))

    @defer.inlineCallbacks
    def test_crashed_peer_refuses_with_crashed(self):
        self.crashed[2] = True
        self.transports[1].send(heartbeat(1, 2))
        self.transports[1].flush()
        yield wait_for(
            lambda: (
                self.pools[1].connection(self.addresses[2]) is not None
                and self.pools[1].connection(self.addresses[2]).refused_notifications == 1
            ),
            "the refusal",
        )
        self.assertIsInstance(self.pools[1].connection(self.addresses[2]).last_refusal, errors.Crashed)
        self.assertEqual(self.got[2], [])
        self.crashed[2] = False  # restored: the next message is taken
        self.transports[1].send(heartbeat(1, 2, term=5))
        self.transports[1].flush()
        yield wait_for(lambda: len(self.got[2]) == 1, "the message after restore")

    @defer.inlineCallbacks
    def test_single_message_call_form_is_answered(self):
        result = yield self.pools[1].call(
            self.addresses[2], "raft", {"group": "g1", "msg": heartbeat(1, 2).to_wire()}, timeout=5
        )
        self.assertIsNone(result)
        self.assertEqual(self.got[2], [heartbeat(1, 2)])
