"""Multiplayer mode (``listen(port, [], gd_mp_api=True)``): wsfleet as peer 1 of Godot's
high-level multiplayer API, checked on the wire with real sockets.

Every frame in this mode is binary with a 9-byte header (u8 type, i32 from, i32 to,
little-endian); see docs/GODOT_WIRE.md sections 4 and 5. The clients here are plain
``websockets`` clients that speak that header; the server runs in this process with
2 shards and is polled from the test's event loop. Tests that need peers on both
shards open clients until ``get_peer_shard`` shows both shards hold some (bounded).

Absence ("nobody else got it") is checked after `settle`: every client sends a
unicast marker to every other client and to the server, and the server sends one
to every client. Delivery is in order per sender and receiver, so once every marker
has arrived, anything sent before it that was going to arrive has arrived.

The relay oracle is `recipients`: docs/GODOT_WIRE.md section 4.3 with wsfleet's one
deviation (section 5): ``to = -1`` is not delivered to the server. The last test
checks that oracle, the system message order and the dropping of invalid frames
against Godot 3.2.3's own server (``godot3-server`` running tests/godot/mp_server.gd),
so that the expectations here are the engine's and not only the documents'.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from wsfleet import Error, WebSocketServer
from wsfleet.loadtest.wsclient import build_frame

from .godot_runner import GODOT_DIR, GodotProcess, GodotProcesses, free_port, options
from .wsframes import BINARY, handshake_request, read_frame
from .wsserver import run_with, until

HEADER = struct.Struct("<Bii")
HEADER_SIZE = HEADER.size  # 9
SYS_NONE, SYS_ADD, SYS_DEL, SYS_ID = 0, 1, 2, 3
SERVER = 1
DROP_KEYS = ("short", "type", "from", "target")
MAX_CLIENTS = 24  # bound on the clients opened to get enough of them on every shard
MARKER = b"~settle~"  # ASCII: Godot's mp_server.gd decodes RAW payloads as UTF-8
_tokens = itertools.count(1)


def mp_frame(sender: int, to: int, payload: bytes = b"", kind: int = SYS_NONE) -> bytes:
    return HEADER.pack(kind, sender, to) + payload


def sys_frame(kind: int, peer_id: int) -> bytes:
    """A system message exactly as the server must send it: 13 bytes, from=1, to=0."""
    return HEADER.pack(kind, SERVER, 0) + struct.pack("<i", peer_id)


def recipients(sender: int, to: int, ids: set[int]) -> tuple[set[int], bool]:
    """(clients that get the frame, whether the server's get_packet gets it)."""
    if to == SERVER:
        return set(), True
    if to == 0:
        return ids - {sender}, True
    if to < 0:
        return ids - {sender, -to}, to != -SERVER  # wsfleet: -1 is "every client only"
    return {to}, False


# -- clients ---------------------------------------------------------------------------------


class MPClient:
    """A client that records every frame it receives, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.id = 0
        self.frames: list[bytes] = []
        self.errors: list[str] = []
        self.closed = False
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> MPClient:
        ws = await connect(
            f"ws://127.0.0.1:{port}/",
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=5,
            close_timeout=2,
        )
        client = cls(ws)
        await until(lambda: client.frames or client.closed, 5)
        assert client.frames, "closed before SYS_ID"
        first = client.frames[0]
        assert len(first) == 13 and first[:HEADER_SIZE] == HEADER.pack(SYS_ID, SERVER, 0), first
        client.id = struct.unpack_from("<i", first, HEADER_SIZE)[0]
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self.errors.append(f"text frame {message!r}")
                else:
                    self.frames.append(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed = True

    async def send(self, to: int, payload: bytes) -> bytes:
        frame = mp_frame(self.id, to, payload)
        await self.ws.send(frame)
        return frame

    async def send_raw(self, frame: bytes) -> None:
        await self.ws.send(frame)

    def data(self) -> list[bytes]:
        """Payload frames (type 0), markers left out, headers included."""
        return [f for f in self.frames if f[0] == SYS_NONE and MARKER not in f[HEADER_SIZE:]]

    def system(self) -> list[bytes]:
        return [f for f in self.frames if f[0] != SYS_NONE]

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)
        await asyncio.wait_for(self._reader, 5)


class MPLog:
    """The server's signals, in order; packets are taken with get_packet in peer_packet."""

    def __init__(self, server: WebSocketServer, read: bool = True) -> None:
        self.server = server
        self.events: list[tuple[Any, ...]] = []
        self.packet_signals: list[int] = []
        self.packets: list[tuple[int, bytes]] = []  # (get_packet_peer, get_packet)
        self.mismatches: list[tuple[int, int]] = []
        self.read = read
        server.connect("peer_connected", lambda i: self.events.append(("connected", i)))
        server.connect("peer_disconnected", lambda i: self.events.append(("disconnected", i)))
        server.connect(
            "client_close_request", lambda i, c, r: self.events.append(("close_request", i, c, r))
        )
        server.connect("peer_packet", self._on_packet)
        # Plain-mode signals must stay silent in multiplayer mode.
        server.connect("client_connected", lambda *a: self.events.append(("PLAIN", *a)))
        server.connect("client_disconnected", lambda *a: self.events.append(("PLAIN", *a)))
        server.connect("data_received", lambda *a: self.events.append(("PLAIN", *a)))

    def _on_packet(self, source: int) -> None:
        self.packet_signals.append(source)
        if self.read:
            peer = self.server.get_packet_peer()
            data = self.server.get_packet()
            if peer != source:
                self.mismatches.append((source, peer))
            self.packets.append((peer, bytes(data)))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == name]

    def data(self) -> list[tuple[int, bytes]]:
        return [(s, p) for s, p in self.packets if MARKER not in p]

    def check(self) -> None:
        assert self.named("PLAIN") == []
        assert self.mismatches == [], "peer_packet(id) and get_packet_peer() disagree"
        if self.read:
            assert self.packet_signals == [s for s, _ in self.packets]


