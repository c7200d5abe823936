"""Relay groups ("rooms", ``server.set_relay_groups(True)``) in multiplayer mode, with real
clients over 2 shards.

A client hears (``SYS_ADD``) only of the server and of the peers it shares a group with;
``join`` / ``leave`` send ``SYS_ADD`` / ``SYS_DEL`` both ways between the peer and those
whose sharing changed, a departure tells only its room mates; frames reach only room mates
(``to`` = n for another room is dropped and counted as ``group``), and the server's own
packets reach everyone. The Python clients speak Godot's multiplayer framing
(tests/test_mp_protocol.py's `MPClient`); the last test runs real Godot 3.2.3 clients
(tests/godot/mp_client.gd, with tests/godot_mp.py's harness) in two rooms.

Absence ("nobody else got it") is checked after `settle`: every client sends a marker to
the server, and once the server has them all it sends one to every client. A client's
frames are relayed in order with what it sends after them, and the server's marker to a
client follows whatever the front relayed to it before, so once every marker has arrived,
anything a client sent before its marker that was going to arrive has arrived.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import struct
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from wsfleet import Error, WebSocketServer

from . import godot_mp
from .godot_mp import (
    CLIENTS,
    WAIT,
    FleetScript,
    check_clients,
    expected_part,
    server_expects,
)
from .godot_runner import GodotProcess, GodotProcesses, options, wait_until
from .opsproc import wsfleet
from .test_mp_protocol import (
    HEADER_SIZE,
    MARKER,
    SERVER,
    SYS_ADD,
    SYS_DEL,
    SYS_ID,
    SYS_NONE,
    MPClient,
    MPLog,
    mp_frame,
    server_markers,
    sys_frame,
)
from .wsserver import run_with, until

DROP_KEYS = ("short", "type", "from", "target", "group")
MAX_CLIENTS = 24  # bound on the clients opened to get enough of them on every shard
HELLO = b"hi"  # what a greeting client sends to a peer the moment it hears of it
_tokens = itertools.count(1)


class RoomClient(MPClient):
    """An `MPClient` that greets: the moment it gets ``SYS_ADD(X)`` for a client X, it
    sends ``hi`` to X (as a Godot game may do in ``network_peer_connected``). Relay groups
    promise that this frame is not dropped."""

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, str):
                    self.errors.append(f"text frame {message!r}")
                    continue
                self.frames.append(message)
                if message[0] == SYS_ADD and len(message) == HEADER_SIZE + 4:
                    (added,) = struct.unpack_from("<i", message, HEADER_SIZE)
                    if added != SERVER and self.id:
                        await self.ws.send(mp_frame(self.id, added, HELLO))
        except ConnectionClosed:
            pass
        finally:
            self.closed = True

    def data(self) -> list[bytes]:
        """Data frames, markers and greetings left out, headers included."""
        return [f for f in super().data() if f[HEADER_SIZE:] != HELLO]

    def greetings(self) -> list[int]:
        """Who greeted it, in order."""
        return [
            struct.unpack_from("<i", f, 1)[0]
            for f in self.frames
            if f[0] == SYS_NONE and f[HEADER_SIZE:] == HELLO
        ]


def welcome(client: MPClient) -> list[bytes]:
    """What a client is told at connect with relay groups: itself and the server."""
    return [sys_frame(SYS_ID, client.id), sys_frame(SYS_ADD, SERVER)]


def news(kind: int, *clients: MPClient) -> list[bytes]:
    """The system messages about ``clients``, in id order (as a join or leave sends them)."""
    return [sys_frame(kind, c.id) for c in sorted(clients, key=lambda c: c.id)]


def stats(server: WebSocketServer) -> dict[str, int]:
    got = server.get_mp_stats()
    return {k: got[k] for k in DROP_KEYS}


async def open_client(server: WebSocketServer, log: MPLog) -> RoomClient:
    """One client, once its welcome is in and the server has seen it."""
    client = await RoomClient.open(server.port)
    await until(lambda: len(client.frames) >= 2, 5)
    await until(lambda: ("connected", client.id) in log.events, 5)
    await until(lambda: server.get_peer_shard(client.id) >= 0, 5)
    return client


async def spread(
    server: WebSocketServer, log: MPLog, per_shard: int, at_least: int
) -> list[RoomClient]:
    """Clients (one at a time) until every shard holds ``per_shard`` of them."""
    clients: list[RoomClient] = []
    while True:
        counts = Counter(server.get_peer_shard(c.id) for c in clients)
        if len(clients) >= at_least and all(counts[s] >= per_shard for s in range(server.shards)):
            return clients
        assert len(clients) < MAX_CLIENTS, f"{MAX_CLIENTS} clients and still per shard {counts}"
        clients.append(await open_client(server, log))


def on_shard(server: WebSocketServer, clients: list[RoomClient], shard: int) -> list[RoomClient]:
    return [c for c in clients if server.get_peer_shard(c.id) == shard]


async def settle(server: WebSocketServer, log: MPLog, clients: list[MPClient]) -> None:
    """A marker from every client to the server, then one from the server to every client."""
    assert [c.id for c in clients if c.closed] == []
    tag = MARKER + next(_tokens).to_bytes(4, "little")
    for c in clients:
        await c.send(SERVER, tag)
    await server_markers(server, log, clients, tag)


@pytest.fixture
def rooms_server() -> Iterator[WebSocketServer]:
    server = WebSocketServer(shards=2)
    assert server.set_relay_groups(True) == Error.OK
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    yield server
    server.stop()


# -- the setting ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_set_relay_groups_before_listen_or_without_peers_but_not_with_peers() -> None:
    server = WebSocketServer(shards=2)
    assert server.is_relay_groups() is False  # off by default
    assert server.set_relay_groups(True) == Error.OK and server.is_relay_groups() is True
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    log = MPLog(server)
    try:
        assert server.set_relay_groups(False) == Error.OK  # no peer yet: allowed
        assert server.set_relay_groups(True) == Error.OK

        async def body() -> None:
            first = await open_client(server, log)
            assert server.set_relay_groups(False) == Error.ERR_BUSY  # refused, unchanged
            assert server.is_relay_groups() is True
            assert server.set_relay_groups(True) == Error.OK  # no change: fine
            second = await open_client(server, log)
            await settle(server, log, [first, second])
            assert first.system() == welcome(first) and second.system() == welcome(second)
            await first.close()
            await second.close()
            await until(lambda: len(log.named("disconnected")) == 2, 5)

            assert server.set_relay_groups(False) == Error.OK  # nobody left: allowed again
            assert server.is_relay_groups() is False
            third = await open_client(server, log)
            fourth = await open_client(server, log)
            await until(lambda: sys_frame(SYS_ADD, fourth.id) in third.frames, 5)
            await settle(server, log, [third, fourth])
            assert fourth.system() == welcome(fourth) + [sys_frame(SYS_ADD, third.id)]
            assert third.system() == welcome(third) + [sys_frame(SYS_ADD, fourth.id)]

        run_with(server, body)
    finally:
        server.stop()
    assert server.is_relay_groups() is False  # a setting: stop() keeps it
    log.check()


# -- what clients are told ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_sys_add_and_sys_del_on_join_leave_and_departure_within_and_across_shards(
    rooms_server,
) -> None:
    server = rooms_server
    log = MPLog(server)

    async def body() -> None:
        clients = await spread(server, log, per_shard=2, at_least=5)
        a0, b0 = on_shard(server, clients, 0)[:2]
        a1, b1 = on_shard(server, clients, 1)[:2]
        outsiders = [c for c in clients if c not in (a0, b0, a1, b1)]  # in no group
        assert outsiders
        expected = {c.id: welcome(c) for c in clients}
        greeted: dict[int, list[int]] = {c.id: [] for c in clients}

        def told(client: MPClient, *frames: bytes) -> None:
            expected[client.id] += frames

        async def check() -> None:
            await settle(server, log, clients)
            for c in clients:
                assert c.system() == expected[c.id], c.id
                assert sorted(c.greetings()) == sorted(greeted[c.id]), c.id
                assert c.data() == []

        await check()  # a new peer knows the server and nobody else, and nobody knows it

        # Two rooms, each across the two shards.
        for client, room in ((a0, "a"), (a1, "a"), (b0, "b"), (b1, "b")):
            assert server.join(client.id, room) == Error.OK
        assert server.join(a0.id, "a") == Error.OK  # already in it: nothing new
        told(a0, *news(SYS_ADD, a1))
        told(a1, *news(SYS_ADD, a0))
        told(b0, *news(SYS_ADD, b1))
        told(b1, *news(SYS_ADD, b0))
        greeted[a0.id] += [a1.id]
        greeted[a1.id] += [a0.id]
        greeted[b0.id] += [b1.id]
        greeted[b1.id] += [b0.id]
        await check()

        # a0 joins b too: it and b's members (one on its shard, one on the other) meet.
        assert server.join(a0.id, "b") == Error.OK
        told(a0, *news(SYS_ADD, b0, b1))
        told(b0, *news(SYS_ADD, a0))
        told(b1, *news(SYS_ADD, a0))
        greeted[a0.id] += sorted([b0.id, b1.id])
        greeted[b0.id] += [a0.id]
        greeted[b1.id] += [a0.id]
        # b1 and a1 share a second group, x.
        assert server.join(b1.id, "x") == Error.OK  # alone in it: no one to tell
        assert server.join(a1.id, "x") == Error.OK
        told(a1, *news(SYS_ADD, b1))
        told(b1, *news(SYS_ADD, a1))
        greeted[a1.id] += [b1.id]
        greeted[b1.id] += [a1.id]
        await check()
        assert server.get_group_members("b") == sorted([a0.id, b0.id, b1.id])
        assert server.get_groups(b1.id) == ["b", "x"]

        # b1 leaves b: it shares nothing more with a0 and b0 (SYS_DEL both ways), still x
        # with a1 (nothing).
        assert server.leave(b1.id, "b") == Error.OK
        assert server.leave(b1.id, "b") == Error.OK  # not in it any more: nothing
        assert server.leave(b0.id, "nowhere") == Error.OK
        told(b1, *news(SYS_DEL, a0, b0))
        told(a0, *news(SYS_DEL, b1))
        told(b0, *news(SYS_DEL, b1))
        await check()

        # a0 leaves (clean close): its room mates a1 (room a) and b0 (room b) are told.
        await a0.close()
        await until(lambda: ("disconnected", a0.id) in log.events, 5)
        told(a1, *news(SYS_DEL, a0))
        told(b0, *news(SYS_DEL, a0))
        rest = [c for c in clients if c is not a0]
        clients[:] = rest
        await check()
        # b0 is alone in b now: its TCP drop tells nobody.
        b0.ws.transport.abort()
        await until(lambda: ("disconnected", b0.id) in log.events, 5)
        clients[:] = [c for c in clients if c is not b0]
        await check()
        assert server.get_group_members("b") == [] and server.get_groups(b1.id) == ["x"]
        assert stats(server) == dict.fromkeys(DROP_KEYS, 0)  # no greeting was dropped

    run_with(server, body, timeout=60)
    log.check()


@pytest.mark.timeout(90)
def test_a_dead_shard_s_peers_are_gone_for_their_room_mates_only(rooms_server) -> None:
    """A shard killed: each of its peers is reported gone (``SYS_DEL``) to its room mates on
    the other shard and to nobody else; the restarted shard's new peers are relayed with
    groups as well."""
    server = rooms_server
    log = MPLog(server)

    async def body() -> None:
        clients = await spread(server, log, per_shard=2, at_least=5)
        a0, b0 = on_shard(server, clients, 0)[:2]
        a1, b1 = on_shard(server, clients, 1)[:2]
        for client, room in ((a0, "a"), (a1, "a"), (b0, "b"), (b1, "b")):
            assert server.join(client.id, room) == Error.OK
        await until(lambda: all(c.greetings() for c in (a0, a1, b0, b1)), 5)
        survivors = on_shard(server, clients, 1)
        await settle(server, log, clients)
        systems = {c.id: c.system() for c in survivors}
        pid = server.get_shard_status()[0]["pid"]
        os.kill(pid, signal.SIGKILL)
        gone = on_shard(server, clients, 0)
        await until(lambda: all(("disconnected", c.id) in log.events for c in gone), 20)
        await settle(server, log, survivors)
        assert a1.system() == systems[a1.id] + news(SYS_DEL, a0)
        assert b1.system() == systems[b1.id] + news(SYS_DEL, b0)
        for c in survivors:
            if c not in (a1, b1):
                assert c.system() == systems[c.id] == welcome(c)
        assert server.get_group_members("a") == [a1.id]

        await until(lambda: server.get_shard_status()[0]["state"] == "running", 20)
        newcomers: list[RoomClient] = []
        while not any(server.get_peer_shard(c.id) == 0 for c in newcomers):
            assert len(newcomers) < MAX_CLIENTS
            newcomers.append(await open_client(server, log))
        fresh = next(c for c in newcomers if server.get_peer_shard(c.id) == 0)
        assert server.join(fresh.id, "a") == Error.OK
        await until(lambda: fresh.greetings() == [a1.id], 5)
        everyone = survivors + newcomers
        await fresh.send(b1.id, b"not my room")
        await fresh.send(0, b"to room a")
        await settle(server, log, everyone)
        for c in everyone:
            want = [mp_frame(fresh.id, 0, b"to room a")] if c is a1 else []
            assert c.data() == want, c.id
        assert fresh.system() == welcome(fresh) + news(SYS_ADD, a1)
        assert stats(server) == dict.fromkeys(DROP_KEYS, 0) | {"group": 1}

    run_with(server, body, timeout=60)
    log.check()


def frames_outside_acquaintance(client: MPClient, others: set[int]) -> list[str]:
    """Data frames ``client`` got from one of ``others`` while it did not know it (before its
    ``SYS_ADD`` or after its ``SYS_DEL``)."""
    known: set[int] = set()
    wrong = []
    for n, frame in enumerate(client.frames):
        if frame[0] in (SYS_ADD, SYS_DEL):
            (subject,) = struct.unpack_from("<i", frame, HEADER_SIZE)
            (known.add if frame[0] == SYS_ADD else known.discard)(subject)
        elif frame[0] == SYS_NONE:
            (sender,) = struct.unpack_from("<i", frame, 1)
            if sender in others and sender not in known:
                wrong.append(f"frame {n} from {sender}: {frame[HEADER_SIZE:]!r}")
    return wrong


@pytest.mark.timeout(90)
def test_no_frame_from_a_peer_before_its_sys_add_or_after_its_sys_del(rooms_server) -> None:
    """A peer that sends all the time (to everyone, and its room mates to it) while the
    application joins it to their room and takes it out again, over and over: each client
    gets the other's frames only between its SYS_ADD and its SYS_DEL, on one shard and
    across."""
    server = rooms_server
    log = MPLog(server)

    async def body() -> None:
        clients = await spread(server, log, per_shard=2, at_least=4)
        chatter, local = on_shard(server, clients, 0)[:2]
        remote = on_shard(server, clients, 1)[0]
        for mate in (local, remote):
            assert server.join(mate.id, "room") == Error.OK
        stop = asyncio.Event()

        async def chat(client: MPClient, to: int) -> int:
            sent = 0
            while not stop.is_set():
                await client.send(to, b"%d" % sent)
                sent += 1
                await asyncio.sleep(0)
            return sent

        chats = [
            asyncio.create_task(chat(chatter, 0)),
            asyncio.create_task(chat(local, chatter.id)),
            asyncio.create_task(chat(remote, chatter.id)),
        ]
        for _ in range(12):
            assert server.join(chatter.id, "room") == Error.OK
            await asyncio.sleep(0.02)
            assert server.leave(chatter.id, "room") == Error.OK
            await asyncio.sleep(0.02)
        stop.set()
        sent = await asyncio.gather(*chats)
        assert min(sent) > 0
        await settle(server, log, clients)
        assert frames_outside_acquaintance(local, {chatter.id}) == []
        assert frames_outside_acquaintance(remote, {chatter.id}) == []
        assert frames_outside_acquaintance(chatter, {local.id, remote.id}) == []
        for c in (local, remote):
            assert (
                c.system()
                == welcome(c)
                + news(SYS_ADD, c is local and remote or local)
                + (news(SYS_ADD, chatter) + news(SYS_DEL, chatter)) * 12
            )
            assert any(f[1:5] == struct.pack("<i", chatter.id) for f in c.data())
        assert len([f for f in chatter.data() if f[1:5] != b"\x01\0\0\0"]) > 0
        others = [c for c in clients if c not in (chatter, local, remote)]
        assert all(c.data() == [] for c in others)

    run_with(server, body, timeout=60)
    log.check()


# -- what frames reach ------------------------------------------------------------------------


def rooms_recipients(
    sender: int, to: int, mates: dict[int, set[int]]
) -> tuple[set[int], bool, bool]:
    """With relay groups: (clients that get the frame, whether the server gets it, whether
    it is dropped as ``group``)."""
    if to == SERVER:
        return set(), True, False
    if to == 0:
        return mates[sender], True, False
    if to < 0:
        return mates[sender] - {-to}, to != -SERVER, False
    return ({to}, False, False) if to in mates[sender] else (set(), False, True)


@pytest.mark.timeout(90)
def test_frames_reach_only_room_mates_and_others_are_dropped_and_counted(rooms_server) -> None:
    server = rooms_server
    log = MPLog(server)

    async def body() -> None:
        clients = await spread(server, log, per_shard=3, at_least=7)
        a0, b0, c0 = on_shard(server, clients, 0)[:3]
        a1, b1, c1 = on_shard(server, clients, 1)[:3]
        rooms = {"a": [a0, a1, c0], "b": [b0, b1, c1]}  # each with peers on both shards
        for room, members in rooms.items():
            for member in members:
                assert server.join(member.id, room) == Error.OK
        mates = {c.id: set() for c in clients}
        for members in rooms.values():
            for member in members:
                mates[member.id] = {m.id for m in members} - {member.id}
        await until(lambda: all(len(c.greetings()) == len(mates[c.id]) for c in clients), 5)
        await settle(server, log, clients)
        before = {c.id: len(c.frames) for c in clients}

        want: dict[int, Counter[bytes]] = {c.id: Counter() for c in clients}
        server_wants: Counter[tuple[int, bytes]] = Counter()
        group_drops = 0
        ids = [c.id for c in clients]
        for c in clients:
            excluded = min(mates[c.id], default=ids[0] if ids[0] != c.id else ids[1])
            targets = [0, SERVER, -excluded, -SERVER] + [i for i in ids if i != c.id]
            for to in targets:
                payload = f"{c.id}->{to}".encode()
                frame = await c.send(to, payload)
                reached, to_server, dropped = rooms_recipients(c.id, to, mates)
                for r in reached:
                    want[r][frame] += 1
                if to_server:
                    server_wants[(c.id, payload)] += 1
                group_drops += dropped
        await settle(server, log, clients)
        for c in clients:
            got = Counter(f for f in c.frames[before[c.id] :] if f in c.data())
            assert got == want[c.id], c.id
            # in the order of the joins: compared as sets
            told = sorted(c.system()[2:])
            assert c.system()[:2] == welcome(c), c.id
            assert told == sorted(news(SYS_ADD, *[d for d in clients if d.id in mates[c.id]]))
        assert Counter(log.data()) == server_wants
        assert group_drops == sum(len(ids) - 1 - len(mates[i]) for i in ids)
        await until(lambda: stats(server)["group"] == group_drops, 5)
        assert stats(server) == dict.fromkeys(DROP_KEYS, 0) | {"group": group_drops}

        # The server's own packets reach every client, whatever the groups.
        server.set_target_peer(0)
        assert server.put_packet(b"from the server") == Error.OK
        outsider = next(c for c in clients if not mates[c.id])
        server.set_target_peer(-outsider.id)
        assert server.put_packet(b"not to the outsider") == Error.OK
        server.set_target_peer(0)
        await settle(server, log, clients)
        for c in clients:
            from_server = [f[HEADER_SIZE:] for f in c.data() if f[1:5] == b"\x01\0\0\0"]
            assert from_server == [b"from the server"] + (
                [] if c is outsider else [b"not to the outsider"]
            ), c.id

        # c0 leaves room a: from now on its broadcasts reach the server only, and frames
        # between it and a's members are dropped, on its shard (a0) and across (a1).
        assert server.leave(c0.id, "a") == Error.OK
        await until(lambda: sys_frame(SYS_DEL, c0.id) in a1.frames, 5)
        await settle(server, log, clients)
        marks = {c.id: len(c.frames) for c in clients}
        await c0.send(0, b"alone")
        await c0.send(a0.id, b"to a0")
        await a1.send(c0.id, b"to c0")
        await a0.send(0, b"a0 to a")
        await settle(server, log, clients)
        for c in clients:
            fresh = [f for f in c.frames[marks[c.id] :] if f in c.data()]
            assert fresh == ([mp_frame(a0.id, 0, b"a0 to a")] if c is a1 else []), c.id
        assert (c0.id, b"alone") in log.packets and (a0.id, b"a0 to a") in log.packets
        await until(lambda: stats(server)["group"] == group_drops + 2, 5)

    run_with(server, body, timeout=60)
    log.check()


# -- a reload keeps the rooms -------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_rooms_hold_after_a_reload(tmp_path: Path) -> None:
    """``wsfleet reload``: the connections move with their groups and their relay mode, so
    the new shard processes keep the rooms apart (on one shard and across), and nobody is
    told anything."""
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    control = str(folder / "control.sock")
    server = WebSocketServer(shards=2, control=control)
    assert server.set_relay_groups(True) == Error.OK
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    log = MPLog(server)
    try:

        async def body() -> None:
            clients = await spread(server, log, per_shard=2, at_least=4)
            a0, b0 = on_shard(server, clients, 0)[:2]
            a1, b1 = on_shard(server, clients, 1)[:2]
            for client, room in ((a0, "a"), (a1, "a"), (b0, "b"), (b1, "b")):
                assert server.join(client.id, room) == Error.OK
            await until(lambda: all(c.greetings() for c in (a0, a1, b0, b1)), 5)
            await settle(server, log, clients)
            systems = {c.id: c.system() for c in clients}
            result = await asyncio.to_thread(wsfleet, "reload", "--control", control, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            assert server.get_stats()["totals"]["reloads"] == 2
            marks = {c.id: len(c.frames) for c in clients}
            for c, mate, other in ((a0, a1, b0), (b0, b1, a0), (a1, a0, b1), (b1, b0, a1)):
                await c.send(0, b"room")
                await c.send(other.id, b"same shard, other room")
                await c.send(mate.id, b"mate")
            await settle(server, log, clients)
            for c, mate in ((a0, a1), (a1, a0), (b0, b1), (b1, b0)):
                fresh = [f for f in c.frames[marks[c.id] :] if f in c.data()]
                assert fresh == [mp_frame(mate.id, 0, b"room"), mp_frame(mate.id, c.id, b"mate")]
            await until(lambda: stats(server)["group"] == 4, 5)
            assert {c.id: c.system() for c in clients} == systems  # nobody told anything

        run_with(server, body, timeout=90)
    finally:
        server.stop()
    log.check()


# -- real Godot 3.2.3 clients in two rooms ----------------------------------------------------


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
    with GodotProcesses(tmp_path) as processes:
        yield processes


class RoomAssigner:
    """Joins each peer to a room as it connects (in ``peer_connected``): the smaller room,
    preferring one with no member on the peer's shard yet, so that each room spans both
    shards when the kernel spreads the clients over both."""

    ROOMS = ("red", "blue")

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.members: dict[str, list[int]] = {room: [] for room in self.ROOMS}
        self.queries: dict[int, dict[str, list[str]]] = {}  # the upgrade request's query
        server.connect("peer_connected", self._on_connected)

    def _on_connected(self, peer_id: int) -> None:
        self.queries[peer_id] = dict(self.server.get_peer(peer_id).get_request().query)
        shard = self.server.get_peer_shard(peer_id)
        room = min(
            self.ROOMS,
            key=lambda r: (
                len(self.members[r]),
                any(self.server.get_peer_shard(p) == shard for p in self.members[r]),
                self.ROOMS.index(r),
            ),
        )
        assert self.server.join(peer_id, room) == Error.OK
        self.members[room].append(peer_id)

    def room_of(self, peer_id: int) -> str:
        return next(r for r, ids in self.members.items() if peer_id in ids)


@pytest.mark.timeout(godot_mp.TEST_TIMEOUT)
def test_godot_clients_in_two_rooms_see_and_hear_only_their_room(godot) -> None:
    """4 Godot 3.2.3 clients (6 when the kernel put the first 4 on one shard), joined to two
    rooms as they connect: each sees (``network_peer_connected``) only its room mates and
    the server, gets every call and RAW packet of its room and nothing of the other, and
    sees only its room's leaver go; the server gets everything from everyone."""
    server = WebSocketServer(shards=2)
    assert server.set_relay_groups(True) == Error.OK
    rooms = RoomAssigner(server)  # before FleetScript: peers are in a room before its handlers
    script = FleetScript(server)
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    try:

        def poll() -> None:
            server.poll(0.01)
            script.drain()

        def launch() -> GodotProcess:  # each URL with a query, as a game names its room
            url = f"ws://127.0.0.1:{server.port}/?client={len(clients)}"
            return godot.start(
                godot_mp.CLIENT_SCRIPT, *options(url=url, timeout=godot_mp.GODOT_DEADLINE)
            )

        clients: list[GodotProcess] = []
        for _ in range(CLIENTS):
            clients.append(launch())
        while True:
            wait_until(
                lambda: len(script.connected) == len(clients),
                clients,
                "all join",
                wait=WAIT,
                poll=poll,
            )
            shards = {server.get_peer_shard(peer_id) for peer_id in script.connected}
            if shards == {0, 1} or len(clients) >= godot_mp.MAX_CLIENTS:
                break
            for _ in range(2):  # two more: the rooms stay even
                clients.append(launch())
        assert shards == {0, 1}, f"{len(clients)} clients, all on shard {shards}"
        on_shard = {peer_id: server.get_peer_shard(peer_id) for peer_id in script.connected}
        queries = sorted(q["client"][0] for q in rooms.queries.values())
        assert queries == sorted(str(n) for n in range(len(clients))), rooms.queries
        leavers = {}
        for room, members in rooms.members.items():
            roster = sorted(members)
            assert len(roster) == len(clients) // 2
            assert server.get_group_members(room) == roster
            leavers[room] = min(roster, key=on_shard.__getitem__)
            script.go(roster, leavers[room])
        wait_until(
            lambda: all(c.exited() for c in clients) and len(script.disconnected) == len(clients),
            clients,
            "the run ends",
            wait=WAIT,
            poll=poll,
        )
        for client in clients:
            client.finish_reading()
        outputs = "\n---\n".join([script.view()] + [c.output() for c in clients])
        assert script.errors == [], outputs

        # Each room's clients: only their mates and the server, everything of their room.
        by_room: dict[str, list[GodotProcess]] = {room: [] for room in rooms.members}
        for client in clients:
            (connected,) = client.events("connected_to_server")
            by_room[rooms.room_of(connected["id"])].append(client)
        observed = {}
        for room, members in rooms.members.items():
            roster = sorted(members)
            observed[room] = check_clients(by_room[room], roster, leavers[room], script.view())
            for client in by_room[room]:
                seen = {e["peer"] for e in client.events("peer_connected")}
                seen |= {e["peer"] for e in client.events("peer_disconnected")}
                assert seen <= {SERVER, *roster}, client.output()
                # the room's leaver went before the rest of its room
            left = [p for p in script.disconnected if p in roster]
            assert left[0] == leavers[room], (room, script.disconnected)

        # The server is in every room: every client's calls and RAW packets reached it.
        everyone = sorted(script.connected)
        assert expected_part(script.receipts) == server_expects(everyone), outputs
        assert server.get_mp_stats()["group"] == 0  # Godot targets only the peers it knows
        report = {"rooms": rooms.members, "shards": on_shard, "observed": observed}
        print("relay groups with Godot:", json.dumps(report, sort_keys=True), file=sys.stderr)
    finally:
        server.stop()
