"""The control channel between the front and the supervisor, and its typed messages.

A ``SOCK_SEQPACKET`` Unix socket pair: each message is one packet holding a
JSON object (orjson), optionally with file descriptors attached
(``SCM_RIGHTS``), which is how a shard's freshly made rings reach the front.
Messages are rare (start, shard up/down, stop), so clarity wins over speed.

Every message is a frozen dataclass; on the wire it is its fields plus a
``"type"`` tag, and `receive` builds the dataclass back, checking that the
fields are exactly the class's and of its types (nested dataclasses, tuples
and ``X | None`` included), then the class's own checks run.  A malformed
message raises `ControlError`; nothing reaches the other side as a dict.

Front -> supervisor: `FleetConfig` first, then `Stop`.
Supervisor -> front: `ShardUp` (with the six ring fds: events then commands),
`ShardDown`, `ShardFailed`, `StopRequested`, `ShardMoved` (``wsfleet reload``
replaced the process, the shard and its peers stay).

The same codec serves the channel between the supervisor and each shard (a
pair made when the shard is started), which ``wsfleet reload`` uses:
supervisor -> successor `ShardBoot` (its configuration and every descriptor
of the shard: a fresh interpreter inherits nothing), successor -> supervisor
`SuccessorReady` then `TookOver`, supervisor -> old shard `HandOff` (with the
socket on which it hands its connections to the successor,
`wsfleet.ipc.handoff`).

Imports the standard library, orjson, `wsfleet.ipc.config` and `.logconfig` only.
"""

from __future__ import annotations

import dataclasses
import socket
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import orjson

from .config import FleetConfig, Limits, ShardConfig, TlsConfig
from .logconfig import LogConfig

MAX_MESSAGE = 1 << 20
#: The version of every format shared between processes (rings, records, counters, control
#: messages, handoff): a shard started by ``wsfleet reload`` from an upgraded wsfleet runs
#: only if it matches the running server's, else the reload stops with that reason.
IPC_VERSION = 3  # 2: per-address counts, refused_429; 3: shard_handler, its counter
#: The most a message carries: a `ShardBoot` with a listening socket per bound address.
MAX_FDS = 64
#: Ring descriptors a `ShardUp` carries: memfd, data bell, space bell, for each of two rings.
SHARD_UP_FDS = 6


class ControlError(ValueError):
    """A control message that is not one of the messages below, or not well formed."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Front -> supervisor: stop every shard (they close their peers with 1001), then exit."""


@dataclass(frozen=True, slots=True)
class StopRequested:
    """Supervisor -> front: an operator asked to stop (``wsfleet stop``): the front emits
    ``stop_requested``; the application stops the server (`Stop` follows)."""


@dataclass(frozen=True, slots=True)
class ShardUp:
    """Supervisor -> front: shard ``shard`` runs as ``pid``; its two rings' fds come along."""

    shard: int
    pid: int


@dataclass(frozen=True, slots=True)
class ShardDown:
    """Supervisor -> front: shard ``shard`` is dead (reaped); its peers are gone."""

    shard: int


@dataclass(frozen=True, slots=True)
class ShardFailed:
    """Supervisor -> front: shard ``shard`` is given up for good, and why (after `ShardDown`)."""

    shard: int
    reason: str


@dataclass(frozen=True, slots=True)
class ShardMoved:
    """Supervisor -> front: shard ``shard`` runs as ``pid`` now (reloaded: same rings and peers)."""

    shard: int
    pid: int


@dataclass(frozen=True, slots=True)
class ShardBoot:
    """Supervisor -> a shard started as a fresh interpreter: what it runs with.

    Its fds, in order: the shard's channel to the supervisor, the `ShardState`
    memfd, the events ring's three and the commands ring's three (`RingFds`),
    the counters' memfd if ``stats``, then ``listen_count`` listening sockets.
    """

    config: ShardConfig
    supervisor_pid: int
    listen_count: int
    stats: bool
    ipc_version: int = IPC_VERSION

    def fd_count(self) -> int:
        return 2 + SHARD_UP_FDS + int(self.stats) + self.listen_count


