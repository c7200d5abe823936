"""RFC 6455 conformance of a shard, byte by byte over raw TCP sockets.

Each case is the bytes a client sends once its connection is open, and what
RFC 6455 says must follow: the connection is failed with an exact close code
(`VIOLATIONS`), a close frame is echoed (`VALID_CLOSES`), or the messages are
echoed and the connection stays open (`ACCEPTED`).  For a failed connection
the test also checks that the TCP connection then ends, that the server
reports the peer gone (``client_disconnected(id, false)``), that nothing the
peer sent is delivered, and that another peer of the same shard (one shard
here) still echoes.

Every case goes through each way its bytes can reach the shard (`PATHS`),
because the shard's wire (``shards/wire.py``) has two receive paths that must agree: its
own parser for whole masked text/binary frames (the fast path, on while
websockets holds no unparsed bytes) and websockets' Sans-I/O parser for
everything else and every byte after it; and two handshake paths (its own
101 for plain requests, websockets' for the rest).  The paths: the bytes
alone once the connection is open (the fast path sees them first), one byte
per write, behind a ping in the same write (websockets parses them), and,
for each handshake path, in the same packet as the upgrade request or after
the 101.

One server (``shards=1``, messages up to `MAX_MESSAGE`) serves the module;
each test opens its own connections and checks the shard process is the one
it started with.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from wsfleet import Error, WebSocketServer
from wsfleet.loadtest.wsclient import apply_mask, build_frame, close_payload

from .wsframes import BINARY, CLOSE, CONT, PING, PONG, TEXT, read_frame
from .wsserver import run_with, until

pytestmark = pytest.mark.timeout(30)

MAX_MESSAGE = 1024  # set_buffers(1, ...): the in-buffer of 1 KiB is the message size limit
STEP = 5.0  # seconds any one read may take before the test calls it a hang
SLOW_PING = b"slow path"  # the ping that puts the bytes behind it on websockets' path


# -- frames a client could send --------------------------------------------------------------

# One masking key for every frame, so that the bytes at each split point are the same on
# every run (tests/test_fuzz.py varies the keys).
MASK = b"\x5a\x1c\x37\x6e"


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame masked with `MASK`; ``rsv`` is OR-ed into the first byte."""
    return build_frame(opcode | rsv, payload, fin=fin, mask=MASK)


AFTER = frame(TEXT, b"after the failure")  # sent behind every violation: never delivered


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason)


def long_header_frame(first: int, length: int, payload: bytes) -> bytes:
    """A masked frame whose header carries ``length`` in the 64-bit form, whatever it says."""
    return struct.pack("!BBQ", first, 0x80 | 127, length) + MASK + apply_mask(payload, MASK)


# -- the tables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """Bytes that must fail the connection with a close frame of one of ``codes``."""

    rfc: str  # the section of RFC 6455 that the bytes break
    stream: bytes
    codes: tuple[int, ...]
    delivered: tuple[bytes, ...] = ()  # the messages before the violation


PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = (1002,), (1007,), (1009,)
INVALID_CLOSE_CODES = (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)

