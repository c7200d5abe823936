"""Real Godot 3.2.3 clients in multiplayer mode (``gd_mp_api=true``) against wsfleet's relay.

Four or more ``godot3-server`` processes run ``tests/godot/mp_client.gd``: a
``WebSocketClient`` set as ``get_tree().network_peer``, with a node at
``/root/Harness`` (and ``/root/Harness/Inner``) whose ``remote`` functions count
every call they get. Each client waits for the server's RAW "go" (the roster and
the client that will leave), then calls ``rpc()`` / ``rpc_id()`` on the other
clients and on the server, sends RAW packets with ``multiplayer.send_bytes``,
waits until it got everything it expects, and closes (one client, the leaver,
first; the others once they saw it go). Each prints one ``RESULT {json}`` line
per observation, and the counts are checked here.

The server is either wsfleet (2 shards, in this process, listening with
``gd_mp_api=True`` and scripted here: it confirms paths, answers RAW, sends
"go" once the clients sit on both shards), or, as the reference, Godot's own
``WebSocketServer`` running ``tests/godot/mp_server.gd``, which plays the same part.
The Godot processes are started and read as `godot_runner` says.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsfleet import Error, WebSocketServer
from wsfleet.variant import decode_variant_at

from .godot_runner import (
    GODOT_DIR,
    GodotProcess,
    GodotProcesses,
    free_port,
    options,
    wait_until,
)

CLIENT_SCRIPT = GODOT_DIR / "mp_client.gd"
SERVER_SCRIPT = GODOT_DIR / "mp_server.gd"
CLIENTS = 4  # to start with; more join when the first ones all sit on one shard
MAX_CLIENTS = 10
GODOT_DEADLINE = 25  # seconds; mp_client.gd gives up (status 2) after this
WAIT = 40  # seconds for a whole run

# MultiplayerAPI commands (the first payload byte after the 9-byte header).
REMOTE_CALL, REMOTE_SET, SIMPLIFY_PATH, CONFIRM_PATH, RAW = range(5)
# What mp_client.gd's node paths are called on the wire (relative to /root).
NODES = {"Harness": "Harness", "Harness/Inner": "Inner"}
ENGINE_CACHE_ERROR = "Requests invalid peer cache"

TEST_TIMEOUT = 120  # seconds for each test, Godot's start and teardown included

Receipt = tuple[int, str, str]  # (sender, call, node), node "raw" for RAW packets


# -- the Godot processes ---------------------------------------------------------------------


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
    with GodotProcesses(tmp_path) as processes:
        yield processes


def launch_client(godot: GodotProcesses, port: int) -> GodotProcess:
    return godot.start(
        CLIENT_SCRIPT, *options(url=f"ws://127.0.0.1:{port}/", timeout=GODOT_DEADLINE)
    )


# -- what every party must see (mp_client.gd's run, in Python) ------------------------------


# The last calls before a close, which may be lost on the way (see mp_client.gd): counted
# and reported, never expected.
LAST_CALLS = ("finished_all", "bye")


def client_expects(roster: list[int], me: int) -> Counter[Receipt]:
    """Every call and RAW packet client ``me`` must get exactly once (not `LAST_CALLS`)."""
    i = roster.index(me)
    nxt, prev = roster[(i + 1) % len(roster)], roster[i - 1]
    want: Counter[Receipt] = Counter({(1, "go", "raw"): 1, (1, "server-raw", "raw"): 1})
    for sender in roster:
        if sender == me:
            continue
        for call in ("hello", "hello_ack", "tick", "finished"):
            want[(sender, call, "Harness")] += 1
        want[(sender, "rawall", "raw")] += 1
        if sender != nxt:  # the next one sends all_but to everyone except me
            want[(sender, "all_but", "Harness")] += 1
    # direct: first on the Inner path (full path), then on Harness (path id)
    want[(prev, "direct", "Inner")] += 1
    want[(prev, "direct", "Harness")] += 1
    return want


def server_expects(roster: list[int]) -> Counter[Receipt]:
    """Every call and RAW packet the server (peer 1) must get exactly once (not `LAST_CALLS`)."""
    want: Counter[Receipt] = Counter()
    for sender in roster:
        for call in ("hello", "tick", "all_but", "finished"):
            want[(sender, call, "Harness")] += 1
        want[(sender, "client-raw", "raw")] += 1
        want[(sender, "rawall", "raw")] += 1
    return want


def expected_part(receipts: Counter[Receipt]) -> Counter[Receipt]:
    return Counter({k: v for k, v in receipts.items() if k[1] not in LAST_CALLS})


def last_calls(receipts: Counter[Receipt]) -> dict[str, int]:
    """How many "finished_all" / "bye" came in (each sender sends each at most once)."""
    counts = {call: 0 for call in LAST_CALLS}
    for (_, call, _), n in receipts.items():
        if call in LAST_CALLS:
            assert n == 1, f"{call} more than once: {receipts}"
            counts[call] += 1
    return counts


def check_clients(
    clients: list[GodotProcess], roster: list[int], leaver: int, server_view: str = ""
) -> dict[str, Any]:
    """Assert what every Godot client saw; return the observations worth reporting."""
    everything = "\n---\n".join([server_view] + [c.output() for c in clients])
    exits = [c.events("exit") for c in clients]
    assert all(
        [(e["status"], e["phase"], e["missing"]) for e in ends] == [(0, "closing", [])]
        for ends in exits
    ), everything
    assert [c.proc.returncode for c in clients] == [0] * len(clients), everything
    assert len(roster) == len(clients) and leaver in roster
    ids = []
    observed: dict[str, Any] = {
        "last_calls": {},
        "engine_cache_errors": {},
        "end_signals": {},
        "ms": {},
    }
    for client in clients:
        out = client.output()
        results = client.results()
        (connected,) = client.events("connected_to_server")
        me = connected["id"]
        ids.append(me)
        others = [peer for peer in roster if peer != me]

        # 1. network_peer_connected for 1 (before connected_to_server) and every other client.
        joined = [e["peer"] for e in client.events("peer_connected")]
        assert sorted(joined) == sorted([1, *others]), out
        first = results.index(client.events("peer_connected")[0])
        assert results[first]["peer"] == 1 and results.index(connected) > first, out

        # 2. Every call and RAW packet exactly once, from the right sender, to the right node.
        receipts: Counter[Receipt] = Counter()
        for r in results:
            if r.get("event") == "rpc":
                receipts[(r["from"], r["call"], r["node"])] += 1
                assert r["args"][0] == r["from"], f"relay changed the sender: {r}\n{out}"
                if r["call"] == "direct":
                    assert r["args"][1] == (1 if r["node"] == "Inner" else 2), out
            elif r.get("event") == "raw":
                text = r["text"]
                call = text.split(":", 1)[0]
                receipts[(r["from"], call, "raw")] += 1
                if call in ("server-raw", "rawall"):
                    assert text == f"{call}:{me if call == 'server-raw' else r['from']}", out
        assert expected_part(receipts) == client_expects(roster, me), out
        observed["last_calls"][me] = last_calls(receipts)
        observed["engine_cache_errors"][me] = client.count_lines(ENGINE_CACHE_ERROR)

        # 3. Everyone but the leaver saw it leave (before closing itself).
        if me != leaver:
            left = [e for e in client.events("peer_disconnected") if e["peer"] == leaver]
            assert [e["phase"] for e in left] == ["await_leaver"], out
        (closing,) = client.events("close")
        assert closing["reason"] == ("leaving" if me == leaver else "done"), out
        observed["end_signals"][me] = [
            r["event"] for r in results[results.index(closing) + 1 :] if r["event"] != "rpc"
        ]
        observed["ms"][me] = {
            "connected": connected["ms"],
            "all_received": client.events("all_received")[0]["ms"],
            "exit": client.events("exit")[0]["ms"],
        }
    assert sorted(ids) == roster
    return observed


# -- the reference: Godot's own server -------------------------------------------------------


@pytest.mark.timeout(TEST_TIMEOUT)
def test_reference_godot_server_relays_rpcs_raw_and_leaves(godot) -> None:
    """The same run against Godot 3.2.3's WebSocketServer (tests/godot/mp_server.gd)."""
    port = free_port()
    server = godot.start(SERVER_SCRIPT, *options(port=port, clients=CLIENTS, timeout=WAIT))
    wait_until(lambda: server.events("listening"), [server], "mp_server.gd listens", wait=WAIT)
    clients = [launch_client(godot, port) for _ in range(CLIENTS)]
    everyone = [server, *clients]
    wait_until(lambda: all(p.exited() for p in everyone), everyone, "the run ends", wait=WAIT)
    for p in everyone:
        p.finish_reading()
    (listening,) = server.events("listening")
    assert (listening["unique_id"], listening["status"]) == (1, 2), server.output()
    (go,) = server.events("go")
    roster, leaver = go["roster"], go["leaver"]
    observed = check_clients(clients, roster, leaver, server.output())

    (end,) = server.events("exit")
    assert end["status"] == 0 and server.proc.returncode == 0, server.output()
    received = Counter(
        {tuple(k.split(" ", 2)): v for k, v in end["received"].items()}  # "sender call node"
    )
    received = Counter({(int(s), c, n): v for (s, c, n), v in received.items()})
    assert expected_part(received) == server_expects(roster), server.output()
    assert sorted(end["left"]) == roster and end["left"][0] == leaver
    closes = [(e["peer"], e["code"], e["reason"]) for e in server.events("close_request")]
    assert sorted(closes) == sorted(
        (peer_id, 1000, "leaving" if peer_id == leaver else "done") for peer_id in roster
    ), server.output()
    observed["server_last_calls"] = last_calls(received)
    observed["server_cache_errors"] = server.count_lines(ENGINE_CACHE_ERROR)
    print("reference observations:", json.dumps(observed, sort_keys=True))