@dataclass(frozen=True, slots=True)
class SuccessorReady:
    """Successor -> supervisor: booted and waiting for its predecessor's connections."""


@dataclass(frozen=True, slots=True)
class HandOff:
    """Supervisor -> shard: hand every connection to the successor on the attached socket,
    then exit (`wsfleet.shards.handoff`)."""


@dataclass(frozen=True, slots=True)
class TookOver:
    """Successor -> supervisor: it serves its predecessor's ``connections`` connections now."""

    connections: int


Message = (
    FleetConfig
    | Stop
    | StopRequested
    | ShardUp
    | ShardDown
    | ShardFailed
    | ShardMoved
    | ShardBoot
    | SuccessorReady
    | HandOff
    | TookOver
)

#: The ``"type"`` tag of each message class.
_TAGS: dict[type, str] = {
    FleetConfig: "fleet_config",
    Stop: "stop",
    ShardUp: "shard_up",
    ShardDown: "shard_down",
    ShardFailed: "shard_failed",
    StopRequested: "stop_requested",
    ShardMoved: "shard_moved",
    ShardBoot: "shard_boot",
    SuccessorReady: "successor_ready",
    HandOff: "hand_off",
    TookOver: "took_over",
}
_CLASSES = {tag: cls for cls, tag in _TAGS.items()}
#: The dataclasses a message may nest (decoded by their field types too).
_NESTED = (Limits, TlsConfig, ShardConfig, LogConfig)


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair; both ends close-on-exec (hand one over with ``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def encode(message: Message) -> bytes:
    """The wire form: the message's fields and its ``"type"`` tag (orjson writes dataclasses)."""
    tag = _TAGS.get(type(message))
    if tag is None:
        raise TypeError(f"not a control message: {message!r}")
    fields = {field.name: getattr(message, field.name) for field in dataclasses.fields(message)}
    return orjson.dumps({"type": tag, **fields})


def decode(data: bytes) -> Message:
    """The message ``data`` holds; `ControlError` for anything else."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ControlError(f"control message is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ControlError(f"control message is not an object: {raw!r}")
    cls = _CLASSES.get(raw.pop("type", None))
    if cls is None:
        raise ControlError(f"unknown control message: {raw!r}")
    return _build(cls, raw)


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = encode(message)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes is too large")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[Message, list[int]] | None:
    """One message and its fds; None when the other end has closed.

    On a non-blocking socket, raises `BlockingIOError` when nothing is waiting;
    a malformed message raises `ControlError` (its fds are closed first).
    """
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        _close_all(fds)
        return None
    try:
        message = decode(data)
    except ControlError:
        _close_all(fds)
        raise
    expected = expected_fds(message)
    if len(fds) != expected:
        _close_all(fds)
        raise ControlError(f"{type(message).__name__} came with {len(fds)} fds, not {expected}")
    return message, fds


def expected_fds(message: Message) -> int:
    """How many descriptors ``message`` travels with (any other count is malformed)."""
    if isinstance(message, ShardUp):
        return SHARD_UP_FDS
    if isinstance(message, ShardBoot):
        return message.fd_count()
    return 1 if isinstance(message, HandOff) else 0


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        socket.close(fd)


# -- decoding with validation -----------------------------------------------------------


def _build(cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ControlError(f"{cls.__name__}: expected an object, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in dataclasses.fields(cls)]
    if set(raw) != set(names):
        missing, extra = set(names) - set(raw), set(raw) - set(names)
        raise ControlError(f"{cls.__name__}: missing {sorted(missing)}, unknown {sorted(extra)}")
    values = {name: _convert(hints[name], raw[name], f"{cls.__name__}.{name}") for name in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ControlError(f"{cls.__name__}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                return _convert(option, value, where)
    if origin is tuple:
        item, ellipsis = typing.get_args(hint)
        if ellipsis is not Ellipsis or not isinstance(value, list):
            raise ControlError(f"{where}: expected a list, got {value!r}")
        return tuple(_convert(item, element, where) for element in value)
    if hint in _NESTED:
        return _build(hint, value)
    if hint is float and type(value) in (int, float):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ControlError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
