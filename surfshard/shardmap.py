"""The shard map: which replica group serves each shard, and where a group's
nodes are.

The ShardMaster hands out numbered maps (``num`` increases by one per
change); servers and clients route with them. A ``ShardMap`` is immutable
and hashable so it can be cached, compared and used as a dict key, and its
CBOR encoding is canonical so two nodes holding the same map hold the same
bytes (comparable, checksummable, stable in snapshots).

Group id 0 means "unassigned": a shard of ``ShardMap.initial`` has no group
until the first join.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import cbor2

from surfshard.config import parse_address
from surfshard.errors import BadRequest
from surfshard.keyspace import MAX_SHARDS, shard_of

#: Group id meaning "no group serves this shard".
UNASSIGNED = 0

_WIRE_KEYS = frozenset({"num", "shards", "groups"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """Shard map number ``num``: ``shards[s]`` is the gid serving shard ``s``
    (0 = unassigned) and ``groups[gid]`` the ``"host:port"`` addresses of
    that group's nodes, in node order.

    The constructor validates and freezes its input (``groups`` becomes a
    read-only mapping ordered by gid) and raises ``BadRequest`` when the map
    is not self-consistent, so no code ever holds a map it cannot route by.
    """

    num: int
    shards: tuple[int, ...]
    groups: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_int(self.num) or self.num < 0:
            raise BadRequest(f"shard map num must be an integer >= 0, not {self.num!r}")
        if not isinstance(self.shards, list | tuple):
            raise BadRequest(f"shard map shards must be a list of gids, not {type(self.shards).__name__}")
        if not 1 <= len(self.shards) <= MAX_SHARDS:
            raise BadRequest(f"shard map must have 1..{MAX_SHARDS} shards, not {len(self.shards)}")
        if not isinstance(self.groups, Mapping):
            raise BadRequest(f"shard map groups must be a map, not {type(self.groups).__name__}")

        groups: dict[int, tuple[str, ...]] = {}
        seen: dict[str, int] = {}
        for gid, addresses in self.groups.items():
            if not _is_int(gid) or gid <= 0:
                raise BadRequest(f"shard map group id must be an integer >= 1, not {gid!r}")
            if not isinstance(addresses, list | tuple) or not addresses:
                raise BadRequest(f"shard map group {gid} must list at least one address")
            for address in addresses:
                try:
                    parse_address(address)
                except ValueError as e:
                    raise BadRequest(f"shard map group {gid}: {e}") from None
                if address in seen:
                    where = "twice in" if seen[address] == gid else f"in group {seen[address]} and"
                    raise BadRequest(f"shard map lists address {address} {where} group {gid}")
                seen[address] = gid
            groups[gid] = tuple(addresses)
        groups = dict(sorted(groups.items()))

        for s, gid in enumerate(self.shards):
            if not _is_int(gid) or gid < 0:
                raise BadRequest(f"shard map shard {s} has a bad gid {gid!r}")
            if gid != UNASSIGNED and gid not in groups:
                raise BadRequest(f"shard map assigns shard {s} to group {gid}, which has no entry in groups")

        # Frozen dataclass: normalize through object.__setattr__ once, here.
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "groups", types.MappingProxyType(groups))

    def __hash__(self) -> int:
        return hash((self.num, self.shards, tuple(self.groups.items())))

    def __repr__(self) -> str:
        return f"ShardMap(num={self.num}, shards={self.shards!r}, groups={dict(self.groups)!r})"

    @classmethod
    def initial(cls, nshards: int) -> ShardMap:
        """Map 0: ``nshards`` shards, none assigned, no groups."""
        if not _is_int(nshards) or not 1 <= nshards <= MAX_SHARDS:
            raise ValueError(f"nshards must be an integer 1..{MAX_SHARDS}, not {nshards!r}")
        return cls(0, (UNASSIGNED,) * nshards, {})

    @property
    def nshards(self) -> int:
        return len(self.shards)

    def group_of_shard(self, shard: int) -> int:
        """The gid serving ``shard`` (0 when unassigned)."""
        if not _is_int(shard) or not 0 <= shard < len(self.shards):
            raise ValueError(f"shard must be an integer in [0, {len(self.shards)}), not {shard!r}")
        return self.shards[shard]

    def group_for(self, name: str) -> int:
        """The gid serving filename ``name`` (0 when its shard is unassigned)."""
        return self.shards[shard_of(name, len(self.shards))]

    def shards_of(self, gid: int) -> tuple[int, ...]:
        """The shards ``gid`` serves, ascending."""
        return tuple(s for s, g in enumerate(self.shards) if g == gid)

    def assigned_gids(self) -> tuple[int, ...]:
        """The gids that serve at least one shard, ascending."""
        return tuple(sorted({g for g in self.shards if g != UNASSIGNED}))

    def addresses_of(self, gid: int) -> tuple[str, ...]:
        """The node addresses of group ``gid`` (empty if the map has no such group)."""
        return self.groups.get(gid, ())

    def replace(self, **changes: Any) -> ShardMap:
        """A copy with some fields changed (validated like any new map)."""
        return dataclasses.replace(self, **changes)

    # -- wire ------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """CBOR-friendly builtins: ``{"num", "shards": [gid...], "groups": {gid: [addr...]}}``."""
        return {
            "num": self.num,
            "shards": list(self.shards),
            "groups": {gid: list(addresses) for gid, addresses in self.groups.items()},
        }

    @classmethod
    def from_wire(cls, wire: Any) -> ShardMap:
        """Parse ``to_wire()`` output from a peer; ``BadRequest`` on anything
        malformed. Unknown keys are refused too: the map is the routing
        truth, and a field this node does not understand could change what
        it means."""
        if not isinstance(wire, dict):
            raise BadRequest(f"shard map must be a map, not {type(wire).__name__}")
        missing = _WIRE_KEYS - wire.keys()
        if missing:
            raise BadRequest(f"shard map is missing {', '.join(sorted(missing))}")
        unknown = set(wire) - _WIRE_KEYS
        if unknown:
            raise BadRequest(f"shard map has unknown keys {sorted(map(str, unknown))}")
        if not isinstance(wire["shards"], list):
            raise BadRequest("shard map shards must be a list")
        groups = wire["groups"]
        if not isinstance(groups, dict) or not all(isinstance(a, list) for a in groups.values()):
            raise BadRequest("shard map groups must be a map of gid to a list of addresses")
        return cls(wire["num"], tuple(wire["shards"]), groups)

    def to_cbor(self) -> bytes:
        """The canonical CBOR encoding: equal maps give equal bytes."""
        return cbor2.dumps(self.to_wire(), canonical=True)

    @classmethod
    def from_cbor(cls, data: bytes) -> ShardMap:
        """Decode ``to_cbor()`` output; ``BadRequest`` if it is not a valid map."""
        try:
            wire = cbor2.loads(data)
        except Exception as e:  # cbor2 raises several types on garbage
            raise BadRequest(f"shard map is not valid CBOR: {e}") from None
        return cls.from_wire(wire)