# -- wsfleet ---------------------------------------------------------------------------------


class FleetScript:
    """wsfleet's part of mp_client.gd's run: what mp_server.gd and Godot's engine do.

    Confirm every SIMPLIFY_PATH (as the MultiplayerAPI does), count every REMOTE_CALL
    and RAW packet, answer RAW "client-raw:<id>" with RAW "server-raw:<id>", and send
    the RAW "go" to everyone once told to.
    """

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.connected: list[int] = []
        self.disconnected: list[int] = []
        self.close_requests: list[tuple[int, int, str]] = []
        self.signalled: Counter[int] = Counter()  # peer_packet(id)
        self.packets: list[tuple[int, bytes]] = []  # (get_packet_peer(), get_packet())
        self.paths: dict[tuple[int, int], str] = {}  # (sender, path id) -> path
        self.receipts: Counter[Receipt] = Counter()
        self.forms: dict[tuple[int, str], list[str]] = {}  # (sender, call) -> "path"/"id"
        self.errors: list[str] = []
        self.log: list[str] = []  # what happened, for failure messages
        self.start = time.monotonic()
        server.connect("peer_connected", self._on_connected)
        server.connect("peer_disconnected", self._on_disconnected)
        server.connect("client_close_request", self._on_close_request)
        server.connect("peer_packet", self._on_packet)
        for plain in ("client_connected", "client_disconnected", "data_received"):
            server.connect(plain, lambda *a, _s=plain: self.errors.append(f"{_s}{a}"))

    def note(self, what: str) -> None:
        self.log.append(f"{(time.monotonic() - self.start) * 1000:8.1f} ms {what}")

    def view(self) -> str:
        return "[wsfleet]\n" + "\n".join(self.log)

    def _on_connected(self, peer_id: int) -> None:
        self.note(f"peer_connected {peer_id} (shard {self.server.get_peer_shard(peer_id)})")
        self.connected.append(peer_id)

    def _on_disconnected(self, peer_id: int) -> None:
        self.note(f"peer_disconnected {peer_id}")
        self.disconnected.append(peer_id)

    def _on_close_request(self, peer_id: int, code: int, reason: str) -> None:
        self.note(f"client_close_request {peer_id} {code} {reason!r}")
        self.close_requests.append((peer_id, code, reason))

    def _on_packet(self, peer_id: int) -> None:
        self.signalled[peer_id] += 1
        self.drain()

    def drain(self) -> None:
        while self.server.get_available_packet_count() > 0:
            sender = self.server.get_packet_peer()
            data = self.server.get_packet()
            self.packets.append((sender, data))
            self.note(f"packet from {sender}: {data.hex()}")
            try:
                self._handle(sender, data)
            except Exception as exc:  # the server would only log it
                self.errors.append(f"{sender}: {data.hex()}: {exc!r}")

    def send(self, peer_id: int, payload: bytes) -> None:
        self.note(f"put_packet to {peer_id}: {payload.hex()}")
        self.server.set_target_peer(peer_id)
        result = self.server.put_packet(payload)
        if result != Error.OK:
            self.errors.append(f"put_packet to {peer_id}: {result!r}")

    def _handle(self, sender: int, data: bytes) -> None:
        command = data[0]
        if command == SIMPLIFY_PATH:
            (path_id,) = struct.unpack_from("<I", data, 1)
            end = data.index(b"\0", 5)
            assert end == len(data) - 1, "SIMPLIFY_PATH: bytes after the path"
            self.paths[(sender, path_id)] = data[5:end].decode()
            self.send(sender, bytes([CONFIRM_PATH]) + data[5:])
        elif command == REMOTE_CALL:
            (target,) = struct.unpack_from("<I", data, 1)
            name_end = data.index(b"\0", 5)
            method = data[5:name_end].decode()
            argc, pos = data[name_end + 1], name_end + 2
            args = []
            for _ in range(argc):
                value, pos = decode_variant_at(data, pos)
                args.append(value)
            if target & 0x80000000:
                assert target & 0x7FFFFFFF == pos, "the full path must follow the arguments"
                assert data.index(b"\0", pos) == len(data) - 1
                path, form = data[pos:-1].decode(), "path"
            else:
                assert pos == len(data), "bytes after the arguments"
                path, form = self.paths[(sender, target)], "id"
            assert args[0] == sender, f"{method}{args} relayed with from={sender}"
            self.receipts[(sender, method, NODES[path])] += 1
            self.forms.setdefault((sender, method), []).append(form)
        elif command == RAW:
            text = data[1:].decode()
            call = text.split(":", 1)[0]
            assert text == f"{call}:{sender}", text
            self.receipts[(sender, call, "raw")] += 1
            if call == "client-raw":
                self.send(sender, bytes([RAW]) + f"server-raw:{sender}".encode())
        else:
            raise AssertionError(f"unexpected command {command}")

    def go(self, roster: list[int], leaver: int) -> None:
        text = "go:" + json.dumps({"roster": roster, "leaver": leaver})
        for peer_id in roster:
            self.send(peer_id, bytes([RAW]) + text.encode())


