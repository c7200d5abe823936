"""wsfleet applications for the load scenarios that ``wsfleet serve`` (echo) does not cover.

    python -m wsfleet.loadtest.wsfleet_apps broadcast --port P [--shards N] [--bind 127.0.0.1]
        [--group NAME] [--report-count]

``broadcast``: every message a client sends goes to every other client, in the
same write mode (text or binary), through ``server.broadcast(data, text=...,
exclude=[sender])``, which encodes the frame once per shard. Only the public
API is used (``from wsfleet import WebSocketServer, Error``), as an application
would. The process polls until SIGTERM or SIGINT, then calls ``server.stop()``
(close 1001 to every peer) and exits with status 0.  With ``--group NAME``
every peer joins group NAME as it connects and each message goes out with
``server.broadcast(data, text=..., group=NAME, exclude=[sender])``: the same
deliveries through the groups' path (membership in the shards), to compare
with the plain broadcast side by side.

``--port 0`` picks a free port. Once listening it prints
``listening HOST:PORT`` on stdout; with ``--report-count`` it prints
``connected C received R broadcasts B deliveries D`` on exit, where D counts
the peers each broadcast was addressed to (the peers the server knew of at that
moment, less the sender). The scenario tests compare those with what the load
generator counted.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from wsfleet import Error, WebSocketServer


def serve_broadcast(
    port: int, shards: int | None, bind: str, report_count: bool, group: str | None = None
) -> int:
    server = WebSocketServer(shards=shards)
    server.bind_ip = bind
    peers: set[int] = set()
    counts = {"connected": 0, "received": 0, "broadcasts": 0, "deliveries": 0}
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))

    def on_connected(peer_id: int, _protocol: str) -> None:
        peers.add(peer_id)
        counts["connected"] += 1
        if group is not None:
            server.join(peer_id, group)

    def on_disconnected(peer_id: int, _clean: bool) -> None:
        peers.discard(peer_id)

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        if peer is None:
            return
        while peer.get_available_packet_count():
            packet = peer.get_packet()
            counts["received"] += 1
            text = peer.was_string_packet()
            if server.broadcast(packet, text=text, group=group, exclude=(peer_id,)) == Error.OK:
                counts["broadcasts"] += 1
                counts["deliveries"] += len(peers) - (peer_id in peers)

    server.connect("client_connected", on_connected)
    server.connect("client_disconnected", on_disconnected)
    server.connect("data_received", on_data)
    error = server.listen(port)
    if error != Error.OK:
        print(f"listen on {bind}:{port} failed: {error.name}", file=sys.stderr, flush=True)
        return 3
    print(f"listening {bind}:{server.port}", flush=True)
    try:
        while not stopping:
            server.poll(0.05)
    finally:
        server.stop()
    if report_count:
        print(
            "connected {connected} received {received} broadcasts {broadcasts} "
            "deliveries {deliveries}".format(**counts),
            flush=True,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    apps = parser.add_subparsers(dest="app", required=True, metavar="APP")
    broadcast = apps.add_parser("broadcast", help="every message to every other client")
    broadcast.add_argument("--port", type=int, required=True)
    broadcast.add_argument("--shards", type=int, default=None, help="default: one per CPU")
    broadcast.add_argument("--bind", default="127.0.0.1")
    broadcast.add_argument("--report-count", action="store_true")
    broadcast.add_argument(
        "--group", default=None, metavar="NAME", help="join every peer to NAME, broadcast to it"
    )
    args = parser.parse_args(argv)
    if args.shards is not None and args.shards < 1:
        parser.error("--shards must be >= 1")
    return serve_broadcast(args.port, args.shards, args.bind, args.report_count, args.group)


if __name__ == "__main__":
    sys.exit(main())


def accept_everyone(server: Any) -> None:
    """``wsfleet serve --app wsfleet.loadtest.wsfleet_apps:accept_everyone``: a synchronous
    handshake handler that lets every upgrade in (what a handler costs a handshake: the
    request's round trip through the front)."""
    from wsfleet import Accept

    server.set_handshake_handler(lambda pending: Accept())


def batch_echo(server: Any) -> Any:
    """``wsfleet serve --app wsfleet.loadtest.wsfleet_apps:batch_echo``: the echo with
    per-peer delivery (``data_received_mode="peer"``): one ``data_received`` per peer per
    batch, its messages taken with ``get_packets`` and sent back with one ``put_packets``
    (in the kind of the last one: the load generator's messages are all of one kind).
    A batch the outbound limits refuse waits, in order, and is sent again after each poll
    (the returned tick) until it fits: nothing is lost."""
    from wsfleet import Error

    server.data_received_mode = "peer"
    waiting: dict[int, list[bytes]] = {}

    def on_data(peer_id: int) -> None:
        if peer_id in waiting:
            return  # its messages stay in its inbox (reading pauses) until the kept ones go
        peer = server.get_peer(peer_id)
        if peer is None:
            return
        packets = peer.get_packets()
        peer.set_write_mode(
            peer.WRITE_MODE_TEXT if peer.was_string_packet() else peer.WRITE_MODE_BINARY
        )
        if packets and peer.put_packets(packets) == Error.ERR_OUT_OF_MEMORY:
            waiting[peer_id] = packets

    def retry() -> None:
        for peer_id, packets in list(waiting.items()):
            peer = server.get_peer(peer_id)
            if peer is not None and peer.put_packets(packets) == Error.ERR_OUT_OF_MEMORY:
                continue
            del waiting[peer_id]
            if peer is not None:
                on_data(peer_id)  # what came meanwhile: no new signal may come for it

    server.connect("data_received", on_data)
    server.connect("client_disconnected", lambda peer_id, _clean: waiting.pop(peer_id, None))
    return retry
