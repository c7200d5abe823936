"""Real Godot 3.2.3 clients calling a Python node by RPC and rset (``server.multiplayer``).

Four ``godot3-server`` processes run ``tests/godot/rpc_client.gd`` (its header has the
run): each calls ``rpc_id(1, "echo", ...)`` on ``/root/Lobby`` with int, float,
String, Vector2, Array and Dictionary arguments, twice; the server answers each with
``rpc_id(sender, "server_reply", ..., sender)``; the client ``rset_id(1, ...)``s an
allowed property (``score``, remote) and a refused one (``secret``, puppet, the server
being the master), makes three calls the server refuses (a wrong argument count, an
unmarked method, an unknown one; wsfleet counts each by reason, Godot prints an error
line), asks for the server's ``state``, says ``client_ready``; once all are
ready the server ``rset``s every client's ``puppet var hp``, ``rset_id``s each one's
``tag``, ``rpc``s ``board`` on ``/root/Lobby/Board`` (a path it never used, which only
the clients have a function on) and ``broadcast`` to everyone; then each client
``rpc``s ``say`` on ``/root/Lobby/Chat`` to everyone: the other clients get it through
the relay, the server's node through the API, once each.

The server is either wsfleet with 2 shards (`PyLobby` at ``/root/Lobby``, in this
process) or, as the reference, Godot's own ``WebSocketServer`` running
``tests/godot/rpc_server.gd``, the same logic in GDScript. The same client checks
(`check_clients`) pass against both. One client of each run connects through a
recording proxy (`wsproxy.RecordingProxy`), and its multiplayer frames both ways show
the path cache on the wire: the first call on a path after a ``SIMPLIFY_PATH`` and
in the full-path form, every later one by the id after ``CONFIRM_PATH``, both ways, the
same sequence of commands and targets as Godot's server gives, and the same bytes.

Each run happens once per module (a module-scoped fixture) and is checked by the tests
that need it.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import wsfleet
from wsfleet import Error, WebSocketServer
from wsfleet.multiplayer import DROP_REASONS, MultiplayerAPI
from wsfleet.variant import Vector2

from .godot_runner import (
    GODOT_DIR,
    GodotProcess,
    GodotProcesses,
    free_port,
    options,
    wait_until,
)
from .wsproxy import TO_CLIENT, TO_SERVER, MpFrame, RecordingProxy, mp_frames

CLIENT_SCRIPT = GODOT_DIR / "rpc_client.gd"
SERVER_SCRIPT = GODOT_DIR / "rpc_server.gd"
CLIENTS = 4  # to start with; more join while all sit on one shard
MAX_CLIENTS = 8
GODOT_DEADLINE = 20  # seconds; the scripts give up after this
WAIT = 25  # seconds for one run
TEST_TIMEOUT = 180  # seconds for each test, both module runs it may trigger included
LOBBY = "/root/Lobby"
# The engine's error line for each call rpc_client.gd makes that Godot refuses.
REFUSED_BY_GODOT = {
    "rset secret": "RSET 'secret' is not allowed on node /root/Lobby from: ",
    "echo, 1 argument": "RPC - 'Node::echo': Method expected 7 arguments, but called with 1.",
    "not_remote": "RPC 'not_remote' is not allowed on node /root/Lobby from: ",
    "no_such_method": "RPC 'no_such_method' is not allowed on node /root/Lobby from: ",
}
# The same calls refused by wsfleet: the reason each is counted under.
REFUSED_BY_WSFLEET = {
    "rset secret": "rpc_mode",
    "echo, 1 argument": "rpc_arguments",
    "not_remote": "rpc_member",
    "no_such_method": "rpc_member",
}

# What rpc_client.gd sends in echo rounds 1 and 2, as wsfleet.variant decodes it.
ECHO_ARGS = {
    1: [
        7,
        0.1,
        "héllo ✓",
        Vector2(1.5, -2.25),
        [1, "two", [3.5, True]],
        {"k": "v", "n": [1, 2], 3: Vector2(0.0, 1.0)},
    ],
    2: [-123456789012, 2.5, "", Vector2(-0.5, 8.0), [], {}],
}


def launch_client(godot: GodotProcesses, port: int) -> GodotProcess:
    return godot.start(
        CLIENT_SCRIPT, *options(url=f"ws://127.0.0.1:{port}/", timeout=GODOT_DEADLINE)
    )


@dataclass
class Run:
    """What one run left: the Godot clients (stopped, output kept) and the proxy's record."""

    clients: list[GodotProcess]
    proxied: GodotProcess
    frames: list[MpFrame]
    proxy_errors: list[str]
    masks: set[tuple[str, bool]]  # (direction, masked) of every message the proxy saw
    server: dict[str, Any] = field(default_factory=dict)  # the server side's observations

    def ids(self) -> list[int]:
        return [c.events("connected_to_server")[0]["id"] for c in self.clients]

    def outputs(self) -> str:
        return "\n---\n".join(c.output() for c in self.clients)


