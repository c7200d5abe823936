"""``server.multiplayer`` on the wire: Python clients make Godot 3.2's RPC, rset and
path-cache exchanges with a real server (2 shards) polled from the test's event loop.

The clients are `test_mp_protocol.MPClient` (the 9-byte multiplayer header over
``websockets``); the MultiplayerAPI payloads they send and read are built here, by
docs/GODOT_WIRE.md §4.4 and not by ``wsfleet.multiplayer``, so the tests check the
server's side against the document: ``REMOTE_CALL`` (u32 target, name + NUL, u8
count, Variants, and in the full-path form the path + NUL at ``target & 0x7fffffff``),
``REMOTE_SET``, ``SIMPLIFY_PATH``, ``CONFIRM_PATH`` and ``RAW``.

Absence ("nobody else got it") is checked after `settle` (see test_mp_protocol):
markers along every sender->receiver pair, server included, so that everything sent
before them, and every reply the server's handlers sent, has arrived.

Every body runs under `run_mp`, which fails the test if ``poll()`` raised in the
event loop (asyncio would only log it): bad input must never reach the user's poll.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

import wsfleet
from wsfleet import Error, RPCMode, WebSocketServer
from wsfleet.aio import polling
from wsfleet.variant import FullObject, decode_variant_at, encode_variant

from .test_mp_protocol import (
    HEADER,
    HEADER_SIZE,
    MARKER,
    SERVER,
    SYS_NONE,
    MPClient,
    MPLog,
    join,
    on_shard,
    settle,
    spread,
)
from .wsserver import until

REMOTE_CALL, REMOTE_SET, SIMPLIFY_PATH, CONFIRM_PATH, RAW = range(5)
FULL_PATH = 0x8000_0000
U32 = struct.Struct("<I")
RPC_REASONS = (
    "rpc_malformed",
    "rpc_cache",
    "rpc_node",
    "rpc_member",
    "rpc_mode",
    "rpc_arguments",
    "rpc_decode",
    "rpc_handler_error",
)


# -- the client's side of the payloads (docs/GODOT_WIRE.md §4.4) ----------------------------


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def call_body(method: str, *args: Any) -> bytes:
    return _name(method) + bytes([len(args)]) + b"".join(encode_variant(a) for a in args)


def call_by_id(path_id: int, method: str, *args: Any) -> bytes:
    return bytes([REMOTE_CALL]) + U32.pack(path_id) + call_body(method, *args)


def call_full(path: str, method: str, *args: Any) -> bytes:
    body = call_body(method, *args)
    return bytes([REMOTE_CALL]) + U32.pack(FULL_PATH | (5 + len(body))) + body + _name(path)


def set_by_id(path_id: int, prop: str, value: Any) -> bytes:
    return bytes([REMOTE_SET]) + U32.pack(path_id) + _name(prop) + encode_variant(value)


def set_full(path: str, prop: str, value: Any) -> bytes:
    body = _name(prop) + encode_variant(value)
    return bytes([REMOTE_SET]) + U32.pack(FULL_PATH | (5 + len(body))) + body + _name(path)


def simplify(path_id: int, path: str) -> bytes:
    return bytes([SIMPLIFY_PATH]) + U32.pack(path_id) + _name(path)


def confirm(path: str) -> bytes:
    return bytes([CONFIRM_PATH]) + _name(path)


def from_server(client: MPClient) -> list[tuple[int, bytes]]:
    """(to, payload) of every data frame the server sent this client, markers left out."""
    out = []
    for frame in client.frames:
        kind, sender, to = HEADER.unpack_from(frame)
        payload = frame[HEADER_SIZE:]
        if kind == SYS_NONE and sender == SERVER and MARKER not in payload:
            out.append((to, payload))
    return out


def read_call(payload: bytes, paths: dict[int, str]) -> tuple[str, str, list[Any], bool]:
    """(path, method, args, full-path form) of a REMOTE_CALL; ``paths``: the sender's ids."""
    assert payload[0] == REMOTE_CALL, payload
    target = U32.unpack_from(payload, 1)[0]
    end = payload.index(b"\0", 5)
    method = payload[5:end].decode()
    argc, offset = payload[end + 1], end + 2
    args = []
    for _ in range(argc):
        value, offset = decode_variant_at(payload, offset)
        args.append(value)
    if target & FULL_PATH:
        assert target & ~FULL_PATH == offset, "the path must follow the arguments"
        assert payload.endswith(b"\0") and payload.count(b"\0", offset) == 1
        return payload[offset:-1].decode(), method, args, True
    assert offset == len(payload), "nothing after the arguments in the id form"
    return paths[target], method, args, False


