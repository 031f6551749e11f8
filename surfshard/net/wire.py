"""The native frame codec: a 4-byte big-endian length, then one CBOR map.

The decoder is the first thing untrusted bytes meet, so it is strict:

- the length prefix is checked against the limit *before* anything is
  buffered, so a 4 GiB prefix costs four bytes of memory, not four gigabytes;
- a payload must be exactly one CBOR item, and that item must be a map;
- CBOR tags are refused except bignums (tags 2 and 3): cbor2 would otherwise
  build datetimes, regular expressions, MIME messages, shared (cyclic)
  references and more out of whatever a peer sends;
- duplicate map keys are refused and nesting depth is bounded.

Wire values are therefore None, bool, int, float, str, bytes, lists and maps.
A frame refused only for its tags leaves the stream in sync, so the error is
marked recoverable and carries the frame's id: the receiver can answer that
one request with an error and keep the connection.

Speed: the RPC layer moves every request and reply through here, so the two
frame shapes it sends (``encode_request``, ``encode_reply``) build the
envelope by hand around one ``cbor2.dumps`` of the arguments or result (the
bytes are exactly what ``encode_frame`` makes of the same map), and the
decoder decodes all the small frames that one read completes in ONE
``cbor2.loads`` call (see ``FrameDecoder``): each cbor2 call costs more than
decoding a small map does.
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import ipaddress
import os
import re
import struct
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from email.mime.text import MIMEText
from typing import Any

import cbor2

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "LENGTH_PREFIX_BYTES",
    "FrameDecoder",
    "FrameEncodeError",
    "FrameError",
    "FrameMalformed",
    "FrameTooLarge",
    "decode_payload",
    "encode_frame",
    "encode_reply",
    "encode_request",
]

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
LENGTH_PREFIX_BYTES = 4
#: Deep enough for any message we define, shallow enough that a hostile
#: nesting cannot exhaust the C stack or take long to unwind.
MAX_DEPTH = 64

_PREFIX = struct.Struct(">I")
_pack_prefix = _PREFIX.pack
_unpack_prefix_from = _PREFIX.unpack_from

#: Tags cbor2 decodes that we let through: bignums are plain integers.
_ALLOWED_TAGS = frozenset({2, 3})


class FrameError(ValueError):
    """A frame (or the stream it came in) cannot be accepted.

    ``reason`` is a short word for logs and tests.  ``recoverable`` is True
    when only this frame is bad and the stream is still in sync (the frame
    was well-formed CBOR with a refused tag); ``frame_id`` is then the
    frame's ``id`` field, if it had one, so the receiver can answer it.
    """

    reason = "malformed"

    def __init__(self, message: str, *, recoverable: bool = False, frame_id: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.recoverable = recoverable
        self.frame_id = frame_id


class FrameTooLarge(FrameError):
    """The length prefix (or an outgoing frame) exceeds the frame limit."""

    reason = "too_large"


class FrameMalformed(FrameError):
    """The payload is not exactly one CBOR map we are willing to decode."""

    reason = "malformed"


class FrameEncodeError(FrameError):
    """The object cannot be sent as a frame (not a map, or not a wire type)."""

    reason = "unencodable"


class _TagRefused(ValueError):
    pass


def _refuse_tag(*args: Any) -> Any:
    raise _TagRefused("CBOR tags are not accepted")


def _refuse_unknown_tag(tag: Any, immutable: bool = False) -> Any:
    raise _TagRefused(f"CBOR tag {getattr(tag, 'tag', '?')} is not accepted")


def _tag_to_none(*args: Any) -> None:
    return None


class _TagTable(Mapping[int, Any]):
    """A ``semantic_decoders`` table that answers for every tag but bignums.

    cbor2 looks each tag up here before its built-in decoders, so answering
    for all tags turns its built-in list into an allow-list that a newer
    cbor2 cannot silently extend.
    """

    def __init__(self, decoder: Callable[..., Any]) -> None:
        self._decoder = decoder

    def __getitem__(self, tag: int) -> Any:
        if tag in _ALLOWED_TAGS:
            raise KeyError(tag)
        return self._decoder

    def __len__(self) -> int:
        return 0

    def __iter__(self) -> Iterator[int]:
        return iter(())


_REFUSE_TAGS = _TagTable(_refuse_tag)
#: For reading the id out of a frame that was refused for its tags: every
#: tag (bignums too) decodes to None, so nothing is built from it.
_NEUTER_TAGS = _TagTable(_tag_to_none)


def _refuse_encode(encoder: Any, value: Any) -> None:
    raise ValueError(f"{type(value).__name__} is not a wire type")


# Types cbor2 would encode as tags the decoder refuses.
_TAGGED_TYPES: tuple[type, ...] = (
    datetime.datetime,
    datetime.date,
    decimal.Decimal,
    fractions.Fraction,
    re.Pattern,
    MIMEText,
    uuid.UUID,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    set,
    frozenset,
    complex,
    cbor2.CBORTag,
    cbor2.CBORSimpleValue,
    type(cbor2.undefined),
)
_STRICT_ENCODERS = dict.fromkeys(_TAGGED_TYPES, _refuse_encode)
_ENCODE_ERRORS = (cbor2.CBOREncodeError, ValueError, TypeError, RecursionError)


def encode_frame(
    obj: Mapping[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, strict: bool = False
) -> bytes:
    """Serialise one map into a length-prefixed frame.

    Raises FrameEncodeError for a non-map or a value cbor2 cannot encode,
    and FrameTooLarge when the payload exceeds ``max_frame_bytes`` (the peer
    would drop the connection rather than read it).

    ``strict`` also refuses the Python types cbor2 would send as tags (set,
    datetime, Decimal...), which receivers refuse.  It costs about as much
    again as the encoding itself, so the RPC hot path leaves it off and
    relies on the receiver refusing just that one frame: the framing stays
    intact and the request (or reply) fails with a clear error instead.
    """
    if type(obj) is not dict:
        raise FrameEncodeError(f"a frame must be a map, not {type(obj).__name__}")
    try:
        payload = _dumps(obj, encoders=_STRICT_ENCODERS) if strict else _dumps(obj)
    except _ENCODE_ERRORS as e:
        raise FrameEncodeError(f"cannot encode frame: {e}") from e
    size = len(payload)
    if size > max_frame_bytes:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_frame_bytes}")
    return _pack_prefix(size) + payload


_dumps = cbor2.dumps
_loads = cbor2.loads

# -- the two frame shapes of the RPC hot path ----------------------------------
#
# A cbor2.dumps call costs about as much for the map around a value as for the
# value, so the envelope of a request or reply is written here and cbor2 only
# encodes the arguments (or the result).  Keys go in the order encode_frame
# would write them, so the bytes are identical to encode_frame's.

_pack_head_1 = struct.Struct(">BB").pack
_pack_head_2 = struct.Struct(">BH").pack
_pack_head_4 = struct.Struct(">BI").pack
_pack_head_8 = struct.Struct(">BQ").pack
_TINY_HEADS = [bytes((n,)) for n in range(256)]


def _head(major: int, n: int) -> bytes:
    """The shortest CBOR head of major type ``major`` (pre-shifted: 0x00,
    0x20, 0x40...) and argument ``n`` (0 <= n < 2**64)."""
    if n < 24:
        return _TINY_HEADS[major | n]
    if n < 0x100:
        return _pack_head_1(major | 24, n)
    if n < 0x10000:
        return _pack_head_2(major | 25, n)
    if n < 0x100000000:
        return _pack_head_4(major | 26, n)
    return _pack_head_8(major | 27, n)


def _encode_id(request_id: Any) -> bytes:
    """The CBOR item of a request id; the ids a client counts up from 1
    take the short branches."""
    if type(request_id) is int:
        if 0 <= request_id < 24:
            return _TINY_HEADS[request_id]
        if 0 <= request_id < 0x100:
            return _pack_head_1(24, request_id)
        if 0 <= request_id < 0x10000:
            return _pack_head_2(25, request_id)
        if 0 <= request_id <= 0xFFFFFFFFFFFFFFFF:
            return _head(0x00, request_id)
        if -0x10000000000000000 <= request_id < 0:
            return _head(0x20, -1 - request_id)
    return _dumps(request_id)


# A map of 2, 3 or 4 entries, then the "id" key.
_MAP_2_ID = b"\xa2\x62id"
_MAP_3_ID = b"\xa3\x62id"
_MAP_4_ID = b"\xa4\x62id"
_KEY_METHOD = b"\x66method"
_KEY_ARGS = b"\x64args"
_KEY_NOREPLY_TRUE = b"\x67noreply\xf5"  # 9 bytes
_KEY_OK = b"\x62ok"
#: ``method`` key + method name + ``args`` key, per method name: a client
#: calls a handful of methods over and over.
_METHOD_PARTS: dict[str, bytes] = {}
_METHOD_PARTS_MAX = 1024
_CONSTANTS = {True: b"\xf5", False: b"\xf4"}


def _too_large(size: int, max_frame_bytes: int) -> FrameTooLarge:
    return FrameTooLarge(f"frame of {size} bytes exceeds the limit of {max_frame_bytes}")


# The two encoders below inline _encode_id, _head and the length prefix for
# the common cases: each Python call they save is a noticeable part of them.


def encode_request(
    request_id: int | str,
    method: str,
    args: Any,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    *,
    noreply: bool = False,
) -> bytes:
    """The frame of ``{"id", "method", "args"}`` (plus ``"noreply": true``
    for a one-way request): the bytes ``encode_frame`` would make of that
    map, made faster.  Raises as ``encode_frame`` does."""
    parts = _METHOD_PARTS.get(method) if type(method) is str else None
    try:
        if parts is None:
            parts = _KEY_METHOD + _dumps(method) + _KEY_ARGS
            if type(method) is str and len(_METHOD_PARTS) < _METHOD_PARTS_MAX:
                _METHOD_PARTS[method] = parts
        body = _dumps(args)
        head = _encode_id(request_id)
    except _ENCODE_ERRORS as e:
        raise FrameEncodeError(f"cannot encode frame: {e}") from e
    if noreply:
        size = 4 + len(head) + len(parts) + len(body) + 9
        if size > max_frame_bytes:
            raise _too_large(size, max_frame_bytes)
        return b"".join((_pack_prefix(size), _MAP_4_ID, head, parts, body, _KEY_NOREPLY_TRUE))
    size = 4 + len(head) + len(parts) + len(body)
    if size > max_frame_bytes:
        raise _too_large(size, max_frame_bytes)
    return b"".join((_pack_prefix(size), _MAP_3_ID, head, parts, body))


def encode_reply(request_id: int | str, result: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The frame of ``{"id": request_id, "ok": result}``, as ``encode_frame``
    would make it (and raising as it does), made faster."""
    kind = type(result)
    try:
        if kind is bool:
            body = _CONSTANTS[result]
        elif result is None:
            body = b"\xf6"
        elif kind is bytes:
            size = len(result)
            if size < 24:
                body = _TINY_HEADS[0x40 | size] + result
            elif size < 0x100:
                body = _pack_head_1(0x58, size) + result
            else:
                body = _head(0x40, size) + result
        elif kind is int and 0 <= result <= 0xFFFFFFFFFFFFFFFF:
            body = _head(0x00, result)
        else:
            body = _dumps(result)
        head = _encode_id(request_id)
    except _ENCODE_ERRORS as e:
        raise FrameEncodeError(f"cannot encode frame: {e}") from e
    size = 7 + len(head) + len(body)
    if size > max_frame_bytes:
        raise _too_large(size, max_frame_bytes)
    return b"".join((_pack_prefix(size), _MAP_2_ID, head, _KEY_OK, body))


