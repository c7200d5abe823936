"""Several shards: how connections spread, and what happens when processes die."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsfleet import Error
from wsfleet.ipc import messages as m

from .test_server_api import echo, servers, url  # noqa: F401  (fixture)
from .wsserver import Recorder, run_with, until


@pytest.mark.timeout(90)
def test_four_shards_share_two_hundred_connections(servers) -> None:  # noqa: F811
    server = servers(shards=4)
    recorder = Recorder(server, read_data=False)

    async def body() -> dict[int, int]:
        clients = []
        for _ in range(200):
            clients.append(await connect(url(server)))
        await until(lambda: len(recorder.connected_ids()) == 200)
        local_ports = {ws.local_address[1] for ws in clients}
        for peer_id in recorder.connected_ids():
            shard = server.get_peer_shard(peer_id)
            assert peer_id in m.id_range(shard, 4), (peer_id, shard)
            assert server.has_peer(peer_id)
            assert server.get_peer_address(peer_id) == "127.0.0.1"
            assert server.get_peer_port(peer_id) in local_ports
        assert {server.get_peer_port(i) for i in recorder.connected_ids()} == local_ports
        for ws in clients:
            await ws.close()
        await until(lambda: len(recorder.named("disconnected")) == 200)
        return {s["shard"]: s for s in server.get_shard_status()}

    run_with(server, body, timeout=80)
    per_shard = [0] * 4
    for peer_id in recorder.connected_ids():
        per_shard[m.owner_of(peer_id, m.id_span(4))] += 1
    assert all(count > 0 for count in per_shard), per_shard
    assert len(set(recorder.connected_ids())) == 200


def wsfleet_tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)
def test_sigkill_of_the_front_ends_every_process_and_frees_the_port() -> None:
    port = free_port()
    front = subprocess.Popen(
        [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "2", "--quiet"],
        stdin=subprocess.DEVNULL,
    )
    tree: list[psutil.Process] = []
    try:

        async def probe() -> None:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with connect(f"ws://127.0.0.1:{port}", open_timeout=2) as ws:
                        await ws.send("ping")
                        assert await ws.recv() == "ping"
                        return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)

        asyncio.run(probe())
        tree = wsfleet_tree(front.pid)
        assert len(tree) == 4  # front, supervisor, two shards
        os.kill(front.pid, signal.SIGKILL)
        front.wait(5)
        gone, alive = psutil.wait_procs(tree[1:], timeout=3)
        assert alive == [], f"still running 3 s after the front was killed: {alive}"
        with socket.socket() as sock:
            # Free again for a new server (SO_REUSEADDR, as every server sets: the probe's
            # connection may linger in TIME_WAIT, which is not a listener).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen()
    finally:
        for process in tree:
            if process.is_running():
                process.kill()
        if front.poll() is None:
            front.kill()
            front.wait()


@pytest.mark.timeout(60)
def test_sigkill_of_the_supervisor_ends_the_shards(servers) -> None:  # noqa: F811
    server = servers(shards=2)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        await until(lambda: all(s["pid"] for s in server.get_shard_status()))
        shards = [psutil.Process(s["pid"]) for s in server.get_shard_status()]
        clients = [await connect(url(server)) for _ in range(8)]
        await until(lambda: len(recorder.connected_ids()) == 8)
        os.kill(server._supervisor.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(shards, timeout=2)
        assert alive == []
        await until(lambda: len(recorder.named("disconnected")) == 8)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                await ws.recv()

    run_with(server, body)
    assert {event[2] for event in recorder.named("disconnected")} == {False}


@pytest.mark.timeout(90)
def test_sigkill_of_one_shard_under_traffic_loses_nothing_elsewhere(servers) -> None:  # noqa: F811
    server = servers(shards=4)
    echo(server)
    recorder = Recorder(server, read_data=False)
    clients_count = 80

    async def client(ws, index: int, stop: asyncio.Event, results: dict) -> None:
        """Sequence-numbered echo: every reply must be the next number, nothing skipped."""
        sent = received = 0
        try:
            while not stop.is_set():
                await ws.send(f"{index}:{sent}")
                sent += 1
                reply = await ws.recv()
                assert reply == f"{index}:{received}", (reply, received)
                received += 1
            results[index] = ("ok", received)
        except ConnectionClosed:
            results[index] = ("dropped", received)

    async def body() -> tuple[dict, int, float]:
        sockets = [await connect(url(server)) for _ in range(clients_count)]
        await until(lambda: len(recorder.connected_ids()) == clients_count)
        # Which shard holds which client: match the server's peer ports to local ports.
        shard_of_port = {
            server.get_peer_port(i): server.get_peer_shard(i) for i in recorder.connected_ids()
        }
        shard_of_client = [shard_of_port[ws.local_address[1]] for ws in sockets]
        victim = shard_of_client[0]
        victim_pid = server.get_shard_status()[victim]["pid"]
        stop = asyncio.Event()
        results: dict[int, tuple[str, int]] = {}
        tasks = [asyncio.create_task(client(ws, i, stop, results)) for i, ws in enumerate(sockets)]
        await asyncio.sleep(1.0)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # The shard comes back: a new connection lands in its id range within 2 s.
        back_after = None
        while back_after is None and time.monotonic() - killed_at < 5:
            known = set(recorder.connected_ids())
            ws = await connect(url(server))
            await until(lambda known=known: len(recorder.connected_ids()) > len(known))
            new_id = (set(recorder.connected_ids()) - known).pop()
            if server.get_peer_shard(new_id) == victim:
                back_after = time.monotonic() - killed_at
            await ws.close()
        await asyncio.sleep(1.0)  # traffic goes on after the restart
        stop.set()
        await asyncio.gather(*tasks)
        for ws in sockets:
            await ws.close()
        return {"results": results, "shards": shard_of_client, "victim": victim}, victim, back_after

    info, victim, back_after = run_with(server, body, timeout=80)
    results, shard_of_client = info["results"], info["shards"]
    print(f"shard {victim} serves again {back_after:.3f} s after SIGKILL")
    assert back_after is not None and back_after < 2.0, back_after
    for index, (outcome, received) in results.items():
        if shard_of_client[index] == victim:
            assert outcome == "dropped"
        else:
            assert outcome == "ok" and received > 0, (index, outcome, received)
    victims = [i for i, shard in enumerate(shard_of_client) if shard == victim]
    assert victims and len(victims) < clients_count
    # The server reported each of the dead shard's peers as gone, uncleanly.
    dead_ids = {
        event[1]
        for event in recorder.named("disconnected")
        if m.owner_of(event[1], m.id_span(4)) == victim and event[2] is False
    }
    assert len(dead_ids) >= len(victims)
    assert server.listen(0) == Error.ERR_ALREADY_IN_USE  # still the same, healthy server
