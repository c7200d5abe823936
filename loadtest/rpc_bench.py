"""RPC calls per second into the Python server (``server.multiplayer``), with the relay
figure beside it, in one invocation.

    python -m wsfleet.loadtest.rpc_bench [--runs 5] [--clients 50] [--inflight 16]
        [--seconds 4] [--warmup 1] [--shards 1] [--rows relay,raw,rpc] [--client-procs 1]
        [--server-cpus 0] [--client-cpus 1] [--json FILE]

Every row runs against the same server, started fresh for every run and pinned with
``taskset -c --server-cpus`` (one core by default, the load on another):
``wsfleet serve --gd-mp-api --quiet --shards K --app wsfleet.loadtest.rpc_bench:setup``.
`setup` registers a node at ``/root/Bench`` whose ``remote`` method ``ping(seq,
sent_at)`` answers its caller with ``rpc_id(sender, "/root/Bench", "pong", seq,
sent_at)``, the issue's ``server_echo`` contract; and it echoes RAW packets for the
server back to their sender with ``put_packet``. The rows, interleaved in rounds:

* ``relay``: client-to-client frames relayed (`relay_bench` in mode unicast: each
  client to the next one in a ring; the Python front never sees them with 1 shard);
* ``raw``: RAW packets (``send_bytes``) to the server (``to = 1``) and echoed back
  by a ``peer_packet`` handler: the front's packet path without the RPC layer;
* ``rpc``: ``REMOTE_CALL``\\ s of ``ping`` by path id (after Godot's ``SIMPLIFY_PATH``
  / ``CONFIRM_PATH`` exchange, both ways) and the ``pong`` RPC back: one call in, one
  call out, decoded and encoded as Variants by ``wsfleet.multiplayer``.

The figure is completed round trips per second (for ``relay``: deliveries per
second), a closed loop of ``--inflight`` per client: each reply is checked (command,
method, per-client sequence number) and answered with the next call. The frames are
the same size in all three rows (27 payload bytes after the 9-byte header). After the
window, sending stops and the calls in flight drain; any reply missing then is
counted as ``missing``. The exit status is 1 if a run failed or counted errors or
missing replies.

May import `bench`, `counters`, `loadclient`, `loadprocs`, `relay_bench`, `report`,
`scenario`, `wsclient`, and the public API of ``wsfleet`` (for `setup`).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import wsfleet
from wsfleet.loadtest import bench, loadclient, relay_bench
from wsfleet.loadtest.counters import (
    Counters,
    LoadState,
    cpu_figures,
    error_samples,
    latency_figures,
    total,
)
from wsfleet.loadtest.loadclient import close_connections, on_uvloop, run_window
from wsfleet.loadtest.loadprocs import Load, Progress, split_evenly
from wsfleet.loadtest.report import Column, Table, report
from wsfleet.loadtest.scenario import ProcessScenario, Scenario
from wsfleet.loadtest.servers import ServerFailed, Target
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, apply_mask, random_mask

HEADER = struct.Struct("<Bii")  # type, from, to
SYS_NONE, SYS_ID = 0, 3
SERVER_ID = 1
REMOTE_CALL, SIMPLIFY_PATH, CONFIRM_PATH, RAW = 0, 2, 3, 4
FULL_PATH = 0x8000_0000
VARIANT_INT = 2
NODE = "Bench"  # /root/Bench, as it travels
CLIENT_PATH_ID = 1  # the id each client gives the path (its own cache)
# A call or a reply: header, command, target, the name, 2 INT arguments (27 B of payload).
CALL = struct.Struct("<BiiBI5sBIiIi")
# A RAW packet of the same size: header, RAW, sequence number, send time, padding.
RAW_FRAME = struct.Struct("<BiiBii14x")
MASK31 = (1 << 31) - 1
LATENCY_STRIDE = 8
PAYLOAD_SIZE = CALL.size - HEADER.size  # 27
ROWS = ("relay", "raw", "rpc")

TABLE = Table(
    rate="ops_per_s",
    medians=(
        "ops_per_s",
        "client_cpu_pct",
        "client_busy_pct",
        "server_cpu_pct",
        "server_us_per_op",
        "p50_us",
        "p99_us",
    ),
    sums=("errors", "missing"),
    columns=(
        Column("ops/s", "ops_per_s", 10, ",.0f"),
        Column("", "", 10),  # the ratio to the first row
        Column("client CPU", "client_cpu_pct", 10, ".0f", "%"),
        Column("server CPU", "server_cpu_pct", 10, ".0f", "%"),
        Column("srv us/op", "server_us_per_op", 10, ".2f"),
        Column("p50 us", "p50_us", 8, ",.0f"),
        Column("p99 us", "p99_us", 8, ",.0f"),
        Column("errors", "errors", 6),
        Column("missing", "missing", 7),
        Column("runs", "runs_ok", 4),
    ),
    name_width=8,
)


# -- the server's application (wsfleet serve --app wsfleet.loadtest.rpc_bench:setup) --------


class Bench:
    """The node at ``/root/Bench``: ``ping`` answers its caller with ``pong``."""

    def __init__(self, mp: wsfleet.MultiplayerAPI) -> None:
        self.mp = mp

    @wsfleet.remote
    def ping(self, seq: int, sent_at: int) -> None:
        mp = self.mp
        mp.rpc_id(mp.get_rpc_sender_id(), "/root/Bench", "pong", seq, sent_at)


def setup(server: wsfleet.WebSocketServer) -> None:
    """``--app`` entry point: the `Bench` node, and RAW packets echoed to their sender."""
    server.multiplayer.register_node("/root/" + NODE, Bench(server.multiplayer))

    def echo(_peer_id: int) -> None:
        while server.get_available_packet_count():
            sender = server.get_packet_peer()
            data = server.get_packet()
            server.set_target_peer(sender)
            server.put_packet(data)

    server.connect("peer_packet", echo)


# -- the load generator (runs in each load process) -----------------------------------------


@dataclass
class RpcCounts(Counters):
    """What one load process saw: ``sent`` calls, ``received`` replies, latencies of
    round trips."""

    clients: int
    window_sent: int = 0


def _micros(epoch: float) -> int:
    return int((time.monotonic() - epoch) * 1e6) & MASK31


def _frame(payload: bytes, mask: bytes) -> bytes:
    return bytes((0x80 | OP_BINARY, 0x80 | len(payload))) + mask + apply_mask(payload, mask)


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


class RpcConnection(WSConnection):
    """One client: learns its id, makes the path exchange (rpc), then keeps calls in flight."""

    def __init__(self, host: str, port: int, *, load: LoadState, rpc: bool, path: str = "/"):
        super().__init__(host, port, path)
        self.load = load
        self.rpc = rpc
        self.mask = random_mask()
        self.id = 0
        self.ready = False  # rpc: the server confirmed our path id
        self.server_path: int | None = None  # the server's id for the path, once simplified
        self.seq = 0  # next call's number
        self.expect = 0  # next reply's number
        self.due = 0  # replies taken in this read: that many new calls
        self.epoch = time.monotonic()

    def _send_payload(self, payload: bytes) -> None:
        self.send_raw(_frame(HEADER.pack(SYS_NONE, self.id, SERVER_ID) + payload, self.mask))

    def _calls(self, count: int) -> bytes:
        out = []
        now = _micros(self.epoch)
        for _ in range(count):
            if self.rpc:
                payload = CALL.pack(
                    *(SYS_NONE, self.id, SERVER_ID, REMOTE_CALL, CLIENT_PATH_ID, b"ping\0", 2),
                    *(VARIANT_INT, self.seq, VARIANT_INT, now),
                )
            else:
                payload = RAW_FRAME.pack(SYS_NONE, self.id, SERVER_ID, RAW, self.seq, now)
            self.seq += 1
            out.append(_frame(payload, self.mask))
        return b"".join(out)

    def start(self, inflight: int) -> None:
        self.load.sent += inflight
        self.send_raw(self._calls(inflight))

    def data_received(self, data: bytes) -> None:
        self.due = 0
        super().data_received(data)
        k = self.due
        if k and self.load.sending and self.is_open:
            self.load.sent += k
            self.send_raw(self._calls(k))

    def on_message(self, opcode: int, payload: bytes) -> None:
        load = self.load
        if payload[0] != SYS_NONE:
            if payload[0] == SYS_ID and len(payload) == 13:
                self.id = struct.unpack_from("<i", payload, 9)[0]
                if self.rpc:  # as a Godot client's first call: simplify our path
                    self._send_payload(
                        bytes([SIMPLIFY_PATH]) + struct.pack("<I", CLIENT_PATH_ID) + _name(NODE)
                    )
                else:
                    self.ready = True
            return  # SYS_ADD / SYS_DEL: not needed here
        sender = HEADER.unpack_from(payload)[1]
        command = payload[9] if len(payload) > 9 else -1
        if opcode != OP_BINARY or sender != SERVER_ID:
            load.error(f"unexpected frame: opcode {opcode} from {sender}")
            return
        if command == REMOTE_CALL and self.rpc:
            try:
                *_, target, name, argc, t1, seq, t2, sent_at = CALL.unpack_from(payload)
            except struct.error:
                load.error(f"a reply of {len(payload)} bytes")
                return
            if name != b"pong\0" or argc != 2 or VARIANT_INT != t1 or t2 != VARIANT_INT:
                load.error(f"unexpected call {payload[9:]!r}")
            elif not (target & FULL_PATH or target == self.server_path):
                load.error(f"a reply on path id {target}, not {self.server_path}")
        elif command == RAW and not self.rpc:
            _, _, _, _, seq, sent_at = RAW_FRAME.unpack_from(payload)
        elif command == CONFIRM_PATH and payload[10:] == _name(NODE):
            self.ready = True
            return
        elif command == SIMPLIFY_PATH and payload[14:] == _name(NODE):
            self.server_path = struct.unpack_from("<I", payload, 10)[0]
            self._send_payload(bytes([CONFIRM_PATH]) + _name(NODE))
            return
        else:
            load.error(f"unexpected payload {payload[9:40]!r}")
            return
        if seq != self.expect:
            load.error(f"client {self.id}: reply {seq}, expected {self.expect}")
        self.expect = seq + 1
        load.received += 1
        self.due += 1
        if load.measuring and not load.received % LATENCY_STRIDE:
            load.latencies.append((_micros(self.epoch) - sent_at) & MASK31)

    def on_close(self, code: int | None, reason: str) -> None:
        self.load.error(f"the server closed a connection (code {code} {reason!r})")


@on_uvloop
async def run_rpc_load(
    host: str,
    port: int,
    *,
    clients: int = 50,
    rpc: bool = True,
    inflight: int = 16,
    seconds: float = 4.0,
    warmup: float = 1.0,
    start_at: Callable[[], float] | None = None,
    connect_timeout: float = 20.0,
    drain_timeout: float = 5.0,
    path: str = "/",
) -> RpcCounts:
    """``clients`` clients calling the server (``rpc``: ``ping`` RPCs, else RAW echoes)
    against ``ws://host:port/path`` on a fresh uvloop loop; see the module docstring."""
    load = LoadState()
    result = RpcCounts(clients=clients)
    async with loadclient.connections(
        load, result, host, port, RpcConnection, clients, lambda _: {"load": load, "rpc": rpc},
        timeout=connect_timeout, what="clients", path=path,
    ) as conns:  # fmt: skip
        deadline = time.monotonic() + connect_timeout
        while not all(c.ready for c in conns):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sum(not c.ready for c in conns)} clients never got ready")
            await asyncio.sleep(0.01)
        t_go = start_at() if start_at is not None else time.monotonic()
        for conn in conns:
            conn.epoch = t_go - 1.0
        result.window_sent = await run_window(load, conns, inflight, t_go, warmup, seconds, result)
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and load.received < load.sent:
            await asyncio.sleep(0.01)
        for conn in conns:
            conn.on_close = lambda code, reason: None  # closing now is expected
        await close_connections(conns, drain_timeout)
    return result


