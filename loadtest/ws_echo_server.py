"""Baseline for the echo benchmark: a single-process ``websockets`` echo server on uvloop.

    python -m wsfleet.loadtest.ws_echo_server --port P [--host 127.0.0.1] [--report-count]

Every message goes back to its sender with the same opcode (a text message is
received as ``str`` and sent back as text, a binary one as ``bytes``).
Compression is off (``compression=None``) so that the comparison with wsfleet
measures framing and scheduling, not zlib. SIGTERM and SIGINT close the
server (connections get a 1001 close) and the process exits with status 0.

``--port 0`` picks a free port. Once listening, the server prints
``listening HOST:PORT`` on stdout; with ``--report-count`` it prints
``received N echoed M`` on exit, which the load-generator accounting test uses.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

# Large enough for any size the benchmark sends; a protection limit is not the point here.
MAX_SIZE = 64 * 1024 * 1024


class Counts:
    """Messages seen and echoed, across all connections (one event loop, no locking)."""

    def __init__(self) -> None:
        self.received = 0
        self.echoed = 0


async def serve_until_signalled(host: str, port: int, counts: Counts) -> None:
    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                counts.received += 1
                await ws.send(message)
                counts.echoed += 1
        except ConnectionClosed:
            # A peer that vanishes without a close frame is normal under load; not an error.
            pass

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    # Otherwise stock settings (keepalive pings included): the baseline is websockets as shipped.
    async with serve(echo, host, port, compression=None, max_size=MAX_SIZE) as server:
        bound = server.sockets[0].getsockname()
        print(f"listening {bound[0]}:{bound[1]}", flush=True)
        await stop
        # Leaving the context closes the listener and every connection (close code 1001).


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--report-count", action="store_true", help="print 'received N echoed M' on exit"
    )
    args = parser.parse_args(argv)
    counts = Counts()
    uvloop.run(serve_until_signalled(args.host, args.port, counts))
    if args.report_count:
        print(f"received {counts.received} echoed {counts.echoed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
