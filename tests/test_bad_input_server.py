"""Bad input against a live node never crashes it, never changes its state,
and always gets a clear error with a code.

One real process per test: a single-node group (its own majority, so it
leads at once) from a TOML config with chaos calls off. Both protocols on its
one port are attacked: the native protocol (length-prefixed CBOR frames,
through a plain socket) and the XML-RPC facade (``xmlrpc.client`` and raw
HTTP). After each batch the file map must equal what it was before, the node
must still answer, and its log must show the refusals.
"""

from __future__ import annotations

import http.client
import socket
import struct
import xmlrpc.client
from pathlib import Path
from typing import Any

import cbor2
from twisted.trial.unittest import SynchronousTestCase

from surfshard import errors
from surfshard.errors import ErrorCode
from surfshard.keyspace import MAX_HASHLIST
from surfshard.metadata.facade import FAULT_CODES
from surfshard.net import wire
from tests import procs

HASH = "ab" * 32
OTHER_HASH = "cd" * 32
#: Names SurfStore must refuse: empty, slash at either end, NUL, over 4096 bytes.
BAD_NAMES = ["", "/a", "a/", "a\x00b", "x" * 5000, "é" * 2500]
BAD_VERSIONS = [0, -1, -(2**31)]
CHAOS_METHODS = ["crash", "restore", "set_leader"]