# -- the rows ---------------------------------------------------------------------------------


class RpcScenario(ProcessScenario):
    """Round trips to the server: ``ping`` RPCs answered by ``pong`` (or RAW echoes)."""

    mode = "mp-rpc"
    table = TABLE
    seconds = 4.0

    def __init__(self, rpc: bool) -> None:
        self.rpc = rpc
        self.name = "rpc" if rpc else "raw"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass  # `main` has the options of every row

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        pass

    def config_text(self, args: argparse.Namespace) -> str:
        return f"{self.name}: {args.clients} clients x {args.inflight} in flight"

    def describe(self, run: dict[str, Any]) -> str:
        return describe(run)

    def load(self, args: argparse.Namespace) -> Load:
        configs = [
            {"clients": n, "rpc": self.rpc, "inflight": args.inflight, "seconds": args.seconds,
             "warmup": args.warmup, "drain_timeout": args.drain_timeout}
            for n in split_evenly(args.clients, args.client_procs)
            if n > 0
        ]  # fmt: skip
        return Load(run_rpc_load, RpcCounts, configs, 3 * args.drain_timeout + 30)

    def figures(self, results: list[RpcCounts], server_cpu: float, window: float) -> dict:
        rate = sum(r.rate for r in results)
        sent, received = total(results, "sent"), total(results, "received")
        return {
            "ops_per_s": rate,
            **cpu_figures(results, server_cpu, window, rate, "op"),
            **latency_figures(results),
            "sent": sent,
            "received": received,
            "missing": sent - received,
            "errors": total(results, "errors"),
            "error_samples": error_samples(results),
        }


