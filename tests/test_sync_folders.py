"""Subfolders in a synced folder (``client.sync``): which paths may be
synced, the scan that walks them without following symlinks, and the
writes and deletions that never leave the folder."""

from __future__ import annotations

import datetime
import errno
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from client import sync
from client.sync import (
    MAX_DEPTH,
    MAX_PART_BYTES,
    VERSIONS_NAME,
    SyncResult,
    Versions,
    conflict_name,
    parse_version_name,
    scan,
    syncable,
    version_name,
)


class SyncablePathTests(SynchronousTestCase):
    def test_relative_paths_of_plain_names_are_syncable(self) -> None:
        for name in ("a.txt", "docs/plan.txt", "a/b/c/d", ".hidden/x", "docs/index.txt", "日本/café.txt"):
            self.assertIsNone(syncable(name), name)

    def test_everything_else_is_refused_with_a_reason(self) -> None:
        for name, why in (
            ("index.txt", "own file"),
            (".surfshard-cursor", "own file"),
            ("a,b/c", "','"),
            ("../escape", "relative path"),
            ("a/../../escape", "relative path"),
            ("a/./b", "relative path"),
            ("a//b", "relative path"),
            ("/etc/passwd", "relative path"),
            ("a/", "relative path"),
            ("a/.surfshard-tmp-1/b", "temporary"),
            ("x" * 256, "255 bytes"),
            ("a/" + "x" * 256, "255 bytes"),
            ("/".join(["d"] * MAX_DEPTH) + "/f", "folders deep"),
            ("a\x00b", "not a valid name"),
            (".surfshard-versions", "own file"),
            (".surfshard-versions/plan~20261207-013300.txt", "earlier versions"),
        ):
            problem = syncable(name)
            self.assertIsNotNone(problem, name)
            assert problem is not None
            self.assertIn(why, problem, name)

    def test_a_conflict_copy_stays_in_the_files_folder(self) -> None:
        when = datetime.datetime(2026, 12, 6, 21, 30, 0)
        self.assertEqual(
            conflict_name("v1.2/plan.txt", when, "host", lambda n: False),
            "v1.2/plan (conflicted copy host 2026-12-06 213000).txt",
        )
        self.assertEqual(
            conflict_name("a.b/Makefile", when, "host", lambda n: False),
            "a.b/Makefile (conflicted copy host 2026-12-06 213000)",
        )


class ScanTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()

    def test_files_in_subfolders_are_found_and_symlinks_never_followed(self) -> None:
        (self.base / "docs" / "old").mkdir(parents=True)
        (self.base / "docs" / "plan.txt").write_bytes(b"plan")
        (self.base / "docs" / "old" / "v1.txt").write_bytes(b"v1")
        (self.base / "docs" / "index.txt").write_bytes(b"a user's file, not the sync's")
        (self.base / "top.txt").write_bytes(b"top")
        (self.base / "empty").mkdir()
        outside = Path(self.mktemp())
        outside.mkdir()
        (outside / "secret").write_bytes(b"not ours")
        os.symlink(outside, self.base / "linked")
        (self.base / "bad,folder").mkdir()
        (self.base / "bad,folder" / "f").write_bytes(b"x")
        (self.base / "docs" / ".surfshard-tmp-left").write_bytes(b"a killed sync's")
        result = SyncResult()
        found = scan(self.base, 4096, result)
        self.assertEqual(sorted(found), ["docs/index.txt", "docs/old/v1.txt", "docs/plan.txt", "top.txt"])
        self.assertEqual(
            found["docs/old/v1.txt"], sync.hash_file(self.base / "docs" / "old" / "v1.txt", 4096)
        )
        self.assertEqual(result.skipped["linked"], "a symlink")
        self.assertIn("','", result.skipped["bad,folder"])
        self.assertFalse((self.base / "docs" / ".surfshard-tmp-left").exists())

    def test_an_unreadable_subfolder_is_reported_not_fatal(self) -> None:
        if os.geteuid() == 0:
            # root reads any folder: make scandir fail another way.
            (self.base / "sub").mkdir()
            real = os.scandir

            def failing(path: str) -> object:
                if str(path).endswith("sub"):
                    raise PermissionError(13, "Permission denied")
                return real(path)

            self.patch(os, "scandir", failing)
        else:
            (self.base / "sub").mkdir(mode=0)
            self.addCleanup(os.chmod, self.base / "sub", 0o755)
        (self.base / "a.txt").write_bytes(b"a")
        result = SyncResult()
        self.assertEqual(sorted(scan(self.base, 4096, result)), ["a.txt"])
        self.assertIn("cannot be read", result.skipped["sub"])


class WritesStayInTheFolderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.outside = Path(self.mktemp())
        self.outside.mkdir()

    def test_folders_are_made_but_never_through_a_symlink_or_a_file(self) -> None:
        self.assertIsNone(sync._make_folders(self.base, "a/b/c.txt"))
        self.assertTrue((self.base / "a" / "b").is_dir())
        os.symlink(self.outside, self.base / "link")
        self.assertIn("is a symlink here", sync._make_folders(self.base, "link/x/f") or "")
        self.assertEqual(list(self.outside.iterdir()), [])
        (self.base / "plain").write_bytes(b"x")
        self.assertIn("plain is a file here", sync._make_folders(self.base, "plain/f") or "")

    def test_a_deletion_never_reaches_through_a_symlinked_folder(self) -> None:
        (self.outside / "precious").write_bytes(b"keep")
        os.symlink(self.outside, self.base / "link")
        self.assertFalse(sync._in_folder(self.base, "link/precious"))
        (self.base / "real").mkdir()
        self.assertTrue(sync._in_folder(self.base, "real/x"))
        self.assertTrue(sync._in_folder(self.base, "top"))
        self.assertFalse(sync._is_file_or_link(self.base / "real"))

    def test_only_folders_a_deletion_emptied_are_removed(self) -> None:
        (self.base / "a" / "b" / "c").mkdir(parents=True)
        (self.base / "a" / "keep.txt").write_bytes(b"keep")
        sync._remove_emptied_folders(self.base, "a/b/c/gone.txt")
        self.assertFalse((self.base / "a" / "b").exists())
        self.assertTrue((self.base / "a" / "keep.txt").exists())
        sync._remove_emptied_folders(self.base, "top.txt")  # nothing to remove, base stays
        self.assertTrue(self.base.is_dir())


