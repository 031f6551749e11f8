"""Cluster configuration: one file describes every node of a cluster.

Two formats load into the same frozen ``ClusterConfig``:

- TOML (the native format), read with ``tomllib``::

      [cluster]
      name = "local"          # default: the file's stem
      shards = 8              # fixed for the life of the cluster
      data_dir = "data/local" # default "data/<name>"
      chaos = true            # answer crash/restore calls (default false)

      [shardmaster]
      nodes = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]

      [groups.1]
      nodes = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]

      [blockstores]           # block stores; each block on `replicas` of them (default 2, or 1 with one store)
      nodes = ["127.0.0.1:7301"]

      [tls]                   # optional: mutual TLS with a cluster CA
      ca = "certs/ca.pem"
      cert_dir = "certs"      # NAME.pem / NAME.key per node, NAME as node_name()

      [raft]                  # optional, defaults shown
      tick_ms = 50
      heartbeat_ticks = 2
      election_ticks = 6
      fsync = true
      snapshot_entries = 10000

      [limits]                # optional, defaults shown: what one peer may cost a node
      max_in_flight = 256     # requests one native connection may have running
      stalled_reader_timeout = 60   # seconds a peer may read none of our replies
      max_http_body = 16777216      # bytes of one HTTP request body
      memory_budget = 536870912     # bytes all connections may hold before new work gets BUSY
      max_connections = 4096        # open connections (native and HTTP) per node
      max_snapshot_bytes = 4294967296   # size of a snapshot a follower assembles from chunks

  Without a ``[shardmaster]`` table there must be exactly one group, and it
  serves every shard (a static cluster).

- SurfStore's single-group format: ``M: 3`` then ``metadata0: host:port``
  ... one line per node (blank lines and ``#`` comments allowed, and an
  optional ``blockstore: host:port`` line). It loads as one group (gid 1),
  one shard, no shard master, chaos on (SurfStore tooling drives the
  ChaosMonkey calls).

Relative paths resolve against the config file's directory, except in the
built-in config (``default_config_path()``), which lives inside the installed
package and so resolves them against the working directory.

Every mistake is a ``ConfigError`` naming the file and the dotted key, and
unknown keys are mistakes too: a typo such as ``election_tick`` must not
silently leave a default in place.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import ipaddress
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from surfshard.keyspace import MAX_SHARDS

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_CLUSTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_ADDRESS_EXPECTED = '"host:port" with a port 1-65535'


class NodeKind(enum.StrEnum):
    SHARDMASTER = "shardmaster"
    GROUP = "group"
    BLOCKSTORE = "blockstore"


class ConfigError(ValueError):
    """A config file is unreadable or wrong. ``str()`` reads
    ``FILE: KEY: PROBLEM (expected EXPECTED)`` so the user can go straight
    to the line to fix."""

    def __init__(self, file: str, key: str, problem: str, expected: str = "") -> None:
        self.file = file
        self.key = key
        self.problem = problem
        self.expected = expected
        where = f"{file}: {key}: " if key else f"{file}: "
        tail = f" (expected {expected})" if expected else ""
        super().__init__(f"{where}{problem}{tail}")


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


@dataclasses.dataclass(frozen=True)
class RaftTimings:
    """Raft tunables from ``[raft]``; defaults match ``raft.types.RaftConfig``
    and the driver's 50 ms tick (heartbeat 100 ms, elections 300-600 ms)."""

    tick_ms: int = 50
    heartbeat_ticks: int = 2
    election_ticks: int = 6
    fsync: bool = True
    snapshot_entries: int = 10_000