class ServerView:
    """What one client learnt from the server: its path ids and its calls, in order."""

    def __init__(self, client: MPClient) -> None:
        self.client = client
        self.seen = 0
        self.paths: dict[int, str] = {}

    def calls(self) -> list[tuple[str, str, list[Any], bool]]:
        """The REMOTE_CALLs not returned before (SIMPLIFY_PATHs are learnt on the way)."""
        out = []
        frames = from_server(self.client)
        for _, payload in frames[self.seen :]:
            if payload[0] == SIMPLIFY_PATH:
                self.paths[U32.unpack_from(payload, 1)[0]] = payload[5:-1].decode()
            elif payload[0] == REMOTE_CALL:
                out.append(read_call(payload, self.paths))
        self.seen = len(frames)
        return out


def arrivals(client: MPClient) -> list[tuple[str, Any, Any]]:
    """System messages ("sys", type, id) and the server's calls ("call", method, first
    argument), in the order they arrived."""
    paths: dict[int, str] = {}
    out: list[tuple[str, Any, Any]] = []
    for frame in client.frames:
        kind, sender, _ = HEADER.unpack_from(frame)
        payload = frame[HEADER_SIZE:]
        if kind != SYS_NONE:
            out.append(("sys", kind, struct.unpack_from("<i", payload)[0]))
        elif sender == SERVER and payload[0] == SIMPLIFY_PATH:
            paths[U32.unpack_from(payload, 1)[0]] = payload[5:-1].decode()
        elif sender == SERVER and payload[0] == REMOTE_CALL:
            _, method, args, _ = read_call(payload, paths)
            out.append(("call", method, args[0] if args else None))
    return out


# -- the server's nodes ---------------------------------------------------------------------


class Lobby:
    """A node with a member of every mode; what ran is in ``calls`` as (method, sender, args)."""

    hp = wsfleet.remote(100)
    armor = wsfleet.puppet(5)
    synced = wsfleet.remotesync(0)
    owned = wsfleet.mastersync(0)
    plain = 3  # not marked: no rset

    def __init__(self, mp: wsfleet.MultiplayerAPI) -> None:
        self.mp = mp
        self.calls: list[tuple[str, int, tuple[Any, ...]]] = []

    def _note(self, method: str, *args: Any) -> None:
        self.calls.append((method, self.mp.get_rpc_sender_id(), args))

    @wsfleet.remote
    def echo(self, token: Any) -> None:
        """The issue's contract: answer the caller with its token and its id."""
        sender = self.mp.get_rpc_sender_id()
        self._note("echo", token)
        self.mp.rpc_id(sender, "/root/Lobby", "reply", token, sender)

    @wsfleet.remote
    def chat(self, text: str) -> None:
        self._note("chat", text)

    @wsfleet.remote
    def take(self, value: Any) -> None:
        self._note("take", value)

    @wsfleet.remote
    def boom(self) -> None:
        raise RuntimeError("boom on purpose")

    @wsfleet.remote
    def chat2(self, text: str) -> None:  # rpc_config'd DISABLED in the tests
        self._note("chat2", text)

    @wsfleet.master
    def order(self, x: Any) -> None:
        self._note("order", x)

    @wsfleet.puppet
    def told(self, x: Any) -> None:
        self._note("told", x)

    @wsfleet.remotesync
    def rsync(self, x: Any) -> None:
        self._note("rsync", x)

    @wsfleet.mastersync
    def msync(self, x: Any) -> None:
        self._note("msync", x)

    @wsfleet.puppetsync
    def psync(self, x: Any) -> None:
        self._note("psync", x)

    def unmarked(self, x: Any) -> None:
        self._note("unmarked", x)

    def unmarked2(self, x: Any) -> None:  # rpc_config'd PUPPET in the tests
        self._note("unmarked2", x)

    @wsfleet.remote
    @property
    def readonly(self) -> int:  # marked for rset, but has no setter
        return 1


class Owned:
    """A node whose network master is a client (``set_network_master``)."""

    def __init__(self, mp: wsfleet.MultiplayerAPI) -> None:
        self.mp = mp
        self.calls: list[tuple[str, int, tuple[Any, ...]]] = []

    @wsfleet.master
    def order(self, x: Any) -> None:
        self.calls.append(("order", self.mp.get_rpc_sender_id(), (x,)))

    @wsfleet.puppet
    def told(self, x: Any) -> None:
        self.calls.append(("told", self.mp.get_rpc_sender_id(), (x,)))

    @wsfleet.remote
    def who(self) -> None:
        self.calls.append(("who", self.mp.get_rpc_sender_id(), ()))


