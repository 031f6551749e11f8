"""Who may call what (issue 12, item 1): roles from verified certificates.

- ``ClusterAccess`` on certificates ``generate_dev_pki`` makes: the role and
  name come from the certificate, the grants from the method;
- a live TLS group (real ``twistd`` processes on 127.0.0.1, certificates
  from the ``surfshard certs`` code path): a client certificate calling
  ``raft``, ``transfer_leadership``, the chaos calls (native and XML-RPC)
  or shard transfer is refused; a node certificate of another group is
  refused for this group's Raft traffic (and may fetch shards); a peer's
  certificate with a forged ``frm`` changes nothing; an admin may crash and
  restore; clients still reach the file methods.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import xmlrpc.client
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from raft.types import Message, MessageType
from surfshard import errors
from surfshard.config import NodeKind, load_config
from surfshard.net.methods import Access, Caller
from surfshard.net.tls import generate_dev_pki
from surfshard.replica.access import ADMIN, CLIENT, NODE, ClusterAccess
from tests.procs import NativeClient, NodeProcess, free_ports, twistd_node_argv, wait_until


def write_config(directory: Path) -> Path:
    """A cluster of a ShardMaster and two groups; the test runs group 1 only
    (the others exist so their certificates mean something)."""
    ports = free_ports(9)
    quoted = [f'"127.0.0.1:{p}"' for p in ports]
    text = "\n".join(
        [
            "[cluster]",
            'name = "acl"',
            "shards = 4",
            'data_dir = "data"',
            "chaos = true",
            "[shardmaster]",
            f"nodes = [{', '.join(quoted[0:3])}]",
            "[groups.1]",
            f"nodes = [{', '.join(quoted[3:6])}]",
            "[groups.2]",
            f"nodes = [{', '.join(quoted[6:9])}]",
            "[tls]",
            'ca = "certs/ca.pem"',
            'cert_dir = "certs"',
            "",
        ]
    )
    path = directory / "acl.toml"
    path.write_text(text, encoding="utf-8")
    return path


def make_certs(config: Path) -> None:
    """What ``surfshard certs`` writes for ``config``."""
    import io

    from client.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["certs", "--config", str(config), "--out", str(config.parent / "certs"), "--json"]) == 0


class CertsForAddedNodesTests(SynchronousTestCase):
    """``surfshard certs --node`` issues one certificate, from the CA already
    made, for a node added to a group or to the ShardMaster while it runs."""

    def test_added_nodes_get_node_certificates_others_are_refused(self) -> None:
        import io

        from OpenSSL import crypto

        from client.cli import main

        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = write_config(directory)
        make_certs(config)
        out = str(directory / "certs")
        for node in ("shardmaster-3", "group-2-4"):
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(
                    [
                        "certs",
                        "--config",
                        str(config),
                        "--out",
                        out,
                        "--node",
                        node,
                        "--address",
                        "127.0.0.1:9",
                    ]
                )
            self.assertEqual(code, 0, node)
            cert = crypto.load_certificate(
                crypto.FILETYPE_PEM, (directory / "certs" / f"{node}.pem").read_bytes()
            )
            self.assertEqual(
                (cert.get_subject().commonName, cert.get_subject().organizationalUnitName), (node, NODE)
            )
        for node in ("group-9-0", "blockstore-5", "shardmaster-x", "someone"):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(
                    [
                        "certs",
                        "--config",
                        str(config),
                        "--out",
                        out,
                        "--node",
                        node,
                        "--address",
                        "127.0.0.1:9",
                    ]
                )
            self.assertEqual(code, 2, node)
            self.assertIn("group-GID-INDEX|shardmaster-INDEX", " ".join(err.getvalue().split()), node)


class TLSClient(NativeClient):
    """NativeClient over TLS, presenting the certificate ``name``."""

    def __init__(self, address: str, certs: Path, name: str, timeout: float = 10.0) -> None:
        super().__init__(address, timeout)
        self.context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        self.context.load_cert_chain(str(certs / f"{name}.pem"), str(certs / f"{name}.key"))

    def _connect(self) -> socket.socket:
        if self._sock is None:
            host, _, port = self.address.rpartition(":")
            try:
                raw = socket.create_connection((host, int(port)), timeout=self.timeout)
                self._sock = self.context.wrap_socket(raw, server_hostname=host)
            except OSError as e:
                raise errors.Unavailable(f"cannot connect to {self.address}: {e}") from e
            from surfshard.net import wire

            self._decoder = wire.FrameDecoder()
        return self._sock


class AccessUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.config = load_config(write_config(directory))
        names = {
            "group-1-0": NODE,
            "group-2-0": NODE,
            "shardmaster-0": NODE,
            "admin": ADMIN,
            "client": CLIENT,
        }
        names["stranger"] = NODE  # a node role for a name the config lacks
        names["group-1-7"] = NODE  # a node added to group 1 while it runs
        names["group-9-0"] = NODE  # a group the config lacks
        names["shardmaster-5"] = NODE  # a node added to the ShardMaster while it runs
        self.files = generate_dev_pki(directory / "certs", list(names), roles=names)
        self.files["norole"] = generate_dev_pki(directory / "certs", ["norole"])["norole"]
        self.access = ClusterAccess(self.config, "group-1-1")

    def caller(self, name: str) -> Caller:
        from OpenSSL import crypto

        cert = crypto.load_certificate(crypto.FILETYPE_PEM, Path(self.files[name].cert).read_bytes())

        class Transport:
            def getPeerCertificate(self) -> Any:
                return cert

        return self.access.identify(Transport())

    def test_roles_come_from_the_certificate(self) -> None:
        self.assertEqual(self.caller("group-1-0"), Caller(NODE, "group-1-0"))
        self.assertEqual(self.caller("admin"), Caller(ADMIN, "admin"))
        self.assertEqual(self.caller("client"), Caller(CLIENT, "client"))
        self.assertEqual(self.caller("stranger"), Caller(CLIENT, "stranger"))
        self.assertEqual(self.caller("norole"), Caller(CLIENT, "norole"))

    def test_a_node_added_to_a_group_is_that_groups_peer(self) -> None:
        added = self.caller("group-1-7")
        self.assertEqual(added, Caller(NODE, "group-1-7"))
        self.assertIsNone(self.access.authorize(added, (Access.PEER,)))
        self.assertEqual(self.caller("group-9-0"), Caller(CLIENT, "group-9-0"))
        # and an added node's own server knows its group
        self.assertEqual(ClusterAccess(self.config, "group-2-5").my_group, (NodeKind.GROUP, 2))

    def test_a_node_added_to_the_shardmaster_is_its_peer_only(self) -> None:
        added = self.caller("shardmaster-5")
        self.assertEqual(added, Caller(NODE, "shardmaster-5"))
        server = ClusterAccess(self.config, "shardmaster-0")
        self.assertIsNone(server.authorize(added, (Access.PEER,)))
        # a metadata group's Raft or shard transfer is not for it
        self.assertIsNotNone(self.access.authorize(added, (Access.PEER,)))
        self.assertIsNotNone(self.access.authorize(added, (Access.CLUSTER,)))
        self.assertEqual(ClusterAccess(self.config, "shardmaster-5").my_group, (NodeKind.SHARDMASTER, 0))
        self.assertRaises(ValueError, ClusterAccess, self.config, "shardmaster-x")

    def test_grants(self) -> None:
        allowed = {
            (name, grant): self.access.authorize(self.caller(name), (grant,)) is None
            for name in ("group-1-0", "group-2-0", "shardmaster-0", "admin", "client")
            for grant in Access
        }
        self.assertEqual(
            {k for k, ok in allowed.items() if ok},
            {
                *(
                    (name, Access.CLIENT)
                    for name in ("group-1-0", "group-2-0", "shardmaster-0", "admin", "client")
                ),
                ("admin", Access.ADMIN),
                ("group-1-0", Access.PEER),
                ("group-1-0", Access.CLUSTER),
                ("group-2-0", Access.CLUSTER),
            },
        )
        self.assertIn(
            "admin certificate", self.access.authorize(self.caller("client"), (Access.ADMIN,)) or ""
        )


class LiveTLSGroupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.config_path = write_config(self.dir)
        make_certs(self.config_path)
        self.certs = self.dir / "certs"
        cluster = load_config(self.config_path)
        self.addresses = list(cluster.groups[1])
        self.nodes = []
        for i, address in enumerate(self.addresses):
            argv = twistd_node_argv(self.config_path, i, group=1, chaos=True)
            node = NodeProcess(f"group-1-{i}", argv, self.dir / "logs" / f"node{i}.log", address)
            self.nodes.append(node)
            node.start()
            self.addCleanup(node.kill)

    def client(self, i: int, name: str) -> TLSClient:
        c = TLSClient(self.addresses[i], self.certs, name)
        self.addCleanup(c.close)
        return c

    def leader(self) -> int:
        def find() -> int | None:
            for i in range(3):
                with contextlib.suppress(errors.SurfShardError, OSError):
                    if self.client(i, "client").call("is_leader"):
                        return i + 1  # truthy for wait_until
            return None

        return wait_until(find, 60.0, 0.1, "a leader over TLS") - 1

    def forbidden(self, c: TLSClient, method: str, args: dict[str, Any] | None = None) -> str:
        with self.assertRaises(errors.Forbidden) as raised:
            c.call(method, args or {})
        return str(raised.exception)

    def test_roles_on_a_live_tls_group(self) -> None:
        leader = self.leader()
        follower = (leader + 1) % 3
        client = self.client(leader, "client")
        # Clients reach the file methods (no shard map here: no shard is
        # served, so the answer is WRONG_GROUP, past the access check).
        self.assertRaises(errors.WrongGroup, client.call, "getfileinfo", {"name": "f"})
        status = client.call("status")
        term = status["term"]

        # A client certificate: no Raft, no leader transfer, no chaos, no shard transfer.
        heartbeat = Message(MessageType.HEARTBEAT, to=follower + 1, frm=leader + 1, term=term + 5)
        self.forbidden(
            self.client(follower, "client"), "raft", {"group": "group-1", "msg": heartbeat.to_wire()}
        )
        self.forbidden(client, "transfer_leadership", {"to": follower + 1})
        self.forbidden(client, "crash")
        self.forbidden(client, "restore")
        self.forbidden(client, "shard_fetch", {"num": 1, "shard": 0})
        # ... nor over XML-RPC on the same port.
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        context.load_cert_chain(str(self.certs / "client.pem"), str(self.certs / "client.key"))
        proxy = xmlrpc.client.ServerProxy(f"https://{self.addresses[leader]}/RPC2", context=context)
        with self.assertRaises(xmlrpc.client.Fault) as fault:
            proxy.surfstore.crash()
        self.assertIn("FORBIDDEN", str(fault.exception.faultString) + str(fault.exception.faultCode))
        self.assertFalse(proxy.surfstore.isCrashed())

        # A node of another group: not this group's Raft, but it may fetch shards.
        other = self.client(follower, "group-2-0")
        why = self.forbidden(other, "raft", {"group": "group-1", "msg": heartbeat.to_wire()})
        self.assertIn("group", why)
        with self.assertRaises(errors.SurfShardError) as raised:
            other.call("shard_fetch", {"num": 1, "shard": 0})
        self.assertNotIsInstance(raised.exception, errors.Forbidden)

        # A peer's certificate with a forged sender: refused, nothing changes.
        peer_index = (leader + 2) % 3
        peer = self.client(follower, f"group-1-{peer_index}")
        forged = Message(
            MessageType.VOTE, to=follower + 1, frm=leader + 1, term=term + 10, log_term=99, index=99
        )
        self.forbidden(peer, "raft", {"group": "group-1", "msg": forged.to_wire()})
        self.assertEqual(self.client(follower, "client").call("status")["term"], term)
        self.assertEqual(self.client(leader, "client").call("status")["role"], "leader")

        # An admin may crash and restore (chaos is on in this config).
        admin = self.client(follower, "admin")
        self.assertTrue(admin.call("crash"))
        self.assertTrue(self.client(follower, "client").call("is_crashed"))
        self.assertTrue(admin.call("restore"))
        self.assertFalse(self.client(follower, "client").call("is_crashed"))
        # The group is whole: writes reach the leader's state machine.
        self.assertRaises(
            errors.WrongGroup, client.call, "updatefile", {"name": "f", "version": 1, "hashlist": ["0" * 64]}
        )