@dataclasses.dataclass(frozen=True)
class Limits:
    """``[limits]``: what one peer may make a node hold (issue 18's bounds)."""

    max_in_flight: int = 256
    stalled_reader_timeout: int = 60
    max_http_body: int = 16 * 1024 * 1024
    #: Bytes all native connections of a node may hold in buffers before
    #: it answers new work BUSY.
    memory_budget: int = 512 * 1024 * 1024
    #: Connections a node keeps open at once, native and HTTP together;
    #: past it new ones are closed at once (and logged).
    max_connections: int = 4096
    #: The largest snapshot a follower assembles from a leader's chunks:
    #: a chunk that would pass it is refused, so a broken or forged leader
    #: cannot make a follower buffer without end.
    max_snapshot_bytes: int = 4 * 1024 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: the cluster CA and the directory of per-node key pairs."""

    ca: Path
    cert_dir: Path

    def cert_paths(self, name: str) -> tuple[Path, Path]:
        """``(certificate, private key)`` of node ``name`` (see ``node_name``)."""
        return self.cert_dir / f"{name}.pem", self.cert_dir / f"{name}.key"


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """One node of the cluster: what it is, which group, its index, its address."""

    kind: NodeKind
    gid: int  # 0 unless kind is GROUP
    index: int
    address: str


def node_name(kind: NodeKind | str, gid: int, index: int) -> str:
    """The node's name, used for certificate files and logs:
    ``shardmaster-0``, ``group-1-2``, ``blockstore-0``."""
    kind = NodeKind(kind)
    return f"group-{gid}-{index}" if kind is NodeKind.GROUP else f"{kind.value}-{index}"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """A loaded, validated cluster config. ``groups`` is read-only, ordered by gid."""

    source: str  # the file as the user named it (for messages)
    format: str  # "toml" or "surfstore"
    name: str
    shards: int
    data_dir: Path
    chaos: bool
    shardmaster: tuple[str, ...]
    groups: Mapping[int, tuple[str, ...]]
    blockstores: tuple[str, ...]
    tls: TLSConfig | None
    raft: RaftTimings
    limits: Limits = Limits()
    #: Copies of each block, on distinct block stores (``[blockstores]
    #: replicas``; default 2 with two stores or more, else 1; 0 without
    #: block stores).
    block_replicas: int = 0

    @property
    def static(self) -> bool:
        """True when there is no shard master: the single group serves every shard."""
        return not self.shardmaster

    def nodes_of(self, kind: NodeKind | str, gid: int = 0) -> tuple[str, ...]:
        """The addresses of the shard master, of group ``gid``, or of the block stores."""
        kind = NodeKind(kind)
        if kind is NodeKind.SHARDMASTER:
            return self.shardmaster
        if kind is NodeKind.BLOCKSTORE:
            return self.blockstores
        if gid not in self.groups:
            raise KeyError(f"{self.source}: no group {gid} (groups: {sorted(self.groups)})")
        return self.groups[gid]

    def node_address(self, kind: NodeKind | str, gid: int, index: int) -> str:
        """The address of node ``index`` (0-based) of that kind (and group)."""
        nodes = self.nodes_of(kind, gid)
        if not 0 <= index < len(nodes):
            what = f"group {gid}" if NodeKind(kind) is NodeKind.GROUP else NodeKind(kind).value
            raise KeyError(f"{self.source}: {what} has no node {index} (it has {len(nodes)})")
        return nodes[index]

    def node_data_dir(self, kind: NodeKind | str, gid: int, index: int) -> Path:
        """Where that node keeps its state: ``data_dir/group-<gid>/node-<i>``,
        ``data_dir/shardmaster/node-<i>``, ``data_dir/blockstore/node-<i>``.
        A metadata group and the ShardMaster may have nodes past the
        config's list (added while they run, ``surfshard admin member
        add``); block stores may not."""
        kind = NodeKind(kind)
        if kind is not NodeKind.BLOCKSTORE and index >= 0:
            self.nodes_of(kind, gid)  # refuse groups the config lacks
        else:
            self.node_address(kind, gid, index)  # refuse nodes the config lacks
        sub = f"group-{gid}" if kind is NodeKind.GROUP else kind.value
        return self.data_dir / sub / f"node-{index}"

    def all_nodes(self) -> tuple[NodeRef, ...]:
        """Every node: shard master first, then groups by gid, then block stores."""
        refs = [NodeRef(NodeKind.SHARDMASTER, 0, i, a) for i, a in enumerate(self.shardmaster)]
        for gid, nodes in self.groups.items():
            refs.extend(NodeRef(NodeKind.GROUP, gid, i, a) for i, a in enumerate(nodes))
        refs.extend(NodeRef(NodeKind.BLOCKSTORE, 0, i, a) for i, a in enumerate(self.blockstores))
        return tuple(refs)

    def nodes_with_members(
        self, groups: Mapping[Any, Sequence[str]], shardmaster: Mapping[int, str] | None = None
    ) -> tuple[NodeRef, ...]:
        """``all_nodes`` plus the metadata replicas that ``groups`` (the
        ShardMaster's addresses per group, which follow membership changes)
        lists and the config does not; their index is -1, unknown until the
        node itself says (its Raft id is index + 1). With ``shardmaster``
        (the ShardMaster's members, ``member_addresses``), its replicas
        added since the config, too."""
        configured = self.all_nodes()
        known = {ref.address for ref in configured}
        added = []
        for raft_id, address in sorted((shardmaster or {}).items()):
            if address not in known:
                known.add(address)
                added.append(NodeRef(NodeKind.SHARDMASTER, 0, raft_id - 1, address))
        # The ShardMaster's replicas come first (all_nodes' order).
        n = len(self.shardmaster)
        refs = [*configured[:n], *added, *configured[n:]]
        for gid, addresses in sorted(groups.items(), key=lambda item: int(item[0])):
            for address in addresses:
                if address not in known:
                    known.add(address)
                    refs.append(NodeRef(NodeKind.GROUP, int(gid), -1, address))
        return tuple(refs)

    def removed_replicas(
        self, groups: Mapping[Any, Sequence[str]], shardmaster: Mapping[int, str] | None = None
    ) -> frozenset[str]:
        """Addresses of this config's metadata replicas that ``groups`` (the
        ShardMaster's addresses per group) no longer lists for their group:
        replicas a membership change took out, which stay in the config file
        as the group's starting point. A group the map does not list (not
        joined), or lists with no address, keeps all its replicas. With
        ``shardmaster`` (its members), the config's ShardMaster replicas no
        longer among them, too."""
        listed = {int(gid): set(addresses) for gid, addresses in groups.items() if addresses}
        members = set((shardmaster or {}).values())
        return frozenset(
            ref.address
            for ref in self.all_nodes()
            if (ref.kind is NodeKind.GROUP and ref.gid in listed and ref.address not in listed[ref.gid])
            or (ref.kind is NodeKind.SHARDMASTER and members and ref.address not in members)
        )


def member_addresses(answer: Any) -> dict[int, str]:
    """``{raft id: address}`` of the voters and learners in a ``members``
    answer (``surfshard.replica.membership.describe_membership``); entries
    without a usable id or address are left out (all of them, from an
    answer that is no map)."""
    out: dict[int, str] = {}
    if not isinstance(answer, Mapping):
        return out
    for key in ("voters", "learners"):
        entries = answer.get(key)
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, Mapping):
                raft_id, address = entry.get("id"), entry.get("address")
                if type(raft_id) is int and raft_id > 0 and isinstance(address, str) and address:
                    out[raft_id] = address
    return out


def default_config_path() -> Path:
    """The built-in single-machine cluster config shipped in the package."""
    return Path(str(importlib.resources.files("surfshard") / "data" / "local.toml"))


def load_config(path: str | Path) -> ClusterConfig:
    """Load and validate a config file in either format; ``ConfigError`` on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            source, "", f"cannot read the file: {e.strerror or e}", "a readable config file"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            source, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "a UTF-8 text file"
        ) from None
    base = _base_dir(Path(path))
    if _looks_like_surfstore(text):
        return _SurfStoreParser(source, base, Path(path).stem).parse(text)
    return _TomlParser(source, base, Path(path).stem).parse(text)


