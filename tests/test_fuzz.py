"""Fuzzing one running server with hypothesis: mutated handshakes and frame sequences.

Each test starts one server (two shards, messages up to `MAX_MESSAGE`, the
subprotocol ``chat``) and a background thread that polls it from its own event
loop, echoes every message, and drives well-behaved peers on both shards that
keep sending sequence-numbered messages and check every echo, in order.  The
main thread then throws hypothesis' examples at the server over blocking
sockets, one connection per example, each with its own deadline (a hang is a
failure), and checks the outcome against a reference:

- handshakes against websockets' own ``ServerProtocol`` with the same
  subprotocol rule: a request it accepts must be accepted (same
  ``Sec-WebSocket-Accept``); any refusal must be its refusal (same status), or
  the shard's own 431 for a request over ``max_request_bytes``, or no answer
  where it gives none.  The shard's own parser may accept more (see
  ``shards/wire.py``), but a 101 must then carry the right accept key and
  the connection must work;
- frames after a valid handshake against websockets' frame parser plus
  wsfleet's UTF-8 rule: the same close code (and close body), the same pongs,
  no message it would not deliver, and, if the stream leaves the connection
  open at a frame boundary, every message echoed in order.

At the end: no shard was replaced (same pids, nothing on the supervisor's
stderr), the front logged no error and its loop raised nothing, and every
well-behaved peer got every echo in order.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import NegotiationError
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsfleet import Error, WebSocketServer
from wsfleet.aio import polling
from wsfleet.loadtest.wsclient import apply_mask, build_frame
from wsfleet.server import DEFAULT_MAX_REQUEST_BYTES

from .wsserver import until

MAX_MESSAGE = 1024
PROTOCOLS = ("chat",)
STEP = 5.0  # seconds one read may take before the example counts as a hang
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10
SERVER_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011}
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the server and its well-behaved peers ----------------------------------------------------


def echo(server: WebSocketServer, peer_id: int) -> None:
    peer = server.get_peer(peer_id)
    packet = peer.get_packet()
    peer.set_write_mode(
        peer.WRITE_MODE_TEXT if peer.was_string_packet() else peer.WRITE_MODE_BINARY
    )
    assert peer.put_packet(packet) == Error.OK


class Background(threading.Thread):
    """Polls the server from its own loop; peers on every shard chatter until `finish`."""

    def __init__(self, server: WebSocketServer, per_shard: int = 2) -> None:
        super().__init__(name="fuzz-background", daemon=True)
        self.server = server
        self.per_shard = per_shard
        self.ready = threading.Event()
        self.loop_errors: list[str] = []  # the loop's exceptions, and shard_failed signals
        self.failure: BaseException | None = None
        self.echoed: dict[int, int] = {}  # peer number -> messages echoed in order
        self.peer_count = 0
        self.pids: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by finish(), in the test's thread
            self.failure = exc
        finally:
            self.ready.set()

    def finish(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(30)
        assert not self.is_alive(), "the background loop did not stop"
        if self.failure is not None:
            raise self.failure

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(lambda _, ctx: self.loop_errors.append(str(ctx)))
        self._stopping = asyncio.Event()
        self.server.connect("data_received", lambda i: echo(self.server, i))
        self.server.connect("shard_failed", lambda i, why: self.loop_errors.append(f"{i}: {why}"))
        async with polling(self.server):
            await until(lambda: all(s["pid"] for s in self.server.get_shard_status()), 10)
            self.pids = [s["pid"] for s in self.server.get_shard_status()]
            peers = await self._peers_on_every_shard()
            self.peer_count = len(peers)
            chatters = [asyncio.create_task(self._chatter(k, ws)) for k, ws in enumerate(peers)]
            self.ready.set()
            await self._stopping.wait()
            await asyncio.gather(*chatters)  # each ends after its current round
            for ws in peers:
                await ws.close()

    async def _peers_on_every_shard(self) -> list[Any]:
        peers, shards = [], []
        url = f"ws://127.0.0.1:{self.server.port}/"
        while min(shards.count(s) for s in range(self.server.shards)) < self.per_shard:
            assert len(peers) < 24, f"24 peers and still not {self.per_shard} per shard: {shards}"
            ws = await connect(url, subprotocols=list(PROTOCOLS), compression=None,
                               ping_interval=None, max_size=None)  # fmt: skip
            peer_id = await self._peer_id_of(ws.local_address[1])
            peers.append(ws)
            shards.append(self.server.get_peer_shard(peer_id))
        return peers

    async def _peer_id_of(self, port: int) -> int:
        def find() -> int | None:
            server = self.server
            return next((i for i in server.get_peers() if server.get_peer_port(i) == port), None)

        await until(find, 5)
        return find()  # type: ignore[return-value]

    async def _chatter(self, k: int, ws: Any) -> None:
        """Rounds of 4 messages (text and binary) until told to stop; every echo must come
        back, in order."""
        assert self._stopping is not None
        n = 0
        while not self._stopping.is_set():
            batch = [f"peer {k} #{n + i}" for i in range(4)]
            messages: list[str | bytes] = [m if i % 2 else m.encode() for i, m in enumerate(batch)]
            for message in messages:
                await ws.send(message)
            for message in messages:
                got = await asyncio.wait_for(ws.recv(), 10)
                assert got == message, (k, got, message)
            n += 4
            self.echoed[k] = n
            await asyncio.sleep(0.005)


@pytest.fixture
def fuzzed(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> Iterator[WebSocketServer]:
    """A server under fuzz; afterwards, checks that only the fuzzed connections suffered."""
    server = WebSocketServer(shards=2)
    assert server.set_buffers(MAX_MESSAGE // 1024, 1024, 64, 1024) == Error.OK
    assert server.listen(0, PROTOCOLS) == Error.OK
    background = Background(server)
    try:
        with caplog.at_level(logging.WARNING):
            background.start()
            assert background.ready.wait(30) and background.failure is None, background.failure
            counts_before = dict(background.echoed)
            yield server
            background.finish()
        assert background.loop_errors == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        status = server.get_shard_status()
        assert [(s["pid"], s["state"]) for s in status] == [(p, "running") for p in background.pids]
        err = capfd.readouterr().err
        assert "Traceback" not in err and not re.search(r" shard \d+: ", err), err  # a shard's line
        # Every peer kept being echoed while the fuzzing ran.
        assert (
            len(background.echoed) == background.peer_count >= server.shards * background.per_shard
        )
        assert all(background.echoed[k] > counts_before.get(k, 0) for k in background.echoed)
    finally:
        if background.is_alive():
            background.finish()
        server.stop()


# -- a fuzzing client -------------------------------------------------------------------------


class Client:
    """One blocking connection; every read has a deadline, a hang fails the example."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.eof = False

    def send(self, data: bytes, splits: Sequence[int] = ()) -> None:
        """``data`` in pieces cut at ``splits``, a moment apart (so they arrive apart)."""
        cuts = sorted({s % len(data) for s in splits if data} - {0})
        for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
            try:
                self.sock.sendall(data[start:end])
            except (BrokenPipeError, ConnectionResetError):
                return  # the server already failed the connection
            if end != len(data):
                time.sleep(0.002)

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError(f"no answer in {STEP} s: {self.buffer[:200]!r}") from None
        self.buffer += chunk
        self.eof = not chunk
        return bool(chunk)

    def read_head(self) -> bytes | None:
        """The HTTP response head, or None if the server closed without one."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._more():
                assert self.buffer == b"", f"a partial HTTP response: {self.buffer!r}"
                return None
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def _exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not self._more():
                return None
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_frame(self) -> tuple[int, bytes] | None:
        """The next server frame (checked well-formed), or None at the end of the stream."""
        head = self._exactly(2)
        if head is None:
            assert self.buffer == b"", f"a partial frame: {self.buffer!r}"
            return None
        first, second = head
        assert first & 0x70 == 0 and first & 0x80, f"server frame header {head!r}"
        assert second & 0x80 == 0, "server frames are never masked"
        opcode, length = first & 0x0F, second & 0x7F
        assert opcode in (TEXT, BINARY, CLOSE, PING, PONG), f"opcode {opcode:#x}"
        if length == 126:
            (length,) = struct.unpack("!H", self._exactly(2) or b"\0\0")
        elif length == 127:
            (length,) = struct.unpack("!Q", self._exactly(8) or bytes(8))
        payload = self._exactly(length)
        assert payload is not None, "the stream ended inside a frame"
        return opcode, payload

    def read_to_end(self) -> bytes:
        while self._more():
            pass
        rest, self.buffer = self.buffer, b""
        return rest

    def close(self) -> None:
        self.sock.close()


@dataclass
class Received:
    data: list[tuple[int, bytes]] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    close: bytes | None = None


def read_frames(client: Client, until_data: int = -1) -> Received:
    """Frames until a close frame, the end of the stream, or ``until_data`` data frames."""
    got = Received()
    while len(got.data) != until_data:
        item = client.read_frame()
        if item is None:
            break
        opcode, payload = item
        if opcode == CLOSE:
            got.close = payload
            assert client.read_to_end() == b"", "bytes after the close frame"
            break
        if opcode == PONG:
            got.pongs.append(payload)
        else:
            got.data.append((opcode, payload))
    return got


def close_code(body: bytes) -> int:
    assert 2 <= len(body) <= 125, body
    body[2:].decode()
    return struct.unpack("!H", body[:2])[0]


def accept_of(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


# -- the reference ----------------------------------------------------------------------------


def godot_rule(_protocol: Any, offered: list[str]) -> str:
    """The shard's subprotocol rule: the first of the client's that the server lists."""
    for protocol in offered:
        if protocol in PROTOCOLS:
            return protocol
    raise NegotiationError("no common subprotocol")


def server_frames(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    """Parse what a reference ServerProtocol wrote (unmasked frames)."""
    data, out = b"".join(chunks), []
    while data:
        first, second = data[0], data[1] & 0x7F
        start = 2 + {126: 2, 127: 8}.get(second, 0)
        if second >= 126:
            second = int.from_bytes(data[2:start])
        out.append((first & 0x0F, data[start : start + second]))
        data = data[start + second :]
    return out


def frame_spans(stream: bytes) -> Iterator[tuple[int, list[int], int]]:
    """(start, the offsets inside the frame after its header, length and mask, end) of each
    frame; the last of those offsets is where its payload starts."""
    pos = 0
    while pos < len(stream):
        inner = [pos + 2]
        second = stream[pos + 1] if pos + 1 < len(stream) else 0
        length, head = second & 0x7F, 2
        if length >= 126:
            size = 2 if length == 126 else 8
            length = int.from_bytes(stream[pos + 2 : pos + 2 + size].ljust(size, b"\0"))
            head += size
            inner.append(pos + head)
        if second & 0x80:
            head += 4
            inner.append(pos + head)
        end = pos + head + length
        yield pos, inner, end
        pos = end


@dataclass
class Expected:
    messages: list[tuple[int, bytes]]  # what is delivered (and echoed), in order
    pongs: list[bytes]
    close: bytes | None  # the server's close frame body; None: the connection stays open
    idle: bool  # open, between frames, no fragmented message: a sentinel would be echoed


def expect(stream: bytes) -> Expected:
    """What the server must do with ``stream``: websockets' parser, frame by frame, plus
    the shard's rule that a text message must be UTF-8 (1007, and nothing after it)."""
    ws = ServerProtocol(state=State.OPEN, max_size=MAX_MESSAGE)
    messages: list[tuple[int, bytes]] = []
    pongs: list[bytes] = []
    parts: list[bytes] | None = None
    opcode = TEXT
    end = 0
    for start, _inner, end in frame_spans(stream):
        ws.receive_data(stream[start:end])
        for frame in ws.events_received():
            assert isinstance(frame, Frame)
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                parts, opcode = [frame.data], frame.opcode.value
            elif frame.opcode is Opcode.CONT:
                parts.append(frame.data)  # type: ignore[union-attr]
            else:
                continue
            if frame.fin:
                message, parts = b"".join(parts), None  # type: ignore[arg-type]
                if opcode == TEXT and not is_utf8(message):
                    body = struct.pack("!H", 1007) + b"invalid UTF-8 in a text message"
                    return Expected(messages, pongs, body, False)
                messages.append((opcode, message))
        close = None
        for kind, payload in server_frames(ws.data_to_send()):
            if kind == PONG:
                pongs.append(payload)
            elif kind == CLOSE:
                close = payload
        if ws.state is not State.OPEN:
            return Expected(messages, pongs, close, False)
    idle = end == len(stream) and parts is None
    return Expected(messages, pongs, None, idle)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


