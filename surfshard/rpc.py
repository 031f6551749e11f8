"""The native RPC protocol: pipelined requests over length-prefixed CBOR frames.

Requests are ``{"id", "method", "args"}``; replies are ``{"id", "ok": result}``
or ``{"id", "error": {"code", "message", ...}}``.  Many requests may be in
flight on one connection and replies come back in completion order, matched
by id.

One-way requests (an extension for peer traffic, e.g. Raft messages between
replicas): ``{"id", "method", "args", "noreply": true}``.  The server runs
them like any request but sends nothing when the handler succeeds; a
refusal (malformed, unknown method, bad arguments, the handler's error) is
answered with the usual error reply, so nothing is refused silently.
Senders (``RpcClientPool.notify``) use negative ids for them and only count
the refusals that come back.  Clients that never set ``noreply`` see the
protocol exactly as before.

Server side: a ``MethodTable`` names each method, its handler and a
declarative argument schema (``Arg``/``Value``); arguments are validated
before a handler runs.  Everything the server refuses (undecodable streams,
malformed requests, unknown methods, bad arguments, stalled connections) is
logged with the peer address, what was refused and why, and never takes more
than the one connection down.

Client side: ``RpcConnection`` is one pipelined connection; ``RpcClientPool``
keeps one connection per ``host:port``, connects lazily, reconnects with
capped exponential backoff and jitter, and turns error replies into the typed
exceptions of ``surfshard.errors``.

Cost: every request passes through here, so the hot path avoids work per
request where it can: argument schemas are compiled into one generated
function each (``_SchemaCompiler``), request and reply envelopes are written
by ``wire.encode_request``/``encode_reply``, and the frames of one read are
decoded together (``wire.FrameDecoder``).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import socket
import typing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from surfshard import wire
from surfshard.config import parse_address
from surfshard.errors import (
    BadRequest,
    Forbidden,
    Internal,
    SurfShardError,
    Timeout,
    Unavailable,
    UnknownMethod,
    error_from_wire,
)
from surfshard.tls import TLSFiles, client_options_from_files

__all__ = [
    "Arg",
    "CallContext",
    "Method",
    "MethodTable",
    "RpcClientPool",
    "RpcConnection",
    "RpcServerFactory",
    "RpcServerProtocol",
    "Schema",
    "ServerLimits",
    "Value",
    "encode_notification",
    "format_peer",
    "tune_socket",
]

log = Logger()

_MISSING: Any = object()

#: Request ids are ints that fit in 64 bits, or short strings.
_MAX_ID_STR = 128
_MIN_ID_INT = -(2**63)
_MAX_ID_INT = 2**64 - 1
_REQUEST_KEYS = frozenset({"id", "method", "args", "noreply"})

#: How long a connection we are closing may take to flush before we abort it
#: (a peer that never reads must not hold the socket open forever).
CLOSE_GRACE_SECONDS = 5.0


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    """A value failed validation; ``path`` is filled in while unwinding so
    the success path never pays for building field names."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TYPE_NAMES = {
    str: "str",
    bytes: "bytes",
    int: "int",
    float: "float",
    bool: "bool",
    list: "list",
    dict: "map",
    type(None): "null",
}
_WIRE_TYPES = frozenset(_TYPE_NAMES)
_SIZED = frozenset({str, bytes, list, dict})


class Value:
    """Constraints on one wire value.

    ``type_`` is one of str, bytes, int, float, bool, list, dict (or a tuple
    of them).  Matching is exact: True is not an int, and an int is accepted
    for float (CBOR encoders may shorten 2.0 to 2).  ``min``/``max`` bound
    numbers; ``min_len``/``max_len`` bound len() of str, bytes, list and map;
    ``max_bytes`` bounds the UTF-8 size of a str (or the size of bytes).
    ``items`` validates each list element; ``fields`` gives a nested map a
    schema (no unknown keys); ``keys``/``values`` validate a free-form map.
    ``check`` is called last with the value and may raise BadRequest (or
    ValueError) to refuse it.
    """

    __slots__ = (
        "check",
        "fields",
        "items",
        "keys",
        "max",
        "max_bytes",
        "max_len",
        "min",
        "min_len",
        "nullable",
        "type_name",
        "types",
        "values",
        "_type_and_length_only",
    )

    def __init__(
        self,
        type_: type | tuple[type, ...],
        *,
        nullable: bool = False,
        min: float | None = None,
        max: float | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
        max_bytes: int | None = None,
        items: Value | None = None,
        fields: Sequence[Arg] | None = None,
        keys: Value | None = None,
        values: Value | None = None,
        check: Callable[[Any], object] | None = None,
    ) -> None:
        types = type_ if isinstance(type_, tuple) else (type_,)
        for t in types:
            if t not in _WIRE_TYPES:
                raise TypeError(f"{t!r} is not a wire type")
        accepted = set(types)
        if float in accepted:
            accepted.add(int)
        if nullable:
            accepted.add(type(None))
        self.types = frozenset(accepted)
        self.type_name = " or ".join(_TYPE_NAMES[t] for t in types) + (" or null" if nullable else "")
        self.nullable = nullable
        self.min = min
        self.max = max
        self.min_len = min_len
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.items = items
        self.fields = Schema(fields) if fields is not None else None
        self.keys = keys
        self.values = values
        self.check = check
        self._type_and_length_only = all(
            c is None for c in (min, max, min_len, max_bytes, items, fields, keys, values, check)
        )
        if (min is not None or max is not None) and not accepted <= {int, float, type(None)}:
            raise TypeError("min= and max= only apply to numbers")
        if (items is not None) and list not in types:
            raise TypeError("items= only applies to lists")
        if (fields is not None or keys is not None or values is not None) and dict not in types:
            raise TypeError("fields=, keys= and values= only apply to maps")

    def validate(self, value: Any) -> Any:
        """Return the value (nested maps with a schema come back validated),
        or raise _Invalid."""
        kind = type(value)
        if kind not in self.types:
            raise _Invalid(f"expected {self.type_name}, got {_TYPE_NAMES.get(kind, kind.__name__)}")
        if self._type_and_length_only:
            # The common case (a type and at most a length) in a few steps:
            # this runs for every argument of every request.
            if self.max_len is not None and kind in _SIZED and len(value) > self.max_len:
                raise _Invalid(f"length {len(value)} exceeds {self.max_len}")
            return value
        if value is None:
            return None
        if kind is float and value != value and (self.min is not None or self.max is not None):
            raise _Invalid("must be a number, got NaN")
        if self.min is not None and value < self.min:
            raise _Invalid(f"must be >= {self.min}, got {_short_repr(value)}")
        if self.max is not None and value > self.max:
            raise _Invalid(f"must be <= {self.max}, got {_short_repr(value)}")
        if kind is str or kind is bytes or kind is list or kind is dict:
            size = len(value)
            if self.max_len is not None and size > self.max_len:
                raise _Invalid(f"length {size} exceeds {self.max_len}")
            if self.min_len is not None and size < self.min_len:
                raise _Invalid(f"length {size} is below {self.min_len}")
            if self.max_bytes is not None:
                # A str of n chars is at most 4n UTF-8 bytes: encode only when
                # that bound is not already enough.
                if kind is str and size * 4 > self.max_bytes:
                    size = len(value.encode("utf-8", "surrogatepass"))
                if size > self.max_bytes:
                    raise _Invalid(f"size {size} bytes exceeds {self.max_bytes}")
            if kind is list and self.items is not None:
                validate_item = self.items.validate
                for index, item in enumerate(value):
                    try:
                        validate_item(item)
                    except _Invalid as e:
                        e.path.append(f"[{index}]")
                        raise
            elif kind is dict:
                if self.fields is not None:
                    value = self.fields.validate(value)
                if self.keys is not None or self.values is not None:
                    for key, item in value.items():
                        try:
                            if self.keys is not None:
                                self.keys.validate(key)
                        except _Invalid as e:
                            e.path.append(f"[key {_short_repr(key, 30)}]")
                            raise
                        try:
                            if self.values is not None:
                                self.values.validate(item)
                        except _Invalid as e:
                            e.path.append(f"[{_short_repr(key, 30)}]")
                            raise
        if self.check is not None:
            try:
                self.check(value)
            except BadRequest as e:
                raise _Invalid(e.message) from None
            except ValueError as e:
                raise _Invalid(str(e) or "invalid value") from None
        return value


