"""A fast WebSocket client for load generation: RFC 6455 client side on a raw asyncio.Protocol.

The websockets client costs tens of microseconds per message in Python, so a
load generator built on it would measure itself. This one is an
``asyncio.Protocol`` (run it on uvloop) that does the HTTP/1.1 upgrade itself
(checks the 101 status, ``Upgrade``, ``Connection`` and ``Sec-WebSocket-Accept``),
writes masked client frames, and parses the server's unmasked frames
incrementally: a frame may be split across reads, a read may hold many frames,
and the 7-, 16- and 64-bit payload lengths are all handled. The handshake costs the
client little (the connect scenario measures handshakes per second): the request is
built once per target (`request_parts`), the key comes from a per-process pool with its
accept value computed once (`next_key`), the response is parsed in one pass. No extensions are
offered (so none may be accepted), continuation frames are reassembled, pings
are answered with pongs and the close handshake is done in both directions.

Use it by subclassing `WSConnection` and overriding its hooks, or by passing
callbacks::

    conn = await connect("127.0.0.1", port, on_message=lambda c, op, data: ...)
    conn.send(b"hello")                      # masked with a fresh key
    frame = build_frame(OP_BINARY, payload)   # or pre-build once and reuse:
    conn.send_raw(frame * 16)                 # 16 messages, one write
    conn.close(); await conn.closed

Scenarios (echo, broadcast, handshake rate, idle connections, Godot's
multiplayer relay) subclass `WSConnection`; see ``echo_bench.py``. A
connection must be created inside a running event loop (`connect` does that).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import random
import struct
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE = 16 * 1024
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024

try:
    # websockets ships the XOR loop in C; it is a dependency of wsfleet anyway.
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    _c_apply_mask = None


def apply_mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated (RFC 6455 section 5.3)."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, key)
    n = len(data)
    if n == 0:
        return b""
    # One big-integer XOR is far faster in CPython than a byte loop.
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def random_mask() -> bytes:
    # RFC 6455 asks for masking keys from a strong entropy source so that a
    # script cannot predict the bytes on the wire (proxy cache poisoning). A
    # load generator on loopback has no such attacker, and os.urandom would
    # cost a system call per frame, so a fast PRNG is used.
    return random.getrandbits(32).to_bytes(4, "big")


def build_frame(
    opcode: int, payload: bytes, *, mask: bytes | None = None, fin: bool = True
) -> bytes:
    """One client frame, masked with ``mask`` (a fresh random key if None).

    A load generator may build the frame for a fixed payload once and write it
    again and again. That reuses one masking key for many frames, which the RFC
    does not allow (each frame's key must be unpredictable); it is acceptable
    here because the traffic only goes to our own server on 127.0.0.1, and the
    server cannot tell the difference.
    """
    if mask is None:
        mask = random_mask()
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``Sec-WebSocket-Key: key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


# Sec-WebSocket-Key values with their Sec-WebSocket-Accept, drawn in turn by the connections
# of this process. RFC 6455 asks for a fresh random key per connection so that a server
# cannot be tricked by a cache; a load generator on loopback has no such attacker, and a
# hash and a base64 per handshake are client CPU the connect scenario would measure. Every
# 101 is still checked against its key's accept value.
KEY_POOL_SIZE = 1024
_KEY_POOL: list[tuple[str, str]] = []
_key_index = 0


def next_key() -> tuple[str, str]:
    """The next (Sec-WebSocket-Key, expected Sec-WebSocket-Accept) of this process's pool."""
    global _key_index
    if not _KEY_POOL:
        for _ in range(KEY_POOL_SIZE):
            key = base64.b64encode(os.urandom(16)).decode("ascii")
            _KEY_POOL.append((key, accept_key(key)))
    _key_index = (_key_index + 1) % KEY_POOL_SIZE
    return _KEY_POOL[_key_index]


@functools.lru_cache(maxsize=64)
def request_parts(
    host: str, port: int, path: str, headers: tuple[tuple[str, str], ...]
) -> tuple[bytes, bytes]:
    """The upgrade request before and after the key, built once per target."""
    host = host if ":" not in host else f"[{host}]"
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: "
    )
    tail = "\r\nSec-WebSocket-Version: 13\r\n"
    tail += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1"), tail.encode("latin-1")


def close_payload(code: int | None, reason: str = "") -> bytes:
    if code is None:
        return b""
    return struct.pack("!H", code) + reason.encode("utf-8")[:123]


# The close frame of a normal closure, built once (see build_frame on reusing a masked frame).
CLOSE_1000 = build_frame(OP_CLOSE, close_payload(1000))


class HandshakeError(ConnectionError):
    """The server did not answer the upgrade with a valid 101 response."""


class ProtocolError(Exception):
    """The server broke RFC 6455 framing (masked frame, RSV bits, bad control frame...)."""