# -- the fuzzed frames ------------------------------------------------------------------------

UTF8_PIECES = ["€".encode()[:2], "€".encode()[2:], "😀".encode()[:3], b"\xff", b"\xc0\x80",
               b"\xed\xa0\x80", "ok ✓".encode()]  # fmt: skip
CLOSE_CODES = [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1011, 1015, 1016, 2999, 3000, 4999,
               5000, 0, 65535]  # fmt: skip
MASKS = st.binary(min_size=4, max_size=4)
PAYLOADS = st.one_of(
    st.text(max_size=16).map(str.encode),
    st.binary(max_size=16),
    st.lists(st.sampled_from(UTF8_PIECES), max_size=3).map(b"".join),  # often invalid UTF-8
    st.integers(MAX_MESSAGE - 2, MAX_MESSAGE + 2).map(lambda n: b"x" * n),  # the size limit
)


def encode(first: int, payload: bytes, mask: bytes | None, form: str = "minimal") -> bytes:
    """A client frame: ``first`` byte as given, the length in ``form``, masked unless None."""
    n, bit = len(payload), 0 if mask is None else 0x80
    if form == "64-bit":
        head = struct.pack("!BBQ", first, bit | 127, n)
    elif form == "16-bit" or n > 125:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = bytes((first, bit | n))
    return head + payload if mask is None else head + mask + apply_mask(payload, mask)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message as a client may send it: whole, or in up to 3 fragments with pings and
    pongs between them (RFC 6455 5.4); its text is not always UTF-8."""
    opcode = draw(st.sampled_from([TEXT, BINARY]))
    text = st.text(max_size=24).map(str.encode)
    payload = draw(st.one_of(text, text, PAYLOADS) if opcode == TEXT else PAYLOADS)
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=2)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    out = b""
    for i, piece in enumerate(pieces):
        if i:
            control = draw(st.sampled_from([None, PING, PONG]))
            if control is not None:
                out += encode(0x80 | control, draw(st.binary(max_size=8)), draw(MASKS))
        first = (0x80 if i == len(pieces) - 1 else 0) | (CONT if i else opcode)
        out += encode(
            first, piece, draw(MASKS), draw(st.sampled_from(["minimal"] * 6 + ["16-bit"]))
        )
    return out


@st.composite
def odd_frames(draw: st.DrawFn) -> bytes:
    """Any one frame: every opcode, fin, reserved bits, mask or none, any length form."""
    kind = draw(st.sampled_from(["data", "data", "ping", "pong", "close", "opcode"]))
    if kind == "close":
        code = draw(st.sampled_from(CLOSE_CODES))
        reason = draw(st.sampled_from([b"", b"bye", b"\xff", "✓".encode()]))
        payload = draw(st.sampled_from([struct.pack("!H", code) + reason, b"", b"\x03"]))
    elif kind in ("ping", "pong"):
        payload = draw(st.binary(max_size=130))
    else:
        payload = draw(PAYLOADS)
    opcode = {"ping": PING, "pong": PONG, "close": CLOSE}.get(kind)
    if opcode is None:
        opcode = draw(
            st.sampled_from([TEXT, BINARY, CONT]) if kind == "data" else st.integers(0, 15)
        )
    fin = draw(st.booleans()) if kind == "data" else draw(st.sampled_from([True] * 6 + [False]))
    rsv = draw(st.sampled_from([0] * 6 + [0x10, 0x20, 0x40]))
    mask = draw(st.sampled_from([True] * 6 + [False]).flatmap(lambda m: MASKS if m else st.none()))
    form = draw(st.sampled_from(["minimal"] * 6 + ["16-bit", "64-bit"]))
    return encode((0x80 if fin else 0) | rsv | opcode, payload, mask, form)


STREAMS = st.lists(st.one_of(messages(), messages(), messages(), odd_frames()), min_size=1,
                   max_size=6).map(b"".join)  # fmt: skip


MUTATIONS = st.one_of(st.just([]), st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
              st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1, max_size=2,
))  # fmt: skip


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    for how, where, value in mutations:
        if not data:
            break
        i = where % len(data)
        if how == "flip":
            data = data[:i] + bytes((data[i] ^ (1 << (value % 8)),)) + data[i + 1 :]
        elif how == "insert":
            data = data[:i] + bytes((value,)) + data[i:]
        elif how == "delete":
            data = data[:i] + data[i + 1 :]
        else:
            data = data[:i]
    return data


def upgrade_request(key: bytes, *extra: bytes) -> bytes:
    lines = [b"GET /fuzz HTTP/1.1", b"Host: 127.0.0.1", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key, b"Sec-WebSocket-Version: 13",
             *extra]  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.mark.timeout(120)
def test_fuzzed_frames_after_a_valid_handshake(fuzzed: WebSocketServer) -> None:
    port = fuzzed.port
    sentinel = build_frame(TEXT, b"sentinel")

    @FUZZ
    @given(
        stream=STREAMS,
        mutations=MUTATIONS,
        splits=st.lists(st.integers(0, 1 << 20), max_size=3),
        key=st.binary(min_size=16, max_size=16).map(base64.b64encode),
    )
    def example(stream: bytes, mutations: list, splits: list[int], key: bytes) -> None:
        stream = mutate(stream, mutations)
        assume(stream)
        expected = expect(stream)
        client = Client(port)
        try:
            client.send(upgrade_request(key, b"Sec-WebSocket-Protocol: chat"))
            head = client.read_head()
            assert head is not None and head.startswith(b"HTTP/1.1 101 "), head
            assert b"Sec-WebSocket-Accept: " + accept_of(key) + b"\r\n" in head
            client.send(stream, splits)
            if expected.idle:
                client.send(sentinel)
                got = read_frames(client, until_data=len(expected.messages) + 1)
                assert got.data == [*expected.messages, (TEXT, b"sentinel")]
                client.send(build_frame(CLOSE, struct.pack("!H", 1000)))
                rest = read_frames(client)
                assert rest.data == [] and rest.close == struct.pack("!H", 1000)
                assert got.pongs + rest.pongs == expected.pongs
                return
            if expected.close is None:
                client.half_close()  # the stream stops inside a frame or a message
            got = read_frames(client)
            assert client.eof or got.close is not None
            # Echoes race with the close frame (they come back through the front).
            assert got.data == expected.messages[: len(got.data)]
            assert got.pongs == expected.pongs
            if expected.close is not None:
                assert got.close == expected.close
            elif got.close is not None:
                assert close_code(got.close) in SERVER_CLOSE_CODES
        finally:
            client.close()

    example()


# -- the fuzzed handshakes --------------------------------------------------------------------

HEADER_VALUES = {
    b"Upgrade": [b"websocket", b"WebSocket", b"websocket, h2c", b"", b"http/2"],
    b"Connection": [b"Upgrade", b"keep-alive, Upgrade", b"close", b"upgrade", b""],
    b"Sec-WebSocket-Version": [b"13", b"8", b"", b"13, 8", b" 13", b"abc"],
    b"Sec-WebSocket-Protocol": [b"chat", b"", b",", b"other, chat", b"other", b"chat, chat"],
    b"Sec-WebSocket-Extensions": [b"permessage-deflate", b"x-unknown; a=1"],
    b"Host": [b"127.0.0.1", b""],
    b"Content-Length": [b"0", b"5"],
}


@st.composite
def handshakes(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(request, a frame sent in the same packet or b"")."""
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16)))
    if draw(st.integers(0, 14)) == 0:  # not 16 bytes in base64 (RFC 6455 4.2.1)
        key = draw(st.sampled_from([b"", b"short", b"!" * 24, key + b"==", key[:-4]]))
    headers = [
        [b"Host", b"127.0.0.1"],
        [b"Upgrade", b"websocket"],
        [b"Connection", b"Upgrade"],
        [b"Sec-WebSocket-Key", key],
        [b"Sec-WebSocket-Version", b"13"],
        [b"Sec-WebSocket-Protocol", b"chat"],
    ]
    for how, index in draw(st.lists(st.tuples(
        st.sampled_from(["drop", "repeat", "value", "case", "huge", "many"]), st.integers(0, 99)
    ), max_size=2)):  # fmt: skip
        header = headers[index % len(headers)]
        if how == "drop":
            headers.remove(header)
        elif how == "repeat":
            headers.append(list(header))
        elif how == "value":
            name = draw(st.sampled_from(sorted(HEADER_VALUES)))
            headers.append([name, draw(st.sampled_from(HEADER_VALUES[name]))])
        elif how == "case":
            header[0] = header[0].swapcase()
        elif how == "huge":
            headers.append([b"X-Pad", b"p" * draw(st.sampled_from([100, 8000, 8200, 20000]))])
        else:
            headers.extend([b"X-N%d" % i, b"1"] for i in range(draw(st.sampled_from([50, 130]))))
        if not headers:
            break
    method = draw(st.sampled_from([b"GET"] * 12 + [b"POST", b"get", b""]))
    target = draw(st.sampled_from([b"/fuzz"] * 4 + [b"/", b"", b"/a b", b"*"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 12 + [b"HTTP/1.0", b"HTTP/2", b""]))
    newline = draw(st.sampled_from([b"\r\n"] * 15 + [b"\n"]))
    lines = [b" ".join([method, target, version]), *(n + b": " + v for n, v in headers)]
    request = mutate(newline.join(lines) + newline + newline, draw(MUTATIONS))
    mask = draw(st.binary(min_size=4, max_size=4))
    tail = draw(st.sampled_from([b"", build_frame(TEXT, b"early", mask=mask)]))
    return request, tail


@dataclass
class Reference:
    status: bytes | None  # the status line websockets answers, None if it answers nothing
    accept: bytes | None  # its Sec-WebSocket-Accept when it answers 101
    done: bool  # it answered or closed: the request is complete for it


def reference(data: bytes) -> Reference:
    """websockets' answer to the request at the start of ``data`` (what follows its empty
    line is frames, read once the connection is open)."""
    end = data.find(b"\r\n\r\n")
    ws = ServerProtocol(select_subprotocol=godot_rule, max_size=MAX_MESSAGE)
    ws.receive_data(data if end < 0 else data[: end + 4])
    events = ws.events_received()
    if events:
        ws.send_response(ws.accept(events[0]))
    out = ws.data_to_send()
    answer = b"".join(out)
    if not answer.startswith(b"HTTP/1.1 "):
        return Reference(None, None, bool(out))
    status = answer.split(b"\r\n", 1)[0]
    accept = re.search(rb"\r\nSec-WebSocket-Accept: (\S+)\r\n", answer)
    return Reference(status, accept.group(1) if accept else None, True)


def over_the_limit(data: bytes) -> bool:
    """The shard answers 431 itself to a request over ``max_request_bytes``."""
    end = data.find(b"\r\n\r\n")
    return (
        end + 4 > DEFAULT_MAX_REQUEST_BYTES if end >= 0 else len(data) >= DEFAULT_MAX_REQUEST_BYTES
    )


def keys_in(request: bytes) -> set[bytes]:
    return set(re.findall(rb"(?im)^sec-websocket-key:[ \t]*(\S*)[ \t]*\r?$", request))


@pytest.mark.timeout(120)
def test_fuzzed_handshakes(fuzzed: WebSocketServer) -> None:
    port = fuzzed.port

    @FUZZ
    @given(handshake=handshakes(), splits=st.lists(st.integers(0, 1 << 20), max_size=3))
    def example(handshake: tuple[bytes, bytes], splits: list[int]) -> None:
        request, tail = handshake
        assume(request)
        ref = reference(request + tail)
        client = Client(port)
        try:
            client.send(request + tail, splits)
            if not ref.done or b"\r\n\r\n" not in request:
                # Unfinished for websockets, or for the shard's parser (which waits for an
                # empty line up to 8 KiB): the server must give up at the end of the stream.
                client.half_close()
            head = client.read_head()
            if head is None:
                # websockets may refuse a request before its end (too many headers); the
                # shard waits for the empty line, and gets the end of the stream instead.
                finished = b"\r\n\r\n" in request
                assert ref.status is None or not finished, f"websockets answers {ref.status!r}"
                return
            status = head.split(b"\r\n", 1)[0]
            assert re.fullmatch(rb"HTTP/1\.1 [1-5]\d\d [ -~]*", status), head
            if not status.startswith(b"HTTP/1.1 101 "):
                too_large = status.startswith(b"HTTP/1.1 431 ") and over_the_limit(request + tail)
                assert status == ref.status or too_large, head
                client.read_to_end()  # a body, then the end of the connection (no hang)
                return
            # 101: websockets' if it accepts, or the shard's for a request it reads leniently.
            accept = re.search(rb"\r\nSec-WebSocket-Accept: (\S+)\r\n", head)
            assert accept is not None, head
            assert accept.group(1) in {accept_of(k) for k in keys_in(request)}, head
            if ref.status is not None and ref.status.startswith(b"HTTP/1.1 101 "):
                assert accept.group(1) == ref.accept
            if ref.done and b"\r\n\r\n" in request:
                client.send(build_frame(CLOSE, struct.pack("!H", 1000)))
            got = read_frames(client)
            assert client.eof or got.close is not None
            assert got.data in ([], [(TEXT, b"early")]), got.data
            if got.close is not None:
                assert close_code(got.close) in SERVER_CLOSE_CODES
        finally:
            client.close()

    example()