# -- the reference: Godot's own server --------------------------------------------------------


def reference_run(tmp_path: Path) -> Run:
    port = free_port()
    with GodotProcesses(tmp_path) as godot:
        server = godot.start(
            SERVER_SCRIPT, *options(port=port, clients=CLIENTS, timeout=GODOT_DEADLINE)
        )
        wait_until(lambda: server.events("listening"), [server], "rpc_server.gd listens", wait=WAIT)
        with RecordingProxy(port) as proxy:
            clients = [launch_client(godot, proxy.port)]
            clients += [launch_client(godot, port) for _ in range(CLIENTS - 1)]
            everyone = [server, *clients]
            wait_until(
                lambda: all(p.exited() for p in everyone), everyone, "the run ends", wait=WAIT
            )
            for p in everyone:
                p.finish_reading()
            frames = mp_frames(proxy.recorded())
            masks = {(msg.direction, msg.masked) for msg in proxy.recorded()}
            errors = list(proxy.errors)
    (end,) = server.events("exit")
    return Run(
        clients,
        clients[0],
        frames,
        errors,
        masks,
        {
            "process": server,
            "exit": end,
            "refused": {k: server.count_lines(v) for k, v in REFUSED_BY_GODOT.items()},
        },
    )


# -- wsfleet: the same server in Python -----------------------------------------------------


class PyLobby:
    """rpc_server.gd's Lobby, in Python: what the clients call on the server."""

    secret = wsfleet.puppet(-1)  # the server is the master: clients may not set it

    def __init__(self, mp: MultiplayerAPI) -> None:
        self.mp = mp
        self.echoes: list[tuple[int, int, list[Any]]] = []  # (sender, round, values)
        self.scores: dict[int, Any] = {}  # sender -> the score it set
        self.ready: list[int] = []
        self.not_remote_calls = 0
        self._score = -1

    def not_remote(self) -> None:  # not marked: clients may not call it
        self.not_remote_calls += 1

    def _get_score(self) -> Any:
        return self._score

    def _set_score(self, value: Any) -> None:
        self.scores[self.mp.get_rpc_sender_id()] = value
        self._score = value

    score = wsfleet.remote(property(_get_score, _set_score))

    @wsfleet.remote
    def echo(self, round_no, i, f, s, v, a, d) -> None:  # noqa: ANN001 (any Variant)
        sender = self.mp.get_rpc_sender_id()
        self.echoes.append((sender, round_no, [i, f, s, v, a, d]))
        self.mp.rpc_id(sender, LOBBY, "server_reply", round_no, i, f, s, v, a, d, sender)

    @wsfleet.remote
    def query(self) -> None:
        sender = self.mp.get_rpc_sender_id()
        self.mp.rpc_id(sender, LOBBY, "state", self.scores.get(sender, -1), self.secret)

    @wsfleet.remote
    def client_ready(self) -> None:
        self.ready.append(self.mp.get_rpc_sender_id())

    def broadcast(self) -> None:
        self.mp.rset(LOBBY, "hp", 77)
        for peer_id in self.ready:
            self.mp.rset_id(peer_id, LOBBY, "tag", peer_id)
        self.mp.rpc(LOBBY + "/Board", "board", len(self.ready))  # a path only clients have
        self.mp.rpc(LOBBY, "broadcast", len(self.ready), "to everyone")