class WSConnection(asyncio.Protocol):
    """One client connection. Override the ``on_*`` hooks, or pass them as callbacks.

    Hooks (all run on the event loop, must not block):

    * ``on_open()``: the handshake succeeded; ``send`` may be used.
    * ``on_message(opcode, payload)``: a complete text (``OP_TEXT``) or binary
      (``OP_BINARY``) message; ``payload`` is ``bytes`` in both cases (text is
      not decoded: that would cost time the load generator does not need).
    * ``on_pong(payload)``: a pong arrived.
    * ``on_close(code, reason)``: the TCP connection is gone; ``code`` is the
      server's close code, or None when no close frame came.

    Callbacks given to the constructor take the connection first
    (``on_message(conn, opcode, payload)``) and replace the methods on this
    instance. ``opened`` resolves after the handshake (or raises
    `HandshakeError`); ``closed`` resolves to ``(code, reason)`` when the
    connection is lost. ``error`` holds a description of the first protocol
    or handshake error, if any.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        max_message: int = DEFAULT_MAX_MESSAGE,
        close_timeout: float = 2.0,
        on_open: Callable[[Any], None] | None = None,
        on_message: Callable[[Any, int, bytes], None] | None = None,
        on_pong: Callable[[Any, bytes], None] | None = None,
        on_close: Callable[[Any, int | None, str], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.path = path
        self.extra_headers = tuple(headers)
        self.max_message = max_message
        self.close_timeout = close_timeout
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.write_paused = False
        self.error: str | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[tuple[int | None, str]] = loop.create_future()
        self.response_headers: dict[str, str] = {}
        self._loop = loop
        self._key, self._accept = next_key()
        self._handshake = bytearray()
        self._buf = bytearray()  # bytes of an incomplete frame carried to the next read
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = 0
        self._fragment_size = 0
        self._close_sent = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_timer: asyncio.TimerHandle | None = None
        if on_open is None and on_message is None and on_pong is None and on_close is None:
            return  # the common case of the subclasses: nothing to bind
        for name, callback in (
            ("on_open", on_open),
            ("on_message", on_message),
            ("on_pong", on_pong),
            ("on_close", on_close),
        ):
            if callback is not None:
                # Bound onto the instance: the hot path calls self.on_message as usual.
                setattr(self, name, types.MethodType(callback, self))

    # -- hooks -----------------------------------------------------------------------

    def on_open(self) -> None:
        pass

    def on_message(self, opcode: int, payload: bytes) -> None:
        pass

    def on_pong(self, payload: bytes) -> None:
        pass

    def on_close(self, code: int | None, reason: str) -> None:
        pass

    # -- sending -----------------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        """Send one message (``str``: text, ``bytes``: binary), masked with a fresh key."""
        if isinstance(data, str):
            self.send_raw(build_frame(OP_TEXT, data.encode("utf-8")))
        else:
            self.send_raw(build_frame(OP_BINARY, data))

    def send_raw(self, frames: bytes) -> None:
        """Write already-built (masked) frames as they are."""
        if self.transport is not None and not self._close_sent:
            self.transport.write(frames)

    def ping(self, payload: bytes = b"") -> None:
        self.send_raw(build_frame(OP_PING, payload[:125]))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; the TCP connection is aborted after ``close_timeout``."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.is_open:
            self.transport.abort()
            return
        if not self._close_sent:
            frame = CLOSE_1000 if code == 1000 and not reason else None
            self.transport.write(frame or build_frame(OP_CLOSE, close_payload(code, reason)))
            self._close_sent = True
        if self._close_timer is None:
            self._close_timer = self._loop.call_later(self.close_timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        # TCP_NODELAY: uvloop and asyncio both set it on every TCP transport.
        self.transport = transport  # type: ignore[assignment]
        head, tail = request_parts(self.host, self.port, self.path, self.extra_headers)
        transport.write(head + self._key.encode("ascii") + tail)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        was_open = self.is_open
        self.is_open = False
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeError(self.error or f"connection lost during the handshake ({exc})")
            )
        if not self.closed.done():
            self.closed.set_result((self._close_code, self._close_reason))
        if was_open:
            self.on_close(self._close_code, self._close_reason)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False

    def data_received(self, data: bytes) -> None:
        # One flat loop on purpose: this is the per-message hot path.
        if not self.is_open:
            data = self._handshake_received(data)
            if not data:
                return
        buf = self._buf
        if buf:
            buf += data
            data = buf
        end = len(data)
        pos = 0
        try:
            while end - pos >= 2:
                b0 = data[pos]
                b1 = data[pos + 1]
                n = b1 & 0x7F
                if n < 126:
                    start = pos + 2
                elif n == 126:
                    if end - pos < 4:
                        break
                    n = (data[pos + 2] << 8) | data[pos + 3]
                    start = pos + 4
                else:
                    if end - pos < 10:
                        break
                    n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    start = pos + 10
                if b1 & 0x80 or b0 & 0x70:
                    raise ProtocolError(
                        "masked frame from the server" if b1 & 0x80 else "RSV bits set"
                    )
                if n > self.max_message:
                    raise ProtocolError(f"frame of {n} bytes exceeds max_message")
                stop = start + n
                if stop > end:
                    break
                payload = data[start:stop] if data is not buf else bytes(data[start:stop])
                pos = stop
                opcode = b0 & 0x0F
                if (opcode == OP_BINARY or opcode == OP_TEXT) and b0 & 0x80:
                    if self._fragments is not None:
                        raise ProtocolError("new message before the fragmented one ended")
                    self.on_message(opcode, payload)
                else:
                    self._other_frame(b0 & 0x80, opcode, payload)
        except ProtocolError as e:
            self._fail(1002, str(e))
            return
        if data is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]

    # -- internals -----------------------------------------------------------------------

    def _handshake_received(self, data: bytes) -> bytes:
        """Accumulate the HTTP response; return the bytes after it once it is valid."""
        hs = self._handshake
        if hs:
            hs += data
            data = bytes(hs)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if not hs:
                hs += data
            if len(hs) > MAX_HANDSHAKE:
                self._handshake_failed("response headers too long")
            return b""
        hs.clear()
        rest = data[end + 4 :]
        lines = data[:end].decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "101":
            self._handshake_failed(f"expected 101, got {lines[0]!r}")
            return b""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.response_headers = headers
        connection = headers.get("connection", "").lower()
        if headers.get("upgrade", "").lower() != "websocket" or (
            connection != "upgrade" and "upgrade" not in {t.strip() for t in connection.split(",")}
        ):
            self._handshake_failed(f"missing Upgrade/Connection headers: {headers}")
            return b""
        if headers.get("sec-websocket-accept") != self._accept:
            self._handshake_failed("wrong Sec-WebSocket-Accept")
            return b""
        if "sec-websocket-extensions" in headers and headers["sec-websocket-extensions"]:
            # None were offered, so frames with RSV bits would follow.
            self._handshake_failed("server accepted an extension that was not offered")
            return b""
        self.is_open = True
        self.opened.set_result(None)
        self.on_open()
        return rest

    def _handshake_failed(self, why: str) -> None:
        self.error = f"handshake: {why}"
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(self.error))
        if self.transport is not None:
            self.transport.abort()

    def _other_frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode >= 0x8:
            if not fin or len(payload) > 125:
                raise ProtocolError("fragmented or oversized control frame")
            if opcode == OP_PING:
                if not self._close_sent:
                    self.send_raw(build_frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                self.on_pong(payload)
            elif opcode == OP_CLOSE:
                self._close_received(payload)
            else:
                raise ProtocolError(f"unknown control opcode {opcode:#x}")
            return
        if opcode in (OP_TEXT, OP_BINARY):  # first fragment (the final one is handled inline)
            if self._fragments is not None:
                raise ProtocolError("new message before the fragmented one ended")
            self._fragments = [payload]
            self._fragment_opcode = opcode
            self._fragment_size = len(payload)
        elif opcode == OP_CONT:
            if self._fragments is None:
                raise ProtocolError("continuation frame without a message")
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if self._fragment_size > self.max_message:
                raise ProtocolError("fragmented message exceeds max_message")
            if fin:
                message = b"".join(self._fragments)
                self._fragments = None
                self.on_message(self._fragment_opcode, message)
        else:
            raise ProtocolError(f"unknown data opcode {opcode:#x}")

    def _close_received(self, payload: bytes) -> None:
        if len(payload) >= 2:
            self._close_code = struct.unpack("!H", payload[:2])[0]
            self._close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self._close_code = 1005  # "no status received", as RFC 6455 section 7.1.5 names it
        if not self._close_sent:
            self.send_raw(build_frame(OP_CLOSE, close_payload(self._close_code)[:2]))
            self._close_sent = True
        # Both close frames are out: the server closes TCP; do not wait for it on a load test.
        if self.transport is not None:
            self.transport.close()

    def _fail(self, code: int, why: str) -> None:
        if self.error is None:
            self.error = why
        if self.transport is not None and not self._close_sent:
            self.transport.write(build_frame(OP_CLOSE, close_payload(code, why)))
            self._close_sent = True
        self.abort()


W = TypeVar("W", bound=WSConnection)


async def connect(
    host: str,
    port: int,
    factory: Callable[..., W] = WSConnection,  # type: ignore[assignment]
    *,
    timeout: float = 10.0,
    **kwargs: Any,
) -> W:
    """Open a TCP connection and do the WebSocket handshake; ``factory(host, port, **kwargs)``.

    Raises `HandshakeError`, `OSError` or `TimeoutError`; nothing is left open then.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(lambda: factory(host, port, **kwargs), host, port)
        try:
            await conn.opened
        except BaseException:
            conn.abort()
            raise
    return conn
