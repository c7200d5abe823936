"""Multiplayer relay throughput: wsfleet (gd_mp_api=True) against Godot 3.2.3's own server.

    python -m wsfleet.loadtest.relay_bench [--runs 5] [--clients 50] [--seconds 5]
        [--mode all|unicast] [--inflight N] [--size 32] [--warmup 1] [--client-procs 1]
        [--server-cpus 0] [--client-cpus 1] [--server NAME=COMMAND ...] [--godot BIN]
        [--godot-script FILE] [--godot-sleep-usec 0] [--only NAMES] [--json FILE]

The clients speak the multiplayer header (docs/GODOT_WIRE.md §4.1: u8 type,
i32 from, i32 to, then the payload) over `wsclient.WSConnection`. Each learns its
id from SYS_ID and the other peers from SYS_ADD/SYS_DEL, and then sends frames:

* ``--mode all``: ``to = 0``. The server relays each frame to every other client
  (``clients - 1`` deliveries) and also takes it itself.
* ``--mode unicast``: ``to = `` the next peer id in ascending order (a ring over
  every client, across load processes too). One delivery per frame; the server
  only relays.

The load is a closed loop. At the start each client sends ``--inflight`` frames.
After that, a client sends one new frame for every ``fanout`` frames it receives
(``clients - 1`` in mode all, 1 in mode unicast). So the frames in flight stay at
``clients x inflight`` (times ``fanout`` copies), and no out buffer can grow past
that: at most ``clients x inflight`` frames queued towards one client. Keep that
product at or under 1,024, Godot's default ``max_out_packets`` per peer: past it,
Godot's relay drops frames (they show up as ``missing``). The defaults (50 clients,
2 in flight for all, 16 for unicast) stay under it. More in flight can raise the
figures when the loop is latency-bound (neither side at 100 % CPU). Deliveries
(frames received by clients) are counted over ``--seconds`` after ``--warmup``.

Every delivery is checked: a binary frame of type 0, ``to`` as sent (0, or the
receiver's id), ``from`` a peer this client knows. Its payload is a RAW
MultiplayerAPI command (byte 4, so Godot's MultiplayerAPI accepts the frames it
gets with ``to=0`` silently), then a sequence number per sender and the send
time, both as 7-bit digits so that the payload is ASCII (see `seven_bits`). A
sequence number that is not the previous one plus 1 means a frame was lost,
duplicated or reordered, and counts as an error. Latency is the time from send
to delivery (time.monotonic, shared by the load processes). After the window,
sending stops and the deliveries still in flight drain. Then every frame sent
must have been delivered ``fanout`` times in total; the shortfall is reported
as ``missing``.

Servers (`catalog.server_catalog`'s mp-relay set; ``--only`` picks from it, and also
takes ``wsfleet-K``; ``--server NAME=COMMAND`` with ``{port}`` replaces it):

* ``godot``: ``godot3-server`` running ``tests/godot/mp_server.gd`` as a pure relay
  (``--wsfleet-clients=0``), with ``OS.low_processor_usage_mode_sleep_usec`` set to
  ``--godot-sleep-usec`` (default 0: the main loop never sleeps, so Godot burns its
  core even when idle; its CPU figure is therefore 100 %). Its MultiplayerAPI takes
  the ``to=0`` frames, and they reach the script's ``network_peer_packet`` handler.
* ``wsfleet-1`` / ``wsfleet-2``: ``wsfleet serve --gd-mp-api --quiet --bind {host}
  --port {port} --shards K`` (see ``front/cli.py``): ``WebSocketServer(shards=K)
  .listen(port, [], gd_mp_api=True)``, bound to 127.0.0.1, a pure relay that drains
  its packet queue in ``peer_packet``, as a game would, and polls until SIGTERM.

Like ``echo_bench`` (both run by `bench`), each server is started fresh for every
run, pinned with ``taskset -c --server-cpus``. The load processes are pinned to
``--client-cpus``. ``--runs`` rounds run the servers in the same order, and the table
gives medians and the ratio to the first server. Server CPU is the whole process tree
(psutil).
The exit status is 1 if a server failed or any run counted errors or missing
deliveries. `SCENARIO` is how ``wsfleet loadtest mp-relay`` and ``compare`` run it.

May import `bench`, `counters`, `loadclient`, `loadprocs`, `report`, `scenario` and
`wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsfleet.loadtest import bench, loadclient
from wsfleet.loadtest.counters import (
    Counters,
    LoadState,
    cpu_figures,
    error_samples,
    latency_figures,
    total,
)
from wsfleet.loadtest.loadclient import close_connections, on_uvloop, run_window
from wsfleet.loadtest.loadprocs import Load, split_evenly
from wsfleet.loadtest.report import Column, Table
from wsfleet.loadtest.scenario import ProcessScenario
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, apply_mask

HEADER = struct.Struct("<Bii")  # type, from, to
# A delivery: header, RAW command byte, sequence number and send time as 7-bit digits.
FRAME = struct.Struct("<BiiBII")
MASK28 = (1 << 28) - 1
SYS_NONE, SYS_ADD, SYS_DEL, SYS_ID = 0, 1, 2, 3
NETWORK_COMMAND_RAW = 4
SERVER_ID = 1
MIN_SIZE = FRAME.size - HEADER.size  # 13 payload bytes
PAD = b"."  # the payload stays ASCII (see seven_bits)
LATENCY_STRIDE = 8  # keep one latency in this many deliveries
GODOT_OUT_PACKETS = 1024  # network/limits/websocket_server/max_out_packets
DRAIN_QUIET = 0.5  # seconds without a delivery that end the drain

TABLE = Table(
    rate="deliveries_per_s",
    medians=(
        "deliveries_per_s",
        "frames_in_per_s",
        "client_cpu_pct",
        "client_busy_pct",
        "server_cpu_pct",
        "server_us_per_delivery",
        "p50_us",
        "p99_us",
    ),
    sums=("errors", "missing"),
    columns=(
        Column("deliv/s", "deliveries_per_s", 10, ",.0f"),
        Column("", "", 10),  # the ratio to the first server
        Column("frames/s", "frames_in_per_s", 9, ",.0f"),
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/dlv", "server_us_per_delivery", 10, ".2f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("missing", "missing", 7),
        Column("runs", "runs_ok", 4),
    ),
    name_width=12,
)


# -- the load generator (runs in each load process) ---------------------------------------


def seven_bits(value: int) -> int:
    """28 bits of ``value`` as a u32 whose 4 bytes are all < 0x80.

    Godot's ``mp_server.gd`` turns each RAW packet into a String
    (``get_string_from_utf8``), and invalid UTF-8 makes the engine print one error line
    per packet, which would slow Godot down for nothing. ASCII bytes keep it quiet.
    """
    return (
        (value & 0x7F)
        | ((value << 1) & 0x7F00)
        | ((value << 2) & 0x7F0000)
        | ((value << 3) & 0x7F000000)
    )


def from_seven_bits(code: int) -> int:
    return (
        (code & 0x7F)
        | ((code >> 1) & 0x3F80)
        | ((code >> 2) & 0x1FC000)
        | ((code >> 3) & 0xFE00000)
    )


def _micros(epoch: float) -> int:
    """Microseconds since ``epoch`` (time.monotonic: one clock for every load process)."""
    return int((time.monotonic() - epoch) * 1e6) & MASK28


@dataclass
class RelayCounts(Counters):
    """What one load process saw (`counters.Counters`: sent counts frames written, received
    deliveries, latencies from send to delivery)."""

    clients: int
    fanout: int = 0
    window_sent: int = 0
    sequence_errors: int = 0


class _Load(LoadState):
    def __init__(self, fanout: int) -> None:
        super().__init__()
        self.fanout = fanout
        self.epoch = time.monotonic()  # replaced by the shared start time
        self.sequence_errors = 0


class RelayConnection(WSConnection):
    """One multiplayer client: learns the peers from system messages, relays in a loop."""

    def __init__(
        self, host: str, port: int, *, load: _Load, unicast: bool, size: int, path: str = "/"
    ) -> None:
        super().__init__(host, port, path)
        self.load = load
        self.unicast = unicast
        self.pad = PAD * (size - MIN_SIZE)
        self.mask = random.getrandbits(32).to_bytes(4, "big")
        self.id = 0
        self.peers: set[int] = set()  # other clients (the server, id 1, left out)
        self.server_added = False
        self.to = 0
        self.seq = 0
        self.last_seq: dict[int, int] = {}  # sender -> last sequence number received
        self.credit = 0
        self.now = 0  # microseconds since load.epoch at the last socket read

    # -- system messages -------------------------------------------------------------------

    def _system(self, payload: bytes) -> None:
        if len(payload) != HEADER.size + 4:
            self.load.error(f"system message of {len(payload)} bytes")
            return
        kind, sender, to, subject = struct.unpack("<Biii", payload)
        if sender != SERVER_ID or to != 0:
            self.load.error(f"system message from {sender} to {to}")
        if kind == SYS_ID:
            self.id = subject
        elif kind == SYS_ADD:
            if subject == SERVER_ID:
                self.server_added = True
            else:
                self.peers.add(subject)
        elif kind == SYS_DEL:
            self.peers.discard(subject)
            if self.load.sending:
                self.load.error(f"peer {subject} left during the run")
        else:
            self.load.error(f"unknown system message type {kind}")

    def target(self) -> int:
        """0, or the next id above ours in the ring of every client's id."""
        if not self.unicast:
            return 0
        ring = sorted(self.peers | {self.id})
        return ring[(ring.index(self.id) + 1) % len(ring)]

    # -- sending ---------------------------------------------------------------------------

    def _frames(self, count: int) -> bytes:
        """``count`` masked binary frames (all payloads < 126 bytes or < 64 KiB alike)."""
        out = []
        mask = self.mask
        now = seven_bits(_micros(self.load.epoch))
        for _ in range(count):
            payload = FRAME.pack(
                SYS_NONE, self.id, self.to, NETWORK_COMMAND_RAW, seven_bits(self.seq), now
            )
            self.seq += 1
            payload += self.pad
            n = len(payload)
            if n < 126:
                head = bytes((0x80 | OP_BINARY, 0x80 | n))
            else:
                head = struct.pack("!BBH", 0x80 | OP_BINARY, 0x80 | 126, n)
            out.append(head + mask + apply_mask(payload, mask))
        return b"".join(out)

    def start(self, inflight: int) -> None:
        self.to = self.target()
        self.load.sent += inflight
        self.send_raw(self._frames(inflight))

    # -- receiving -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.now = _micros(self.load.epoch)
        super().data_received(data)
        load = self.load
        if self.credit >= load.fanout and load.sending and self.is_open:
            k, self.credit = divmod(self.credit, load.fanout)
            load.sent += k
            self.send_raw(self._frames(k))

    def on_message(self, opcode: int, payload: bytes) -> None:
        if payload[0] != SYS_NONE:
            self._system(payload)
            return
        load = self.load
        try:
            _, sender, to, command, seq, sent_at = FRAME.unpack_from(payload)
            seq = from_seven_bits(seq)
        except struct.error:
            load.error(f"delivery of {len(payload)} bytes")
            return
        load.received += 1
        self.credit += 1
        last = self.last_seq.get(sender, -1)
        self.last_seq[sender] = seq
        if seq != last + 1:
            load.sequence_errors += 1
            load.error(f"from {sender} to {self.id}: sequence {seq} after {last}")
        if (
            opcode != OP_BINARY
            or to != (self.id if self.unicast else 0)
            or sender not in self.peers
            or command != NETWORK_COMMAND_RAW
        ):
            load.error(f"unexpected delivery: opcode {opcode}, from {sender}, to {to} at {self.id}")
        if load.measuring and not load.received % LATENCY_STRIDE:
            load.latencies.append((self.now - from_seven_bits(sent_at)) & MASK28)  # us

    def on_close(self, code: int | None, reason: str) -> None:
        self.load.error(f"the server closed a connection (code {code} {reason!r})")