def _base_dir(path: Path) -> Path:
    try:
        builtin = path.resolve() == default_config_path().resolve()
    except OSError:
        builtin = False
    return Path.cwd() if builtin else path.resolve().parent


def _looks_like_surfstore(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return re.match(r"M\s*:", stripped) is not None
    return False


class _Checker:
    """Shared checks that know the file name for their error messages."""

    def __init__(self, source: str, base: Path, stem: str) -> None:
        self.source = source
        self.base = base
        self.stem = stem
        self._seen_addresses: dict[str, str] = {}

    def error(self, key: str, problem: str, expected: str = "") -> ConfigError:
        return ConfigError(self.source, key, problem, expected)

    def address(self, key: str, value: Any) -> str:
        try:
            parse_address(value)
        except ValueError as e:
            raise self.error(key, str(e), _ADDRESS_EXPECTED) from None
        if value in self._seen_addresses:
            raise self.error(
                key,
                f"{value} is already used by {self._seen_addresses[value]}",
                "every node on its own address",
            )
        self._seen_addresses[value] = key
        return value

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base / p


class _TomlParser(_Checker):
    TOP = ("cluster", "shardmaster", "groups", "blockstores", "tls", "raft", "limits")
    CLUSTER = ("name", "shards", "data_dir", "chaos")
    NODES = ("nodes",)
    TLS = ("ca", "cert_dir")
    RAFT = tuple(f.name for f in dataclasses.fields(RaftTimings))
    LIMITS = tuple(f.name for f in dataclasses.fields(Limits))

    def parse(self, text: str) -> ClusterConfig:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise self.error("", f"not valid TOML: {e}", "TOML, or SurfStore's 'M: N' format") from None
        self.known_keys("", doc, self.TOP)

        cluster = self.table("cluster", doc.get("cluster"), required=True)
        self.known_keys("cluster", cluster, self.CLUSTER)
        if "shards" not in cluster:
            raise self.error(
                "cluster.shards", "is missing", f"the number of shards, an integer 1-{MAX_SHARDS}"
            )
        shards = self.integer("cluster.shards", cluster["shards"], 1, MAX_SHARDS)
        name = cluster.get("name", self.stem)
        if not isinstance(name, str) or not _CLUSTER_NAME.fullmatch(name):
            raise self.error(
                "cluster.name", f"{name!r} is not a usable name", "letters, digits, '_', '-', '.'"
            )
        data_dir = cluster.get("data_dir", f"data/{name}")
        if not isinstance(data_dir, str) or not data_dir:
            raise self.error("cluster.data_dir", f"{data_dir!r} is not a path", "a non-empty string")
        chaos = self.boolean("cluster.chaos", cluster.get("chaos", False))

        shardmaster: tuple[str, ...] = ()
        if "shardmaster" in doc:
            shardmaster = self.node_list("shardmaster", doc["shardmaster"])

        groups_doc = self.table("groups", doc.get("groups"))
        if not groups_doc:
            raise self.error("groups", "has no groups", "at least one [groups.<gid>] table")
        groups: dict[int, tuple[str, ...]] = {}
        for key, table in groups_doc.items():
            gid = self.gid(key)
            groups[gid] = self.node_list(f"groups.{key}", table)
        if not shardmaster and len(groups) != 1:
            raise self.error(
                "shardmaster",
                f"is missing but there are {len(groups)} groups",
                "[shardmaster] nodes, or one group",
            )

        blockstores: tuple[str, ...] = ()
        block_replicas = 0
        if "blockstores" in doc:
            table = dict(self.table("blockstores", doc["blockstores"], required=True))
            replicas = table.pop("replicas", None)
            blockstores = self.node_list("blockstores", table)
            default = min(2, len(blockstores))
            block_replicas = self.integer(
                "blockstores.replicas", default if replicas is None else replicas, 1, len(blockstores)
            )

        tls = self.tls(doc["tls"]) if "tls" in doc else None
        raft = self.raft(doc.get("raft", {}))
        limits = self.limits(doc.get("limits", {}))
        return ClusterConfig(
            source=self.source,
            format="toml",
            name=name,
            shards=shards,
            data_dir=self.path(data_dir),
            chaos=chaos,
            shardmaster=shardmaster,
            groups=types.MappingProxyType(dict(sorted(groups.items()))),
            blockstores=blockstores,
            tls=tls,
            raft=raft,
            limits=limits,
            block_replicas=block_replicas,
        )

    def known_keys(self, where: str, table: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                dotted = f"{where}.{key}" if where else key
                raise self.error(dotted, "is not a known key", "one of " + ", ".join(allowed))

    def table(self, key: str, value: Any, *, required: bool = False) -> dict[str, Any]:
        if value is None:
            if required:
                raise self.error(key, "is missing", f"a [{key}] table")
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"is {_toml_type(value)}", f"a [{key}] table")
        return value

    def integer(self, key: str, value: Any, lo: int, hi: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"{value!r} is {_toml_type(value)}", f"an integer {lo}-{hi}")
        if not lo <= value <= hi:
            raise self.error(key, f"{value} is out of range", f"an integer {lo}-{hi}")
        return value

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"{value!r} is {_toml_type(value)}", "true or false")
        return value

    def gid(self, key: str) -> int:
        # "01" would silently alias "1"; only the canonical spelling is a gid.
        if not (key.isascii() and key.isdigit()) or str(int(key)) != key or int(key) < 1:
            raise self.error(
                f"groups.{key}",
                f"{key!r} is not a group id",
                "a positive integer without leading zeros, as in [groups.1]",
            )
        return int(key)

    def node_list(self, where: str, value: Any) -> tuple[str, ...]:
        table = self.table(where, value, required=True)
        self.known_keys(where, table, self.NODES)
        nodes = table.get("nodes")
        key = f"{where}.nodes"
        if nodes is None:
            raise self.error(key, "is missing", 'a list of "host:port" addresses')
        if not isinstance(nodes, list) or not nodes:
            raise self.error(key, f"{nodes!r} is not a non-empty list", 'a list of "host:port" addresses')
        return tuple(self.address(f"{key}[{i}]", a) for i, a in enumerate(nodes))

    def tls(self, value: Any) -> TLSConfig:
        table = self.table("tls", value, required=True)
        self.known_keys("tls", table, self.TLS)
        paths = {}
        for key in self.TLS:
            v = table.get(key)
            if not isinstance(v, str) or not v:
                problem = "is missing" if v is None else f"{v!r} is not a path"
                raise self.error(f"tls.{key}", problem, "a file or directory path string")
            paths[key] = self.path(v)
        return TLSConfig(ca=paths["ca"], cert_dir=paths["cert_dir"])

    def limits(self, value: Any) -> Limits:
        table = self.table("limits", value)
        self.known_keys("limits", table, self.LIMITS)
        d = Limits()
        return Limits(
            self.integer("limits.max_in_flight", table.get("max_in_flight", d.max_in_flight), 1, 1 << 20),
            self.integer(
                "limits.stalled_reader_timeout",
                table.get("stalled_reader_timeout", d.stalled_reader_timeout),
                1,
                86_400,
            ),
            self.integer("limits.max_http_body", table.get("max_http_body", d.max_http_body), 1024, 1 << 31),
            self.integer(
                "limits.memory_budget", table.get("memory_budget", d.memory_budget), 1 << 20, 1 << 40
            ),
            self.integer(
                "limits.max_connections", table.get("max_connections", d.max_connections), 1, 1 << 20
            ),
            self.integer(
                "limits.max_snapshot_bytes",
                table.get("max_snapshot_bytes", d.max_snapshot_bytes),
                1 << 20,
                1 << 40,
            ),
        )

    def raft(self, value: Any) -> RaftTimings:
        table = self.table("raft", value)
        self.known_keys("raft", table, self.RAFT)
        d = RaftTimings()
        tick_ms = self.integer("raft.tick_ms", table.get("tick_ms", d.tick_ms), 1, 60_000)
        heartbeat = self.integer(
            "raft.heartbeat_ticks", table.get("heartbeat_ticks", d.heartbeat_ticks), 1, 10_000
        )
        election = self.integer(
            "raft.election_ticks", table.get("election_ticks", d.election_ticks), 1, 100_000
        )
        if election <= heartbeat:
            # A follower must hear several heartbeats per election timeout, or
            # it campaigns against a healthy leader.
            raise self.error(
                "raft.election_ticks",
                f"{election} is not more than heartbeat_ticks ({heartbeat})",
                "election_ticks > heartbeat_ticks",
            )
        fsync = self.boolean("raft.fsync", table.get("fsync", d.fsync))
        snapshot_entries = self.integer(
            "raft.snapshot_entries", table.get("snapshot_entries", d.snapshot_entries), 1, 1 << 40
        )
        return RaftTimings(tick_ms, heartbeat, election, fsync, snapshot_entries)