_DECODE_ERRORS = (cbor2.CBORError, ValueError, TypeError, RecursionError, OverflowError, MemoryError)
#: cbor2.loads ignores bytes after the first item.  To see them we decode
#: ``[payload, SENTINEL]`` instead: with nothing trailing, the second element
#: is exactly our (random, per process) sentinel; with anything trailing it
#: is not, or decoding fails.
_SENTINEL = os.urandom(16)
_SENTINEL_CBOR = _dumps(_SENTINEL)
_ARRAY_OF_TWO = b"\x82"


def decode_payload(payload: bytes) -> dict[Any, Any]:
    """Decode one frame payload: exactly one CBOR map, nothing after it."""
    wrapped = _ARRAY_OF_TWO + payload + _SENTINEL_CBOR
    try:
        pair = _loads(
            wrapped,
            tag_hook=_refuse_unknown_tag,
            semantic_decoders=_REFUSE_TAGS,
            max_depth=MAX_DEPTH,
            allow_duplicate_keys=False,
        )
    except _DECODE_ERRORS as e:
        if isinstance(e.__cause__, _TagRefused) or isinstance(e, _TagRefused):
            raise _refused_tag_error(wrapped, e) from e
        raise FrameMalformed(f"payload is not valid CBOR: {e}") from e
    if pair[1] != _SENTINEL:
        raise FrameMalformed("payload is not exactly one CBOR item (trailing or missing bytes)")
    obj = pair[0]
    if type(obj) is not dict:
        raise FrameMalformed(f"payload is a CBOR {type(obj).__name__}, not a map")
    return obj