class LiveNode:
    """One running single-node group and its files before the attack."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.cluster = procs.Cluster.toml(Path(test.mktemp()), 1, name="badinput", chaos=False)
        test.addCleanup(self.cluster.cleanup)
        self.cluster.start_all()
        self.address = self.cluster.addresses[0]
        self.native = procs.NativeClient(self.address, timeout=30.0)
        test.addCleanup(self.native.close)
        procs.wait_until(self._leads, 10.0, 0.05, "the single node never led")
        # Known state to compare against.
        self.native.call("updatefile", {"name": "keep.txt", "version": 1, "hashlist": [HASH]})
        self.native.call("updatefile", {"name": "keep.txt", "version": 2, "hashlist": [HASH, OTHER_HASH]})
        self.native.call("updatefile", {"name": "gone.txt", "version": 1, "hashlist": ["0"]})
        self.before = self.files()

    def _leads(self) -> bool:
        return bool(self.native.call("is_leader"))

    def files(self) -> dict[str, Any]:
        with procs.NativeClient(self.address, timeout=30.0) as c:
            return c.call("getfileinfomap", {"timeout": 10.0})

    def assert_unharmed(self, where: str) -> None:
        """Same files, still serving both protocols, same process."""
        node = self.cluster.nodes[0]
        self.test.assertTrue(node.running, f"{where}: the node exited\n{node.log_tail()}")
        self.test.assertEqual(self.files(), self.before, f"{where}: state changed")
        with procs.NativeClient(self.address, timeout=10.0) as c:
            self.test.assertIs(c.call("ping"), True)
            self.test.assertIs(c.call("is_crashed"), False)
        rpc = procs.xmlrpc_proxy(self.address, 10.0).surfstore
        self.test.assertIs(rpc.ping(), True)
        self.test.assertEqual(rpc.tester_getversion("keep.txt"), 2)

    def refusals_logged(self) -> int:
        return self.cluster.nodes[0].log_text().count("refused")


class NativeBadInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = LiveNode(self)

    def assert_error(self, code: ErrorCode, method: str, args: Any) -> errors.SurfShardError:
        with procs.NativeClient(self.node.address, timeout=30.0) as c:
            with self.assertRaises(errors.SurfShardError, msg=f"{method}({args!r:.200})") as caught:
                c.call(method, args)
        self.assertEqual(caught.exception.code, code, f"{method}({args!r:.200}): {caught.exception!r:.300}")
        self.assertTrue(caught.exception.message, "an error without a message")
        return caught.exception

    def update(self, **overrides: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"name": "new.txt", "version": 1, "hashlist": [HASH]}
        args.update(overrides)
        return {k: v for k, v in args.items() if v is not _DROP}

    def test_wrong_types(self) -> None:
        bad = ErrorCode.BAD_REQUEST
        with self.node.cluster.logs_on_failure():
            for args in [
                self.update(name=5),
                self.update(name=b"bytes"),
                self.update(name=None),
                self.update(version="1"),
                self.update(version=True),
                self.update(version=1.0),
                self.update(version=2**70),
                self.update(hashlist="abc"),
                self.update(hashlist=[1, 2]),
                self.update(hashlist={"a": 1}),
                self.update(hashlist=["nothex"]),
                self.update(hashlist=[HASH.upper()]),
                self.update(hashlist=_DROP),
                self.update(extra="field"),
                self.update(client_id="", seq=1),
                self.update(client_id="c", seq=0),
                self.update(client_id=7, seq=1),
                self.update(timeout=-1.0),
                self.update(timeout=1e9),
                self.update(timeout="soon"),
            ]:
                self.assert_error(bad, "updatefile", args)
            self.assert_error(bad, "getfileinfo", {"name": ["keep.txt"]})
            self.assert_error(bad, "tester_getversion", {})
            self.assert_error(bad, "getfileinfomap", {"unexpected": 1})
            self.node.assert_unharmed("after wrong types")

    def test_oversize_hashlist(self) -> None:
        with self.node.cluster.logs_on_failure():
            error = self.assert_error(
                ErrorCode.BAD_REQUEST, "updatefile", self.update(hashlist=[HASH] * (MAX_HASHLIST + 1))
            )
            self.assertIn(str(MAX_HASHLIST), error.message)
            # The limit itself is fine (an honest, very large file).
            with procs.NativeClient(self.node.address, timeout=60.0) as c:
                self.assertEqual(
                    c.call("updatefile", self.update(name="big.bin", hashlist=[HASH] * MAX_HASHLIST)), 1
                )
                self.assertEqual(c.call("tester_getversion", {"name": "big.bin"}), 1)
            self.node.before = self.node.files()
            self.node.assert_unharmed("after an oversize hashlist")

    def test_invalid_names_and_versions(self) -> None:
        with self.node.cluster.logs_on_failure():
            for name in BAD_NAMES:
                self.assert_error(ErrorCode.BAD_REQUEST, "updatefile", self.update(name=name))
                self.assert_error(ErrorCode.BAD_REQUEST, "getfileinfo", {"name": name})
                self.assert_error(ErrorCode.BAD_REQUEST, "tester_getversion", {"name": name})
            for version in BAD_VERSIONS:
                self.assert_error(ErrorCode.BAD_REQUEST, "updatefile", self.update(version=version))
                self.assert_error(
                    ErrorCode.BAD_REQUEST, "updatefile", self.update(name="keep.txt", version=version)
                )
            # A well-formed but stale version is not bad input: it is a mismatch.
            mismatch = self.assert_error(
                ErrorCode.VERSION_MISMATCH, "updatefile", self.update(name="keep.txt", version=2)
            )
            self.assertEqual(mismatch.current, 2)
            self.node.assert_unharmed("after invalid names and versions")
            self.assertGreater(self.node.refusals_logged(), 2 * len(BAD_NAMES))

    def test_unknown_methods_and_forbidden_chaos(self) -> None:
        with self.node.cluster.logs_on_failure():
            for method in ["nosuch", "", "updateFile", "surfstore.updatefile", "__init__", "x" * 10_000]:
                self.assert_error(ErrorCode.UNKNOWN_METHOD, method, {})
            for method in CHAOS_METHODS:
                error = self.assert_error(ErrorCode.FORBIDDEN, method, {})
                self.assertIn("chaos", error.message)
            self.node.assert_unharmed("after unknown methods and chaos calls")
            log = self.node.cluster.nodes[0].log_text()
            self.assertIn("unknown method", log)
            self.assertIn("chaos calls are disabled", log)

    def test_bad_frames(self) -> None:
        """Undecodable streams close that connection only; a frame refused
        only for its content is answered with an error and keeps it."""
        address = self.node.address
        with self.node.cluster.logs_on_failure():
            for raw in [
                b"\xff\xff\xff\xff",  # a 4 GiB length prefix
                struct.pack(">I", 5) + b"\xff\xfe\xfd\xfc\xfb",  # not CBOR
                struct.pack(">I", 3) + cbor2.dumps([1, 2]),  # CBOR, not a map
                wire.encode_frame({"method": "ping", "args": {}}),  # no id
                b"\x00\x00\x00\x10" + b"\x00" * 16 + b"GET / HTTP/1.1\r\n\r\n",
            ]:
                with procs.NativeClient(address, timeout=10.0) as c:
                    c.send_bytes(raw)
                    with self.assertRaises(errors.Unavailable, msg=repr(raw[:40])):
                        # Refused: the server closes the connection (an error
                        # frame may come first).
                        for _ in range(3):
                            c.read_frame(timeout=10.0)
            with procs.NativeClient(address, timeout=10.0) as c:
                # Malformed requests with a usable id get an error reply.
                reply = c.call_raw({"id": 1, "method": 5, "args": {}})
                self.assertEqual(reply["error"]["code"], "BAD_REQUEST", reply)
                reply = c.call_raw({"id": 2, "method": "ping", "args": []})
                self.assertEqual(reply["error"]["code"], "BAD_REQUEST", reply)
                # A CBOR tag (here a datetime) is refused, the stream stays usable.
                tagged = cbor2.dumps({"id": 3, "method": "ping", "args": {"t": cbor2.CBORTag(1, 0)}})
                c.send_bytes(struct.pack(">I", len(tagged)) + tagged)
                reply = c.read_frame()
                self.assertIn("error", reply)
                self.assertIs(c.call("ping"), True)
            # A client that sends half a frame and leaves does no harm.
            sock = socket.create_connection(procs_addr(address), timeout=10.0)
            sock.sendall(struct.pack(">I", 1000) + b"\xa1")
            sock.close()
            self.node.assert_unharmed("after bad frames")
            self.assertIn("undecodable stream", self.node.cluster.nodes[0].log_text())


class XmlRpcBadInputTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node = LiveNode(self)
        self.rpc = procs.xmlrpc_proxy(self.node.address, 60.0).surfstore

    def assert_fault(self, code: ErrorCode | int, method: str, *args: Any) -> xmlrpc.client.Fault:
        expected = FAULT_CODES[code] if isinstance(code, ErrorCode) else code
        call = getattr(procs.xmlrpc_proxy(self.node.address, 60.0).surfstore, method)
        with self.assertRaises(xmlrpc.client.Fault, msg=f"{method}{args!r:.200}") as caught:
            call(*args)
        fault = caught.exception
        self.assertEqual(fault.faultCode, expected, f"{method}{args!r:.200}: {fault.faultString:.300}")
        self.assertTrue(fault.faultString)
        return fault

    def post(self, body: bytes) -> tuple[int, bytes]:
        host, port = procs_addr(self.node.address)
        connection = http.client.HTTPConnection(host, port, timeout=30.0)
        try:
            connection.request("POST", "/RPC2", body, {"Content-Type": "text/xml"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def test_wrong_types_names_versions(self) -> None:
        bad = ErrorCode.BAD_REQUEST
        with self.node.cluster.logs_on_failure():
            for args in [
                (5, 1, [HASH]),
                ("new.txt", "1", [HASH]),
                ("new.txt", True, [HASH]),
                ("new.txt", 1.5, [HASH]),
                ("new.txt", 1, "abc"),
                ("new.txt", 1, [1, 2]),
                ("new.txt", 1, {"a": HASH}),
                ("new.txt", 1, ["nothex"]),
                ("new.txt", 1, None),
            ]:
                fault = self.assert_fault(bad, "updatefile", *args)
                self.assertIn("BAD_REQUEST", fault.faultString)
            for name in BAD_NAMES:
                if "\x00" in name:
                    continue  # XML 1.0 cannot carry NUL: see test_malformed_requests
                self.assert_fault(bad, "updatefile", name, 1, [HASH])
                self.assert_fault(bad, "tester_getversion", name)
            for version in BAD_VERSIONS:
                self.assert_fault(bad, "updatefile", "keep.txt", version, [HASH])
            self.assert_fault(bad, "tester_getversion", 5)
            # SurfStore's answer to a stale version is False, not a fault.
            self.assertIs(self.rpc.updatefile("keep.txt", 2, [HASH]), False)
            self.node.assert_unharmed("after wrong XML-RPC arguments")
            self.assertIn("BAD_REQUEST", self.node.cluster.nodes[0].log_text())

    def test_oversize_hashlist(self) -> None:
        with self.node.cluster.logs_on_failure():
            fault = self.assert_fault(
                ErrorCode.BAD_REQUEST, "updatefile", "big.bin", 1, [HASH] * (MAX_HASHLIST + 1)
            )
            self.assertIn(str(MAX_HASHLIST), fault.faultString)
            self.node.assert_unharmed("after an oversize XML-RPC hashlist")

    def test_unknown_methods_wrong_arity_and_forbidden_chaos(self) -> None:
        with self.node.cluster.logs_on_failure():
            for method in ["nosuch", "updateFile", "getblock"]:
                with self.assertRaises(xmlrpc.client.Fault) as caught:
                    getattr(self.rpc, method)()
                self.assertIn("not found", caught.exception.faultString.lower())
            with self.assertRaises(xmlrpc.client.Fault):
                procs.xmlrpc_proxy(self.node.address).nosuch.ping()
            # A wrong argument count is the caller's mistake, said clearly.
            for args in [(), ("a.txt",), ("a.txt", 1), ("a.txt", 1, [HASH], "extra")]:
                fault = self.assert_fault(ErrorCode.BAD_REQUEST, "updatefile", *args)
                self.assertIn("argument", fault.faultString)
            self.assert_fault(ErrorCode.BAD_REQUEST, "getfileinfomap", "extra")
            self.assert_fault(ErrorCode.BAD_REQUEST, "isLeader", 1, 2)
            for method in ["crash", "restore", "setLeader"]:
                fault = self.assert_fault(ErrorCode.FORBIDDEN, method)
                self.assertIn("chaos", fault.faultString)
            self.assertIs(self.rpc.isCrashed(), False)
            self.assertIs(self.rpc.isLeader(), True)
            self.node.assert_unharmed("after unknown methods and chaos calls")
            log = self.node.cluster.nodes[0].log_text()
            self.assertIn("chaos calls are disabled", log)
            self.assertIn("refused nosuch", log)
            self.assertIn("refused surfstore.updatefile", log)
            self.assertNotIn("Traceback", log)

    def test_malformed_requests(self) -> None:
        """What xmlrpc.client would never send: broken XML, a NUL in a name,
        an integer too large for XML-RPC, a body over the size limit."""
        with self.node.cluster.logs_on_failure():
            call = "<?xml version='1.0'?><methodCall><methodName>surfstore.updatefile</methodName><params>{}</params></methodCall>"
            param = "<param><value>{}</value></param>"
            hashes = "<array><data><value><string>" + HASH + "</string></value></data></array>"
            for body in [
                b"this is not xml",
                b"<?xml version='1.0'?><methodCall><methodName>surfstore.ping",
                call.format(
                    param.format("<string>a&#0;b</string>")
                    + param.format("<int>1</int>")
                    + param.format(hashes)
                ).encode(),
                call.format(
                    param.format("<string>a\x00b</string>")
                    + param.format("<int>1</int>")
                    + param.format(hashes)
                ).encode(),
                call.format(
                    param.format("<string>new.txt</string>")
                    + param.format("<int>99999999999999999999999</int>")
                    + param.format(hashes)
                ).encode(),
            ]:
                status, reply = self.post(body)
                # Either an HTTP-level refusal or a fault: never a success, never a hang.
                if status == 200:
                    self.assertIn(b"<fault>", reply, body)
                else:
                    self.assertGreaterEqual(status, 400, body)
            status, _ = self.post_oversize()
            self.assertEqual(status, 413)
            self.node.assert_unharmed("after malformed XML-RPC requests")

    def post_oversize(self) -> tuple[int, bytes]:
        """A body declared over the 16 MiB limit is refused before it is
        read: the node answers 413 and closes (a client still sending the
        body then sees the connection closed), so only the headers go."""
        host, port = procs_addr(self.node.address)
        with socket.create_connection((host, port), timeout=30.0) as sock:
            sock.sendall(
                b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
                b"Content-Length: %d\r\n\r\n" % (17 * 1024 * 1024)
            )
            reply = b""
            while True:  # bounded: the node closes the connection (30 s socket timeout)
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
        return status, reply


class _Drop:
    """Marks an argument to leave out of a request."""


_DROP: Any = _Drop()


def procs_addr(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)
