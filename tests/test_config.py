"""Tests for surfshard.config: shipped configs load, broken ones fail with a
message naming the file and the key to fix."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from surfshard.config import (
    ClusterConfig,
    ConfigError,
    Limits,
    NodeKind,
    RaftTimings,
    default_config_path,
    format_address,
    load_config,
    member_addresses,
    node_name,
    parse_address,
)
from surfshard.net.server import server_limits

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

GOOD = """\
[cluster]
shards = 4

[shardmaster]
nodes = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]

[groups.1]
nodes = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]

[groups.2]
nodes = ["127.0.0.1:7201"]
"""

# (name, file text, dotted key the message must name, fragment of the problem)
BROKEN_TOML: list[tuple[str, str, str, str]] = [
    ("missing shards", GOOD.replace("shards = 4", ""), "cluster.shards", "is missing"),
    ("missing cluster", GOOD.replace("[cluster]\nshards = 4\n", ""), "cluster", "is missing"),
    ("shards 0", GOOD.replace("shards = 4", "shards = 0"), "cluster.shards", "out of range"),
    ("shards too many", GOOD.replace("shards = 4", "shards = 65537"), "cluster.shards", "out of range"),
    ("shards string", GOOD.replace("shards = 4", 'shards = "8"'), "cluster.shards", "is a string"),
    ("shards bool", GOOD.replace("shards = 4", "shards = true"), "cluster.shards", "is a boolean"),
    ("shards float", GOOD.replace("shards = 4", "shards = 4.0"), "cluster.shards", "is a float"),
    (
        "bad address",
        GOOD.replace('"127.0.0.1:7103"', '"localhost"'),
        "groups.1.nodes[2]",
        "'localhost' is not host:port",
    ),
    ("port 0", GOOD.replace("127.0.0.1:7201", "127.0.0.1:0"), "groups.2.nodes[0]", "port 0 outside"),
    (
        "port 70000",
        GOOD.replace("127.0.0.1:7002", "127.0.0.1:70000"),
        "shardmaster.nodes[1]",
        "outside 1-65535",
    ),
    (
        "port not a number",
        GOOD.replace("127.0.0.1:7002", "127.0.0.1:http"),
        "shardmaster.nodes[1]",
        "bad port",
    ),
    ("address not a string", GOOD.replace('"127.0.0.1:7201"', "7201"), "groups.2.nodes[0]", "not a string"),
    ("gid abc", GOOD.replace("[groups.2]", "[groups.abc]"), "groups.abc", "'abc' is not a group id"),
    ("gid 0", GOOD.replace("[groups.2]", "[groups.0]"), "groups.0", "'0' is not a group id"),
    ("gid leading zero", GOOD.replace("[groups.2]", "[groups.02]"), "groups.02", "not a group id"),
    ("gid negative", GOOD.replace("[groups.2]", '[groups."-2"]'), "groups.-2", "not a group id"),
    (
        "duplicate address across kinds",
        GOOD.replace("127.0.0.1:7201", "127.0.0.1:7002"),
        "groups.2.nodes[0]",
        "already used by shardmaster.nodes[1]",
    ),
    (
        "duplicate address in one group",
        GOOD.replace("127.0.0.1:7103", "127.0.0.1:7101"),
        "groups.1.nodes[2]",
        "already used by groups.1.nodes[0]",
    ),
    ("unknown top-level key", GOOD + "\n[raftt]\ntick_ms = 5\n", "raftt", "not a known key"),
    (
        "unknown cluster key",
        GOOD.replace("shards = 4", "shards = 4\nshard = 4"),
        "cluster.shard",
        "not a known key",
    ),
    (
        "unknown group key",
        GOOD.replace("[groups.2]", "[groups.2]\nnode = 1"),
        "groups.2.node",
        "not a known key",
    ),
    ("raft typo", GOOD + "\n[raft]\nelection_tick = 10\n", "raft.election_tick", "not a known key"),
    ("raft tick string", GOOD + '\n[raft]\ntick_ms = "50"\n', "raft.tick_ms", "is a string"),
    ("raft tick float", GOOD + "\n[raft]\ntick_ms = 0.05\n", "raft.tick_ms", "is a float"),
    ("raft tick 0", GOOD + "\n[raft]\ntick_ms = 0\n", "raft.tick_ms", "out of range"),
    ("raft heartbeat bool", GOOD + "\n[raft]\nheartbeat_ticks = true\n", "raft.heartbeat_ticks", "boolean"),
    (
        "raft election not above heartbeat",
        GOOD + "\n[raft]\nheartbeat_ticks = 3\nelection_ticks = 3\n",
        "raft.election_ticks",
        "not more than heartbeat_ticks",
    ),
    ("raft fsync string", GOOD + '\n[raft]\nfsync = "yes"\n', "raft.fsync", "is a string"),
    ("raft snapshot 0", GOOD + "\n[raft]\nsnapshot_entries = 0\n", "raft.snapshot_entries", "out of range"),
    ("raft not a table", GOOD.replace("[cluster]", "raft = 5\n[cluster]"), "raft", "is an integer"),
    ("limits typo", GOOD + "\n[limits]\nmax_inflight = 10\n", "limits.max_inflight", "not a known key"),
    ("limits in flight 0", GOOD + "\n[limits]\nmax_in_flight = 0\n", "limits.max_in_flight", "out of range"),
    (
        "limits body string",
        GOOD + '\n[limits]\nmax_http_body = "16M"\n',
        "limits.max_http_body",
        "is a string",
    ),
    ("chaos string", GOOD.replace("shards = 4", 'shards = 4\nchaos = "on"'), "cluster.chaos", "is a string"),
    ("bad name", GOOD.replace("shards = 4", 'shards = 4\nname = "a/b"'), "cluster.name", "not a usable name"),
    (
        "empty data dir",
        GOOD.replace("shards = 4", 'shards = 4\ndata_dir = ""'),
        "cluster.data_dir",
        "not a path",
    ),
    ("no groups", GOOD.split("[groups.1]")[0], "groups", "has no groups"),
    ("group without nodes", GOOD.replace('nodes = ["127.0.0.1:7201"]', ""), "groups.2.nodes", "is missing"),
    ("empty node list", GOOD.replace('["127.0.0.1:7201"]', "[]"), "groups.2.nodes", "not a non-empty list"),
    (
        "nodes not a list",
        GOOD.replace('["127.0.0.1:7201"]', '"127.0.0.1:7201"'),
        "groups.2.nodes",
        "non-empty list",
    ),
    (
        "two groups without a shard master",
        GOOD.replace('[shardmaster]\nnodes = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]\n', ""),
        "shardmaster",
        "is missing but there are 2 groups",
    ),
    ("tls without cert_dir", GOOD + '\n[tls]\nca = "ca.pem"\n', "tls.cert_dir", "is missing"),
    (
        "tls unknown key",
        GOOD + '\n[tls]\nca = "a"\ncert_dir = "b"\nkey = "c"\n',
        "tls.key",
        "not a known key",
    ),
    ("not toml", "[cluster\nshards = 4\n", "", "not valid TOML"),
]

# (name, file text, key fragment, problem fragment)
BROKEN_SURFSTORE: list[tuple[str, str, str, str]] = [
    (
        "M larger than lines",
        "M: 3\nmetadata0: 127.0.0.1:9001\nmetadata1: 127.0.0.1:9002\n",
        "M",
        "is 3 but the file lists 2 metadata nodes",
    ),
    (
        "M smaller than lines",
        "M: 1\nmetadata0: 127.0.0.1:9001\nmetadata1: 127.0.0.1:9002\n",
        "M",
        "is 1 but the file lists 2 metadata nodes",
    ),
    (
        "index gap",
        "M: 2\nmetadata0: 127.0.0.1:9001\nmetadata2: 127.0.0.1:9002\n",
        "M",
        "metadata0, metadata2",
    ),
    ("M not a number", "M: three\nmetadata0: 127.0.0.1:9001\n", "line 1: M", "'three' is not a node count"),
    ("M zero", "M: 0\n", "line 1: M", "'0' is not a node count"),
    ("M twice", "M: 1\nM: 1\nmetadata0: 127.0.0.1:9001\n", "line 2: M", "given twice"),
    ("no colon", "M: 1\nmetadata0 127.0.0.1:9001\n", "line 2", "is not 'key: value'"),
    ("bad address", "M: 1\nmetadata0: 127.0.0.1\n", "line 2: metadata0", "is not host:port"),
    ("bad port", "M: 1\nmetadata0: 127.0.0.1:99999\n", "line 2: metadata0", "outside 1-65535"),
    (
        "duplicate node",
        "M: 2\nmetadata0: 127.0.0.1:9001\nmetadata0: 127.0.0.1:9002\n",
        "line 3: metadata0",
        "given twice",
    ),
    (
        "duplicate address",
        "M: 2\nmetadata0: 127.0.0.1:9001\nmetadata1: 127.0.0.1:9001\n",
        "line 3: metadata1",
        "already used by line 2: metadata0",
    ),
    (
        "unknown key",
        "M: 1\nmetadata0: 127.0.0.1:9001\nmetadate1: 127.0.0.1:9002\n",
        "line 3: metadate1",
        "not a known",
    ),
    (
        "blockstore twice",
        "M: 1\nmetadata0: h:1\nblockstore: h:2\nblockstore: h:3\n",
        "line 4: blockstore",
        "twice",
    ),
]


class ConfigTestCase(SynchronousTestCase):
    def write(self, text: str, name: str = "cluster.toml") -> Path:
        directory = Path(self.mktemp())
        directory.mkdir()
        path = directory / name
        path.write_text(text, encoding="utf-8")
        return path


class ShippedConfigTests(ConfigTestCase):
    def test_every_shipped_config_loads(self) -> None:
        files = sorted(p for p in CONFIGS.iterdir() if p.suffix in (".toml", ".txt"))
        self.assertGreaterEqual(len(files), 4, files)
        for path in files:
            config = load_config(path)
            self.assertIsInstance(config, ClusterConfig, path)
            self.assertGreaterEqual(len(config.all_nodes()), 1, path)

    def test_builtin_default_is_configs_local(self) -> None:
        builtin = default_config_path()
        self.assertTrue(builtin.is_file(), builtin)
        self.assertEqual(builtin.read_bytes(), (CONFIGS / "local.toml").read_bytes())

    def test_local_cluster_shape(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        self.assertEqual(config.format, "toml")
        self.assertEqual(config.name, "local")
        self.assertEqual(config.shards, 8)
        self.assertTrue(config.chaos)
        self.assertFalse(config.static)
        self.assertEqual(len(config.shardmaster), 3)
        self.assertEqual(sorted(config.groups), [1, 2])
        self.assertEqual([len(nodes) for nodes in config.groups.values()], [3, 3])
        self.assertEqual((len(config.blockstores), config.block_replicas), (3, 2))
        self.assertIsNone(config.tls)
        self.assertEqual(config.data_dir, CONFIGS / "data" / "local")
        for ref in config.all_nodes():
            host, port = parse_address(ref.address)
            self.assertEqual(host, "127.0.0.1")
            self.assertTrue(7000 <= port < 8000, ref)

    def test_builtin_resolves_paths_against_working_directory(self) -> None:
        # The package directory may be read-only (site-packages); state must
        # land where the user runs the command.
        config = load_config(default_config_path())
        self.assertEqual(config.data_dir, Path.cwd() / "data" / "local")

    def test_local_tls(self) -> None:
        config = load_config(CONFIGS / "local-tls.toml")
        assert config.tls is not None
        self.assertEqual(config.tls.ca, CONFIGS / "certs" / "ca.pem")
        self.assertEqual(
            config.tls.cert_paths(node_name(NodeKind.GROUP, 1, 2)),
            (CONFIGS / "certs" / "group-1-2.pem", CONFIGS / "certs" / "group-1-2.key"),
        )
        plain = {r.address for r in load_config(CONFIGS / "local.toml").all_nodes()}
        self.assertFalse(plain & {r.address for r in config.all_nodes()}, "local and local-tls ports overlap")

    def test_single_group(self) -> None:
        config = load_config(CONFIGS / "single-group.toml")
        self.assertTrue(config.static)
        self.assertEqual(list(config.groups), [1])
        self.assertEqual(len(config.groups[1]), 3)

    def test_surfstore_5(self) -> None:
        config = load_config(CONFIGS / "surfstore-5.txt")
        self.assertEqual(config.format, "surfstore")
        self.assertEqual(config.shards, 1)
        self.assertTrue(config.chaos)
        self.assertTrue(config.static)
        self.assertEqual(config.shardmaster, ())
        self.assertEqual(config.groups[1], tuple(f"127.0.0.1:{7901 + i}" for i in range(5)))
        self.assertEqual(config.raft, RaftTimings())


class HelperTests(ConfigTestCase):
    def test_nodes_with_members_adds_replicas_past_the_config(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        groups = {1: ["127.0.0.1:7101", "127.0.0.1:7104"], 2: list(config.groups[2])}
        nodes = config.nodes_with_members(groups)
        self.assertEqual(nodes[: len(config.all_nodes())], config.all_nodes())
        [added] = nodes[len(config.all_nodes()) :]
        self.assertEqual(
            (added.kind, added.gid, added.index, added.address), (NodeKind.GROUP, 1, -1, "127.0.0.1:7104")
        )
        self.assertEqual(config.nodes_with_members({}), config.all_nodes())
        # past the config's list, a group's data directory is where the others' are
        self.assertEqual(config.node_data_dir("group", 1, 3).name, "node-3")

    def test_removed_replicas_are_the_config_ones_the_map_no_longer_lists(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        # Group 1 replaced its first replica by a fourth; group 2 is as configured.
        groups = {"1": ["127.0.0.1:7102", "127.0.0.1:7103", "127.0.0.1:7104"], "2": list(config.groups[2])}
        self.assertEqual(config.removed_replicas(groups), frozenset({"127.0.0.1:7101"}))
        # A group the map does not list (not joined), or lists without
        # addresses, keeps every replica; so does a map of no groups.
        self.assertEqual(config.removed_replicas({"1": groups["1"]}), frozenset({"127.0.0.1:7101"}))
        self.assertEqual(config.removed_replicas({1: [], 2: []}), frozenset())
        self.assertEqual(config.removed_replicas({}), frozenset())

    def test_the_shardmasters_own_members_added_and_removed(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        # Its first replica replaced by a fourth (Raft id 4), as ``members`` says.
        answer = {
            "voters": [
                {"id": 2, "address": "127.0.0.1:7002"},
                {"id": 3, "address": "127.0.0.1:7003"},
                {"id": 4, "address": "127.0.0.1:7004"},
            ],
            "learners": [{"id": 5, "address": "127.0.0.1:7005"}, {"id": 0, "address": "x:1"}, "junk"],
            "max_id": 5,
        }
        members = member_addresses(answer)
        self.assertEqual(
            members, {2: "127.0.0.1:7002", 3: "127.0.0.1:7003", 4: "127.0.0.1:7004", 5: "127.0.0.1:7005"}
        )
        self.assertEqual(member_addresses({"voters": "nonsense"}), {})
        nodes = config.nodes_with_members({}, members)
        # The added ones come after the config's ShardMaster replicas, with
        # their index (Raft id - 1), before the groups.
        self.assertEqual(
            [(n.kind, n.index, n.address) for n in nodes[:5]],
            [(NodeKind.SHARDMASTER, i, f"127.0.0.1:700{i + 1}") for i in range(5)],
        )
        self.assertEqual(nodes[5:], config.all_nodes()[3:])
        self.assertEqual(config.removed_replicas({}, members), frozenset({"127.0.0.1:7001"}))
        # Nothing known of its members: every configured replica stays.
        self.assertEqual(config.removed_replicas({}, {}), frozenset())
        # An added replica keeps its state where the configured ones do.
        self.assertEqual(config.node_data_dir("shardmaster", 0, 3).name, "node-3")

    def test_node_helpers(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        self.assertEqual(config.node_address(NodeKind.SHARDMASTER, 0, 2), "127.0.0.1:7003")
        self.assertEqual(config.node_address("group", 2, 0), "127.0.0.1:7201")
        self.assertEqual(config.node_address("blockstore", 0, 0), "127.0.0.1:7301")
        self.assertRaises(KeyError, config.node_address, "group", 3, 0)
        self.assertRaises(KeyError, config.node_address, "group", 1, 3)
        self.assertRaises(KeyError, config.node_address, "shardmaster", 0, -1)
        self.assertRaises(ValueError, config.node_address, "metadata", 0, 0)
        data = CONFIGS / "data" / "local"
        self.assertEqual(config.node_data_dir("group", 1, 2), data / "group-1" / "node-2")
        self.assertEqual(config.node_data_dir("shardmaster", 0, 0), data / "shardmaster" / "node-0")
        self.assertEqual(config.node_data_dir("blockstore", 0, 0), data / "blockstore" / "node-0")
        self.assertRaises(KeyError, config.node_data_dir, "blockstore", 0, 3)
        self.assertEqual(node_name("shardmaster", 0, 0), "shardmaster-0")
        self.assertEqual(node_name("group", 1, 2), "group-1-2")
        self.assertEqual(node_name("blockstore", 0, 0), "blockstore-0")
        refs = config.all_nodes()
        self.assertEqual(len(refs), 12)
        self.assertEqual(len({r.address for r in refs}), 12)
        self.assertEqual([r.kind for r in refs[:3]], [NodeKind.SHARDMASTER] * 3)
        self.assertEqual(refs[-1].kind, NodeKind.BLOCKSTORE)

    def test_parse_address(self) -> None:
        self.assertEqual(parse_address("127.0.0.1:7001"), ("127.0.0.1", 7001))
        self.assertEqual(parse_address("node-a.example.com:1"), ("node-a.example.com", 1))
        self.assertEqual(parse_address("[::1]:65535"), ("::1", 65535))
        self.assertEqual(format_address("::1", 80), "[::1]:80")
        self.assertEqual(format_address("h", 80), "h:80")
        for bad in (
            "h",
            ":80",
            "h:",
            "h:0",
            "h:65536",
            "h:-1",
            "h:+80",
            "h: 80",
            "a b:80",
            "::1:80",
            "[::1]80",
            "[zz]:1",
        ):
            self.assertRaises(ValueError, parse_address, bad)

    def test_limits_are_read_and_default(self) -> None:
        path = Path(self.mktemp())
        path.write_text(
            GOOD + "\n[limits]\nmax_in_flight = 32\nstalled_reader_timeout = 5\n", encoding="utf-8"
        )
        config = load_config(path)
        self.assertEqual(config.limits, Limits(max_in_flight=32, stalled_reader_timeout=5))
        limits = server_limits(config)
        self.assertEqual((limits.max_in_flight, limits.stalled_reader_timeout), (32, 5.0))
        path.write_text(GOOD, encoding="utf-8")
        self.assertEqual(load_config(path).limits, Limits())

    def test_defaults_and_relative_paths(self) -> None:
        path = self.write(GOOD, "mycluster.toml")
        config = load_config(path)
        self.assertEqual(config.name, "mycluster")
        self.assertFalse(config.chaos)
        self.assertEqual(config.data_dir, path.parent.resolve() / "data" / "mycluster")
        self.assertEqual(config.raft, RaftTimings())
        self.assertEqual(config.blockstores, ())
        self.assertEqual(config.groups[2], ("127.0.0.1:7201",))

    def test_explicit_values(self) -> None:
        text = GOOD.replace("shards = 4", 'shards = 4\nname = "prod"\ndata_dir = "/var/lib/ss"\nchaos = true')
        text += "\n[raft]\ntick_ms = 10\nheartbeat_ticks = 1\nelection_ticks = 20\nfsync = false\nsnapshot_entries = 5\n"
        text += '\n[tls]\nca = "/etc/ss/ca.pem"\ncert_dir = "pki"\n'
        path = self.write(text)
        config = load_config(path)
        self.assertEqual((config.name, config.data_dir, config.chaos), ("prod", Path("/var/lib/ss"), True))
        self.assertEqual(config.raft, RaftTimings(10, 1, 20, False, 5))
        assert config.tls is not None
        self.assertEqual(config.tls.ca, Path("/etc/ss/ca.pem"))
        self.assertEqual(config.tls.cert_dir, path.parent.resolve() / "pki")

    def test_config_is_frozen(self) -> None:
        config = load_config(CONFIGS / "local.toml")
        with self.assertRaises(AttributeError):
            config.shards = 9  # type: ignore[misc]
        with self.assertRaises(TypeError):
            config.groups[3] = ("h:1",)  # type: ignore[index]

    def test_surfstore_comments_blank_lines_and_blockstore(self) -> None:
        text = (
            "# a SurfStore cluster\n\n  M: 2\n"
            "metadata1: 127.0.0.1:9002   \n# comment\n\nmetadata0: 127.0.0.1:9001\n"
            "blockstore: 127.0.0.1:9100\n"
        )
        config = load_config(self.write(text, "config.txt"))
        self.assertEqual(config.format, "surfstore")
        self.assertEqual(config.groups[1], ("127.0.0.1:9001", "127.0.0.1:9002"))
        self.assertEqual(config.blockstores, ("127.0.0.1:9100",))


class BrokenConfigTests(ConfigTestCase):
    def assertBroken(self, name: str, text: str, key: str, fragment: str, filename: str) -> None:
        path = self.write(text, filename)
        with self.assertRaises(ConfigError, msg=f"{name}: loaded without error") as cm:
            load_config(path)
        err = cm.exception
        message = str(err)
        self.assertTrue(message.startswith(f"{path}: "), f"{name}: {message}")
        if key:
            self.assertIn(f": {key}: ", message, f"{name}: {message}")
            self.assertTrue(err.key.startswith(key) or key in err.key, f"{name}: key {err.key!r}")
        self.assertIn(fragment, message, f"{name}: {message}")
        self.assertIn("(expected ", message, f"{name}: {message}")

    def test_broken_toml(self) -> None:
        # The good base must load, or every case below proves nothing.
        load_config(self.write(GOOD))
        for name, text, key, fragment in BROKEN_TOML:
            self.assertBroken(name, text, key, fragment, "cluster.toml")

    def test_broken_surfstore(self) -> None:
        load_config(self.write("M: 1\nmetadata0: 127.0.0.1:9001\n", "config.txt"))
        for name, text, key, fragment in BROKEN_SURFSTORE:
            self.assertBroken(name, text, key, fragment, "config.txt")

    def test_example_message(self) -> None:
        path = self.write(GOOD.replace('"127.0.0.1:7103"', '"localhost"'))
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertEqual(
            str(cm.exception),
            f"{path}: groups.1.nodes[2]: 'localhost' is not host:port "
            '(expected "host:port" with a port 1-65535)',
        )

    def test_unreadable_files(self) -> None:
        missing = Path(self.mktemp()) / "nope.toml"
        with self.assertRaises(ConfigError) as cm:
            load_config(missing)
        self.assertIn("cannot read", str(cm.exception))
        path = self.write("")
        path.write_bytes(b"\xff\xfe[cluster]")
        with self.assertRaises(ConfigError) as cm:
            load_config(path)
        self.assertIn("not UTF-8", str(cm.exception))

    def test_config_error_without_expected(self) -> None:
        self.assertEqual(str(ConfigError("f.toml", "a.b", "is odd")), "f.toml: a.b: is odd")
        self.assertEqual(str(ConfigError("f.toml", "", "is odd", "x")), "f.toml: is odd (expected x)")


if os.name != "posix":  # pragma: no cover - paths in messages assume POSIX
    del BrokenConfigTests