VIOLATIONS: dict[str, Violation] = {
    # 5.1: "The server MUST close the connection upon receiving a frame that is not masked."
    "unmasked binary": Violation("5.1", b"\x82\x03abc", PROTOCOL_ERROR),
    "unmasked text": Violation("5.1", b"\x81\x02hi", PROTOCOL_ERROR),
    "unmasked ping": Violation("5.1", b"\x89\x00", PROTOCOL_ERROR),
    # 5.2: RSV1-3 "MUST be 0 unless an extension is negotiated" (none is).
    "RSV1 on text": Violation("5.2", frame(TEXT, b"x", rsv=0x40), PROTOCOL_ERROR),
    "RSV2 on binary": Violation("5.2", frame(BINARY, b"x", rsv=0x20), PROTOCOL_ERROR),
    "RSV3 on binary": Violation("5.2", frame(BINARY, b"x", rsv=0x10), PROTOCOL_ERROR),
    "RSV1 on ping": Violation("5.2", frame(PING, b"x", rsv=0x40), PROTOCOL_ERROR),
    "RSV on a continuation": Violation(
        "5.2", frame(TEXT, b"a", fin=False) + frame(CONT, b"b", rsv=0x20), PROTOCOL_ERROR
    ),
    # 5.2: an unknown opcode "MUST _Fail the WebSocket Connection_".
    **{
        f"reserved data opcode {op:#x}": Violation("5.2", frame(op, b"x"), PROTOCOL_ERROR)
        for op in range(0x3, 0x8)
    },
    **{
        f"reserved control opcode {op:#x}": Violation("5.2", frame(op, b"x"), PROTOCOL_ERROR)
        for op in range(0xB, 0x10)
    },
    # 5.5: "All control frames MUST have a payload length of 125 bytes or less and MUST
    # NOT be fragmented."
    "fragmented ping": Violation("5.5", frame(PING, b"x", fin=False), PROTOCOL_ERROR),
    "fragmented pong": Violation("5.5", frame(PONG, b"x", fin=False), PROTOCOL_ERROR),
    "fragmented close": Violation(
        "5.5", frame(CLOSE, close_payload(1000), fin=False), PROTOCOL_ERROR
    ),
    "ping of 126 bytes": Violation("5.5", frame(PING, bytes(126)), PROTOCOL_ERROR),
    "pong of 126 bytes": Violation("5.5", frame(PONG, bytes(126)), PROTOCOL_ERROR),
    "close of 126 bytes": Violation("5.5", close_frame(1000, b"r" * 124), PROTOCOL_ERROR),
    # 5.5.1: a close body starts with a 2-byte code; 7.4.1/7.4.2: codes a peer may send.
    "close with a 1-byte body": Violation("5.5.1", frame(CLOSE, b"\x03"), PROTOCOL_ERROR),
    **{
        f"close code {code}": Violation("7.4", close_frame(code), PROTOCOL_ERROR)
        for code in INVALID_CLOSE_CODES
    },
    # 5.5.1: the close reason is UTF-8; 8.1: invalid UTF-8 fails the connection (1007).
    "close reason not UTF-8": Violation("5.5.1, 8.1", close_frame(1000, b"\xff"), INVALID_DATA),
    "close reason cut in a codepoint": Violation(
        "5.5.1, 8.1", close_frame(1000, "ok€".encode()[:-1]), INVALID_DATA
    ),
    # 5.4: fragments and continuation frames.
    "continuation with no message started": Violation("5.4", frame(CONT, b"x"), PROTOCOL_ERROR),
    "unfinished continuation with no message": Violation(
        "5.4", frame(CONT, b"x", fin=False), PROTOCOL_ERROR
    ),
    "text frame inside a fragmented message": Violation(
        "5.4", frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), PROTOCOL_ERROR
    ),
    "binary fragment inside a fragmented message": Violation(
        "5.4", frame(BINARY, b"a", fin=False) + frame(BINARY, b"b", fin=False), PROTOCOL_ERROR
    ),
    "continuation after the message ended": Violation(
        "5.4",
        frame(TEXT, b"a", fin=False) + frame(CONT, b"b") + frame(CONT, b"c"),
        PROTOCOL_ERROR,
        (b"ab",),
    ),
    "continuation after a whole message": Violation(
        "5.4", frame(BINARY, b"whole") + frame(CONT, b"c"), PROTOCOL_ERROR, (b"whole",)
    ),
    # 8.1 (and RFC 3629): text messages must be valid UTF-8 -> 1007.
    "text 0xff": Violation("8.1", frame(TEXT, b"\xff\xfe"), INVALID_DATA),
    "text with an overlong NUL": Violation("8.1", frame(TEXT, b"a\xc0\x80"), INVALID_DATA),
    "text with a UTF-16 surrogate": Violation("8.1", frame(TEXT, b"\xed\xa0\x80"), INVALID_DATA),
    "text above U+10FFFF": Violation("8.1", frame(TEXT, b"\xf4\x90\x80\x80"), INVALID_DATA),
    "text ending inside a codepoint": Violation("8.1", frame(TEXT, b"caf\xc3"), INVALID_DATA),
    "text of 300 bytes, the last invalid": Violation(
        "8.1", frame(TEXT, b"a" * 299 + b"\x80"), INVALID_DATA
    ),
    # 7.1.7: once failing, "MUST NOT continue to attempt to process data": a close or a
    # ping right behind the invalid message changes nothing (no echo 1000, no pong).
    "invalid text, then a close frame": Violation(
        "8.1, 7.1.7", frame(TEXT, b"\xff") + close_frame(1000), INVALID_DATA
    ),
    "invalid text, then a ping": Violation(
        "8.1, 7.1.7", frame(TEXT, b"\xc3") + frame(PING, b"no pong"), INVALID_DATA
    ),
    "invalid fragmented text, then a close frame": Violation(
        "8.1, 7.1.7",
        frame(TEXT, b"a", fin=False) + frame(CONT, b"\xff") + close_frame(1000),
        INVALID_DATA,
    ),
    "fragmented text, invalid in the first fragment": Violation(
        "8.1", frame(TEXT, b"\xff", fin=False) + frame(CONT, b"ok"), INVALID_DATA
    ),
    "fragmented text, invalid in the last fragment": Violation(
        "8.1", frame(TEXT, b"ok", fin=False) + frame(CONT, b"\xc3"), INVALID_DATA
    ),
    "fragmented text, codepoint never completed": Violation(
        "8.1", frame(TEXT, b"\xe2\x82", fin=False) + frame(CONT, b"x"), INVALID_DATA
    ),
    "fragmented text, empty last fragment after a cut codepoint": Violation(
        "8.1", frame(TEXT, b"\xf0\x9f\x98", fin=False) + frame(CONT, b""), INVALID_DATA
    ),
    # 7.4.1: 1009 for a message too big to process (the server's limit).
    "binary one byte over the limit": Violation(
        "7.4.1", frame(BINARY, bytes(MAX_MESSAGE + 1)), TOO_BIG
    ),
    "text one byte over the limit": Violation(
        "7.4.1", frame(TEXT, b"t" * (MAX_MESSAGE + 1)), TOO_BIG
    ),
    "64-bit length over the limit": Violation("7.4.1", frame(BINARY, bytes(70_000)), TOO_BIG),
    "fragments adding up to one byte over the limit": Violation(
        "7.4.1",
        frame(BINARY, bytes(512), fin=False) + frame(CONT, bytes(MAX_MESSAGE - 511)),
        TOO_BIG,
    ),
    # 5.2: "the most significant bit MUST be 0" in a 64-bit length.
    "64-bit length with the MSB set": Violation(
        "5.2", long_header_frame(0x82, (1 << 63) | 5, b"hello"), (1002, 1009)
    ),
}


