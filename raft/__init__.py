"""A Raft consensus library with an I/O-free core.

``raft.core`` is a deterministic state machine (ticks and messages in, a
``Ready`` batch out) in the manner of etcd's raft; ``raft.node`` drives it from
Twisted; ``raft.storage`` persists it; ``raft.testing.simnet`` is a seeded simulated
network for tests of any layer built on top.
"""