def stats(server: WebSocketServer) -> dict[str, int]:
    got = server.get_mp_stats()
    assert all(isinstance(got[k], int) for k in DROP_KEYS), got
    return {k: got[k] for k in DROP_KEYS}


async def join(server: WebSocketServer, log: MPLog, others: list[MPClient]) -> MPClient:
    """Open one client and wait until its arrival is complete everywhere."""
    client = await MPClient.open(server.port)
    expected = [sys_frame(SYS_ID, client.id), sys_frame(SYS_ADD, SERVER)]
    expected += [sys_frame(SYS_ADD, i) for i in sorted(c.id for c in others)]
    await until(lambda: len(client.frames) >= len(expected), 5)
    await until(lambda: all(sys_frame(SYS_ADD, client.id) in c.frames for c in others), 5)
    await until(lambda: ("connected", client.id) in log.events, 5)
    await until(lambda: server.get_peer_shard(client.id) >= 0, 5)
    return client


async def spread(
    server: WebSocketServer, log: MPLog, per_shard: int = 1, at_least: int = 2
) -> list[MPClient]:
    """Clients (one at a time) until every shard holds ``per_shard`` of them."""
    clients: list[MPClient] = []
    while True:
        counts = Counter(server.get_peer_shard(c.id) for c in clients)
        if len(clients) >= at_least and all(counts[s] >= per_shard for s in range(server.shards)):
            return clients
        assert len(clients) < MAX_CLIENTS, f"{MAX_CLIENTS} clients and still per shard {counts}"
        clients.append(await join(server, log, clients))


def on_shard(server: WebSocketServer, clients: list[MPClient], shard: int) -> list[MPClient]:
    return [c for c in clients if server.get_peer_shard(c.id) == shard]


async def send_markers(clients: list[MPClient], tag: bytes) -> None:
    """``tag`` from every client to every other one and to the server; wait until every
    client got it from every other one."""
    for c in clients:
        for d in clients:
            if d is not c:
                await c.send(d.id, tag)
        await c.send(SERVER, tag)
    await until(
        lambda: all(
            mp_frame(d.id, c.id, tag) in c.frames for c in clients for d in clients if d is not c
        ),
        10,
    )


async def settle(server: WebSocketServer, log: MPLog, clients: list[MPClient]) -> None:
    """Markers along every sender->receiver pair (server included), and wait for all.
    Every client must still be connected, before and after."""
    assert [c.id for c in clients if c.closed] == []
    tag = MARKER + next(_tokens).to_bytes(4, "little")
    await send_markers(clients, tag)
    await server_markers(server, log, clients, tag)


