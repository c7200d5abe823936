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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsfleet import Error, WebSocketServer

from .godot_mp import (
    CLIENTS,
    ENGINE_CACHE_ERROR,
    MAX_CLIENTS,
    RAW,
    SERVER_SCRIPT,
    TEST_TIMEOUT,
    WAIT,
    FleetScript,
    check_clients,
    expected_part,
    last_calls,
    launch_client,
    server_expects,
)
from .godot_runner import GodotProcesses, free_port, options, wait_until


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
    with GodotProcesses(tmp_path) as processes:
        yield processes


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