class IgnoreTests(SynchronousTestCase):
    def test_patterns(self) -> None:
        ignore = sync.Ignore(
            ["# build output", "", "*.log", "node_modules/", "docs/*.pdf", "/top-only.txt", "  cache  "]
        )
        for name in (
            "a.log",
            "deep/down/b.log",
            "node_modules/x/y.js",
            "app/node_modules/z.js",
            "docs/manual.pdf",
            "top-only.txt",
            "cache",
            "x/cache/y",
        ):
            self.assertTrue(ignore(name), name)
        for name in (
            "a.txt",
            "log",
            "docs/sub/manual.pdf",
            "other/docs/manual.pdf",
            "sub/top-only.txt",
            "caches",
        ):
            self.assertFalse(ignore(name), name)
        self.assertFalse(sync.Ignore(["# only a comment", "   "]))
        self.assertFalse(sync.Ignore()("anything"))

    def test_gitignore_rules_take_back_span_folders_and_match_folders_only(self) -> None:
        ignore = sync.Ignore(["*.log", "!keep.log", "build/", "a/**/z", "**/tmp", "logs/", "!logs/x.txt"])
        self.assertTrue(ignore("deep/b.log"))
        self.assertFalse(ignore("keep.log"))  # taken back by the later "!"
        self.assertFalse(ignore("sub/keep.log"))
        self.assertTrue(ignore("build", is_dir=True))
        self.assertFalse(ignore("build"))  # "build/" is for folders only: a file so named syncs
        self.assertTrue(ignore("x/build/out.o"))  # a file in such a folder does not
        self.assertTrue(ignore("a/z"))
        self.assertTrue(ignore("a/b/c/z"))
        self.assertFalse(ignore("b/a/z"))
        self.assertTrue(ignore("one/two/tmp/f"))
        # As in git, nothing in an ignored folder can be taken back: the scan
        # never reads the folder, so the name must not count as missing here.
        self.assertTrue(ignore("logs/x.txt"))
        # Order matters, and so does the digest that records the rules.
        self.assertTrue(sync.Ignore(["!keep.log", "*.log"])("keep.log"))
        self.assertNotEqual(
            sync.Ignore(["*.log", "!keep.log"]).digest, sync.Ignore(["!keep.log", "*.log"]).digest
        )
        self.assertEqual(sync.Ignore([" *.log ", "# c"]).digest, sync.Ignore(["*.log"]).digest)

    def test_the_scan_and_the_name_check_agree(self) -> None:
        """What the scan leaves out is exactly what the name check calls
        ignored: a file the scan cannot see but the check lets through would
        look deleted here, and its deletion would reach the server."""
        base = Path(self.mktemp())
        names = [
            "a.log",
            "keep.log",
            "src/main.py",
            "src/build",
            "src/build.d/x",
            "build/out.o",
            "logs/x.txt",
            "logs/y.txt",
            "a/b/z",
            "a/z",
            "docs/tmp/f",
            "docs/plan.txt",
        ]
        for name in names:
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).write_bytes(name.encode())
        rules = ["*.log", "!keep.log", "build/", "a/**/z", "**/tmp", "logs/", "!logs/x.txt"]
        (base / sync.IGNORE_NAME).write_text("\n".join(rules) + "\n")
        ignore = sync.Ignore.of(base)
        found = scan(base, 4096, SyncResult(), ignore=ignore)
        self.assertEqual(sorted(found), sorted(n for n in names if not ignore(n)))
        self.assertEqual(
            sorted(found), ["docs/plan.txt", "keep.log", "src/build", "src/build.d/x", "src/main.py"]
        )

    def test_the_scan_leaves_ignored_names_out_and_does_not_enter_ignored_folders(self) -> None:
        base = Path(self.mktemp())
        (base / "build" / "deep").mkdir(parents=True)
        (base / "build" / "deep" / "out.o").write_bytes(b"o")
        (base / "keep.txt").write_bytes(b"k")
        (base / "skip.log").write_bytes(b"l")
        (base / sync.IGNORE_NAME).write_text("build\n*.log\n")
        result = SyncResult()
        entered: list[str] = []
        real = os.scandir

        def recording(path: str) -> object:
            entered.append(os.path.basename(path))
            return real(path)

        self.patch(os, "scandir", recording)
        found = scan(base, 4096, result, ignore=sync.Ignore.of(base))
        self.assertEqual(sorted(found), ["keep.txt"])  # the ignore file itself is not synced
        self.assertEqual(result.ignored, 2)
        self.assertNotIn("build", entered)

    def test_a_line_that_is_no_pattern_is_named(self) -> None:
        for bad in ("!", "\\", "[z-a]"):
            with self.assertRaises(sync.IgnorePatternError) as caught:
                sync.Ignore(["# fine", "*.log", bad])
            self.assertIn(f"line 3: {bad!r}", str(caught.exception))
        base = Path(self.mktemp())
        base.mkdir()
        (base / sync.IGNORE_NAME).write_text("*.log\n!\n")
        with self.assertRaises(sync.IndexFileError) as caught:
            sync.Ignore.of(base)
        self.assertIn("line 2", str(caught.exception))

    def test_an_unreadable_ignore_file_stops_the_sync_before_anything(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        (base / sync.IGNORE_NAME).write_bytes(b"\xff\xfe not utf-8")
        self.assertRaises(sync.IndexFileError, sync.Ignore.of, base)


class VersionsTests(SynchronousTestCase):
    """What a sync keeps of a file it replaces or deletes (``Versions``)."""

    WHEN = datetime.datetime(2026, 12, 7, 1, 33, 0)

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        (self.base / "docs").mkdir(parents=True)
        self.now = self.WHEN
        self.versions = Versions(self.base, 30, lambda: self.now)

    def test_names_carry_the_time_and_never_clash(self) -> None:
        taken = {"docs/plan~20261207-013300.txt", "docs/plan~20261207-013300-2.txt"}
        self.assertEqual(version_name("plan.txt", self.WHEN, lambda n: False), "plan~20261207-013300.txt")
        self.assertEqual(
            version_name("docs/plan.txt", self.WHEN, taken.__contains__), "docs/plan~20261207-013300-3.txt"
        )
        self.assertEqual(
            version_name("a.b/Makefile", self.WHEN, lambda n: False), "a.b/Makefile~20261207-013300"
        )
        self.assertEqual(version_name(".bashrc", self.WHEN, lambda n: False), ".bashrc~20261207-013300")
        # A name at the longest a file system takes still has room for the
        # stamp: its stem gives way, a whole character at a time.
        long = "é" * 120 + "x.txt"
        kept = version_name(long, self.WHEN, lambda n: False)
        self.assertLessEqual(len(kept.encode()), MAX_PART_BYTES)
        self.assertTrue(kept.startswith("é" * 100) and kept.endswith("~20261207-013300.txt"), kept)

    def test_a_kept_file_is_the_same_file_linked_not_copied(self) -> None:
        plan = self.base / "docs" / "plan.txt"
        plan.write_text("first\n")
        kept = self.versions.keep("docs/plan.txt")
        self.assertEqual(kept, "docs/plan~20261207-013300.txt")
        copy = self.base / VERSIONS_NAME / "docs" / "plan~20261207-013300.txt"
        self.assertEqual(os.stat(copy).st_ino, os.stat(plan).st_ino)
        # The sync then replaces the name (a new file renamed over it): the
        # kept one is what was there.
        tmp = self.base / "docs" / "new"
        tmp.write_text("second\n")
        os.replace(tmp, plan)
        self.assertEqual(copy.read_text(), "first\n")
        # Kept again in the same second: a name of its own.
        self.assertEqual(self.versions.keep("docs/plan.txt"), "docs/plan~20261207-013300-2.txt")

    def test_without_hard_links_a_copy_is_kept_and_other_errors_are_not_hidden(self) -> None:
        plan = self.base / "docs" / "plan.txt"
        plan.write_text("first\n")

        def no_links(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

        self.patch(os, "link", no_links)
        kept = self.versions.keep("docs/plan.txt")
        copy = self.base / VERSIONS_NAME / str(kept)
        self.assertEqual(copy.read_text(), "first\n")
        self.assertNotEqual(os.stat(copy).st_ino, os.stat(plan).st_ino)

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "link", full)
        self.assertRaises(OSError, self.versions.keep, "docs/plan.txt")

    def test_nothing_is_kept_of_what_is_no_file_or_when_keeping_is_off(self) -> None:
        (self.base / "docs" / "plan.txt").write_text("x")
        os.symlink("plan.txt", self.base / "link")
        self.assertIsNone(self.versions.keep("link"))
        self.assertIsNone(self.versions.keep("gone.txt"))
        self.assertIsNone(Versions(self.base, 0, lambda: self.now).keep("docs/plan.txt"))
        self.assertFalse((self.base / VERSIONS_NAME).exists())

    def test_a_versions_folder_that_is_a_symlink_is_never_written_through(self) -> None:
        elsewhere = Path(self.mktemp())
        elsewhere.mkdir()
        os.symlink(elsewhere, self.base / VERSIONS_NAME)
        (self.base / "plan.txt").write_text("x")
        self.assertRaises(OSError, self.versions.keep, "plan.txt")
        self.assertEqual(list(elsewhere.iterdir()), [])
        self.assertEqual(self.versions.prune(), 0)

    def test_versions_older_than_the_days_kept_are_removed_and_nothing_else(self) -> None:
        root = self.base / VERSIONS_NAME
        (root / "docs" / "old").mkdir(parents=True)
        (root / "keepme").mkdir()
        files = {
            "docs/old/a~20261101-120000.txt": True,  # 36 days: removed
            "docs/b~20261107-013259": True,  # 30 days and a second
            "docs/b~20261107-013301-2": False,  # 29 days 23:59:59
            "c~20261206-090000.txt": False,
            "notes.txt": False,  # not a version: left alone
            "d~20261399-000000.txt": False,  # no such date: left alone
            "keepme/e~20261107-013300.txt": False,  # exactly 30 days
        }
        for name in files:
            (root / name).write_text(name)
        self.assertEqual(self.versions.prune(), sum(files.values()))
        for name, gone in files.items():
            self.assertEqual((root / name).exists(), not gone, name)
        self.assertFalse((root / "docs" / "old").exists())  # emptied: removed
        self.assertTrue(root.is_dir())
        self.assertEqual(Versions(self.base, 0, lambda: self.now).prune(), 0)

    def replace(self, name: str, text: str) -> None:
        """As a sync replaces a file: a new file renamed over it."""
        tmp = self.base / "new"
        tmp.write_text(text)
        os.replace(tmp, self.base / name)

    def test_versions_are_listed_and_one_is_put_back_keeping_what_was_there(self) -> None:
        plan = self.base / "docs" / "plan.txt"
        plan.write_text("first\n")
        self.versions.keep("docs/plan.txt")
        self.now += datetime.timedelta(minutes=5)
        self.replace("docs/plan.txt", "second\n")
        self.versions.keep("docs/plan.txt")
        self.replace("docs/plan.txt", "third\n")
        (self.base / VERSIONS_NAME / "stray.txt").write_text("not a version")
        self.assertEqual(
            self.versions.entries(),
            [
                ("docs/plan.txt", self.WHEN, "docs/plan~20261207-013300.txt"),
                ("docs/plan.txt", self.WHEN + datetime.timedelta(minutes=5), "docs/plan~20261207-013800.txt"),
            ],
        )
        self.assertEqual(self.versions.entries("other.txt"), [])
        self.assertEqual(parse_version_name("a.b/Makefile~20261207-013300-2"), ("a.b/Makefile", self.WHEN))
        self.assertIsNone(parse_version_name("notes.txt"))
        self.now += datetime.timedelta(minutes=5)
        before = self.versions.restore("docs/plan.txt", "docs/plan~20261207-013300.txt")
        self.assertEqual(plan.read_text(), "first\n")
        self.assertEqual(before, "docs/plan~20261207-014300.txt")
        self.assertEqual((self.base / VERSIONS_NAME / str(before)).read_text(), "third\n")
        # A deleted file comes back, folders and all.
        self.versions.restore("gone/again.txt", "docs/plan~20261207-013800.txt")
        self.assertEqual((self.base / "gone" / "again.txt").read_text(), "second\n")
        # Only a kept version, and only to a name a sync may write.
        for name, kept in (
            ("docs/plan.txt", "stray.txt"),
            ("docs/plan.txt", "../docs/plan.txt"),
            ("index.txt", "docs/plan~20261207-013300.txt"),
            ("../out.txt", "docs/plan~20261207-013300.txt"),
        ):
            self.assertRaises(OSError, self.versions.restore, name, kept)
        self.assertEqual(plan.read_text(), "first\n")
        self.assertFalse((self.base.parent / "out.txt").exists())
        # Keeping off (``versions --restore --no-keep``): put back, nothing kept.
        count = len(self.versions.entries())
        self.assertIsNone(Versions(self.base, 0, lambda: self.now).restore("docs/plan.txt", str(before)))
        self.assertEqual(plan.read_text(), "third\n")
        self.assertEqual(len(self.versions.entries()), count)

    def test_a_replacement_that_fails_takes_its_kept_version_back(self) -> None:
        # Else the link would share the file still in place: an edit made
        # there later would change the "earlier" version too.
        folder = sync.Folder(self.base, None, None, None)
        (self.base / "plan.txt").write_text("old\n")

        def full() -> None:
            self.assertEqual(len(list((self.base / VERSIONS_NAME).iterdir())), 1)  # kept first
            raise OSError(28, "No space left on device")

        self.assertRaises(OSError, folder._replace, "plan.txt", 2, full)
        self.assertEqual(folder.result.versions_kept, [])
        self.assertEqual(list((self.base / VERSIONS_NAME).iterdir()), [])
        self.assertEqual((self.base / "plan.txt").read_text(), "old\n")

        # Nothing to keep (no file there): the failure still goes through.
        def nothing_kept_and_full() -> None:
            raise OSError(28, "No space left on device")

        self.assertRaises(OSError, folder._replace, "gone.txt", 2, nothing_kept_and_full)
        # And one that succeeds is kept and said.
        self.assertTrue(folder._replace("plan.txt", 3, lambda: (self.base / "plan.txt").unlink()))
        self.assertEqual(len(folder.result.versions_kept), 1)

    def test_the_scan_leaves_the_versions_folder_out(self) -> None:
        self.versions.keep("docs/plan.txt")
        (self.base / "docs" / "plan.txt").write_text("x")
        self.versions.keep("docs/plan.txt")
        (self.base / "docs" / VERSIONS_NAME).mkdir()  # only the top one is the sync's
        (self.base / "docs" / VERSIONS_NAME / "f").write_text("y")
        result = SyncResult()
        self.assertEqual(
            sorted(scan(self.base, 4096, result)), ["docs/.surfshard-versions/f", "docs/plan.txt"]
        )
        self.assertEqual(result.skipped, {})
