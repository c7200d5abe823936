"""The real Godot 3.2.3 ``WebSocketClient`` (plain mode) against wsfleet with 2 shards.

The server runs in this process and is polled here; ``godot3-server`` runs
``tests/godot/client.gd`` as a subprocess (see `godot_runner`), which prints one
``RESULT {json}`` line per observation and exits with a status (0: every check
passed). The server's side of each conversation is scripted below in signal
handlers, one state per peer, and everything is asserted once the Godot processes
have exited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wsfleet import Error, WebSocketServer
from wsfleet.ipc import messages as m
from wsfleet.variant import Color, Vector2, Vector3

from .godot_runner import GODOT_DIR, GodotProcess, GodotProcesses, options, wait_until
from .wsserver import Recorder, start

SCRIPT = GODOT_DIR / "client.gd"
SERVER_PROTOCOLS = ("chat", "godot-test")  # the client's preference must win, not this order
GODOT_DEADLINE = 20  # seconds; client.gd gives up (status 2) after this
WAIT = 30  # seconds for a whole conversation

# The same values, in the same order, as `vars()` in client.gd.
TEXT = "héllo wörld ✓ 日本 🎮"
BINARY = bytes((i * 7) % 256 for i in range(300))
VARS: list[tuple[str, Any]] = [
    ("int32", 42),
    ("int64", 2**40),
    ("negative", -7),
    ("float32", 1.5),
    ("float64", 0.1),
    ("string", TEXT),
    ("vector2", Vector2(1.5, -2.0)),
    ("vector3", Vector3(1.0, 2.0, 3.0)),
    ("color", Color(1.0, 0.5, 0.0, 1.0)),
    ("array", [1, "two", 3.0, [4, [5.5, "six"]], Vector2(0.25, 8.0), None, True]),
    (
        "dictionary",
        {"name": "wsfleet", "n": 7, "list": [1, 2], "nested": {"ok": True}, 3: "int key"},
    ),
    ("bytes", bytes([0, 1, 2, 127, 128, 255, 10])),
]

pytestmark = pytest.mark.timeout(90)


def same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (1 == 1.0 == True in Python)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)  # order too
    return a == b


# -- the Godot side ------------------------------------------------------------------------


def assert_clean_exit(client: GodotProcess) -> None:
    """Exit status 0 *and* the script's own exit line (a GDScript parse error exits 0)."""
    failed = [r for r in client.results() if r.get("ok") is False]
    assert failed == [], f"client.gd checks failed: {failed}\n{client.output()}"
    exits = client.events("exit")
    assert exits == [{"event": "exit", "status": 0, "failures": 0, "phase": "closed"}], (
        client.output()
    )
    assert client.proc.returncode == 0, client.output()


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[Callable[..., GodotProcess]]:
    """Start client.gd against a port; every process is killed (by pid) at teardown."""
    with GodotProcesses(tmp_path) as processes:

        def launch(port: int, scenario: str, protocols: str) -> GodotProcess:
            return processes.start(
                SCRIPT,
                "--",
                *options(
                    url=f"ws://127.0.0.1:{port}/wsfleet/test?x=1",
                    protocols=protocols,
                    scenario=scenario,
                    timeout=GODOT_DEADLINE,
                ),
            )

        yield launch


# -- the server side -----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[WebSocketServer]:
    server = start(shards=2, protocols=SERVER_PROTOCOLS)
    yield server
    server.stop()


def wait_for(
    server: WebSocketServer, condition: Callable[[], Any], clients: list[GodotProcess], what: str
) -> None:
    """Poll the server until ``condition()`` (`wait_until`, `WAIT` seconds)."""
    wait_until(condition, clients, what, wait=WAIT, poll=lambda: server.poll(0.01))


class MainConversation:
    """The server's part of client.gd's "main" scenario, for every peer on its own.

    Echo the first two packets in the mode they came in, decode the next
    ``len(VARS)`` with ``get_var`` and answer with ``put_var`` of every value,
    then kick the peer (4001, "kick") when it says "vars-checked".
    """

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.echoed: dict[int, list[tuple[bytes, bool]]] = {}
        self.vars_in: dict[int, list[tuple[Any, Error, bool]]] = {}
        self.put_var_results: dict[int, list[Error]] = {}
        self.after_vars: dict[int, list[tuple[bytes, bool]]] = {}
        self.errors: list[str] = []
        server.connect("data_received", self._on_data)

    def _on_data(self, peer_id: int) -> None:
        try:
            self._step(peer_id)
        except Exception as exc:  # the server would only log it
            self.errors.append(f"peer {peer_id}: {exc!r}")

    def _step(self, peer_id: int) -> None:
        peer = self.server.get_peer(peer_id)
        echoed = self.echoed.setdefault(peer_id, [])
        vars_in = self.vars_in.setdefault(peer_id, [])
        if len(echoed) < 2:
            packet = peer.get_packet()
            text = peer.was_string_packet()
            echoed.append((packet, text))
            peer.set_write_mode(peer.WRITE_MODE_TEXT if text else peer.WRITE_MODE_BINARY)
            if peer.put_packet(packet) != Error.OK:
                self.errors.append(f"peer {peer_id}: echo put_packet failed")
        elif len(vars_in) < len(VARS):
            value = peer.get_var()
            vars_in.append((value, peer.get_packet_error(), peer.was_string_packet()))
            if len(vars_in) == len(VARS):
                peer.set_write_mode(peer.WRITE_MODE_BINARY)
                self.put_var_results[peer_id] = [peer.put_var(value) for _, value in VARS]
        else:
            packet = peer.get_packet()
            self.after_vars.setdefault(peer_id, []).append((packet, peer.was_string_packet()))
            if packet == b"vars-checked":
                self.server.disconnect_peer(peer_id, 4001, "kick")


