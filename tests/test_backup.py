"""``surfshard backup`` / ``restore``: the file format read back exactly and
checked line by line, and what a restore writes (only content the cluster
lost, as new versions, never a deletion, never over a concurrent write)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from client import backup, feed
from surfshard import errors

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


class FormatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "b.jsonl"
        self.files = {
            "docs/plan.txt": (3, [A, B]),
            "gone.txt": (2, ["0"]),
            "empty": (1, []),
            "é.txt": (7, [C]),
        }

    def test_round_trip(self) -> None:
        backup.write_backup(self.path, self.files, cluster="local", shards=8, cursor="sc1.x")
        header, files = backup.read_backup(self.path)
        self.assertEqual(files, self.files)
        self.assertEqual(
            (header["cluster"], header["shards"], header["cursor"], header["files"]), ("local", 8, "sc1.x", 4)
        )
        self.assertEqual([p.name for p in self.dir.iterdir()], ["b.jsonl"])  # no temporary file left

    def test_bad_files_are_refused_with_the_line_at_fault(self) -> None:
        backup.write_backup(self.path, self.files, cluster="local", shards=8, cursor="")
        good = self.path.read_text(encoding="utf-8").splitlines()
        cases = [
            ([], "empty"),
            (["{}"], "line 1: not a SurfShard backup"),
            ([good[0].replace('"version": 1', '"version": 9')], "backup format 9"),
            ([good[0], '["x", 1]'], "line 2: expected [name, version, hashlist]"),
            ([good[0], '["x", 0, []]'], "line 2: version 0"),
            ([good[0], '["x", true, []]'], "line 2: version True"),
            ([good[0], '["x", 1, ["zz"]]'], "line 2: hashlist[0]"),
            ([good[0], '["/x", 1, []]'], "line 2:"),
            ([good[0], "not json"], "line 2:"),
            (good[:2] + [good[1]], "appears twice"),
            (good[:-1], "cut short"),
        ]
        for lines, why in cases:
            self.path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
            with self.assertRaises(backup.BackupError, msg=why) as caught:
                backup.read_backup(self.path)
            self.assertIn(why, caught.exception.message, lines)
        self.assertRaises(backup.BackupError, backup.read_backup, self.dir / "missing.jsonl")
        self.path.write_bytes(b"\xff\xfe")
        self.assertRaises(backup.BackupError, backup.read_backup, self.path)


class FakeClient:
    """The cluster as ``restore`` sees it: a listing and updatefile."""

    def __init__(self, files: dict[str, tuple[int, list[str]]]) -> None:
        self.files = dict(files)
        self.writes: list[tuple[str, int, list[str]]] = []
        #: Names someone else writes between the listing and the restore's write.
        self.raced: set[str] = set()

    def updatefile(self, name: str, version: int, hashlist: list[str]) -> defer.Deferred:
        current = self.files.get(name, (0, []))[0]
        if name in self.raced:
            current += 1
        if version != current + 1:
            return defer.fail(errors.VersionMismatch("version mismatch", current=current))
        self.files[name] = (version, hashlist)
        self.writes.append((name, version, hashlist))
        return defer.succeed(version)


class RestoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeClient(
            {
                "same.txt": (4, [A]),
                "edited.txt": (5, [D]),
                "deleted.txt": (6, ["0"]),
                "came-back.txt": (3, [B]),
                "new-since.txt": (1, [C]),
                "raced.txt": (2, ["0"]),
            }
        )

        def list_all(client: Any) -> defer.Deferred:
            return defer.succeed(({n: (v, list(h)) for n, (v, h) in client.files.items()}, None))

        self.patch(feed, "list_all", list_all)
        self.stored = {A, B, C}
        self.backup = {
            "same.txt": (4, [A]),
            "edited.txt": (4, [A, B]),
            "deleted.txt": (5, [C]),
            "missing.txt": (1, [A]),
            "came-back.txt": (2, ["0"]),
            "lost.txt": (1, [A, "e" * 64]),
            "raced.txt": (1, [B]),
        }

    def present(self, hashes: list[str]) -> defer.Deferred:
        return defer.succeed(({h for h in hashes if h in self.stored}, []))

    def test_only_lost_content_comes_back_as_new_versions(self) -> None:
        self.cluster.raced = {"raced.txt"}
        report = self.successResultOf(backup.restore(self.cluster, self.present, self.backup))
        self.assertEqual(
            sorted(self.cluster.writes),
            [("deleted.txt", 7, [C]), ("edited.txt", 6, [A, B]), ("missing.txt", 1, [A])],
        )
        self.assertEqual(report["restored"], ["deleted.txt", "edited.txt", "missing.txt"])
        self.assertEqual(report["blocks_missing"], ["lost.txt"])
        self.assertEqual(report["changed_meanwhile"], ["raced.txt"])
        self.assertEqual((report["unchanged"], report["left_deleted"], report["not_in_backup"]), (1, 1, 1))
        self.assertEqual(self.cluster.files["came-back.txt"], (3, [B]))  # a restore never deletes
        # Run again: nothing more to do.
        again = self.successResultOf(backup.restore(self.cluster, self.present, self.backup))
        self.assertEqual(again["restored"], [])

    def test_only_the_files_the_patterns_match(self) -> None:
        self.cluster.files["docs/a.txt"] = (2, ["0"])
        self.cluster.files["docs/new.txt"] = (1, [C])
        self.backup["docs/a.txt"] = (1, [A])
        self.backup["docs/deep/b.txt"] = (1, [B])
        report = self.successResultOf(backup.restore(self.cluster, self.present, self.backup, only=["docs/"]))
        self.assertEqual(sorted(self.cluster.writes), [("docs/a.txt", 3, [A]), ("docs/deep/b.txt", 1, [B])])
        self.assertEqual((report["chosen"], report["not_in_backup"]), (2, 1))  # docs/new.txt
        report = self.successResultOf(
            backup.restore(
                self.cluster, self.present, self.backup, only=["*.txt", "!edited.txt"], dry_run=True
            )
        )
        self.assertEqual(report["restored"], ["deleted.txt", "missing.txt", "raced.txt"])

    def test_a_dry_run_writes_nothing(self) -> None:
        report = self.successResultOf(backup.restore(self.cluster, self.present, self.backup, dry_run=True))
        self.assertEqual(self.cluster.writes, [])
        self.assertEqual(report["restored"], ["deleted.txt", "edited.txt", "missing.txt", "raced.txt"])
        self.assertTrue(report["dry_run"])

    def test_the_report_is_json(self) -> None:
        report = self.successResultOf(backup.restore(self.cluster, self.present, self.backup))
        self.assertEqual(json.loads(json.dumps(report)), report)
