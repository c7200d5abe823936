"""The supervisor's side of the operator's control socket (`wsfleet.ipc.opsock`).

Served from the supervisor's master loop, so that it answers while the
application (the front) is busy: the loop selects on the listening socket
and `handle` serves every waiting connection.  Each request is short (the
client sends it at once and shuts down its side); a client that does not is
dropped after `REQUEST_TIMEOUT`, so the loop is never held longer.

Requests: ``{"cmd": "status"}`` (the status document), ``{"cmd": "drain",
"on": true|false}``, ``{"cmd": "stop"}``: answered at once (``{"ok": true,
"stopping": true}``), then, once every shard has exited, ``{"stopped": true,
"clean": bool}`` (clean: no shard had to be killed) before the socket closes.
``{"cmd": "reload"}``: ``{"ok": true, "reloading": true}`` at once, then a
line per shard (``{"shard", "old_pid", "pid", "connections", "seconds"}``, or
``{"shard", "error"}``), then ``{"reloaded": true, "ok": bool, "errors": [...],
"replaced": n}`` before the socket closes (`wsfleet.supervisor.reload`).
Answers are JSON lines.
A connection from another uid (``SO_PEERCRED``) is closed unanswered.

Imports the standard library, orjson and `wsfleet.ipc` only.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import orjson

from wsfleet.ipc import opsock

from .accepting import waiting_connections

log = logging.getLogger("wsfleet.supervisor")

REQUEST_TIMEOUT = 0.5


class ControlServer:
    """Serves one listening control socket; `stopped` answers the waiting ``stop`` requests."""

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        status: Callable[[], dict[str, Any]],
        request_stop: Callable[[], None],
        set_draining: Callable[[bool], None],
        request_reload: Callable[[Callable[[dict[str, Any]], None]], None] | None = None,
    ) -> None:
        self.sock = sock
        self.path = path
        self._status = status
        self._request_stop = request_stop
        self._set_draining = set_draining
        self._request_reload = request_reload
        self._waiting_stop: list[socket.socket] = []
        #: Clients of a reload under way (they get a line per shard).
        self._reporting: set[socket.socket] = set()
        self._file = opsock.file_id(path)  # bound by the front just before we started
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self) -> None:
        """Serve every connection waiting to be accepted."""
        for conn in waiting_connections(self.sock, "control socket"):
            try:
                self._serve(conn)
            except (OSError, ValueError) as exc:
                log.warning("control socket: a bad request: %s", exc)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        if opsock.peer_uid(conn) != os.getuid():
            conn.close()  # only our user (the socket's mode says so too)
            return
        conn.settimeout(REQUEST_TIMEOUT)
        data = bytearray()
        while len(data) <= opsock.MAX_REQUEST and (chunk := conn.recv(65536)):
            data += chunk
        if not data:
            conn.close()  # a probe (is anybody there?), e.g. a new server's stale check
            return
        request = orjson.loads(bytes(data))
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        cmd = request.get("cmd")
        if cmd == "status":
            answer: dict[str, Any] = self._status()
        elif cmd == "drain":
            on = bool(request.get("on", True))
            self._set_draining(on)
            answer = {"ok": True, "draining": on}
        elif cmd == "stop":
            conn.sendall(opsock.encode({"ok": True, "stopping": True}))
            self._waiting_stop.append(conn)
            self._request_stop()
            return
        elif cmd == "reload" and self._request_reload is not None:
            conn.sendall(opsock.encode({"ok": True, "reloading": True}))
            self._request_reload(self._reporter(conn))
            return
        else:
            answer = {"ok": False, "error": f"unknown command: {cmd!r}"}
        conn.sendall(opsock.encode(answer))
        conn.close()

    def _reporter(self, conn: socket.socket) -> Callable[[dict[str, Any]], None]:
        """Where a reload's lines go: to ``conn``, closed after the last (``"reloaded"``)."""
        conn.settimeout(REQUEST_TIMEOUT)  # a client that stopped reading costs at most this
        self._reporting.add(conn)

        def report(line: dict[str, Any]) -> None:
            try:
                conn.sendall(opsock.encode(line))
            except OSError:
                pass  # the client left; the reload goes on
            if line.get("reloaded"):
                self._reporting.discard(conn)
                conn.close()

        return report

    def close_in_child(self) -> None:
        """In a forked shard: drop every socket of ours, so that only we hold a client's."""
        for conn in [*self._waiting_stop, *self._reporting]:
            conn.close()
        self.sock.close()

    def stopped(self, clean: bool) -> None:
        """Every shard has exited: tell whoever asked for the stop, then let them go."""
        for conn in self._waiting_stop:
            try:
                conn.sendall(opsock.encode({"stopped": True, "clean": clean}))
            except OSError:
                pass
            conn.close()
        self._waiting_stop.clear()

    def close(self) -> None:
        opsock.unlink_if_ours(self.path, self._file)
        self.sock.close()
