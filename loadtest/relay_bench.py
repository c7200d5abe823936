"""Multiplayer relay throughput: wsfleet (gd_mp_api=True) against Godot 3.2.3's own server.

    python -m wsfleet.loadtest.relay_bench [--runs 5] [--clients 50] [--seconds 5]
        [--mode all|unicast] [--inflight N] [--size 32] [--warmup 1] [--client-procs 1]
        [--server-cpus 0] [--client-cpus 1] [--server NAME=COMMAND ...] [--godot BIN]
        [--godot-script FILE] [--godot-sleep-usec 0] [--only NAMES] [--json FILE]

    python -m wsfleet.loadtest.relay_bench --serve-wsfleet --port PORT [--shards K]

The clients speak the multiplayer header (GODOT_PROTOCOL.md section 4: u8 type,
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

Servers (the default set; ``--server NAME=COMMAND`` with ``{port}`` replaces it):

* ``godot``: ``godot3-server`` running ``tests/godot/mp_server.gd`` as a pure relay
  (``--wsfleet-clients=0``), with ``OS.low_processor_usage_mode_sleep_usec`` set to
  ``--godot-sleep-usec`` (default 0: the main loop never sleeps, so Godot burns its
  core even when idle; its CPU figure is therefore 100 %). Its MultiplayerAPI takes
  the ``to=0`` frames, and they reach the script's ``network_peer_packet`` handler.
* ``wsfleet-1`` / ``wsfleet-2``: this module with ``--serve-wsfleet``,
  ``WebSocketServer(shards=K).listen(port, [], gd_mp_api=True)``, bound to
  127.0.0.1. It drains its packet queue in ``peer_packet``, as a game would, and
  polls until SIGTERM.

Like ``echo_bench``, each server is started fresh for every run, pinned with
``taskset -c --server-cpus``. The load processes are pinned to ``--client-cpus``.
``--runs`` rounds run the servers in the same order, and the table gives medians
and the ratio to the first server. Server CPU is the whole process tree (psutil).
The exit status is 1 if a server failed or any run counted errors or missing
deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

from wsfleet.loadtest.echo_bench import (
    CONNECT_CONCURRENCY,
    HOST,
    MAX_ERROR_SAMPLES,
    ServerFailed,
    ServerProcess,
    parse_cpus,
    percentile,
    split_evenly,
    thin_sorted,
)
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, apply_mask, connect

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
LATENCY_POINTS = 20_000
GODOT_OUT_PACKETS = 1024  # network/limits/websocket_server/max_out_packets
DRAIN_QUIET = 0.5  # seconds without a delivery that end the drain

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GODOT_SCRIPT = REPO / "tests" / "godot" / "mp_server.gd"


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
class RelayResult:
    """What one load process saw. Counts cover the whole run unless they say ``window``."""

    clients: int
    fanout: int = 0
    sent: int = 0  # frames written
    received: int = 0  # deliveries
    window_sent: int = 0
    window_received: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time in the window
    errors: int = 0
    sequence_errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # sorted sample, seconds

    @property
    def rate(self) -> float:
        return self.window_received / self.window_s if self.window_s > 0 else 0.0


class _Load:
    """State shared by the connections of one load process (one event loop)."""

    def __init__(self, fanout: int) -> None:
        self.fanout = fanout
        self.epoch = time.monotonic()  # replaced by the shared start time
        self.sending = False
        self.measuring = False
        self.sent = 0
        self.received = 0
        self.errors = 0
        self.sequence_errors = 0
        self.error_samples: list[str] = []
        self.latencies = array("d")

    def error(self, why: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(why)


class RelayConnection(WSConnection):
    """One multiplayer client: learns the peers from system messages, relays in a loop."""

    def __init__(self, host: str, port: int, *, load: _Load, unicast: bool, size: int) -> None:
        super().__init__(host, port)
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
            load.latencies.append(((self.now - from_seven_bits(sent_at)) & MASK28) / 1e6)

    def on_close(self, code: int | None, reason: str) -> None:
        self.load.error(f"the server closed a connection (code {code} {reason!r})")


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _relay_load(
    host: str,
    port: int,
    *,
    clients: int,
    total_clients: int,
    unicast: bool,
    inflight: int,
    size: int,
    seconds: float,
    warmup: float,
    start_at: Callable[[], float] | None,
    connect_timeout: float,
    drain_timeout: float,
) -> RelayResult:
    fanout = 1 if unicast else total_clients - 1
    load = _Load(fanout)
    result = RelayResult(clients=clients, fanout=fanout)
    conns: list[RelayConnection] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def open_one() -> RelayConnection:
        async with gate:
            return await connect(
                host,
                port,
                RelayConnection,
                timeout=connect_timeout,
                load=load,
                unicast=unicast,
                size=size,
            )

    try:
        opened = await asyncio.gather(*(open_one() for _ in range(clients)), return_exceptions=True)
        conns = [c for c in opened if isinstance(c, RelayConnection)]
        failures = [c for c in opened if not isinstance(c, RelayConnection)]
        if failures:
            raise ConnectionError(f"{len(failures)} of {clients} clients failed: {failures[0]!r}")
        # Every client must know every other one before the ring (or fan-out) is right.
        deadline = time.monotonic() + connect_timeout
        while not all(c.id and c.server_added and len(c.peers) == total_clients - 1 for c in conns):
            if time.monotonic() > deadline:
                known = sorted(len(c.peers) for c in conns)
                raise TimeoutError(f"peers known per client {known}, wanted {total_clients - 1}")
            await asyncio.sleep(0.01)

        t_go = start_at() if start_at is not None else time.monotonic()
        load.epoch = t_go - 1.0  # send times wrap after 268 s
        await _sleep_until(t_go)
        load.sending = True
        for conn in conns:
            conn.start(inflight)

        await _sleep_until(t_go + warmup)
        sent0, received0 = load.sent, load.received
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        load.measuring = True
        await _sleep_until(t_go + warmup + seconds)
        load.measuring = False
        result.window_s = time.perf_counter() - wall0
        result.cpu_s = time.process_time() - cpu0
        result.window_received = load.received - received0
        result.window_sent = load.sent - sent0
        load.sending = False

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
            conn.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=drain_timeout)
    finally:
        for conn in conns:
            conn.abort()
    for conn in conns:
        if conn.error is not None:
            load.error(f"protocol: {conn.error}")
    result.sent = load.sent
    result.received = load.received
    result.errors = load.errors
    result.sequence_errors = load.sequence_errors
    result.error_samples = load.error_samples
    result.latencies = thin_sorted(sorted(load.latencies), LATENCY_POINTS)
    return result


def run_relay_load(
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
) -> RelayResult:
    """Run ``clients`` of the relay load (out of ``total_clients`` in all load processes)
    on a fresh uvloop loop in this thread; see the module docstring."""
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}")
    return uvloop.run(
        _relay_load(
            host,
            port,
            clients=clients,
            total_clients=total_clients or clients,
            unicast=unicast,
            inflight=inflight,
            size=size,
            seconds=seconds,
            warmup=warmup,
            start_at=start_at,
            connect_timeout=connect_timeout,
            drain_timeout=drain_timeout,
        )
    )


def _client_main(pipe: Connection, cpu: int | None, host: str, port: int, cfg: dict) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    def start_at() -> float:
        pipe.send(("ready", None))
        if not pipe.poll(120):
            raise TimeoutError("no start time from the benchmark process")
        return pipe.recv()

    try:
        result = run_relay_load(host, port, start_at=start_at, **cfg)
    except BaseException as e:
        pipe.send(("failed", f"{type(e).__name__}: {e}"))
    else:
        pipe.send(("done", asdict(result)))
    finally:
        pipe.close()


# -- the wsfleet server (--serve-wsfleet) -------------------------------------------------------


def serve_wsfleet(port: int, shards: int, host: str = HOST) -> int:
    """wsfleet in multiplayer mode as a pure relay that drains its own packet queue."""
    from wsfleet import Error, WebSocketServer

    server = WebSocketServer(shards=shards)
    server.bind_ip = host
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    def on_packet(_peer: int) -> None:
        while server.get_available_packet_count():
            server.get_packet()

    server.connect("peer_packet", on_packet)
    error = server.listen(port, [], gd_mp_api=True)
    if error != Error.OK:
        print(f"listen on {host}:{port} failed: {error!r}", file=sys.stderr, flush=True)
        return 3
    print(f"wsfleet relay: {shards} shard(s) on {host}:{server.port}", flush=True)
    try:
        while not stopping:
            server.poll(0.1)
    finally:
        server.stop()
    return 0


# -- one run --------------------------------------------------------------------------------


def _sleep_until_sync(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_clients(
    port: int, args: argparse.Namespace, server: ServerProcess
) -> tuple[list[RelayResult], float, float]:
    """The load processes' results, the server's CPU seconds in the window, the window."""
    ctx = multiprocessing.get_context("spawn")
    cpus = parse_cpus(args.client_cpus)
    shares = [n for n in split_evenly(args.clients, args.client_procs) if n > 0]
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        for i, n in enumerate(shares):
            cfg = {
                "clients": n,
                "total_clients": args.clients,
                "unicast": args.mode == "unicast",
                "inflight": args.inflight,
                "size": args.size,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "drain_timeout": args.drain_timeout,
            }
            mine, theirs = ctx.Pipe()
            cpu = cpus[i % len(cpus)] if cpus else None
            proc = ctx.Process(
                target=_client_main, args=(theirs, cpu, HOST, port, cfg), daemon=True
            )
            proc.start()
            theirs.close()
            procs.append((proc, mine))

        deadline = time.monotonic() + 60
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not get ready within 60 s")
            kind, detail = pipe.recv()
            if kind != "ready":
                raise RuntimeError(f"load process: {detail}")
        t_go = time.monotonic() + 0.1
        for _, pipe in procs:
            pipe.send(t_go)

        _sleep_until_sync(t_go + args.warmup)
        cpu0 = server.cpu_seconds()
        w0 = time.monotonic()
        _sleep_until_sync(t_go + args.warmup + args.seconds)
        server_cpu = server.cpu_seconds() - cpu0
        window = time.monotonic() - w0

        results: list[RelayResult] = []
        deadline = time.monotonic() + 3 * args.drain_timeout + 30
        for _, pipe in procs:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError("a load process did not finish in time")
            kind, detail = pipe.recv()
            if kind != "done":
                raise RuntimeError(f"load process: {detail}")
            results.append(RelayResult(**detail))
        return results, server_cpu, window
    finally:
        for proc, pipe in procs:
            pipe.close()
            proc.join(10)
            if proc.is_alive():
                proc.kill()  # that pid only
                proc.join(5)


def one_run(name: str, template: str, args: argparse.Namespace) -> dict[str, Any]:
    server = ServerProcess(name, template, args.server_cpus)
    run: dict[str, Any] = {"port": server.port, "argv": server.argv}
    try:
        server.wait_ready(args.start_timeout, args.settle)
        try:
            results, server_cpu, window = run_clients(server.port, args, server)
        except (RuntimeError, OSError, EOFError) as e:
            run.update(ok=False, failure=f"{e!r}; server log: {server.log_tail(4)}")
            return run
        rate = sum(r.rate for r in results)
        window_s = max(r.window_s for r in results)
        sent = sum(r.sent for r in results)
        received = sum(r.received for r in results)
        fanout = results[0].fanout
        latencies = sorted(x for r in results for x in r.latencies)
        run.update(
            ok=True,
            deliveries_per_s=rate,
            frames_in_per_s=sum(r.window_sent for r in results) / window_s if window_s else 0.0,
            client_cpu_pct=100 * sum(r.cpu_s / r.window_s for r in results if r.window_s > 0),
            server_cpu_pct=100 * server_cpu / window,
            server_us_per_delivery=1e6 * server_cpu / (rate * window) if rate else float("nan"),
            p50_us=1e6 * percentile(latencies, 0.50),
            p99_us=1e6 * percentile(latencies, 0.99),
            window_received=sum(r.window_received for r in results),
            sent=sent,
            received=received,
            fanout=fanout,
            missing=sent * fanout - received,
            errors=sum(r.errors for r in results),
            sequence_errors=sum(r.sequence_errors for r in results),
            error_samples=[s for r in results for s in r.error_samples][:MAX_ERROR_SAMPLES],
            server_processes=len(server.tree),
        )
        return run
    finally:
        run["stop"] = server.stop(args.stop_timeout)


# -- main -----------------------------------------------------------------------------------


def default_servers(args: argparse.Namespace, workdir: str) -> list[str]:
    me = "python -m wsfleet.loadtest.relay_bench --serve-wsfleet --port {port}"
    # Godot writes logs/ under res:// (its working directory when there is no project) and
    # user data under $HOME: keep both in a temporary directory. LANG: Godot complains of "C".
    w = shlex.quote(workdir)
    godot = (
        f"env -C {w} HOME={w} XDG_DATA_HOME={w} XDG_CONFIG_HOME={w} XDG_CACHE_HOME={w} "
        "LANG=en_US.UTF-8 "
        f"{shlex.quote(args.godot)} --no-window -s {shlex.quote(str(args.godot_script))}"
        " --wsfleet-port={port} --wsfleet-clients=0 --wsfleet-timeout=0 --wsfleet-quiet=1"
        f" --wsfleet-sleep-usec={args.godot_sleep_usec}"
    )
    return [f"godot={godot}", f"wsfleet-1={me} --shards 1", f"wsfleet-2={me} --shards 2"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [r for r in runs if r.get("ok")]
    if not good:
        return None
    keys = (
        "deliveries_per_s",
        "frames_in_per_s",
        "client_cpu_pct",
        "server_cpu_pct",
        "server_us_per_delivery",
        "p50_us",
        "p99_us",
    )
    summary: dict[str, Any] = {k: statistics.median(r[k] for r in good) for k in keys}
    summary["errors"] = sum(r["errors"] for r in good)
    summary["missing"] = sum(r["missing"] for r in good)
    summary["runs_ok"] = len(good)
    return summary


def print_table(servers: list[dict[str, Any]], client_capacity_pct: float) -> None:
    base = servers[0]["summary"]["deliveries_per_s"] if servers[0]["summary"] else None
    vs = f"vs {servers[0]['name']}"
    head = (
        f"{'server':<12} {'deliv/s':>10} {vs:>10} {'frames/s':>9} {'client CPU':>10} "
        f"{'server CPU':>10} {'srv us/dlv':>10} {'p50 us':>8} {'p99 us':>8} {'errors':>6} "
        f"{'missing':>7} {'runs':>4}"
    )
    print(head)
    print("-" * len(head))
    for s in servers:
        m = s["summary"]
        if m is None:
            print(f"{s['name']:<12} failed: {s['failure']}")
            continue
        ratio = f"{m['deliveries_per_s'] / base:.2f}x" if base else "-"
        print(
            f"{s['name']:<12} {m['deliveries_per_s']:>10,.0f} {ratio:>10} "
            f"{m['frames_in_per_s']:>9,.0f} {m['client_cpu_pct']:>9.0f}% "
            f"{m['server_cpu_pct']:>9.0f}% {m['server_us_per_delivery']:>10.2f} "
            f"{m['p50_us']:>8.0f} {m['p99_us']:>8.0f} {m['errors']:>6} {m['missing']:>7} "
            f"{m['runs_ok']:>4}"
        )
        if m["client_cpu_pct"] >= 0.9 * client_capacity_pct:
            print(f"{'':<12} note: the load processes were near saturation: the figure is a floor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
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
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--server-cpus", default="0", help="taskset -c list; '' for no pinning")
    parser.add_argument("--client-cpus", default="1", help="CPUs for the load processes")
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=COMMAND",
        help="a server command with {port}; repeat; replaces the default set",
    )
    parser.add_argument(
        "--only", metavar="NAMES", help="comma-separated names: run only these servers"
    )
    parser.add_argument("--godot", default=os.environ.get("WSFLEET_GODOT", "godot3-server"))
    parser.add_argument("--godot-script", type=Path, default=DEFAULT_GODOT_SCRIPT)
    parser.add_argument("--godot-sleep-usec", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=0.5, help="wait after the first handshake")
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--json", metavar="FILE")
    serve = parser.add_argument_group("server mode (what the benchmark starts)")
    serve.add_argument("--serve-wsfleet", action="store_true", help="run the wsfleet relay")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--shards", type=int, default=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.serve_wsfleet:
        return serve_wsfleet(args.port, args.shards)
    if args.inflight is None:
        args.inflight = 16 if args.mode == "unicast" else 2
    if args.runs < 1 or args.clients < 2 or args.inflight < 1 or args.size < MIN_SIZE:
        parser.error(f"--runs >= 1, --clients >= 2, --inflight >= 1, --size >= {MIN_SIZE}")
    if args.client_procs < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--client-procs must be >= 1, --seconds > 0, --warmup >= 0")
    if args.size + HEADER.size > 65535:
        parser.error("--size: frames must stay under 64 KiB")
    allowed = os.sched_getaffinity(0)
    client_cpus = parse_cpus(args.client_cpus)
    if not set(client_cpus) <= allowed:
        parser.error(f"--client-cpus {args.client_cpus} not within this process's CPUs {allowed}")
    if args.clients * args.inflight > GODOT_OUT_PACKETS:
        print(
            f"warning: {args.clients} clients x {args.inflight} in flight > "
            f"{GODOT_OUT_PACKETS}: Godot may drop frames (its per-peer out queue)"
        )
    if set(client_cpus) & set(parse_cpus(args.server_cpus)):
        print("warning: client and server CPUs overlap; the figures will be noisier")

    workdir = tempfile.mkdtemp(prefix="relay_bench-")
    try:
        return _benchmark(parser, args, client_cpus, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _benchmark(
    parser: argparse.ArgumentParser, args: argparse.Namespace, client_cpus: list[int], workdir: str
) -> int:
    specs = args.server or default_servers(args, workdir)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        specs = [spec for spec in specs if spec.partition("=")[0].strip() in wanted]
        if not specs:
            parser.error(f"--only {args.only}: no such server")
    if not args.server and not args.godot_script.is_file():
        print(f"warning: {args.godot_script} not found; godot will fail to start")
    servers: list[dict[str, Any]] = []
    for spec in specs:
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or "{port}" not in command:
            parser.error(f"--server {spec!r}: expected NAME=COMMAND with {{port}} in COMMAND")
        servers.append(
            {"name": name.strip(), "command": command.strip(), "runs": [], "failure": None}
        )

    fanout = 1 if args.mode == "unicast" else args.clients - 1
    print(
        f"relay, mode {args.mode}: {args.clients} clients x {args.inflight} in flight "
        f"(x {fanout} deliveries each), {args.size} B payload + 9 B header, "
        f"{args.warmup:g} s warm-up + {args.seconds:g} s, {args.runs} run(s); server CPUs "
        f"{args.server_cpus or 'any'}, {args.client_procs} load process(es) on CPUs "
        f"{args.client_cpus or 'any'}",
        flush=True,
    )
    for round_no in range(1, args.runs + 1):
        for s in servers:
            if s["failure"] is not None and not s["runs"]:
                continue
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = one_run(s["name"], s["command"], args)
            except ServerFailed as e:
                s["failure"] = str(e)
                print(f"FAILED: {e}", flush=True)
                if s["runs"]:
                    s["runs"].append({"ok": False, "failure": str(e)})
                continue
            s["runs"].append(run)
            stop = run["stop"]
            stop_text = f"stopped: status {stop['exit_status']} in {stop['stop_s']:.2f} s"
            if stop["killed"]:
                stop_text += f", SIGKILLed {stop['killed']}"
            if stop["left_running"]:
                stop_text += f", STILL RUNNING {stop['left_running']}"
            if not run.get("ok"):
                print(f"run failed: {run['failure']}; {stop_text}", flush=True)
                continue
            print(
                f"{run['deliveries_per_s']:,.0f} deliveries/s ({run['frames_in_per_s']:,.0f} "
                f"frames in/s), client CPU {run['client_cpu_pct']:.0f}%, server CPU "
                f"{run['server_cpu_pct']:.0f}% ({run['server_us_per_delivery']:.2f} us/delivery),"
                f" p50 {run['p50_us']:.0f} us, p99 {run['p99_us']:.0f} us, errors "
                f"{run['errors']}, missing {run['missing']}; {stop_text}",
                flush=True,
            )
            for sample in run["error_samples"]:
                print(f"    {sample}")

    for s in servers:
        s["summary"] = summarize(s["runs"])
        if s["summary"] is None and s["failure"] is None:
            s["failure"] = "no successful run"
    capacity = 100.0 * min(args.client_procs, len(client_cpus) or os.cpu_count() or 1)
    print()
    print_table(servers, capacity)
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        skip = ("json", "server", "serve_wsfleet", "port", "shards")
        config = {k: v for k, v in config.items() if k not in skip}
        with open(args.json, "w") as f:
            json.dump(
                {"config": config, "cpu_count": os.cpu_count(), "servers": servers}, f, indent=1
            )
    ok = all(
        s["summary"] is not None and s["summary"]["errors"] == 0 and s["summary"]["missing"] == 0
        for s in servers
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
