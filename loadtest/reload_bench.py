"""What ``wsfleet reload`` costs the clients: ``python -m wsfleet.loadtest.reload_bench``.

Starts ``wsfleet serve --shards N``, connects C clients that each send a
sequence-numbered message every ``--interval`` seconds and check every echo in
order, runs ``wsfleet reload`` ``--runs`` times, and reports per reload: its
wall time and each shard's, the connections moved, and what the clients saw:
connections dropped, messages lost or out of order, and the echo latency
(median outside the reloads, the worst during one).  The reload's own lines
give the per-shard times.

Imports the public command line of wsfleet (run as processes), ``websockets``
and its siblings (`servers`) only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .servers import ServerProcess


@dataclass
class Client:
    index: int
    ws: ClientConnection
    sent_at: dict[int, float] = field(default_factory=dict)
    next_seq: int = 0
    received: int = 0
    bad: int = 0
    dropped: bool = False
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (when, seconds)

    async def send_loop(self, interval: float, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self.sent_at[self.next_seq] = time.monotonic()
                await self.ws.send(f"{self.index}:{self.next_seq}")
                self.next_seq += 1
                await asyncio.sleep(interval)
        except ConnectionClosed:
            self.dropped = True

    async def recv_loop(self) -> None:
        try:
            async for message in self.ws:
                now = time.monotonic()
                seq = int(str(message).split(":")[1])
                if seq != self.received:
                    self.bad += 1
                self.latencies.append((now, now - self.sent_at.pop(seq, now)))
                self.received += 1
        except ConnectionClosed:
            self.dropped = True


def _reload(control: str) -> tuple[float, int, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "wsfleet", "reload", "--control", control],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return time.monotonic() - started, done.returncode, done.stdout + done.stderr


async def _run(args: argparse.Namespace, control: str, port: int) -> None:
    url = f"ws://127.0.0.1:{port}"
    clients = []
    for i in range(args.clients):
        ws = await connect(url, open_timeout=30, ping_interval=None, max_queue=None)
        clients.append(Client(i, ws))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.send_loop(args.interval, stop)) for c in clients]
    tasks += [asyncio.create_task(c.recv_loop()) for c in clients]
    windows: list[tuple[float, float]] = []
    await asyncio.sleep(args.settle)
    for run in range(args.runs):
        start = time.monotonic()
        seconds, code, output = await asyncio.to_thread(_reload, control)
        windows.append((start, time.monotonic()))
        per_shard = [line.split(" in ")[-1] for line in output.splitlines() if " moved in " in line]
        print(f"reload {run + 1}: exit {code}, {seconds:.2f} s; shards: {', '.join(per_shard)}")
        if code:
            print(output, file=sys.stderr)
        await asyncio.sleep(args.settle)
    stop.set()
    await asyncio.sleep(1.0)  # the last echoes
    for c in clients:
        await c.ws.close()
    await asyncio.gather(*tasks, return_exceptions=True)

    def during(when: float) -> bool:
        return any(a <= when <= b for a, b in windows)

    inside = [s for c in clients for when, s in c.latencies if during(when)]
    outside = [s for c in clients for when, s in c.latencies if not during(when)]
    sent = sum(c.next_seq for c in clients)
    received = sum(c.received for c in clients)
    print(
        f"{args.clients} clients, {args.shards} shards: {sent} sent, {received} echoed, "
        f"lost {sent - received}, out of order {sum(c.bad for c in clients)}, "
        f"connections dropped {sum(c.dropped for c in clients)}"
    )
    if outside and inside:
        print(
            f"echo latency: median {statistics.median(outside) * 1000:.2f} ms outside the "
            f"reloads; during them median {statistics.median(inside) * 1000:.2f} ms, "
            f"worst {max(inside) * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.loadtest.reload_bench")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--clients", type=int, default=400)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between sends")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between reloads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        Path(folder).chmod(0o700)
        control = str(Path(folder) / "control.sock")
        server = ServerProcess(
            "wsfleet",
            f"python -m wsfleet serve --quiet --port {{port}} --shards {args.shards} "
            f"--control {control}",
            "",
        )
        try:
            server.wait_ready(30, 0.5)
            asyncio.run(_run(args, control, server.port))
        finally:
            server.stop(10)


if __name__ == "__main__":
    main()