class PyChat:
    """rpc_server.gd's Lobby/Chat: every client rpc()s ``say`` to everyone, the server too."""

    def __init__(self, mp: MultiplayerAPI) -> None:
        self.mp = mp
        self.calls: list[list[int]] = []  # [sender, n]

    @wsfleet.remote
    def say(self, n: int) -> None:
        self.calls.append([self.mp.get_rpc_sender_id(), n])


def wsfleet_run(tmp_path: Path) -> Run:
    server = WebSocketServer(shards=2)
    mp = server.multiplayer
    lobby = PyLobby(mp)
    mp.register_node(LOBBY, lobby)
    chat = PyChat(mp)
    mp.register_node(LOBBY + "/Chat", chat)
    connected: list[int] = []
    disconnected: list[int] = []
    mp.connect("network_peer_connected", connected.append)
    mp.connect("network_peer_disconnected", disconnected.append)
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    try:
        with GodotProcesses(tmp_path) as godot, RecordingProxy(server.port) as proxy:
            clients = [launch_client(godot, proxy.port)]
            clients += [launch_client(godot, server.port) for _ in range(CLIENTS - 1)]

            def poll() -> None:
                server.poll(0.01)

            while True:
                wait_until(
                    lambda: len(connected) == len(clients),
                    clients,
                    "all join",
                    wait=WAIT,
                    poll=poll,
                )
                shards = {server.get_peer_shard(peer_id) for peer_id in connected}
                if shards == {0, 1} or len(clients) == MAX_CLIENTS:
                    break
                clients.append(launch_client(godot, server.port))  # all on one shard so far
            wait_until(
                lambda: len(lobby.ready) == len(clients), clients, "all ready", wait=WAIT, poll=poll
            )
            lobby.broadcast()
            wait_until(
                lambda: all(c.exited() for c in clients) and len(disconnected) == len(clients),
                clients,
                "the run ends",
                wait=WAIT,
                poll=poll,
            )
            for client in clients:
                client.finish_reading()
            frames = mp_frames(proxy.recorded())
            masks = {(msg.direction, msg.masked) for msg in proxy.recorded()}
            errors = list(proxy.errors)
        return Run(
            clients,
            clients[0],
            frames,
            errors,
            masks,
            {
                "lobby": lobby,
                "chat": chat,
                "stats": server.get_mp_stats(),
                "shards": shards,
                "connected": connected,
                "disconnected": disconnected,
            },
        )
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return reference_run(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return wsfleet_run(tmp_path_factory.mktemp("wsfleet"))


# -- what every client must see, whichever the server -------------------------------------


def check_clients(run: Run) -> None:
    """Every client's run ended well and saw the server's answers as rpc_client.gd says."""
    everything = run.outputs()
    for client in run.clients:
        out = client.output()
        (end,) = client.events("exit")
        assert (end["status"], end["failures"], client.proc.returncode) == (0, [], 0), out
        me = end["id"]
        # No engine or script error: a bad path id or an undecodable packet would print one.
        assert client.count_lines("ERROR") == 0, out
        # rpc_id answers arrive as remote func calls from the server (sender 1), the
        # values exactly as sent, with the sender id the server's handler saw.
        replies = client.events("reply")
        assert [r["round"] for r in replies] == [1, 2], out
        assert all((r["from"], r["seen"], r["same"]) == (1, me, True) for r in replies), out
        # The allowed rset took (score = me), the refused one did not (secret untouched).
        (state,) = client.events("state")
        assert (state["from"], state["score"], state["secret"]) == (1, me, -1), out
        # rpc() to everyone arrives once; rset() and rset_id() set the puppet vars first.
        (broadcast,) = client.events("broadcast")
        assert broadcast["from"] == 1 and broadcast["n"] == len(run.clients), out
        assert (broadcast["text"], broadcast["hp"], broadcast["tag"]) == ("to everyone", 77, me)
        # The server's first rpc() on a new path reached each client once, before broadcast.
        assert broadcast["board"] == end["board"] == [[1, len(run.clients)]], out
        # Every other client's rpc() to everyone came in once, through the relay.
        others = [i for i in run.ids() if i != me]
        assert sorted(end["chat"]) == sorted([i, i] for i in others), out
    assert len(set(run.ids())) == len(run.clients), everything


def said_once_each(calls: list[list[int]], ids: list[int]) -> bool:
    """Each client's rpc("say", me) to everyone reached the server's Chat once."""
    return sorted(calls) == sorted([i, i] for i in ids)


def echo_texts(client: GodotProcess) -> dict[int, str]:
    """Round -> the values as the client sent them (var2str), from its replies (same=True)."""
    return {r["round"]: r["values"] for r in client.events("reply")}


@pytest.mark.timeout(TEST_TIMEOUT)
def test_godot_clients_against_the_reference_godot_server(reference: Run) -> None:
    """Done-when 3: the client scripts' checks pass against Godot's own server."""
    check_clients(reference)
    server = reference.server["process"]
    end = reference.server["exit"]
    assert (end["status"], server.proc.returncode) == (0, 0), server.output()
    ids = reference.ids()
    assert sorted(end["ready"]) == sorted(ids) and sorted(end["left"]) == sorted(ids)
    assert end["scores"] == {str(i): i for i in ids} and end["secret"] == -1, server.output()
    assert said_once_each(end["chat"], ids), server.output()
    echoes = {(sender, round_no): text for sender, round_no, text in end["echoes"]}
    assert len(echoes) == 2 * len(ids) == len(end["echoes"]), server.output()
    for client, me in zip(reference.clients, ids, strict=True):
        for round_no, text in echo_texts(client).items():
            assert echoes[(me, round_no)] == text, server.output()
    # The engine refuses each client's rset of the puppet var and its three bad calls, with
    # an error line each, and goes on (every client got its state answer after them).
    assert reference.server["refused"] == dict.fromkeys(REFUSED_BY_GODOT, len(ids))
    assert server.events("not_remote_called") == [], server.output()


@pytest.mark.timeout(TEST_TIMEOUT)
def test_godot_clients_rpc_and_rset_a_python_node_across_two_shards(fleet: Run) -> None:
    """Done-when 1: the same clients against wsfleet (2 shards) and a Python Lobby."""
    check_clients(fleet)
    lobby: PyLobby = fleet.server["lobby"]
    ids = fleet.ids()
    everything = fleet.outputs()
    assert fleet.server["shards"] == {0, 1}, f"{len(ids)} clients all on one shard"
    assert sorted(fleet.server["connected"]) == sorted(ids)
    assert sorted(fleet.server["disconnected"]) == sorted(ids)
    # The handler saw each sender and its values, decoded to the right Python types.
    assert Counter((s, r) for s, r, _ in lobby.echoes) == Counter(
        (i, r) for i in ids for r in (1, 2)
    )
    for sender, round_no, values in lobby.echoes:
        assert repr(values) == repr(ECHO_ARGS[round_no]), (sender, round_no, values)
    # The allowed rset ran the property's setter with the right sender; the refused one
    # left the attribute alone; it and the three bad calls were counted by reason, and
    # nothing else was.
    assert lobby.scores == {i: i for i in ids}, everything
    assert lobby.secret == -1
    assert sorted(lobby.ready) == sorted(ids)
    # Each client's rpc() to everyone: the other clients had it through the relay
    # (check_clients), the Python node through the API, once each.
    assert said_once_each(fleet.server["chat"].calls, ids), everything
    stats = fleet.server["stats"]
    refused = Counter(REFUSED_BY_WSFLEET.values())
    assert {k: stats[k] for k in DROP_REASONS} == {
        k: refused[k] * len(ids) for k in DROP_REASONS
    }, stats
    assert lobby.not_remote_calls == 0


# -- the path cache on the wire ---------------------------------------------------------------


def proxied_id(run: Run) -> int:
    (connected,) = run.proxied.events("connected_to_server")
    return connected["id"]


def server_leg(run: Run, direction: str) -> list[MpFrame]:
    """The proxied client's MultiplayerAPI frames to the server (to = 1), or from it."""
    if direction == TO_SERVER:
        return [f for f in run.frames if f.type == 0 and f.direction == TO_SERVER and f.to == 1]
    return [f for f in run.frames if f.type == 0 and f.direction == TO_CLIENT and f.sender == 1]


def row(f: MpFrame, me: int) -> tuple[Any, ...]:
    """(sender, to, command, target, path id, path, name), the client's own id as "me"."""

    def peer(n: int) -> Any:
        return "me" if n == me else n

    return (peer(f.sender), peer(f.to), f.command, f.target, f.path_id, f.path, f.name)


def exchange(run: Run) -> dict[str, list[tuple[Any, ...]]]:
    """The proxied client's MultiplayerAPI frames with the server, each way."""
    me = proxied_id(run)
    return {d: [row(f, me) for f in server_leg(run, d)] for d in (TO_SERVER, TO_CLIENT)}


# What rpc_client.gd's run puts on its socket, each way (sender, to, command, target, path
# id, path, name): the Lobby path is simplified before its first use, which carries the full
# path; every later call uses the id, once the other side confirmed it.
EXPECTED_EXCHANGE = {
    TO_SERVER: [
        ("me", 1, "SIMPLIFY_PATH", "id", 1, "Lobby", ""),
        ("me", 1, "REMOTE_CALL", "path", 0, "Lobby", "echo"),
        ("me", 1, "CONFIRM_PATH", "", 0, "Lobby", ""),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "echo"),
        ("me", 1, "REMOTE_SET", "id", 1, "", "score"),
        ("me", 1, "REMOTE_SET", "id", 1, "", "secret"),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "echo"),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "not_remote"),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "no_such_method"),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "query"),
        ("me", 1, "REMOTE_CALL", "id", 1, "", "client_ready"),
        ("me", 1, "CONFIRM_PATH", "", 0, "Lobby/Board", ""),
        # rpc() to everyone from a client: the server gets its own SIMPLIFY_PATH and call.
        ("me", 1, "SIMPLIFY_PATH", "id", 2, "Lobby/Chat", ""),
        ("me", 1, "REMOTE_CALL", "path", 0, "Lobby/Chat", "say"),
    ],
    TO_CLIENT: [
        (1, "me", "CONFIRM_PATH", "", 0, "Lobby", ""),
        (1, "me", "SIMPLIFY_PATH", "id", 1, "Lobby", ""),
        (1, "me", "REMOTE_CALL", "path", 0, "Lobby", "server_reply"),
        (1, "me", "REMOTE_CALL", "id", 1, "", "server_reply"),
        (1, "me", "REMOTE_CALL", "id", 1, "", "state"),
        (1, 0, "REMOTE_SET", "id", 1, "", "hp"),
        (1, "me", "REMOTE_SET", "id", 1, "", "tag"),
        # rpc() to everyone on a path no client confirmed yet: one SIMPLIFY_PATH and one
        # full-path call per client, each sent to that client alone.
        (1, "me", "SIMPLIFY_PATH", "id", 2, "Lobby/Board", ""),
        (1, "me", "REMOTE_CALL", "path", 0, "Lobby/Board", "board"),
        (1, 0, "REMOTE_CALL", "id", 1, "", "broadcast"),
        (1, "me", "CONFIRM_PATH", "", 0, "Lobby/Chat", ""),
    ],
}