# -- running --------------------------------------------------------------------------------


@pytest.fixture
def rpc_server() -> Iterator[Callable[[], tuple[WebSocketServer, MPLog, Lobby, Owned]]]:
    """A 2-shard server in multiplayer mode with a `Lobby` and an `Owned` registered."""
    started: list[WebSocketServer] = []

    def make() -> tuple[WebSocketServer, MPLog, Lobby, Owned]:
        server = WebSocketServer(shards=2)
        mp = server.multiplayer
        lobby, owned = Lobby(mp), Owned(mp)
        mp.register_node("/root/Lobby", lobby)
        mp.register_node("/root/Owned", owned)
        mp.rpc_config("/root/Lobby", "chat2", RPCMode.DISABLED)
        mp.rpc_config("/root/Lobby", "unmarked2", RPCMode.PUPPET)
        assert server.listen(0, [], gd_mp_api=True) == Error.OK
        started.append(server)
        return server, MPLog(server), lobby, owned

    yield make
    for server in started:
        server.stop()


def run_mp(server: WebSocketServer, body: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    """`wsserver.run_with`, failing if anything (``poll()`` above all) raised in the loop."""
    raised: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: raised.append(ctx))
        async with polling(server):
            return await asyncio.wait_for(body(), timeout)

    result = asyncio.run(main())
    assert raised == [], raised
    return result


def rpc_stats(server: WebSocketServer) -> dict[str, int]:
    got = server.get_mp_stats()
    assert set(RPC_REASONS) <= set(got), got
    return {k: got[k] for k in RPC_REASONS}


async def replied(client: MPClient, view: ServerView, token: Any, timeout: float = 5) -> None:
    """Wait for the server's ``reply(token, client.id)`` to ``client``."""
    got: list[tuple[str, str, list[Any], bool]] = []

    def arrived() -> bool:
        got.extend(view.calls())
        return ("Lobby", "reply", [token, client.id]) in [c[:3] for c in got]

    await until(arrived, timeout)


# -- bad input costs only the sender --------------------------------------------------------


def malformed(bad: MPClient) -> list[tuple[str, bytes]]:
    """Every kind of bad RPC traffic, with the reason it must be counted under. ``bad``
    has simplified id 7 as ``Lobby`` and id 8 as ``Ghost`` (no node there) before."""
    unknown_type = b"\xff\x00\x00\x00"
    truncated_string = struct.pack("<II", 4, 100) + b"abc"  # STRING of 100 bytes, 3 there
    full_object = encode_variant(FullObject("Node", {"name": "x"}), True)
    return [
        ("rpc_malformed", b"\x00"),  # a command byte alone
        ("rpc_malformed", b"\x00" + U32.pack(7)),  # 5 bytes: no name
        ("rpc_malformed", b"\x01\x07\x00"),  # REMOTE_SET, too short
        ("rpc_malformed", b"\x02\x07\x00\x00"),  # SIMPLIFY_PATH, too short
        ("rpc_malformed", b"\x03"),  # CONFIRM_PATH without a path
        ("rpc_malformed", b"\x00" + U32.pack(7) + b"echo"),  # the name without its NUL
        ("rpc_malformed", b"\x01" + U32.pack(7) + b"hp"),  # the same for a set
        ("rpc_malformed", b"\x00" + U32.pack(7) + b"echo\x00"),  # no argument count
        ("rpc_malformed", b"\x01" + U32.pack(7) + b"hp\x00"),  # no value
        ("rpc_malformed", b"\x00" + U32.pack(FULL_PATH | 200) + call_body("echo", 1)),
        ("rpc_malformed", b"\x00" + U32.pack(FULL_PATH | 11) + call_body("echo")),  # at the end
        ("rpc_cache", call_by_id(99, "echo", 1)),  # an id never simplified
        ("rpc_cache", set_by_id(99, "hp", 1)),
        ("rpc_cache", confirm("Nowhere")),  # a path the server never sent anyone
        ("rpc_cache", confirm("Lobby")),  # sent to another client, never to this one
        ("rpc_node", call_full("Nowhere", "echo", 1)),
        ("rpc_node", call_full("/root", "echo", 1)),
        ("rpc_node", call_full("", "echo", 1)),
        ("rpc_node", set_full("Nowhere", "hp", 1)),
        ("rpc_node", call_by_id(8, "echo", 1)),  # simplified, but nobody stands there
        ("rpc_member", call_by_id(7, "unmarked", 1)),
        ("rpc_member", call_by_id(7, "nope", 1)),
        ("rpc_member", call_by_id(7, "__init__", 1)),
        ("rpc_member", call_by_id(7, "_note", "x")),
        ("rpc_member", call_by_id(7, "hp", 1)),  # an rset attribute called as a method
        ("rpc_member", call_by_id(7, "chat2", "x")),  # rpc_config'd DISABLED
        ("rpc_member", set_by_id(7, "plain", 1)),  # an attribute not marked
        ("rpc_member", set_by_id(7, "echo", 1)),  # a method set as an attribute
        ("rpc_member", set_by_id(7, "nope", 1)),
        ("rpc_mode", call_by_id(7, "told", 1)),  # puppet: the server is the master
        ("rpc_mode", call_by_id(7, "psync", 1)),  # puppetsync: the same
        ("rpc_mode", call_by_id(7, "unmarked2", 1)),  # rpc_config'd PUPPET
        ("rpc_mode", set_by_id(7, "armor", 1)),  # puppet var
        ("rpc_mode", call_full("Owned", "order", 1)),  # master: a client is the master
        ("rpc_mode", call_full("Owned", "told", 1)),  # puppet: but not from its master
        ("rpc_arguments", call_by_id(7, "echo")),
        ("rpc_arguments", call_by_id(7, "echo", 1, 2)),
        ("rpc_arguments", call_full("Lobby", "boom", 1)),
        ("rpc_decode", b"\x00" + U32.pack(7) + b"echo\x00\x01" + unknown_type),
        ("rpc_decode", b"\x00" + U32.pack(7) + b"echo\x00\x01" + truncated_string),
        ("rpc_decode", b"\x00" + U32.pack(7) + b"echo\x00\x02" + encode_variant(1)),  # 1 of 2
        ("rpc_decode", b"\x01" + U32.pack(7) + b"hp\x00" + unknown_type),
        ("rpc_decode", b"\x00" + U32.pack(7) + b"take\x00\x01" + full_object),  # objects off
        ("rpc_decode", b"\x01" + U32.pack(7) + b"hp\x00" + full_object),
        ("rpc_handler_error", call_by_id(7, "boom")),
        ("rpc_handler_error", set_by_id(7, "readonly", 2)),  # a property without a setter
    ]


