"""Soak: many concurrent connections with steady echo traffic for minutes, every echo checked.

    python -m wsfleet.loadtest.soak [--connections 10000] [--seconds 300] [--rate 1]
        [--size 64] [--shards 2] [--procs 2] [--warmup 60] [--sample 10] [--json FILE]

Not a CI test (issue 6): it starts ``wsfleet serve`` (``--shards``, bound to
127.0.0.1, its own session) with the soft open-files limit raised as far as
the connections need, opens ``--connections`` connections from ``--procs`` load processes,
then for ``--seconds`` every connection sends ``--rate`` messages a second
(spread evenly over each second, so the traffic is steady), each carrying the
connection's next sequence number. An echo must come back on the same
connection, in order, with the right bytes: anything else is counted as
reordered/corrupt, an echo still missing after the drain as lost, a
connection that closes as an error.

While it runs, the front's, the supervisor's and each shard's RSS are read
every ``--sample`` seconds (psutil). At the end it reports the RSS per
connection (the tree's RSS with the connections open, minus before they
opened, over their count) and whether memory stayed flat after the warm-up
(``--warmup`` seconds): the growth of the tree's RSS from the first sample
after the warm-up to the last. The exit status is 1 if any message was lost,
reordered or corrupt, any connection failed, or the tree's RSS grew by more
than ``--max-growth`` (default 5 %) after the warm-up.

May import `counters`, `loadclient`, `loadprocs`, `procstats`, `servers` and `wsclient`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import struct
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from wsfleet.loadtest import loadclient
from wsfleet.loadtest.counters import Counters, LoadState, merge_histograms
from wsfleet.loadtest.loadprocs import client_main, split_evenly
from wsfleet.loadtest.procstats import FD_MARGIN, ResourceLimitError, raise_nofile, rss_by_role
from wsfleet.loadtest.servers import HOST, ServerProcess
from wsfleet.loadtest.wsclient import OP_BINARY, WSConnection, build_frame

_SEQ = struct.Struct("!Q")
MAX_CONNECTIONS = 20_000
MAX_SECONDS = 3600


@dataclass(kw_only=True)
class SoakCounts(Counters):
    """One load process's totals (`counters.Counters`: sent counts messages, received
    echoes, latencies every round trip; errors are the connections that closed)."""

    connections: int = 0
    lost: int = 0  # echoes still missing after the drain
    reordered: int = 0  # an echo whose sequence number is not the next one
    corrupt: int = 0  # wrong length or bytes
    dropped: int = 0  # connections that closed before the end


class _SoakLoad(LoadState):
    def __init__(self) -> None:
        super().__init__()
        self.reordered = 0
        self.corrupt = 0
        self.dropped = 0


class SoakConnection(WSConnection):
    """Sends numbered messages when told; checks each echo is the next number, intact."""

    def __init__(self, host: str, port: int, *, load: _SoakLoad, size: int, **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.load = load
        self.padding = bytes(max(0, size - _SEQ.size))
        self.next_to_send = 0
        self.next_expected = 0
        self.sent_at: dict[int, float] = {}
        self.closing_by_us = False  # set before the load closes its connections at the end

    def send_next(self) -> None:
        seq = self.next_to_send
        self.next_to_send += 1
        self.sent_at[seq] = time.monotonic()
        self.send_raw(build_frame(OP_BINARY, _SEQ.pack(seq) + self.padding))
        self.load.sent += 1

    def on_message(self, opcode: int, payload: bytes) -> None:
        load = self.load
        load.received += 1
        if opcode != OP_BINARY or len(payload) != _SEQ.size + len(self.padding):
            load.corrupt += 1
            return
        (seq,) = _SEQ.unpack_from(payload)
        if payload[_SEQ.size :] != self.padding:
            load.corrupt += 1
        if seq != self.next_expected:
            load.reordered += 1
        self.next_expected = seq + 1
        started = self.sent_at.pop(seq, None)
        if started is not None:
            load.latencies.append((time.monotonic() - started) * 1e6)

    def on_close(self, code: int | None, reason: str) -> None:
        if not self.closing_by_us:
            self.load.dropped += 1
            self.load.error(f"connection closed by the server: {code} {reason!r}")


@loadclient.on_uvloop
async def soak_load(
    host: str,
    port: int,
    *,
    connections: int,
    seconds: float,
    rate: float,
    size: int,
    drain_timeout: float = 10.0,
    start_at: Any = None,
    path: str = "/",
) -> SoakCounts:
    """Open ``connections``, then send ``rate`` messages per connection per second, spread
    evenly, for ``seconds``; drain; close. Runs in one load process."""
    load = _SoakLoad()
    counts = SoakCounts(connections=connections)
    conns: list[SoakConnection] = await loadclient.open_connections(
        host,
        port,
        SoakConnection,
        connections,
        lambda i: {"load": load, "size": size},
        timeout=30.0,
        path=path,
    )
    t_go = start_at() if start_at is not None else time.monotonic()
    await asyncio.sleep(max(0.0, t_go - time.monotonic()))
    # A tick every 10 ms sends to the slice of connections whose turn it is, so each
    # connection sends `rate` times a second and the load has no bursts.
    tick = 0.01
    per_tick = connections * rate * tick
    owed = 0.0
    cursor = 0
    end = t_go + seconds
    next_tick = t_go
    while True:
        now = time.monotonic()
        if now >= end:
            break
        owed += per_tick
        while owed >= 1.0:
            owed -= 1.0
            conn = conns[cursor]
            cursor = (cursor + 1) % connections
            if conn.is_open:
                conn.send_next()
        next_tick += tick
        await asyncio.sleep(max(0.0, next_tick - time.monotonic()))  # yields even when late
    deadline = time.monotonic() + drain_timeout
    while time.monotonic() < deadline and any(c.sent_at for c in conns if c.is_open):
        await asyncio.sleep(0.01)
    counts.lost = sum(len(c.sent_at) for c in conns)
    for conn in conns:
        conn.closing_by_us = True
    await loadclient.close_connections(conns, drain_timeout)
    load.finish(counts, conns)
    counts.reordered, counts.corrupt, counts.dropped = load.reordered, load.corrupt, load.dropped
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    per_process = -(-args.connections // args.procs)
    per_shard = -(-args.connections // args.shards)
    try:
        # Inherited by the server and the load processes started below.
        raise_nofile(max(per_process, per_shard) + FD_MARGIN)
    except ResourceLimitError as exc:
        raise SystemExit(str(exc)) from exc
    server = ServerProcess(
        "wsfleet",
        f"python -m wsfleet serve --quiet --bind 127.0.0.1 --port {{port}} --shards {args.shards}",
        "",
    )
    report: dict[str, Any] = {"config": vars(args), "samples": []}
    procs: list[tuple[multiprocessing.Process, Connection]] = []
    try:
        server.wait_ready(timeout=30, settle=0.5)
        idle = rss_by_role(server.pid)
        report["rss_before"] = idle
        ctx = multiprocessing.get_context("spawn")
        for n in split_evenly(args.connections, args.procs):
            mine, theirs = ctx.Pipe()
            cfg = {"connections": n, "seconds": args.seconds, "rate": args.rate, "size": args.size}
            # The spawned process inherits the raised open-files limit.
            proc = ctx.Process(
                target=client_main,
                args=(soak_load, theirs, None, HOST, server.port, cfg),
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append((proc, mine))
        t0 = time.monotonic()
        for _, pipe in procs:
            if not pipe.poll(600):
                raise RuntimeError("a load process did not connect within 600 s")
            status, detail = pipe.recv()
            if status != "ready":
                raise RuntimeError(f"load process: {detail}")
        connected = rss_by_role(server.pid)
        report["connect_s"] = round(time.monotonic() - t0, 1)
        report["rss_connected"] = connected
        report["rss_per_connection"] = (connected["total"] - idle["total"]) / args.connections
        print(
            f"{args.connections} connections open in {report['connect_s']} s; "
            f"RSS {connected['total'] / 2**20:.1f} MiB "
            f"({report['rss_per_connection'] / 1024:.2f} KiB per connection)",
            flush=True,
        )
        start = time.monotonic() + 0.5
        for _, pipe in procs:
            pipe.send(start)
        cpu0 = server.cpu_seconds()
        while time.monotonic() < start + args.seconds:
            time.sleep(min(args.sample, max(0.0, start + args.seconds - time.monotonic())))
            sample = rss_by_role(server.pid)
            sample["t"] = round(time.monotonic() - start, 1)
            report["samples"].append(sample)
            roles = " ".join(
                f"{k} {v / 2**20:.1f}" for k, v in sample.items() if k not in ("t", "total")
            )
            print(f"[{sample['t']:6.1f} s] RSS MiB: {roles}; total {sample['total'] / 2**20:.1f}")
        report["server_cpu_pct"] = 100 * (server.cpu_seconds() - cpu0) / args.seconds
        results = []
        for proc, pipe in procs:
            if not pipe.poll(args.seconds + 120):
                raise RuntimeError("a load process did not report")
            status, detail = pipe.recv()
            if status != "done":
                raise RuntimeError(f"load process: {detail}")
            results.append(detail)
            proc.join(10)
    finally:
        for proc, _ in procs:
            if proc.is_alive():
                proc.kill()
        report["stop"] = server.stop(timeout=15)
    totals = {
        key: sum(r[key] for r in results)
        for key in ("connections", "sent", "received", "lost", "reordered", "corrupt", "dropped")
    }
    report["totals"] = totals
    report["errors"] = [e for r in results for e in r["error_samples"]]
    hist = merge_histograms(r["latency_hist"] for r in results)
    p50, p99, p999 = (hist.get_value_at_percentile(p) for p in (50, 99, 99.9))
    report["latency_us"] = {"p50": p50, "p99": p99, "p99.9": p999, "max": hist.get_max_value()}
    after_warmup = [s for s in report["samples"] if s["t"] >= args.warmup]
    if len(after_warmup) >= 2:
        first, last = after_warmup[0]["total"], after_warmup[-1]["total"]
        report["rss_growth_after_warmup"] = (last - first) / first
    else:
        report["rss_growth_after_warmup"] = None
    return report


def verdict(report: dict[str, Any], max_growth: float) -> list[str]:
    """What failed (empty when the soak held)."""
    t = report["totals"]
    failures = [f"{t[k]} {k}" for k in ("lost", "reordered", "corrupt", "dropped") if t[k]]
    if t["sent"] != t["received"] + t["lost"]:
        failures.append(f"sent {t['sent']} != received {t['received']} + lost {t['lost']}")
    growth = report["rss_growth_after_warmup"]
    if growth is None:
        failures.append("too few memory samples after the warm-up")
    elif growth > max_growth:
        failures.append(f"RSS grew {growth:.1%} after the warm-up (limit {max_growth:.0%})")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsfleet.loadtest.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument(
        "--seconds", type=float, default=300.0, help="steady traffic, after connect"
    )
    parser.add_argument(
        "--rate", type=float, default=1.0, help="messages per connection per second"
    )
    parser.add_argument("--size", type=int, default=64, help="message size (at least 8)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--procs", type=int, default=2, help="load processes")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds before RSS must be flat"
    )
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-growth", type=float, default=0.05, help="RSS growth allowed")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= MAX_CONNECTIONS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--connections 1..{MAX_CONNECTIONS}, --seconds up to {MAX_SECONDS}")
    if args.size < _SEQ.size or args.rate <= 0 or args.procs < 1 or args.shards < 1:
        parser.error("--size >= 8, --rate > 0, --procs >= 1, --shards >= 1")
    report = run(args)
    failures = verdict(report, args.max_growth)
    t = report["totals"]
    lat = report["latency_us"]
    growth = report["rss_growth_after_warmup"]
    print()
    print(f"connections       {t['connections']:,} (open in {report['connect_s']} s)")
    print(f"messages          sent {t['sent']:,}, echoed {t['received']:,}")
    print(f"lost / reordered / corrupt / dropped   {t['lost']} / {t['reordered']} / "
          f"{t['corrupt']} / {t['dropped']}")  # fmt: skip
    print(f"round trip        p50 {lat['p50']:,.0f} us, p99 {lat['p99']:,.0f} us, "
          f"p99.9 {lat['p99.9']:,.0f} us, max {lat['max']:,} us")  # fmt: skip
    print(f"server CPU        {report['server_cpu_pct']:.0f} % of a core")
    print(f"RSS per conn      {report['rss_per_connection'] / 1024:.2f} KiB (whole tree)")
    growth_text = "n/a" if growth is None else f"{growth:+.2%}"
    print(f"RSS after warm-up {growth_text} (first to last sample after {args.warmup:g} s)")
    print(f"stop              {report['stop']}")
    for error in report["errors"]:
        print(f"error: {error}")
    print("result: " + ("held" if not failures else "FAILED: " + "; ".join(failures)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