class RelayRow(Scenario):
    """`relay_bench` in mode unicast against the same server, its figures as this table's."""

    name = "relay"
    mode = "mp-rpc"
    table = TABLE
    seconds = 4.0

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def check(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        pass

    def config_text(self, args: argparse.Namespace) -> str:
        return f"relay: {args.clients} clients x {args.inflight} in flight, each to the next"

    def describe(self, run: dict[str, Any]) -> str:
        return describe(run)

    def measure(self, args: argparse.Namespace, target: Target, progress: Progress) -> dict:
        relay_args = copy.copy(args)
        relay_args.mode, relay_args.size = "unicast", PAYLOAD_SIZE
        run = relay_bench.SCENARIO.measure(relay_args, target, progress)
        run["ops_per_s"] = run["deliveries_per_s"]
        run["server_us_per_op"] = run["server_us_per_delivery"]
        return run


def describe(run: dict[str, Any]) -> str:
    return (
        f"{run['ops_per_s']:,.0f} ops/s, client CPU {run['client_cpu_pct']:.0f}%, server CPU "
        f"{run['server_cpu_pct']:.0f}% ({run['server_us_per_op']:.2f} us/op), p50 "
        f"{run['p50_us']:,.0f} us, p99 {run['p99_us']:,.0f} us, errors {run['errors']}, "
        f"missing {run['missing']}"
    )


def row_scenarios() -> dict[str, Scenario]:
    return {"relay": RelayRow(), "raw": RpcScenario(rpc=False), "rpc": RpcScenario(rpc=True)}


def server_command(shards: int) -> str:
    return (
        "wsfleet serve --gd-mp-api --quiet --bind {host} --port {port} "
        f"--shards {shards} --app wsfleet.loadtest.rpc_bench:setup"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=16, help="calls in flight per client")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated, of " + ",".join(ROWS)
    )
    bench.add_load_arguments(parser)
    parser.set_defaults(seconds=4.0)
    bench.add_run_arguments(parser)
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows or set(rows) - set(ROWS):
        parser.error(f"--rows: from {', '.join(ROWS)}")
    if args.runs < 1 or args.clients < 2 or args.inflight < 1 or args.shards < 1:
        parser.error("--runs >= 1, --clients >= 2, --inflight >= 1, --shards >= 1")
    if args.clients * args.inflight > relay_bench.GODOT_OUT_PACKETS:
        print(f"warning: {args.clients} x {args.inflight} in flight: more than a peer's queue")
    client_cpus = bench.check_load_arguments(parser, args)
    scenarios = row_scenarios()
    command = server_command(args.shards)
    servers = [{"name": r, "command": command, "runs": [], "failure": None} for r in rows]
    print(
        f"rpc bench: wsfleet {args.shards} shard(s) on CPUs {args.server_cpus or 'any'}, "
        f"{args.clients} clients x {args.inflight} in flight, {PAYLOAD_SIZE} B payloads, "
        f"{args.client_procs} load process(es) on CPUs {args.client_cpus or 'any'}, "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s, {args.runs} round(s)",
        flush=True,
    )
    for round_no in range(1, args.runs + 1):
        for s in servers:
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = bench.one_run(s["name"], command, args, scenarios[s["name"]])
            except ServerFailed as e:
                s["runs"].append({"ok": False, "failure": str(e)})
                print(f"FAILED: {e}", flush=True)
                continue
            s["runs"].append(run)
            stop = bench.describe_stop(run["stop"])
            if not run.get("ok"):
                print(f"run failed: {run['failure']}; {stop}", flush=True)
                continue
            print(f"{describe(run)}; {stop}", flush=True)
            for sample in run["error_samples"]:
                print(f"    {sample}")
    return report(servers, args, client_cpus, TABLE)


if __name__ == "__main__":
    sys.exit(main())
