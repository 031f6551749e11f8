"""``surfshard sync`` end to end (issue 13): two folders, each synced by the
real command line, against a real cluster (a 3-replica metadata group and
three block stores, 2 copies of each block, all ``twistd`` processes on
127.0.0.1).

- Create, modify, delete, recreate; empty files, files of exactly one block
  and of one byte more, non-ASCII names, a 50 MB file, 5,000 small files:
  the folders converge and ``index.txt`` matches the server.
- Conflicting edits leave both contents on disk; a block store and the
  metadata leader SIGKILLed mid-way lose nothing.
- Bad input: an ``index.txt`` edited into nonsense is refused with a clear
  error and the folder is untouched; syncs killed at random points (seeded)
  never leave a half-written file under its real name, and the next sync
  finishes the job.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from client.sync import OWN_FILES, VERSIONS_NAME, Versions
from raft.testing.simnet import sim_seeds
from tests.procs import (
    REPO_ROOT,
    NativeClient,
    NodeProcess,
    free_ports,
    twistd_command,
    twistd_node_argv,
    wait_until,
)


def write_config(directory: Path) -> tuple[Path, list[str], list[str]]:
    ports = free_ports(6)
    groups = [f"127.0.0.1:{p}" for p in ports[:3]]
    stores = [f"127.0.0.1:{p}" for p in ports[3:]]
    path = directory / "sync.toml"
    path.write_text(
        "\n".join(
            [
                "[cluster]",
                'name = "sync"',
                "shards = 4",
                'data_dir = "data"',
                "[groups.1]",
                "nodes = [" + ", ".join(f'"{a}"' for a in groups) + "]",
                "[blockstores]",
                "nodes = [" + ", ".join(f'"{a}"' for a in stores) + "]",
                "replicas = 2",
                "[raft]",
                "fsync = false",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return path, groups, stores


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    return {
        p.name: digest(p)
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.name not in OWN_FILES
    }


def tree_state(folder: Path) -> dict[str, str]:
    """Every regular file under ``folder`` (symlinks not followed) by its
    path, but the sync's own files at the top (its earlier versions among
    them: ``versions_state``)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if not path.is_symlink() and rel not in OWN_FILES and not rel.startswith(VERSIONS_NAME + "/"):
                out[rel] = digest(path)
    return out


def versions_state(folder: Path) -> dict[str, bytes]:
    """The earlier versions a folder keeps: path under the versions folder
    with its time stamp taken out (``docs/plan.txt``, ``docs/plan.txt 2``
    for a second one) -> content."""
    out: dict[str, bytes] = {}
    for name, _when, kept in Versions(folder, 0, datetime.datetime.now).entries():
        key, n = name, 2
        while key in out:
            key, n = f"{name} {n}", n + 1
        out[key] = (folder / VERSIONS_NAME / kept).read_bytes()
    return out


