"""Which group serves which shard: the ShardMaster's rebalancing rules.

Pure functions over plain data, so that they are easy to test exhaustively
and every replica of the ShardMaster computes the same map from the same log
(the map is replicated state: anything that depends on set or dict
iteration order, or on Python's ``hash()``, would let replicas diverge).

A map is ``shards: tuple[int, ...]``, the gid serving each shard, with 0 for
"no group". After a join or a leave the map is

* balanced: shard counts of live groups differ by at most one (with more
  groups than shards, some groups serve none);
* complete: every shard is served by a live group, or all are 0 when no
  group is left;
* minimal: a shard moves only when it has to. Shards of departed groups
  and unassigned shards move; of the others, only the excess of groups above
  their target. Moving a shard means copying its files and dedup table
  between groups while writes to it wait, so every needless move costs
  availability.

Who gets the ``+1`` targets when the shards do not divide evenly decides how
many shards must move: the groups already holding the most shards keep
them (ties go to the lower gid), which is what makes the move count the
minimum (see :func:`min_moves`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["join", "leave", "min_moves", "move", "rebalance"]


def _check_gid(gid: object) -> int:
    if not isinstance(gid, int) or isinstance(gid, bool) or gid <= 0:
        raise ValueError(f"a gid is a positive integer, got {gid!r}")
    return gid


def _gid_set(gids: Iterable[int], what: str = "gids") -> frozenset[int]:
    """Validated gids; duplicates are refused because a caller passing the
    same gid twice has probably confused two lists."""
    checked = [_check_gid(gid) for gid in gids]
    unique = frozenset(checked)
    if len(unique) != len(checked):
        raise ValueError(f"duplicate gid in {what}: {sorted(checked)}")
    return unique


def _check_shards(shards: Sequence[int]) -> tuple[int, ...]:
    for gid in shards:
        if not isinstance(gid, int) or isinstance(gid, bool) or gid < 0:
            raise ValueError(f"a shard's gid is a non-negative integer, got {gid!r}")
    return tuple(shards)


def _check_owners(shards: tuple[int, ...], gids: frozenset[int]) -> None:
    strays = sorted({gid for gid in shards if gid != 0 and gid not in gids})
    if strays:
        raise ValueError(f"shards are assigned to gids {strays} that are not in the configuration")


def _targets(counts: dict[int, int], nshards: int) -> dict[int, int]:
    """Shards each live group should end up with: ``nshards // ngroups``,
    plus one for the groups that already hold the most (ties: lower gid)."""
    base, extra = divmod(nshards, len(counts))
    by_holding = sorted(counts, key=lambda gid: (-counts[gid], gid))
    return {gid: base + (1 if rank < extra else 0) for rank, gid in enumerate(by_holding)}


def rebalance(shards: Sequence[int], gids: Iterable[int]) -> tuple[int, ...]:
    """A balanced map over ``gids`` that moves as few shards as possible.

    Deterministic in its inputs' values only: ``gids`` may be any iterable in
    any order. Released excess shards are a group's highest-numbered ones;
    shards to place go, lowest-numbered first, to the groups short of their
    target in gid order.
    """
    current = _check_shards(shards)
    live = _gid_set(gids)
    if not live:
        return (0,) * len(current)
    ordered = sorted(live)
    counts = dict.fromkeys(ordered, 0)
    for gid in current:
        if gid in counts:
            counts[gid] += 1
    targets = _targets(counts, len(current))

    to_place = [shard for shard, gid in enumerate(current) if gid not in counts]
    for gid in ordered:
        excess = counts[gid] - targets[gid]
        if excess > 0:
            owned = [shard for shard, owner in enumerate(current) if owner == gid]
            to_place.extend(owned[-excess:])
    to_place.sort()

    new = list(current)
    place = iter(to_place)
    for gid in ordered:
        for _ in range(targets[gid] - counts[gid]):
            new[next(place)] = gid
    return tuple(new)


def join(shards: Sequence[int], current_gids: Iterable[int], new_gids: Iterable[int]) -> tuple[int, ...]:
    """The map after ``new_gids`` join the groups ``current_gids``.

    Raises ValueError when there is nothing to join, a gid is not a positive
    integer, appears twice, or is already a member, or when ``shards`` names
    a group outside ``current_gids``.
    """
    current_shards = _check_shards(shards)
    current = _gid_set(current_gids, "current gids")
    joining = _gid_set(new_gids, "joining gids")
    if not joining:
        raise ValueError("join needs at least one gid")
    already = sorted(joining & current)
    if already:
        raise ValueError(f"gids {already} have already joined")
    _check_owners(current_shards, current)
    return rebalance(current_shards, current | joining)


def leave(shards: Sequence[int], current_gids: Iterable[int], leaving_gids: Iterable[int]) -> tuple[int, ...]:
    """The map after ``leaving_gids`` leave the groups ``current_gids``.

    Raises ValueError when there is nothing to leave, a gid is not a
    positive integer, appears twice, or is not a member, or when ``shards``
    names a group outside ``current_gids``.
    """
    current_shards = _check_shards(shards)
    current = _gid_set(current_gids, "current gids")
    leaving = _gid_set(leaving_gids, "leaving gids")
    if not leaving:
        raise ValueError("leave needs at least one gid")
    unknown = sorted(leaving - current)
    if unknown:
        raise ValueError(f"gids {unknown} are not members")
    _check_owners(current_shards, current)
    return rebalance(current_shards, current - leaving)


def move(shards: Sequence[int], shard: int, gid: int, gids: Iterable[int] | None = None) -> tuple[int, ...]:
    """The map with ``shard`` served by ``gid`` (an operator's override; the
    next join or leave may move it again).

    Raises ValueError for a shard outside the map, a gid that is not a
    positive integer, or, when ``gids`` is given, a gid that is not a member.
    """
    current = _check_shards(shards)
    if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < len(current):
        raise ValueError(f"shard must be an integer in [0, {len(current)}), got {shard!r}")
    _check_gid(gid)
    if gids is not None and gid not in _gid_set(gids):
        raise ValueError(f"gid {gid} is not a member")
    new = list(current)
    new[shard] = gid
    return tuple(new)


def min_moves(old_shards: Sequence[int], new_gids: Iterable[int]) -> int:
    """The fewest shards any balanced, complete map over ``new_gids`` must
    reassign, from counts alone (independent of :func:`rebalance`, which
    tests hold to it).

    A group can keep at most its target of the shards it holds; targets are
    ``base`` or ``base + 1``, and a ``+1`` lets a group keep one more shard
    only when it holds more than ``base``, so the ``extra`` ``+1``s keep at
    most ``min(extra, groups holding more than base)`` more shards.
    Everything not kept moves.
    """
    old = _check_shards(old_shards)
    live = _gid_set(new_gids)
    if not live:
        return sum(1 for gid in old if gid != 0)
    base, extra = divmod(len(old), len(live))
    held = {gid: 0 for gid in live}
    for gid in old:
        if gid in held:
            held[gid] += 1
    kept = sum(min(count, base) for count in held.values())
    kept += min(extra, sum(1 for count in held.values() if count > base))
    return len(old) - kept