@pytest.mark.timeout(60)
def test_every_malformed_rpc_is_counted_by_reason_and_disturbs_nobody(rpc_server, caplog) -> None:
    server, log, lobby, owned = rpc_server()
    mp = server.multiplayer
    caplog.set_level(logging.ERROR, logger="wsfleet")
    unknown_commands = [b"\x05", b"\x07unknown command", b"\xffwith a node registered"]

    async def body() -> tuple[list[MPClient], MPClient, MPClient, list[tuple[str, bytes]]]:
        clients = await spread(server, log, per_shard=1, at_least=3)
        bad = on_shard(server, clients, 0)[0]
        good = on_shard(server, clients, 1)[0]
        bad_view, good_view = ServerView(bad), ServerView(good)
        mp.set_network_master("/root/Owned", good.id)
        # The good client's first call: the server sends it the path "Lobby".
        await good.send(SERVER, call_full("Lobby", "echo", "first"))
        await replied(good, good_view, "first")
        await bad.send(SERVER, simplify(7, "Lobby"))
        await bad.send(SERVER, simplify(8, "Ghost"))
        await until(lambda: (bad.id, confirm("Ghost")) in from_server(bad), 5)
        assert from_server(bad) == [(bad.id, confirm("Lobby")), (bad.id, confirm("Ghost"))]

        cases = malformed(bad)
        for n, (_, payload) in enumerate(cases):
            await bad.send(SERVER, payload)
            # After each one, a well-formed RPC from a client on the other shard still works.
            await good.send(SERVER, call_full("Lobby", "echo", n))
            await replied(good, good_view, n)
        for payload in unknown_commands:  # not RPC traffic: get_packet, as without nodes
            await bad.send(SERVER, payload)
        # The master of Owned may call its puppet method; the sender itself still works.
        await good.send(SERVER, call_full("Owned", "told", "from the master"))
        await bad.send(SERVER, call_by_id(7, "echo", "bad still works"))
        await replied(bad, bad_view, "bad still works")
        await settle(server, log, clients)
        await settle(server, log, clients)  # and nothing more trickles in
        return clients, bad, good, cases

    clients, bad, good, cases = run_mp(server, body)
    expected = dict.fromkeys(RPC_REASONS, 0)
    for reason, _ in cases:
        expected[reason] += 1
    assert rpc_stats(server) == expected
    assert {
        k: server.get_mp_stats()[k] for k in ("short", "type", "from", "target")
    } == dict.fromkeys(("short", "type", "from", "target"), 0)
    # Only well-formed calls ran, each once, with the right sender.
    assert lobby.calls == (
        [("echo", good.id, ("first",))]
        + [("echo", good.id, (n,)) for n in range(len(cases))]
        + [("echo", bad.id, ("bad still works",))]
    )
    assert owned.calls == [("told", good.id, ("from the master",))]
    assert log.data() == [(bad.id, p) for p in unknown_commands]
    assert sorted(server.get_peers()) == sorted(c.id for c in clients)
    assert log.named("disconnected") == []
    for c in clients:  # the bad client's unicasts to the server reached no other client
        if c is not bad:
            assert [f for f in c.data() if HEADER.unpack_from(f)[1] == bad.id] == [], c.id
    # Nothing but the confirmations and the last reply went back to the bad client.
    assert [p[0] for _, p in from_server(bad)] == [CONFIRM_PATH, CONFIRM_PATH, SIMPLIFY_PATH, 0]
    errors = [r.getMessage() for r in caplog.records if "raised" in r.getMessage()]
    assert len(errors) == 2, errors
    assert any("/root/Lobby" in e and "boom" in e for e in errors), errors
    assert any("/root/Lobby" in e and "readonly" in e for e in errors), errors
    log.check()


