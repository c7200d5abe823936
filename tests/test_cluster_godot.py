"""Real Godot 3.2.3 multiplayer clients over two nodes of a cluster: one game (issue 14).

Four ``godot3-server`` processes run ``tests/godot/mp_client.gd`` (see
tests/godot_mp.py), two connected to each of two wsfleet nodes (servers in this
process, ``gd_mp_api=True``, ``cluster=`` a real ``nats-server -js``). Each
client must see the three others join (``network_peer_connected``, through
the relay's SYS_ADD across nodes), get every ``rpc`` / ``rpc_id`` and RAW packet
of the others exactly once, and see the leaver go, as with one server. Each
node plays the server (peer 1) for its own clients: it confirms their paths,
answers their RAW and sends them the "go" with the whole cluster's roster.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsfleet import Error, WebSocketServer

from .godot_mp import (
    TEST_TIMEOUT,
    WAIT,
    FleetScript,
    check_clients,
    expected_part,
    launch_client,
    server_expects,
)
from .godot_runner import GodotProcesses, wait_until
from .natsproc import NatsServer

PER_NODE = 2


@pytest.fixture
def godot(tmp_path: Path) -> Iterator[GodotProcesses]:
    with GodotProcesses(tmp_path) as processes:
        yield processes


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[WebSocketServer]]:
    nats = NatsServer(tmp_path / "nats").start()
    servers: list[WebSocketServer] = []
    try:
        for name in ("g1", "g2"):
            server = WebSocketServer(shards=1, control=False, cluster=nats.url, node_name=name)
            assert server.listen(0, [], gd_mp_api=True) == Error.OK
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()
        nats.kill()


@pytest.mark.timeout(TEST_TIMEOUT)
def test_godot_clients_on_two_nodes_are_one_game(nodes, godot) -> None:
    scripts = [FleetScript(server) for server in nodes]

    def poll() -> None:
        for server, script in zip(nodes, scripts, strict=True):
            server.poll(0.005)
            script.drain()

    clients = [launch_client(godot, server.port) for server in nodes for _ in range(PER_NODE)]
    wait_until(
        lambda: (
            all(len(s.connected) == PER_NODE for s in scripts)
            and all(len(server.get_peers(cluster=True)) == 2 * PER_NODE for server in nodes)
        ),
        clients,
        "all join, and each node knows the other's",
        wait=WAIT,
        poll=poll,
    )
    roster = sorted(peer for script in scripts for peer in script.connected)
    leaver = roster[0]
    text = "go:" + json.dumps({"roster": roster, "leaver": leaver})
    for script in scripts:  # each node is the server of its own clients
        for peer_id in script.connected:
            script.send(peer_id, bytes([4]) + text.encode())  # RAW
    wait_until(
        lambda: (
            all(c.exited() for c in clients)
            and all(len(s.disconnected) == PER_NODE for s in scripts)
        ),
        clients,
        "the run ends",
        wait=WAIT,
        poll=poll,
    )
    for client in clients:
        client.finish_reading()
    views = "\n".join(script.view() for script in scripts)
    outputs = "\n---\n".join([views] + [c.output() for c in clients])
    for script in scripts:
        assert script.errors == [], outputs
    observed = check_clients(clients, roster, leaver, views)
    for script in scripts:  # a node's server gets what its own clients send it, once
        own = sorted(script.connected)
        assert expected_part(script.receipts) == server_expects(own), outputs
    print("cluster observations:", json.dumps(observed, sort_keys=True))
