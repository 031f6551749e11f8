"""Filenames chosen by shard, for tests and benchmarks that need files in a
given shard (to move it, fill it, or keep away from it)."""

from __future__ import annotations

import itertools

from surfshard.keyspace import shard_of


def names_in_shard(shard: int, count: int, nshards: int, prefix: str = "f") -> list[str]:
    """The first ``count`` names ``f"{prefix}{i}"`` (i = 0, 1, ...) that fall
    in ``shard`` of ``nshards``. Bounded: about ``count * nshards`` names are
    tried, since the hash spreads them evenly."""
    if not 0 <= shard < nshards:
        raise ValueError(f"shard {shard} is not one of {nshards}")
    names: list[str] = []
    for i in itertools.count():
        if len(names) == count:
            return names
        name = f"{prefix}{i}"
        if shard_of(name, nshards) == shard:
            names.append(name)
    raise AssertionError("unreachable")