@pytest.mark.timeout(60)
def test_rpc_config_of_a_method_the_object_lacks_is_dropped_not_raised(rpc_server) -> None:
    """``rpc_config`` may name a method the object does not have (Godot allows it and
    refuses the call with an error); a call to it must be dropped as ``rpc_member``.

    Today the AttributeError escapes ``poll()``; under ``wsfleet.aio.polling`` the
    front is then never woken again (``Fleet.poll`` re-arms the shards' doorbells only
    when it returns normally), so the next, well-formed call is never answered."""
    server, log, lobby, _ = rpc_server()
    server.multiplayer.rpc_config("/root/Lobby", "missing", RPCMode.REMOTE)

    async def body() -> None:
        clients = await spread(server, log, per_shard=1)
        view = ServerView(clients[0])
        await clients[0].send(SERVER, call_full("Lobby", "missing", 1))
        await clients[0].send(SERVER, call_full("Lobby", "echo", "after"))
        await replied(clients[0], view, "after", timeout=3)

    run_mp(server, body)
    assert rpc_stats(server)["rpc_member"] == 1


# -- the path cache, server -> client --------------------------------------------------------


@pytest.mark.timeout(60)
def test_path_cache_server_to_client_full_path_until_confirmed_then_one_frame(
    rpc_server,
) -> None:
    server, log, lobby, _ = rpc_server()
    mp = server.multiplayer

    def full(method: str, *args: Any, path: str = "Lobby") -> bytes:
        return call_full(path, method, *args)

    async def body() -> None:
        clients = await spread(server, log, per_shard=1, at_least=2)
        a, b = on_shard(server, clients, 0)[0], on_shard(server, clients, 1)[0]
        rest = [c for c in clients if c not in (a, b)]  # a third client, if spread made one
        everyone = [a, b, *rest]
        seen: dict[int, int] = {}

        async def new_frames() -> dict[int, list[tuple[int, bytes]]]:
            await settle(server, log, everyone)
            out = {}
            for c in everyone:
                frames = from_server(c)
                out[c.id] = frames[seen.get(c.id, 0) :]
                seen[c.id] = len(frames)
            return out

        # First rpc(): SIMPLIFY_PATH then the full-path form, one unicast frame each.
        mp.rpc("/root/Lobby", "hello", 1, "x")
        got = await new_frames()
        for c in everyone:
            assert got[c.id] == [(c.id, simplify(1, "Lobby")), (c.id, full("hello", 1, "x"))]
        # All but b confirm: they get the id form, b still the full path; no SIMPLIFY.
        for c in everyone:
            if c is not b:
                await c.send(SERVER, confirm("Lobby"))
        await settle(server, log, everyone)
        mp.rpc("/root/Lobby", "hello", 2)
        got = await new_frames()
        for c in everyone:
            assert got[c.id] == [(c.id, full("hello", 2) if c is b else call_by_id(1, "hello", 2))]
        # All confirmed: one to=0 frame, the same bytes for everyone.
        await b.send(SERVER, confirm("Lobby"))
        await settle(server, log, everyone)
        mp.rpc("/root/Lobby", "hello", 3)
        mp.rset("/root/Lobby", "hp", 7)
        mp.rpc_id(b.id, "/root/Lobby", "hello", 4)
        mp.rpc_id(-a.id, "/root/Lobby", "hello", 5)
        mp.rpc_unreliable("/root/Lobby", "hello", 6)
        got = await new_frames()
        for c in everyone:
            wanted = [(0, call_by_id(1, "hello", 3)), (0, set_by_id(1, "hp", 7))]
            if c is b:
                wanted.append((b.id, call_by_id(1, "hello", 4)))
            if c is not a:
                wanted.append((-a.id, call_by_id(1, "hello", 5)))
            assert got[c.id] == wanted + [(0, call_by_id(1, "hello", 6))], c.id
        assert lobby.hp == 100  # rset of a remote var is not local
        # A second path (a node only the clients have) gets the next id.
        mp.rpc("/root/Elsewhere", "ping")
        got = await new_frames()
        for c in everyone:
            assert got[c.id] == [
                (c.id, simplify(2, "Elsewhere")),
                (c.id, full("ping", path="Elsewhere")),
            ]
        # A newcomer: it gets SIMPLIFY + full path; the others the id form, one frame each.
        newcomer = await join(server, log, everyone)
        everyone.append(newcomer)
        mp.rpc("/root/Lobby", "hello", 7)
        got = await new_frames()
        for c in everyone:
            if c is newcomer:
                assert got[c.id] == [(c.id, simplify(1, "Lobby")), (c.id, full("hello", 7))]
            else:
                assert got[c.id] == [(c.id, call_by_id(1, "hello", 7))]
        # It leaves unconfirmed and is forgotten: one to=0 frame again.
        everyone.remove(newcomer)
        await newcomer.close()
        await until(lambda: ("disconnected", newcomer.id) in log.events, 5)
        mp.rpc("/root/Lobby", "hello", 8)
        got = await new_frames()
        assert got == {c.id: [(0, call_by_id(1, "hello", 8))] for c in everyone}
        assert rpc_stats(server) == dict.fromkeys(RPC_REASONS, 0)

    run_mp(server, body)
    log.check()


