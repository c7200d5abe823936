"""Frames at the byte level: the shard's fast path and websockets' full rules agree."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest

from wsfleet import Error, WebSocketServer
from wsfleet.loadtest.wsclient import build_frame

from .wsframes import BINARY, CLOSE, CONT, PING, PONG, TEXT, handshake_request, read_frame
from .wsserver import echo, run_with, until

pytestmark = pytest.mark.timeout(60)


async def open_raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def read_data_frames(reader: asyncio.StreamReader, count: int) -> tuple[list, list]:
    """``count`` data frames as (opcode, payload), and the pongs seen meanwhile."""
    data, pongs = [], []
    while len(data) < count:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        (pongs if opcode == PONG else data).append((opcode, payload))
    return data, pongs


def mixed_stream() -> tuple[bytes, list[tuple[int, bytes]]]:
    """Simple frames, control frames and fragments interleaved, with the echoes expected."""
    frames = [
        build_frame(TEXT, b"a"),
        build_frame(PING, b"p"),
        build_frame(BINARY, b"b" * 125),
        build_frame(TEXT, b"c", fin=False),
        build_frame(PING, b"q"),
        build_frame(CONT, "dé".encode(), fin=True),
        build_frame(BINARY, bytes(range(126))),
        build_frame(BINARY, bytes(70_000 % 65536)),  # 16-bit length
        build_frame(TEXT, "e✓".encode()),
    ]
    expected = [
        (TEXT, b"a"),
        (BINARY, b"b" * 125),
        (TEXT, "cdé".encode()),
        (BINARY, bytes(range(126))),
        (BINARY, bytes(70_000 % 65536)),
        (TEXT, "e✓".encode()),
    ]
    return b"".join(frames), expected


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_mixed_frames_in_any_split_echo_in_order(chunk: int | None) -> None:
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    echo(server)
    stream, expected = mixed_stream()

    async def body() -> None:
        reader, writer = await open_raw(server.port)
        pieces = [stream] if chunk is None else [
            stream[i : i + chunk] for i in range(0, len(stream), chunk)
        ]  # fmt: skip
        for piece in pieces:
            writer.write(piece)
            if chunk == 1:
                await writer.drain()
        data, pongs = await read_data_frames(reader, len(expected))
        assert data == expected
        assert pongs == [(PONG, b"p"), (PONG, b"q")]
        writer.write(build_frame(CLOSE, struct.pack("!H", 1000)))
        opcode, payload = await read_frame(reader)
        assert (opcode, payload) == (CLOSE, struct.pack("!H", 1000))
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


@pytest.mark.parametrize("cut", [1, 2, 6, 8])
def test_a_frame_for_websockets_cut_anywhere_leaves_the_stream_in_step(cut: int) -> None:
    """A ping (which websockets parses) arrives in two reads, the second also holding data
    frames: whatever the cut, the frames after it are read from their own first byte."""
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    echo(server)
    # The ping's payload starts like a masked 5-byte binary frame: a parser that resumed
    # at the wrong byte would take it for one.
    ping_payload = b"\x82\x85abcdhello"
    # A zero masking key keeps those bytes as they are on the wire.
    ping = build_frame(PING, ping_payload, mask=bytes(4))  # 2 header bytes, 4 of mask, payload
    after = build_frame(BINARY, b"\x82\x85" + bytes(20)) + build_frame(TEXT, b"next")

    async def body() -> None:
        reader, writer = await open_raw(server.port)
        writer.write(build_frame(BINARY, b"before") + ping[:cut])
        await writer.drain()
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert (opcode, payload) == (BINARY, b"before")
        await asyncio.sleep(0.2)  # the server has read the first part by now
        writer.write(ping[cut:] + after)
        data, pongs = await read_data_frames(reader, 2)
        assert data == [(BINARY, b"\x82\x85" + bytes(20)), (TEXT, b"next")]
        assert pongs == [(PONG, ping_payload)]
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "header",
    [
        b"\x82\x32",  # unmasked, 50 bytes announced
        b"\xc2\xb2abcd",  # RSV1 set, masked, 50 bytes announced
        b"\x89\xfe\x00\x7e",  # a ping of 126 bytes
    ],
)
def test_a_header_websockets_refuses_fails_the_connection_before_its_payload(header) -> None:
    """RFC 6455 5.1, 5.2, 5.5: the header alone fails the connection; the shard does not wait
    for a payload that may never come (a valid frame after it is not taken as payload)."""
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    echo(server)

    async def body() -> None:
        reader, writer = await open_raw(server.port)
        writer.write(header)
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == CLOSE and payload[:2] == struct.pack("!H", 1002), payload
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


def test_a_request_websockets_parser_refuses_gets_its_answer(capfd) -> None:
    """A request the shard hands to websockets and that its HTTP parser refuses (130 headers:
    over its 128) gets websockets' 431, and the shard logs no error."""
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    request = handshake_request(0).replace(b"\r\n\r\n", b"\r\n" + b"X-N: 1\r\n" * 130 + b"\r\n")

    async def body() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        assert head.split()[1] == b"431", head
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()
    assert "Error" not in capfd.readouterr().err


