"""The filename space: which shard a name belongs to, and what a valid name,
block hash, hash list and version look like.

Every process (servers, shard master, clients, tools) must agree on the shard
of a name, so the mapping is fixed by DESIGN.md "Keyspace" and pinned by test
vectors: the first 8 bytes of ``blake2b(name.encode("utf-8"))`` (default
64-byte digest) read as a big-endian unsigned integer ``h``, and shard
``h * nshards >> 64``. Python's ``hash()`` is never used: it is salted per
process.

Multiplying instead of taking ``h % nshards`` makes every shard one
contiguous hash range (``shard_range``), which is what lets a shard be named,
exported and moved as a unit.

The validators raise ``surfshard.errors.BadRequest`` so a server can hand the
message straight back to the caller; they return the value they accepted so a
call site can validate and bind in one step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from surfshard.errors import BadRequest

#: Size of the hash space shards partition: hashes are 64-bit.
HASH_SPACE = 1 << 64

#: Most shards a cluster may have. shard_of works for any count; this bounds
#: what a config or a shard map off the wire may ask every node to hold.
MAX_SHARDS = 1 << 16

#: Longest filename accepted, in UTF-8 bytes (a common PATH_MAX).
MAX_FILENAME_BYTES = 4096

#: Most block hashes one file may list. At the default 4 KiB block size this
#: is ~400 MB per file; it bounds the size of one replicated command.
MAX_HASHLIST = 100_000

#: Largest version accepted: a signed 64-bit integer, so the value survives
#: any peer or tool that stores versions in an int64.
MAX_VERSION = (1 << 63) - 1

#: SurfStore's deletion marker: a hash list of exactly this one element.
TOMBSTONE = "0"

_BLOCK_HASH = re.compile(r"[0-9a-f]{64}")

#: Joiner between the hashes of a hash list for the one-pass check below. It
#: is also what precedes a 64-character text string in CBOR (major type 3,
#: one length byte, 64), so the joined list is most of its own encoding.
HASH_JOINER = "\x78\x40"
_HASH_JOINER_ASCII = HASH_JOINER.encode("ascii")

_HEX_DIGITS = b"0123456789abcdef"


def name_hash(name: str) -> int:
    """The 64-bit hash that places ``name`` in the keyspace.

    Raises ``UnicodeEncodeError`` (a ``ValueError``) for a string that is not
    encodable as UTF-8 (lone surrogates); ``validate_filename`` refuses those.
    """
    digest = hashlib.blake2b(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _check_nshards(nshards: int) -> None:
    # A programming or config error, not a client's bad request: the shard
    # count comes from the cluster config, never from the wire.
    if not isinstance(nshards, int) or isinstance(nshards, bool) or nshards < 1:
        raise ValueError(f"nshards must be an integer >= 1, not {nshards!r}")


def shard_of_hash(h: int, nshards: int) -> int:
    """The shard holding hash ``h`` (0 <= h < 2**64) when there are ``nshards``."""
    _check_nshards(nshards)
    if not 0 <= h < HASH_SPACE:
        raise ValueError(f"hash {h!r} is outside the 64-bit hash space")
    return (h * nshards) >> 64


def shard_of(name: str, nshards: int) -> int:
    """The shard (0 .. nshards-1) that ``name`` belongs to."""
    return shard_of_hash(name_hash(name), nshards)


def shard_range(shard: int, nshards: int) -> tuple[int, int]:
    """The hashes ``lo <= h < hi`` that map to ``shard``.

    ``lo`` is the least ``h`` with ``h * nshards >= shard * 2**64``, i.e. the
    ceiling of ``shard * 2**64 / nshards``; the ranges of shards 0..nshards-1
    tile ``[0, 2**64)`` with no gap or overlap.
    """
    _check_nshards(nshards)
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < nshards:
        raise ValueError(f"shard must be an integer in [0, {nshards}), not {shard!r}")
    lo = -((-shard * HASH_SPACE) // nshards)
    hi = -((-(shard + 1) * HASH_SPACE) // nshards)
    return lo, hi


def _short(value: Any, limit: int = 80) -> str:
    """A repr short enough to put in an error message for any input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_filename(name: Any) -> str:
    """Accept a filename: a non-empty str of at most 4096 UTF-8 bytes, with no
    NUL and no '/' at either end (so "a/b" and "/a/b" never both exist)."""
    # The common case in one step: an ASCII name (its UTF-8 size is its
    # length) that breaks no rule. Anything else takes the full checks,
    # which also word the refusal.
    if (
        type(name) is str
        and name.isascii()
        and 0 < len(name) <= MAX_FILENAME_BYTES
        and "\x00" not in name
        and name[0] != "/"
        and name[-1] != "/"
    ):
        return name
    if not isinstance(name, str):
        raise BadRequest(f"filename must be a string, not {type(name).__name__}")
    if not name:
        raise BadRequest("filename must not be empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"filename is not valid UTF-8 ({e.reason} at position {e.start})") from None
    if len(encoded) > MAX_FILENAME_BYTES:
        raise BadRequest(
            f"filename is {len(encoded)} UTF-8 bytes, more than the limit of {MAX_FILENAME_BYTES}"
        )
    if "\x00" in name:
        raise BadRequest(f"filename must not contain NUL: {_short(name)}")
    if name.startswith("/") or name.endswith("/"):
        raise BadRequest(f"filename must not start or end with '/': {_short(name)}")
    return name


def validate_block_hash(value: Any) -> str:
    """Accept a block hash: 64 lowercase hex characters (a SHA-256 digest)."""
    if not isinstance(value, str):
        raise BadRequest(f"block hash must be a string, not {type(value).__name__}")
    if not _BLOCK_HASH.fullmatch(value):
        raise BadRequest(f"block hash must be 64 lowercase hex characters: {_short(value)}")
    return value


def is_tombstone(hashlist: Sequence[str]) -> bool:
    """Whether a (valid) hash list is the deletion tombstone ``["0"]``."""
    return len(hashlist) == 1 and hashlist[0] == TOMBSTONE


def validate_hashlist(value: Any) -> list[str]:
    """Accept a hash list: up to MAX_HASHLIST block hashes (none for an empty
    file, as SurfStore clients send it), or exactly ``["0"]`` (the
    tombstone). "0" mixed with real hashes is refused: it would be neither a
    file nor a deletion."""
    if joined_hashes(value) is not None:
        return list(value)
    if not isinstance(value, list | tuple):
        raise BadRequest(f"hashlist must be a list, not {type(value).__name__}")
    if len(value) > MAX_HASHLIST:
        raise BadRequest(f"hashlist has {len(value)} entries, more than the limit of {MAX_HASHLIST}")
    if is_tombstone(value):
        return [TOMBSTONE]
    for i, item in enumerate(value):
        try:
            validate_block_hash(item)
        except BadRequest as e:
            raise BadRequest(f"hashlist[{i}]: {e.message}") from None
    return list(value)


def joined_hashes(value: Any) -> str | None:
    """``HASH_JOINER.join(value)`` if ``value`` is a non-empty list or tuple
    of at most MAX_HASHLIST block hashes, else None (also for the tombstone
    and the empty list: ``validate_hashlist`` accepts those, and says why it
    refuses anything else).

    A few passes in C over the joined list instead of a check per hash: this
    runs for every write on every replica. Deleting the hex digits must leave
    exactly the n - 1 joins made (the joiner is not hex), so every other
    character is a hex digit; and the joins' second characters must sit
    every 66 characters, so every hash is 64 of them. As fast as a regex
    over the joined string at four hashes, three times faster at 64 and four
    at 1,024 (a 4 MiB file)."""
    if type(value) is not list and type(value) is not tuple:
        return None
    count = len(value)
    if not 0 < count <= MAX_HASHLIST:
        return None
    try:
        joined = HASH_JOINER.join(value)
    except TypeError:  # an item that is not a str
        return None
    if len(joined) != 66 * count - 2 or not joined.isascii():
        return None
    joins = count - 1
    if (
        joined.encode("ascii").translate(None, _HEX_DIGITS) != _HASH_JOINER_ASCII * joins
        or joined[65::66] != "@" * joins
    ):
        return None
    return joined


def validate_version(value: Any) -> int:
    """Accept a file version: an integer 1 .. MAX_VERSION (bool is refused
    even though it is an int subclass: True is not a version)."""
    if type(value) is int and 1 <= value <= MAX_VERSION:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"version must be an integer, not {type(value).__name__}")
    if value < 1:
        raise BadRequest(f"version must be >= 1, not {value}")
    if value > MAX_VERSION:
        raise BadRequest(f"version {value} is larger than the limit of {MAX_VERSION}")
    return value