# -- the path cache, client -> server, and the contract's echo ---------------------------------


@pytest.mark.timeout(60)
def test_path_cache_client_to_server_and_the_echo_reply(rpc_server) -> None:
    server, log, lobby, owned = rpc_server()

    async def body() -> tuple[MPClient, MPClient]:
        clients = await spread(server, log, per_shard=1, at_least=2)
        a, b = on_shard(server, clients, 0)[0], on_shard(server, clients, 1)[0]
        # As a Godot client's first rpc_id(1, ...): SIMPLIFY_PATH, then the full-path form.
        await a.send(SERVER, simplify(1, "Lobby"))
        await a.send(SERVER, call_full("Lobby", "echo", "t1"))
        await until(lambda: len(from_server(a)) >= 3, 5)
        # What Godot's own server answers (docs/GODOT_WIRE.md §4.4): three frames to a.
        reply = call_body("reply", "t1", a.id)
        assert from_server(a) == [
            (a.id, confirm("Lobby")),
            (a.id, simplify(1, "Lobby")),
            (a.id, b"\x00" + U32.pack(FULL_PATH | (5 + len(reply))) + reply + b"Lobby\x00"),
        ]
        # By id now; a has not confirmed the server's path, so the reply keeps the full path.
        await a.send(SERVER, call_by_id(1, "echo", "t2"))
        await until(lambda: len(from_server(a)) >= 4, 5)
        assert from_server(a)[3] == (a.id, call_full("Lobby", "reply", "t2", a.id))
        await a.send(SERVER, confirm("Lobby"))
        await a.send(SERVER, call_by_id(1, "echo", "t3"))
        await until(lambda: len(from_server(a)) >= 5, 5)
        assert from_server(a)[4] == (a.id, call_by_id(1, "reply", "t3", a.id))
        # Ids are per sender: b's id 1 is another node (written as Godot prints it).
        await b.send(SERVER, simplify(1, "/root/Owned"))
        await b.send(SERVER, call_by_id(1, "who"))
        await a.send(SERVER, call_by_id(1, "echo", "t4"))
        await settle(server, log, clients)
        assert from_server(b) == [(b.id, confirm("/root/Owned"))]
        assert from_server(a)[5:] == [(a.id, call_by_id(1, "reply", "t4", a.id))]
        return a, b

    a, b = run_mp(server, body)
    assert lobby.calls == [("echo", a.id, (t,)) for t in ("t1", "t2", "t3", "t4")]
    assert owned.calls == [("who", b.id, ())]
    assert rpc_stats(server) == dict.fromkeys(RPC_REASONS, 0)
    assert log.data() == []  # RPC traffic is the API's, not get_packet's
    log.check()


