"""The control channel between the front and the supervisor.

A ``SOCK_SEQPACKET`` Unix socket pair: each message is one packet holding a
JSON object (orjson), optionally with file descriptors attached
(``SCM_RIGHTS``), which is how a shard's freshly made rings reach the front.
Messages are rare (start, shard up/down, stop), so clarity wins over speed.

Front -> supervisor: ``{"type": "config", ...}`` first, then ``{"type": "stop"}``.
Supervisor -> front: ``shard_up`` (with the six ring fds), ``shard_down``,
``shard_failed``.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson

MAX_MESSAGE = 1 << 20
MAX_FDS = 16


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair; both ends close-on-exec (hand one over with ``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send(
    sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()
) -> None:
    data = orjson.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"control message of {len(data)} bytes is too large")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and its fds; None when the other end has closed.

    On a non-blocking socket, raises `BlockingIOError` when nothing is waiting.
    """
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None
    return orjson.loads(data), fds