class _SurfStoreParser(_Checker):
    """``M: N`` then ``metadataK: host:port`` for K in 0..N-1 (any order),
    optionally ``blockstore: host:port``."""

    def parse(self, text: str) -> ClusterConfig:
        count: int | None = None
        metadata: dict[int, str] = {}
        blockstore: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            where = f"line {lineno}"
            key, sep, value = stripped.partition(":")
            key, value = key.strip(), value.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise self.error(where, f"{stripped!r} is not 'key: value'", "'M: N', 'metadataK: host:port'")
            if key == "M":
                if count is not None:
                    raise self.error(f"{where}: M", "is given twice", "one 'M: N' line")
                if not (value.isascii() and value.isdigit()) or int(value) < 1:
                    raise self.error(f"{where}: M", f"{value!r} is not a node count", "a positive integer")
                count = int(value)
            elif m := re.fullmatch(r"metadata(\d+)", key):
                index = int(m.group(1))
                if index in metadata:
                    raise self.error(f"{where}: {key}", "is given twice", "one line per metadata node")
                metadata[index] = self.address(f"{where}: {key}", value)
            elif key == "blockstore":
                if blockstore is not None:
                    raise self.error(f"{where}: {key}", "is given twice", "at most one blockstore line")
                blockstore = self.address(f"{where}: {key}", value)
            else:
                raise self.error(f"{where}: {key}", "is not a known key", "M, metadataK or blockstore")
        if count is None:
            raise self.error("M", "is missing", "an 'M: N' line")
        if len(metadata) != count or sorted(metadata) != list(range(count)):
            raise self.error(
                "M",
                f"is {count} but the file lists {len(metadata)} metadata nodes"
                f" ({', '.join(f'metadata{i}' for i in sorted(metadata)) or 'none'})",
                f"metadata0 .. metadata{count - 1}, one line each",
            )
        name = self.stem if _CLUSTER_NAME.fullmatch(self.stem) else "surfstore"
        return ClusterConfig(
            source=self.source,
            format="surfstore",
            name=name,
            shards=1,
            data_dir=self.path(f"data/{name}"),
            chaos=True,
            shardmaster=(),
            groups=types.MappingProxyType({1: tuple(metadata[i] for i in range(count))}),
            blockstores=(blockstore,) if blockstore else (),
            tls=None,
            raft=RaftTimings(),
            block_replicas=1 if blockstore else 0,
        )


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"