def check_wire(run: Run) -> dict[str, list[tuple[Any, ...]]]:
    assert run.proxy_errors == []
    assert run.frames, "the proxy recorded nothing"
    # Client frames are masked, the server's never (RFC 6455); system frames come from
    # the server to everyone.
    assert run.masks == {(TO_SERVER, True), (TO_CLIENT, False)}, run.masks
    system = [(f.direction, f.sender, f.to) for f in run.frames if f.type != 0]
    assert system and set(system) == {(TO_CLIENT, 1, 0)}, system
    # With each other client, through the relay: this client's SIMPLIFY_PATH, its call in
    # the full-path form and its CONFIRM_PATH of the other's path, each sent to that client
    # alone; and the same three from it, their header (from, to) unchanged.
    me = proxied_id(run)
    others = [i for i in run.ids() if i != me]
    for other in others:
        sent = [row(f, me) for f in run.frames if f.direction == TO_SERVER and f.to == other]
        got = [row(f, me) for f in run.frames if f.direction == TO_CLIENT and f.sender == other]
        for frames, (frm, to) in ((sent, ("me", other)), (got, (other, "me"))):
            assert sorted(frames) == sorted(
                [
                    (frm, to, "SIMPLIFY_PATH", "id", 2, "Lobby/Chat", ""),
                    (frm, to, "REMOTE_CALL", "path", 0, "Lobby/Chat", "say"),
                    (frm, to, "CONFIRM_PATH", "", 0, "Lobby/Chat", ""),
                ]
            ), (other, frames)
            commands = [f[2] for f in frames]
            assert commands.index("SIMPLIFY_PATH") < commands.index("REMOTE_CALL"), frames
    everyone = {1, *others}
    assert {f.to for f in run.frames if f.direction == TO_SERVER} == everyone
    assert {f.sender for f in run.frames if f.direction == TO_CLIENT} == everyone
    return exchange(run)