async def server_markers(
    server: WebSocketServer, log: MPLog, clients: list[MPClient], tag: bytes
) -> None:
    """``tag`` has reached the server from every client: it goes back to each of them, and
    every client is still connected."""
    await until(lambda: all((c.id, tag) in log.packets for c in clients), 10)
    for c in clients:
        server.set_target_peer(c.id)
        assert server.put_packet(tag) == Error.OK
    server.set_target_peer(0)
    await until(lambda: all(mp_frame(SERVER, c.id, tag) in c.frames for c in clients), 10)
    assert [c.id for c in clients if c.closed or c.errors] == []


@pytest.fixture
def mp_servers():
    """``mp_servers(shards)`` starts a server in multiplayer mode; all stopped at teardown."""
    started: list[WebSocketServer] = []

    def make(shards: int = 2, **buffers: int) -> WebSocketServer:
        server = WebSocketServer(shards=shards)
        if buffers:
            assert server.set_buffers(**buffers) == Error.OK
        assert server.listen(0, [], gd_mp_api=True) == Error.OK
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# -- members -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_multiplayer_members(mp_servers) -> None:
    server = mp_servers(shards=2)
    assert server.get_unique_id() == 1
    assert server.get_connection_status() == 2  # CONNECTED while listening
    assert server.get_transfer_mode() == 2  # RELIABLE
    server.set_transfer_mode(0)  # a no-op for WebSockets
    assert server.get_transfer_mode() == 2
    assert server.get_max_packet_size() == 65536 - 9
    assert server.is_refusing_new_connections() is False
    assert server.get_available_packet_count() == 0
    assert stats(server) == dict.fromkeys(DROP_KEYS, 0)
    server.stop()
    assert server.get_connection_status() == 0

    bigger = mp_servers(shards=1, input_buffer_size_kb=64, input_max_packets=1024,
                        output_buffer_size_kb=100, output_max_packets=1024)  # fmt: skip
    assert bigger.get_max_packet_size() == 128 * 1024 - 9  # rounded up to a power of two


@pytest.mark.timeout(60)
def test_packet_members_need_multiplayer_mode() -> None:
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    try:
        assert server.put_packet(b"x") == Error.ERR_UNCONFIGURED
        assert server.get_available_packet_count() == 0
    finally:
        server.stop()


# -- connect and disconnect ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_system_messages_on_connect_in_per_socket_order(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)

    async def body() -> list[MPClient]:
        clients = await spread(server, log, per_shard=2, at_least=5)
        await settle(server, log, clients)
        return clients

    clients = run_with(server, body)
    ids = [c.id for c in clients]
    assert len(set(ids)) == len(ids)
    assert all(1 < i < 2**31 for i in ids), ids
    assert sorted(server.get_peers()) == sorted(ids)
    assert {server.get_peer_shard(i) for i in ids} == {0, 1}
    assert log.named("connected") == [("connected", i) for i in ids]
    for n, client in enumerate(clients):
        earlier = sorted(ids[:n])
        later = ids[n + 1 :]  # each arrives as one SYS_ADD, in arrival order
        expected = [sys_frame(SYS_ID, client.id), sys_frame(SYS_ADD, SERVER)]
        expected += [sys_frame(SYS_ADD, i) for i in earlier]
        expected += [sys_frame(SYS_ADD, i) for i in later]
        assert client.system() == expected, f"client {n} ({client.id})"
        assert client.data() == [] and client.errors == []
    log.check()


@pytest.mark.timeout(60)
def test_sys_del_to_every_remaining_peer_on_clean_close_and_on_tcp_drop(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)

    async def body() -> tuple[int, int]:
        clients = await spread(server, log, per_shard=2)
        clean = on_shard(server, clients, 0)[0]
        dropped = on_shard(server, clients, 1)[0]
        rest = [c for c in clients if c not in (clean, dropped)]
        before = {c.id: len(c.system()) for c in clients}

        await clean.close(4000, "bye")
        await until(lambda: all(sys_frame(SYS_DEL, clean.id) in c.frames for c in rest + [dropped]))
        await until(lambda: ("disconnected", clean.id) in log.events)
        assert clean.id not in server.get_peers()

        dropped.ws.transport.abort()  # no close frame: TCP just goes away
        await until(lambda: all(sys_frame(SYS_DEL, dropped.id) in c.frames for c in rest))
        await until(lambda: ("disconnected", dropped.id) in log.events)
        assert sorted(server.get_peers()) == sorted(c.id for c in rest)

        # The departed ids are unknown targets now; the newcomer only hears of the rest.
        await rest[0].send(clean.id, b"to a ghost")
        await rest[-1].send(dropped.id, b"to another ghost")
        newcomer = await join(server, log, rest)
        await settle(server, log, rest + [newcomer])
        await until(lambda: stats(server)["target"] == 2, 5)

        assert newcomer.system() == [sys_frame(SYS_ID, newcomer.id), sys_frame(SYS_ADD, SERVER)] + [
            sys_frame(SYS_ADD, i) for i in sorted(c.id for c in rest)
        ]
        assert dropped.system()[before[dropped.id] :] == [sys_frame(SYS_DEL, clean.id)]
        for c in rest:
            assert c.system()[before[c.id] :] == [
                sys_frame(SYS_DEL, clean.id),
                sys_frame(SYS_DEL, dropped.id),
                sys_frame(SYS_ADD, newcomer.id),
            ], c.id
            assert c.data() == []
        assert log.data() == []
        assert stats(server) == {"short": 0, "type": 0, "from": 0, "target": 2}
        return clean.id, dropped.id

    clean, dropped = run_with(server, body)
    assert [e for e in log.events if e[0] != "connected"] == [
        ("close_request", clean, 4000, "bye"),
        ("disconnected", clean),
        ("disconnected", dropped),
    ]
    log.check()


