"""A power cut for ``DiskStorage`` in tests: file operations that remember
what the disk has made durable, and a ``power_loss()`` that puts the files
back to exactly that.

POSIX promises little, and this keeps to the letter of it (as ALICE and
dm-log-writes model a file system), so a missing ``fsync`` shows up as lost
data in a test instead of in production:

- a file's content is durable as of its last ``fsync``; what was written
  after it is lost, and a file never fsynced comes back empty;
- a name (a file created, renamed or unlinked) is durable only once its
  directory is fsynced; until then a power loss brings the old name, or no
  name, back.

Everything still goes to the real files (the storage reads them back with
plain ``open``), and nothing is really fsynced: a cut costs no disk flush.
Files that already existed when this was created count as durable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from raft.storage import DiskStorage, Syscalls

__all__ = ["PowerLossDiskStorage", "PowerLossSyscalls"]


@dataclass(eq=False)
class _File:
    """One inode: what of its content would survive a power loss."""

    durable: bytes = b""


class PowerLossSyscalls(Syscalls):
    """``Syscalls`` that track durability (module docstring). One instance
    per storage directory, kept across the storage's restarts."""

    def __init__(self) -> None:
        #: Names as the running system sees them, and as the disk has them.
        self._names: dict[str, _File] = {}
        self._durable_names: dict[str, _File] = {}
        #: Open file descriptors: the inode, or None for a directory.
        self._fds: dict[int, _File | None] = {}
        self._dir_fds: dict[int, str] = {}
        #: fsync calls seen (files and directories), for tests of the fake.
        self.fsyncs = 0
        self.cuts = 0

    def _file(self, path: str) -> _File | None:
        path = os.path.abspath(path)
        f = self._names.get(path)
        if f is None and os.path.isfile(path):
            # There before we looked: durable as it is.
            with open(path, "rb") as src:
                f = _File(src.read())
            self._names[path] = self._durable_names[path] = f
        return f

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        path = os.path.abspath(path)
        if os.path.isdir(path):
            fd = os.open(path, flags)
            self._fds[fd], self._dir_fds[fd] = None, path
            return fd
        f = self._file(path)
        fd = os.open(path, flags, mode)
        if f is None:
            f = self._names[path] = _File()  # new: no durable content, no durable name
        self._fds[fd] = f
        return fd

    def fsync(self, fd: int) -> None:
        self.fsyncs += 1
        directory = self._dir_fds.get(fd)
        if directory is not None:
            for path in [p for p in self._durable_names if os.path.dirname(p) == directory]:
                del self._durable_names[path]
            for path, f in self._names.items():
                if os.path.dirname(path) == directory:
                    self._durable_names[path] = f
            return
        inode = self._fds[fd]
        assert inode is not None
        # Read what the descriptor's file holds now (the fd may be
        # write-only and the file renamed or unlinked since).
        with open(f"/proc/self/fd/{fd}", "rb") as src:
            inode.durable = src.read()

    def fdatasync(self, fd: int) -> None:
        # The content and the size, which is all this model tracks of a file.
        self.fsync(fd)

    def replace(self, src: str, dst: str) -> None:
        src, dst = os.path.abspath(src), os.path.abspath(dst)
        f = self._file(src)
        os.replace(src, dst)
        if f is not None:
            self._names[dst] = self._names.pop(src)

    def unlink(self, path: str) -> None:
        path = os.path.abspath(path)
        self._file(path)
        os.unlink(path)
        self._names.pop(path, None)

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        self._dir_fds.pop(fd, None)
        os.close(fd)

    def power_loss(self) -> None:
        """Put every file this has seen back to what is durable. The storage
        using it must be dead first (``DiskStorage.simulate_crash``)."""
        self.cuts += 1
        for fd in list(self._fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._dir_fds.clear()
        for path in set(self._names) | set(self._durable_names):
            f = self._durable_names.get(path)
            if f is None:
                if os.path.lexists(path):
                    os.unlink(path)
            else:
                with open(path, "wb") as out:
                    out.write(f.durable)
        self._names = dict(self._durable_names)


class PowerLossDiskStorage(DiskStorage):
    """A ``DiskStorage`` (fsync on, through ``syscalls``) whose
    ``simulate_crash`` is a real power cut: the process dies, then the files
    go back to what was durable. Reopen the directory with a new one over
    the same ``syscalls``."""

    def __init__(self, directory: str, syscalls: PowerLossSyscalls) -> None:
        super().__init__(directory, fsync=True, syscalls=syscalls)
        self.power = syscalls

    def simulate_crash(self) -> None:
        super().simulate_crash()
        self.power.power_loss()