@pytest.mark.timeout(TEST_TIMEOUT)
def test_path_cache_on_the_wire_matches_godots_server(reference: Run, fleet: Run) -> None:
    """Done-when 2: full path first, the id after CONFIRM_PATH, both ways, as Godot does."""
    godot = check_wire(reference)
    ours = check_wire(fleet)
    assert godot == EXPECTED_EXCHANGE, godot
    assert ours == godot


@pytest.mark.timeout(TEST_TIMEOUT)
def test_the_same_exchange_is_the_same_bytes_as_with_godots_server(
    reference: Run, fleet: Run
) -> None:
    """Byte for byte, each way: what wsfleet sends equals what Godot's server sends (its
    Variant encoding of the echoed values included), the proxied client's id and the
    number of clients (more join wsfleet's run while all sit on one shard) aside."""

    def as_int(value: int) -> bytes:  # a Variant INT
        return struct.pack("<Ii", 2, value)

    godot_id, fleet_id = reference.ids()[0], fleet.ids()[0]
    godot_n, fleet_n = as_int(len(reference.clients)), as_int(len(fleet.clients))
    for direction in (TO_SERVER, TO_CLIENT):
        godot = []
        for f in server_leg(reference, direction):
            # Godot's ids are random 31-bit numbers: its INT form is found only where it is.
            body = f.body.replace(as_int(godot_id), as_int(fleet_id))
            if f.name in ("board", "broadcast"):  # their first argument is the count
                body = body.replace(godot_n, fleet_n, 1)
            godot.append(body)
        ours = [f.body for f in server_leg(fleet, direction)]
        assert len(ours) == len(godot) == len(EXPECTED_EXCHANGE[direction])
        for i, (want, got) in enumerate(zip(godot, ours, strict=True)):
            assert got == want, (direction, i, want.hex(), got.hex())


