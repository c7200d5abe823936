"""The echo load generator counts what the server echoed, and its client parses frames right.

The first two tests run `wsfleet.loadtest.echo_bench.run_echo_load` against
the websockets baseline (``ws_server --port 0 --report-count``, a real
process on 127.0.0.1, conftest's `counting_server`, killed by pid at
teardown): the echoes the generator counts must be what the server echoed,
less those still in flight when the connections closed, with no errors. The
last two feed `wsclient.WSConnection` frames by hand through a fake transport:
every split of the stream across reads, many frames per read, 7/16/64-bit
lengths, fragments, ping, close, and the errors it must refuse.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from typing import Any

import pytest

from wsfleet.loadtest.echo_bench import payload_for, run_echo_load
from wsfleet.loadtest.wsclient import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    HandshakeError,
    WSConnection,
    accept_key,
    apply_mask,
)

from .conftest import CountingServer

HOST = "127.0.0.1"


@pytest.fixture
def echo_server(counting_server: Callable[..., CountingServer]) -> CountingServer:
    return counting_server("wsfleet.loadtest.ws_server", "--mode", "echo")


@pytest.mark.timeout(60)
def test_echoes_counted_equal_what_the_server_echoed(echo_server: CountingServer) -> None:
    connections, inflight = 8, 4
    result = run_echo_load(
        HOST,
        echo_server.port,
        connections=connections,
        inflight=inflight,
        size=100,
        seconds=1.0,
        warmup=0.3,
    )
    seen = echo_server.stop_and_count()
    server_received, server_echoed = seen["received"], seen["echoed"]

    assert result.errors == 0, result.error_samples
    assert result.mismatches == 0
    assert result.window_received > 0 and result.window_s > 0.9
    assert result.window_received <= result.received
    # Never more in flight than the window allows, and the server saw only what was sent.
    assert 0 <= result.sent - result.received <= connections * inflight
    assert server_echoed <= server_received <= result.sent
    # Echoes received = what the server echoed, less those still in flight at close...
    assert result.received <= server_echoed <= result.received + result.in_flight
    # ...and the generator drains before it closes, so nothing was left in flight.
    assert result.in_flight == 0
    assert result.received == server_echoed == result.sent


@pytest.mark.timeout(60)
def test_every_length_encoding_and_text_through_a_real_server(echo_server: CountingServer) -> None:
    """Payload lengths on both sides of the 7/16/64-bit boundaries, binary and text."""
    received = 0
    for size, text in [(0, False), (125, True), (126, False), (65535, True), (65536, False),
                       (200_000, True)]:  # fmt: skip
        result = run_echo_load(
            HOST,
            echo_server.port,
            connections=2,
            inflight=3,
            size=size,
            seconds=0.2,
            warmup=0.0,
            text=text,
        )
        assert result.errors == 0, (size, result.error_samples)
        assert result.received > 0 and result.in_flight == 0, size
        received += result.received
    assert received == echo_server.stop_and_count()["echoed"]


# -- the frame parser, fed by hand ----------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def server_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    return head + (mask + apply_mask(payload, mask) if mask else payload)


def parse_client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmask the client's frames (all must be masked and final)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert b1 & 0x80, "client frames must be masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        key, pos = data[pos : pos + 4], pos + 4
        frames.append((b0 & 0x0F, apply_mask(data[pos : pos + n], key)))
        pos += n
    return frames


class Recorder(WSConnection):
    def __init__(self) -> None:
        super().__init__(HOST, 1)
        self.messages: list[tuple[int, bytes]] = []
        self.pongs: list[bytes] = []
        self.transport_ = FakeTransport()
        self.connection_made(self.transport_)  # type: ignore[arg-type]

    def on_message(self, opcode: int, payload: bytes) -> None:
        assert type(payload) is bytes
        self.messages.append((opcode, payload))

    def on_pong(self, payload: bytes) -> None:
        self.pongs.append(payload)

    def handshake_response(self, key: str | None = None) -> bytes:
        accept = accept_key(self._key) if key is None else key
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()


def feed(conn: WSConnection, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in [*cuts, len(data)]:
        conn.data_received(data[last:cut])
        last = cut


def run_in_loop(fn: Any) -> None:
    async def main() -> None:
        fn()

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_parser_handles_every_split_and_every_length() -> None:
    messages = [
        (OP_BINARY, b""),
        (OP_TEXT, b"hello"),
        (OP_BINARY, payload_for(1, 125)),
        (OP_BINARY, payload_for(2, 126)),
        (OP_TEXT, payload_for(3, 65535)),
        (OP_BINARY, payload_for(4, 65536)),
        (OP_BINARY, os.urandom(70_000)),
    ]
    frames = b"".join(server_frame(op, p) for op, p in messages)
    # A fragmented message with a ping in the middle, then a pong.
    frames += server_frame(OP_TEXT, b"frag", fin=False) + server_frame(OP_PING, b"p1")
    frames += server_frame(OP_CONT, b"men", fin=False) + server_frame(OP_CONT, b"ted")
    frames += server_frame(OP_PONG, b"p2")
    expected = [*messages, (OP_TEXT, b"fragmented")]

    def check() -> None:
        small = b"".join(server_frame(op, p) for op, p in messages[:4])
        # Every single cut point of the handshake + small frames, then every pair of cuts
        # around the frame headers: each must give the same messages.
        for cut in range(1, len(small)):
            conn = Recorder()
            feed(conn, conn.handshake_response() + small, [cut])
            assert conn.messages == messages[:4], cut
        header_cuts = [0, 1, 2, 3, 4, 5, 9, 10, 11]
        starts = [0]
        for _, p in messages:
            starts.append(starts[-1] + len(server_frame(OP_BINARY, p)))
        for start in starts[:-1]:
            for a in header_cuts:
                for b in (a + 1, a + 7, a + 70_001):
                    conn = Recorder()
                    head = conn.handshake_response()
                    cuts = [c for c in (len(head) + start + a, len(head) + start + b) if c > 0]
                    feed(conn, head + frames, sorted(set(cuts)))
                    assert conn.messages == expected, (start, a, b)
        # Whole stream in one read, and byte by byte over the first 400 bytes.
        conn = Recorder()
        feed(conn, conn.handshake_response() + frames, [])
        assert conn.messages == expected and conn.pongs == [b"p2"]
        assert parse_client_frames(bytes(conn.transport_.written).split(b"\r\n\r\n", 1)[1]) == [
            (OP_PONG, b"p1")
        ]
        conn = Recorder()
        feed(conn, conn.handshake_response() + frames, list(range(1, 400)))
        assert conn.messages == expected

    run_in_loop(check)


@pytest.mark.timeout(60)
def test_client_refuses_bad_handshakes_and_bad_frames_and_closes_cleanly() -> None:
    def check() -> None:
        # A wrong Sec-WebSocket-Accept, and a non-101 status: the handshake fails.
        for response in (
            Recorder().handshake_response(key="bm90IHRoZSByaWdodCBrZXk="),
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        ):
            conn = Recorder()
            conn.data_received(response)
            assert conn.transport_.aborted and not conn.is_open
            assert isinstance(conn.opened.exception(), HandshakeError)

        # A masked frame from the server is a protocol error: close 1002 and abort.
        conn = Recorder()
        conn.data_received(conn.handshake_response())
        assert conn.is_open and conn.opened.done()
        conn.data_received(server_frame(OP_BINARY, b"abc", mask=b"\x01\x02\x03\x04"))
        assert conn.messages == [] and conn.transport_.aborted
        assert conn.error == "masked frame from the server"
        sent = parse_client_frames(bytes(conn.transport_.written).split(b"\r\n\r\n", 1)[1])
        assert sent[-1][0] == OP_CLOSE and sent[-1][1][:2] == struct.pack("!H", 1002)

        # The server closes: the client answers with the same code and closes TCP.
        conn = Recorder()
        conn.data_received(conn.handshake_response())
        conn.send(b"x" * 300)
        conn.send("text")
        conn.data_received(server_frame(OP_CLOSE, struct.pack("!H", 1001) + b"bye"))
        sent = parse_client_frames(bytes(conn.transport_.written).split(b"\r\n\r\n", 1)[1])
        assert sent == [
            (OP_BINARY, b"x" * 300),
            (OP_TEXT, b"text"),
            (OP_CLOSE, struct.pack("!H", 1001)),
        ]
        assert conn.transport_.closing and not conn.transport_.aborted
        conn.connection_lost(None)
        assert conn.closed.result() == (1001, "bye")

    run_in_loop(check)


@pytest.mark.timeout(60)
def test_echo_fast_check_still_catches_every_wrong_echo() -> None:
    """Reads of whole echoes take the one-comparison path; a wrong byte anywhere (content,
    opcode, length encoding, mask bit), a split frame or an echo too many goes frame by frame
    and is counted as it was before."""
    from wsfleet.loadtest.echo_bench import EchoConnection, _Load, server_frame

    def check() -> None:
        payload = payload_for(7, 64)
        load = _Load()
        conn = EchoConnection(HOST, 1, load=load, payload=payload, opcode=OP_BINARY)
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(conn._key)}\r\n\r\n"
            ).encode()
        )
        assert conn.is_open
        load.sending = True
        conn.start(4)
        echo = server_frame(OP_BINARY, payload)
        written = len(transport.written)
        conn.data_received(echo * 3)  # the fast path: 3 echoes, 3 replacements in one write
        assert load.received == 3 and load.error.count == 0 and len(conn.sent_at) == 4
        assert parse_client_frames(bytes(transport.written[written:])) == [(OP_BINARY, payload)] * 3
        wrong = [
            server_frame(OP_BINARY, payload[:-1] + b"!"),  # content
            server_frame(OP_TEXT, payload),  # opcode
            bytes((0x82, 126)) + len(payload).to_bytes(2, "big") + payload,  # long length form
        ]
        for i, frame in enumerate(wrong, 1):
            conn.data_received(frame)
            assert load.mismatches == i - (i == 3), i  # the long form is valid: not a mismatch
        assert load.error.count == 2 and load.received == 6
        conn.data_received(echo[:10])
        conn.data_received(echo[10:])  # a split echo: parsed frame by frame, right
        assert load.received == 7 and load.error.count == 2
        in_flight = len(conn.sent_at)
        conn.data_received(echo * (in_flight + 1))  # one echo more than was sent
        assert load.error.count == 3 and "nothing in flight" in load.error.samples[-1]
        masked = bytes((0x82, 0x80 | 64)) + b"\0\0\0\0" + payload  # a masked server frame
        conn.data_received(masked)
        assert conn.error == "masked frame from the server" and transport.aborted

    run_in_loop(check)
