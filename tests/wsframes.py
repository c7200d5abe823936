"""WebSocket bytes by hand for the tests: opcodes, an upgrade request, a server frame read.

A plain helper module (not a test module): the frame and handshake tests import it.
"""

from __future__ import annotations

import asyncio
import struct

TEXT, BINARY, CONT, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One server frame as (opcode, payload); server frames are never masked."""
    first, second = await reader.readexactly(2)
    assert second & 0x80 == 0, "server frames are never masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


def handshake_request(port: int, *extra: str) -> bytes:
    """An upgrade request to ``/some/path?x=1`` with RFC 6455's example key, plus ``extra``
    header lines."""
    lines = [
        "GET /some/path?x=1 HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",  # RFC 6455's example
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