@pytest.mark.timeout(60)
def test_refused_connections_are_dropped_and_accepted_again(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)

    async def refused() -> None:
        """A new connection must not become a peer: no handshake, or closed without a frame."""
        try:
            ws = await connect(
                f"ws://127.0.0.1:{server.port}/", compression=None, open_timeout=5,
                ping_interval=None,
            )  # fmt: skip
        except (OSError, InvalidHandshake, TimeoutError, EOFError):
            return
        try:
            message = await asyncio.wait_for(ws.recv(), 3)
        except ConnectionClosed:
            return
        finally:
            await ws.close()
        raise AssertionError(f"a refused connection got {message!r}")

    async def body() -> None:
        clients = await spread(server, log)
        server.set_refuse_new_connections(True)
        assert server.is_refusing_new_connections() is True
        await asyncio.sleep(0.1)  # the shards hear of it (wsfleet: not instantaneous)
        for _ in range(6):  # SO_REUSEPORT spreads them: both shards see some, very likely
            await refused()
        await settle(server, log, clients)  # old peers still relay, and heard of nobody new
        for c in clients:
            added = [struct.unpack_from("<i", f, HEADER_SIZE)[0] for f in c.system()[1:]]
            assert sorted(added) == sorted([SERVER] + [d.id for d in clients if d is not c])
        assert sorted(server.get_peers()) == sorted(c.id for c in clients)
        assert len(log.named("connected")) == len(clients)

        server.set_refuse_new_connections(False)
        assert server.is_refusing_new_connections() is False
        await asyncio.sleep(0.1)
        newcomer = await join(server, log, clients)
        await settle(server, log, clients + [newcomer])

    run_with(server, body)
    assert len(log.named("connected")) == len(server.get_peers())
    log.check()


# -- relay rules ---------------------------------------------------------------------------

ROWS = ["1", "0", "-other_shard", "-same_shard", "-self", "-1", "n_other_shard", "n_same_shard"]


def resolve(row: str, sender: MPClient, mates: list[MPClient], others: list[MPClient]) -> int:
    """The `to` of a row for ``sender``; ``mates`` share its shard, ``others`` do not."""
    if row in ("0", "1", "-1"):
        return int(row)
    if row == "-self":
        return -sender.id
    target = (mates if row.endswith("same_shard") else others)[0].id
    return -target if row.startswith("-") else target


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row", ROWS)
def test_relay_rule(mp_servers, row: str) -> None:
    """One row of section 4.2, sent by a client on each shard, with clients on both shards."""
    server = mp_servers(shards=2)
    log = MPLog(server)

    async def body() -> tuple[list[MPClient], list[tuple[MPClient, int, bytes, bytes]]]:
        clients = await spread(server, log, per_shard=2)
        sent = []
        for shard in (0, 1):
            sender = on_shard(server, clients, shard)[0]
            mates = [c for c in on_shard(server, clients, shard) if c is not sender]
            others = on_shard(server, clients, 1 - shard)
            to = resolve(row, sender, mates, others)
            payload = f"row {row} from {sender.id}:".encode() + bytes(range(256))
            sent.append((sender, to, payload, await sender.send(to, payload)))
        await settle(server, log, clients)
        return clients, sent

    clients, sent = run_with(server, body)
    ids = {c.id for c in clients}
    for sender, to, payload, frame in sent:
        to_clients, to_server = recipients(sender.id, to, ids)
        for c in clients:
            # Byte for byte: the header keeps the original from and to.
            assert c.data().count(frame) == (1 if c.id in to_clients else 0), (row, to, c.id)
        assert log.data().count((sender.id, payload)) == (1 if to_server else 0), (row, to)
    expected_clients = sum(len(recipients(s.id, t, ids)[0]) for s, t, _, _ in sent)
    assert sum(len(c.data()) for c in clients) == expected_clients  # nothing else, no copies
    assert len(log.data()) == sum(recipients(s.id, t, ids)[1] for s, t, _, _ in sent)
    assert stats(server) == dict.fromkeys(DROP_KEYS, 0)
    log.check()


