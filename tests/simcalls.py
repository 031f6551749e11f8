"""Waiting for calls made into a ``SimReplicaGroup`` in simulated time."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from surfshard.testing.simrpc import SimReplicaGroup, resolve


class SimGroupTestCase(SynchronousTestCase):
    """Base of tests that drive a simulated replica group: run the clock
    until a call settles, then take its result or error (seed in failures)."""

    def outcome(self, g: SimReplicaGroup, d: Deferred[Any], within: float = 15.0) -> tuple[bool, Any]:
        if not g.settle([d], within):
            self.fail(f"seed={g.seed}: no answer within {within} simulated seconds")
        return resolve(d)

    def value(self, g: SimReplicaGroup, d: Deferred[Any], within: float = 15.0) -> Any:
        ok, value = self.outcome(g, d, within)
        if not ok:
            self.fail(f"seed={g.seed}: expected a result, got {value!r}")
        return value

    def error(self, g: SimReplicaGroup, d: Deferred[Any], within: float = 15.0) -> Exception:
        ok, value = self.outcome(g, d, within)
        if ok:
            self.fail(f"seed={g.seed}: expected an error, got {value!r}")
        return value
