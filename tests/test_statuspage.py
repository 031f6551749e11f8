"""The live status page (issue 14, item 2), in a real headless browser.

A real 3-node group serves ``/``; Chromium (Debian's package, installed
here where missing and we may; otherwise the test skips and says why)
loads it, runs its script, and the DOM it dumps must show the shard map
with hash ranges and the group's leader; after the leader is SIGKILLed the
page shows the new leader and the old one down. ``/cluster`` (what the
page draws) is checked as JSON too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.procs import Cluster, NativeClient, wait_until

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_or_skip() -> str:
    path = find_browser()
    if path:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        for argv in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"]):
            subprocess.run(argv, capture_output=True, timeout=900)
            path = find_browser()
            if path:
                return path
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900)
        path = find_browser()
        if path:
            return path
    raise SkipTest("no Chromium here, and it cannot be installed (needs root and apt-get: Debian's chromium)")


def dump_dom(browser: str, url: str) -> str:
    with tempfile.TemporaryDirectory(prefix="surfshard-chromium-") as profile:
        done = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=4000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if done.returncode != 0:
        raise AssertionError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


class StatusPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.browser = browser_or_skip()
        self.cluster = Cluster.toml(Path(self.mktemp()), 3)
        self.addCleanup(self.cluster.cleanup)

    def leader(self, exclude: int | None = None) -> int:
        def find() -> int | None:
            for i, address in enumerate(self.cluster.addresses):
                if i == exclude:
                    continue
                try:
                    with NativeClient(address, timeout=2.0) as c:
                        if c.call("is_leader"):
                            return i + 1
                except Exception:
                    continue
            return None

        return wait_until(find, 30.0, 0.1, "a leader") - 1

    def page_leader(self, dom: str) -> str | None:
        match = re.search(
            r'data-group="group 1"><b>group 1</b> leader <span class="leader">([^<]*)</span>', dom
        )
        return match.group(1) if match else None

    def test_the_page_shows_the_map_and_follows_a_leader_change(self) -> None:
        with self.cluster.logs_on_failure():
            self.cluster.start_all()
            first = self.leader()
            viewer = (first + 1) % 3
            url = f"http://{self.cluster.addresses[viewer]}/"
            with urllib.request.urlopen(url + "cluster", timeout=10) as reply:
                data = json.loads(reply.read())
            self.assertEqual(len(data["map"]["shards"]), 4)
            self.assertEqual(data["map"]["shards"][0]["lo"], "0000000000000000")
            (group,) = [g for g in data["groups"] if g["kind"] == "group"]
            self.assertEqual(group["leader"], f"group-1-{first}")

            dom = dump_dom(self.browser, url)
            self.assertIn("0000000000000000..3fffffffffffffff", dom)
            self.assertIn(self.cluster.addresses[first], dom)  # the map's leader column
            self.assertEqual(self.page_leader(dom), f"group-1-{first}")

            self.cluster.nodes[first].kill()
            second = self.leader(exclude=first)
            dom = wait_until(
                lambda: (
                    (d := dump_dom(self.browser, url)) and self.page_leader(d) == f"group-1-{second}" and d
                ),
                60.0,
                0.5,
                "the page to show the new leader",
            )
            self.assertRegex(dom, rf"group-1-{first}</td><td class=\"down\">down")
