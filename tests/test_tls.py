"""Tests for surfshard.net.tls: the development PKI, and mutual TLS on the
shared port: a client with a CA-signed certificate gets native RPC and HTTP
on one port; no certificate, a self-signed one or another CA's is refused
(and the refusal logged); a client refuses a server it cannot verify."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from surfshard.errors import Unavailable
from surfshard.net.pool import RpcClientPool, RpcConnection
from surfshard.net.port import make_site, node_factory
from surfshard.net.server import RpcServerFactory, ServerLimits, tune_socket
from surfshard.net.tls import TLSFiles, client_options, client_options_from_files, generate_dev_pki
from tests.test_port import http_get
from tests.test_rpc import capture_logs, make_table, wait_for

NAMES = ["node0", "node1", "client"]


def load_cert(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def san(cert: x509.Certificate) -> set[str]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in names.get_values_for_type(x509.DNSName)} | {
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    }


def self_signed(directory: str, name: str = "mallory") -> TLSFiles:
    """A certificate that names the right hosts but that no CA signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}.key")
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return TLSFiles(ca=cert_path, cert=cert_path, key=key_path)


class DevPKITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.files = generate_dev_pki(
            self.dir, NAMES, {"node0": "node0.example", "node1": ["10.1.2.3", "n1"]}
        )

    def test_files_are_named_predictably_and_keys_are_private(self):
        expected = {"ca.pem", "ca.key"} | {f"{n}.pem" for n in NAMES} | {f"{n}.key" for n in NAMES}
        self.assertEqual(set(os.listdir(self.dir)), expected)
        self.assertEqual(
            self.files["node0"],
            TLSFiles(
                ca=os.path.join(self.dir, "ca.pem"),
                cert=os.path.join(self.dir, "node0.pem"),
                key=os.path.join(self.dir, "node0.key"),
            ),
        )
        for name in ["ca", *NAMES]:
            mode = stat.S_IMODE(os.stat(os.path.join(self.dir, f"{name}.key")).st_mode)
            self.assertEqual(mode, 0o600, name)

    def test_certificates_name_loopback_and_their_hosts(self):
        self.assertEqual(
            san(load_cert(self.files["node0"].cert)), {"localhost", "127.0.0.1", "::1", "node0.example"}
        )
        self.assertEqual(
            san(load_cert(self.files["node1"].cert)), {"localhost", "127.0.0.1", "::1", "10.1.2.3", "n1"}
        )
        cert = load_cert(self.files["client"].cert)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "client")

    def test_certificates_are_signed_by_the_ca(self):
        ca = load_cert(self.files["node0"].ca)
        self.assertTrue(ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        for name in NAMES:
            cert = load_cert(self.files[name].cert)
            cert.verify_directly_issued_by(ca)
            self.assertFalse(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)

    def test_the_ca_is_reused_so_older_certificates_stay_valid(self):
        ca_before = Path(self.dir, "ca.pem").read_bytes()
        more = generate_dev_pki(self.dir, ["node2"])
        self.assertEqual(Path(self.dir, "ca.pem").read_bytes(), ca_before)
        load_cert(more["node2"].cert).verify_directly_issued_by(load_cert(self.files["node0"].ca))

    def test_bad_names_are_refused(self):
        for names in (["ca"], ["../x"], ["a b"], [""], ["dup", "dup"]):
            self.assertRaises(ValueError, generate_dev_pki, self.mktemp(), names)
        self.assertRaises(ValueError, generate_dev_pki, self.mktemp(), ["a"], {"b": "host"})


class MutualTLSTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.logs = capture_logs(self)
        self.dir = self.mktemp()
        self.files = generate_dev_pki(self.dir, NAMES)
        self.other = generate_dev_pki(self.mktemp(), ["client", "node0"])  # a different CA
        self.rpc = RpcServerFactory(make_table(), reactor, ServerLimits(idle_timeout=2.0))
        factory = node_factory(
            self.rpc, make_site(clock=reactor), reactor, tls=self.files["node0"], first_bytes_timeout=5.0
        )
        self.port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(self.stop)
        self.address = f"127.0.0.1:{self.port.getHost().port}"
        self.connections: list[RpcConnection] = []

    @defer.inlineCallbacks
    def stop(self):
        for connection in self.connections:
            if connection.connected:
                connection.transport.abortConnection()
        yield wait_for(lambda: not any(c.connected for c in self.connections), "client connections to close")
        yield self.port.stopListening()
        for connection in list(self.rpc.connections):
            connection.transport.abortConnection()
        yield wait_for(lambda: not self.rpc.connections, "server connections to close")

    def endpoint(self, creator: Any) -> Any:
        return wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port))

    @defer.inlineCallbacks
    def call_with(self, creator: Any, method: str = "add", args: Any = None):
        connection = yield self.endpoint(creator).connect(Factory.forProtocol(lambda: RpcConnection(reactor)))
        self.connections.append(connection)
        result = yield connection.call(method, {"a": 1, "b": 2} if args is None else args, timeout=10)
        return result

    @defer.inlineCallbacks
    def test_ca_signed_client_gets_native_and_http_on_one_port(self):
        pool = RpcClientPool(reactor, tls=self.files["client"])
        self.addCleanup(pool.close)
        self.assertEqual((yield pool.call(self.address, "add", {"a": 40, "b": 2}, timeout=10)), 42)
        endpoint = self.endpoint(client_options_from_files(self.files["client"], "127.0.0.1"))
        status, _headers, body = yield http_get(endpoint, "/health")
        self.assertEqual((status, json.loads(body)), (200, {"ok": True}))
        # A node's certificate works as a client certificate too (peers call peers).
        self.assertEqual(
            (yield self.call_with(client_options_from_files(self.files["node1"], "localhost"))), 3
        )
        self.assertEqual(self.logs.refused("TLS peer"), [])

    @defer.inlineCallbacks
    def test_handlers_can_see_the_client_certificate(self):
        self.rpc.table.add(
            "who",
            lambda ctx: ctx.peer_certificate().get_subject().commonName,
            pass_context=True,
        )
        name = yield self.call_with(client_options_from_files(self.files["client"], "127.0.0.1"), "who", {})
        self.assertEqual(name, "client")
        # Dead-peer detection reaches the TCP socket under the TLS layer.
        tls_transport = self.connections[-1].transport
        self.assertEqual(tls_transport.transport.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertTrue(tune_socket(tls_transport))

    @defer.inlineCallbacks
    def assert_refused(self, creator: Any):
        with self.assertRaises(Unavailable):
            yield self.call_with(creator)
        yield wait_for(lambda: self.logs.refused("TLS peer"), "the server to log the refused peer")
        [event] = self.logs.refused("TLS peer")
        self.assertTrue(event["peer"].startswith("127.0.0.1:"))
        self.assertEqual(len(self.rpc.connections), 0)  # never reached the RPC layer

    def test_client_without_a_certificate_is_refused(self):
        ca = ssl.Certificate.loadPEM(Path(self.files["client"].ca).read_bytes())
        return self.assert_refused(ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca))

    def test_self_signed_client_is_refused(self):
        mallory = self_signed(self.mktemp())
        ca, cert, key = (Path(p).read_bytes() for p in (self.files["client"].ca, mallory.cert, mallory.key))
        return self.assert_refused(client_options(ca, cert, key, "127.0.0.1"))

    def test_client_from_another_ca_is_refused(self):
        other = self.other["client"]
        ca, cert, key = (Path(p).read_bytes() for p in (self.files["client"].ca, other.cert, other.key))
        return self.assert_refused(client_options(ca, cert, key, "127.0.0.1"))

    @defer.inlineCallbacks
    def test_plaintext_client_is_refused(self):
        pool = RpcClientPool(reactor)  # no TLS at all
        self.addCleanup(pool.close)
        with self.assertRaises(Unavailable):
            yield pool.call(self.address, "add", {"a": 1}, timeout=10)
        yield wait_for(lambda: self.logs.refused("TLS peer"), "the server to log the refused peer")

    @defer.inlineCallbacks
    def test_client_refuses_a_server_it_cannot_verify(self):
        # Trusting only the other CA, the client must not accept our server.
        pool = RpcClientPool(reactor, tls=self.other["client"])
        self.addCleanup(pool.close)
        with self.assertRaises(Unavailable):
            yield pool.call(self.address, "add", {"a": 1}, timeout=10)
        # Nor a server whose certificate does not name the host dialled.
        wrong_host = client_options_from_files(self.files["client"], "node9.example")
        with self.assertRaises(Unavailable):
            yield self.call_with(wrong_host)
