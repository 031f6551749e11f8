"""The replicated ShardMaster state machine: a numbered sequence of shard maps.

Every ShardMaster replica applies the same committed commands in the same
order, so this module is pure and deterministic: no clock, no randomness, no
iteration over unordered sets (rebalancing is ``shardmaster.rebalance``,
deterministic by contract), and no exception ever escapes ``apply`` (every
replica would hit it on the same entry, forever, on every restart).

Commands (canonical CBOR maps, built by the ``encode_*`` functions):

- ``join``: ``{gid: [addresses]}`` adds groups, then rebalances;
- ``leave``: ``[gids]`` removes groups, then rebalances (the last group
  leaving leaves every shard unassigned, gid 0);
- ``servers``: ``(gid, [addresses])`` replaces a live group's addresses
  after its membership changed (``surfshard.replica.membership``); shards
  stay where they are. Unlike the others it is idempotent: the addresses
  the group has already make no new map.
- ``move``: ``(shard, gid)`` pins one shard to a live group. It is not
  rebalanced away on its own: it holds until the next join or leave, whose
  rebalancing starts from the current map (so a pinned shard only moves
  again if balance needs it to).

Each accepted command creates map ``latest.num + 1``; a ``move`` to the group
that already owns the shard still creates a new map (one command, one map,
as the shard-controller lab does), so an operator always sees the number
advance. A refused command changes no map.

Validation: the server calls ``validate_join_args`` / ``validate_leave_args``
/ ``validate_move_args`` before proposing, for a quick clear error; ``apply``
runs exactly the same checks again against the state at that log position,
because the state may have changed in between (two admins joining the same
gid) and because a committed entry may come from an older or buggy proposer.

Dedup: every write carries ``(client_id, seq)``. Per client the latest
``(seq, answer)`` is kept: a command with that seq gets the stored first
answer again without being applied twice (so a retried join does not report
"group already exists"); a lower seq is refused as stale and not applied.
ShardMaster writes are operator actions, one at a time per client, so
"latest only" is enough (the metadata groups keep a window instead). Answers
to refused commands are stored too, so a retry sees the same refusal even if
the state changed since. At most ``MAX_SESSIONS`` clients are remembered,
least recently used forgotten first (in log order, so every replica forgets
the same one); a forgotten client's late retry is applied as new.

History: the last ``history_limit`` maps are kept (map 0 included while it is
among them); ``query`` of an older number is refused naming the oldest
retained one. Memory is about ``history_limit * nshards`` gids; snapshots
store the oldest retained map in full and each later one as its difference
from the previous one (rebalancing is minimal, so differences are small).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cbor2
from twisted.logger import Logger
from zope.interface import implementer

from raft.interfaces import IStateMachine
from shardmaster import rebalance
from surfshard.config import parse_address
from surfshard.errors import BadRequest, ErrorCode
from surfshard.keyspace import MAX_SHARDS
from surfshard.replica.dedup import DedupTable, validate_client
from surfshard.shardmap import UNASSIGNED, ShardMap

#: Version of the snapshot encoding.
FORMAT = 1

#: Largest group id: fits a signed 64-bit integer in every language a tool
#: might be written in.
MAX_GID = (1 << 63) - 1

#: Most live groups at once: bounds command size and rebalancing work.
MAX_GROUPS = 1024

#: Most nodes one group may list (Raft groups are 3, 5 or 7 nodes).
MAX_NODES_PER_GROUP = 32

#: Clients whose latest answer is remembered for dedup.
MAX_SESSIONS = 4096

#: Default number of maps kept for historical queries.
DEFAULT_HISTORY_LIMIT = 1000

OP_JOIN = "join"
OP_LEAVE = "leave"
OP_MOVE = "move"
OP_SERVERS = "servers"

_KEYS = {
    OP_JOIN: frozenset({"op", "groups", "client", "seq"}),
    OP_LEAVE: frozenset({"op", "gids", "client", "seq"}),
    OP_MOVE: frozenset({"op", "shard", "gid", "client", "seq"}),
    OP_SERVERS: frozenset({"op", "gid", "servers", "client", "seq"}),
}

Groups = dict[int, tuple[str, ...]]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_gid(gid: Any, what: str = "gid") -> int:
    if not _is_int(gid):
        raise BadRequest(f"{what} must be an integer, not {gid!r}")
    if gid == UNASSIGNED:
        raise BadRequest(f"{what} 0 is reserved for unassigned shards; group ids start at 1")
    if not 1 <= gid <= MAX_GID:
        raise BadRequest(f"{what} must be in 1..{MAX_GID}, not {gid}")
    return gid


def _is_sequence(value: Any) -> bool:
    # A str is a Sequence too, and "host:port" would otherwise be taken as a
    # list of one-character addresses.
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


# -- argument validation (shared by the server and apply) ---------------------


def validate_join_args(groups: Any, current: ShardMap | None = None) -> Groups:
    """Check ``join(groups)``: a non-empty map of new gid -> non-empty list
    of distinct ``"host:port"`` addresses, no address listed twice anywhere.

    With ``current`` (the latest map) also refuse gids that already exist,
    addresses that an existing group already lists, and going over
    ``MAX_GROUPS``. Returns the groups normalized (ordered by gid, tuples);
    raises ``BadRequest`` saying what is wrong.
    """
    if not isinstance(groups, Mapping):
        raise BadRequest(f"join needs a map of gid to addresses, not {type(groups).__name__}")
    if not groups:
        raise BadRequest("join needs at least one group")
    if len(groups) > MAX_GROUPS:
        raise BadRequest(f"join of {len(groups)} groups is over the limit of {MAX_GROUPS}")
    owner: dict[str, int] = {}
    if current is not None:
        for gid, addresses in current.groups.items():
            owner.update(dict.fromkeys(addresses, gid))
    normalized: Groups = {}
    for gid in sorted(groups, key=lambda g: (not _is_int(g), g if _is_int(g) else 0)):
        _check_gid(gid)
        if current is not None and gid in current.groups:
            raise BadRequest(f"group {gid} already exists (leave it first to change its nodes)", gid=gid)
        addresses = groups[gid]
        if not _is_sequence(addresses):
            raise BadRequest(
                f"group {gid}: addresses must be a list of host:port, not {type(addresses).__name__}"
            )
        if not addresses:
            raise BadRequest(f"group {gid}: address list is empty; a group needs at least one node", gid=gid)
        if len(addresses) > MAX_NODES_PER_GROUP:
            raise BadRequest(
                f"group {gid}: {len(addresses)} nodes is over the limit of {MAX_NODES_PER_GROUP}"
            )
        for address in addresses:
            try:
                parse_address(address)
            except ValueError as e:
                raise BadRequest(f"group {gid}: malformed address: {e}", gid=gid) from None
            if address in owner:
                where = "twice" if owner[address] == gid else f"already in group {owner[address]}"
                raise BadRequest(f"group {gid}: address {address} is listed {where}", gid=gid)
            owner[address] = gid
        normalized[gid] = tuple(addresses)
    if current is not None and len(current.groups) + len(normalized) > MAX_GROUPS:
        raise BadRequest(
            f"join would make {len(current.groups) + len(normalized)} groups, over the limit of {MAX_GROUPS}"
        )
    return normalized


def validate_leave_args(gids: Any, current: ShardMap | None = None) -> tuple[int, ...]:
    """Check ``leave(gids)``: a non-empty list of distinct valid gids; with
    ``current`` also that each is a live group. Returns them ascending."""
    if not _is_sequence(gids) and not isinstance(gids, set | frozenset):
        raise BadRequest(f"leave needs a list of gids, not {type(gids).__name__}")
    if not gids:
        raise BadRequest("leave needs at least one gid")
    if len(gids) > MAX_GROUPS:
        raise BadRequest(f"leave of {len(gids)} gids is over the limit of {MAX_GROUPS}")
    seen: set[int] = set()
    for gid in gids:
        _check_gid(gid)
        if gid in seen:
            raise BadRequest(f"leave lists group {gid} twice", gid=gid)
        seen.add(gid)
        if current is not None and gid not in current.groups:
            raise BadRequest(f"group {gid} is unknown (not in shard map {current.num})", gid=gid)
    if current is not None and current.groups and seen >= set(current.groups):
        # Every shard would be left without an owner while its data sits in
        # the groups leaving: a later join would start those shards empty
        # while the data exists. Refused: keep at least one group.
        raise BadRequest(
            f"leave of {sorted(seen)} would leave no group to hold the shards' data: "
            "join another group first, then leave"
        )
    return tuple(sorted(seen))


def validate_move_args(shard: Any, gid: Any, current: ShardMap | None = None) -> tuple[int, int]:
    """Check ``move(shard, gid)``: a shard >= 0 and a valid gid; with
    ``current`` also that the shard is below its shard count and the gid is
    a live group. Returns ``(shard, gid)``."""
    if not _is_int(shard):
        raise BadRequest(f"shard must be an integer, not {shard!r}")
    limit = current.nshards if current is not None else MAX_SHARDS
    if not 0 <= shard < limit:
        raise BadRequest(f"shard {shard} is out of range: shards are 0..{limit - 1}", shard=shard)
    _check_gid(gid)
    if current is not None and gid not in current.groups:
        raise BadRequest(f"group {gid} is unknown (not in shard map {current.num})", gid=gid)
    return shard, gid


def validate_servers_args(
    gid: Any, servers: Any, current: ShardMap | None = None
) -> tuple[int, tuple[str, ...]]:
    """Check ``servers(gid, addresses)``: a valid gid and a non-empty list of
    distinct addresses; with ``current`` also that the group is live and no
    other group lists one of the addresses."""
    _check_gid(gid)
    if not _is_sequence(servers) or not servers:
        raise BadRequest(f"group {gid}: servers must be a non-empty list of host:port", gid=gid)
    if len(servers) > MAX_NODES_PER_GROUP:
        raise BadRequest(f"group {gid}: {len(servers)} nodes is over the limit of {MAX_NODES_PER_GROUP}")
    if len(set(servers)) != len(servers):
        raise BadRequest(f"group {gid}: an address is listed twice", gid=gid)
    for address in servers:
        try:
            parse_address(address)
        except (ValueError, TypeError) as e:
            raise BadRequest(f"group {gid}: malformed address: {e}", gid=gid) from None
    if current is not None:
        if gid not in current.groups:
            raise BadRequest(f"group {gid} is unknown (not in shard map {current.num})", gid=gid)
        for other, addresses in current.groups.items():
            shared = set(addresses) & set(servers)
            if other != gid and shared:
                raise BadRequest(f"group {gid}: {sorted(shared)[0]} is already in group {other}", gid=gid)
    return gid, tuple(servers)


# -- command encoders -----------------------------------------------------------


def _encode(command: dict[str, Any]) -> bytes:
    return cbor2.dumps(command, canonical=True)


def encode_join(groups: Mapping[int, Sequence[str]], client_id: str, seq: int) -> bytes:
    """The command for ``join(groups)`` sent by ``(client_id, seq)``.
    Validates first (``BadRequest``), so nothing malformed is proposed."""
    validate_client(client_id, seq)
    normalized = validate_join_args(groups)
    wire_groups = {gid: list(addresses) for gid, addresses in normalized.items()}
    return _encode({"op": OP_JOIN, "groups": wire_groups, "client": client_id, "seq": seq})


def encode_leave(gids: Iterable[int], client_id: str, seq: int) -> bytes:
    """The command for ``leave(gids)`` sent by ``(client_id, seq)``."""
    validate_client(client_id, seq)
    normalized = validate_leave_args(gids)
    return _encode({"op": OP_LEAVE, "gids": list(normalized), "client": client_id, "seq": seq})


def encode_move(shard: int, gid: int, client_id: str, seq: int) -> bytes:
    """The command for ``move(shard, gid)`` sent by ``(client_id, seq)``."""
    validate_client(client_id, seq)
    shard, gid = validate_move_args(shard, gid)
    return _encode({"op": OP_MOVE, "shard": shard, "gid": gid, "client": client_id, "seq": seq})


def encode_servers(gid: int, servers: Sequence[str], client_id: str, seq: int) -> bytes:
    """The command for ``servers(gid, addresses)`` sent by ``(client_id, seq)``."""
    validate_client(client_id, seq)
    gid, normalized = validate_servers_args(gid, servers)
    return _encode(
        {"op": OP_SERVERS, "gid": gid, "servers": list(normalized), "client": client_id, "seq": seq}
    )


# -- results --------------------------------------------------------------------


def _ok(num: int) -> dict[str, Any]:
    return {"ok": True, "num": num}


def _error(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code.value, "message": message}


def _check_answer(answer: Any) -> dict[str, Any]:
    """Accept a stored answer from a snapshot: one of the two result shapes."""
    if isinstance(answer, dict) and answer.get("ok") is True and set(answer) == {"ok", "num"}:
        if _is_int(answer["num"]) and answer["num"] >= 1:
            return answer
    elif isinstance(answer, dict) and answer.get("ok") is False and set(answer) == {"ok", "code", "message"}:
        if answer["code"] in set(ErrorCode) and isinstance(answer["message"], str):
            return answer
    raise BadRequest(f"snapshot: malformed dedup answer {answer!r}")


def _decode(data: Any, what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequest(f"{what} must be bytes, not {type(data).__name__}")
    try:
        return cbor2.loads(bytes(data))
    except Exception as e:  # cbor2 raises several types on garbage (and RecursionError on nesting)
        raise BadRequest(f"{what} is not valid CBOR: {type(e).__name__}: {e}") from None


# -- snapshot history encoding ------------------------------------------------------


def _delta(old: ShardMap, new: ShardMap) -> dict[str, Any]:
    """What changed from ``old`` to ``new`` (``new.num == old.num + 1``)."""
    return {
        "shards": [[s, g] for s, (was, g) in enumerate(zip(old.shards, new.shards, strict=True)) if was != g],
        "join": {gid: list(a) for gid, a in new.groups.items() if gid not in old.groups},
        "leave": [gid for gid in old.groups if gid not in new.groups],
    }


def _apply_delta(old: ShardMap, delta: Any) -> ShardMap:
    """The map after ``old`` described by ``delta``; ``BadRequest`` if the
    delta is malformed or yields an inconsistent map."""
    if not isinstance(delta, dict) or set(delta) != {"shards", "join", "leave"}:
        raise BadRequest(f"snapshot: map {old.num + 1} must be a delta with shards, join and leave")
    changes, joined, left = delta["shards"], delta["join"], delta["leave"]
    if not isinstance(changes, list) or not isinstance(joined, dict) or not isinstance(left, list):
        raise BadRequest(f"snapshot: map {old.num + 1} delta has the wrong types")
    shards = list(old.shards)
    for change in changes:
        if not (isinstance(change, list) and len(change) == 2 and _is_int(change[0])):
            raise BadRequest(f"snapshot: map {old.num + 1} has a malformed shard change {change!r}")
        if not 0 <= change[0] < len(shards):
            raise BadRequest(f"snapshot: map {old.num + 1} changes shard {change[0]}, out of range")
        shards[change[0]] = change[1]
    groups = dict(old.groups)
    for gid in left:
        if gid not in groups:
            raise BadRequest(f"snapshot: map {old.num + 1} removes group {gid!r}, which map {old.num} lacks")
        del groups[gid]
    for gid, addresses in joined.items():
        if gid in groups:
            raise BadRequest(f"snapshot: map {old.num + 1} adds group {gid!r}, which it already has")
        if not isinstance(addresses, list):
            raise BadRequest(f"snapshot: map {old.num + 1} group {gid!r} addresses must be a list")
        groups[gid] = tuple(addresses)
    return ShardMap(old.num + 1, tuple(shards), groups)


# -- the state machine ---------------------------------------------------------------


@implementer(IStateMachine)
class ShardMasterStateMachine:
    """The ShardMaster's replicated state: recent shard maps plus dedup.

    ``nshards`` is the cluster's fixed shard count (map 0 has that many
    unassigned shards); ``history_limit`` how many maps ``query`` can reach
    back (>= 1; every replica must use the same value for their snapshots to
    be byte-identical).

    Reads (``query``, ``latest``) return applied state as is: the server calls
    them only after a ReadIndex round confirmed leadership, which makes them
    linearizable.
    """

    log = Logger()

    def __init__(self, nshards: int, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        if not _is_int(nshards) or not 1 <= nshards <= MAX_SHARDS:
            raise ValueError(f"nshards must be an integer 1..{MAX_SHARDS}, not {nshards!r}")
        if not _is_int(history_limit) or history_limit < 1:
            raise ValueError(f"history_limit must be an integer >= 1, not {history_limit!r}")
        self.nshards = nshards
        self.history_limit = history_limit
        self._maps: collections.deque[ShardMap] = collections.deque(
            [ShardMap.initial(nshards)], history_limit
        )
        # client -> (seq, answer); insertion order is recency (least recent first).
        #: Latest answer per client (window 1: the Raft thesis's sessions).
        self._dedup: DedupTable[dict[str, Any]] = DedupTable(1, MAX_SESSIONS)

    # -- reads ------------------------------------------------------------------

    @property
    def latest(self) -> ShardMap:
        """The newest map."""
        return self._maps[-1]

    @property
    def oldest_num(self) -> int:
        """The number of the oldest map ``query`` can still return."""
        return self._maps[0].num

    def query(self, num: int) -> ShardMap:
        """Map ``num``; the latest for -1 or any number beyond it.

        ``BadRequest`` for other negative numbers and for numbers older than
        the retained history (its ``oldest`` detail names the oldest kept).
        """
        if not _is_int(num):
            raise BadRequest(f"map number must be an integer, not {num!r}")
        if num < -1:
            raise BadRequest(f"map number must be >= 0, or -1 for the latest, not {num}")
        latest = self._maps[-1]
        if num == -1 or num >= latest.num:
            return latest
        oldest = self._maps[0].num
        if num < oldest:
            raise BadRequest(
                f"map {num} is no longer kept: the oldest retained map is {oldest}"
                f" (history holds the last {self.history_limit})",
                oldest=oldest,
            )
        return self._maps[num - oldest]

    def validate_join(self, groups: Any) -> Groups:
        """``validate_join_args`` against the latest map."""
        return validate_join_args(groups, self.latest)

    def validate_leave(self, gids: Any) -> tuple[int, ...]:
        """``validate_leave_args`` against the latest map."""
        return validate_leave_args(gids, self.latest)

    def validate_move(self, shard: Any, gid: Any) -> tuple[int, int]:
        """``validate_move_args`` against the latest map."""
        return validate_move_args(shard, gid, self.latest)

    def stats(self) -> dict[str, Any]:
        """Sizes for status pages and benchmarks."""
        return {
            "latest": self.latest.num,
            "oldest": self.oldest_num,
            "maps": len(self._maps),
            "groups": len(self.latest.groups),
            "sessions": len(self._dedup),
        }

    # -- IStateMachine ------------------------------------------------------------

    def apply(self, command: bytes) -> dict[str, Any]:
        """Apply one committed command and return its result map; never raises.

        Maps change only when the whole command succeeded: the next map is
        built completely before it is appended.
        """
        try:
            op, wire = self._parse_envelope(command)
        except BadRequest as e:
            self.log.warn("refused a malformed command: {error}", error=e.message)
            return _error(ErrorCode.BAD_REQUEST, e.message)
        except Exception as e:  # a bug in parsing, not bad input: same on every replica
            self.log.failure("shardmaster state machine failed parsing a command")
            return _error(ErrorCode.INTERNAL, f"{type(e).__name__} parsing a command")
        client, seq = wire["client"], wire["seq"]

        session = self._dedup.touch(client)
        known = session.answers.get(seq)
        if known is not None:
            return dict(known)
        if session.is_stale(seq, self._dedup.window):
            return _error(
                ErrorCode.BAD_REQUEST,
                f"stale sequence {seq} for client {client!r}: it already sent {max(session.answers)}",
            )

        try:
            answer = _ok(self._apply_op(op, wire))
        except BadRequest as e:
            self.log.warn(
                "refused {op} from {client} seq {seq}: {error}",
                op=op,
                client=client,
                seq=seq,
                error=e.message,
            )
            answer = _error(ErrorCode.BAD_REQUEST, e.message)
        except Exception as e:
            # A bug, not bad input. Every replica hits it identically, so the
            # replicas stay in step; the proposer gets an INTERNAL error.
            self.log.failure("shardmaster state machine failed applying {op}", op=op)
            answer = _error(ErrorCode.INTERNAL, f"{type(e).__name__} applying {op}")

        self._dedup.record(session, seq, answer)
        return dict(answer)

    def _parse_envelope(self, command: Any) -> tuple[str, dict[str, Any]]:
        wire = _decode(command, "command")
        if not isinstance(wire, dict):
            raise BadRequest(f"command must be a map, not {type(wire).__name__}")
        op = wire.get("op")
        if not isinstance(op, str) or op not in _KEYS:
            raise BadRequest(f"unknown command op {op!r}")
        if set(wire) != _KEYS[op]:
            raise BadRequest(f"{op} command must have exactly the keys {sorted(_KEYS[op])}")
        validate_client(wire["client"], wire["seq"])
        return op, wire

    def _apply_op(self, op: str, wire: dict[str, Any]) -> int:
        """Build and append the next map; returns its number."""
        current = self._maps[-1]
        if op == OP_JOIN:
            joined = validate_join_args(wire["groups"], current)
            groups = {**current.groups, **joined}
            shards = rebalance.join(current.shards, tuple(current.groups), tuple(joined))
        elif op == OP_LEAVE:
            leaving = validate_leave_args(wire["gids"], current)
            groups = {gid: a for gid, a in current.groups.items() if gid not in leaving}
            shards = rebalance.leave(current.shards, tuple(current.groups), leaving)
        elif op == OP_SERVERS:
            gid, servers = validate_servers_args(wire["gid"], wire["servers"], current)
            if current.groups[gid] == servers:
                return current.num  # nothing changes: no new map
            groups = {**current.groups, gid: servers}
            shards = current.shards
        else:
            shard, gid = validate_move_args(wire["shard"], wire["gid"], current)
            groups = dict(current.groups)
            shards = rebalance.move(current.shards, shard, gid, tuple(current.groups))
        new = ShardMap(current.num + 1, tuple(shards), groups)
        self._maps.append(new)  # the deque drops the oldest beyond history_limit
        return new.num

    def snapshot(self) -> bytes:
        """Retained maps and dedup sessions, canonical CBOR (equal states give
        equal bytes)."""
        maps = list(self._maps)
        wire = {
            "format": FORMAT,
            "nshards": self.nshards,
            "base": maps[0].to_wire(),
            "deltas": [_delta(old, new) for old, new in zip(maps, maps[1:], strict=False)],
            "sessions": [
                [client, seq, answer]
                for client, session in self._dedup.sessions.items()
                for seq, answer in session.answers.items()
            ],
        }
        return cbor2.dumps(wire, canonical=True)

    def restore(self, data: bytes) -> None:
        """Replace the whole state with ``snapshot()`` output. ``BadRequest``
        (and no change) if it is malformed or for another shard count. A
        snapshot holding more maps than ``history_limit`` keeps the newest."""
        wire = _decode(data, "snapshot")
        keys = {"format", "nshards", "base", "deltas", "sessions"}
        if not isinstance(wire, dict) or set(wire) != keys:
            raise BadRequest(f"snapshot must be a map with exactly the keys {sorted(keys)}")
        if wire["format"] != FORMAT:
            raise BadRequest(f"snapshot has format {wire['format']!r}, this node reads {FORMAT}")
        if wire["nshards"] != self.nshards:
            raise BadRequest(f"snapshot is for {wire['nshards']!r} shards, this cluster has {self.nshards}")
        base = ShardMap.from_wire(wire["base"])
        if base.nshards != self.nshards:
            raise BadRequest(f"snapshot map {base.num} has {base.nshards} shards, not {self.nshards}")
        if not isinstance(wire["deltas"], list) or not isinstance(wire["sessions"], list):
            raise BadRequest("snapshot deltas and sessions must be lists")
        maps: collections.deque[ShardMap] = collections.deque([base], self.history_limit)
        previous = base
        for delta in wire["deltas"]:
            previous = _apply_delta(previous, delta)
            maps.append(previous)

        if len(wire["sessions"]) > MAX_SESSIONS:
            raise BadRequest(f"snapshot holds more than {MAX_SESSIONS} sessions")
        dedup: DedupTable[dict[str, Any]] = DedupTable(1, MAX_SESSIONS)
        for entry in wire["sessions"]:
            if not (isinstance(entry, list) and len(entry) == 3):
                raise BadRequest("snapshot: a session must be [client, seq, answer]")
            client, seq, answer = entry
            validate_client(client, seq)
            if client in dedup.sessions:
                raise BadRequest(f"snapshot: client {client!r} has two sessions")
            dedup.restore(client, 0, {seq: _check_answer(answer)})

        self._maps = maps
        self._dedup = dedup
