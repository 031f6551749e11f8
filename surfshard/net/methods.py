"""Method tables: what a server answers, and how a handler answers.

``MethodTable`` names each method with its handler and argument
``Schema``; ``CallContext`` tells a handler who is calling; ``Reply`` is
the answer owed to one request for handlers that answer without a
Deferred (see ``takes_reply``); ``ReplySink`` is what takes an outcome,
a Deferred or a ``Reply`` alike.
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.python.failure import Failure

from surfshard.net.schema import Arg, Schema

if typing.TYPE_CHECKING:
    from surfshard.net.server import RpcServerProtocol


class ReplySink(typing.Protocol):
    """Where the outcome of a call goes: a Deferred, or anything that takes
    a result and an exception the same way (see ``RpcConnection.call_into``
    and ``Reply``). ``called``: it has its outcome already (or was
    cancelled), so answering it again does nothing useful."""

    @property
    def called(self) -> bool: ...

    def callback(self, result: Any) -> object: ...

    def errback(self, fail: BaseException) -> object: ...


class Access(enum.StrEnum):
    """Who may call a method. With TLS the server learns the caller's role
    and name from its verified certificate (``Caller``), never from a
    request field; without TLS the cluster trusts its network and every
    caller may call everything (as etcd does without TLS)."""

    #: Any caller the port accepted (with TLS: any certificate the CA signed).
    CLIENT = "client"
    #: Operators: shard moves, chaos calls, leadership changes.
    ADMIN = "admin"
    #: The other replicas of this node's own group (Raft).
    PEER = "peer"
    #: Any node of the cluster's replica groups (a shard moving between groups).
    CLUSTER = "cluster"


#: The default: every caller.
OPEN: tuple[Access, ...] = (Access.CLIENT,)


@dataclass(frozen=True, slots=True)
class Caller:
    """The party at the other end of a connection, as its TLS certificate
    names it: ``role`` is ``node``, ``admin`` or ``client`` (``trusted``
    without TLS) and ``name`` its common name (a node's name for nodes)."""

    role: str
    name: str


#: Without TLS: the network is trusted, so is every caller.
TRUSTED = Caller("trusted", "")

#: ``authorize(caller, grants)``: None if ``caller`` holds one of
#: ``grants``, else why not (sent back with FORBIDDEN and logged).
Authorizer = Callable[[Caller, tuple[Access, ...]], "str | None"]


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
    #: Served even while the node sheds load (``ServerLimits.memory_budget``):
    #: peer traffic and health checks, whose refusal would make things worse.
    essential: bool = False
    #: Who may call it: a caller holding any one of these grants.
    access: tuple[Access, ...] = OPEN


class CallContext:
    """Who is calling, for handlers that need it (authorisation, logging)."""

    __slots__ = ("caller", "method", "peer", "request_id", "transport")

    def __init__(
        self, peer: str, method: str, request_id: int | str, transport: Any, caller: Caller = TRUSTED
    ) -> None:
        self.peer = peer
        self.method = method
        self.request_id = request_id
        self.transport = transport
        #: Who is calling, from the verified certificate (``TRUSTED`` without TLS).
        self.caller = caller

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
        essential: bool = False,
        access: tuple[Access, ...] = OPEN,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("a method name must be a non-empty str")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered in {self.service}")
        if pass_context and takes_reply:
            raise ValueError("a handler takes a CallContext or a Reply, not both")
        if not access or not all(isinstance(a, Access) for a in access):
            raise TypeError("access must be a non-empty tuple of Access")
        self._methods[name] = Method(
            name,
            handler,
            Schema(args),
            pass_context,
            takes_reply,
            essential,
            OPEN if access == OPEN else access,
        )

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
