"""Helpers for tests that run a real wsfleet server in this process and real clients.

A plain helper module (not a test module): `start` a server, `echo` on it, its
`url`, a `Recorder` of its signals, and waits (`until`, `run_with`, `poll_until`).
The `servers` fixture (conftest.py) starts servers with `start` and stops them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from wsfleet import Error, WebSocketServer
from wsfleet.aio import polling


class Recorder:
    """Every signal of a server, in order, as tuples ("name", *args)."""

    def __init__(self, server: WebSocketServer, read_data: bool = True) -> None:
        self.server = server
        self.events: list[tuple[Any, ...]] = []
        self.packets: dict[int, list[tuple[bytes, bool]]] = {}
        server.connect("client_connected", lambda i, p: self.events.append(("connected", i, p)))
        server.connect(
            "client_disconnected", lambda i, c: self.events.append(("disconnected", i, c))
        )
        server.connect(
            "client_close_request",
            lambda i, c, r: self.events.append(("close_request", i, c, r)),
        )
        if read_data:
            server.connect("data_received", self._on_data)

    def _on_data(self, peer_id: int) -> None:
        peer = self.server.get_peer(peer_id)
        packet = peer.get_packet()
        assert peer.get_packet_error() == Error.OK
        self.packets.setdefault(peer_id, []).append((packet, peer.was_string_packet()))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [event for event in self.events if event[0] == name]

    def connected_ids(self) -> list[int]:
        return [event[1] for event in self.named("connected")]


def echo(server: WebSocketServer) -> None:
    """Echo every packet back to its sender in the mode it came in (text or binary)."""

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        packet = peer.get_packet()
        peer.set_write_mode(
            peer.WRITE_MODE_TEXT if peer.was_string_packet() else peer.WRITE_MODE_BINARY
        )
        assert peer.put_packet(packet) == Error.OK

    server.connect("data_received", on_data)


def url(server: WebSocketServer, host: str = "127.0.0.1", scheme: str = "ws") -> str:
    return f"{scheme}://{host}:{server.port}/any/path?x=1"


def start(shards: int = 2, protocols: tuple[str, ...] = (), **attributes: Any) -> WebSocketServer:
    server = WebSocketServer(shards=shards)
    for name, value in attributes.items():
        setattr(server, name, value)
    assert server.listen(0, protocols) == Error.OK
    return server


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.005)


def run_with(
    server: WebSocketServer, body: Callable[[], Awaitable[Any]], timeout: float = 30
) -> Any:
    """Run ``body()`` in a fresh event loop with ``server`` polled from that loop."""

    async def main() -> Any:
        async with polling(server):
            return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())


def poll_until(server: WebSocketServer, condition: Callable[[], Any], timeout: float = 10) -> None:
    """The same for code without an event loop: poll() until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        server.poll(0.01)
