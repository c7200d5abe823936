"""The one ``websockets`` baseline: a single-process server on uvloop, echo or broadcast.

    python -m wsfleet.loadtest.ws_server --port P [--mode echo|broadcast]
        [--host 127.0.0.1] [--report-count]

``echo`` (the default): every message goes back to its sender with the same opcode
(a text message is received as ``str`` and sent back as text, a binary one as
``bytes``). ``broadcast``: every message goes to every other open connection at
once with ``websockets.asyncio.server.broadcast`` (written without waiting for
any client's buffer to drain). Compression is off (``compression=None``) so that
the comparison with wsfleet measures framing and scheduling, not zlib; otherwise
websockets as shipped (keepalive pings included). The benchmarks' ``websockets``
server (`catalog.server_catalog`) and the load generator's accounting tests run it.

``--port 0`` picks a free port. Once listening it prints ``listening HOST:PORT``
on stdout. SIGTERM and SIGINT close the server (every connection gets a 1001
close) and the process exits with status 0; with ``--report-count`` it then
prints ``connected C closed X received R echoed E deliveries D peak P``: E the
echoes sent back, D every message it sent (echoes or broadcast copies), P the
most connections open at once.

Imports nothing of wsfleet.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

# Large enough for any size the benchmarks send; a protection limit is not the point here.
MAX_SIZE = 64 * 1024 * 1024
MODES = ("echo", "broadcast")


class ServerCounts:
    """What the server saw (one event loop, no locking)."""

    def __init__(self) -> None:
        self.connected = 0
        self.closed = 0
        self.received = 0
        self.echoed = 0
        self.deliveries = 0
        self.open = 0
        self.peak = 0

    def line(self) -> str:
        return (
            f"connected {self.connected} closed {self.closed} received {self.received} "
            f"echoed {self.echoed} deliveries {self.deliveries} peak {self.peak}"
        )


async def serve_until_signalled(host: str, port: int, mode: str, counts: ServerCounts) -> None:
    """Serve ``mode`` on the running loop until SIGTERM or SIGINT."""
    servers: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        counts.connected += 1
        counts.open += 1
        counts.peak = max(counts.peak, counts.open)
        try:
            async for message in ws:
                counts.received += 1
                if mode == "echo":
                    await ws.send(message)
                    counts.echoed += 1
                    counts.deliveries += 1
                else:
                    targets = [
                        c for c in servers[0].connections if c is not ws and c.state is State.OPEN
                    ]
                    broadcast(targets, message)
                    counts.deliveries += len(targets)
        except ConnectionClosed:
            pass  # a peer that vanishes without a close frame is normal under load
        finally:
            counts.open -= 1
            counts.closed += 1

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(handler, host, port, compression=None, max_size=MAX_SIZE) as server:
        servers.append(server)
        bound = server.sockets[0].getsockname()
        print(f"listening {bound[0]}:{bound[1]}", flush=True)
        await stop
    # Leaving the context closed the listener and every connection (1001), and waited for
    # the handlers.


def reference_parser(
    module: str, description: str, modes: tuple[str, ...]
) -> argparse.ArgumentParser:
    """The options every reference server of the benchmarks takes (this one, `picows_server`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--mode", choices=modes, default="echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--report-count", action="store_true", help="print what it saw on exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = reference_parser("wsfleet.loadtest.ws_server", __doc__.split("\n")[0], MODES)
    args = parser.parse_args(argv)
    counts = ServerCounts()
    uvloop.run(serve_until_signalled(args.host, args.port, args.mode, counts))
    if args.report_count:
        print(counts.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