class Arg:
    """One named argument: ``Arg("name", str, max_bytes=4096)``.

    The second argument is a type (constraints as keywords, see ``Value``)
    or a ready ``Value``.  An argument with a ``default`` is optional and the
    handler gets the default when it is absent (use immutable defaults); an
    argument with ``required=False`` and no default is simply not passed.
    """

    __slots__ = ("default", "name", "required", "value")

    def __init__(
        self,
        name: str,
        type_or_value: type | tuple[type, ...] | Value,
        *,
        required: bool = True,
        default: Any = _MISSING,
        **constraints: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("an argument name must be a non-empty str")
        if isinstance(type_or_value, Value):
            if constraints:
                raise TypeError("pass constraints to Value(...) or to Arg(...), not both")
            self.value = type_or_value
        else:
            self.value = Value(type_or_value, **constraints)
        self.name = name
        self.default = default
        self.required = required and default is _MISSING

    def __repr__(self) -> str:
        return f"Arg({self.name!r}, {self.value.type_name}{'' if self.required else ', optional'})"


class Schema:
    """The arguments of one method (or the fields of a nested map).

    ``validate`` first runs a function generated for this schema (see
    ``_SchemaCompiler``): every check of every argument inlined, no call
    per value.  It only answers "valid, here are the arguments" or "not
    valid"; for the latter the generic validator below runs again to say
    exactly what is wrong (which argument, which rule), so refusals are
    described as before and only the success path is fast.
    """

    __slots__ = ("_args", "_fast", "_names")

    def __init__(self, args: Iterable[Arg] = ()) -> None:
        self._args = tuple(args)
        names = [a.name for a in self._args]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate argument names in {names}")
        self._names = frozenset(names)
        self._fast: Callable[[Any], dict[str, Any] | None] = _SchemaCompiler().compile(self)

    @property
    def args(self) -> tuple[Arg, ...]:
        return self._args

    def validate(self, args: Any) -> dict[str, Any]:
        """Return the validated arguments, defaults filled in; raise _Invalid."""
        out = self._fast(args)
        if out is not None:
            return out
        return self.validate_generic(args)

    def validate_generic(self, args: Any) -> dict[str, Any]:
        """``validate`` by walking the schema: slower, and it names what is
        wrong.  (Also the reference the generated validator is tested against.)"""
        if type(args) is not dict:
            raise _Invalid(f"expected a map, got {_TYPE_NAMES.get(type(args), type(args).__name__)}")
        if not self._names.issuperset(args):
            unknown = sorted(_short_repr(k, 40) for k in args if k not in self._names)
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise _Invalid(f"unknown field(s) {', '.join(unknown[:5])}{more}")
        out: dict[str, Any] = {}
        for arg in self._args:
            value = args.get(arg.name, _MISSING)
            if value is _MISSING:
                if arg.required:
                    error = _Invalid("is required")
                    error.path.append(arg.name)
                    raise error
                if arg.default is not _MISSING:
                    out[arg.name] = arg.default
                continue
            try:
                out[arg.name] = arg.value.validate(value)
            except _Invalid as e:
                e.path.append(arg.name)
                raise
        return out

    def check(self, args: Any, where: str = "args") -> dict[str, Any]:
        """Validate, turning a failure into BadRequest naming the field."""
        try:
            return self.validate(args)
        except _Invalid as e:
            raise BadRequest(_describe(where, e)) from None


def _replaces(value: Value) -> bool:
    """Whether validating ``value`` can give back a new object (a nested map
    with a schema is replaced by its validated copy)."""
    return value.fields is not None


class _SchemaCompiler:
    """Writes the source of one function that validates a Schema.

    The function returns the validated arguments (the same dict the generic
    validator returns) or None for anything the generic validator would
    refuse; it may refuse more (the generic one then decides), never less.
    Constants (types, bounds, defaults, check callables, nested schemas) are
    passed in the function's globals, never written into the source, so no
    value is ever turned into code.  Argument names appear only as string
    literals (repr).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {
            "_MISSING": _MISSING,
            "_CHECK_ERRORS": (BadRequest, ValueError),
        }
        self._names = 0

    def name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def const(self, value: Any) -> str:
        name = self.name("c")
        self.namespace[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def compile(self, schema: Schema) -> Callable[[Any], dict[str, Any] | None]:
        # With no defaults to fill in and no nested map to replace by its
        # validated copy, the validated arguments are the arguments: the
        # function returns the dict it was given (callers get their own
        # copy anyway when it is spread into a handler's keywords).
        copies = any(arg.default is not _MISSING or _replaces(arg.value) for arg in schema.args)
        self.emit(0, "def validate(args):")
        self.emit(1, f"if type(args) is not dict or not {self.const(schema._names.issuperset)}(args):")
        self.emit(2, "return None")
        if copies:
            self.emit(1, "out = {}")
        if any(not arg.required for arg in schema.args):
            self.emit(1, "get = args.get")
        for arg in schema.args:
            key = repr(arg.name)
            var = self.name("v")
            if arg.required:
                self.emit(1, "try:")
                self.emit(2, f"{var} = args[{key}]")
                self.emit(1, "except KeyError:")
                self.emit(2, "return None")
                self.value(arg.value, var, 1)
                if copies:
                    self.emit(1, f"out[{key}] = {var}")
                continue
            self.emit(1, f"{var} = get({key}, _MISSING)")
            if arg.default is not _MISSING:
                self.emit(1, f"if {var} is _MISSING:")
                self.emit(2, f"out[{key}] = {self.const(arg.default)}")
                self.emit(1, "else:")
            else:
                self.emit(1, f"if {var} is not _MISSING:")
            mark = len(self.lines)
            self.value(arg.value, var, 2)
            if copies:
                self.emit(2, f"out[{key}] = {var}")
            elif len(self.lines) == mark:
                self.emit(2, "pass")
        self.emit(1, "return out" if copies else "return args")
        exec("\n".join(self.lines), self.namespace)  # the source is built above from no input
        return self.namespace["validate"]  # type: ignore[no-any-return]

    def value(self, value: Value, var: str, depth: int) -> None:
        """Checks of one value held in ``var``; a refusal returns None."""
        types = value.types
        concrete = types - {type(None)}
        if len(concrete) > 1:
            self.mixed_value(value, var, depth)
            return
        (kind,) = concrete
        refuse = self.number_tests(value, var) + self.size_tests(value, var, kind)
        test = f"type({var}) is not {self.const(kind)}"
        if len(types) == 1:
            # One line for the common case: "type wrong or any bound broken".
            self.emit(depth, f"if {' or '.join([test, *refuse])}:")
            self.emit(depth + 1, "return None")
            inner = depth
        else:  # nullable: the generic validator checks nothing more of a null
            self.emit(depth, f"if {var} is not None:")
            self.emit(depth + 1, f"if {' or '.join([test, *refuse])}:")
            self.emit(depth + 2, "return None")
            inner = depth + 1
        self.contents(value, var, f"type({var})", inner)
        self.check(value, var, inner)

    def mixed_value(self, value: Value, var: str, depth: int) -> None:
        """A value of one of several types: the bounds that apply depend on
        which type it has."""
        kind = self.name("t")
        self.emit(depth, f"{kind} = type({var})")
        self.emit(depth, f"if {kind} not in {self.const(value.types)}:")
        self.emit(depth + 1, "return None")
        inner = depth
        if type(None) in value.types:
            self.emit(depth, f"if {var} is not None:")
            inner = depth + 1
        mark = len(self.lines)
        numbers = self.number_tests(value, var)
        if numbers:
            self.emit(inner, f"if {' or '.join(numbers)}:")
            self.emit(inner + 1, "return None")
        for sized in sorted(value.types & _SIZED, key=lambda t: t.__name__):
            sizes = self.size_tests(value, var, sized)
            if sizes:
                self.emit(inner, f"if {kind} is {self.const(sized)} and ({' or '.join(sizes)}):")
                self.emit(inner + 1, "return None")
        self.contents(value, var, kind, inner)
        self.check(value, var, inner)
        if len(self.lines) == mark and inner != depth:
            self.emit(inner, "pass")

    def check(self, value: Value, var: str, depth: int) -> None:
        if value.check is not None:
            self.emit(depth, "try:")
            self.emit(depth + 1, f"{self.const(value.check)}({var})")
            self.emit(depth, "except _CHECK_ERRORS:")
            self.emit(depth + 1, "return None")

    def number_tests(self, value: Value, var: str) -> list[str]:
        """Conditions that refuse a number.  "not (v >= lo)" rather than
        "v < lo": NaN fails it, as it must."""
        tests = []
        if value.min is not None:
            tests.append(f"not ({var} >= {self.const(value.min)})")
        if value.max is not None:
            tests.append(f"not ({var} <= {self.const(value.max)})")
        return tests

    def size_tests(self, value: Value, var: str, kind: type) -> list[str]:
        """Conditions that refuse a value of type ``kind`` for its size."""
        if kind not in _SIZED:
            return []
        tests = []
        if value.max_len is not None:
            tests.append(f"len({var}) > {self.const(value.max_len)}")
        if value.min_len is not None:
            tests.append(f"len({var}) < {self.const(value.min_len)}")
        if value.max_bytes is not None:
            limit = self.const(value.max_bytes)
            if kind is str:
                # A str of n chars is at most 4n UTF-8 bytes: encode only
                # when that bound is not already enough (as the generic one).
                tests.append(
                    f"(len({var}) * 4 > {limit} and len({var}.encode('utf-8', 'surrogatepass')) > {limit})"
                )
            else:
                tests.append(f"len({var}) > {limit}")
        return tests

    def contents(self, value: Value, var: str, kind: str, depth: int) -> None:
        if value.items is not None:
            loop = depth
            if len(value.types - {type(None)}) > 1:
                self.emit(depth, f"if {kind} is list:")
                loop = depth + 1
            item = self.name("i")
            self.emit(loop, f"for {item} in {var}:")
            self.value(value.items, item, loop + 1)
        if value.fields is None and value.keys is None and value.values is None:
            return
        if len(value.types - {type(None)}) > 1:
            self.emit(depth, f"if {kind} is dict:")
            depth += 1
        if value.fields is not None:
            # The nested map is replaced by its validated copy, as the
            # generic validator does.
            self.emit(depth, f"{var} = {self.const(value.fields._fast)}({var})")
            self.emit(depth, f"if {var} is None:")
            self.emit(depth + 1, "return None")
        if value.keys is not None or value.values is not None:
            key, item = self.name("k"), self.name("i")
            self.emit(depth, f"for {key}, {item} in {var}.items():")
            if value.keys is not None:
                self.value(value.keys, key, depth + 1)
            if value.values is not None:
                self.value(value.values, item, depth + 1)
            else:
                self.emit(depth + 1, "pass")


def _describe(where: str, error: _Invalid) -> str:
    path = where
    for part in reversed(error.path):
        path += part if part.startswith("[") else f".{part}"
    return f"{path}: {error.message}"


# ---------------------------------------------------------------------------
# Method tables
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    handler: Callable[..., Any]
    schema: Schema
    #: The handler takes a CallContext as its first positional argument.
    pass_context: bool = False
    #: The handler takes a ``Reply`` as its first positional argument and
    #: answers through it (returning nothing) instead of returning a result
    #: or a Deferred.
    takes_reply: bool = False


class CallContext:
    """Who is calling, for handlers that need it (authorisation, logging)."""

    __slots__ = ("method", "peer", "request_id", "transport")

    def __init__(self, peer: str, method: str, request_id: int | str, transport: Any) -> None:
        self.peer = peer
        self.method = method
        self.request_id = request_id
        self.transport = transport

    def peer_certificate(self) -> Any:
        """The peer's TLS certificate (pyOpenSSL X509), or None without TLS."""
        get = getattr(self.transport, "getPeerCertificate", None)
        return get() if get is not None else None


class Reply:
    """The answer owed to one request, for a method registered with
    ``takes_reply=True``: the handler gets it as its first argument and
    calls ``callback(result)`` or ``errback(error)`` once, now or later (it
    is a ReplySink, like a Deferred). No Deferred is made for the request,
    which is most of the per-request cost a busy server can still shed
    once its handler batches the real work.

    ``called`` is true once it was answered, or cancelled because the
    connection went away (answering then does nothing)."""

    __slots__ = ("_protocol", "_quiet", "called", "method", "request_id")

    def __init__(self, protocol: RpcServerProtocol, request_id: int | str, method: str, quiet: bool) -> None:
        self._protocol = protocol
        self.request_id = request_id
        self.method = method
        self._quiet = quiet
        self.called = False

    def callback(self, result: Any) -> None:
        if self.called:
            return
        self.called = True
        if self._quiet:
            self._protocol._finish_quietly(result, self.request_id, self.method)
        else:
            self._protocol._finish_ok(result, self.request_id, self.method)

    def errback(self, error: BaseException | Failure) -> None:
        if self.called:
            return
        self.called = True
        failure = error if isinstance(error, Failure) else Failure(error)
        self._protocol._finish_error(failure, self.request_id, self.method)

    def cancel(self) -> None:
        """The connection is gone: nobody is left to answer."""
        self.called = True


class MethodTable:
    """The methods one service exposes: name -> handler + argument schema.

    Handlers are called with the validated arguments as keywords and may
    return a value or a Deferred.  Raising (or failing with) a SurfShardError
    sends that error; anything else becomes INTERNAL.
    """

    def __init__(self, service: str = "rpc") -> None:
        self.service = service
        self._methods: dict[str, Method] = {}

    def add(
        self,
        name: str,
        handler: Callable[..., Any],
        args: Sequence[Arg] = (),
        *,
        pass_context: bool = False,
        takes_reply: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("a method name must be a non-empty str")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered in {self.service}")
        if pass_context and takes_reply:
            raise ValueError("a handler takes a CallContext or a Reply, not both")
        self._methods[name] = Method(name, handler, Schema(args), pass_context, takes_reply)

    def method(
        self, name: str, *args: Arg, pass_context: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of ``add``."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.add(name, handler, args, pass_context=pass_context)
            return handler

        return register

    def include(self, other: MethodTable) -> None:
        """Serve another service's methods on the same connection."""
        clash = self._methods.keys() & other._methods.keys()
        if clash:
            raise ValueError(f"methods registered twice: {sorted(clash)}")
        self._methods.update(other._methods)

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __len__(self) -> int:
        return len(self._methods)


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerLimits:
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    #: Requests a connection may have running; beyond it we stop reading
    #: from the socket (TCP pushes back on the client) until some finish.
    max_in_flight: int = 256
    #: Close a connection that has sent part of a frame and then nothing
    #: for this many seconds (slow or half-open peers).  None disables it.
    idle_timeout: float | None = 30.0


def format_peer(transport: Any) -> str:
    """``host:port`` of the other end, for logs."""
    try:
        address = transport.getPeer()
    except Exception:
        return "unknown"
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: Dead-peer detection in the kernel: probe an idle connection after 15 s
#: (every 5 s, 3 misses), and drop one whose sent data stays unacknowledged
#: for 30 s.  A peer host that vanished (power loss, partition) would
#: otherwise hold a connection, and every call on it, for hours.  A paused
#: but living process still has its kernel acknowledge, so it is not dropped.
#:
#: TCP_NODELAY: Nagle's algorithm holds a small segment while an earlier one
#: is unacknowledged, and the peer delays its ACK (40 ms on Linux) unless it
#: has data to send back.  One-way requests (Raft traffic) get no reply for
#: the ACK to ride on, so without this every other batch waited 40 ms.
#: Writes are already gathered per reactor turn, so it adds no small packets.
_SOCKET_OPTIONS = [
    (name, value)
    for name, value in (
        ("TCP_NODELAY", 1),
        ("TCP_KEEPIDLE", 15),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 30_000),
    )
    if hasattr(socket, name)
]


def tune_socket(transport: Any) -> bool:
    """Turn on no-delay, keepalive and the dead-peer timeouts above for the
    TCP socket under ``transport`` (looking through a TLS wrapper); False if
    there is no socket to tune (test transports)."""
    for _ in range(3):  # TCP, or TLS around TCP: bounded walk down the wrappers
        sock = getattr(transport, "socket", None)
        if sock is not None:
            break
        transport = getattr(transport, "transport", None)
        if transport is None:
            return False
    else:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _SOCKET_OPTIONS:
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        return False
    return True


def _usable_id(request_id: Any) -> bool:
    kind = type(request_id)
    if kind is int:
        return _MIN_ID_INT <= request_id <= _MAX_ID_INT
    return kind is str and 0 < len(request_id) <= _MAX_ID_STR


class RpcServerProtocol(Protocol):
    """One server-side connection of the native protocol."""

    def __init__(self, table: MethodTable, clock: IReactorTime, limits: ServerLimits | None = None) -> None:
        self.table = table
        self.clock = clock
        self.limits = limits = limits or ServerLimits()
        self.peer = "unknown"
        self._decoder = wire.FrameDecoder(limits.max_frame_bytes)
        self._max_frame_bytes = limits.max_frame_bytes
        # The table's name -> Method dict, looked up once per request.
        self._methods = table._methods
        # Requests whose handler returned a Deferred that has not fired yet.
        # (A synchronous handler finishes before the next frame is read.)
        self._running: dict[int | str, Deferred[Any] | Reply] = {}
        self._backlog: deque[dict[Any, Any]] = deque()
        # Replies produced while we are handling a batch of input go out in
        # one write at the end of it, not one write per reply.
        self._out: list[bytes] | None = None
        self._paused = False
        self._closing = False
        self._lost = False
        self._last_rx = 0.0
        self._idle_timer: Any = None
        self._abort_timer: Any = None
        self._on_lost: list[Callable[[Failure], object]] = []

    # -- connection lifecycle ------------------------------------------------

    def connectionMade(self) -> None:
        self.peer = format_peer(self.transport)
        # The kernel reaps peers that vanished (see tune_socket); the idle
        # timeout covers peers that are there but stuck mid-frame.
        tune_socket(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._decoder.buffered and not self._closing:
            self._refuse(
                "truncated frame",
                f"connection closed with {self._decoder.buffered} bytes of an unfinished frame",
            )
        self._lost = True
        self._out = None
        for timer in (self._idle_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._abort_timer = None
        self._backlog.clear()
        running = list(self._running.values())
        self._running.clear()
        # Nobody is left to answer: tell the handlers to stop waiting.
        for d in running:
            d.cancel()
        callbacks, self._on_lost = self._on_lost, []
        for notify in callbacks:
            notify(reason)

    def notify_lost(self, callback: Callable[[Failure], object]) -> None:
        self._on_lost.append(callback)

    @property
    def in_flight(self) -> int:
        """Requests whose handlers have not finished."""
        return len(self._running)

    @property
    def paused(self) -> bool:
        """True while we stopped reading because of the in-flight cap."""
        return self._paused

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_rx = self.clock.seconds()
        self._out = []
        try:
            self._read(self._decoder.feed(data))
        finally:
            self._flush()
            self._out = None
        if self._decoder.buffered and self._idle_timer is None and not (self._paused or self._closing):
            self._arm_idle_timer(self.limits.idle_timeout)

    def _read(self, frames: Iterator[dict[Any, Any]]) -> None:
        limit = self.limits.max_in_flight
        while True:
            try:
                for frame in frames:
                    if self._closing:
                        return
                    if self._paused or len(self._running) >= limit:
                        self._hold(frame)
                    else:
                        self._handle(frame)
                return
            except wire.FrameError as e:
                if e.recoverable and _usable_id(e.frame_id):
                    # Well-framed but refused (CBOR tags): answer it, read on.
                    self._reject(e.frame_id, "malformed request", BadRequest(e.message))
                    frames = self._decoder.feed(b"")
                    continue
                self._refuse("undecodable stream", e.message, reason=e.reason)
                self._close()
                return

    def _hold(self, frame: dict[Any, Any]) -> None:
        """Over the in-flight cap: park the frame and stop reading.

        The backlog is bounded by what was already read when we paused."""
        self._backlog.append(frame)
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _drain_backlog(self) -> None:
        corked = self._out is None
        if corked:
            self._out = []
        try:
            while self._backlog and len(self._running) < self.limits.max_in_flight and not self._closing:
                self._handle(self._backlog.popleft())
        finally:
            if corked:
                self._flush()
                self._out = None
        if not self._backlog and self._paused and not self._closing and not self._lost:
            self._paused = False
            self._last_rx = self.clock.seconds()
            self.transport.resumeProducing()
            if self._decoder.buffered and self._idle_timer is None:
                self._arm_idle_timer(self.limits.idle_timeout)

    def _handle(self, frame: dict[Any, Any]) -> None:
        request_id = frame.get("id", _MISSING)
        if type(request_id) is not int or not _MIN_ID_INT <= request_id <= _MAX_ID_INT:
            if not _usable_id(request_id):
                self._refuse(
                    "request without a usable id",
                    f"id is {_short_repr(request_id) if request_id is not _MISSING else 'missing'}",
                )
                self._close()
                return
        method_name = frame.get("method")
        args = frame.get("args")
        # A one-way request ("noreply": true) is answered only if refused.
        reply = len(frame) == 3
        if not reply and (len(frame) != 4 or frame.get("noreply") is not True):
            method_name = None  # malformed: reported below
        if type(method_name) is not str or type(args) is not dict:
            self._reject(request_id, "malformed request", BadRequest(self._request_problem(frame)))
            return
        running = self._running
        if running and request_id in running:
            self._reject(
                request_id,
                "duplicate request id",
                BadRequest(f"request id {_short_repr(request_id)} is already in flight"),
            )
            return
        method = self._methods.get(method_name)
        if method is None:
            self._reject(
                request_id,
                "unknown method",
                UnknownMethod(f"no method {_short_repr(method_name)}"),
                method=method_name,
            )
            return
        try:
            kwargs = method.schema._fast(args)
            if kwargs is None:
                kwargs = method.schema.validate_generic(args)  # says what is wrong
        except _Invalid as e:
            self._reject(
                request_id, "invalid arguments", BadRequest(_describe("args", e)), method=method_name
            )
            return
        except Exception:  # a check callable with a bug: that request fails, not the connection
            self._send_error(Failure(), request_id, method_name)
            return
        if method.takes_reply:
            sink = running[request_id] = Reply(self, request_id, method_name, not reply)
            try:
                method.handler(sink, **kwargs)
            except Exception:
                failure = Failure()
                if not sink.called:
                    sink.errback(failure)
                else:
                    log.failure("rpc: {method} raised after answering", failure, method=method_name)
            return
        try:
            if method.pass_context:
                result = method.handler(
                    CallContext(self.peer, method_name, request_id, self.transport), **kwargs
                )
            else:
                result = method.handler(**kwargs)
        except Exception:
            self._send_error(Failure(), request_id, method_name)
            return
        # type() first: isinstance against Deferred (an ABC subclass) is slow.
        if type(result) is not Deferred and (type(result) in _WIRE_TYPES or not isinstance(result, Deferred)):
            if reply:
                self._send_ok(result, request_id, method_name)
            return
        running[request_id] = result
        result.addCallbacks(
            self._finish_ok if reply else self._finish_quietly,
            self._finish_error,
            callbackArgs=(request_id, method_name),
            errbackArgs=(request_id, method_name),
        )

    @staticmethod
    def _request_problem(frame: dict[Any, Any]) -> str:
        unknown = [k for k in frame if k not in _REQUEST_KEYS]
        if unknown:
            return f"unknown request field(s) {', '.join(sorted(_short_repr(k, 40) for k in unknown)[:5])}"
        if "noreply" in frame and frame["noreply"] is not True:
            return f"noreply must be true if present, got {_short_repr(frame['noreply'])}"
        if "method" not in frame:
            return "request has no method"
        if type(frame["method"]) is not str:
            return f"method must be a str, got {_short_repr(frame['method'])}"
        if "args" not in frame:
            return "request has no args"
        return f"args must be a map, got {_TYPE_NAMES.get(type(frame['args']), type(frame['args']).__name__)}"

    # -- output --------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            self.transport.write(frame)

    def _flush(self) -> None:
        out = self._out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _finish_ok(self, result: Any, request_id: int | str, method_name: str) -> None:
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            return
        try:
            frame = wire.encode_reply(request_id, result, self._max_frame_bytes)
        except wire.FrameError:
            self._send_ok(result, request_id, method_name)  # logs why, sends INTERNAL
        else:
            out = self._out
            if out is not None:
                out.append(frame)
            else:
                self.transport.write(frame)
        if self._backlog:
            self._drain_backlog()

    def _finish_quietly(self, result: Any, request_id: int | str, method_name: str) -> None:
        """A one-way request's handler finished: nothing to send."""
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            return
        if self._backlog:
            self._drain_backlog()

    def _finish_error(self, failure: Failure, request_id: int | str, method_name: str) -> None:
        if self._running.pop(request_id, _MISSING) is _MISSING or self._lost:
            # Cancelled because the peer left, or answered already.
            if not failure.check(CancelledError):
                log.failure(
                    "rpc: {method} from {peer} failed after the connection closed",
                    failure,
                    method=method_name,
                    peer=self.peer,
                )
            return
        self._send_error(failure, request_id, method_name)
        if self._backlog:
            self._drain_backlog()

    def _send_ok(self, result: Any, request_id: int | str, method_name: str) -> None:
        try:
            frame = wire.encode_reply(request_id, result, self._max_frame_bytes)
        except wire.FrameError as e:
            log.error(
                "rpc: reply to {method} from {peer} cannot be sent: {why}",
                method=method_name,
                peer=self.peer,
                why=e.message,
            )
            frame = self._error_frame(
                request_id, Internal(f"the reply to {method_name} could not be encoded")
            )
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            self.transport.write(frame)

    def _send_error(self, failure: Failure, request_id: int | str, method_name: str) -> None:
        error = failure.value
        if isinstance(error, SurfShardError):
            if isinstance(error, (BadRequest, Forbidden)):
                self._refuse(f"{method_name} call", str(error), request_id=request_id, method=method_name)
        else:
            log.failure(
                "rpc: {method} (id {request_id}) from {peer} raised",
                failure,
                method=method_name,
                request_id=request_id,
                peer=self.peer,
            )
            # The caller learns that it failed, not our internals.
            error = Internal(f"internal error in {method_name}")
        self._send(self._error_frame(request_id, error))

    def _error_frame(self, request_id: int | str, error: SurfShardError) -> bytes:
        try:
            return wire.encode_frame(
                {"id": request_id, "error": error.to_wire()}, self.limits.max_frame_bytes, strict=True
            )
        except wire.FrameError:
            # Details that cannot be encoded are dropped, the code survives.
            plain = {"code": error.code.value, "message": str(error.message)[:1000]}
            return wire.encode_frame({"id": request_id, "error": plain})

    def _reject(self, request_id: int | str, what: str, error: SurfShardError, **fields: Any) -> None:
        self._refuse(what, error.message, request_id=request_id, **fields)
        self._send(self._error_frame(request_id, error))

    def _refuse(self, what: str, why: str, **fields: Any) -> None:
        log.warn("rpc: refused {what} from {peer}: {why}", what=what, peer=self.peer, why=why, **fields)

    # -- closing and timers --------------------------------------------------

    def _close(self) -> None:
        """Stop reading, flush what was written, then close; abort if the
        peer will not take the flush."""
        if self._closing:
            return
        self._closing = True
        self._backlog.clear()
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self._flush()
        self.transport.loseConnection()
        if not self._lost:
            self._abort_timer = self.clock.callLater(CLOSE_GRACE_SECONDS, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        if not self._lost:
            self.transport.abortConnection()

    def _arm_idle_timer(self, delay: float | None) -> None:
        if delay is None:
            return
        self._idle_timer = self.clock.callLater(delay, self._idle_check)

    def _idle_check(self) -> None:
        """A partial frame is waiting: close if nothing arrived for the whole
        timeout, else check again when it would have run out."""
        self._idle_timer = None
        timeout = self.limits.idle_timeout
        if self._closing or self._lost or self._paused or not self._decoder.buffered or timeout is None:
            return
        quiet = self.clock.seconds() - self._last_rx
        if quiet >= timeout - 1e-9:
            self._refuse(
                "idle connection",
                f"{self._decoder.buffered} bytes of a partial frame and nothing for {quiet:.1f}s",
            )
            self._close()
            self.transport.abortConnection()
        else:
            self._arm_idle_timer(timeout - quiet)


class RpcServerFactory(ServerFactory):
    """Builds server connections for one method table; tracks them so a
    service can report or close them."""

    noisy = False

    def __init__(self, table: MethodTable, clock: IReactorTime, limits: ServerLimits | None = None) -> None:
        self.table = table
        self.clock = clock
        self.limits = limits or ServerLimits()
        self.connections: set[RpcServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> RpcServerProtocol:
        proto = RpcServerProtocol(self.table, self.clock, self.limits)
        proto.factory = self
        self.connections.add(proto)
        proto.notify_lost(lambda _reason: self.connections.discard(proto))
        return proto


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


#: Ids of one-way requests: negative, so that a refusal coming back is told
#: apart from a late reply to a call (positive ids); process-wide, so that
#: no two are alike on one connection.  (At a million a second, 2**63 of
#: them last 290,000 years.)
_notification_ids = itertools.count(-1, -1)


def encode_notification(
    method: str, args: Mapping[str, Any] | None = None, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """The frame of a one-way request: ``{"id", "method", "args",
    "noreply": true}`` with a fresh negative id.  A server runs it like any
    request but sends nothing back unless it refuses it (bad arguments,
    unknown method, a handler's error): then an error reply with that id.
    Raises ``wire.FrameError`` if it cannot be encoded."""
    return wire.encode_request(
        next(_notification_ids), method, {} if args is None else args, max_frame_bytes, noreply=True
    )


class ReplySink(typing.Protocol):
    """Where the outcome of a call goes: a Deferred, or anything that takes
    a result and an exception the same way (see ``RpcConnection.call_into``
    and ``Reply``). ``called``: it has its outcome already (or was
    cancelled), so answering it again does nothing useful."""

    @property
    def called(self) -> bool: ...

    def callback(self, result: Any) -> object: ...

    def errback(self, fail: BaseException) -> object: ...


class RpcConnection(Protocol):
    """The client side of one native connection, with pipelined calls.

    Call timeouts share one timer per connection (a heap of deadlines)
    instead of one reactor timer per call: with many calls in flight,
    scheduling and cancelling a timer per call was a large part of a round
    trip's cost.
    """

    def __init__(self, clock: IReactorTime, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes
        self.peer = "unknown"
        self.connected = False
        #: Replies received (a TLS failure before the first one counts as a
        #: failed connection attempt).
        self.replies = 0
        #: Error replies to one-way requests, and the last one as an exception.
        self.refused_notifications = 0
        self.last_refusal: SurfShardError | None = None
        self._decoder = wire.FrameDecoder(max_frame_bytes)
        # call id -> (Deferred or other ReplySink, method name)
        self._pending: dict[int, tuple[ReplySink, str]] = {}
        self._next_id = 1
        # (deadline, call id) of calls with a timeout; entries of calls that
        # finished are dropped lazily.
        self._deadlines: list[tuple[float, int]] = []
        self._timer: Any = None
        self._timer_at = math.inf
        # Requests made while we handle a batch of replies (typically the
        # callers' next calls) go out in one write at the end of it.
        self._out: list[bytes] | None = None
        self._lost_reason: Failure | None = None
        self._on_lost: list[Callable[[Failure], object]] = []

    def connectionMade(self) -> None:
        self.connected = True
        self.peer = format_peer(self.transport)
        tune_socket(self.transport)

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered, timed out or cancelled."""
        return len(self._pending)

    def call(
        self, method: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """Send one request; the Deferred fires with the result, or fails with
        the typed error the server answered, Unavailable if the connection is
        or goes down, Timeout after ``timeout`` seconds.  Cancelling it
        forgets the call (a late reply is ignored)."""
        if not self.connected:
            return defer.fail(Unavailable(f"not connected to {self.peer}"))
        call_id = self._next_id
        pending = self._pending
        d: Deferred[Any] = Deferred(lambda _d: pending.pop(call_id, None))
        try:
            self._send_call(call_id, d, method, args, timeout)
        except wire.FrameError as e:
            return defer.fail(BadRequest(f"cannot send {method}: {e.message}"))
        return d

    def call_into(
        self,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """``call`` for a caller that already holds what its own caller waits
        on: the outcome goes to ``sink.callback(result)`` or
        ``sink.errback(exception)`` (a Deferred is such a sink), and no
        Deferred is made for the call. Returns the call id, for ``forget``.
        Raises Unavailable if not connected, BadRequest if the request cannot
        be encoded (nothing is sent then)."""
        if not self.connected:
            raise Unavailable(f"not connected to {self.peer}")
        call_id = self._next_id
        try:
            self._send_call(call_id, sink, method, args, timeout)
        except wire.FrameError as e:
            raise BadRequest(f"cannot send {method}: {e.message}") from None
        return call_id

    def forget(self, call_id: int) -> None:
        """Drop a call made with ``call_into``: a late reply is ignored and
        its sink is never called."""
        self._pending.pop(call_id, None)

    def _send_call(
        self,
        call_id: int,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> None:
        self._next_id = call_id + 1
        frame = wire.encode_request(call_id, method, {} if args is None else args, self.max_frame_bytes)
        pending = self._pending
        pending[call_id] = (sink, method)
        if timeout is not None:
            # One timer per connection: a heap of (deadline, call id).
            deadline = self.clock.seconds() + timeout
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(pending) + 256:
                self._compact_deadlines()
            heapq.heappush(deadlines, (deadline, call_id))
            if deadline < self._timer_at:
                self._schedule(deadline)
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            self.transport.write(frame)

    def notify(self, method: str, args: Mapping[str, Any] | None = None) -> bool:
        """Send a one-way request (``"noreply": true``): the server answers
        it only if it refuses it, and such refusals are only counted
        (``refused_notifications``, ``last_refusal``).  False if not
        connected; raises ``wire.FrameError`` if it cannot be encoded."""
        if not self.connected:
            return False
        self.send_notification(encode_notification(method, args, self.max_frame_bytes))
        return True

    def send_notification(self, frame: bytes) -> None:
        """Write a frame made by ``encode_notification``."""
        out = self._out
        if out is not None:
            out.append(frame)
        else:
            self.transport.write(frame)

    # -- timeouts --------------------------------------------------------------

    def _compact_deadlines(self) -> None:
        """Mostly answered calls: rebuild rather than let the heap grow with
        the call rate times the timeout."""
        pending = self._pending
        deadlines = self._deadlines
        deadlines[:] = [entry for entry in deadlines if entry[1] in pending]
        heapq.heapify(deadlines)

    def _schedule(self, deadline: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()), self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        deadlines = self._deadlines
        pending = self._pending
        now = self.clock.seconds()
        # A timer can fire a hair early in float arithmetic: allow for it.
        while deadlines and deadlines[0][0] <= now + 1e-9:
            _, call_id = heapq.heappop(deadlines)
            call = pending.pop(call_id, None)
            if call is not None:
                call[0].errback(Timeout(f"{call[1]} to {self.peer} got no reply in time"))
        while deadlines and deadlines[0][1] not in pending:
            heapq.heappop(deadlines)
        if deadlines and self._timer is None:
            self._schedule(deadlines[0][0])

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_at = math.inf
        self._deadlines = []

    # -- replies ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._out = []
        try:
            self._read(self._decoder.feed(data))
        finally:
            out, self._out = self._out, None
            if out and self.connected:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _read(self, frames: Iterator[dict[Any, Any]]) -> None:
        pending = self._pending
        while True:
            try:
                for frame in frames:
                    call_id = frame.get("id")
                    call = pending.pop(call_id, None) if type(call_id) is int else None
                    if call is None:
                        if type(call_id) is not int:
                            # We only send int ids: this is not a reply of ours.
                            self._protocol_error(f"reply without a usable id: {_short_repr(frame)}")
                            return
                        if call_id < 0:
                            self._notification_refused(frame)
                        continue  # normal after a timeout or cancel: the reply came late
                    self.replies += 1
                    if "ok" in frame:
                        call[0].callback(frame["ok"])
                    elif "error" in frame:
                        call[0].errback(error_from_wire(frame["error"]))
                    else:
                        call[0].errback(Internal(f"malformed reply to {call[1]}"))
                return
            except wire.FrameError as e:
                if e.recoverable and type(e.frame_id) is int:
                    # One reply we refuse to decode (CBOR tags): fail that call only.
                    call = pending.pop(e.frame_id, None)
                    if call is not None:
                        call[0].errback(Internal(f"reply to {call[1]} could not be decoded: {e.message}"))
                    frames = self._decoder.feed(b"")
                    continue
                self._protocol_error(f"undecodable reply stream: {e.message}")
                return

    def _notification_refused(self, frame: dict[Any, Any]) -> None:
        """The server refused a one-way request (negative ids are ours for
        those): there is no caller to tell, so count it for status and tests."""
        self.refused_notifications += 1
        error = frame.get("error")
        if type(error) is dict:
            self.last_refusal = error_from_wire(error)

    def _protocol_error(self, why: str) -> None:
        log.warn("rpc: dropping connection to {peer}: {why}", peer=self.peer, why=why)
        self.transport.abortConnection()

    # -- loss ------------------------------------------------------------------

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._lost_reason = reason
        self._stop_timer()
        # Owners (the pool) learn first, so that callers reacting to the
        # failures below already get a fresh connection for their retries.
        callbacks, self._on_lost = self._on_lost, []
        for notify in callbacks:
            notify(reason)
        pending, self._pending = self._pending, {}
        why = reason.getErrorMessage()
        for d, method in pending.values():
            d.errback(Unavailable(f"connection to {self.peer} lost during {method}: {why}"))

    def notify_lost(self, callback: Callable[[Failure], object]) -> None:
        """Call ``callback(reason)`` when the connection is gone (at once if
        it already is)."""
        if self._lost_reason is not None:
            callback(self._lost_reason)
        else:
            self._on_lost.append(callback)

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.notify_lost(lambda _reason: d.callback(None))
        return d


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, clock: IReactorTime, max_frame_bytes: int) -> None:
        self.clock = clock
        self.max_frame_bytes = max_frame_bytes

    def buildProtocol(self, addr: Any) -> RpcConnection:
        proto = RpcConnection(self.clock, self.max_frame_bytes)
        proto.factory = self
        return proto


class _Peer:
    """Connection state for one address."""

    __slots__ = (
        "address",
        "connecting",
        "connection",
        "failures",
        "last_error",
        "queued",
        "queued_bytes",
        "retry_at",
        "waiters",
    )

    def __init__(self, address: str) -> None:
        self.address = address
        self.connection: RpcConnection | None = None
        self.connecting: Deferred[Any] | None = None
        self.waiters: list[Deferred[RpcConnection]] = []
        # One-way request frames waiting for the connection being made.
        self.queued: list[bytes] = []
        self.queued_bytes = 0
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""


#: One-way requests a pool holds for one peer while it connects: beyond
#: either bound more are dropped (their senders tolerate loss).
MAX_QUEUED_NOTIFICATIONS = 256
MAX_QUEUED_NOTIFICATION_BYTES = 32 * 1024 * 1024


class RpcClientPool:
    """One lazily made, reused connection per ``host:port``.

    After a failed connect (or TLS handshake) calls to that address fail
    fast with Unavailable until a backoff delay has passed:
    ``backoff_initial * 2**(failures-1)``, capped at
    ``backoff_max``, scaled by a random factor in [0.5, 1] so that many
    clients do not reconnect in lockstep.  The first call after the delay
    tries again.
    """

    def __init__(
        self,
        reactor: Any,
        tls: TLSFiles | None = None,
        *,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self._factory = _ClientFactory(reactor, max_frame_bytes)
        self._peers: dict[str, _Peer] = {}
        self._tls_creators: dict[str, Any] = {}
        self._closed = False

    # -- public --------------------------------------------------------------

    def call(
        self, address: str, method: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Deferred[Any]:
        """Call ``method`` on the node at ``address``; see RpcConnection.call.
        ``timeout`` covers connecting as well as the call itself."""
        peer = self._peers.get(address)
        if peer is not None and peer.connection is not None and peer.connection.connected:
            return peer.connection.call(method, args, timeout)
        if self._closed:
            return defer.fail(Unavailable("the client pool is closed"))
        if peer is None:
            try:
                parse_address(address)
            except ValueError as e:
                return defer.fail(BadRequest(str(e)))
            peer = self._peers[address] = _Peer(address)
        now = self.reactor.seconds()
        if peer.retry_at > now:
            return defer.fail(
                Unavailable(
                    f"{address} is unavailable (next attempt in {peer.retry_at - now:.2f}s): {peer.last_error}"
                )
            )
        started = now
        waiter = self._wait_for_connection(peer)
        if timeout is not None:
            waiter.addTimeout(
                timeout, self.reactor, onTimeoutCancel=self._connect_timed_out(address, timeout)
            )

        def send(connection: RpcConnection) -> Deferred[Any]:
            remaining = None if timeout is None else timeout - (self.reactor.seconds() - started)
            if remaining is not None and remaining <= 0:
                return defer.fail(Timeout(f"{method} to {address} ran out of time while connecting"))
            return connection.call(method, args, remaining)

        return waiter.addCallback(send)

    def call_into(
        self,
        address: str,
        sink: ReplySink,
        method: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[RpcConnection, int] | None:
        """``call``'s fast path for a caller holding its own sink (see
        ``RpcConnection.call_into``): sends on an established connection and
        returns it with the call id (to ``forget`` the call); None, having
        sent nothing, when there is no such connection (use ``call``, which
        connects). Raises BadRequest if the request cannot be encoded."""
        peer = self._peers.get(address)
        if peer is None:
            return None
        connection = peer.connection
        if connection is None or not connection.connected:
            return None
        return connection, connection.call_into(sink, method, args, timeout)

    def notify(self, address: str, method: str, args: Mapping[str, Any] | None = None) -> bool:
        """Send a one-way request (see ``RpcConnection.notify``) to the node
        at ``address``; never waits.  True once it is written, or queued
        behind the connection being made (sent when it is up, dropped if it
        fails); False if it was dropped at once: the pool is closed, the
        address is bad, the address is backing off after failed connects,
        or too much is queued for it already.  Raises ``wire.FrameError``
        (e.g. FrameTooLarge) if it cannot be encoded."""
        frame = encode_notification(method, args, self._factory.max_frame_bytes)
        peer = self._peers.get(address)
        if peer is not None:
            connection = peer.connection
            if connection is not None and connection.connected:
                connection.send_notification(frame)
                return True
        if self._closed:
            return False
        if peer is None:
            try:
                parse_address(address)
            except ValueError:
                return False
            peer = self._peers[address] = _Peer(address)
        if peer.retry_at > self.reactor.seconds():
            return False
        if (
            len(peer.queued) >= MAX_QUEUED_NOTIFICATIONS
            or peer.queued_bytes + len(frame) > MAX_QUEUED_NOTIFICATION_BYTES
        ):
            return False
        peer.queued.append(frame)
        peer.queued_bytes += len(frame)
        if peer.connecting is None:
            self._connect(peer)
        # (A connect that failed at once has dropped the queue already.)
        return bool(peer.queued) and peer.queued[-1] is frame

    def connection(self, address: str) -> RpcConnection | None:
        """The live connection to ``address``, if any (for tests and status)."""
        peer = self._peers.get(address)
        return peer.connection if peer is not None else None

    def close(self) -> Deferred[None]:
        """Close every connection; fires once all are gone."""
        self._closed = True
        waits: list[Deferred[Any]] = []
        for peer in list(self._peers.values()):
            if peer.connecting is not None:
                peer.connecting.cancel()
            connection = peer.connection
            if connection is not None:
                waits.append(connection.when_lost())
                connection.transport.loseConnection()
                # A peer that does not complete the close must not hold us.
                abort = self.reactor.callLater(1.0, connection.transport.abortConnection)
                connection.notify_lost(lambda _reason, timer=abort: timer.active() and timer.cancel())
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- connecting ----------------------------------------------------------

    def _connect_timed_out(self, address: str, timeout: float) -> Callable[[Any, float], Any]:
        def convert(result: Any, _timeout: float) -> Any:
            if isinstance(result, Failure) and result.check(CancelledError):
                return Failure(Unavailable(f"could not connect to {address} within {timeout}s"))
            return result

        return convert

    def _wait_for_connection(self, peer: _Peer) -> Deferred[RpcConnection]:
        def forget(waiter: Deferred[RpcConnection]) -> None:
            if waiter in peer.waiters:
                peer.waiters.remove(waiter)

        waiter: Deferred[RpcConnection] = Deferred(forget)
        peer.waiters.append(waiter)
        if peer.connecting is None:
            self._connect(peer)
        return waiter

    def _connect(self, peer: _Peer) -> None:
        try:
            endpoint = self._endpoint(peer.address)
        except Exception as e:
            self._connect_failed(Failure(e), peer)
            return
        attempt = endpoint.connect(self._factory)
        peer.connecting = attempt
        attempt.addCallbacks(self._connected, self._connect_failed, callbackArgs=(peer,), errbackArgs=(peer,))

    def _connected(self, connection: RpcConnection, peer: _Peer) -> None:
        peer.connecting = None
        if self._closed:
            connection.transport.abortConnection()
            self._fail_waiters(peer, Unavailable("the client pool is closed"))
            return
        peer.connection = connection
        connection.notify_lost(lambda reason: self._lost(connection, peer, reason))
        queued, peer.queued, peer.queued_bytes = peer.queued, [], 0
        if queued:
            connection.transport.write(b"".join(queued))
        waiters, peer.waiters = peer.waiters, []
        for waiter in waiters:
            waiter.callback(connection)

    def _lost(self, connection: RpcConnection, peer: _Peer, reason: Failure) -> None:
        if peer.connection is connection:
            peer.connection = None
        if reason.check(SSL.Error) and not connection.replies:
            # The TLS handshake failed (with TLS 1.3 a refused client
            # certificate shows only after "connecting"): a failed connect.
            self._note_failure(peer, reason)
        else:
            peer.failures = 0

    def _connect_failed(self, reason: Failure, peer: _Peer) -> None:
        peer.connecting = None
        self._note_failure(peer, reason)
        self._fail_waiters(peer, Unavailable(f"cannot connect to {peer.address}: {peer.last_error}"))

    def _note_failure(self, peer: _Peer, reason: Failure) -> None:
        peer.failures += 1
        delay = min(self.backoff_max, self.backoff_initial * 2 ** min(peer.failures - 1, 30))
        peer.retry_at = self.reactor.seconds() + delay * self._rng.uniform(0.5, 1.0)
        peer.last_error = (
            reason.getErrorMessage() if not reason.check(CancelledError) else "connect cancelled"
        )

    def _fail_waiters(self, peer: _Peer, error: SurfShardError) -> None:
        # One-way requests have no one to tell: they are dropped.
        peer.queued, peer.queued_bytes = [], 0
        waiters, peer.waiters = peer.waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _endpoint(self, address: str) -> IStreamClientEndpoint:
        host, port = parse_address(address)
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        if self.tls is not None:
            creator = self._tls_creators.get(host)
            if creator is None:
                creator = self._tls_creators[host] = client_options_from_files(self.tls, host)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint
