"""Cluster configuration.

(Address parsing only so far; the TOML loader follows.)
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_address(text: Any) -> tuple[str, int]:
    """Split a node address ``"host:port"`` (or ``"[v6addr]:port"``) into
    ``(host, port)``; raise ``ValueError`` saying what is wrong.

    The host is a DNS name or an IPv4 address, or an IPv6 address in
    brackets; the port is decimal 1-65535. Port 0 is refused: a config names
    where peers find a node, and "any port" is nowhere.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r} has a bad IPv6 address {host!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r} has a bad host {host!r}")
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"{text!r} has a bad port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r} has port {port} outside 1-65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """The ``"host:port"`` spelling of an address (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
