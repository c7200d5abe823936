"""``WebSocketPeer``: one client as the front sees it (Godot 3.2's class of that name).

Inbound messages wait here until ``get_packet``; outbound ones become
commands for the owning shard.  The per-peer limits of ``set_buffers`` apply
on both sides, without loss: a full inbound queue pauses reading from that
peer's socket (TCP pushes back on the client), and ``put_packet`` returns
``ERR_OUT_OF_MEMORY`` once the packets/bytes the shard has not yet handed to
the kernel reach the outbound limit (or, with the server's
``slow_consumer_close_code``, the peer is disconnected then).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from wsfleet.ipc import messages as m

from .errors import Error
from .variant import MAX_ENCODED_SIZE, VariantError, decode_variant, encode_variant

if TYPE_CHECKING:
    from .server import WebSocketServer, _ShardLink

log = logging.getLogger("wsfleet")

# Bound once: put_packet/get_packet run per message.
_OK, _FAILED = Error.OK, Error.FAILED
_UNAVAILABLE, _OUT_OF_MEMORY = Error.ERR_UNAVAILABLE, Error.ERR_OUT_OF_MEMORY
_SEND_TEXT, _SEND_BINARY = m.CMD_SEND_TEXT, m.CMD_SEND_BINARY

MAX_CLOSE_REASON_BYTES = 123


def check_close(code: int, reason: str) -> bytes:
    """The reason as UTF-8; ValueError for a code or reason RFC 6455 forbids sending."""
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise ValueError(f"{code} is not a close code an endpoint may send (RFC 6455 7.4)")
    encoded = reason.encode()
    if len(encoded) > MAX_CLOSE_REASON_BYTES:
        raise ValueError(f"close reason is {len(encoded)} bytes; at most 123 fit in a close frame")
    return encoded


class WebSocketPeer:
    """A connected client. Obtain it with ``server.get_peer(id)``."""

    WRITE_MODE_TEXT = 0
    WRITE_MODE_BINARY = 1

    __slots__ = (
        "_server",
        "_id",
        "_link",
        "_ip",
        "_port",
        "protocol",
        "_inbox",
        "_inbox_bytes",
        "_reading_paused",
        "_out_packets",
        "_out_bytes",
        "_write_mode",
        "_last_was_string",
        "_packet_error",
        "_connected",
        "_closing",
    )

    def __init__(
        self,
        server: WebSocketServer,
        peer_id: int,
        link: _ShardLink,
        ip: str,
        port: int,
        protocol: str,
    ) -> None:
        self._server = server
        self._id = peer_id
        self._link = link
        self._ip = ip
        self._port = port
        #: The subprotocol agreed in the handshake ("" if none).
        self.protocol = protocol
        self._inbox: deque[tuple[bytes, bool]] = deque()
        self._inbox_bytes = 0
        self._reading_paused = False
        self._out_packets = 0
        self._out_bytes = 0
        self._write_mode = self.WRITE_MODE_BINARY
        self._last_was_string = False
        self._packet_error = Error.OK
        self._connected = True
        self._closing = False

    def __repr__(self) -> str:
        state = "connected" if self._connected else "gone"
        return f"<WebSocketPeer {self._id} {self._ip}:{self._port} {state}>"

    @property
    def id(self) -> int:
        return self._id

    # -- PacketPeer ----------------------------------------------------------------------

    def put_packet(self, data: bytes | bytearray | memoryview | str) -> Error:
        """Send one message (text or binary by the write mode). Goes out at the next ``poll``."""
        if self._closing or not self._connected:
            return _FAILED
        if type(data) is bytes:
            payload = data
        elif isinstance(data, str):
            payload = data.encode()
        else:
            payload = bytes(data)
        if self._write_mode == self.WRITE_MODE_BINARY:
            return self._send(payload, _SEND_BINARY)
        if not _is_utf8(payload):
            log.error("put_packet: text write mode needs UTF-8 data (peer %d)", self._id)
            return Error.ERR_INVALID_PARAMETER
        return self._send(payload, _SEND_TEXT)

    def _send(self, payload: bytes, command: int) -> Error:
        server = self._server
        size = len(payload)
        if self._out_packets >= server._out_packets_limit or (
            self._out_bytes + size >= server._out_bytes_limit
        ):
            if server._slow_close_code is not None:
                self._drop_slow(server._slow_close_code)
            return _OUT_OF_MEMORY
        self._out_packets += 1
        self._out_bytes += size
        server._command(self._link, command, self._id, 0, payload)
        return _OK

    def _drop_slow(self, code: int) -> None:
        """The server's ``slow_consumer_close_code``: fail this peer, which does not keep up."""
        log.warning("peer %d does not read what it is sent: closing it with %d", self._id, code)
        self._closing = True  # put_packet fails from now on; client_disconnected follows
        self._inbox.clear()  # as close(): what was not read is dropped
        self._inbox_bytes = 0
        payload = m.encode_close(code, b"slow consumer")
        self._server._command(self._link, m.CMD_CLOSE, self._id, m.FLAG_FAIL, payload)

    def get_packet(self) -> bytes:
        """The oldest received message (b"" and an error from `get_packet_error` if none)."""
        inbox = self._inbox
        if not inbox:  # also when disconnected: leaving empties the inbox
            self._packet_error = _UNAVAILABLE if self._connected else _FAILED
            return b""
        payload, self._last_was_string = inbox.popleft()
        self._inbox_bytes -= len(payload)
        self._packet_error = _OK
        if self._reading_paused:
            self._server._maybe_resume_reading(self)
        return payload

    def get_packet_error(self) -> Error:
        return self._packet_error

    def get_available_packet_count(self) -> int:
        return len(self._inbox)  # leaving empties it

    def put_var(self, value: Any, full_objects: bool = False) -> Error:
        """Send ``value`` in Godot 3.2's Variant encoding, as one binary-or-text message."""
        try:
            encoded = encode_variant(value, full_objects)
        except VariantError as exc:
            log.error("put_var: %s", exc)
            return Error(exc.error)
        if len(encoded) > MAX_ENCODED_SIZE:
            return Error.ERR_OUT_OF_MEMORY
        return self.put_packet(encoded)

    def get_var(self, allow_objects: bool = False) -> Any:
        """Decode the next message as a Godot Variant (None and an error if it is not one)."""
        packet = self.get_packet()
        if self._packet_error != Error.OK:
            return None
        try:
            return decode_variant(packet, allow_objects)
        except VariantError as exc:
            self._packet_error = Error(exc.error)
            return None

    # -- WebSocketPeer -------------------------------------------------------------------

    def get_write_mode(self) -> int:
        return self._write_mode

    def set_write_mode(self, mode: int) -> None:
        if mode != 1 and mode != 0:  # WRITE_MODE_BINARY, WRITE_MODE_TEXT
            raise ValueError(
                f"write mode must be WRITE_MODE_TEXT (0) or WRITE_MODE_BINARY (1): {mode}"
            )
        self._write_mode = mode

    def was_string_packet(self) -> bool:
        """True if the last packet read came in a text frame."""
        return self._last_was_string

    def is_connected_to_host(self) -> bool:
        """True until the close handshake completes or the connection drops."""
        return self._connected

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; the peer stays connected until it completes."""
        encoded = check_close(code, reason)
        if not self._connected or self._closing:
            return
        self._closing = True
        self._inbox.clear()  # as Godot: closing also drops what was not read
        self._inbox_bytes = 0
        self._server._command(self._link, m.CMD_CLOSE, self._id, 0, m.encode_close(code, encoded))

    def get_connected_host(self) -> str:
        return self._ip

    def get_connected_port(self) -> int:
        return self._port

    def set_no_delay(self, enabled: bool) -> None:
        if self._connected:
            self._server._command(self._link, m.CMD_NO_DELAY, self._id, int(bool(enabled)), b"")

    def get_current_outbound_buffered_amount(self) -> int:
        """Bytes sent with `put_packet` that the shard has not yet handed to the kernel."""
        return self._out_bytes


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
