"""The block store: SurfStore's content-addressed blocks, on disk.

Blocks are immutable and named by their SHA-256, so storing one is
idempotent and needs no coordination: a block store is not replicated by
Raft. Clients place each block on several stores (``surfshard.blocks.ring``)
and read another copy when one is missing or bad. A block is written to a
temporary file, fsynced and renamed into place, so a crash leaves either
the whole block or nothing; a block whose caller names its hash is checked
against it before it is stored; a block read back is checked against its
name, so silent disk corruption is reported, never served.

The service runs every disk operation in the reactor's thread pool: file
reads, writes and fsyncs never stall the event loop. Batch calls
(``putblocks``, ``getblocks``) carry many blocks per request.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import xmlrpc

from surfshard import errors
from surfshard.config import ClusterConfig, NodeKind, node_name, parse_address
from surfshard.keyspace import validate_block_hash
from surfshard.metrics import MetricsResource, node_registry
from surfshard.net.methods import MethodTable
from surfshard.net.pool import RpcClientPool
from surfshard.net.port import NodeRoot, listen_now, make_site, node_factory
from surfshard.net.schema import Arg, Value
from surfshard.net.server import RpcServerFactory, server_limits
from surfshard.net.tls import TLSFiles
from surfshard.replica.access import server_access
from surfshard.statuspage import ClusterResource, ClusterView, PageResource

#: Largest block accepted (SurfStore clients use 4 KiB blocks by default).
MAX_BLOCK_BYTES = 4 * 1024 * 1024
#: Most hashes one hasblocks call may ask about.
MAX_HASBLOCKS = 100_000
#: Most blocks, and bytes, in one putblocks or getblocks call (a reply
#: stays well under the 16 MiB frame limit).
MAX_BATCH_BLOCKS = 1024
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Most names one listblocks page returns.
MAX_LIST = 10_000


class BlockStore:
    """Blocks in ``directory/<first 2 hex>/<hash>``."""

    log = Logger()

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = str(self.directory)
        self.fsync = fsync
        #: For metrics: blocks and bytes written and blocks read by this
        #: process, and blocks whose hash did not match (refused or corrupt).
        self.stats = {"written": 0, "bytes_written": 0, "read": 0, "verification_failures": 0}

    def _path(self, block_hash: str) -> Path:
        return self.directory / block_hash[:2] / block_hash

    def put(self, data: bytes, expected: str | None = None) -> str:
        """Store ``data``; returns its hash (storing it again is a no-op).
        With ``expected``, a block whose hash is not that is refused."""
        if not isinstance(data, bytes):
            raise errors.BadRequest("a block must be bytes")
        if len(data) > MAX_BLOCK_BYTES:
            raise errors.BadRequest(f"block of {len(data)} bytes is over the limit of {MAX_BLOCK_BYTES}")
        block_hash = hashlib.sha256(data).hexdigest()
        if expected is not None and expected != block_hash:
            self.stats["verification_failures"] += 1
            self.log.warn(
                "refused a block sent as {expected}: its hash is {actual}",
                expected=expected,
                actual=block_hash,
            )
            raise errors.BadRequest(f"block sent as {expected} has hash {block_hash}", hash=expected)
        self._store(block_hash, data)
        return block_hash

    def _store(self, block_hash: str, data: bytes) -> None:
        """Write a block already checked against its hash: a temporary file
        (named for the block and the thread, so concurrent writers never
        share one), fsync, rename, fsync of the directory. Plain ``os``
        calls: this runs once per block (~40 us here, against ~150 us with
        pathlib and ``mkstemp``)."""
        folder = os.path.join(self._root, block_hash[:2])
        path = os.path.join(folder, block_hash)
        if os.path.exists(path):
            return
        self.stats["written"] += 1
        self.stats["bytes_written"] += len(data)
        tmp = os.path.join(folder, f".tmp-{block_hash[:16]}-{threading.get_ident()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:  # bounded: each write makes progress or raises
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def get(self, block_hash: str) -> bytes:
        validate_block_hash(block_hash)
        try:
            data = self._path(block_hash).read_bytes()
        except FileNotFoundError:
            raise errors.BadRequest(f"no block {block_hash}", missing=block_hash) from None
        if hashlib.sha256(data).hexdigest() != block_hash:
            self.stats["verification_failures"] += 1
            self.log.error("block {hash} is corrupt on disk", hash=block_hash)
            raise errors.Internal(f"block {block_hash} is corrupt on this store")
        self.stats["read"] += 1
        return data

    def has(self, hashes: list[str]) -> list[str]:
        """The subset of ``hashes`` stored here, in the order given."""
        for h in hashes:
            validate_block_hash(h)
        return [h for h in hashes if self._path(h).exists()]

    def put_many(self, blocks: list[list[Any]]) -> list[str]:
        """Store ``[[hash, data], ...]``, each checked against its hash
        (all checked before any is stored); returns the hashes."""
        checked = []
        for i, item in enumerate(blocks):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], bytes)):
                raise errors.BadRequest(f"blocks[{i}] must be [hash, bytes]")
            expected = validate_block_hash(item[0])
            actual = hashlib.sha256(item[1]).hexdigest()
            if actual != expected:
                self.stats["verification_failures"] += 1
                self.log.warn(
                    "refused a block sent as {expected}: its hash is {actual}",
                    expected=expected,
                    actual=actual,
                )
                raise errors.BadRequest(f"blocks[{i}] sent as {expected} has hash {actual}", hash=expected)
            checked.append((expected, item[1]))
        for _, data in checked:
            if len(data) > MAX_BLOCK_BYTES:
                raise errors.BadRequest(f"block of {len(data)} bytes is over the limit of {MAX_BLOCK_BYTES}")
        for block_hash, data in checked:
            self._store(block_hash, data)
        return [block_hash for block_hash, _ in checked]

    def get_many(self, hashes: list[str]) -> dict[str, Any]:
        """``{"blocks": {hash: data}, "missing": [...], "corrupt": [...]}``:
        a corrupt copy is reported (and logged), never served."""
        found: dict[str, bytes] = {}
        missing: list[str] = []
        corrupt: list[str] = []
        for h in hashes:
            try:
                found[h] = self.get(h)
            except errors.Internal:
                corrupt.append(h)
            except errors.BadRequest as e:
                if e.details.get("missing") != h:
                    raise
                missing.append(h)
        return {"blocks": found, "missing": missing, "corrupt": corrupt}

    def list(self, after: str = "", limit: int = MAX_LIST) -> list[str]:
        """Up to ``limit`` stored hashes greater than ``after``, in order
        (for repair, a page at a time)."""
        out: list[str] = []
        for prefix in sorted(p.name for p in self.directory.iterdir() if p.is_dir() and len(p.name) == 2):
            if prefix < after[:2]:
                continue
            names = sorted(n.name for n in (self.directory / prefix).iterdir() if len(n.name) == 64)
            for name in names:
                if name > after:
                    out.append(name)
                    if len(out) >= limit:
                        return out
        return out


def _inline(call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)


def blockstore_methods(store: BlockStore, run: Callable[..., Any] = _inline) -> MethodTable:
    """The native methods of ``store``; ``run(call, *args)`` runs each disk
    operation (the service: in a thread, returning a Deferred)."""
    t = MethodTable(service="blockstore")
    # Handlers get the wire argument names as keywords.
    t.add(
        "putblock",
        lambda data, hash=None: run(store.put, data, hash),
        [
            Arg("data", bytes, max_bytes=MAX_BLOCK_BYTES),
            Arg("hash", str, required=False, min_len=64, max_len=64),
        ],
    )
    t.add("getblock", lambda hash: run(store.get, hash), [Arg("hash", str, min_len=64, max_len=64)])
    t.add(
        "hasblocks",
        lambda hashes: run(store.has, hashes),
        [Arg("hashes", Value(list, max_len=MAX_HASBLOCKS, items=Value(str, max_len=64)))],
    )
    t.add(
        "putblocks",
        lambda blocks: run(store.put_many, blocks),
        [Arg("blocks", Value(list, max_len=MAX_BATCH_BLOCKS, items=Value(list, min_len=2, max_len=2)))],
    )
    t.add(
        "getblocks",
        lambda hashes: run(store.get_many, hashes),
        [Arg("hashes", Value(list, max_len=MAX_BATCH_BLOCKS, items=Value(str, min_len=64, max_len=64)))],
    )
    t.add(
        "listblocks",
        lambda after="", limit=MAX_LIST: run(store.list, after, limit),
        [
            Arg("after", str, required=False, max_len=64),
            Arg("limit", int, required=False, min=1, max=MAX_LIST),
        ],
    )
    t.add("ping", lambda: True)
    return t


class BlockStoreXMLRPC(xmlrpc.XMLRPC):
    """SurfStore's ``surfstore.getblock/putblock/hasblocks/ping``."""

    def __init__(self, store: BlockStore, run: Callable[..., Any] = _inline) -> None:
        super().__init__(allowNone=True)
        self.store = store
        #: Runs each disk operation (the service: in a thread).
        self.run = run

    def _guard(self, call: Any, *args: Any) -> defer.Deferred:
        from surfshard.metadata.facade import to_fault

        def fault(failure: Any) -> Any:
            if failure.check(errors.SurfShardError):
                return to_fault(failure.value)
            return to_fault(errors.Internal("internal error"))

        return defer.maybeDeferred(self.run, call, *args).addErrback(fault)

    def xmlrpc_ping(self) -> Any:
        return True

    def xmlrpc_putblock(self, block: Any) -> Any:
        def call() -> bool:
            data = block.data if isinstance(block, xmlrpc.Binary) else block
            if isinstance(data, str):
                data = data.encode("utf-8")
            self.store.put(data)
            return True

        return self._guard(call)

    def xmlrpc_getblock(self, block_hash: Any) -> Any:
        def call() -> xmlrpc.Binary:
            if not isinstance(block_hash, str):
                raise errors.BadRequest("hash must be a string")
            return xmlrpc.Binary(self.store.get(block_hash))

        return self._guard(call)

    def xmlrpc_hasblocks(self, hashes: Any) -> Any:
        def call() -> list[str]:
            if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
                raise errors.BadRequest("hashlist must be a list of strings")
            if len(hashes) > MAX_HASBLOCKS:
                raise errors.BadRequest(f"at most {MAX_HASBLOCKS} hashes per call")
            return self.store.has(hashes)

        return self._guard(call)


