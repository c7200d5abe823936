"""The harness of the Godot multiplayer runs (``tests/godot/mp_client.gd``), shared by
tests/test_godot_multiplayer.py (one server) and tests/test_cluster_godot.py (a cluster).

What each Godot client and each server must see (`client_expects`, `server_expects`,
`check_clients`), and `FleetScript`: wsfleet's part of the run, what mp_server.gd and
Godot's engine do on the server's side.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from typing import Any

from wsfleet import Error, WebSocketServer
from wsfleet.variant import decode_variant_at

from .godot_runner import GODOT_DIR, GodotProcess, GodotProcesses, options

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