@pytest.mark.timeout(60)
def test_frames_are_forwarded_byte_for_byte_at_every_length(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)
    rng = random.Random(7)
    # Frames of 9 (header only), 10, 125, 126 (first 16-bit length), 134, 1009 bytes and
    # 40 KB; one at a time, so no out buffer ever holds more than one of them.
    sizes = [0, 1, 116, 117, 125, 1000, 40_000]

    async def body() -> tuple[list[MPClient], int, int, list[bytes], list[bytes]]:
        clients = await spread(server, log)
        a = on_shard(server, clients, 0)[0]
        b = on_shard(server, clients, 1)[0]
        rest = [c for c in clients if c is not a]
        broadcast, unicast = [], []
        for size in sizes:
            payload = rng.randbytes(size)
            frame = await a.send(0, payload)
            broadcast.append(frame)
            await until(lambda f=frame: all(f in c.frames for c in rest), 10)
            frame = await b.send(a.id, payload[::-1])
            unicast.append(frame)
            await until(lambda f=frame: f in a.frames, 10)
        await settle(server, log, clients)
        return clients, a.id, b.id, broadcast, unicast

    clients, a, b, broadcast, unicast = run_with(server, body)
    for c in clients:
        assert c.data() == (unicast if c.id == a else broadcast), c.id
    assert log.data() == [(a, f[HEADER_SIZE:]) for f in broadcast]
    assert [len(p) for _, p in log.data()] == sizes
    log.check()


@pytest.mark.timeout(90)
def test_order_per_sender_and_receiver_for_a_burst_across_shards(mp_servers) -> None:
    """Numbered frames from every client at once, with mixed targets: each receiver (the
    server included) sees each sender's frames in sending order, each once, none missing."""
    server = mp_servers(shards=2)
    log = MPLog(server)
    count = 100  # per client: stays well under 1,024 frames queued towards any receiver

    async def body() -> tuple[list[MPClient], dict[tuple[int, int], list[int]]]:
        clients = await spread(server, log, per_shard=2)
        ids = {c.id for c in clients}
        expected: dict[tuple[int, int], list[int]] = {}  # (sender, receiver) -> numbers

        async def burst(k: int, sender: MPClient) -> None:
            others = [c.id for c in clients if c is not sender]
            for n in range(count):
                pick = others[(n + k) % len(others)]
                to = (0, pick, -pick, SERVER, -sender.id)[n % 5]
                receivers, to_server = recipients(sender.id, to, ids)
                for r in receivers | ({SERVER} if to_server else set()):
                    expected.setdefault((sender.id, r), []).append(n)
                await sender.send(to, b"seq" + struct.pack("<ii", sender.id, n))

        await asyncio.gather(*(burst(k, c) for k, c in enumerate(clients)))
        await settle(server, log, clients)
        return clients, expected

    clients, expected = run_with(server, body, timeout=80)
    seen: dict[tuple[int, int], list[int]] = {}
    for c in clients:
        for f in c.data():
            _, sender, _ = HEADER.unpack_from(f)
            assert f[HEADER_SIZE : HEADER_SIZE + 3] == b"seq"
            assert struct.unpack_from("<i", f, HEADER_SIZE + 3)[0] == sender
            seen.setdefault((sender, c.id), []).append(struct.unpack_from("<i", f, 16)[0])
    for source, payload in log.data():
        assert struct.unpack_from("<i", payload, 3)[0] == source
        seen.setdefault((source, SERVER), []).append(struct.unpack_from("<i", payload, 7)[0])
    assert seen == expected
    assert stats(server) == dict.fromkeys(DROP_KEYS, 0)
    log.check()


