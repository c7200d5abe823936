"""Idle memory per connection with permessage-deflate off and on (issue 13).

For each setting, a fresh ``wsfleet serve --shards 1 --ping-interval 0`` (with
``--compression`` and its options where the setting says so) and
``connections`` idle clients (the ``websockets`` package, compressing or not);
every client sends one message and reads its echo, so that the server has
inflated and deflated once on that connection and its zlib contexts exist where
they are kept.  The shard's RSS is read (psutil, `procstats.rss_by_role`) after
``warmup`` such connections (one-time allocations: the first zlib buffers, the
allocator's arenas) and again after ``connections`` more; the growth divided by
``connections`` is the figure (the whole tree's is printed beside it).

Settings (``--settings``, comma-separated, default all):

* ``off``: the server without compression, clients offering it (nothing negotiated);
* ``on-plain``: ``--compression``, clients not offering it (the fast path);
* ``takeover``: ``--compression``, clients offering the default (context takeover
  both ways: zlib contexts live as long as the connection);
* ``no-takeover``: ``--compression --compression-no-context-takeover`` (a fresh
  context per message, freed after it).

Usage: ``python -m wsfleet.loadtest.deflate_memory [--connections 2000] [--warmup 100]
[--message-bytes 1024] [--settings off,takeover] [--server-cpus 0] [--client-cpus 1]``.

Imports `procstats` and the ``websockets`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect

from wsfleet.loadtest.procstats import parse_cpus, pinned, raise_nofile, rss_by_role

#: setting -> (extra `wsfleet serve` options, whether the clients offer compression)
SETTINGS: dict[str, tuple[tuple[str, ...], bool]] = {
    "off": ((), True),
    "on-plain": (("--compression",), False),
    "takeover": (("--compression",), True),
    "no-takeover": (("--compression", "--compression-no-context-takeover"), True),
}
CONNECT_AT_ONCE = 50


@dataclass
class Result:
    setting: str
    connections: int
    shard_before: int
    shard_after: int
    tree_before: int
    tree_after: int
    negotiated: int  # connections that have the extension

    @property
    def shard_per_connection(self) -> float:
        return (self.shard_after - self.shard_before) / self.connections

    @property
    def tree_per_connection(self) -> float:
        return (self.tree_after - self.tree_before) / self.connections


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not listen in time")


async def _open(url: str, count: int, compress: bool, message: str) -> list[ClientConnection]:
    """``count`` connections, each after one message each way."""
    opened: list[ClientConnection] = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one() -> None:
        async with gate:
            ws = await connect(url, compression="deflate" if compress else None,
                               ping_interval=None, open_timeout=30)  # fmt: skip
            await ws.send(message)
            if await ws.recv() != message:
                raise RuntimeError("a wrong echo")
            opened.append(ws)

    await asyncio.gather(*(one() for _ in range(count)))
    return opened


async def _measure(setting: str, args: argparse.Namespace, server_cpus: list[int]) -> Result:
    options, compress = SETTINGS[setting]
    port = _free_port()
    argv = [sys.executable, "-m", "wsfleet", "serve", "--quiet", "--port", str(port),
            "--bind", "127.0.0.1", "--shards", "1", "--ping-interval", "0", *options]  # fmt: skip
    if server_cpus:
        argv = ["taskset", "-c", ",".join(map(str, server_cpus)), *argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    clients: list[ClientConnection] = []
    try:
        _wait_listening(port, proc)
        url = f"ws://127.0.0.1:{port}/"
        message = ("idle memory, " * (args.message_bytes // 13 + 1))[: args.message_bytes]
        clients += await _open(url, args.warmup, compress, message)
        await asyncio.sleep(1)
        before = rss_by_role(proc.pid)
        clients += await _open(url, args.connections, compress, message)
        await asyncio.sleep(1)
        after = rss_by_role(proc.pid)
        negotiated = sum(1 for ws in clients[args.warmup :] if ws.protocol.extensions)
        return Result(setting, args.connections, before["shard0"], after["shard0"],
                      before["total"], after["total"], negotiated)  # fmt: skip
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsfleet.loadtest.deflate_memory")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--message-bytes", type=int, default=1024)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--server-cpus", default="", help="taskset -c list for the server")
    parser.add_argument("--client-cpus", default="", help="CPUs for the clients (this process)")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    raise_nofile(args.connections + args.warmup + 256)
    server_cpus = parse_cpus(args.server_cpus)
    print(f"{args.connections} connections (after {args.warmup}), one {args.message_bytes}-byte "
          f"message each way, wsfleet serve --shards 1, pid {os.getpid()}")  # fmt: skip
    print(f"{'setting':<12} {'negotiated':>10} {'shard KiB/conn':>15} {'tree KiB/conn':>14}")
    with pinned(set(parse_cpus(args.client_cpus))):
        for setting in settings:
            result = asyncio.run(_measure(setting, args, server_cpus))
            print(f"{setting:<12} {result.negotiated:>10} "
                  f"{result.shard_per_connection / 1024:>15.1f} "
                  f"{result.tree_per_connection / 1024:>14.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
