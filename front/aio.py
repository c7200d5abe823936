"""Running a `WebSocketServer` inside an asyncio (or uvloop) program.

    server = WebSocketServer()
    server.listen(9080)
    async with polling(server):       # poll() runs whenever a shard has news
        await asyncio.sleep(3600)

Signals then fire from the event loop; ``put_packet`` called from any task
is sent at once (outside ``poll`` nothing waits for the next poll).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .server import WebSocketServer


def attach(server: WebSocketServer, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call ``server.poll()`` from ``loop`` whenever the server's descriptor is readable."""
    loop = loop or asyncio.get_running_loop()
    loop.add_reader(server.fileno(), server.poll)
    server.poll()  # whatever arrived before we were attached


def detach(server: WebSocketServer, loop: asyncio.AbstractEventLoop | None = None) -> None:
    loop = loop or asyncio.get_running_loop()
    loop.remove_reader(server.fileno())


@asynccontextmanager
async def polling(server: WebSocketServer) -> AsyncIterator[WebSocketServer]:
    """`attach` for the duration of an ``async with`` block."""
    attach(server)
    try:
        yield server
    finally:
        if server.is_listening():
            detach(server)