# -- frames the server drops ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_invalid_frames_are_dropped_counted_and_disturb_nobody(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)

    def bad_frames(sender: MPClient, other: MPClient, unknown: int) -> list[tuple[str, bytes]]:
        s = sender.id
        return [
            ("short", b""),
            ("short", b"\x00"),
            ("short", HEADER.pack(SYS_NONE, s, 0)[:8]),
            ("type", mp_frame(s, 0, struct.pack("<i", s), SYS_ADD)),
            ("type", mp_frame(s, 0, struct.pack("<i", other.id), SYS_DEL)),
            ("type", mp_frame(s, other.id, struct.pack("<i", 5), SYS_ID)),
            ("type", mp_frame(s, SERVER, b"x", 4)),
            ("type", mp_frame(s, 0, b"x", 255)),
            ("from", mp_frame(other.id, 0, b"spoofed broadcast")),
            ("from", mp_frame(other.id, SERVER, b"spoofed to the server")),
            ("from", mp_frame(SERVER, other.id, b"pretends to be the server")),
            ("from", mp_frame(0, -other.id, b"from nobody")),
            ("from", mp_frame(-s, 0, b"negative self")),
            ("target", mp_frame(s, unknown, b"nobody has this id")),
            ("target", mp_frame(s, 2**31 - 1, b"nor this one")),
            ("target", mp_frame(s, s, b"to == from")),
        ]

    async def body() -> tuple[list[MPClient], list[tuple[str, bytes]], list[bytes]]:
        clients = await spread(server, log, per_shard=2)
        ids = set(server.get_peers())
        unknown = next(i for i in itertools.count(2) if i not in ids)
        everything: list[tuple[str, bytes]] = []
        valid: list[bytes] = []
        for shard in (0, 1):
            sender = on_shard(server, clients, shard)[0]
            other = on_shard(server, clients, 1 - shard)[0]
            for reason, frame in bad_frames(sender, other, unknown):
                await sender.send_raw(frame)
                everything.append((reason, frame))
            # The same socket still relays afterwards, to both kinds of target.
            valid.append(await sender.send(0, b"still fine"))
            valid.append(await sender.send(other.id, b"still fine, unicast"))
        expected = dict(Counter(reason for reason, _ in everything))
        await settle(server, log, clients)
        await until(lambda: stats(server) == expected, 5)
        await settle(server, log, clients)  # and no more trickles in
        assert stats(server) == expected
        assert sorted(server.get_peers()) == sorted(ids)
        return clients, everything, valid

    clients, everything, valid = run_with(server, body)
    ids = {c.id for c in clients}
    for c in clients:
        assert all(f not in c.frames for _, f in everything)
        wanted = [f for f in valid if c.id in recipients(*HEADER.unpack_from(f)[1:], ids)[0]]
        assert sorted(c.data()) == sorted(wanted), c.id  # two senders: no order between them
    senders = [HEADER.unpack_from(f)[1] for f in valid[::2]]
    assert sorted(log.data()) == sorted((s, b"still fine") for s in senders)
    assert log.named("disconnected") == []
    log.check()


@pytest.mark.timeout(60)
def test_bad_frames_on_websockets_path_and_before_the_welcome_are_dropped_too(mp_servers) -> None:
    """The checks of the test above whichever way a frame reaches the relay: fragmented
    messages (websockets' parser, not the shard's), text frames, and a frame that comes
    with the upgrade request, before the server has sent the peer its id (SYS_ID): it names
    the id the peer is about to get, but no client can know it yet, so it counts as "from"."""
    server = mp_servers(shards=1)
    log = MPLog(server)

    async def fragmented(client: MPClient, frame: bytes) -> None:
        await client.ws.send([frame[:4], frame[4:7], frame[7:]])

    async def as_text(client: MPClient, frame: bytes) -> None:
        await client.ws.send(frame.decode())  # small ids: the header is ASCII

    async def body() -> tuple[list[MPClient], list[bytes], bytes, int]:
        clients = await spread(server, log)
        sender, other = clients[:2]
        s, unknown = sender.id, max(server.get_peers()) + 100
        bad = [
            ("short", b"\x00\x01\x02"),
            ("type", mp_frame(s, 0, struct.pack("<i", s), SYS_ADD)),
            ("from", mp_frame(other.id, 0, b"spoofed")),
            ("target", mp_frame(s, unknown, b"nobody")),
        ]
        sent: list[bytes] = []
        for how in (fragmented, as_text):
            for _, frame in bad:
                await how(sender, frame)
                sent.append(frame)
        valid = mp_frame(s, other.id, b"fragmented and fine")
        await fragmented(sender, valid)
        # Ids are handed out in order on a shard: the next client gets max + 1.
        early_id = max(server.get_peers()) + 1
        early = mp_frame(early_id, 0, b"before my id")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(handshake_request(server.port) + build_frame(BINARY, early))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        opcode, welcome = await asyncio.wait_for(read_frame(reader), 5)
        assert (opcode, welcome) == (BINARY, sys_frame(SYS_ID, early_id)), "not the id expected"
        expected = dict(Counter(reason for reason, _ in bad * 2))
        expected["from"] += 1
        await settle(server, log, clients)
        assert stats(server) == expected
        writer.close()
        return clients, sent + [early], valid, early_id

    clients, dropped, valid, early_id = run_with(server, body)
    for c in clients:
        assert all(frame not in c.frames for frame in dropped), c.id
    assert clients[1].data() == [valid]
    assert all(payload != b"before my id" for _, payload in log.packets)
    assert log.named("disconnected") in ([], [("disconnected", early_id)])
    log.check()


