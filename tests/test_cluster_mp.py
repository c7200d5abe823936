"""Godot's multiplayer relay (``gd_mp_api``) across the nodes of a cluster (issue 14).

Real parts: a ``nats-server -js`` (`natsproc`), two ``wsfleet serve --gd-mp-api
--cluster`` nodes (the built-in relay), websockets clients that speak Godot's
9-byte multiplayer header (docs/GODOT_WIRE.md section 4). Delivery is in order
per sender and receiver, so a marker sent after a frame proves the frame's
absence once the marker has arrived.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .conftest import TESTS_DIR
from .natsproc import NatsServer
from .serveproc import ServeProcess

HEADER = struct.Struct("<Bii")
SYS_NONE, SYS_ADD, SYS_DEL, SYS_ID = 0, 1, 2, 3
SERVER = 1
WAIT = 20.0


def frame(sender: int, to: int, payload: bytes) -> bytes:
    return HEADER.pack(SYS_NONE, sender, to) + payload


class MPClient:
    """A multiplayer client that records every frame it receives, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.id = 0
        self.frames: list[bytes] = []
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, port: int) -> MPClient:
        ws = await connect(f"ws://127.0.0.1:{port}/", max_size=None, open_timeout=10)
        client = cls(ws)
        first = await client.wait_for(lambda f: f[0] == SYS_ID)
        client.id = struct.unpack_from("<i", first, HEADER.size)[0]
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                assert isinstance(message, bytes), message
                self.frames.append(message)
                self._new.set()
        except ConnectionClosed:
            pass

    async def wait_for(self, match, start: int = 0) -> bytes:
        async with asyncio.timeout(WAIT):
            while True:
                for f in self.frames[start:]:
                    if match(f):
                        return f
                self._new.clear()
                await self._new.wait()

    def known(self) -> set[int]:
        """The peers SYS_ADD / SYS_DEL have told it of, server aside."""
        peers: set[int] = set()
        for f in self.frames:
            if f[0] in (SYS_ADD, SYS_DEL):
                (subject,) = struct.unpack_from("<i", f, HEADER.size)
                (peers.add if f[0] == SYS_ADD else peers.discard)(subject)
        peers.discard(SERVER)
        return peers

    async def knows(self, expected: set[int]) -> None:
        async with asyncio.timeout(WAIT):
            while self.known() != expected:
                self._new.clear()
                await self._new.wait()

    def data_from(self, sender: int) -> list[bytes]:
        return [f for f in self.frames if f[0] == SYS_NONE and HEADER.unpack_from(f)[1] == sender]

    async def send(self, to: int, payload: bytes) -> bytes:
        data = frame(self.id, to, payload)
        await self.ws.send(data)
        return data

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


def sys_index(client: MPClient, kind: int, subject: int) -> int:
    wanted = HEADER.pack(kind, SERVER, 0) + struct.pack("<i", subject)
    return client.frames.index(wanted)


@pytest.fixture
def mp_nodes(tmp_path: Path) -> Iterator[tuple[NatsServer, list[ServeProcess]]]:
    nats = NatsServer(tmp_path / "nats").start()
    nodes = [
        ServeProcess(
            "--gd-mp-api", "--cluster", nats.url, "--node-name", name, "--shards", str(shards),
            "--control", "off", "--ping-interval", "0", cwd=str(TESTS_DIR.parent),
        )
        for name, shards in (("m1", 2), ("m2", 1))
    ]  # fmt: skip
    try:
        for node in nodes:
            node.wait_up(30)
        yield nats, nodes
    finally:
        for node in nodes:
            node.end()
        nats.kill()


@pytest.mark.timeout(120)
def test_godot_multiplayer_relay_across_two_nodes(mp_nodes) -> None:
    _nats, nodes = mp_nodes

    async def body() -> None:
        a1, a2 = [await MPClient.open(nodes[0].port) for _ in range(2)]
        b1 = await MPClient.open(nodes[1].port)
        clients = [a1, a2, b1]
        ids = {c.id for c in clients}
        for client in clients:  # every peer of the cluster, by SYS_ADD
            await client.knows(ids - {client.id})

        # to = n on another node: that peer only, byte for byte.
        sent = await a1.send(b1.id, b"unicast")
        assert await b1.wait_for(lambda f: f == sent) == sent
        # to = 0 from the other node: every other client of the cluster.
        sent = await b1.send(0, b"to-all")
        for client in (a1, a2):
            await client.wait_for(lambda f, s=sent: f == s)
        # to = -n: every client but n (and the sender); a marker after it proves b1's absence.
        sent = await a2.send(-b1.id, b"not-b1")
        await a1.wait_for(lambda f: f == sent)
        marker = await a2.send(b1.id, b"marker")
        await b1.wait_for(lambda f: f == marker)
        assert sent not in b1.frames
        assert a2.data_from(a2.id) == []  # never back to its sender

        # A newcomer that sends at once: every other peer hears of it (SYS_ADD) before any
        # of its frames, and gets them all, in order, once.
        b2 = await MPClient.open(nodes[1].port)
        burst = [await b2.send(0, f"burst-{i}".encode()) for i in range(30)]
        for client in (a1, a2, b1):
            await client.wait_for(lambda f: f == burst[-1])
            first = client.frames.index(burst[0])
            assert sys_index(client, SYS_ADD, b2.id) < first, client.frames
            assert client.data_from(b2.id) == burst

        # A peer that leaves is SYS_DEL for the other node's peers.
        await b1.close()
        for client in (a1, a2):
            await client.knows({a1.id, a2.id, b2.id} - {client.id})
        for client in (a1, a2, b2):
            await client.close()

    asyncio.run(body())


@pytest.mark.timeout(120)
def test_a_killed_node_s_peers_get_sys_del(mp_nodes) -> None:
    _nats, nodes = mp_nodes

    async def body() -> None:
        a = await MPClient.open(nodes[0].port)
        b = await MPClient.open(nodes[1].port)
        await a.knows({b.id})
        for process in nodes[1].record_tree():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        await a.knows(set())  # SYS_DEL(b), from the heartbeat's silence
        sys_index(a, SYS_DEL, b.id)
        await a.close()

    asyncio.run(body())
    nodes[0].wait_for(r"node m2 left \(silent for 3 s\)")
