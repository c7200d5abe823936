"""The real Godot 3.2.3 ``WebSocketClient`` (plain mode) against wsfleet with 2 shards.

The server runs in this process and is polled here; ``godot3-server`` runs
``tests/godot/client.gd`` as a subprocess, which prints one ``RESULT {json}``
line per observation and exits with a status (0: every check passed). The
server's side of each conversation is scripted below in signal handlers, one
state per peer, and everything is asserted once the Godot processes have exited.

CI installs Debian's ``godot3-server`` (3.2.3); without it these tests fail, on
purpose. ``WSFLEET_GODOT`` may name another Godot 3.2 headless binary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wsfleet import Error, WebSocketServer
from wsfleet.ipc import messages as m
from wsfleet.variant import Color, Vector2, Vector3

from .wsserver import Recorder, start

SCRIPT = Path(__file__).resolve().parent / "godot" / "client.gd"
SERVER_PROTOCOLS = ("chat", "godot-test")  # the client's preference must win, not this order
GODOT_DEADLINE = 20  # seconds; client.gd gives up (status 2) after this
WAIT = 30  # seconds for a whole conversation
AFTER_EXIT = 5  # seconds for the server to see the end of exited clients

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


class GodotClient:
    """One ``godot3-server`` process running client.gd; its output is read by a thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def finish_reading(self) -> None:
        self._reader.join(timeout=10)

    def output(self) -> str:
        return "\n".join(self.lines)

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(line[7:]) for line in self.lines if line.startswith("RESULT ")]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.results() if r.get("event") == name]

    def checks(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.results() if r.get("check") == name]

    def assert_clean_exit(self) -> None:
        """Exit status 0 *and* the script's own exit line (a GDScript parse error exits 0)."""
        failed = [r for r in self.results() if r.get("ok") is False]
        assert failed == [], f"client.gd checks failed: {failed}\n{self.output()}"
        exits = self.events("exit")
        assert exits == [{"event": "exit", "status": 0, "failures": 0, "phase": "closed"}], (
            self.output()
        )
        assert self.proc.returncode == 0, self.output()


@pytest.fixture(scope="module")
def godot_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = shutil.which(os.environ.get("WSFLEET_GODOT") or "godot3-server")
    if not path:
        pytest.fail(
            "godot3-server (Godot 3.2.3 headless, Debian package 'godot3-server') is not "
            "installed: these tests need the real engine. Install it, or set WSFLEET_GODOT "
            "to a Godot 3.2 headless binary."
        )
    version = subprocess.run(
        [path, "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path_factory.mktemp("godot-version"),
    ).stdout.strip()
    if not version.startswith("3.2."):
        pytest.fail(f"{path} is Godot {version!r}; these tests need Godot 3.2.x")
    return path


@pytest.fixture
def godot(godot_binary: str, tmp_path: Path) -> Iterator[Callable[..., GodotClient]]:
    """Start client.gd against a port; every process is killed (by pid) at teardown."""
    started: list[GodotClient] = []
    # Godot writes user:// and logs/ under res:// (the working directory when there is no
    # project) and ~/.local/share/godot: keep all of that in tmp_path.
    home = tmp_path / "home"
    home.mkdir()
    env = dict(
        os.environ,
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_CACHE_HOME=str(home / "cache"),
        LANG="en_US.UTF-8",  # Godot reads LANG only, and complains about "C"
    )

    def launch(port: int, scenario: str, protocols: str) -> GodotClient:
        workdir = tmp_path / f"godot{len(started)}"
        workdir.mkdir()
        proc = subprocess.Popen(
            [
                godot_binary,
                "--no-window",
                "-s",
                str(SCRIPT),
                "--",
                f"--wsfleet-url=ws://127.0.0.1:{port}/wsfleet/test?x=1",
                f"--wsfleet-protocols={protocols}",
                f"--wsfleet-scenario={scenario}",
                f"--wsfleet-timeout={GODOT_DEADLINE}",
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        client = GodotClient(proc)
        started.append(client)
        return client

    yield launch
    for client in started:
        if client.proc.poll() is None:
            client.proc.kill()
        client.proc.wait(timeout=10)
        client.finish_reading()
        if client.proc.stdout is not None:
            client.proc.stdout.close()


# -- the server side -----------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[WebSocketServer]:
    server = start(shards=2, protocols=SERVER_PROTOCOLS)
    yield server
    server.stop()


def wait_for(
    server: WebSocketServer, condition: Callable[[], Any], clients: list[GodotClient], what: str
) -> None:
    """Poll the server until ``condition()``; on a deadline show what Godot printed.

    The deadline is `WAIT`, or `AFTER_EXIT` once every Godot process has exited (what
    the server still has to see of them arrives within milliseconds).
    """
    deadline = time.monotonic() + WAIT
    exited_at = None
    while not condition():
        now = time.monotonic()
        if exited_at is None and all(client.exited() for client in clients):
            exited_at = now
        if now > deadline or (exited_at is not None and now > exited_at + AFTER_EXIT):
            for client in clients:
                client.finish_reading()
            outputs = "\n---\n".join(
                f"exit status {client.proc.poll()}:\n{client.output()}" for client in clients
            )
            why = "every Godot process exited" if exited_at is not None else "timed out"
            raise AssertionError(f"{why} before {what}; Godot printed:\n{outputs}")
        server.poll(0.01)


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
        client.assert_clean_exit()

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
    client.assert_clean_exit()