@dataclass(frozen=True)
class Accepted:
    """Bytes that are valid: ``echoes`` come back as (opcode, payload), pings get pongs."""

    rfc: str
    stream: bytes
    echoes: tuple[tuple[int, bytes], ...]
    pongs: tuple[bytes, ...] = ()


EURO, GRIN = "€".encode(), "😀".encode()

ACCEPTED: dict[str, Accepted] = {
    # 5.6 / 8.1: UTF-8 is checked on the whole message; a codepoint may straddle fragments.
    "codepoint split across two fragments": Accepted(
        "5.4, 8.1",
        frame(TEXT, b"x" + EURO[:2], fin=False) + frame(CONT, EURO[2:]),
        ((TEXT, b"x" + EURO),),
    ),
    "4-byte codepoint over three fragments": Accepted(
        "5.4, 8.1",
        frame(TEXT, GRIN[:1], fin=False)
        + frame(CONT, GRIN[1:3], fin=False)
        + frame(CONT, GRIN[3:]),
        ((TEXT, GRIN),),
    ),  # fmt: skip
    "codepoints at the edges of the range": Accepted(
        "8.1",
        frame(TEXT, "\x00\x7f\x80\u07ff\u0800\ufffd\uffff\U00010000\U0010ffff".encode()),
        ((TEXT, "\x00\x7f\x80\u07ff\u0800\ufffd\uffff\U00010000\U0010ffff".encode()),),
    ),
    # 5.4: "Control frames MAY be injected in the middle of a fragmented message."
    "ping between fragments": Accepted(
        "5.4, 5.5.2",
        frame(TEXT, b"frag", fin=False) + frame(PING, b"mid") + frame(CONT, b"ment"),
        ((TEXT, b"fragment"),),
        (b"mid",),
    ),
    "ping and pong between three fragments": Accepted(
        "5.4, 5.5.3",
        frame(BINARY, b"a", fin=False)
        + frame(PONG, b"unsolicited")
        + frame(CONT, b"b", fin=False)
        + frame(PING, b"")
        + frame(CONT, b"c"),
        ((BINARY, b"abc"),),
        (b"",),
    ),  # fmt: skip
    "empty fragments": Accepted(
        "5.4",
        frame(TEXT, b"", fin=False) + frame(CONT, b"", fin=False) + frame(CONT, b""),
        ((TEXT, b""),),
    ),
    "empty text and binary frames": Accepted(
        "5.6", frame(TEXT) + frame(BINARY), ((TEXT, b""), (BINARY, b""))
    ),
    # 5.5.2: a pong carries the ping's application data, up to 125 bytes.
    "ping of 125 bytes": Accepted(
        "5.5.2", frame(PING, bytes(range(125))), (), (bytes(range(125)),)
    ),
    "message of exactly the limit": Accepted(
        "7.4.1", frame(BINARY, b"m" * MAX_MESSAGE), ((BINARY, b"m" * MAX_MESSAGE),)
    ),
    "fragments adding up to exactly the limit": Accepted(
        "7.4.1",
        frame(TEXT, b"f" * 512, fin=False) + frame(CONT, b"g" * (MAX_MESSAGE - 512)),
        ((TEXT, b"f" * 512 + b"g" * (MAX_MESSAGE - 512)),),
    ),
    "a whole message after a fragmented one": Accepted(
        "5.4",
        frame(TEXT, b"1", fin=False) + frame(CONT, b"2") + frame(BINARY, b"3"),
        ((TEXT, b"12"), (BINARY, b"3")),
    ),
}