# -- a client's rpc() to everyone -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_clients_rpc_to_everyone_reaches_each_client_and_the_server_once(rpc_server) -> None:
    server, log, lobby, _ = rpc_server()

    async def body() -> tuple[MPClient, list[MPClient], list[bytes], bytes]:
        clients = await spread(server, log, per_shard=2)
        a = on_shard(server, clients, 0)[0]
        others = [c for c in clients if c is not a]
        # Godot's first rpc(): SIMPLIFY_PATH to every peer (the server too), then the
        # full-path form, again one unicast frame per peer.
        for to in [SERVER] + [c.id for c in others]:
            await a.send(to, simplify(1, "Lobby"))
        firsts = [await a.send(to, call_full("Lobby", "chat", "hi"))
                  for to in [SERVER] + [c.id for c in others]]  # fmt: skip
        await until(lambda: (a.id, confirm("Lobby")) in from_server(a), 5)
        for c in others:  # each client confirms to a, as Godot clients do
            await c.send(a.id, confirm("Lobby"))
        # Everyone confirmed: one to=0 frame, relayed byte for byte, and run here once.
        everyone = await a.send(0, call_by_id(1, "chat", "all of you"))
        # "Everyone but c": c does not get it; the server does.
        left_out = others[-1]
        but_one = await a.send(-left_out.id, call_by_id(1, "chat", "all but one"))
        await settle(server, log, clients)
        return a, others, firsts, everyone + but_one

    a, others, firsts, _ = run_mp(server, body)
    everyone_payload = call_by_id(1, "chat", "all of you")
    but_one_payload = call_by_id(1, "chat", "all but one")
    for n, c in enumerate(others):
        from_a = [f for f in c.data() if HEADER.unpack_from(f)[1] == a.id]
        expected = [
            HEADER.pack(0, a.id, c.id) + simplify(1, "Lobby"),
            firsts[n + 1],
            HEADER.pack(0, a.id, 0) + everyone_payload,
        ]
        if c is not others[-1]:
            expected.append(HEADER.pack(0, a.id, -others[-1].id) + but_one_payload)
        assert from_a == expected, c.id
    assert lobby.calls == [("chat", a.id, (t,)) for t in ("hi", "all of you", "all but one")]
    assert log.data() == []
    assert rpc_stats(server) == dict.fromkeys(RPC_REASONS, 0)
    log.check()


# -- the server's own calls in the sync modes -------------------------------------------------


@pytest.mark.timeout(60)
def test_sync_modes_run_locally_with_sender_1_and_send_as_godot_does(rpc_server) -> None:
    server, log, lobby, _ = rpc_server()
    mp = server.multiplayer

    async def body() -> tuple[MPClient, MPClient]:
        clients = await spread(server, log, per_shard=1, at_least=2)
        a, b = on_shard(server, clients, 0)[0], on_shard(server, clients, 1)[0]
        assert mp.get_rpc_sender_id() == 0  # outside a handler
        path = "/root/Lobby"
        mp.rpc(path, "rsync", 1)  # remotesync: here and there
        mp.rpc(path, "msync", 2)  # mastersync, the server is the master: here only
        mp.rpc(path, "psync", 3)  # puppetsync: here and there
        mp.rpc(path, "order", 4)  # master, the server is the master: here only
        mp.rpc(path, "told", 5)  # puppet, the server is the master: there only
        mp.rpc(path, "chat", 6)  # remote: there only
        mp.rpc_id(a.id, path, "rsync", 7)  # to one peer: never here
        mp.rpc_id(-a.id, path, "rsync", 8)  # everyone but a: here too
        mp.rpc_id(-SERVER, path, "rsync", 9)  # every client but not the server
        mp.set_network_master(path, a.id)
        assert not mp.is_network_master(path) and mp.get_network_master(path) == a.id
        mp.rpc(path, "msync", 10)  # not the master: here and there
        mp.rpc(path, "told", 11)  # puppet, not the master: here and there
        mp.rpc(path, "order", 12)  # master, not the master: there only
        mp.set_network_master(path, SERVER)
        mp.rset(path, "synced", 13)  # remotesync var: set here and sent
        mp.rset(path, "owned", 14)  # mastersync var, the server is the master: here only
        await settle(server, log, clients)
        return a, b

    a, b = run_mp(server, body)
    assert lobby.calls == [
        ("rsync", SERVER, (1,)),
        ("msync", SERVER, (2,)),
        ("psync", SERVER, (3,)),
        ("order", SERVER, (4,)),
        ("rsync", SERVER, (8,)),
        ("msync", SERVER, (10,)),
        ("told", SERVER, (11,)),
    ]
    assert (lobby.synced, lobby.owned) == (13, 14)
    sent = [("rsync", 1), ("psync", 3), ("told", 5), ("chat", 6), ("rsync", 7), ("rsync", 8),
            ("rsync", 9), ("msync", 10), ("told", 11), ("order", 12)]  # fmt: skip
    for c, unseen in ((a, 8), (b, 7)):  # 7 went to a only, 8 to all but a
        calls = [(m, args[0]) for _, m, args, _ in ServerView(c).calls()]
        assert calls == [call for call in sent if call[1] != unseen], c.id
        sets = [p for _, p in from_server(c) if p[0] == REMOTE_SET]
        assert len(sets) == 1 and b"synced\x00" + encode_variant(13) + b"Lobby\x00" in sets[0]
    log.check()


