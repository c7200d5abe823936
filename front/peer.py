"""``WebSocketPeer``: one client as the front sees it (Godot 3.2's class of that name).

Owns Godot's peer API (packets, write modes, Variants, close) on top of the
peer's `PeerChannel`, which holds its queues: inbound messages wait there
until ``get_packet``; outbound ones go to the owning shard through it.  The
per-peer limits of ``set_buffers`` apply on both sides, without loss: a full
inbound queue pauses reading from that peer's socket (TCP pushes back on
the client), and ``put_packet`` returns ``ERR_OUT_OF_MEMORY`` once the
packets/bytes the shard has not yet handed to the kernel reach the outbound
limit or the server's ``max_buffered_bytes`` (or, with the server's
``slow_consumer_close_code``, the peer is disconnected then).
`get_outbound_room` says how large a packet would be taken now.

Imports `wsfleet.ipc.messages`, `.channel`, `.errors` and `.variant` only;
it never sees the server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from wsfleet.ipc import messages as m
from wsfleet.ipc.inbox import bytes_total

from .channel import PeerChannel
from .errors import Error
from .request import HandshakeRequest
from .variant import MAX_ENCODED_SIZE, VariantError, decode_variant, encode_variant

log = logging.getLogger("wsfleet")

# Bound once: put_packet/get_packet run per message.
_OK, _FAILED = Error.OK, Error.FAILED
_UNAVAILABLE = Error.ERR_UNAVAILABLE
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


def packet_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    """What ``put_packet`` sends for ``data`` (a str as UTF-8; bytes as they are, no copy)."""
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        return data.encode()
    return bytes(data)


def var_packet(value: Any, full_objects: bool = False) -> bytes | Error:
    """``value`` in Godot 3.2's Variant encoding for ``put_var`` (a peer's, local or
    remote), or the error it returns (logged)."""
    try:
        encoded = encode_variant(value, full_objects)
    except VariantError as exc:
        log.error("put_var: %s", exc)
        return Error(exc.error)
    if len(encoded) > MAX_ENCODED_SIZE:
        return Error.ERR_OUT_OF_MEMORY
    return encoded


class WebSocketPeer:
    """A connected client. Obtain it with ``server.get_peer(id)``."""

    WRITE_MODE_TEXT = 0
    WRITE_MODE_BINARY = 1

    __slots__ = (
        "_channel",
        "_ip",
        "_port",
        "protocol",
        "_write_mode",
        "_last_was_string",
        "_packet_error",
        "_head",
        "_request",
        "_proxy",
    )

    def __init__(
        self,
        channel: PeerChannel,
        ip: str,
        port: int,
        protocol: str,
        request_head: bytes = b"",
        proxy: str = "",
    ) -> None:
        self._channel = channel
        self._ip = ip
        self._port = port
        self._head = request_head
        self._request: HandshakeRequest | None = None
        self._proxy = proxy
        #: The subprotocol agreed in the handshake ("" if none).
        self.protocol = protocol
        self._write_mode = self.WRITE_MODE_BINARY
        self._last_was_string = False
        self._packet_error = Error.OK

    def __repr__(self) -> str:
        state = "connected" if self._channel.open else "gone"
        return f"<WebSocketPeer {self._channel.id} {self._ip}:{self._port} {state}>"

    @property
    def id(self) -> int:
        return self._channel.id

    # -- PacketPeer ----------------------------------------------------------------------

    def put_packet(self, data: bytes | bytearray | memoryview | str) -> Error:
        """Send one message (text or binary by the write mode). Goes out at the next ``poll``.

        ``ERR_OUT_OF_MEMORY`` (and nothing sent) when the peer's outbound
        buffer or the server's ``max_buffered_bytes`` has no room for it:
        keep the packet and retry once `get_outbound_room` is large enough.
        ``FAILED`` once the peer is closing or gone.
        """
        # `packet_bytes` inlined: this is the front's per-message path (a call is ~50 ns).
        if type(data) is bytes:
            payload = data
        elif isinstance(data, str):
            payload = data.encode()
        else:
            payload = bytes(data)
        if self._write_mode == 1:  # WRITE_MODE_BINARY
            return self._channel.send(_SEND_BINARY, payload)
        if not is_utf8(payload):
            log.error("put_packet: text write mode needs UTF-8 data (peer %d)", self._channel.id)
            return Error.ERR_INVALID_PARAMETER
        return self._channel.send(_SEND_TEXT, payload)

    def put_message(self, payload: bytes, text: bool) -> Error:
        """Send ``payload`` as a text (UTF-8 already checked by the caller) or binary
        message, whatever the write mode: what other nodes of a cluster send this peer."""
        return self._channel.send(_SEND_TEXT if text else _SEND_BINARY, payload)

    def put_packets(self, packets: Iterable[bytes | bytearray | memoryview | str]) -> Error:
        """Send every packet of ``packets`` in order (text or binary by the write mode), or
        none of them: beyond Godot, for a handler that answers a batch (`get_packets`).

        ``ERR_OUT_OF_MEMORY`` and nothing sent when the outbound limits have no
        room for them all (a batch larger than `get_outbound_limit` never fits:
        send it in parts); ``ERR_INVALID_PARAMETER`` and nothing sent when the
        text write mode meets a packet that is not UTF-8; ``FAILED`` once the
        peer is closing or gone.
        """
        payloads = packets if type(packets) is list else list(packets)
        size = bytes_total(payloads)  # C: -1 unless every packet is bytes
        if size < 0:
            payloads = [packet_bytes(data) for data in payloads]
            size = sum(map(len, payloads))
        if self._write_mode == 1:  # WRITE_MODE_BINARY
            return self._channel.send_many(_SEND_BINARY, payloads, size)
        for payload in payloads:
            if not is_utf8(payload):
                log.error("put_packets: text write mode needs UTF-8 data (peer %d)", self.id)
                return Error.ERR_INVALID_PARAMETER
        return self._channel.send_many(_SEND_TEXT, payloads, size)

    def get_packet(self) -> bytes:
        """The oldest received message (b"" and an error from `get_packet_error` if none)."""
        channel = self._channel
        inbox = channel.inbox
        entry = inbox.pop()
        if entry is None:  # also when disconnected: leaving empties the inbox
            self._packet_error = _UNAVAILABLE if channel.open else _FAILED
            return b""
        payload, self._last_was_string = entry
        self._packet_error = _OK
        if inbox.paused:
            channel.resume_if_room()
        return payload

    def get_packets(self) -> list[bytes]:
        """Every received message not yet read, oldest first, at once (beyond Godot).

        `was_string_packet` then tells about the last of them; a program that
        mixes text and binary messages and must know each one's kind reads them
        with `get_packet`.  An empty list (and an error from `get_packet_error`)
        if none waits.
        """
        channel = self._channel
        inbox = channel.inbox
        if not len(inbox):
            self._packet_error = _UNAVAILABLE if channel.open else _FAILED
            return []
        packets, self._last_was_string = inbox.take()
        self._packet_error = _OK
        if inbox.paused:
            channel.resume_if_room()
        return packets

    def get_packet_error(self) -> Error:
        return self._packet_error

    def get_available_packet_count(self) -> int:
        return len(self._channel.inbox)  # leaving empties it

    def put_var(self, value: Any, full_objects: bool = False) -> Error:
        """Send ``value`` in Godot 3.2's Variant encoding, as one binary-or-text message."""
        encoded = var_packet(value, full_objects)
        return encoded if isinstance(encoded, Error) else self.put_packet(encoded)

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
        return self._channel.open

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake; the peer stays connected until it completes.

        As in Godot, what was received and not read is dropped.
        """
        self._channel.close(code, check_close(code, reason))

    def get_connected_host(self) -> str:
        """The client's address: behind a trusted proxy (``forwarded_allow_ips``) the one
        it forwarded, else the TCP peer's."""
        return self._ip

    def shard_index(self) -> int:
        """The shard that holds this peer."""
        return self._channel.link.index

    def command(self, kind: int, flags: int, payload: bytes) -> None:
        """A command about this peer to its shard (the server's groups)."""
        self._channel.command(kind, flags, payload)

    def get_proxy_address(self) -> str:
        """The trusted proxy's address when the client's came forwarded; "" otherwise."""
        return self._proxy

    def get_request(self) -> HandshakeRequest:
        """The upgrade request: path, query, headers, cookies (parsed on first call)."""
        if self._request is None:
            self._request = HandshakeRequest(self._head)
        return self._request

    def get_connected_port(self) -> int:
        return self._port

    def set_no_delay(self, enabled: bool) -> None:
        self._channel.command(m.CMD_NO_DELAY, int(bool(enabled)))

    def get_current_outbound_buffered_amount(self) -> int:
        """Bytes sent with `put_packet` that the shard has not yet handed to the kernel."""
        return self._channel.out_bytes

    # -- beyond Godot: outbound room ----------------------------------------------------------

    def get_outbound_limit(self) -> int:
        """The outbound buffer in bytes: `set_buffers`' output size, but never less than the
        largest message the server accepts (so its echo always fits an empty buffer)."""
        return self._channel.max_out_bytes

    def get_outbound_room(self) -> int:
        """The largest packet `put_packet` takes now, in bytes (0: wait).

        The smaller of what the peer's outbound buffer and the server's
        ``max_buffered_bytes`` have left, and 0 while the peer's packet
        limit is reached or the peer is closing.  It grows in a later
        ``poll`` as the shard hands what was sent to the kernel.
        """
        return self._channel.room()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
