"""Mutually authenticated TLS for every SurfShard port, and a development PKI.

Every node and every client holds a key and a certificate signed by the
cluster CA; servers require and verify the client's certificate, clients
verify the server's certificate against the CA *and* the host they dialled.
A peer with no certificate, a self-signed one or one from another CA fails
the handshake.

``generate_dev_pki`` makes such a CA and per-name certificates for local
clusters and tests.  It is not a production CA: the CA key sits on disk next
to the certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
)
from twisted.protocols.tls import TLSMemoryBIOFactory

__all__ = [
    "TLSFiles",
    "client_options",
    "client_options_from_files",
    "generate_dev_pki",
    "server_options",
    "server_options_from_files",
    "wrap_server_factory",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
DEFAULT_VALIDITY_DAYS = 825
#: Names end up as file names and certificate common names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Every certificate is good for the loopback addresses, so a local cluster
#: works whatever its config calls the hosts.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class TLSFiles:
    """Paths of one party's TLS material: the cluster CA certificate and
    this node's (or client's) certificate and private key, all PEM."""

    ca: str
    cert: str
    key: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        return (Path(self.ca).read_bytes(), Path(self.cert).read_bytes(), Path(self.key).read_bytes())


def server_options(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> IOpenSSLServerConnectionCreator:
    """Server side: present ``cert``; require a client certificate signed by
    the CA in ``ca_pem`` (the trust root implies verify + require)."""
    identity = ssl.PrivateCertificate.loadPEM(_pem(cert_pem) + b"\n" + _pem(key_pem))
    return identity.options(ssl.Certificate.loadPEM(_pem(ca_pem)))


def client_options(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, hostname: str
) -> IOpenSSLClientConnectionCreator:
    """Client side: present ``cert``; accept only a server whose certificate
    the CA signed and that names ``hostname`` (DNS name or IP address)."""
    return ssl.optionsForClientTLS(
        hostname,
        trustRoot=ssl.Certificate.loadPEM(_pem(ca_pem)),
        clientCertificate=ssl.PrivateCertificate.loadPEM(_pem(cert_pem) + b"\n" + _pem(key_pem)),
    )


def server_options_from_files(files: TLSFiles) -> IOpenSSLServerConnectionCreator:
    return server_options(*files.read())


def client_options_from_files(files: TLSFiles, hostname: str) -> IOpenSSLClientConnectionCreator:
    return client_options(*files.read(), hostname)


class _RefusingTLSFactory(TLSMemoryBIOFactory):
    """A TLS wrapper that lets the wrapped factory refuse a connection:
    when it builds no protocol (a node at ``max_connections``), the socket
    is closed at once, as without TLS, instead of being wrapped around
    nothing."""

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


def wrap_server_factory(factory: IProtocolFactory, files: TLSFiles) -> TLSMemoryBIOFactory:
    """Wrap a server factory so every connection speaks TLS first."""
    return _RefusingTLSFactory(server_options_from_files(files), False, factory)


def _pem(data: bytes | str) -> bytes:
    return data.encode("ascii") if isinstance(data, str) else data


# ---------------------------------------------------------------------------
# Development PKI
# ---------------------------------------------------------------------------


def generate_dev_pki(
    out_dir: str | os.PathLike[str],
    names: Iterable[str],
    hosts: Mapping[str, str | Iterable[str]] | None = None,
    *,
    roles: Mapping[str, str] | None = None,
    days: int = DEFAULT_VALIDITY_DAYS,
    now: datetime.datetime | None = None,
) -> dict[str, TLSFiles]:
    """Create (or reuse) a CA in ``out_dir`` and a key + certificate per name.

    Files: ``ca.pem``, ``ca.key``, ``NAME.pem``, ``NAME.key`` (keys mode
    0600).  An existing ``ca.pem``/``ca.key`` pair is reused, so adding a
    node later keeps the other certificates valid.  Each certificate is
    usable as server and client, names the loopback addresses and the hosts
    ``hosts[name]`` (a DNS name or IP address, or several), and has the name
    as its common name and ``roles[name]`` (if given) as its organizational
    unit: the role a node grants its holder (``surfshard.replica.access``).
    Returns ``{name: TLSFiles}``.
    """
    names = list(names)
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == "ca":
            raise ValueError(f"{name!r} cannot be a certificate name (letters, digits, _.-; not 'ca')")
    if len(set(names)) != len(names):
        raise ValueError("certificate names must be unique")
    hosts = hosts or {}
    unknown = set(hosts) - set(names)
    if unknown:
        raise ValueError(f"hosts given for names not being generated: {sorted(unknown)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = now or datetime.datetime.now(datetime.UTC)

    ca_cert, ca_key = _load_or_make_ca(out, now, days)
    result: dict[str, TLSFiles] = {}
    for name in names:
        extra = hosts.get(name, ())
        extra_hosts = [extra] if isinstance(extra, str) else list(extra)
        role = (roles or {}).get(name)
        cert, key = _make_leaf(name, [*_LOOPBACK_HOSTS, *extra_hosts], ca_cert, ca_key, now, days, role)
        cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        result[name] = TLSFiles(ca=str(out / CA_CERT_FILE), cert=str(cert_path), key=str(key_path))
    return result


def _load_or_make_ca(out: Path, now: datetime.datetime, days: int) -> tuple[x509.Certificate, Any]:
    cert_path, key_path = out / CA_CERT_FILE, out / CA_KEY_FILE
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SurfShard development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "SurfShard development CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert, key


def _make_leaf(
    name: str,
    hosts: list[str],
    ca_cert: x509.Certificate,
    ca_key: Any,
    now: datetime.datetime,
    days: int,
    role: str | None = None,
) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if role is not None:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    alt_names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; a private key is never readable by others, not even
    for the moment between creating and chmod-ing the file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