# 7.4.1/7.4.2: codes a client may send (1000-1003, 1007-1014, 3000-4999); the server
# echoes the close body (5.5.1) and reports (code, reason) in client_close_request.
VALID_CLOSES: dict[str, tuple[int | None, str]] = {
    "1000": (1000, ""),
    "1000 with a reason": (1000, "bye"),
    "1001": (1001, "going away"),
    "1002": (1002, ""),
    "1003": (1003, ""),
    "1007": (1007, ""),
    "1008": (1008, ""),
    "1009": (1009, ""),
    "1010": (1010, ""),
    "1011": (1011, ""),
    "1012": (1012, ""),
    "1013": (1013, ""),
    "1014": (1014, ""),
    "3000": (3000, "registered"),
    "3999": (3999, ""),
    "4000": (4000, "private"),
    "4999 with a UTF-8 reason": (4999, "fin ✓"),
    "1000 with a 123-byte reason": (1000, "r" * 123),
    "empty body (1005 to the application)": (None, ""),
}


# -- how the bytes reach the shard -----------------------------------------------------------


def upgrade_request(port: int, *extra: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /conformance HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Conn:
    """A client's TCP connection, read and written on the raw socket.

    Unlike asyncio's streams, what the server sent before a reset stays readable
    after a failed write (the server may fail the connection while we still send).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.port = sock.getsockname()[1]

    @classmethod
    async def connect(cls, port: int) -> Conn:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    @classmethod
    async def upgraded(cls, port: int, stream: bytes = b"", *extra: str) -> tuple[Conn, bytes]:
        """The upgrade request and ``stream`` in one write; the connection and the 101's head."""
        conn = await cls.connect(port)
        await conn.write(upgrade_request(port, *extra) + stream)
        head = await conn.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        return conn, head

    async def write(self, data: bytes) -> bool:
        """False if the server has already closed the connection."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    async def _more(self) -> bytes:
        chunk = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 65536), STEP)
        self.buffer += chunk
        return chunk

    async def readexactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self._more():
                raise asyncio.IncompleteReadError(self.buffer, n)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def readuntil(self, separator: bytes) -> bytes:
        while separator not in self.buffer:
            if not await self._more():
                raise asyncio.IncompleteReadError(self.buffer, None)
        end = self.buffer.index(separator) + len(separator)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    async def read_to_end(self) -> bytes:
        """Everything until the server ends the connection (FIN or reset)."""
        try:
            while await self._more():
                pass
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: TCP resets
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


Opened = tuple[Conn, tuple[bytes, ...]]


async def fast(port: int, stream: bytes) -> Opened:
    """Open, then ``stream`` in one write: the shard's parser sees it first."""
    conn, _ = await Conn.upgraded(port)
    await conn.write(stream)
    return conn, ()


async def bytewise(port: int, stream: bytes) -> Opened:
    """Open, then ``stream`` one byte per write: frames cut at every offset."""
    conn, _ = await Conn.upgraded(port)
    for i in range(len(stream)):
        if not await conn.write(stream[i : i + 1]):
            break  # the server failed the connection before the last byte
    return conn, ()


async def behind_a_ping(port: int, stream: bytes) -> Opened:
    """Open, then a ping and ``stream`` in one write: websockets parses all of it."""
    conn, _ = await Conn.upgraded(port)
    await conn.write(frame(PING, SLOW_PING) + stream)
    return conn, (SLOW_PING,)


async def in_the_request(port: int, stream: bytes) -> Opened:
    """A plain request (answered by the shard) with ``stream`` in the same packet."""
    conn, head = await Conn.upgraded(port, stream)
    assert b"\r\nDate:" not in head, "expected the shard's own 101"
    return conn, ()


async def after_websockets_handshake(port: int, stream: bytes) -> Opened:
    """A request websockets answers (it has a repeated header), then ``stream`` in one write."""
    conn, head = await Conn.upgraded(port, b"", *REPEATED_HEADER)
    assert b"\r\nDate:" in head, "expected websockets' 101"
    await conn.write(stream)
    return conn, ()


async def in_a_request_for_websockets(port: int, stream: bytes) -> Opened:
    """A request websockets answers with ``stream`` in the same packet: it must parse the
    request only, and the frames as frames once the connection is open."""
    conn, head = await Conn.upgraded(port, stream, *REPEATED_HEADER)
    assert b"\r\nDate:" in head, "expected websockets' 101"
    return conn, ()


REPEATED_HEADER = ("Cache-Control: no-cache", "Cache-Control: no-store")  # not the shard's to parse


PATHS: dict[str, Callable[[int, bytes], Awaitable[Opened]]] = {
    "fast": fast,
    "bytewise": bytewise,
    "behind-ping": behind_a_ping,
    "in-request": in_the_request,
    "websockets-handshake": after_websockets_handshake,
    "in-request-for-websockets": in_a_request_for_websockets,
}


# -- the server and what it reports ------------------------------------------------------------


class Conformance:
    """The module's server: an echo application that records what each peer did."""

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.ids_by_port: dict[int, int] = {}
        self.events: list[tuple[Any, ...]] = []
        self.packets: dict[int, list[tuple[bytes, bool]]] = {}
        server.connect("client_connected", self._connected)
        server.connect("client_disconnected", lambda i, c: self.events.append(("gone", i, c)))
        server.connect(
            "client_close_request", lambda i, c, r: self.events.append(("close", i, c, r))
        )
        server.connect("data_received", self._echo)
        server.connect("shard_failed", lambda i, why: self.events.append(("shard_failed", i, why)))
        self.shard_pid = 0

    def _connected(self, peer_id: int, protocol: str) -> None:
        self.ids_by_port[self.server.get_peer_port(peer_id)] = peer_id
        self.events.append(("connected", peer_id))

    def _echo(self, peer_id: int) -> None:
        peer = self.server.get_peer(peer_id)
        packet = peer.get_packet()
        text = peer.was_string_packet()
        self.packets.setdefault(peer_id, []).append((packet, text))
        peer.set_write_mode(peer.WRITE_MODE_TEXT if text else peer.WRITE_MODE_BINARY)
        assert peer.put_packet(packet) == Error.OK

    async def peer_id(self, conn: Conn) -> int:
        await until(lambda: conn.port in self.ids_by_port, STEP)
        return self.ids_by_port[conn.port]

    def of(self, peer_id: int) -> list[tuple[Any, ...]]:
        """What the server reported about one peer, after its connection."""
        return [e for e in self.events if e[0] != "connected" and e[1] == peer_id]

    def run(self, body: Callable[[], Awaitable[Any]]) -> Any:
        self.ids_by_port.clear()  # ports are reused between tests; ids are not
        result = run_with(self.server, body, timeout=25)
        status = self.server.get_shard_status()
        assert [(s["pid"], s["state"]) for s in status] == [(self.shard_pid, "running")]
        assert [e for e in self.events if e[0] == "shard_failed"] == []
        return result


@pytest.fixture(scope="module")
def conformance() -> Iterator[Conformance]:
    server = WebSocketServer(shards=1)
    assert server.set_buffers(MAX_MESSAGE // 1024, 1024, 64, 1024) == Error.OK
    assert server.listen(0) == Error.OK
    try:
        checker = Conformance(server)

        async def started() -> None:
            await until(lambda: server.get_shard_status()[0]["pid"], 10)

        run_with(server, started)
        checker.shard_pid = server.get_shard_status()[0]["pid"]
        yield checker
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_errors(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture) -> Iterator[None]:
    """Neither the front (log, loop callbacks) nor the supervisor (stderr) reports a fault."""
    with caplog.at_level(logging.WARNING):
        yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    err = capfd.readouterr().err
    assert "Traceback" not in err and not re.search(r" shard \d+: ", err), err  # a shard's line


# -- reading what the server sends -----------------------------------------------------------


@dataclass
class Received:
    data: list[tuple[int, bytes]]
    pongs: list[bytes]
    close: bytes | None  # the close frame's body


async def read_until_close(conn: Conn, data_frames: int = -1) -> Received:
    """Frames until a close frame (or ``data_frames`` data frames, if not -1)."""
    got = Received([], [], None)
    while len(got.data) != data_frames:
        opcode, payload = await read_frame(conn)  # type: ignore[arg-type]
        if opcode == CLOSE:
            got.close = payload
            break
        if opcode == PONG:
            got.pongs.append(payload)
        else:
            assert opcode in (TEXT, BINARY), f"unexpected frame {opcode:#x} {payload!r}"
            got.data.append((opcode, payload))
    return got


async def assert_tcp_ends(conn: Conn) -> None:
    """The server closes the TCP connection after its close frame (RFC 6455 7.1.1)."""
    rest = await conn.read_to_end()
    assert rest == b"", f"bytes after the close frame: {rest!r}"
    conn.close()


def close_code(body: bytes) -> int:
    """The code of a close frame the server sent, which must be well-formed itself."""
    assert 2 <= len(body) <= 125, f"a close frame without a code: {body!r}"
    body[2:].decode()  # 5.5.1: the reason is UTF-8 (raises if not)
    return struct.unpack("!H", body[:2])[0]


async def bystander_echoes(bystander: Conn) -> None:
    """The other peer of the shard still has its messages echoed, in order."""
    for i in range(3):
        await bystander.write(frame(BINARY, b"still here %d" % i))
    for i in range(3):
        assert await read_frame(bystander) == (BINARY, b"still here %d" % i)  # type: ignore[arg-type]
    bystander.close()


# -- the tests -------------------------------------------------------------------------------


def table(cases: dict[str, Any]) -> list[Any]:
    return [pytest.param(case, path, id=f"{name}-{path}") for name, case in cases.items()
            for path in PATHS]  # fmt: skip


@pytest.mark.parametrize(("case", "path"), table(VIOLATIONS))
def test_a_violation_fails_that_connection_only(conformance, case: Violation, path: str) -> None:
    """The close code the RFC names, the end of TCP, the peer reported gone, nothing
    delivered, and the shard's other peer unaffected (RFC 6455 7.1.7)."""

    async def body() -> int:
        bystander, _ = await Conn.upgraded(conformance.server.port)
        conn, pongs = await PATHS[path](conformance.server.port, case.stream + AFTER)
        got = await read_until_close(conn)
        assert got.close is not None
        assert close_code(got.close) in case.codes, got.close
        # An echo may lose the race with the close frame; none may come from after it.
        assert [data for _, data in got.data] == list(case.delivered[: len(got.data)])
        assert got.pongs == list(pongs)
        peer_id = await conformance.peer_id(conn)
        await assert_tcp_ends(conn)
        await until(lambda: conformance.of(peer_id), STEP)
        await bystander_echoes(bystander)
        return peer_id

    peer_id = conformance.run(body)
    assert conformance.of(peer_id) == [("gone", peer_id, False)]
    assert [data for data, _ in conformance.packets.get(peer_id, [])] == list(case.delivered)


@pytest.mark.parametrize(("case", "path"), table(ACCEPTED))
def test_valid_frames_are_echoed_and_the_connection_stays_open(
    conformance, case: Accepted, path: str
) -> None:
    """Each message echoed once, in order; each ping answered; then a clean close."""

    async def body() -> int:
        conn, pongs = await PATHS[path](conformance.server.port, case.stream)
        got = await read_until_close(conn, data_frames=len(case.echoes))
        assert got.close is None, got.close
        assert got.data == list(case.echoes)
        await conn.write(close_frame(1000))
        rest = await read_until_close(conn)
        assert rest.data == []
        assert got.pongs + rest.pongs == list(pongs + case.pongs)
        assert rest.close == struct.pack("!H", 1000)
        peer_id = await conformance.peer_id(conn)
        await assert_tcp_ends(conn)
        await until(lambda: ("gone", peer_id, True) in conformance.events, STEP)
        return peer_id

    peer_id = conformance.run(body)
    assert conformance.of(peer_id) == [("close", peer_id, 1000, ""), ("gone", peer_id, True)]
    delivered = [
        (TEXT if text else BINARY, data) for data, text in conformance.packets.get(peer_id, [])
    ]
    assert delivered == list(case.echoes)


@pytest.mark.parametrize(("case", "path"), table(VALID_CLOSES))
def test_a_valid_close_is_echoed_and_reported(conformance, case, path: str) -> None:
    """5.5.1: the close body comes back as sent; the application gets its code and reason
    (1005 for an empty body, 7.1.5) and a clean disconnection."""
    code, reason = case
    body_sent = close_payload(code, reason)

    async def body() -> int:
        conn, pongs = await PATHS[path](conformance.server.port, frame(CLOSE, body_sent))
        got = await read_until_close(conn)
        assert (got.data, got.pongs, got.close) == ([], list(pongs), body_sent)
        peer_id = await conformance.peer_id(conn)
        await assert_tcp_ends(conn)
        await until(lambda: ("gone", peer_id, True) in conformance.events, STEP)
        return peer_id

    peer_id = conformance.run(body)
    reported = 1005 if code is None else code
    assert conformance.of(peer_id) == [
        ("close", peer_id, reported, reason),
        ("gone", peer_id, True),
    ]