def test_protocol_echo_put_var_get_var_and_kick_with_godot_clients(server, godot) -> None:
    recorder = Recorder(server, read_data=False)
    talk = MainConversation(server)
    # Two clients at once: each lands on one of the 2 shards (either is fine), and their
    # conversations must not mix.
    clients = [godot(server.port, "main", "godot-test,chat") for _ in range(2)]
    wait_for(
        server,
        lambda: all(c.exited() for c in clients) and len(recorder.named("disconnected")) == 2,
        clients,
        "both Godot clients to finish and leave",
    )
    for client in clients:
        client.finish_reading()
    assert talk.errors == []
    peer_ids = recorder.connected_ids()
    assert len(peer_ids) == 2 and len(set(peer_ids)) == 2
    shards = {m.owner_of(peer_id, m.id_span(server.shards)) for peer_id in peer_ids}
    assert shards <= {0, 1}

    # 1. The subprotocol: the first one the client offers that the server speaks.
    for client in clients:
        connected = client.events("connected")
        assert len(connected) == 1, client.output()
        assert connected[0]["protocol"] == "godot-test"
        assert connected[0]["host"] == "127.0.0.1"
        assert connected[0]["port"] == server.port
    for peer_id in peer_ids:
        assert ("connected", peer_id, "godot-test") in recorder.events

    for client in clients:
        # 2. Text and binary echo, each back in its own frame type.
        assert [(c["was_string"], c["size"], c["ok"]) for c in client.checks("echo_text")] == [
            (True, len(TEXT.encode()), True)
        ], client.output()
        assert [(c["was_string"], c["size"], c["ok"]) for c in client.checks("echo_binary")] == [
            (False, len(BINARY), True)
        ], client.output()
        # 3b. wsfleet put_var -> Godot get_var, checked by the script against its own values.
        got = client.checks("get_var")
        assert [c["name"] for c in got] == [name for name, _ in VARS], client.output()
        bad = [c for c in got if not (c["ok"] and c["error"] == 0 and not c["was_string"])]
        assert bad == [], client.output()
        # 4. The kick, as Godot's client reports it.
        close_requests = client.events("server_close_request")
        assert [(r["code"], r["reason"]) for r in close_requests] == [(4001, "kick")]
        closed = client.events("connection_closed")
        assert [c["was_clean"] for c in closed] == [True], client.output()
        results = client.results()
        assert results.index(close_requests[0]) < results.index(closed[0])
        assert_clean_exit(client)

    for peer_id in peer_ids:
        # 2. What the server echoed.
        assert talk.echoed[peer_id] == [(TEXT.encode(), True), (BINARY, False)]
        # 3a. Godot put_var -> wsfleet get_var.
        vars_in = talk.vars_in[peer_id]
        assert len(vars_in) == len(VARS)
        for (name, expected), (value, error, was_string) in zip(VARS, vars_in, strict=True):
            assert error == Error.OK, name
            assert not was_string, name
            assert same(value, expected), f"{name}: got {value!r}, expected {expected!r}"
        assert talk.put_var_results[peer_id] == [Error.OK] * len(VARS)
        assert talk.after_vars[peer_id] == [(b"vars-checked", True)]
        # 4. The side that starts the close sees no close request and an unclean end.
        events = [e for e in recorder.events if e[1] == peer_id]
        assert events == [("connected", peer_id, "godot-test"), ("disconnected", peer_id, False)]


def test_the_godot_clients_close_code_and_reason_reach_the_server(server, godot) -> None:
    recorder = Recorder(server, read_data=False)
    protocols: dict[int, str] = {}

    def order_close(peer_id: int, _protocol: str) -> None:
        peer = server.get_peer(peer_id)
        protocols[peer_id] = peer.protocol
        peer.set_write_mode(peer.WRITE_MODE_TEXT)
        peer.put_packet("please-close")

    server.connect("client_connected", order_close)
    client = godot(server.port, "close", "nope,chat")
    wait_for(
        server,
        lambda: client.exited() and recorder.named("disconnected"),
        [client],
        "the Godot client to close and leave",
    )
    client.finish_reading()
    (peer_id,) = recorder.connected_ids()
    # 5. client_close_request with Godot's code and reason (its trailing NUL stripped),
    # then a clean disconnect.
    assert recorder.events == [
        ("connected", peer_id, "chat"),
        ("close_request", peer_id, 4000, "bye"),
        ("disconnected", peer_id, True),
    ]
    assert protocols == {peer_id: "chat"}
    assert client.events("connected")[0]["protocol"] == "chat"
    assert [c["ok"] for c in client.checks("close_order")] == [True], client.output()
    assert client.events("server_close_request") == []
    # Godot 3.2.3 reports was_clean_close=false to the side that started the close.
    assert [c["was_clean"] for c in client.events("connection_closed")] == [False]
    assert_clean_exit(client)