# -- the server as a peer ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_server_put_packet_reaches_its_targets_with_from_1(mp_servers) -> None:
    server = mp_servers(shards=2)
    log = MPLog(server)

    async def body() -> tuple[list[MPClient], dict[int, bytes], dict[int, Error], int]:
        clients = await spread(server, log, per_shard=2)
        a = on_shard(server, clients, 0)[0]
        b = on_shard(server, clients, 1)[0]
        ids = set(server.get_peers())
        unknown = next(i for i in itertools.count(2) if i not in ids)
        targets = [0, a.id, b.id, -a.id, -b.id, -1, SERVER, unknown]
        results: dict[int, Error] = {}
        payloads: dict[int, bytes] = {}
        for to in targets:
            payloads[to] = f"from the server to {to}".encode() + bytes(range(256))
            server.set_target_peer(to)
            results[to] = server.put_packet(payloads[to])
        server.set_target_peer(0)
        await settle(server, log, clients)
        return clients, payloads, results, unknown

    clients, payloads, results, unknown = run_with(server, body)
    ids = {c.id for c in clients}
    # Godot's _server_relay: to=1 is "will not send to self", OK; an unknown peer is FAILED.
    assert results == {t: Error.FAILED if t == unknown else Error.OK for t in payloads}
    for c in clients:
        wanted = []
        for to, payload in payloads.items():
            if to in (SERVER, unknown):
                continue
            if c.id in recipients(SERVER, to, ids)[0]:
                wanted.append(mp_frame(SERVER, to, payload))
        assert c.data() == wanted, c.id
    assert log.data() == []  # the server does not get its own packets
    log.check()


@pytest.mark.timeout(60)
def test_get_packet_queue_for_to_1_and_to_0(mp_servers) -> None:
    """No handler reads: packets wait in the queue; get_packet_peer names the next one."""
    server = mp_servers(shards=2)
    log = MPLog(server, read=False)

    async def body() -> tuple[list[tuple[int, bytes]], list[int], int, int]:
        clients = await spread(server, log)
        a = on_shard(server, clients, 0)[0]
        b = on_shard(server, clients, 1)[0]
        await a.send(SERVER, b"a1 to server")
        await b.send(0, b"b1 to all")
        await a.send(0, b"a2 to all")
        await b.send(SERVER, b"b2 to server")
        await b.send(-a.id, b"b3 to all but a")
        await a.send(-1, b"a3 to all clients only")  # wsfleet: not for the server
        await until(lambda: server.get_available_packet_count() == 5, 5)
        await asyncio.sleep(0.2)  # nothing else arrives
        assert server.get_available_packet_count() == 5
        queue = []
        while server.get_available_packet_count():
            left = server.get_available_packet_count()
            peer = server.get_packet_peer()
            queue.append((peer, bytes(server.get_packet())))
            assert server.get_available_packet_count() == left - 1
        return queue, list(log.packet_signals), a.id, b.id

    queue, signals, a, b = run_with(server, body)
    assert [p for s, p in queue if s == a] == [b"a1 to server", b"a2 to all"]
    assert [p for s, p in queue if s == b] == [b"b1 to all", b"b2 to server", b"b3 to all but a"]
    assert sorted(signals) == sorted(s for s, _ in queue)  # one peer_packet per packet
    assert [s for s in signals if s == a] == [a, a]
    log.check()


