"""What the supervisor offers an operator: the control socket, /metrics, the status document.

The glue between the `Arbiter` and `wsfleet.supervisor.control` /
`wsfleet.supervisor.metrics`: the arbiter gives its shards' views
(`ShardView`) and a way to ask the front to stop; this builds the status
document from them and the shared counters, and serves both sockets from the
arbiter's loop (`fds`, `handle`).

Imports the standard library, `wsfleet.ipc` and its sibling modules only.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from wsfleet.ipc.stats import ProcessMeter, ShardView, Stats, status_document

from .control import ControlServer
from .metrics import MetricsServer


class Operations:
    def __init__(
        self,
        stats: Stats,
        shard_views: Callable[[], list[ShardView]],
        request_stop: Callable[[], None],
        port: int,
        control: tuple[socket.socket, str] | None = None,
        metrics: socket.socket | None = None,
        request_reload: Callable[[Callable[[dict[str, Any]], None]], None] | None = None,
    ) -> None:
        self.stats = stats
        self._views = shard_views
        self._meter = ProcessMeter()
        self._port = port
        self._started = time.time()
        self.control = (
            ControlServer(
                control[0],
                control[1],
                self.status,
                request_stop,
                self.set_draining,
                request_reload,
            )
            if control is not None
            else None
        )
        self.metrics = MetricsServer(metrics, self.status) if metrics is not None else None
        self._servers = [s for s in (self.control, self.metrics) if s is not None]

    def fds(self) -> list[int]:
        return [server.fileno() for server in self._servers]

    def handle(self, readable: set[Any]) -> None:
        for server in self._servers:
            if server.fileno() in readable:
                server.handle()

    def set_draining(self, on: bool) -> None:
        self.stats.draining = on

    def status(self) -> dict[str, Any]:
        return status_document(
            self.stats,
            self._views(),
            self._meter,
            port=self._port,
            supervisor_pid=os.getpid(),
            front_pid=os.getppid(),
            uptime=round(time.time() - self._started, 3),
            control=self.control.path if self.control is not None else None,
        )

    def shard_started(self, pid: int) -> None:
        """Start measuring its CPU now, so that the first status has a figure (since start)."""
        self._meter.read(pid)

    def shard_died(self, index: int) -> None:
        self.stats.clear_gauges(index)

    def stopped(self, clean: bool) -> None:
        if self.control is not None:
            self.control.stopped(clean)

    def close_in_child(self) -> None:
        """In a forked shard: drop the sockets (without unlinking the supervisor's path), and
        the clients' connections too: a client waits for the supervisor to close them."""
        if self.control is not None:
            self.control.close_in_child()
        if self.metrics is not None:
            self.metrics.sock.close()

    def close(self) -> None:
        for server in self._servers:
            server.close()
