"""The wire's deviations seen from a real server: Autobahn 7.1.5 over loopback."""

from __future__ import annotations

import asyncio
import base64
import os
import struct

import pytest
from websockets.frames import apply_mask

from .wsserver import Recorder, run_with, start, until

pytestmark = pytest.mark.timeout(60)


def client_frame(first: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    return bytes((first, 0x80 | len(payload))) + mask + apply_mask(payload, mask)


def test_autobahn_7_1_5_fragment_close_fragment_is_a_clean_close() -> None:
    """A text fragment without FIN, a close 1000, then the final fragment: the server
    answers 1000 (RFC 6455, Autobahn), reports the client's close request and a clean
    disconnect, and delivers no message."""
    server = start(shards=1)
    recorder = Recorder(server)

    async def body() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(client_frame(0x01, b"fragment1"))
        await writer.drain()
        # The close and the last fragment in one write: sent apart, the fragment can reach
        # the server after it closed the socket, and the kernel's RST then discards the
        # close frame before this client reads it (a TCP race, not what the case tests).
        writer.write(client_frame(0x88, struct.pack("!H", 1000)) + client_frame(0x80, b"fragment2"))
        answer = await asyncio.wait_for(reader.read(), 10)  # to the server's end of stream
        assert answer == b"\x88\x02" + struct.pack("!H", 1000)
        writer.close()
        await until(lambda: recorder.named("disconnected"), 10)

    try:
        run_with(server, body)
    finally:
        server.stop()
    peer = recorder.connected_ids()[0]
    assert recorder.named("close_request") == [("close_request", peer, 1000, "")]
    assert recorder.named("disconnected") == [("disconnected", peer, True)]
    assert recorder.packets == {}