# -- the same rules on Godot 3.2.3's own server ------------------------------------------------

GODOT_RELAY = GODOT_DIR / "mp_server.gd"
RAW = b"\x04"  # MultiplayerAPI RAW command: mp_server.gd reports such packets ("raw" events)


def godot_packets(relay: GodotProcess) -> list[tuple[int, bytes]]:
    """What mp_server.gd's MultiplayerAPI got: (sender, payload after the RAW byte)."""
    return [(r["from"], bytes.fromhex(r["hex"])) for r in relay.events("raw")]


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
    with GodotProcesses(tmp_path) as processes:
        yield processes


@pytest.mark.timeout(60)
def test_the_oracle_matches_godot_3_2_3s_own_server(godot) -> None:
    """`recipients` and the system message order above, against the real engine: the same
    deliveries to clients, invalid frames relayed to nobody, SYS_DEL on close. The one
    difference is documented: Godot's server also takes ``to = -1`` itself."""
    port = free_port()
    relay = godot.start(GODOT_RELAY, *options(port=port, clients=0, timeout=50))

    async def body() -> tuple[list[MPClient], list[tuple[int, int, bytes, bytes]], list[bytes]]:
        for _ in range(200):  # bounded: until Godot listens
            if relay.events("listening") or relay.exited():
                break
            await asyncio.sleep(0.05)
        assert relay.events("listening"), relay.output()
        clients: list[MPClient] = []
        for _ in range(4):
            c = await MPClient.open(port)
            await until(lambda c=c: len(c.frames) >= 2 + len(clients), 5)
            await until(lambda c=c: all(sys_frame(SYS_ADD, c.id) in d.frames for d in clients), 5)
            clients.append(c)
        a, b, x, y = clients
        unknown = next(i for i in itertools.count(2) if i not in {c.id for c in clients})
        sent = []
        for sender, other in ((a, x), (b, y)):
            for to in (SERVER, 0, -other.id, -SERVER, -sender.id, other.id):
                payload = RAW + f"rule {to} from {sender.id}".encode()
                sent.append((sender.id, to, payload, await sender.send(to, payload)))
        bad = [
            b"",
            HEADER.pack(SYS_NONE, a.id, 0)[:8],
            mp_frame(a.id, 0, RAW + b"type", SYS_ADD),
            mp_frame(x.id, 0, RAW + b"spoofed"),
            mp_frame(a.id, unknown, RAW + b"unknown target"),
            mp_frame(a.id, a.id, RAW + b"to self"),
        ]
        for frame in bad:
            await a.send_raw(frame)
        # Markers along every pair (the server: a RAW to=1), then wait for all of them.
        await send_markers(clients, RAW + MARKER)
        await until(lambda: all((c.id, MARKER) in godot_packets(relay) for c in clients), 10)
        await a.close()
        await until(lambda: all(sys_frame(SYS_DEL, a.id) in c.frames for c in (b, x, y)), 10)
        return clients, sent, bad

    clients, sent, bad = run_with_loop(body)
    ids = {c.id for c in clients}
    for n, c in enumerate(clients):
        expected = [sys_frame(SYS_ID, c.id), sys_frame(SYS_ADD, SERVER)]
        expected += [sys_frame(SYS_ADD, i) for i in sorted(d.id for d in clients[:n])]
        expected += [sys_frame(SYS_ADD, d.id) for d in clients[n + 1 :]]
        if n:
            expected.append(sys_frame(SYS_DEL, clients[0].id))
        assert c.system() == expected, n
        wanted = [f for s, t, _, f in sent if c.id in recipients(s, t, ids)[0]]
        assert sorted(c.data()) == sorted(wanted), n  # two senders: no order between them
        assert all(frame not in c.frames for frame in bad)
    server_wanted = [
        (s, p[1:]) for s, t, p, _ in sent if recipients(s, t, ids)[1] or t == -SERVER
    ]  # fmt: skip
    got = [(s, p) for s, p in godot_packets(relay) if MARKER not in p]
    assert sorted(got) == sorted(server_wanted)


def run_with_loop(body: Callable[[], Any], timeout: float = 40) -> Any:
    """`run_with` without a wsfleet server to poll."""

    async def main() -> Any:
        return await asyncio.wait_for(body(), timeout)

    return asyncio.run(main())
