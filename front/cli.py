"""The ``wsfleet`` command: ``wsfleet serve`` runs a server with a built-in application,
``wsfleet loadtest`` drives load against any WebSocket URL (`wsfleet.loadtest.cli`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

from . import __version__
from .errors import Error
from .server import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    SLOW_CONSUMER_CLOSE_CODES,
    WebSocketServer,
)

log = logging.getLogger("wsfleet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsfleet",
        description="Godot 3.2's WebSocketServer API over one worker process per core.",
    )
    parser.add_argument("--version", action="version", version=f"wsfleet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run a server: the built-in echo application, or with --gd-mp-api a relay for "
        "Godot 3.2 multiplayer games (Ctrl-C stops it)",
    )
    serve.add_argument("--port", type=int, default=9080, help="TCP port (default 9080)")
    serve.add_argument("--bind", default="*", help='address to listen on (default "*": all)')
    serve.add_argument("--shards", type=int, default=None, help="worker processes (default: CPUs)")
    serve.add_argument(
        "--protocols", default="", help="comma-separated subprotocols the server speaks"
    )
    serve.add_argument("--tls-cert", help="PEM certificate (chain) file: serve wss://")
    serve.add_argument("--tls-key", help="PEM private key file")
    serve.add_argument(
        "--gd-mp-api",
        action="store_true",
        help="be peer 1 of Godot's high-level multiplayer API: relay between Godot clients",
    )
    serve.add_argument("--quiet", action="store_true", help="do not log connections")
    _add_limit_options(serve)
    # Its options are wsfleet.loadtest.cli's, parsed there (imported only when it runs).
    loadtest = commands.add_parser(
        "loadtest",
        help="drive load against any WebSocket URL (wsfleet loadtest --help)",
        add_help=False,
        prefix_chars="\0",
    )
    loadtest.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _add_limit_options(serve: argparse.ArgumentParser) -> None:
    """WebSocketServer's limits (its docstring says more), with the same defaults."""
    group = serve.add_argument_group("limits and protections")
    group.add_argument(
        "--max-peers",
        type=int,
        default=None,
        metavar="N",
        help="peers over all shards; more handshakes get 503 (default: no limit)",
    )
    group.add_argument(
        "--max-message-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest message a peer may send, else close 1009 (default 65536)",
    )
    group.add_argument(
        "--handshake-timeout",
        type=float,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="S",
        help="seconds from accept to upgrade, else dropped "
        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    group.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help=f"upgrade request size, else 431 (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    group.add_argument(
        "--allowed-origins",
        default=None,
        metavar="ORIGINS",
        help="comma-separated Origin values accepted, others get 403 (default: any)",
    )
    group.add_argument(
        "--require-origin",
        action="store_true",
        help="with --allowed-origins: refuse requests without Origin too (default: allow them)",
    )
    group.add_argument(
        "--ping-interval",
        type=float,
        default=DEFAULT_PING_INTERVAL,
        metavar="S",
        help=f"ping every peer every S seconds; 0: off (default {DEFAULT_PING_INTERVAL:g})",
    )
    group.add_argument(
        "--ping-timeout",
        type=float,
        default=DEFAULT_PING_TIMEOUT,
        metavar="S",
        help="close with 1011 a peer whose pong is this late; 0: never "
        f"(default {DEFAULT_PING_TIMEOUT:g})",
    )
    group.add_argument(
        "--slow-consumer-close-code",
        type=int,
        default=None,
        choices=SLOW_CONSUMER_CLOSE_CODES,
        help="close a peer whose outbound buffer is full with this code (default: keep it, "
        "drop the echo)",
    )


def server_from_args(args: argparse.Namespace) -> WebSocketServer:
    """A server configured by `wsfleet serve`'s options (ValueError for a bad limit)."""
    origins = args.allowed_origins
    return WebSocketServer(
        shards=args.shards,
        handshake_timeout=args.handshake_timeout,
        max_peers=args.max_peers,
        max_message_size=args.max_message_size,
        max_request_bytes=args.max_request_bytes,
        allowed_origins=None if origins is None else [o for o in origins.split(",") if o.strip()],
        require_origin=args.require_origin,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        slow_consumer_close_code=args.slow_consumer_close_code,
    )


def serve(args: argparse.Namespace) -> int:
    """Echo every message back to its sender, in the same write mode (text/binary)."""
    try:
        server = server_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    server.bind_ip = args.bind
    if bool(args.tls_cert) != bool(args.tls_key):
        log.error("--tls-cert and --tls-key go together")
        return 2
    if args.tls_cert:
        server.ssl_certificate, server.private_key = args.tls_cert, args.tls_key
    protocols = [p for p in args.protocols.split(",") if p.strip()]

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            packet = peer.get_packet()
            peer.set_write_mode(
                peer.WRITE_MODE_TEXT if peer.was_string_packet() else peer.WRITE_MODE_BINARY
            )
            peer.put_packet(packet)

    def on_mp_packet(peer_id: int) -> None:
        # A pure relay: packets addressed to the server itself are read and let go.
        while server.get_available_packet_count():
            server.get_packet()

    if args.gd_mp_api:
        server.connect("peer_packet", on_mp_packet)
        if not args.quiet:
            server.connect("peer_connected", lambda peer_id: log.info("peer %d joined", peer_id))
            server.connect("peer_disconnected", lambda peer_id: log.info("peer %d left", peer_id))
    else:
        server.connect("data_received", on_data)
        if not args.quiet:
            server.connect("client_connected", lambda peer_id, protocol: log_connect(peer_id))
            server.connect(
                "client_disconnected",
                lambda peer_id, clean: log.info("peer %d left (clean: %s)", peer_id, clean),
            )

    def log_connect(peer_id: int) -> None:
        protocol = server.get_peer(peer_id).protocol
        address, port = server.get_peer_address(peer_id), server.get_peer_port(peer_id)
        log.info("peer %d connected from %s:%d %s", peer_id, address, port, protocol)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    error = server.listen(args.port, protocols, gd_mp_api=args.gd_mp_api)
    if error != Error.OK:
        log.error("cannot listen on port %d: %s", args.port, error.name)
        return 1
    scheme = "wss" if args.tls_cert else "ws"
    log.info(
        "wsfleet %s: %s on %s://%s:%d with %d shards (Ctrl-C stops)",
        __version__,
        "multiplayer relay" if args.gd_mp_api else "echo",
        scheme,
        args.bind,
        server.port,
        server.shards,
    )
    try:
        while not stopping:
            server.poll(0.05)
    except KeyboardInterrupt:
        pass
    finally:
        started = time.monotonic()
        server.stop()
        log.info("stopped in %.2f s", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="wsfleet %(message)s", stream=sys.stderr)
    if args.command == "serve":
        if args.quiet:
            logging.getLogger("wsfleet").setLevel(logging.WARNING)
        return serve(args)
    if args.command == "loadtest":
        from .loadtest.cli import main as loadtest

        return loadtest(args.args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