@pytest.mark.timeout(30)
def test_the_proxy_records_masked_client_frames() -> None:
    """The proxy itself: a hand-made exchange through it is forwarded and recorded."""
    with socket.create_server(("127.0.0.1", 0)) as upstream_listener:
        upstream_listener.settimeout(10)
        with RecordingProxy(upstream_listener.getsockname()[1]) as proxy:
            client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            request = b"GET / HTTP/1.1\r\n\r\n"
            client.sendall(request)
            upstream, _ = upstream_listener.accept()
            upstream.settimeout(10)
            upstream.sendall(b"HTTP/1.1 101 Switching\r\n\r\n")
            key = b"\x01\x02\x03\x04"
            payload = bytes([0]) + struct.pack("<ii", 5, 1) + b"\x03Lobby\0"
            masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            client.sendall(bytes([0x82, 0x80 | len(payload)]) + key + masked)
            upstream.sendall(bytes([0x82, len(payload)]) + payload)
            got = b""
            while len(got) < len(request) + 2 + 4 + len(payload):
                got += upstream.recv(4096)
            deadline = time.monotonic() + 10
            while len(proxy.recorded()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            client.close()
            upstream.close()
        messages = proxy.recorded()
    assert got.endswith(key + masked)  # forwarded unchanged
    assert sorted((m.direction, m.masked, m.payload) for m in messages) == [
        (TO_SERVER, True, payload),
        (TO_CLIENT, False, payload),
    ]
    frames = mp_frames(messages)
    assert {(f.command, f.path, f.sender, f.to) for f in frames} == {
        ("CONFIRM_PATH", "Lobby", 5, 1)
    }
