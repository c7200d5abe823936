"""One client connection inside a shard: handshake, frames, close.

`websockets`' Sans-I/O ``ServerProtocol`` is the authority for the HTTP
upgrade, framing rules, control frames and the close handshake; this class
feeds it bytes from a uvloop transport, turns what it parses into event
records for the front, and writes what the front sends.  Data frames from
the front are built here directly (server frames are unmasked: a 2-10 byte
header plus the payload) and written with one ``writelines`` per connection
per batch of commands.

Receiving has a fast path.  The byte stream is cut into frames here, by
their headers; the common frame - a whole, unfragmented, masked text or
binary frame with no extension bits, within the size limit, while no
fragmented message is open - is parsed here (``websockets``' parser costs
about 3 us per frame: a generator, a ``Frame`` object, checks).  Every other
frame - control frames, fragments, reserved bits, unknown opcodes, unmasked
or oversized frames - goes to ``websockets`` from its first byte, its bytes
as they arrive (so a header it refuses fails the connection at once), and
this class counts them to know where the frame ends: the fast path resumes
exactly at the next frame boundary, and ``websockets``' parser always starts
at one.  From a failed or closing connection on, every byte goes to
``websockets``, which applies RFC 6455 in full.  So the fast path accepts
nothing the slow path would refuse.

The opening handshake has the same split: a well-formed upgrade request
(``GET ... HTTP/1.1`` with the headers RFC 6455 requires, each once, and a
subprotocol Godot's rule accepts) is answered here with Godot's own 101
response; any other request goes whole to ``websockets``, which accepts it
or answers the right HTTP error.

The server's limits apply on both paths, at handshake or timer time only
(nothing is added per message): a request over ``max_request_bytes`` is
answered 431 before either path parses it; an Origin outside
``allowed_origins`` gets 403; a server that holds ``max_peers`` answers 503
(see `Shard.admit`); a handshake not done within ``handshake_timeout`` is
dropped.  Keepalive pings are sent by the shard's sweep (`keepalive`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import socket
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING

from websockets.exceptions import NegotiationError
from websockets.frames import Close, Frame, Opcode, apply_mask
from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS, Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from wsfleet.ipc import messages as m

if TYPE_CHECKING:
    from .worker import Shard

_TEXT_BYTE, _BINARY_BYTE = 0x81, 0x82  # FIN + opcode
_LEN16 = struct.Struct("!BBH")
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
# Bytes the fast handshake leaves to websockets: controls but tab, and anything not ASCII.
_NOT_PLAIN = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PING_FRAME = b"\x89\x00"  # FIN + ping, no payload: built once, written as is
#: Once the server closes a connection, how long what it still has to send (its close
#: frame, an HTTP error) may wait for a peer that does not read before the TCP
#: connection is cut (the peer is reported gone then).
CLOSE_GRACE_SECONDS = 1.0
_LEN64 = struct.Struct("!BBQ")
_MAX_LINE = MAX_LINE_LENGTH - 2  # websockets' limit counts the CRLF
_TOO_LARGE = "Request headers too large.\n"
_FORBIDDEN = "Origin not allowed.\n"
_FULL = "Server full: try again later.\n"
_SMALL_HEADERS = {
    first: [bytes((first, n)) for n in range(126)] for first in (_TEXT_BYTE, _BINARY_BYTE)
}


def _valid_key(key: bytes) -> bool:
    """Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 4.2.1)."""
    try:
        return len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _header_violation(first: int, second: int, length: int, limit: int) -> str | None:
    """Why RFC 6455 refuses a client frame by its header alone (5.1, 5.2, 5.5), or None.

    The checks and reasons are websockets', in its order; a length over ``limit`` (what is
    left of the message size limit) is left to websockets, which fails it with 1009 at once.
    """
    opcode = first & 0x0F
    if opcode > 2 and opcode not in (8, 9, 10):
        return "invalid opcode"
    if not second & 0x80:
        return "incorrect masking"
    if length > limit:
        return None
    if first & 0x70:
        return "reserved bits must be 0"
    if opcode >= 8 and length > 125:
        return "control frame too long"
    if opcode >= 8 and not first & 0x80:
        return "fragmented control frame"
    return None


def frame_header(first: int, size: int) -> bytes:
    """The header of an unmasked, unfragmented frame (``first`` = FIN | opcode)."""
    if size < 126:
        return _SMALL_HEADERS[first][size]
    if size < 65536:
        return _LEN16.pack(first, 126, size)
    return _LEN64.pack(first, 127, size)


class PeerConnection(asyncio.Protocol):
    """A TCP (or TLS) connection from accept to close."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.transport: asyncio.Transport | None = None
        self.peer_id = 0  # assigned when the handshake completes
        # websockets' protocol, made when the handshake is decided (see _fast_handshake).
        self.ws: ServerProtocol = None  # type: ignore[assignment]
        self.ip = ""
        self.port = 0
        # The one timer a connection may have: the handshake's deadline, later the
        # deadline of its close (CLOSE_GRACE_SECONDS). Keepalive is the shard's sweep.
        self._deadline: asyncio.TimerHandle | None = None
        self._next_ping = 0.0  # loop time of the next keepalive ping
        self._pong_due = 0.0  # loop time by which a pong must come (0: none awaited)
        self._close_due = 0.0  # loop time by which our close handshake must end (0: none)
        self._fragments: list[bytes] = []
        self._fragments_text = False
        # The peer sent a close frame first: Godot's "clean close" for the server.
        self._peer_closed_first = False
        self._paused_by_front = False
        self._paused_by_shard = False
        # Frames queued during the current batch of commands.
        self.outbox: list[bytes] = []
        # Packets/bytes handed to the transport and not yet credited to the front.
        self._credit_packets = 0
        self._credit_bytes = 0
        self._write_paused = False
        self._partial = b""  # the start of an upgrade request, waiting for its end
        # The start of a frame waiting for the rest, and the bytes it needs in all (0: its
        # header is not complete yet). A bytearray: a large frame may come in many reads.
        self._pending = bytearray()
        self._pending_need = 0
        self._ws_left = 0  # bytes of a frame websockets has begun that it has not had yet
        self._refused = False  # we failed the connection (e.g. invalid UTF-8)
        self._lingering = False  # the handshake was refused: what comes is discarded
        self.mp_welcomed = False  # multiplayer mode: the front has sent this peer its id

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.shard.refusing:
            transport.abort()  # as Godot: a refused connection is dropped at once
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Godot does
        peername = transport.get_extra_info("peername") or ("", 0)
        ip = peername[0]
        self.ip = ip[7:] if ip.startswith("::ffff:") else ip
        self.port = peername[1]
        self._set_deadline(self.shard.handshake_timeout)
        if self.shard.reading_paused:
            self._paused_by_shard = True
            transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.peer_id:
            self._receive_frames(data)
        elif self.ws is None:
            self._fast_handshake(data)
        else:
            # websockets refused the handshake: it discards what still comes.
            self._to_websockets(data)
            self._write_protocol_output()

    def _receive_frames(self, data: bytes) -> None:
        """Cut ``data`` into frames: simple data frames are taken here, all others go to
        websockets (see the module docstring)."""
        if self._pending:
            self._pending += data
            if len(self._pending) < self._pending_need:
                return  # a large frame still coming: no copy until it is whole
            data = bytes(self._pending)
            self._pending = bytearray()
        ws = self.ws
        size = len(data)
        pos = need = 0
        used_websockets = False
        if self._ws_left:  # the rest of a frame websockets has begun
            pos = min(self._ws_left, size)
            self._ws_left -= pos
            self._to_websockets(data[:pos])
            used_websockets = True
        max_message = self.shard.max_message
        while pos < size:
            if self._refused or ws.state is not State.OPEN:
                # Failed or closing: websockets reads (and answers or discards) the rest.
                self._to_websockets(data[pos:])
                used_websockets = True
                pos = size
                break
            if size - pos < 2:
                break
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = _U16.unpack_from(data, start)[0]
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = _U64.unpack_from(data, start)[0]
                start += 8
            if second & 0x80:
                start += 4  # the masking key
            end = start + length
            if (
                (first == 0x82 or first == 0x81)
                and second & 0x80
                and length <= max_message
                and not self._fragments
            ):
                if end > size:
                    need = end - pos
                    break
                payload = apply_mask(data[start:end], data[start - 4 : start])
                self._message(payload, first == 0x81)
                if self._refused:  # invalid UTF-8: the close frame must go out
                    used_websockets = True
                pos = end
            else:
                limit = max_message - sum(map(len, self._fragments))
                refusal = _header_violation(first, second, length, limit)
                if refusal is not None:
                    # websockets would wait for the payload first: fail on the header now.
                    self.fail(1002, refusal)
                    used_websockets = True
                    continue  # the rest goes to websockets, which discards it
                # websockets' frame, from its header on (it refuses a length over the
                # limit at once); it gets the bytes as they come.
                taken = min(end, size)
                self._ws_left = end - taken
                self._to_websockets(data[pos:taken])
                used_websockets = True
                pos = taken
        if pos < size:
            self._pending = bytearray(data[pos:])
            self._pending_need = need
        if used_websockets:
            self._write_protocol_output()

    def _to_websockets(self, data: bytes) -> None:
        """Let websockets parse ``data`` (whole frames, or the rest of a closing stream)."""
        self.ws.receive_data(data)
        events = self.ws.events_received()
        if events:
            self._frames(events)

    def connection_lost(self, exc: Exception | None) -> None:
        self._clear_deadline()
        if self.peer_id:
            self.shard.peer_gone(self, self._peer_closed_first)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.release_credits()

    # -- handshake ------------------------------------------------------------------

    def _new_protocol(self, state: State) -> ServerProtocol:
        return ServerProtocol(
            select_subprotocol=self.shard.select_subprotocol,
            max_size=self.shard.max_message,
            state=state,
        )

    def _fast_handshake(self, data: bytes) -> None:
        """Answer a plain upgrade request here; hand any other to websockets."""
        if self._lingering:
            return  # refused already: discarded (see _linger)
        request = self._partial + data if self._partial else data
        end = request.find(b"\r\n\r\n")
        limit = self.shard.max_request_bytes
        if end < 0:
            bare_lf = request.find(b"\n\n")
            if bare_lf >= 0 and bare_lf + 2 <= limit:
                return self._handshake_by_websockets(request, len(request) - 4)  # it refuses
            if len(request) < limit:
                self._partial = request  # wait for the rest of the request
                return
            return self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _TOO_LARGE)
        if end + 4 > limit:
            return self._refuse(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, _TOO_LARGE)
        self._partial = b""
        head = request[:end]
        if _NOT_PLAIN.search(head.replace(b"\r\n", b"")):
            return self._handshake_by_websockets(request, end)  # control or non-ASCII bytes
        lines = head.split(b"\r\n")
        if len(lines) > MAX_NUM_HEADERS + 1 or max(map(len, lines)) > _MAX_LINE:
            return self._handshake_by_websockets(request, end)  # its limits (431) apply
        request_line = lines[0].split(b" ")
        if len(request_line) != 3 or request_line[0] != b"GET" or request_line[2] != b"HTTP/1.1":
            return self._handshake_by_websockets(request, end)
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            name = name.lower()
            if not colon or not name or name in headers or name != name.strip():
                return self._handshake_by_websockets(request, end)  # odd or repeated: full rules
            headers[name] = value.strip()
        if b"content-length" in headers or b"transfer-encoding" in headers:
            return self._handshake_by_websockets(request, end)  # a body: websockets refuses
        key = headers.get(b"sec-websocket-key", b"")
        tokens = headers.get(b"connection", b"").split(b",")
        connection = [token.strip().lower() for token in tokens]
        if (
            headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in connection
            or headers.get(b"sec-websocket-version") != b"13"
            or not _valid_key(key)
        ):
            return self._handshake_by_websockets(request, end)
        offered = [
            token.strip().decode("ascii")
            for token in headers.get(b"sec-websocket-protocol", b"").split(b",")
            if token.strip()
        ]
        if not offered and b"sec-websocket-protocol" in headers:
            return self._handshake_by_websockets(request, end)  # empty: its 400
        try:
            protocol = self.shard.choose_subprotocol(offered)
        except NegotiationError:
            return self._handshake_by_websockets(request, end)  # it answers 400 with the reason
        origin = headers.get(b"origin")
        refusal = self._admission([] if origin is None else [origin.decode("latin-1")])
        if refusal is not None:
            return self._refuse(*refusal)
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        response = [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: ",
            accept,
        ]
        if protocol:
            response += [b"\r\nSec-WebSocket-Protocol: ", protocol.encode()]
        response.append(b"\r\n\r\n")
        self.transport.writelines(response)
        self.ws = self._new_protocol(State.OPEN)
        self._opened(protocol)
        rest = request[end + 4 :]
        if rest:
            self._receive_frames(rest)  # frames that came with the request

    def _handshake_by_websockets(self, request: bytes, end: int) -> None:
        """Let websockets answer the request (``request[:end]``); frames after it are ours."""
        self._partial = b""
        ws = self.ws = self._new_protocol(State.CONNECTING)
        ws.receive_data(request[: end + 4])
        events = ws.events_received()
        if events:  # none when its HTTP parser refused the request: its answer is queued
            self._handshake(events)
        self._write_protocol_output()
        rest = request[end + 4 :]
        if rest and self.peer_id:
            self._receive_frames(rest)

    def _admission(self, origins: list[str]) -> tuple[HTTPStatus, str] | None:
        """The server's policy for a valid upgrade request: None to accept, else the refusal.

        None also means that a ``max_peers`` slot is now counted for this
        connection: the caller must open it at once (`_opened`).
        """
        if not self.shard.origin_allowed(origins):
            return HTTPStatus.FORBIDDEN, _FORBIDDEN
        if not self.shard.admit():
            return HTTPStatus.SERVICE_UNAVAILABLE, _FULL
        return None

    def _refuse(self, status: HTTPStatus, text: str) -> None:
        """Answer the upgrade request with an HTTP error and close, as websockets' ``reject``."""
        body = text.encode()
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\nConnection: close\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._partial = b""
        self.transport.write(head.encode() + body)
        self._linger()

    def _linger(self) -> None:
        """End a refused handshake without resetting a client that is still sending.

        Closing a socket with unread bytes makes the kernel answer with a
        reset, which can destroy the HTTP answer at the client before it is
        read (a 431 goes out while the client still sends its request).  So:
        half-close (the answer, then FIN), discard what comes until the
        client closes, and cut it after `CLOSE_GRACE_SECONDS` if it does not.
        """
        self._lingering = True
        self._set_deadline(CLOSE_GRACE_SECONDS)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()  # TLS cannot half-close

    def _opened(self, protocol: str) -> None:
        self._clear_deadline()
        self.peer_id = self.shard.peer_connected(self, protocol)
        self._next_ping = self.shard.first_ping_time()

    def _handshake(self, events: list) -> None:
        request = events[0]
        if not isinstance(request, Request):
            return
        response = self.ws.accept(request)
        if response.status_code == 101:
            refusal = self._admission(request.headers.get_all("Origin"))
            if refusal is not None:
                response = self.ws.reject(*refusal)
        self.ws.send_response(response)
        if response.status_code != 101 or self.ws.state is not State.OPEN:
            return  # websockets queued the error response and the end of the stream
        self._opened(response.headers.get("Sec-WebSocket-Protocol", ""))
        if len(events) > 1:
            self._frames(events[1:])

    def _set_deadline(self, seconds: float) -> None:
        """Cut the TCP connection in ``seconds`` unless it is gone or the deadline cleared."""
        self._clear_deadline()
        self._deadline = self.shard.loop.call_later(seconds, self._deadline_passed)

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows: a peer is reported gone

    # -- receiving ------------------------------------------------------------------

    def _frames(self, events: list) -> None:
        for frame in events:
            if not isinstance(frame, Frame):
                continue
            if self._refused:
                break  # a message before this one failed the connection: deliver no more
            opcode = frame.opcode
            if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
                if frame.fin:
                    self._message(frame.data, opcode is Opcode.TEXT)
                else:
                    self._fragments = [frame.data]
                    self._fragments_text = opcode is Opcode.TEXT
            elif opcode is Opcode.CONT:
                self._fragments.append(frame.data)
                if frame.fin:
                    data = b"".join(self._fragments)
                    self._fragments = []
                    self._message(data, self._fragments_text)
            elif opcode is Opcode.CLOSE:
                self._close_received()
            elif opcode is Opcode.PONG:
                self._pong_due = 0.0  # alive (any pong will do: it is a heartbeat)

    def _message(self, data: bytes, text: bool) -> None:
        if text:
            try:
                data.decode()
            except UnicodeDecodeError:
                self._refused = True
                self.ws.fail(1007, "invalid UTF-8 in a text message")
                return
            if self.shard.mp:
                self.shard.mp_frame(self, data)
            else:
                self.shard.emit(m.EV_TEXT, self.peer_id, 0, data)
        elif self.shard.mp:
            self.shard.mp_frame(self, data)
        else:
            self.shard.emit(m.EV_BINARY, self.peer_id, 0, data)

    def _close_received(self) -> None:
        ws = self.ws
        if not ws.close_rcvd_then_sent:
            return  # the answer to our own close: Godot reports no close request then
        self._peer_closed_first = True
        close = ws.close_rcvd or Close(1005, "")
        reason = close.reason
        if reason.endswith("\0"):
            reason = reason[:-1]  # Godot appends one NUL to every reason it sends
        self.shard.emit(m.EV_CLOSE_REQUEST, self.peer_id, 0, m.encode_close(close.code, reason))

    # -- sending ----------------------------------------------------------------------

    def _write_protocol_output(self) -> None:
        transport = self.transport
        if transport is None or self.ws is None:
            return
        for chunk in self.ws.data_to_send():
            if chunk:
                transport.write(chunk)
            elif self.peer_id == 0:  # websockets' "end of stream" for a refused handshake
                self._linger()
            else:  # websockets' "end of stream": the server closes the TCP connection
                transport.close()
                if transport.get_write_buffer_size():
                    self._set_deadline(CLOSE_GRACE_SECONDS)  # a peer that does not read

    def queue_message(self, payload: bytes, text: bool) -> bool:
        """Queue one data frame for this batch; False if the connection no longer sends."""
        if self.ws is None or self.ws.state is not State.OPEN:
            return False
        size = len(payload)
        self.outbox.append(frame_header(_TEXT_BYTE if text else _BINARY_BYTE, size))
        self.outbox.append(payload)
        self._credit_packets += 1
        self._credit_bytes += size
        return True

    def queue_frame(self, frame: bytes) -> bool:
        """Queue an already built frame (a broadcast's) for this batch."""
        if self.ws is None or self.ws.state is not State.OPEN:
            return False
        self.outbox.append(frame)
        return True

    def write_outbox(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(self.outbox)
        self.outbox = []
        if not self._write_paused:
            self.release_credits()

    def release_credits(self) -> None:
        """Tell the front that what it sent left this shard's buffers (for its limits)."""
        if self._credit_packets:
            self.shard.credit(self.peer_id, self._credit_packets, self._credit_bytes)
            self._credit_packets = self._credit_bytes = 0

    def close(self, code: int, reason: str) -> None:
        if self.ws is not None and self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._write_protocol_output()

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): a close frame, then close TCP without waiting.

        A peer that does not read (a dead or slow one: why we fail it) may
        never take the close frame; the connection is cut after
        `CLOSE_GRACE_SECONDS` then.
        """
        if self.ws is None or self.ws.state is not State.OPEN:
            return
        self._refused = True
        self.ws.fail(code, reason)
        self._write_protocol_output()  # the close frame, then transport.close()

    def keepalive(self, now: float, interval: float, timeout: float | None) -> None:
        """The shard's sweep: ping when due; fail (1011) a peer whose pong is overdue.

        Pings go out every ``interval`` whatever the traffic (websockets'
        model), each an unmasked empty frame built once.  While reading from
        the peer is paused its pong may sit unread, so no verdict is reached
        then: the next ping after reading resumes gets a fresh ``timeout``.
        A close handshake we started that the peer does not finish within
        ``timeout`` (or ``interval``) ends with the TCP connection cut.
        """
        ws, transport = self.ws, self.transport
        if ws is None or transport is None or transport.is_closing():
            return  # closed already: CLOSE_GRACE_SECONDS bounds it
        if ws.state is not State.OPEN:
            if not self._close_due:
                self._close_due = now + (timeout or interval)
            elif now >= self._close_due:
                transport.abort()
            return
        if self._paused_by_front or self._paused_by_shard:
            self._pong_due = 0.0
            return
        if self._pong_due and now >= self._pong_due:
            self.fail(1011, "keepalive ping timeout")
            return
        if now >= self._next_ping:
            transport.write(_PING_FRAME)
            self._next_ping = now + interval
            if timeout and not self._pong_due:
                self._pong_due = now + timeout

    def set_no_delay(self, enabled: bool) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(enabled))

    # -- reading control ---------------------------------------------------------------

    def pause_by_front(self, paused: bool) -> None:
        self._paused_by_front = paused
        self._apply_reading()

    def pause_by_shard(self, paused: bool) -> None:
        self._paused_by_shard = paused
        self._apply_reading()

    def _apply_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._paused_by_front or self._paused_by_shard:
            transport.pause_reading()
        else:
            transport.resume_reading()
