"""A blocking client for scripts that do not want to write Deferreds.

    from client.blocking import connect
    with connect("configs/single-group.toml") as c:
        c.updatefile("notes.txt", 1, [block_hash])
        version, hashlist = c.getfileinfo("notes.txt")

The Twisted reactor runs in a daemon thread (started on first use, once per
process: a reactor cannot be restarted), and each call waits for its
Deferred with ``blockingCallFromThread``. Errors arrive as the same typed
exceptions as in the Deferred API (``VersionMismatch`` with ``current``,
``Timeout``...). Do not use this from code already running on the reactor.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import threads

from client.cluster import ClusterClient
from surfshard.config import default_config_path, load_config

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _reactor() -> Any:
    """The global reactor, running in a background thread."""
    global _thread
    from twisted.internet import reactor

    with _lock:
        if _thread is None:
            _thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="surfshard-reactor",
                daemon=True,
            )
            _thread.start()
    return reactor


class BlockingClient:
    """``ClusterClient`` with plain blocking methods."""

    def __init__(self, config: str | Path | None = None, *, timeout: float = 30.0) -> None:
        self.cluster = load_config(config or default_config_path())
        self._reactor = _reactor()
        self._client: ClusterClient = threads.blockingCallFromThread(
            self._reactor, lambda: ClusterClient(self.cluster, self._reactor, timeout=timeout)
        )

    def _call(self, method: str, *args: Any) -> Any:
        return threads.blockingCallFromThread(self._reactor, getattr(self._client, method), *args)

    def updatefile(self, name: str, version: int, hashlist: Sequence[str]) -> int:
        """The new version; raises ``VersionMismatch`` (with ``current``)."""
        return self._call("updatefile", name, version, list(hashlist))

    def getfileinfo(self, name: str) -> tuple[int, list[str]]:
        version, hashlist = self._call("getfileinfo", name)
        return version, hashlist

    def getfileinfomap(self) -> dict[str, list[Any]]:
        return self._call("getfileinfomap")

    def close(self) -> None:
        self._call("close")

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(config: str | Path | None = None, *, timeout: float = 30.0) -> BlockingClient:
    """A blocking client for the cluster in ``config`` (default: the built-in one)."""
    return BlockingClient(config, timeout=timeout)