class BlockStoreService(service.Service):
    name: str  # type: ignore[assignment]  # Service declares name = None; always set here
    """Block store ``index`` of the config, on its port."""

    log = Logger()

    def __init__(
        self, cluster: ClusterConfig, index: int, reactor: Any, *, fsync: bool | None = None
    ) -> None:
        self.cluster = cluster
        self.reactor = reactor
        self.name = node_name(NodeKind.BLOCKSTORE, 0, index)
        self.address = cluster.node_address(NodeKind.BLOCKSTORE, 0, index)
        data_dir = Path(cluster.node_data_dir(NodeKind.BLOCKSTORE, 0, index))
        self.store = BlockStore(data_dir / "blocks", fsync=cluster.raft.fsync if fsync is None else fsync)

        def in_thread(call: Callable[..., Any], *args: Any) -> Any:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), call, *args)

        self.table = blockstore_methods(self.store, in_thread)
        self.table.add("status", lambda: {"role": "blockstore", "name": self.name, "address": self.address})
        self.root = NodeRoot()
        rpc2 = xmlrpc.XMLRPC(allowNone=True)
        rpc2.putSubHandler("surfstore", BlockStoreXMLRPC(self.store, in_thread))
        self.root.add("RPC2", rpc2)
        self.root.add("metrics", MetricsResource(node_registry(self)))

        self.rpc_factory: RpcServerFactory | None = None
        self.tls_files = None
        if cluster.tls is not None:
            cert, key = cluster.tls.cert_paths(self.name)
            self.tls_files = TLSFiles(ca=str(cluster.tls.ca), cert=str(cert), key=str(key))
        # The status page asks the other nodes how they are.
        self.pool = RpcClientPool(reactor, tls=self.tls_files)
        self.root.add("cluster", ClusterResource(ClusterView(cluster, self.pool, self.name)))
        self.root.index = PageResource()
        self.listening_port: Any = None

    def _make_rpc_factory(self) -> RpcServerFactory:
        self.rpc_factory = RpcServerFactory(
            self.table, self.reactor, server_limits(self.cluster), **server_access(self.cluster, self.name)
        )
        return self.rpc_factory

    def startService(self) -> None:
        super().startService()
        host, port = parse_address(self.address)
        factory = node_factory(
            self._make_rpc_factory(),
            make_site(self.root, clock=self.reactor, max_body=self.cluster.limits.max_http_body),
            self.reactor,
            tls=self.tls_files,
            max_connections=self.cluster.limits.max_connections,
        )
        try:
            self.listening_port = listen_now(self.reactor, port, factory, host)
        except Exception as e:
            self.log.critical(
                "{name}: cannot listen on {address}: {e}", name=self.name, address=self.address, e=e
            )
            raise
        self.log.info("{name} serving blocks on {address}", name=self.name, address=self.address)

    @defer.inlineCallbacks
    def stopService(self):
        if self.listening_port is not None:
            yield self.listening_port.stopListening()
        yield self.pool.close()
        yield super().stopService()
