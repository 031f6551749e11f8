"""The fixed set of error codes every SurfShard service speaks.

An error crosses the wire as ``{"code": str, "message": str, ...details}`` and
arrives at the caller as the matching ``SurfShardError`` subclass, so callers
write ``except NotLeader as e: e.leader`` rather than comparing strings.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar


class ErrorCode(enum.StrEnum):
    NOT_LEADER = "NOT_LEADER"
    WRONG_GROUP = "WRONG_GROUP"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    CRASHED = "CRASHED"
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_METHOD = "UNKNOWN_METHOD"
    TIMEOUT = "TIMEOUT"
    UNAVAILABLE = "UNAVAILABLE"
    FORBIDDEN = "FORBIDDEN"
    NOT_READY = "NOT_READY"
    BUSY = "BUSY"
    INTERNAL = "INTERNAL"


class SurfShardError(Exception):
    """Base of every error a SurfShard service can answer with.

    ``details`` holds the code-specific fields (``leader``, ``num``,
    ``current``...) that travel next to ``code`` and ``message``.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    #: Detail keys this error carries on the wire, in constructor order.
    fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message or self.code.value
        self.details = details
        for name in self.fields:
            setattr(self, name, details.get(name))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = dict(self.details)
        wire["code"] = self.code.value
        wire["message"] = self.message
        return wire

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.details.items())
        return f"{type(self).__name__}({self.message!r}{extra})"

    def __str__(self) -> str:
        extra = "".join(f" {k}={v!r}" for k, v in self.details.items())
        return f"{self.code.value}: {self.message}{extra}"


class NotLeader(SurfShardError):
    """This node is not the leader; ``leader`` is the address it believes in
    (or None when it knows of no leader)."""

    code = ErrorCode.NOT_LEADER
    fields = ("leader",)
    leader: str | None


class WrongGroup(SurfShardError):
    """This group does not serve the shard; ``num`` is the shard-map number
    the node acted on, so the caller knows whether its own map is older."""

    code = ErrorCode.WRONG_GROUP
    fields = ("num",)
    num: int | None


class VersionMismatch(SurfShardError):
    """An update's version was not stored + 1; ``current`` is the stored one."""

    code = ErrorCode.VERSION_MISMATCH
    fields = ("current",)
    current: int | None


class Crashed(SurfShardError):
    code = ErrorCode.CRASHED


class BadRequest(SurfShardError):
    code = ErrorCode.BAD_REQUEST


class UnknownMethod(SurfShardError):
    code = ErrorCode.UNKNOWN_METHOD


class Timeout(SurfShardError):
    code = ErrorCode.TIMEOUT


class Unavailable(SurfShardError):
    """The call could not be delivered or answered (connection refused or
    dropped, majority down); the outcome of a write is unknown."""

    code = ErrorCode.UNAVAILABLE


class Forbidden(SurfShardError):
    """The node refuses the call by policy (e.g. chaos calls with chaos off)."""

    code = ErrorCode.FORBIDDEN


class Internal(SurfShardError):
    code = ErrorCode.INTERNAL


class Busy(SurfShardError):
    """The node is shedding load: the bytes it holds in buffers passed its
    memory budget. Nothing was done; retry after a backoff."""

    code = ErrorCode.BUSY


class NotReady(SurfShardError):
    """This node cannot answer yet, but will: e.g. a group asked for a shard
    under shard map ``num`` before it has applied that map itself. Retry
    later (the caller backs off)."""

    code = ErrorCode.NOT_READY
    fields = ("num",)
    num: int | None


_BY_CODE: dict[str, type[SurfShardError]] = {
    cls.code.value: cls
    for cls in (
        NotLeader,
        WrongGroup,
        VersionMismatch,
        Crashed,
        BadRequest,
        UnknownMethod,
        Timeout,
        Unavailable,
        Forbidden,
        Internal,
        NotReady,
        Busy,
    )
}


def error_from_wire(wire: Any) -> SurfShardError:
    """Rebuild the typed exception from an ``error`` map off the wire.

    A malformed error map (or an unknown code, e.g. from a newer server) still
    yields an exception rather than raising while handling one.
    """
    if not isinstance(wire, dict):
        return Internal(f"malformed error reply: {wire!r}")
    code = wire.get("code")
    message = wire.get("message")
    if not isinstance(message, str):
        message = str(message)
    details = {k: v for k, v in wire.items() if k not in ("code", "message") and isinstance(k, str)}
    cls = _BY_CODE.get(code) if isinstance(code, str) else None
    if cls is None:
        return Internal(f"unknown error code {code!r}: {message}", **details)
    return cls(message, **details)
