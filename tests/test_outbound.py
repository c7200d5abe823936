"""Nothing silently dropped, the server's side: outbound buffers, max_buffered_bytes, refusals."""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer
from wsfleet.server import DEFAULT_MAX_BUFFERED_BYTES

from .wsserver import Recorder, run_with, until

pytestmark = pytest.mark.timeout(90)


def url(server: WebSocketServer) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def listening(server: WebSocketServer) -> WebSocketServer:
    assert server.listen(0) == Error.OK
    return server


@pytest.mark.parametrize("size", [1 << 20, 16 * 1024 * 1024])
def test_the_echo_of_the_largest_accepted_message_fits(size) -> None:
    """The outbound buffer is raised to max_message_size: the echo of the largest message
    fits an empty buffer.  A packet refused because the previous one is not yet handed to
    the kernel is kept and sent once `get_outbound_room` says it fits, as an echo must."""
    server = listening(WebSocketServer(shards=1, max_message_size=size))
    first: list[Error] = []
    pending: list[tuple[int, bytes]] = []

    def pump() -> None:
        while pending:
            peer_id, packet = pending[0]
            peer = server.get_peer(peer_id)
            if peer.get_outbound_room() < len(packet):
                return
            assert peer.put_packet(packet) == Error.OK  # the room it reported is there
            pending.pop(0)

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        assert peer.get_outbound_limit() >= size
        packet = peer.get_packet()
        if not first:  # into an empty buffer: it fits
            first.append(peer.put_packet(packet))
            return
        pending.append((peer_id, packet))
        pump()

    server.connect("data_received", on_data)
    message = bytes(range(256)) * (size // 256)
    try:

        async def body() -> None:
            async with connect(url(server), max_size=None) as ws:
                await ws.send(message)
                assert await ws.recv() == message
                for payload in (b"small", message, b"last"):
                    await ws.send(payload)
                for payload in (b"small", message, b"last"):
                    while True:
                        try:
                            assert await asyncio.wait_for(ws.recv(), 0.01) == payload
                            break
                        except TimeoutError:
                            pump()  # the application's own tick

        run_with(server, body, timeout=60)
    finally:
        server.stop()
    assert first == [Error.OK]
    assert server.get_outbound_stats()["refused_peer_full"] == 0  # it waited for room


def test_max_buffered_bytes_is_checked_like_the_other_limits() -> None:
    assert WebSocketServer(shards=1).max_buffered_bytes == DEFAULT_MAX_BUFFERED_BYTES
    assert DEFAULT_MAX_BUFFERED_BYTES >= 16 * 1024 * 1024  # one peer's largest buffer fits
    assert WebSocketServer(shards=1, max_buffered_bytes=None).max_buffered_bytes is None
    for bad in (-1, 0, 1000, "many", True, 1.5e9):
        with pytest.raises(ValueError):
            WebSocketServer(shards=1, max_buffered_bytes=bad)
    server = WebSocketServer(shards=1, max_buffered_bytes=1 << 20)
    assert server.set_buffers(64, 1024, 2048, 1024) == Error.OK  # 2 MiB per peer: over the cap
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER
    server.max_buffered_bytes = 4 << 20
    assert server.listen(0) == Error.OK
    server.stop()


def test_beyond_max_buffered_bytes_put_packet_refuses_then_recovers(caplog) -> None:
    """Three peers with 64 KiB buffers under a 128 KiB cap: the third is refused although
    its own buffer is empty, is told how much room there is, and succeeds once the first
    two packets left; every client gets every packet that was accepted."""
    server = listening(WebSocketServer(shards=1, max_buffered_bytes=128 * 1024))
    recorder = Recorder(server, read_data=False)
    size = 60 * 1024
    try:

        async def body() -> None:
            sockets = [await connect(url(server), max_size=None) for _ in range(3)]
            await until(lambda: len(recorder.connected_ids()) == 3)
            peers = [server.get_peer(peer_id) for peer_id in recorder.connected_ids()]
            with caplog.at_level(logging.WARNING, logger="wsfleet"):
                # No poll in between: nothing is credited back yet.
                assert peers[0].put_packet(bytes(size)) == Error.OK
                assert peers[1].put_packet(bytes(size)) == Error.OK
                assert peers[2].get_outbound_room() == 128 * 1024 - 2 * size
                assert peers[2].put_packet(bytes(size)) == Error.ERR_OUT_OF_MEMORY
                for _ in range(50):
                    assert peers[2].put_packet(bytes(size)) == Error.ERR_OUT_OF_MEMORY
                small = peers[2].get_outbound_room()
                assert peers[2].put_packet(bytes(small)) == Error.OK  # exactly the room fits
                assert peers[2].get_outbound_room() == 0
            stats = server.get_outbound_stats()
            assert stats["refused_server_full"] == 51 and stats["refused_peer_full"] == 0
            assert stats["buffered_bytes"] == 128 * 1024
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "max_buffered_bytes" in warnings[0]  # rate-limited
            # Once the shard has handed them to the kernel, the room comes back.
            await until(lambda: peers[2].get_outbound_room() >= size)
            assert peers[2].put_packet(bytes(size)) == Error.OK
            assert [len(await ws.recv()) for ws in sockets[:2]] == [size, size]
            assert [len(await sockets[2].recv()) for _ in range(2)] == [small, size]
            await until(lambda: server.get_outbound_stats()["buffered_bytes"] == 0)
            for ws in sockets:
                await ws.close()

        run_with(server, body)
    finally:
        server.stop()


def test_a_full_peer_buffer_is_counted_and_the_room_is_exact() -> None:
    server = WebSocketServer(shards=1)
    assert server.set_buffers(16, 1024, 16, 4) == Error.OK  # 16 KiB in (max message), 4 out
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    try:

        async def body() -> None:
            ws = await connect(url(server))
            await until(lambda: recorder.connected_ids())
            peer = server.get_peer(recorder.connected_ids()[0])
            assert peer.get_outbound_limit() == 16 * 1024
            assert peer.get_outbound_room() == 16 * 1024
            assert peer.put_packet(bytes(16 * 1024 + 1)) == Error.ERR_OUT_OF_MEMORY  # too big
            assert peer.put_packet(bytes(10_000)) == Error.OK
            assert peer.get_current_outbound_buffered_amount() == 10_000
            room = peer.get_outbound_room()
            assert room == 16 * 1024 - 10_000
            assert peer.put_packet(bytes(room + 1)) == Error.ERR_OUT_OF_MEMORY
            for _ in range(3):
                assert peer.put_packet(b"x") == Error.OK
            assert peer.get_outbound_room() == 0  # four packets out: the packet limit
            assert peer.put_packet(b"x") == Error.ERR_OUT_OF_MEMORY
            assert server.get_outbound_stats()["refused_peer_full"] == 3
            assert len(await ws.recv()) == 10_000
            await until(lambda: peer.get_outbound_room() == 16 * 1024)
            await ws.close()

        run_with(server, body)
    finally:
        server.stop()


def test_what_a_departed_peer_left_buffered_returns_to_the_server() -> None:
    """A client that stops reading holds bytes in its shard; when it goes, they are freed."""
    server = WebSocketServer(shards=1, max_buffered_bytes=32 << 20)
    assert server.set_buffers(64, 1024, 16384, 1024) == Error.OK  # 16 MiB per peer
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    try:

        async def body() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
            await until(lambda: recorder.connected_ids())
            peer = server.get_peer(recorder.connected_ids()[0])
            sent = 0
            while peer.put_packet(bytes(1 << 20)) == Error.OK:  # never read by the client
                sent += 1
                await asyncio.sleep(0.01)
            assert sent >= 8
            assert server.get_outbound_stats()["buffered_bytes"] > 0
            writer.transport.abort()
            await until(lambda: recorder.named("disconnected"))
            assert server.get_outbound_stats()["buffered_bytes"] == 0

        run_with(server, body)
    finally:
        server.stop()
