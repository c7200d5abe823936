"""The picows reference server: picows' own server (Cython) on uvloop, echo only.

    python -m wsfleet.loadtest.picows_server --port P [--mode echo] [--host 127.0.0.1]
        [--report-count]

picows (PyPI ``picows``, in the ``bench`` extra) is a WebSocket library whose frame
parsing, masking and framing are in Cython: the fastest Python-facing server the
benchmarks compare with (`catalog.server_catalog`'s ``picows``). Every data frame goes
back to its sender as it came (opcode, FIN, payload: a fragmented message comes back
fragmented, text as text), written at once with ``WSTransport.send``; pings are answered
by picows itself (``enable_auto_pong``), a close frame is answered with the same code and
the connection ends. No compression (picows has none). picows does not check that text is
UTF-8: as a reference for throughput, the echo is what a picows user would write.

``--port 0`` picks a free port. Once listening it prints ``listening HOST:PORT`` on
stdout. SIGTERM and SIGINT close the listener and every connection (1001), and the process exits
with status 0; with ``--report-count`` it then prints ``connected C closed X received R
echoed E deliveries D peak P`` (the line of `ws_server`). Without picows installed it
exits with status 2 and says so on stderr.

Imports `ws_server` (its `ServerCounts`, the same report line, and its options) and nothing else
of wsfleet.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import uvloop

from wsfleet.loadtest.ws_server import ServerCounts, reference_parser

# Large enough for any size the benchmarks send; a protection limit is not the point here.
MAX_SIZE = 64 * 1024 * 1024
MODES = ("echo",)


def listener_class(picows: Any, counts: ServerCounts, transports: set[Any]) -> type:
    """The echo listener, over the imported ``picows`` module."""
    close = picows.WSMsgType.CLOSE
    data_types = (picows.WSMsgType.TEXT, picows.WSMsgType.BINARY, picows.WSMsgType.CONTINUATION)

    class EchoListener(picows.WSListener):  # type: ignore[misc, name-defined]
        def on_ws_connected(self, transport: Any) -> None:
            transports.add(transport)
            counts.connected += 1
            counts.open += 1
            counts.peak = max(counts.peak, counts.open)

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            msg_type = frame.msg_type
            if msg_type in data_types:
                counts.received += 1
                transport.send(msg_type, frame.get_payload_as_memoryview(), frame.fin)
                counts.echoed += 1
                counts.deliveries += 1
            elif msg_type == close:
                transport.send_close(frame.get_close_code(), frame.get_close_message())
                transport.disconnect()

        def on_ws_disconnected(self, transport: Any) -> None:
            transports.discard(transport)
            counts.open -= 1
            counts.closed += 1

    return EchoListener


async def serve_until_signalled(picows: Any, host: str, port: int, counts: ServerCounts) -> None:
    """Serve the echo on the running loop until SIGTERM or SIGINT."""
    transports: set[Any] = set()
    listener = listener_class(picows, counts, transports)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    server = await picows.ws_create_server(
        lambda request: listener(), host, port, max_frame_size=MAX_SIZE
    )
    bound = server.sockets[0].getsockname()
    print(f"listening {bound[0]}:{bound[1]}", flush=True)
    try:
        await stop
    finally:
        server.close()
        for transport in list(transports):
            transport.send_close(picows.WSCloseCode.GOING_AWAY)
            transport.disconnect()
        await asyncio.sleep(0.05)  # let the close frames and FINs go out


def main(argv: list[str] | None = None) -> int:
    parser = reference_parser("wsfleet.loadtest.picows_server", __doc__.split("\n")[0], MODES)
    args = parser.parse_args(argv)
    try:
        import picows
    except ImportError as e:
        print(
            f"picows_server: picows is not installed ({e}); pip install 'wsfleet[bench]' "
            "or pip install picows",
            file=sys.stderr,
        )
        return 2
    counts = ServerCounts()
    uvloop.run(serve_until_signalled(picows, args.host, args.port, counts))
    if args.report_count:
        print(counts.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