def _refused_tag_error(wrapped: bytes, error: Exception) -> FrameMalformed:
    """The frame is CBOR but uses tags: refuse it, but keep the stream (the
    framing is intact) and dig out the id so the sender can be told."""
    try:
        pair = _loads(
            wrapped,
            tag_hook=_tag_to_none,
            semantic_decoders=_NEUTER_TAGS,
            max_depth=MAX_DEPTH,
            allow_duplicate_keys=False,
        )
    except _DECODE_ERRORS:
        return FrameMalformed(f"payload is not valid CBOR: {error}")
    if pair[1] != _SENTINEL or type(pair[0]) is not dict:
        return FrameMalformed(f"payload is not valid CBOR: {error}")
    return FrameMalformed(
        f"payload uses CBOR tags, which are not accepted ({error})",
        recoverable=True,
        frame_id=pair[0].get("id"),
    )


#: Frames decoded together by one cbor2 call: small ones only (the join
#: copies them), and a bounded number.
BATCH_MAX_FRAMES = 256
BATCH_MAX_PAYLOAD = 64 * 1024


_JUST_DICT = {dict}


def _array_head(n: int) -> bytes:
    return _head(0x80, n)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames out.

    New bytes wait as a list of chunks until the frame being waited for is
    complete, so a large frame arriving in many reads is joined once, not
    once per read.  After a FrameError the stream is out of sync and the
    decoder refuses any further input.

    Batching: when one read completes several small frames (pipelined
    requests, or the replies to them), their payloads are decoded by one
    ``cbor2.loads`` of ``[p1, S, p2, S, ..., pn, S]``, S being the per-process
    random sentinel, with indefinite-length items refused.  That accepts
    exactly what decoding each payload on its own would: an item equal to S
    can only be one of our sentinels read from its first byte (a peer cannot
    write S without knowing it, and no definite-length head ending where a
    sentinel starts has S's length), so n items equal to S at the n odd
    positions mean the decoder was in step with every sentinel, hence each
    payload held exactly the one item before its sentinel, and that item
    must be a map.  Anything else (one bad frame, an indefinite-length item)
    fails the batch, and those frames are decoded one by one, with the usual
    errors, the good frames before a bad one coming out first.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self._buf = b""  # joined bytes; frames are consumed from _pos on
        self._pos = 0
        self._tail: list[bytes] = []  # chunks fed since the last join
        self._buffered = 0  # unconsumed bytes in _buf[_pos:] and _tail
        # Bytes needed before a frame can possibly be complete: the prefix
        # alone, or prefix + payload once the prefix has been read.
        self._needed = LENGTH_PREFIX_BYTES
        self._failed: FrameError | None = None
        # Frames decoded (in a batch) and not yet handed out: they come out
        # of whichever iterator asks next, so none is lost if the consumer
        # stops early.
        self._ready: deque[dict[Any, Any]] = deque()
        # Frames to decode one by one before batching again (after a batch
        # that failed, to find the bad frame without decoding the rest twice).
        self._singles = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not (yet) make a whole frame."""
        return self._buffered

    @property
    def failed(self) -> FrameError | None:
        return self._failed

    def feed(self, data: bytes) -> Iterator[dict[Any, Any]]:
        """Take ``data`` now; return an iterator over the frames it completes.

        The bytes are buffered at once even if the iterator is never consumed
        (the frames then come out of the next call's iterator).  Iterating
        raises FrameError at the first bad frame, after yielding the good
        frames before it.
        """
        if self._failed is not None:
            raise self._failed
        if data:
            self._tail.append(bytes(data))
            self._buffered += len(data)
        return self._frames()

    def _frames(self) -> Iterator[dict[Any, Any]]:
        ready = self._ready
        while True:
            if ready:
                yield ready.popleft()
                continue
            if self._buffered < self._needed:
                return
            if self._tail:
                self._buf = self._buf[self._pos :] + b"".join(self._tail)
                self._pos = 0
                self._tail = []
            if self._singles == 0:
                # Batch only when a second frame has at least begun (the
                # common single frame goes straight to _decode_one).
                (length,) = _unpack_prefix_from(self._buf, self._pos)
                if (
                    length + 2 * LENGTH_PREFIX_BYTES <= self._buffered
                    and length <= BATCH_MAX_PAYLOAD
                    and self._decode_batch()
                ):
                    continue
            frame = self._decode_one()
            if frame is not None:
                yield frame

    def _decode_one(self) -> dict[Any, Any] | None:
        """Consume and decode the next frame; None if it is not complete.
        Raises FrameError for a bad one."""
        buf = self._buf
        pos = self._pos
        (length,) = _unpack_prefix_from(buf, pos)
        if length > self.max_frame_bytes:
            self._fail(FrameTooLarge(f"frame length {length} exceeds the limit of {self.max_frame_bytes}"))
        size = LENGTH_PREFIX_BYTES + length
        if self._buffered < size:
            self._needed = size
            return None
        end = pos + size
        payload = buf[pos + LENGTH_PREFIX_BYTES : end]
        # Consume before decoding: the consumer may stop at any yield, or
        # feed more bytes from inside the loop.
        self._consume(end, size)
        if self._singles:
            self._singles -= 1
        # decode_payload inlined: this runs once per frame on every
        # connection.  Any failure is re-diagnosed by decode_payload.
        try:
            pair = _loads(
                _ARRAY_OF_TWO + payload + _SENTINEL_CBOR,
                tag_hook=_refuse_unknown_tag,
                semantic_decoders=_REFUSE_TAGS,
                max_depth=MAX_DEPTH,
                allow_duplicate_keys=False,
            )
            frame = pair[0]
            if type(frame) is dict and pair[1] == _SENTINEL:
                return frame
        except _DECODE_ERRORS:
            pass
        try:
            return decode_payload(payload)
        except FrameError as e:
            if e.recoverable:
                raise  # only this frame is bad; feed(b"") carries on after it
            self._fail(e)
            raise  # not reached: _fail raises

    def _decode_batch(self) -> bool:
        """Decode the whole small frames at the front of the buffer in one
        cbor2 call and queue them in ``_ready``; False (nothing consumed)
        when fewer than two are there or the batch does not decode."""
        buf = self._buf
        pos = self._pos
        stop = pos + self._buffered
        limit = min(self.max_frame_bytes, BATCH_MAX_PAYLOAD)
        sentinel = _SENTINEL_CBOR
        parts = [b""]  # the array head goes first, once the count is known
        append = parts.append
        count = 0
        while count < BATCH_MAX_FRAMES and stop - pos >= LENGTH_PREFIX_BYTES:
            (length,) = _unpack_prefix_from(buf, pos)
            start = pos + LENGTH_PREFIX_BYTES
            end = start + length
            if length > limit or end > stop:
                break
            append(buf[start:end])
            append(sentinel)
            count += 1
            pos = end
        if count < 2:
            return False
        parts[0] = _array_head(2 * count)
        try:
            items = _loads(
                b"".join(parts),
                tag_hook=_refuse_unknown_tag,
                semantic_decoders=_REFUSE_TAGS,
                max_depth=MAX_DEPTH,
                allow_duplicate_keys=False,
                allow_indefinite=False,
            )
            frames = items[0::2]
            valid = (
                len(items) == 2 * count
                and items[1::2] == [_SENTINEL] * count
                and set(map(type, frames)) == _JUST_DICT
            )
        except _DECODE_ERRORS:
            valid = False
        if not valid:
            self._singles = count
            return False
        self._consume(pos, pos - self._pos)
        self._ready.extend(frames)
        return True

    def _consume(self, end: int, size: int) -> None:
        if end == len(self._buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        self._buffered -= size
        self._needed = LENGTH_PREFIX_BYTES

    def _fail(self, error: FrameError) -> None:
        self._failed = error
        self._buf = b""
        self._pos = 0
        self._tail = []
        self._buffered = 0
        self._ready.clear()
        raise error
