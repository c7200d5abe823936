"""Per-peer delivery (``data_received_mode="peer"``), `get_packets` / `put_packets`, and the
C dispatch loop's handling of a raising handler, against real servers and clients."""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer

from .serveproc import ServeProcess
from .wsserver import Recorder, run_with, until, url

pytestmark = pytest.mark.timeout(60)


def batch_echo(server: WebSocketServer, calls: list[tuple[int, int]]) -> None:
    """Echo with one `get_packets` / `put_packets` per signal; ``calls`` gets (id, count)."""

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        packets = peer.get_packets()
        assert peer.get_packet_error() == Error.OK and packets
        calls.append((peer_id, len(packets)))
        assert peer.put_packets(packets) == Error.OK

    server.connect("data_received", on_data)


def test_per_peer_delivery_signals_once_per_peer_with_all_its_messages(servers) -> None:
    server = servers(shards=2, data_received_mode="peer")
    calls: list[tuple[int, int]] = []
    batch_echo(server, calls)
    count = 300

    async def body() -> None:
        async with connect(url(server)) as one, connect(url(server)) as two:
            for i in range(count):  # without waiting: the messages come in batches
                await one.send(i.to_bytes(4, "little"))
                await two.send(i.to_bytes(4, "big"))
            for ws, order in ((one, "little"), (two, "big")):
                echoed = [int.from_bytes(await ws.recv(), order) for _ in range(count)]
                assert echoed == list(range(count))

    run_with(server, body)
    ids = {peer_id for peer_id, _ in calls}
    assert len(ids) == 2
    for peer_id in ids:
        assert sum(n for i, n in calls if i == peer_id) == count
    assert len(calls) < 2 * count  # some signals carried several messages


def test_a_peers_messages_are_signalled_before_it_leaves(servers) -> None:
    server = servers(shards=1, data_received_mode="peer")
    recorder = Recorder(server, read_data=False)
    received: list[bytes] = []

    def on_data(peer_id: int) -> None:
        received.extend(server.get_peer(peer_id).get_packets())
        recorder.events.append(("data", peer_id))

    server.connect("data_received", on_data)

    async def body() -> None:
        async with connect(url(server)) as ws:
            for i in range(50):
                await ws.send(b"m%d" % i)
        await until(lambda: recorder.named("disconnected"))

    run_with(server, body)
    assert received == [b"m%d" % i for i in range(50)]
    names = [event[0] for event in recorder.events]
    assert names[0] == "connected" and names[-1] == "disconnected"
    assert "data" in names and names.index("close_request") > max(
        i for i, name in enumerate(names) if name == "data"
    )


def test_put_packets_sends_all_or_nothing() -> None:
    server = WebSocketServer(shards=1)
    assert server.set_buffers(64, 1024, 16, 8) == Error.OK  # 8 packets out (64 KiB: the input)
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    try:

        async def body() -> None:
            async with connect(url(server)) as ws:
                await until(lambda: recorder.connected_ids())
                peer = server.get_peer(recorder.connected_ids()[0])
                assert peer.put_packets([b"x"] * 9) == Error.ERR_OUT_OF_MEMORY  # 8 packets
                assert peer.put_packets([bytes(40_000)] * 2) == Error.ERR_OUT_OF_MEMORY
                assert peer.get_outbound_room() == peer.get_outbound_limit()  # nothing went
                peer.set_write_mode(peer.WRITE_MODE_TEXT)
                bad = peer.put_packets(["fine", b"\xff"])
                assert bad == Error.ERR_INVALID_PARAMETER
                assert peer.put_packets(["é", bytearray(b"b"), memoryview(b"c")]) == Error.OK
                assert [await ws.recv() for _ in range(3)] == ["é", "b", "c"]
                assert peer.put_packets([]) == Error.OK
                assert peer.get_packets() == []
                assert peer.get_packet_error() == Error.ERR_UNAVAILABLE

        run_with(server, body)
    finally:
        server.stop()


def test_a_raising_handler_costs_only_its_own_call(servers, caplog) -> None:
    server = servers(shards=1)
    seen: list[bytes] = []

    def flaky(peer_id: int) -> None:
        packet = server.get_peer(peer_id).get_packet()
        seen.append(packet)
        if int(packet) % 2:
            raise RuntimeError(f"odd {packet!r}")

    after: list[int] = []
    server.connect("data_received", flaky)
    server.connect("data_received", after.append)

    async def body() -> None:
        async with connect(url(server)) as ws:
            for i in range(20):
                await ws.send(b"%d" % i)
            await until(lambda: len(after) == 20)

    with caplog.at_level(logging.ERROR, logger="wsfleet"):
        run_with(server, body)
    assert seen == [b"%d" % i for i in range(20)]
    failures = [r for r in caplog.records if "'data_received' handler" in r.getMessage()]
    assert len(failures) == 10 and all(r.exc_info for r in failures)


def test_an_unknown_data_received_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="data_received_mode"):
        WebSocketServer(shards=1, data_received_mode="batch")
    server = WebSocketServer(shards=1)
    server.data_received_mode = "everything"
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER


def test_wsfleet_serve_echoes_with_per_peer_delivery() -> None:
    """The built-in echo, and the loadtest's batch echo, in per-peer mode."""
    for options in (
        ("--data-received-mode", "peer"),
        ("--app", "wsfleet.loadtest.wsfleet_apps:batch_echo"),
    ):
        serve = ServeProcess("--shards", "1", "--bind", "127.0.0.1", *options)
        try:
            serve.wait_up()

            async def body(port: int = serve.port) -> None:
                async with connect(f"ws://127.0.0.1:{port}/") as ws:
                    for i in range(200):
                        await ws.send(i.to_bytes(2, "big"))
                    assert [await ws.recv() for _ in range(200)] == [
                        i.to_bytes(2, "big") for i in range(200)
                    ]

            asyncio.run(asyncio.wait_for(body(), 20))
        finally:
            serve.end()
