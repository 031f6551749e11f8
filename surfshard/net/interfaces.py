"""The seams of the network layer, declared as ``zope.interface`` interfaces
in the style of ``raft.interfaces``.

``IRpcPool`` is what every caller of a remote method needs; the real
``surfshard.net.pool.RpcClientPool`` and the simulated
``surfshard.testing.simrpc.SimRpcPool`` both provide it and its optional
pipelining capability ``IPipelinedPool`` (a separate interface, as
hashicorp/raft adds optional transport capabilities), and one contract suite
(``tests/test_pool_contract.py``) runs against both.
"""

from __future__ import annotations

from zope.interface import Interface


class IRpcPool(Interface):
    """Calls to the nodes of a cluster by ``host:port`` address."""

    def call(address, method, args=None, timeout=None):  # type: ignore[no-untyped-def]
        """Call ``method`` with the ``args`` map on the node at ``address``.

        Returns a Deferred that fires with the result, or fails with the
        typed ``surfshard.errors`` exception the server answered,
        ``Unavailable`` (not delivered, or the connection went down), or
        ``Timeout`` (no reply within ``timeout`` seconds). Cancelling it
        forgets the call; the server may still run it.
        """

    def close():  # type: ignore[no-untyped-def]
        """Fail every pending call with ``Unavailable``, refuse new ones, and
        return a Deferred that fires once every connection is gone."""


class IPipelinedPool(IRpcPool):
    """The optional fast path: calls that answer a sink the caller already
    holds, and one-way messages."""

    def call_into(address, sink, method, args=None, timeout=None):  # type: ignore[no-untyped-def]
        """Send on an established connection; the outcome goes to
        ``sink.callback(result)`` or ``sink.errback(exception)`` (a
        ``surfshard.net.methods.ReplySink``) and no Deferred is made.

        Returns ``(connection, call_id)``, where ``connection.forget(call_id)``
        drops the call, or None having sent nothing when there is no
        established connection (then use ``call``, which connects). Raises
        ``BadRequest`` if the request cannot be encoded.
        """

    def notify(address, method, args=None):  # type: ignore[no-untyped-def]
        """Send a one-way request (``"noreply": true``) and never wait for it.
        True if it was sent or queued, False if it was dropped at once.
        Raises ``wire.FrameError`` if it cannot be encoded."""

    def on_connection_lost(callback):  # type: ignore[no-untyped-def]
        """Call ``callback(address)`` whenever an established connection to
        ``address`` is lost (reset, closed by the peer, timed out), but not
        when this pool closes it. A lost connection to a Raft peer is how
        its followers learn at once that a leader's process died."""
