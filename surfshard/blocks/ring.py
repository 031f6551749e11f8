"""Where blocks live: consistent hashing of block hashes onto block stores.

Each store sits at ``vnodes`` points of a 64-bit ring (the first 8 bytes
of ``sha256("ADDRESS#k")``); a block sits at the first 8 bytes of its own
hash, and its ``replicas`` copies go on the first distinct stores clockwise
from there. Adding a store to N moves about 1/(N+1) of the blocks (those
whose clockwise walk now meets it first); removing one moves only its own.

``candidates(h)`` is the whole clockwise walk: writers put a block on the
first ``replicas`` stores of it that answer (a store that is down is
stepped over, and the block's copy lands on the next one, as Dynamo's
sloppy quorum does), readers try the stores in the same order, and repair
copies a block back to its ``placement`` once a store is back.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

from surfshard.keyspace import validate_block_hash

__all__ = ["BlockRing", "DEFAULT_VNODES"]

#: Points per store: enough for an even spread over a handful of stores.
DEFAULT_VNODES = 128


def _point(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


class BlockRing:
    """The placement of blocks on ``stores`` (addresses)."""

    def __init__(self, stores: Sequence[str], replicas: int, vnodes: int = DEFAULT_VNODES) -> None:
        if len(set(stores)) != len(stores):
            raise ValueError(f"block stores listed twice: {list(stores)}")
        if stores and not 1 <= replicas <= len(stores):
            raise ValueError(f"replicas must be 1..{len(stores)}, not {replicas}")
        self.stores = tuple(stores)
        self.replicas = replicas if stores else 0
        points = sorted((_point(f"{store}#{k}"), store) for store in self.stores for k in range(vnodes))
        self._keys = [p for p, _ in points]
        self._owners = [s for _, s in points]

    def candidates(self, block_hash: str) -> list[str]:
        """Every store, in the order a block's copies are placed and looked for."""
        if not self.stores:
            return []
        start = bisect.bisect_left(self._keys, int(block_hash[:16], 16))
        seen: list[str] = []
        n = len(self._keys)
        for i in range(n):
            store = self._owners[(start + i) % n]
            if store not in seen:
                seen.append(store)
                if len(seen) == len(self.stores):
                    break
        return seen

    def placement(self, block_hash: str) -> list[str]:
        """The stores that should hold ``block_hash``."""
        return self.candidates(block_hash)[: self.replicas]

    def map(self, hashes: Sequence[str]) -> dict[str, list[str]]:
        """SurfStore's GetBlockStoreMap: store address -> the blocks it
        should hold, of ``hashes`` (each block under each of its replicas).
        ``BadRequest`` if one is not a block hash (the map answers callers
        from outside, unlike ``candidates``)."""
        for h in hashes:
            validate_block_hash(h)
        out: dict[str, list[str]] = {}
        for h in hashes:
            for store in self.placement(h):
                out.setdefault(store, []).append(h)
        return out
