"""A recording TCP proxy for one WebSocket connection on loopback (a plain helper module).

`RecordingProxy` listens on 127.0.0.1, accepts one client, connects it to the
upstream server and copies the bytes both ways unchanged, while parsing them:
the HTTP upgrade in each direction, then RFC 6455 frames (the client's masked,
the server's not). Every complete message is recorded as a `Message` with its
direction, opcode, whether its frames were masked, and its unmasked payload, in
the order each direction delivered them. `mp_frames` decodes the binary ones as
Godot's multiplayer frames (docs/GODOT_WIRE.md §4.1 and §4.4).

Imports the standard library only; test modules import it.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

TO_SERVER, TO_CLIENT = "c2s", "s2c"
# MultiplayerAPI commands, the first payload byte after the 9-byte header.
COMMANDS = ("REMOTE_CALL", "REMOTE_SET", "SIMPLIFY_PATH", "CONFIRM_PATH", "RAW")
FULL_PATH = 0x8000_0000


@dataclass(frozen=True)
class Message:
    direction: str  # TO_SERVER or TO_CLIENT
    opcode: int
    masked: bool  # every frame of it carried a mask
    payload: bytes


@dataclass(frozen=True)
class MpFrame:
    """One multiplayer frame: the header and, for type 0, the MultiplayerAPI command."""

    direction: str
    type: int  # 0: a MultiplayerAPI payload; 1-3: SYS_ADD, SYS_DEL, SYS_ID
    sender: int
    to: int
    command: str = ""  # one of COMMANDS (type 0 only)
    target: str = ""  # REMOTE_*: "path" (bit 31) or "id"; SIMPLIFY_PATH: "id"
    path_id: int = 0  # REMOTE_* by id and SIMPLIFY_PATH
    path: str = ""  # SIMPLIFY_PATH, CONFIRM_PATH, REMOTE_* in the full-path form
    name: str = ""  # REMOTE_*: the method or property
    body: bytes = b""  # the payload after the 9-byte header


class _Parser:
    """Bytes of one direction in, whole messages out (the HTTP upgrade is skipped)."""

    def __init__(self, direction: str) -> None:
        self.direction = direction
        self.buffer = bytearray()
        self.upgraded = False
        self.fragments = bytearray()
        self.fragment_opcode = 0
        self.fragment_masked = True

    def feed(self, data: bytes) -> list[Message]:
        self.buffer += data
        out: list[Message] = []
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return out
            del self.buffer[: end + 4]
            self.upgraded = True
        while True:
            frame = self._frame()
            if frame is None:
                return out
            fin, opcode, masked, payload = frame
            if opcode == 0:  # a continuation
                self.fragments += payload
                self.fragment_masked &= masked
            elif opcode >= 8:  # control frames come whole, even between fragments
                out.append(Message(self.direction, opcode, masked, payload))
                continue
            else:
                self.fragment_opcode, self.fragments = opcode, bytearray(payload)
                self.fragment_masked = masked
            if fin:
                out.append(
                    Message(
                        self.direction,
                        self.fragment_opcode,
                        self.fragment_masked,
                        bytes(self.fragments),
                    )
                )

    def _frame(self) -> tuple[bool, int, bool, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        fin, opcode = bool(buf[0] & 0x80), buf[0] & 0x0F
        masked, length, pos = bool(buf[1] & 0x80), buf[1] & 0x7F, 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            pos = 10
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            key, pos = bytes(buf[pos : pos + 4]), pos + 4
        if len(buf) < pos + length:
            return None
        payload = bytes(buf[pos : pos + length])
        del buf[: pos + length]
        if masked:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return fin, opcode, masked, payload


class RecordingProxy:
    """One client's connection to ``127.0.0.1:upstream_port`` through this proxy (see module)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[Message] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError as exc:
            self.errors.append(f"accept/connect: {exc!r}")
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sockets += [client, upstream]
        self._start(self._pump, client, upstream, _Parser(TO_SERVER))
        self._start(self._pump, upstream, client, _Parser(TO_CLIENT))

    def _pump(self, src: socket.socket, dst: socket.socket, parser: _Parser) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)  # forward first: recording must not delay the exchange
                messages = parser.feed(data)
                with self._lock:
                    self.messages += messages
        except OSError:
            pass  # the other side went; what was whole is recorded
        except Exception as exc:  # a parse error: report it, keep nothing half-done hidden
            self.errors.append(f"{parser.direction}: {exc!r}")
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def recorded(self) -> list[Message]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        for sock in [self.listener, *self._sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> RecordingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _cstring(data: bytes, start: int) -> str:
    end = data.index(b"\0", start)
    return data[start:end].decode()


def mp_frame(message: Message) -> MpFrame:
    """A binary message as Godot's multiplayer frame (header, command, target, names)."""
    data = message.payload
    kind, sender, to = struct.unpack_from("<Bii", data, 0)
    body = data[9:]
    if kind != 0:
        return MpFrame(message.direction, kind, sender, to, body=body)
    command = COMMANDS[body[0]]
    fields: dict[str, Any] = {}
    if command in ("REMOTE_CALL", "REMOTE_SET"):
        (target,) = struct.unpack_from("<I", body, 1)
        fields["name"] = _cstring(body, 5)
        if target & FULL_PATH:
            fields["target"], fields["path"] = "path", _cstring(body, target & ~FULL_PATH)
        else:
            fields["target"], fields["path_id"] = "id", target
    elif command == "SIMPLIFY_PATH":
        (fields["path_id"],) = struct.unpack_from("<I", body, 1)
        fields["target"], fields["path"] = "id", _cstring(body, 5)
    elif command == "CONFIRM_PATH":
        fields["path"] = _cstring(body, 1)
    return MpFrame(message.direction, kind, sender, to, command, body=body, **fields)


def mp_frames(messages: list[Message]) -> list[MpFrame]:
    """The binary messages (opcode 2) as multiplayer frames, in the order recorded."""
    return [mp_frame(msg) for msg in messages if msg.opcode == 2]
