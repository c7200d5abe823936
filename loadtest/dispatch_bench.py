"""The front's cost per message without sockets: `poll()`'s dispatch plus a handler.

What the front spends on one echoed message, apart from the shards and the
kernel: taking the record from the events ring, the dispatch into the peer's
inbox, the application's handler (``get_peer``, ``get_packet``,
``set_write_mode``, ``put_packet``), the command batch and its copy into the
commands ring.  The real `WebSocketServer` and `Fleet` run in this process;
the shard's side of both rings is played by this script (it publishes batches
of message records and takes the commands away, outside the timed part).

Handlers measured (``--handlers``, all by default):

* ``godot``: the per-message signal, as a Godot program writes it
  (``data_received(id)`` per message, one packet read and echoed per call);
* ``echo``: the built-in echo of ``wsfleet serve`` (`wsfleet.cli`);
* ``batch``: the per-peer signal (``data_received_mode="peer"``): one call per
  peer per poll, ``get_packets()`` and ``put_packets()``;
* ``none``: a handler that only reads the packet (the dispatch alone, nearly).

    python -m wsfleet.loadtest.dispatch_bench --rounds 7 --peers 50 --inflight 16

Prints the best and the median µs per message over the rounds, per handler.
Wires the server's fleet by hand (as ``listen`` does, without the supervisor
and the shards): that is why it reaches into the server's private members.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from wsfleet import WebSocketServer
from wsfleet.channel import OutboundBudget
from wsfleet.fleet import Fleet, FleetListener
from wsfleet.ipc import Consumer, Producer, SharedRing
from wsfleet.ipc import messages as m
from wsfleet.peer import WebSocketPeer

_TEXT, _BINARY = WebSocketPeer.WRITE_MODE_TEXT, WebSocketPeer.WRITE_MODE_BINARY


def _godot_handler(server: WebSocketServer) -> Callable[[int], None]:
    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        packet = peer.get_packet()
        peer.set_write_mode(_TEXT if peer.was_string_packet() else _BINARY)
        peer.put_packet(packet)

    return on_data


def _read_only_handler(server: WebSocketServer) -> Callable[[int], None]:
    def on_data(peer_id: int) -> None:
        server.get_peer(peer_id).get_packet()

    return on_data


def _batch_handler(server: WebSocketServer) -> Callable[[int], None]:
    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        peer.put_packets(peer.get_packets())

    return on_data


def _echo_handler(server: WebSocketServer) -> Callable[[int], None]:
    from wsfleet.cli import Echo

    return Echo(server).on_data


#: name -> (the handler's factory, the data_received mode, whether it echoes)
HANDLERS: dict[str, tuple[Callable[[WebSocketServer], Callable[[int], None]], str, bool]] = {
    "godot": (_godot_handler, "message", True),
    "echo": (_echo_handler, "message", True),
    "batch": (_batch_handler, "peer", True),
    "none": (_read_only_handler, "message", False),
}


class Bench:
    """One server with one in-process shard link, and the shard's side of its rings."""

    def __init__(self, handler: str, peers: int, ring_capacity: int = 1 << 22) -> None:
        make_handler, mode, self.echoes = HANDLERS[handler]
        # Per-message delivery is the default (so that this runs on older versions too).
        server = WebSocketServer(**({"data_received_mode": mode} if mode != "message" else {}))
        server.connect("data_received", make_handler(server))
        _limits, peer_limits, budget_limit = server._check_limits()
        server._budget = OutboundBudget(budget_limit)
        listener = FleetListener(
            peer_connected=server._on_peer_connected,
            peer_left=server._on_peer_left,
            close_requested=server._on_close_requested,
            shard_failed=server._on_shard_failed,
        )
        fleet = Fleet(
            1,
            listener,
            server._handlers["data_received"],
            peer_limits,
            server._budget,
            **({"per_peer": True} if mode == "peer" else {}),
        )
        fleet.running = True
        events, commands = SharedRing.create(ring_capacity), SharedRing.create(ring_capacity)
        fds = [os.dup(fd) for ring in (events, commands) for fd in ring.fds]
        fleet._shard_up(0, os.getpid(), fds)
        server._fleet = fleet
        server._listening = True
        self.server, self.fleet = server, fleet
        self.events = Producer(events)
        self.commands = Consumer(commands)
        self.rings = (events, commands)
        self.ids = [m.FIRST_PEER_ID + i for i in range(peers)]
        for peer_id in self.ids:
            self.events.push(m.EV_CONNECTED, peer_id, m.encode_connected("127.0.0.1", 1, ""))
        self.events.flush()
        fleet.poll(None)
        if len(server.get_peers()) != peers:
            raise RuntimeError("the peers did not connect")

    def round(self, inflight: int, batches: int, payload: bytes) -> float:
        """Seconds of `poll` for ``batches`` batches of ``inflight`` messages per peer."""
        records = [
            (m.EV_BINARY, peer_id, 0, payload) for _ in range(inflight) for peer_id in self.ids
        ]
        per_batch = len(records)
        spent = 0.0
        for _ in range(batches):
            if self.events.push_many(records) != per_batch:
                raise RuntimeError("the events ring is too small for a batch")
            self.events.flush()
            t0 = time.perf_counter()
            self.fleet.poll(None)
            spent += time.perf_counter() - t0
            echoed = self.commands.pop_all()
            if len(echoed) != (per_batch if self.echoes else 0):
                raise RuntimeError(f"{len(echoed)} commands for {per_batch} messages")
            if echoed:
                self._give_credits(echoed)
        return spent

    def _give_credits(self, echoed: list) -> None:
        """Hand the outbound room back, as the shard does once it wrote the frames."""
        credits: dict[int, list[int]] = {}
        for _kind, peer_id, _flags, payload in echoed:
            entry = credits.setdefault(peer_id, [0, 0])
            entry[0] += 1
            entry[1] += len(payload)
        self.events.push(m.EV_CREDITS, 0, m.encode_credits(credits))
        self.events.flush()
        self.fleet.poll(None)

    def close(self) -> None:
        self.fleet.close()
        for ring in self.rings:
            ring.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handlers", default=",".join(HANDLERS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=250, help="polls per round")
    parser.add_argument("--peers", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=16, help="messages per peer per poll")
    parser.add_argument("--size", type=int, default=64, help="payload bytes")
    args = parser.parse_args(argv)
    names = [name for name in args.handlers.split(",") if name]
    unknown = [name for name in names if name not in HANDLERS]
    if unknown:
        parser.error(f"unknown handler(s) {unknown}; known: {', '.join(HANDLERS)}")
    payload = bytes(range(256)) * (args.size // 256) + bytes(args.size % 256)
    benches = {name: Bench(name, args.peers) for name in names}
    per_round = args.batches * args.peers * args.inflight
    results: dict[str, list[float]] = {name: [] for name in names}
    try:
        for bench in benches.values():
            bench.round(args.inflight, 20, payload)  # warm-up
        for _ in range(args.rounds):  # interleaved: the machine's noise hits every handler
            for name, bench in benches.items():
                spent = bench.round(args.inflight, args.batches, payload)
                results[name].append(spent / per_round * 1e6)
    finally:
        for bench in benches.values():
            bench.close()
    print(
        f"front CPU per message, {args.peers} peers x {args.inflight} messages of "
        f"{args.size} B per poll, {args.rounds} rounds of {per_round:,} messages:"
    )
    for name, figures in results.items():
        print(
            f"  {name:6} best {min(figures):.3f} us   median {statistics.median(figures):.3f} us"
            f"   ({1 / statistics.median(figures):.2f} M msg/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