class SyncCluster(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.config, self.group, self.stores = write_config(self.dir)
        self.nodes: dict[str, NodeProcess] = {}
        for i, address in enumerate(self.group):
            self.nodes[f"group-{i}"] = NodeProcess(
                f"group-{i}", twistd_node_argv(self.config, i), self.dir / "logs" / f"group-{i}.log", address
            )
        for i, address in enumerate(self.stores):
            argv = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile=-", "surfblock"]
            argv += ["--config", str(self.config), "--node", str(i)]
            self.nodes[f"store-{i}"] = NodeProcess(
                f"store-{i}", argv, self.dir / "logs" / f"store-{i}.log", address
            )
        for node in self.nodes.values():
            node.start()
            self.addCleanup(node.kill)
        self.leader()
        for name in self.nodes:
            if name.startswith("store"):
                self.wait_serving(self.nodes[name].address)

    def wait_serving(self, address: str) -> None:
        def up() -> bool:
            try:
                with NativeClient(address, timeout=2.0) as c:
                    return bool(c.call("ping"))
            except Exception:
                return False

        wait_until(up, 60.0, 0.1, f"{address} to serve")

    def leader(self) -> str:
        def find() -> str | None:
            for name, node in self.nodes.items():
                if name.startswith("group") and node.running:
                    try:
                        with NativeClient(node.address, timeout=2.0) as c:
                            if c.call("is_leader"):
                                return name
                    except Exception:
                        continue
            return None

        return wait_until(find, 60.0, 0.1, "a metadata leader")

    def folder(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(exist_ok=True)
        return path

    def sync(self, folder: Path, *extra: str, check: bool = True, timeout: float = 300.0) -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "client.cli",
                "sync",
                "--config",
                str(self.config),
                "--json",
                *extra,
                str(folder),
            ],
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            self.assertEqual(done.returncode, 0, f"sync failed:\n{done.stdout}\n{done.stderr}")
            return json.loads(done.stdout)
        return {"returncode": done.returncode, "stderr": done.stderr, "stdout": done.stdout}

    def server_map(self) -> dict[str, list[Any]]:
        done = subprocess.run(
            [sys.executable, "-m", "client.cli", "ls", "--config", str(self.config), "--json"],
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return json.loads(done.stdout)

    def assert_index_matches_server(self, folder: Path) -> None:
        server = self.server_map()
        index = {}
        for line in (folder / "index.txt").read_text(encoding="utf-8").splitlines():
            name, version, hashes = line.split(",")
            index[name] = [int(version), hashes.split()]
        self.assertEqual(index, {n: [v, list(h)] for n, (v, h) in server.items()})


class SyncTests(SyncCluster):
    def test_ignored_names_are_neither_sent_fetched_nor_deleted(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        (a / ".surfshard-ignore").write_text("# not synced\n*.log\n!keep.log\ncache/\n")
        (a / "cache").mkdir()
        (a / "sub").mkdir()
        for name in ("keep.txt", "keep.log", "here.log", "cache/c.bin", "sub/d.log", "sub/e.txt"):
            (a / name).write_text(f"{name}\n")
        first = self.sync(a)
        self.assertEqual((first["uploaded"], first["ignored"]), (3, 3))  # "!keep.log" takes it back
        self.assertEqual(sorted(self.server_map()), ["keep.log", "keep.txt", "sub/e.txt"])
        # b ignores nothing: its .log goes up; a neither takes it nor loses its own.
        (b / "there.log").write_text("b's log\n")
        self.sync(b)
        again = self.sync(a)
        self.assertEqual((again["downloaded"], again["deleted_local"], again["ignored"]), (0, 0, 4))
        self.assertFalse((a / "there.log").exists())
        self.assertEqual((a / "here.log").read_text(), "here.log\n")
        # A file already synced, then ignored and deleted here, is not deleted there.
        (a / ".surfshard-ignore").write_text("*.log\n!keep.log\ncache/\nkeep.txt\n")
        (a / "keep.txt").unlink()
        self.sync(a)
        self.assertEqual(sorted(self.server_map()), ["keep.log", "keep.txt", "sub/e.txt", "there.log"])
        self.assertEqual(self.server_map()["keep.txt"][0], 1)
        # No longer ignored: synced both ways as usual. The server's change
        # hidden by the old rules comes (the changed rules cost a listing),
        # and keep.txt's deletion here now goes there.
        (a / ".surfshard-ignore").unlink()
        last = self.sync(a)
        self.assertEqual(last["remote_from"], "listing")
        self.assertEqual((a / "there.log").read_text(), "b's log\n")
        live = sorted(n for n, (_v, h) in self.server_map().items() if h != ["0"])
        self.assertEqual(live, ["cache/c.bin", "here.log", "keep.log", "sub/d.log", "sub/e.txt", "there.log"])
        self.assertEqual(self.server_map()["keep.txt"], [2, ["0"]])
        self.assertEqual(self.sync(a)["remote_from"], "changes")
        self.sync(b)
        self.assertEqual(tree_state(b), tree_state(a))

    def test_gc_frees_old_versions_and_deleted_files_and_every_file_still_reads(self) -> None:
        a, b, c = self.folder("a"), self.folder("b"), self.folder("c")
        rng = random.Random(11)
        (a / "big.bin").write_bytes(rng.randbytes(300_000))
        (a / "small.txt").write_text("small\n")
        (a / "same.txt").write_text("unchanged\n")
        self.sync(a)
        self.sync(b)
        (a / "big.bin").write_bytes(rng.randbytes(300_000))  # every block new
        (a / "small.txt").unlink()
        self.sync(a)
        self.sync(b)

        def packs() -> int:
            return sum(p.stat().st_size for p in self.dir.rglob("*.pack"))

        def gc(*extra: str) -> dict[str, Any]:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "client.cli",
                    "blocks",
                    "gc",
                    "--config",
                    str(self.config),
                    "--json",
                    *extra,
                ],
                cwd=str(REPO_ROOT),
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertEqual(done.returncode, 0, f"gc failed:\n{done.stdout}\n{done.stderr}")
            return json.loads(done.stdout)

        held = packs()
        dry = gc("--grace", "0", "--dry-run")
        # The old big.bin (74 blocks of 4 KiB) and small.txt, two copies each.
        self.assertEqual(sum(r["removed"] for r in dry["stores"].values()), 2 * 75)
        self.assertEqual(packs(), held)
        # A day's grace (the default): everything was written just now.
        kept = gc()
        self.assertEqual(sum(r["removed"] for r in kept["stores"].values()), 0)
        done = gc("--grace", "0")
        self.assertEqual(done["unreachable"], [])
        self.assertEqual(sum(r["removed"] for r in done["stores"].values()), 2 * 75)
        self.assertLess(packs(), held * 0.6)
        self.assertEqual(sum(r["freed"] for r in done["stores"].values()), held - packs())
        # Every file still reads, in a new folder and in the old ones.
        self.sync(c)
        self.assertEqual(tree_state(c), tree_state(a))
        self.sync(b)
        self.assertEqual(tree_state(b), tree_state(a))
        # Nothing more to drop.
        self.assertEqual(sum(r["removed"] for r in gc("--grace", "0")["stores"].values()), 0)

    def test_a_dry_run_says_what_the_sync_does_and_changes_nothing(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        for name in ("keep.txt", "edit.txt", "gone.txt", "clash.txt"):
            (a / name).write_text(f"{name} 1\n")
        self.sync(a)
        self.sync(b)
        (a / "new.txt").write_text("new\n")
        (a / "edit.txt").write_text("edit.txt 2\n")
        (a / "gone.txt").unlink()
        (a / "clash.txt").write_text("a's edit\n")
        (b / "clash.txt").write_text("b's edit\n")
        (b / "from-b.txt").write_text("from b\n")
        self.sync(b)

        def everything(folder: Path) -> dict[str, bytes]:
            return {
                p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
            }

        before_files, before_server = everything(a), self.server_map()
        plan = self.sync(a, "--dry-run")
        self.assertTrue(plan["dry_run"])
        self.assertEqual(
            (plan["uploaded"], plan["downloaded"], plan["deleted_local"], plan["deleted_remote"]),
            (2, 2, 0, 1),
        )
        self.assertEqual(plan["conflicts"], ["clash.txt"])  # a's edit would be kept as a copy
        self.assertEqual(everything(a), before_files)  # index, cursor and hash cache included
        self.assertEqual(self.server_map(), before_server)
        # The sync itself does what was planned (and sends the conflict copy too).
        done = self.sync(a)
        self.assertEqual(
            (done["uploaded"], done["downloaded"], done["deleted_local"], done["deleted_remote"]),
            (3, 2, 0, 1),
        )
        self.assertEqual(self.sync(a, "--dry-run")["uploaded"], 0)
        watch = self.sync(a, "--dry-run", "--watch", "1", check=False)
        self.assertEqual(watch["returncode"], 2, watch)

    def test_a_backup_undoes_a_mass_deletion_even_after_a_gc(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        rng = random.Random(12)
        (a / "docs").mkdir()
        for name in ("one.bin", "two.bin", "docs/three.bin"):
            (a / name).write_bytes(rng.randbytes(20_000))
        self.sync(a)
        self.sync(b)
        saved = tree_state(a)

        def cli(*argv: str, code: int = 0) -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, "-m", "client.cli", *argv, "--config", str(self.config), "--json"],
                cwd=str(REPO_ROOT),
                capture_output=True,
                text=True,
                timeout=120,
            )
            self.assertEqual(done.returncode, code, f"{argv}:\n{done.stdout}\n{done.stderr}")
            return json.loads(done.stdout)

        path = str(self.dir / "backup.jsonl")
        self.assertEqual(cli("backup", path)["files"], 3)
        # The mistake: everything deleted but one file, which is overwritten.
        (a / "one.bin").unlink()
        (a / "docs" / "three.bin").unlink()
        (a / "two.bin").write_bytes(b"oops\n")
        self.sync(a)
        self.sync(b)
        self.assertEqual(sorted(tree_state(b)), ["two.bin"])
        # A gc that keeps what the backup names drops nothing of it; one
        # without would have dropped it all (15 blocks, two copies each).
        self.assertEqual(
            sum(r["removed"] for r in cli("blocks", "gc", "--grace", "0", "--dry-run")["stores"].values()), 30
        )
        kept = cli("blocks", "gc", "--grace", "0", "--keep", path)
        self.assertEqual(sum(r["removed"] for r in kept["stores"].values()), 0)
        plan = cli("restore", path, "--dry-run")
        self.assertEqual(plan["restored"], ["docs/three.bin", "one.bin", "two.bin"])
        done = cli("restore", path)
        self.assertEqual(done["restored"], ["docs/three.bin", "one.bin", "two.bin"])
        self.assertEqual(cli("restore", path)["unchanged"], 3)
        # The sync clients take the restore as a change made elsewhere.
        self.sync(b)
        self.sync(a)
        self.assertEqual(tree_state(a), saved)
        self.assertEqual(tree_state(b), saved)
        self.assertEqual(self.server_map()["two.bin"][0], 3)  # a new version, not a rewind

    def test_subfolders_sync_and_nothing_leaves_the_folder(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        (a / "docs" / "old").mkdir(parents=True)
        (a / "docs" / "plan.txt").write_text("plan\n")
        (a / "docs" / "old" / "v1.txt").write_text("v1\n")
        (a / "top.txt").write_text("top\n")
        outside = self.folder("outside")
        (outside / "precious").write_text("keep\n")
        os.symlink(outside, a / "linked")  # never followed
        first = self.sync(a)
        self.assertEqual((first["uploaded"], first["skipped"]), (3, {"linked": "a symlink"}))
        self.assertEqual(sorted(self.server_map()), ["docs/old/v1.txt", "docs/plan.txt", "top.txt"])
        self.sync(b)
        self.assertEqual(tree_state(b), tree_state(a))
        self.assert_index_matches_server(b)

        # An edit, a deletion and a new folder three deep go back.
        (b / "docs" / "plan.txt").write_text("plan v2\n")
        (b / "docs" / "old" / "v1.txt").unlink()
        (b / "new" / "deep" / "er").mkdir(parents=True)
        (b / "new" / "deep" / "er" / "f.txt").write_text("deep\n")
        self.sync(b)
        self.sync(a)
        self.assertEqual(tree_state(a), tree_state(b))
        self.assertFalse((a / "docs" / "old").exists(), "a folder a deletion emptied stays")
        self.assertTrue((b / "docs" / "old").is_dir(), "a folder emptied here was removed")
        self.assert_index_matches_server(a)

        # Where a has a symlink, b has a real folder: what the server holds
        # there is never written or deleted through the link.
        (b / "shared").mkdir()
        (b / "shared" / "precious").write_text("the server's\n")
        self.sync(b)
        os.symlink(outside, a / "shared")
        done = self.sync(a, check=False)
        self.assertEqual(done["returncode"], 1, done)
        self.assertIn("shared is a symlink here", json.loads(done["stdout"])["incomplete"]["shared/precious"])
        (b / "shared" / "precious").unlink()
        self.sync(b)
        self.sync(a, check=False)
        self.assertEqual((outside / "precious").read_text(), "keep\n")
        self.assertEqual(sorted(p.name for p in outside.iterdir()), ["precious"])

        # A file where the other side has a folder: not synced, said so,
        # until one is renamed; the rest goes on.
        os.unlink(a / "shared")
        (a / "clash").write_text("a file\n")
        self.sync(a)
        (b / "clash").mkdir()
        (b / "clash" / "inside.txt").write_text("in a folder\n")
        (b / "after.txt").write_text("after\n")
        done = self.sync(b, check=False)
        self.assertEqual(done["returncode"], 1, done)
        self.assertIn("folder of that name", json.loads(done["stdout"])["incomplete"]["clash"])
        self.assertEqual((b / "clash" / "inside.txt").read_text(), "in a folder\n")
        self.sync(a, check=False)
        self.assertEqual((a / "after.txt").read_text(), "after\n")
        self.assertEqual((a / "clash").read_text(), "a file\n")

    def test_two_folders_converge(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        rng = random.Random(5)
        (a / "empty").write_bytes(b"")
        (a / "one-block").write_bytes(rng.randbytes(4096))
        (a / "one-block-and-a-byte").write_bytes(rng.randbytes(4097))
        (a / "naïve café 日本.txt").write_text("grüße\n", encoding="utf-8")
        (a / "big.bin").write_bytes(rng.randbytes(50 * 1024 * 1024))
        small = self.folder("a")
        for i in range(5000):
            (small / f"small-{i:04d}.txt").write_bytes(b"file %d\n" % i)
        (a / "bad,name").write_bytes(b"x")  # cannot be in index.txt: skipped, reported
        os.symlink("/etc/passwd", a / "link")  # never followed
        t0 = time.monotonic()
        first = self.sync(a)
        up = time.monotonic() - t0
        self.assertEqual(first["uploaded"], 5005)
        self.assertEqual(set(first["skipped"]), {"bad,name", "link"})
        t0 = time.monotonic()
        second = self.sync(b)
        down = time.monotonic() - t0
        self.assertEqual(second["downloaded"], 5005)
        expected = folder_state(a)
        del expected["bad,name"]
        self.assertEqual(folder_state(b), expected)
        self.assertFalse((b / "link").exists())
        self.assert_index_matches_server(b)
        # Edit, delete, recreate, and an edit of one block of the big file.
        (a / "naïve café 日本.txt").write_text("changed\n", encoding="utf-8")
        (a / "empty").unlink()
        (b / "one-block").unlink()
        with open(a / "big.bin", "r+b") as f:
            f.seek(4096 * 100)
            f.write(b"X" * 10)
        edit = self.sync(a)
        # One block of big.bin and the small file's one block, each once;
        # over the network, a copy of each to two stores (replicas = 2).
        self.assertLessEqual(
            edit["bytes_up"], 4096 + len("changed\n"), "a one-block edit sent more than that block"
        )
        self.assertGreater(edit["bytes_up"], 0)
        self.assertEqual(edit["bytes_sent"], 2 * edit["bytes_up"])
        taken = self.sync(b)
        # The other side fetches that block alone: the rest of big.bin (and
        # of the edited small file) is already in the folder.
        self.assertLessEqual(taken["bytes_down"], 2 * 4096, "a one-block edit fetched more than its blocks")
        self.assertGreater(taken["bytes_reused"], 49 * 1024 * 1024)
        self.sync(a)  # takes b's deletion
        self.assertFalse((a / "one-block").exists())
        (b / "empty").write_bytes(b"back again")
        self.sync(b)
        self.sync(a)
        self.assertEqual((a / "empty").read_bytes(), b"back again")
        self.assertEqual(
            folder_state(a) | {"bad,name": digest(a / "bad,name")},
            folder_state(b) | {"bad,name": digest(a / "bad,name")},
        )
        self.assert_index_matches_server(a)
        self.assert_index_matches_server(b)
        again = self.sync(b)
        self.assertEqual(again["uploaded"] + again["downloaded"], 0)
        # The first sync of a folder lists everything; later ones ask for
        # the changes since its cursor.
        self.assertEqual((first["remote_from"], second["remote_from"]), ("listing", "listing"))
        self.assertEqual((edit["remote_from"], again["remote_from"]), ("changes", "changes"))
        # A cursor that cannot be followed costs a listing, never a wrong sync.
        (b / ".surfshard-cursor").write_text("ssc1.garbage\n")
        (a / "after-garbage.txt").write_text("new\n")
        self.sync(a)
        fallback = self.sync(b)
        self.assertEqual(fallback["remote_from"], "listing")
        self.assertEqual((b / "after-garbage.txt").read_text(), "new\n")
        self.assertEqual(self.sync(b)["remote_from"], "changes")
        print(
            f"5,005 files incl. 50 MB: first sync up {up:.1f} s, down {down:.1f} s; one-block edit sent {edit['bytes_up']} bytes, fetched {taken['bytes_down']}"
        )

    def test_conflicts_keep_both_and_crashes_lose_nothing(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        (a / "notes.txt").write_text("first\n")
        self.sync(a)
        self.sync(b)
        (a / "notes.txt").write_text("from a\n")
        (b / "notes.txt").write_text("from b\n")
        self.sync(a)
        result = self.sync(b)
        self.assertEqual(len(result["conflicts"]), 1)
        copy = result["conflicts"][0]
        self.assertIn("conflicted copy", copy)
        self.assertEqual((b / "notes.txt").read_text(), "from a\n")
        self.assertEqual((b / copy).read_text(), "from b\n")
        self.sync(a)
        self.assertEqual((a / copy).read_text(), "from b\n")
        # A block store and the metadata leader die; syncing goes on.
        self.nodes["store-0"].kill()
        self.nodes[self.leader()].kill()
        rng = random.Random(9)
        for i in range(20):
            (a / f"during-{i}").write_bytes(rng.randbytes(rng.randrange(1, 20000)))
        self.sync(a)
        self.sync(b)
        self.assertEqual(folder_state(a), folder_state(b))
        self.assert_index_matches_server(b)

    def put(self, name: str, version: int, *hashes: str) -> None:
        """``surfshard put``: metadata only, whatever the block stores hold."""
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "client.cli",
                "put",
                "--config",
                str(self.config),
                name,
                str(version),
                *hashes,
            ],
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr)

    def versions(self, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``surfshard versions FOLDER ARGS`` (local: no cluster needed)."""
        return subprocess.run(
            [sys.executable, "-m", "client.cli", "versions", str(folder), *args],
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def get(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """``surfshard get ARGS``, its output as bytes (a file's content)."""
        return subprocess.run(
            [sys.executable, "-m", "client.cli", "get", "--config", str(self.config), *args],
            cwd=str(REPO_ROOT),
            capture_output=True,
            timeout=120,
        )

    def test_get_output_writes_a_files_content_whole_or_not_at_all(self) -> None:
        a = self.folder("a")
        (a / "docs").mkdir()
        content = os.urandom(3 * 4096 + 17) + bytes(4096 * 3)  # a block repeated, a short last block
        (a / "docs" / "big.bin").write_bytes(content)
        (a / "gone.txt").write_text("gone\n")
        self.sync(a)
        (a / "gone.txt").unlink()
        self.sync(a)

        out = self.dir / "out"
        out.mkdir()
        done = self.get("docs/big.bin", "--output", str(out / "copy.bin"), "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual((out / "copy.bin").read_bytes(), content)
        report = json.loads(done.stdout)
        self.assertEqual((report["version"], report["bytes"]), (1, len(content)))
        # Into a folder, under the file's own name; and to stdout.
        self.assertEqual(self.get("docs/big.bin", "-o", str(out)).returncode, 0)
        self.assertEqual((out / "big.bin").read_bytes(), content)
        self.assertEqual(self.get("docs/big.bin", "-o", "-").stdout, content)

        # A deleted file, one never written, and one whose blocks no store
        # holds: exit 1, said why, and nothing left at the path.
        self.put("ghost.bin", 1, "ab" * 32)
        for name, why in (
            ("gone.txt", "was deleted"),
            ("never.txt", "no file"),
            ("ghost.bin", "no block store"),
        ):
            done = self.get(name, "-o", str(out / "x"))
            self.assertEqual(done.returncode, 1, (name, done.stderr))
            self.assertIn(why, done.stderr.decode(), name)
        done = self.get("docs/big.bin", "-o", str(out / "no-such-folder" / "x"))
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("cannot write", done.stderr.decode())
        self.assertEqual(sorted(p.name for p in out.iterdir()), ["big.bin", "copy.bin"])
        self.assertEqual(self.get("gone.txt", "-o", "-", "--json").returncode, 2)

    def test_what_a_change_made_elsewhere_replaces_or_deletes_is_kept_for_a_while(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        (a / "docs").mkdir()
        (a / "docs" / "plan.txt").write_text("the plan\n")
        (a / "notes.txt").write_text("notes\n")
        (a / "same.txt").write_text("same\n")
        self.sync(a)
        self.sync(b)
        # b overwrites one file and deletes another.
        (b / "docs" / "plan.txt").write_text("a worse plan\n")
        (b / "notes.txt").unlink()
        self.sync(b)
        got = self.sync(a)
        self.assertEqual(len(got["versions_kept"]), 2, got)
        self.assertEqual(versions_state(a), {"docs/plan.txt": b"the plan\n", "notes.txt": b"notes\n"})
        self.assertEqual((a / "docs" / "plan.txt").read_text(), "a worse plan\n")
        self.assertFalse((a / "notes.txt").exists())
        # Never synced: not on the server, not in the other folder, and a
        # sync after finds nothing to do.
        self.assertEqual(sorted(self.server_map()), ["docs/plan.txt", "notes.txt", "same.txt"])
        again = self.sync(a)
        self.assertEqual((again["uploaded"], again["versions_kept"]), (0, []))
        self.assertEqual(self.sync(b)["downloaded"], 0)
        self.assertFalse((b / VERSIONS_NAME).exists())
        # `surfshard versions` lists them; the plan put back is an ordinary
        # edit (what it replaced kept in turn).
        listed = json.loads(self.versions(a, "--json").stdout)
        self.assertEqual(sorted(v["name"] for v in listed), ["docs/plan.txt", "notes.txt"])
        done = self.versions(a, "docs/plan.txt", "--restore")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual((a / "docs" / "plan.txt").read_text(), "the plan\n")
        self.assertEqual(self.versions(a, "nothing.txt", "--restore").returncode, 1)
        self.assertEqual(self.versions(a, "--restore").returncode, 2)
        self.assertEqual(self.sync(a)["uploaded"], 1)
        self.sync(b)
        self.assertEqual((b / "docs" / "plan.txt").read_text(), "the plan\n")
        self.assertEqual(versions_state(b), {"docs/plan.txt": b"a worse plan\n"})
        self.assertEqual(
            versions_state(a),
            {"docs/plan.txt": b"the plan\n", "docs/plan.txt 2": b"a worse plan\n", "notes.txt": b"notes\n"},
        )
        # --keep-versions 0 keeps nothing; nonsense is a usage error.
        (a / "same.txt").write_text("changed\n")
        self.sync(a)
        self.assertEqual(self.sync(b, "--keep-versions", "0")["versions_kept"], [])
        self.assertEqual(versions_state(b), {"docs/plan.txt": b"a worse plan\n"})
        for bad in ("-1", "nan", "1e9"):
            self.assertEqual(self.sync(b, "--keep-versions", bad, check=False)["returncode"], 2, bad)

    def test_a_file_whose_blocks_are_gone_does_not_hold_up_the_others(self) -> None:
        # Metadata naming blocks no store holds (``surfshard put`` with a
        # made-up hash, or blocks lost): every other file still syncs; that
        # one is reported, left as it is and out of the index, the sync
        # exits non-zero, and the next sync tries it again.
        a, b = self.folder("a"), self.folder("b")
        (a / "real.txt").write_text("real\n")
        self.sync(a)
        self.put("ghost.txt", 1, "ab" * 32)
        first = self.sync(b, check=False)
        self.assertEqual(first["returncode"], 1, first["stderr"])
        report = json.loads(first["stdout"])
        self.assertEqual(report["downloaded"], 1)
        self.assertEqual(list(report["incomplete"]), ["ghost.txt"])
        self.assertIn("not synced ghost.txt", first["stderr"])
        self.assertEqual((b / "real.txt").read_text(), "real\n")
        self.assertFalse((b / "ghost.txt").exists())
        self.assertNotIn("ghost.txt", (b / "index.txt").read_text(encoding="utf-8"))
        # The cursor moves on, and the file left behind is asked for by
        # name: the next sync follows the feed, not a listing, and tries it again.
        self.assertEqual((b / ".surfshard-pending").read_text(encoding="utf-8"), "ghost.txt\n")
        (a / "more.txt").write_text("more\n")
        self.sync(a, check=False)
        again = self.sync(b, check=False)
        self.assertEqual(list(json.loads(again["stdout"])["incomplete"]), ["ghost.txt"])
        self.assertEqual(json.loads(again["stdout"])["remote_from"], "changes")
        self.assertEqual((b / "more.txt").read_text(), "more\n")
        # Once the file is deleted (or rewritten with real blocks), syncs are whole again.
        self.put("ghost.txt", 2, "0")
        whole = self.sync(b)
        self.assertEqual((whole["incomplete"], whole["remote_from"]), ({}, "changes"))
        self.assertFalse((b / ".surfshard-pending").exists())
        self.assertEqual(self.sync(a)["incomplete"], {})
        self.assert_index_matches_server(b)

    def test_nonsense_index_is_refused_and_the_folder_untouched(self) -> None:
        a = self.folder("a")
        (a / "f.txt").write_text("x")
        self.sync(a)
        (a / "index.txt").write_text("this is not,an index\nf.txt,one,abc\n")
        (a / "g.txt").write_text("new")
        before = {p.name: p.read_bytes() for p in a.iterdir()}
        outcome = self.sync(a, check=False)
        self.assertNotEqual(outcome["returncode"], 0)
        stderr = " ".join(outcome["stderr"].split())
        self.assertIn("index.txt", stderr)
        self.assertIn("nothing in the folder was changed", stderr)
        self.assertEqual({p.name: p.read_bytes() for p in a.iterdir()}, before)
        self.assertNotIn("g.txt", self.server_map())

    def test_a_watching_folder_follows_the_other_and_ends_on_ctrl_c(self) -> None:
        """``sync --watch``: one client for all its syncs (a long poll on the
        change feed between them), both ways, until Ctrl-C ends it cleanly."""
        a, b = self.folder("a"), self.folder("b")
        log = open(self.dir / "watch.log", "wb")
        self.addCleanup(log.close)
        argv = [sys.executable, "-m", "client.cli", "sync", "--config", str(self.config)]
        watcher = subprocess.Popen(
            [*argv, "--watch", "0.5", str(b)], cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT
        )
        self.addCleanup(lambda: watcher.poll() is None and watcher.kill())
        for i in range(3):
            (a / f"from-a-{i}.txt").write_text(f"edit {i}\n")
            self.sync(a)
            # The server's change reaches the watching folder without a sync of it.
            wait_until(
                lambda i=i: (
                    (b / f"from-a-{i}.txt").exists() and (b / f"from-a-{i}.txt").read_text() == f"edit {i}\n"
                ),
                60.0,
                0.1,
                f"from-a-{i}.txt in the watching folder",
            )
        # And a local change in it goes up at the next interval.
        (b / "from-b.txt").write_text("up\n")
        wait_until(lambda: "from-b.txt" in self.server_map(), 60.0, 0.5, "from-b.txt on the server")
        # Every block store down: the watch says its sync failed and goes on
        # trying (it used to exit at the first failure); back up, the edit
        # made meanwhile goes up.
        stores = [node for name, node in self.nodes.items() if name.startswith("store")]
        for node in stores:
            node.kill()
        (b / "while-down.txt").write_text("waited\n")
        watch_log = self.dir / "watch.log"
        wait_until(
            lambda: "sync failed" in watch_log.read_text(errors="replace"),
            60.0,
            0.2,
            "the watch's failed sync",
        )
        self.assertIsNone(watcher.poll(), "the watch ended at a failed sync")
        for node in stores:
            node.start()
        wait_until(lambda: "while-down.txt" in self.server_map(), 90.0, 0.5, "while-down.txt on the server")
        self.assertIn("synced again", watch_log.read_text(errors="replace"))
        self.assertIsNone(watcher.poll(), "the watch ended by itself")
        watcher.send_signal(signal.SIGINT)
        wait_until(lambda: watcher.poll() is not None, 30.0, 0.1, "the watch to end after SIGINT")
        self.assertEqual(watcher.returncode, 0, (self.dir / "watch.log").read_text(errors="replace"))
        self.sync(a)
        self.assertEqual((a / "from-b.txt").read_text(), "up\n")
        self.assertEqual((a / "while-down.txt").read_text(), "waited\n")

    def test_a_watch_sends_a_local_edit_at_once_and_idles_otherwise(self) -> None:
        """With an interval of 10 minutes, a local edit still goes up at
        once: the operating system tells the watch (``client.watch.FolderEvents``). And
        an idle watch stays idle: its own writes (index, cursor, hash cache)
        wake nothing, so no sync runs until something changes."""
        a, b = self.folder("a"), self.folder("b")
        (b / "docs").mkdir()
        (b / "docs" / "old.txt").write_text("old\n")
        (b / ".surfshard-ignore").write_text("*.log\n")
        log = open(self.dir / "watch-events.log", "wb")
        self.addCleanup(log.close)
        argv = [
            sys.executable,
            "-m",
            "client.cli",
            "sync",
            "--config",
            str(self.config),
            "--watch",
            "600",
            str(b),
        ]
        watcher = subprocess.Popen(argv, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: watcher.poll() is None and watcher.kill())
        wait_until(lambda: "docs/old.txt" in self.server_map(), 60.0, 0.2, "the first sync")
        cursor = b / ".surfshard-cursor"

        def synced_since(inode: int) -> bool:
            try:
                return cursor.stat().st_ino != inode  # every sync writes it anew
            except FileNotFoundError:
                return False

        wait_until(lambda: cursor.exists(), 60.0, 0.1, "the cursor file")
        idle = cursor.stat().st_ino
        deadline = time.monotonic() + 3.0
        writes = 0
        while time.monotonic() < deadline:  # bounded: three seconds of watching nothing happen
            self.assertFalse(synced_since(idle), "an idle watch synced again by itself")
            # An app writing a log the folder ignores wakes no one either.
            writes += 1
            (b / "app.log").write_text(f"line {writes}\n")
            time.sleep(0.2)
        (b / "docs" / "new.txt").write_text("new\n")
        # Well within the long poll's 60 s, after which even a watch blind to
        # the folder would sync.
        wait_until(lambda: "docs/new.txt" in self.server_map(), 30.0, 0.2, "the local edit on the server")
        (b / "docs" / "old.txt").unlink()
        wait_until(
            lambda: self.server_map().get("docs/old.txt", [0, []])[1] == ["0"],
            60.0,
            0.2,
            "the deletion on the server",
        )
        # The server's changes still arrive by the long poll.
        (a / "from-a.txt").write_text("a\n")
        self.sync(a)
        wait_until(lambda: (b / "from-a.txt").exists(), 60.0, 0.1, "from-a.txt in the watching folder")
        self.assertIsNone(watcher.poll(), "the watch ended by itself")
        # As a service manager stops it: SIGTERM ends it as cleanly as Ctrl-C.
        watcher.send_signal(signal.SIGTERM)
        wait_until(lambda: watcher.poll() is not None, 30.0, 0.1, "the watch to end after SIGTERM")
        self.assertEqual(watcher.returncode, 0, (self.dir / "watch-events.log").read_text(errors="replace"))

    def test_a_sync_killed_anywhere_leaves_whole_files_and_the_next_finishes(self) -> None:
        a, b = self.folder("a"), self.folder("b")
        rng = random.Random(3)
        versions: dict[str, set[str]] = {}
        for i in range(60):
            data = rng.randbytes(rng.randrange(0, 200_000))
            (a / f"f{i}").write_bytes(data)
            versions.setdefault(f"f{i}", set()).add(hashlib.sha256(data).hexdigest())
        self.sync(a)
        for seed in sim_seeds(4, env="SURFSHARD"):
            rng = random.Random(seed)
            for i in rng.sample(range(60), 20):  # new content on a
                data = rng.randbytes(rng.randrange(0, 200_000))
                (a / f"f{i}").write_bytes(data)
                versions[f"f{i}"].add(hashlib.sha256(data).hexdigest())
            for folder in (a, b):
                proc = subprocess.Popen(
                    [sys.executable, "-m", "client.cli", "sync", "--config", str(self.config), str(folder)],
                    cwd=str(REPO_ROOT),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(rng.uniform(0.3, 2.0))  # the kill lands at a seeded moment
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                for path in folder.iterdir():
                    if path.name in versions:
                        self.assertIn(
                            digest(path), versions[path.name], f"seed={seed}: {path} is half-written"
                        )
                # What the sync kept of the files it replaced is whole too.
                for name, _when, kept in Versions(folder, 0, datetime.datetime.now).entries():
                    path = folder / VERSIONS_NAME / kept
                    self.assertIn(digest(path), versions[name], f"seed={seed}: kept {path} is not a version")
            self.sync(a)
            self.sync(b)
            state = folder_state(a)
            self.assertEqual(folder_state(b), state, f"seed={seed}")
            self.assert_index_matches_server(b)


class SyncAcrossMovesTests(SynchronousTestCase):
    """Syncing goes on while a shard holding some of the files moves to
    another group and a metadata leader and a block store are SIGKILLed and
    restarted (a ShardMaster, two groups and three block stores)."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        ports = free_ports(12)
        addr = [f"127.0.0.1:{p}" for p in ports]
        self.sm, self.groups, self.stores = addr[0:3], {1: addr[3:6], 2: addr[6:9]}, addr[9:12]

        def nodes(addresses: list[str]) -> str:
            return "nodes = [" + ", ".join(f'"{a}"' for a in addresses) + "]"

        self.config = self.dir / "moves.toml"
        self.config.write_text(
            "\n".join(
                [
                    "[cluster]",
                    'name = "moves"',
                    "shards = 4",
                    'data_dir = "data"',
                    "[shardmaster]",
                    nodes(self.sm),
                    "[groups.1]",
                    nodes(self.groups[1]),
                    "[groups.2]",
                    nodes(self.groups[2]),
                    "[blockstores]",
                    nodes(self.stores),
                    "[raft]",
                    "fsync = false",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        self.nodes: dict[str, NodeProcess] = {}
        base = [*twistd_command(), "--nodaemon", "--pidfile=", "--logfile=-"]
        for i, a in enumerate(self.sm):
            self.add(f"sm-{i}", [*base, "shardmaster", "--config", str(self.config), "--node", str(i)], a)
        for gid, addresses in self.groups.items():
            for i, a in enumerate(addresses):
                self.add(f"g{gid}-{i}", twistd_node_argv(self.config, i, group=gid), a)
        for i, a in enumerate(self.stores):
            self.add(f"store-{i}", [*base, "surfblock", "--config", str(self.config), "--node", str(i)], a)
        for node in self.nodes.values():
            node.start()
            self.addCleanup(node.kill)
        self.cli("admin", "join", "1", *self.groups[1])
        self.cli("admin", "join", "2", *self.groups[2])

    def add(self, name: str, argv: list[str], address: str) -> None:
        self.nodes[name] = NodeProcess(name, argv, self.dir / "logs" / f"{name}.log", address)

    def cli(self, *args: str, timeout: float = 180.0) -> Any:
        command, rest = args[0], list(args[1:])
        argv = [sys.executable, "-m", "client.cli", command, "--config", str(self.config), "--json", *rest]
        deadline = time.monotonic() + timeout
        while True:  # bounded by the deadline: the cluster may still be starting
            done = subprocess.run(argv, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=timeout)
            if done.returncode == 0:
                return json.loads(done.stdout)
            if time.monotonic() > deadline:
                self.fail(f"{args} failed:\n{done.stdout}\n{done.stderr}")
            time.sleep(0.5)

    def leader_of(self, gid: int) -> str:
        def find() -> str | None:
            for i, a in enumerate(self.groups[gid]):
                try:
                    with NativeClient(a, timeout=2.0) as c:
                        if c.call("is_leader"):
                            return f"g{gid}-{i}"
                except Exception:
                    continue
            return None

        return wait_until(find, 60.0, 0.1, f"a leader of group {gid}")

    def test_sync_through_a_move_and_kills(self) -> None:
        from surfshard.keyspace import shard_of

        a, b = self.dir / "a", self.dir / "b"
        a.mkdir()
        b.mkdir()
        rng = random.Random(11)
        for i in range(200):
            (a / f"doc-{i}.txt").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
        self.cli("sync", str(a))
        shown = self.cli("admin", "show")
        shard = shard_of("doc-0.txt", 4)
        source = shown["shards"][shard]
        target = 2 if source == 1 else 1
        leader = self.leader_of(source)
        # The move, a metadata leader and a block store killed, while b syncs
        # and a keeps changing.
        self.cli("admin", "move", str(shard), str(target))
        self.nodes[leader].kill()
        self.nodes["store-1"].kill()
        for i in range(0, 200, 7):
            (a / f"doc-{i}.txt").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
        (a / "doc-3.txt").unlink()
        self.cli("sync", str(b))
        self.cli("sync", str(a))
        self.nodes[leader].start()
        self.nodes["store-1"].start()
        self.cli("sync", str(b))
        self.assertEqual(folder_state(b), folder_state(a))
        self.assertEqual(self.cli("admin", "show")["shards"][shard], target)
        # Conflicting edits across the move: both contents stay on disk.
        (a / "doc-0.txt").write_bytes(b"a's edit")
        (b / "doc-0.txt").write_bytes(b"b's edit")
        self.cli("sync", str(a))
        result = self.cli("sync", str(b))
        self.assertEqual(len(result["conflicts"]), 1)
        self.assertEqual((b / "doc-0.txt").read_bytes(), b"a's edit")
        self.assertEqual((b / result["conflicts"][0]).read_bytes(), b"b's edit")
        self.cli("sync", str(a))
        self.assertEqual(folder_state(a), folder_state(b))
        repaired = self.cli("blocks", "repair")
        self.assertGreater(repaired["blocks"], 0)