# -- RAW packets and the peer signals ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_raw_packets_and_the_network_peer_signals(rpc_server) -> None:
    server, log, _, _ = rpc_server()
    mp = server.multiplayer
    events: list[tuple[Any, ...]] = []
    mp.connect("network_peer_connected", lambda i: events.append(("connected", i)))
    mp.connect("network_peer_disconnected", lambda i: events.append(("disconnected", i)))
    mp.connect("network_peer_packet", lambda i, data: events.append(("packet", i, bytes(data))))

    async def body() -> tuple[list[MPClient], MPClient, MPClient]:
        clients = await spread(server, log, per_shard=1, at_least=2)
        a, b = on_shard(server, clients, 0)[0], on_shard(server, clients, 1)[0]
        await a.send(SERVER, b"\x04to the server")
        await a.send(SERVER, b"\x04")  # RAW with nothing after it: no network_peer_packet
        await until(lambda: len(log.data()) == 2, 5)
        await b.send(0, b"\x04to everyone")
        mp.send_bytes(b"down to a", a.id)
        mp.send_bytes(bytearray(b"down to all"))
        await settle(server, log, clients)
        await b.close()
        await until(lambda: ("disconnected", b.id) in log.events, 5)
        return clients, a, b

    clients, a, b = run_mp(server, body)
    ids = [c.id for c in clients]
    assert events == [("connected", i) for i in ids] + [
        ("packet", a.id, b"to the server"),
        ("packet", b.id, b"to everyone"),
        ("disconnected", b.id),
    ]
    assert log.data() == [(a.id, b"\x04to the server"), (a.id, b"\x04"), (b.id, b"\x04to everyone")]
    assert HEADER.pack(0, b.id, 0) + b"\x04to everyone" in a.data()
    assert from_server(a) == [(a.id, b"\x04down to a"), (0, b"\x04down to all")]
    assert from_server(b) == [(0, b"\x04down to all")]
    assert [e for e in log.events if e[0] in ("connected", "disconnected")] == [
        ("connected", i) for i in ids
    ] + [("disconnected", b.id)]
    assert sorted(mp.get_network_connected_peers()) == sorted(i for i in ids if i != b.id)
    with pytest.raises(ValueError):
        mp.send_bytes(b"")
    log.check()


@pytest.mark.timeout(60)
def test_rpcs_from_network_peer_connected_arrive_after_the_join_messages(rpc_server) -> None:
    """A game greets a newcomer from ``network_peer_connected``: its ``rpc_id`` must reach
    the newcomer after its SYS_ID, and an ``rpc`` about it must reach every other peer
    after that peer's SYS_ADD of it (a Godot client would not know the peer yet)."""
    server, log, _, _ = rpc_server()
    mp = server.multiplayer
    mp.connect("network_peer_connected", lambda i: mp.rpc_id(i, "/root/Lobby", "welcome", i))
    mp.connect("network_peer_connected", lambda i: mp.rpc("/root/Lobby", "joined", i))

    async def body() -> list[MPClient]:
        clients = await spread(server, log, per_shard=2)
        await settle(server, log, clients)
        return clients

    clients = run_mp(server, body)
    ids = [c.id for c in clients]
    for n, c in enumerate(clients):
        order = arrivals(c)
        assert order[:2] == [("sys", 3, c.id), ("sys", 1, SERVER)], c.id
        calls = [entry for entry in order if entry[0] == "call"]
        assert calls == [("call", "welcome", c.id)] + [("call", "joined", i) for i in ids[n:]]
        for _, method, peer in calls:
            if method == "joined" and peer != c.id:
                assert order.index(("sys", 1, peer)) < order.index(("call", "joined", peer))
    log.check()
