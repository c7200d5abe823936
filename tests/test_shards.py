"""Several shards: how connections spread over them (faults: test_faults.py)."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect

from wsfleet.ipc import messages as m

from .wsserver import Recorder, run_with, until, url


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