@pytest.fixture
def server() -> Iterator[WebSocketServer]:
    server = WebSocketServer(shards=2)
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    yield server
    server.stop()


@pytest.mark.timeout(TEST_TIMEOUT)
def test_godot_clients_on_both_shards_rpc_raw_and_leave_through_wsfleet(server, godot) -> None:
    script = FleetScript(server)

    def poll() -> None:
        server.poll(0.01)
        script.drain()

    assert server.get_unique_id() == 1
    assert server.get_connection_status() == 2
    assert server.get_transfer_mode() == 2
    assert server.is_refusing_new_connections() is False
    clients = [launch_client(godot, server.port) for _ in range(CLIENTS)]
    while True:
        wait_until(
            lambda: len(script.connected) == len(clients),
            clients,
            "all join",
            wait=WAIT,
            poll=poll,
        )
        shards = {server.get_peer_shard(peer_id) for peer_id in script.connected}
        if shards == {0, 1} or len(clients) == MAX_CLIENTS:
            break
        clients.append(launch_client(godot, server.port))  # the kernel put all on one shard
    assert shards == {0, 1}, f"{len(clients)} clients, all on shard {shards}"
    roster = sorted(script.connected)
    assert sorted(server.get_peers()) == roster
    on_shard = {peer_id: server.get_peer_shard(peer_id) for peer_id in roster}
    leaver = min(roster, key=on_shard.__getitem__)  # on shard 0, as the reference's lowest id
    script.go(roster, leaver)
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
    observed = check_clients(clients, roster, leaver, script.view())

    # 4. What the server got: every call to it and RAW packet once, with the right sender.
    assert expected_part(script.receipts) == server_expects(roster), outputs
    assert Counter(sender for sender, _ in script.packets) == script.signalled
    for peer_id in roster:
        # SIMPLIFY_PATH for Harness, once per client; the first hello carries the full path,
        # and once this server's CONFIRM_PATH is back, the calls use the path id.
        assert [p for (s, _), p in script.paths.items() if s == peer_id] == ["Harness"]
        assert script.forms[(peer_id, "hello")] == ["path"]
        for call in ("tick", "all_but", "finished"):
            assert script.forms[(peer_id, call)] == ["id"], (call, script.forms)
        raw = [d for s, d in script.packets if s == peer_id and d[:1] == bytes([RAW])]
        assert raw == [b"\x04client-raw:%d" % peer_id, b"\x04rawall:%d" % peer_id]

    # 3. The leaver first, then everyone; the closes reach the server as Godot sent them.
    assert sorted(script.disconnected) == roster and script.disconnected[0] == leaver
    assert sorted(script.close_requests) == sorted(
        (peer_id, 1000, "leaving" if peer_id == leaver else "done") for peer_id in roster
    )
    observed["server_last_calls"] = last_calls(script.receipts)
    observed["shards"] = on_shard
    print("wsfleet observations:", json.dumps(observed, sort_keys=True))