@on_uvloop
async def run_relay_load(
    host: str,
    port: int,
    *,
    clients: int = 50,
    total_clients: int | None = None,
    unicast: bool = False,
    inflight: int = 2,
    size: int = 32,
    seconds: float = 5.0,
    warmup: float = 1.0,
    start_at: Callable[[], float] | None = None,
    connect_timeout: float = 20.0,
    drain_timeout: float = 5.0,
    path: str = "/",
) -> RelayCounts:
    """Run ``clients`` of the relay load (out of ``total_clients`` in all load processes)
    against ``ws://host:port/path`` on a fresh uvloop loop in this thread; see the module
    docstring."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}")
    total_clients = total_clients or clients
    fanout = 1 if unicast else total_clients - 1
    load = _Load(fanout)
    result = RelayCounts(clients=clients, fanout=fanout)
    options = {"load": load, "unicast": unicast, "size": size}
    async with loadclient.connections(
        load,
        result,
        host,
        port,
        RelayConnection,
        clients,
        lambda _: options,
        timeout=connect_timeout,
        what="clients",
        path=path,
    ) as conns:
        # Every client must know every other one before the ring (or fan-out) is right.
        deadline = time.monotonic() + connect_timeout
        while not all(c.id and c.server_added and len(c.peers) == total_clients - 1 for c in conns):
            if time.monotonic() > deadline:
                known = sorted(len(c.peers) for c in conns)
                raise TimeoutError(f"peers known per client {known}, wanted {total_clients - 1}")
            await asyncio.sleep(0.01)

        t_go = start_at() if start_at is not None else time.monotonic()
        load.epoch = t_go - 1.0  # send times wrap after 268 s
        result.window_sent = await run_window(load, conns, inflight, t_go, warmup, seconds, result)

        # Drain (bounded): until no delivery arrives for DRAIN_QUIET seconds.
        deadline = time.monotonic() + drain_timeout
        last_count, last_change = load.received, time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            if load.received != last_count:
                last_count, last_change = load.received, time.monotonic()
            elif time.monotonic() - last_change >= DRAIN_QUIET:
                break
        for conn in conns:
            conn.on_close = lambda code, reason: None  # closing now is expected
        await close_connections(conns, drain_timeout)
    result.sequence_errors = load.sequence_errors
    return result


# -- the scenario ---------------------------------------------------------------------------


class RelayScenario(ProcessScenario):
    """Godot 3.2 multiplayer clients relaying through the server: deliveries/s."""

    name = "mp-relay"
    mode = "mp-relay"
    table = TABLE
    seconds = 5.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clients", "--connections", dest="clients", type=int, default=50)
        parser.add_argument("--mode", choices=("all", "unicast"), default="all")
        parser.add_argument(
            "--inflight",
            type=int,
            default=None,
            help="frames each client starts with (default: 2 for all, 16 for unicast)",
        )
        parser.add_argument(
            "--size", type=int, default=32, help=f"payload bytes after the header (>= {MIN_SIZE})"
        )

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.inflight is None:
            args.inflight = 16 if args.mode == "unicast" else 2
        if args.clients < 2 or args.inflight < 1 or args.size < MIN_SIZE:
            parser.error(f"--clients >= 2, --inflight >= 1, --size >= {MIN_SIZE}")
        if args.size + HEADER.size > 65535:
            parser.error("--size: frames must stay under 64 KiB")
        if args.clients * args.inflight > GODOT_OUT_PACKETS:
            print(
                f"warning: {args.clients} clients x {args.inflight} in flight > "
                f"{GODOT_OUT_PACKETS}: Godot may drop frames (its per-peer out queue)"
            )

    def config_text(self, args: argparse.Namespace) -> str:
        fanout = 1 if args.mode == "unicast" else args.clients - 1
        return (
            f"relay, mode {args.mode}: {args.clients} clients x {args.inflight} in flight "
            f"(x {fanout} deliveries each), {args.size} B payload + 9 B header, "
            f"{args.warmup:g} s warm-up + {args.seconds:g} s"
        )

    def describe(self, run: dict[str, Any]) -> str:
        return (
            f"{run['deliveries_per_s']:,.0f} deliveries/s ({run['frames_in_per_s']:,.0f} "
            f"frames in/s), client CPU {run['client_cpu_pct']:.0f}%, server CPU "
            f"{run['server_cpu_pct']:.0f}% ({run['server_us_per_delivery']:.2f} us/delivery),"
            f" p50 {run['p50_us']:,.0f} us, p99 {run['p99_us']:,.0f} us, errors "
            f"{run['errors']}, missing {run['missing']}"
        )

    def load(self, args: argparse.Namespace) -> Load:
        """The clients split evenly over the load processes."""
        configs = [
            {
                "clients": n,
                "total_clients": args.clients,
                "unicast": args.mode == "unicast",
                "inflight": args.inflight,
                "size": args.size,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "drain_timeout": args.drain_timeout,
            }
            for n in split_evenly(args.clients, args.client_procs)
            if n > 0
        ]
        return Load(run_relay_load, RelayCounts, configs, 3 * args.drain_timeout + 30)

    def figures(
        self, results: list[RelayCounts], server_cpu: float, window: float
    ) -> dict[str, Any]:
        rate = sum(r.rate for r in results)
        window_s = max(r.window_s for r in results)
        sent = total(results, "sent")
        received = total(results, "received")
        fanout = results[0].fanout
        return {
            "deliveries_per_s": rate,
            "frames_in_per_s": total(results, "window_sent") / window_s if window_s else 0.0,
            **cpu_figures(results, server_cpu, window, rate, "delivery"),
            **latency_figures(results),
            "window_received": total(results, "window_received"),
            "sent": sent,
            "received": received,
            "fanout": fanout,
            "missing": sent * fanout - received,
            "errors": total(results, "errors"),
            "sequence_errors": total(results, "sequence_errors"),
            "error_samples": error_samples(results),
        }


SCENARIO = RelayScenario()


def main(argv: list[str] | None = None) -> int:
    parser = bench.scenario_parser(SCENARIO, runs=5, description=__doc__.split("\n")[0])
    return bench.run_benchmark(parser, parser.parse_args(argv), SCENARIO)


if __name__ == "__main__":
    sys.exit(main())