BAD_FRAMES = {
    "unmasked": (b"\x82\x03abc", 1002),
    "reserved bit": (build_frame(BINARY | 0x40, b"x"), 1002),
    "unknown opcode": (build_frame(3, b"x"), 1002),
    "invalid UTF-8, whole frame": (build_frame(TEXT, b"\xff\xfe"), 1007),
    "invalid UTF-8, fragments": (
        build_frame(TEXT, b"ok", fin=False) + build_frame(CONT, b"\xc3"),
        1007,
    ),
    "continuation without a start": (build_frame(CONT, b"x"), 1002),
    "data frame inside a fragmented message": (
        build_frame(TEXT, b"a", fin=False) + build_frame(BINARY, b"b"),
        1002,
    ),
    "too large, 16-bit length": (build_frame(BINARY, bytes(2000)), 1009),
    "too large, 64-bit length": (build_frame(BINARY, bytes(70_000)), 1009),
    "fragmented control frame": (build_frame(PING, b"x", fin=False), 1002),
    "control frame over 125 bytes": (build_frame(PING, bytes(126)), 1002),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_a_bad_frame_closes_that_connection_only(name: str) -> None:
    frame, code = BAD_FRAMES[name]
    server = WebSocketServer(shards=1)
    assert server.set_buffers(1, 1024, 64, 1024) == Error.OK  # messages up to 1 KiB
    assert server.listen(0) == Error.OK
    received: list[bytes] = []

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        packet = peer.get_packet()
        received.append(packet)
        if packet == b"still here":
            peer.put_packet(packet)

    server.connect("data_received", on_data)

    async def body() -> None:
        bystander, bystander_writer = await open_raw(server.port)
        reader, writer = await open_raw(server.port)
        writer.write(build_frame(TEXT, b"before") + frame + build_frame(TEXT, b"after"))
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == CLOSE
        assert struct.unpack("!H", payload[:2])[0] == code
        try:
            assert await reader.read() == b""  # the server closed the TCP connection
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: TCP resets
        bystander_writer.write(build_frame(BINARY, b"still here"))
        assert await read_frame(bystander) == (BINARY, b"still here")
        bystander_writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()
    # What came before the bad frame was delivered; nothing after it was.
    assert received[0] == b"before" and b"after" not in received


def test_messages_just_before_a_close_frame_are_delivered() -> None:
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    received: list[bytes] = []
    server.connect("data_received", lambda i: received.append(server.get_peer(i).get_packet()))

    async def body() -> None:
        reader, writer = await open_raw(server.port)
        fragments = build_frame(TEXT, b"frag", fin=False) + build_frame(CONT, b"ment")
        writer.write(
            build_frame(TEXT, b"fast") + fragments + build_frame(CLOSE, struct.pack("!H", 1000))
        )
        assert (await read_frame(reader))[0] == CLOSE
        await until(lambda: len(received) == 2, timeout=5)

    try:
        run_with(server, body)
    finally:
        server.stop()
    assert received == [b"fast", b"fragment"]


@pytest.mark.parametrize(
    ("extra", "expected_protocol"),
    [
        ((), None),
        (("Sec-WebSocket-Protocol: nope, chat",), b"chat"),
        # Repeated headers take websockets' path, which joins them: same answer.
        (("Sec-WebSocket-Protocol: nope", "Sec-WebSocket-Protocol: chat"), b"chat"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
def test_the_upgrade_answer_is_godots_however_the_request_arrives(
    extra, expected_protocol, split
) -> None:
    server = WebSocketServer(shards=1)
    protocols = ("chat",) if expected_protocol else ()
    assert server.listen(0, protocols) == Error.OK
    echo(server)

    async def body() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        # The request and a first frame in one packet, or the request in 3-byte pieces.
        stream = handshake_request(server.port, *extra) + build_frame(TEXT, b"first")
        for i in range(0, len(stream), 3 if split else len(stream)):
            writer.write(stream[i : i + (3 if split else len(stream))])
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
        if expected_protocol:
            assert b"Sec-WebSocket-Protocol: " + expected_protocol + b"\r\n" in head
        else:
            assert b"Sec-WebSocket-Protocol" not in head
        assert await read_frame(reader) == (TEXT, b"first")
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: om+NU/F8WvuHcXu2wN/Crg==\r\n"
         b"Sec-WebSocket-Version: 8\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        # What the fast handshake must not accept (found by tests/test_fuzz.py); websockets
        # closes without an answer (b"") when its HTTP parser refuses the request.
        (b"GET / HTTP/1.1\nHost: x\nUpgrade: websocket\n\n", b""),  # bare LF
        (handshake_request(0).replace(b"/some/path", b"/a b"), b""),  # space in the target
        (handshake_request(0, "X-Bad: a\x01b"), b""),  # a control byte in a value
        (handshake_request(0, "Content-Length: 5"), b""),  # a body
        (handshake_request(0, "Sec-WebSocket-Protocol: ,"), b"400"),  # no protocol in it
    ],
)  # fmt: skip
def test_requests_the_fast_path_does_not_take_get_websockets_answer(request_bytes, status) -> None:
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK

    async def body() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes)
        if status:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            assert head.split()[1] == status, head
        else:
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()
