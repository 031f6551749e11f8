"""Who may call what on a node: roles from verified TLS certificates.

With TLS every caller presents a certificate the cluster CA signed. Its
subject says who it is: the common name (CN) is the party's name and the
organizational unit (OU) its role, as ``surfshard certs`` issues them:

- ``node``: a node of the cluster, CN its node name (``group-1-0``,
  ``shardmaster-2``, ``blockstore-0``), which names its group and index
  (a metadata group's or the ShardMaster's node may be past the config's
  list: one added while it runs, ``surfshard certs --node``);
- ``admin``: an operator (shard moves, chaos calls, leadership changes);
- ``client``: anyone else (files, status). A certificate without a role,
  or naming a node the config does not have, is a client.

Methods declare who may call them (``surfshard.net.methods.Access``): Raft
only from the replicas of the node's own group, with each message's sender
checked against the certificate (``RpcRaftTransport.deliver_from``); shard
transfer from any replica group's node; admin and chaos calls from admins
(chaos also needs the chaos switch); everything else from anyone.

Without TLS nothing is checked: the cluster trusts its network, as etcd
does without TLS, and says so in its log at start-up.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger

from surfshard.config import ClusterConfig, NodeKind, node_name
from surfshard.net.methods import Access, Authorizer, Caller

__all__ = ["ADMIN", "CLIENT", "NODE", "ClusterAccess", "node_of", "server_access"]

#: The name of a metadata group's node: ``group-<gid>-<index>``.
_ADDED_GROUP_NODE = re.compile(r"group-([1-9][0-9]{0,18})-(0|[1-9][0-9]{0,4})")
#: The name of the ShardMaster's node: ``shardmaster-<index>``.
_ADDED_SHARDMASTER_NODE = re.compile(r"shardmaster-(0|[1-9][0-9]{0,4})")

NODE = "node"
ADMIN = "admin"
CLIENT = "client"

log = Logger()

_NEEDS = {
    Access.ADMIN: "an admin certificate",
    Access.PEER: "a node certificate of this node's group",
    Access.CLUSTER: "a node certificate of a replica group",
    Access.CLIENT: "any certificate",
}


def node_of(cluster: ClusterConfig, name: str) -> tuple[NodeKind, int] | None:
    """``(kind, gid)`` of the node called ``name`` in ``cluster``: one of the
    config's, or a node added past its list to a metadata group or the
    ShardMaster (``group-<gid>-<index>``, ``shardmaster-<index>``); None
    otherwise."""
    for ref in cluster.all_nodes():
        if node_name(ref.kind, ref.gid, ref.index) == name:
            return NodeKind(ref.kind), ref.gid
    return _added_node(cluster, name)


def _added_node(cluster: ClusterConfig, name: str) -> tuple[NodeKind, int] | None:
    match = _ADDED_GROUP_NODE.fullmatch(name)
    if match and int(match[1]) in cluster.groups:
        return NodeKind.GROUP, int(match[1])
    if cluster.shardmaster and _ADDED_SHARDMASTER_NODE.fullmatch(name):
        return NodeKind.SHARDMASTER, 0
    return None


class ClusterAccess:
    """Identifies callers by certificate and decides what they may call,
    for the node named ``me`` of ``cluster``."""

    def __init__(self, cluster: ClusterConfig, me: str) -> None:
        #: node name -> (kind, gid) for every node of the config.
        self.nodes: dict[str, tuple[NodeKind, int]] = {
            node_name(n.kind, n.gid, n.index): (NodeKind(n.kind), n.gid) for n in cluster.all_nodes()
        }
        self.cluster = cluster
        found = self.node_of(me)
        if found is None:
            raise ValueError(f"{me!r} is not a node of {cluster.source}")
        self.me = me
        self.my_group = found

    def node_of(self, name: str) -> tuple[NodeKind, int] | None:
        """``(kind, gid)`` of the node called ``name``: one of the config's,
        or a node added past its list to a metadata group or the
        ShardMaster; None otherwise."""
        known = self.nodes.get(name)
        return known if known is not None else _added_node(self.cluster, name)

    def identify(self, transport: Any) -> Caller:
        """The caller behind ``transport`` (TLS: its verified certificate)."""
        get = getattr(transport, "getPeerCertificate", None)
        cert = get() if get is not None else None
        if cert is None:
            return Caller(CLIENT, "")
        subject = cert.get_subject()
        name = subject.commonName or ""
        role = subject.organizationalUnitName or ""
        if role == NODE and self.node_of(name) is not None:
            return Caller(NODE, name)
        if role == ADMIN:
            return Caller(ADMIN, name)
        return Caller(CLIENT, name)

    def authorize(self, caller: Caller, grants: tuple[Access, ...]) -> str | None:
        for grant in grants:
            if grant is Access.CLIENT:
                return None
            if grant is Access.ADMIN and caller.role == ADMIN:
                return None
            found = self.node_of(caller.name) if caller.role == NODE else None
            if found is not None:
                kind, gid = found
                if grant is Access.PEER and (kind, gid) == self.my_group:
                    return None
                if grant is Access.CLUSTER and kind is NodeKind.GROUP:
                    return None
        return "needs " + " or ".join(_NEEDS[g] for g in grants)


def server_access(cluster: ClusterConfig, me: str) -> dict[str, Any]:
    """The ``identify`` and ``authorize`` keywords of ``RpcServerFactory``
    for node ``me``: checks with TLS, none without (logged once, here)."""
    if cluster.tls is None:
        log.warn(
            "{me}: TLS is off: this node trusts every peer that reaches its port (any client can make "
            "Raft, admin and chaos calls). Turn TLS on with `surfshard certs` and a [tls] table.",
            me=me,
        )
        return {}
    access = ClusterAccess(cluster, me)
    authorize: Authorizer = access.authorize
    return {"identify": access.identify, "authorize": authorize}
