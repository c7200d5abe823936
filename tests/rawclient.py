"""A blocking WebSocket client on a plain socket, for tests that must control the TCP side.

Unlike a library client it reads only when told to, so a test can stop reading
(a slow consumer, with a small receive buffer) and later read every frame,
the close frame included, in the order the server sent them.  Client frames
are masked (RFC 6455 5.3); frames from the server are read whole, control
frames included.  Imports nothing of the project.
"""

from __future__ import annotations

import base64
import os
import socket
import struct

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(
    payload: bytes, opcode: int = OP_BINARY, *, fin: bool = True, rsv: int = 0
) -> bytes:
    """One masked client frame (``fin`` False: a fragment that more frames continue; ``rsv``:
    reserved bits of the first byte, 0x40 for a permessage-deflate message)."""
    mask = os.urandom(4)
    size = len(payload)
    first = (0x80 if fin else 0) | rsv | opcode
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    # XOR with the repeated mask as one big integer: fast enough for megabytes.
    repeated = (mask * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        size, "big"
    )
    return header + mask + masked


class RawClient:
    """One connection to ``host:port``; ``rcvbuf`` shrinks the receive buffer before connecting,
    ``headers`` are extra request header lines (each ending in CRLF); ``response_head`` is
    the 101's head."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        rcvbuf: int | None = None,
        timeout: float = 10,
        headers: str = "",
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self._buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{headers}\r\n"
        )
        self.sock.sendall(request.encode())
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        self.response_head = head
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"no upgrade: {head[:80]!r}")

    def close_socket(self) -> None:
        self.sock.close()

    def send(self, payload: bytes, opcode: int = OP_BINARY) -> None:
        self.sock.sendall(client_frame(payload, opcode))

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the TCP connection")
        self._buffer += chunk

    def _take(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def recv_frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload). Fragments are not joined."""
        opcode, payload, _rsv = self.recv_frame_rsv()
        return opcode, payload

    def recv_frame_rsv(self) -> tuple[int, bytes, int]:
        """`recv_frame` with the frame's reserved bits (``first byte & 0x70``)."""
        first, second = self._take(2)
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._take(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._take(8))[0]
        if second & 0x80:
            raise ConnectionError("the server masked a frame")
        return first & 0x0F, self._take(size), first & 0x70

    def read_until_close(self) -> tuple[list[tuple[int, bytes]], int | None]:
        """Every data frame up to the server's close frame (answered), and its code.

        The code is None when the TCP connection ended without a close frame.
        """
        messages: list[tuple[int, bytes]] = []
        while True:
            try:
                opcode, payload = self.recv_frame()
            except (ConnectionError, OSError):
                return messages, None
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                try:
                    self.send(payload[:2], OP_CLOSE)
                except OSError:
                    pass
                return messages, code
            if opcode == OP_PING:
                self.send(payload, OP_PONG)
            elif opcode != OP_PONG:
                messages.append((opcode, payload))
