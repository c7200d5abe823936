"""permessage-deflate (RFC 7692), opt-in: real ``wsfleet serve`` processes (and in-process
servers for broadcasts) with real ``websockets`` clients that compress or do not.

Negotiation on and off; echo of compressed text and binary, large and fragmented;
``max_message_size`` checked after inflation (a zip bomb closes its connection with
1009, the shard and the other peers serve on); a broadcast and a group broadcast to
compressing and plain peers together; the multiplayer relay's frames (uncompressed) on
a compressing connection; an upgrade held for the handshake handler; context takeover
off as asked (the options from a config file); bad options refused; and ``wsfleet
reload``: a connection with context takeover is closed with 1012, one without moves and
keeps compressing (half a compressed frame too), one half-way through a compressed
message is failed with 1012.

Whether the server really deflated what a client received is read from the client's
own extension: `_record_rsv1` wraps its ``decode`` to note each data frame's RSV1.
"""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.frames import Opcode

from wsfleet import Accept, Error, WebSocketServer
from wsfleet.ipc import messages as m

from .opsproc import Served
from .rawclient import OP_BINARY, OP_TEXT, RawClient, client_frame
from .wsserver import Recorder, polling, until

#: A client asking for no context takeover either way (what the server must then grant).
NO_TAKEOVER = [ClientPerMessageDeflateFactory(server_no_context_takeover=True,
                                              client_no_context_takeover=True)]  # fmt: skip


def _record_rsv1(ws: ClientConnection) -> list[bool]:
    """RSV1 of every data message's first frame the client receives from now on."""
    extension = ws.protocol.extensions[0]
    assert isinstance(extension, PerMessageDeflate)
    seen: list[bool] = []
    decode = extension.decode

    def recording(frame, *, max_size=None):  # type: ignore[no-untyped-def]
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            seen.append(frame.rsv1)
        return decode(frame, max_size=max_size)

    extension.decode = recording  # type: ignore[method-assign]
    return seen


async def _deflate(url: str, **options: object) -> ClientConnection:
    options.setdefault("extensions", None)
    return await connect(url, compression="deflate", ping_interval=None, max_size=None,
                         open_timeout=10, **options)  # type: ignore[arg-type]  # fmt: skip


async def _plain(url: str) -> ClientConnection:
    return await connect(url, compression=None, ping_interval=None, max_size=None, open_timeout=10)


def _status_when(served: Served, condition, timeout: float = 10.0) -> dict:  # type: ignore[no-untyped-def]
    """The server's status once ``condition(status)`` holds (counters are published every
    0.1 s); the last one read after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        doc = served.status()
        if condition(doc) or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def _compressible(size: int) -> bytes:
    """Bytes that deflate well but not absurdly (a repeated counter)."""
    return b"".join(b"%08d," % i for i in range(size // 9 + 1))[:size]


@pytest.mark.timeout(60)
def test_a_server_without_compression_never_negotiates_it(tmp_path: Path) -> None:
    with Served(tmp_path, 1) as served:

        async def body() -> None:
            ws = await _deflate(served.url())  # offers permessage-deflate
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert ws.protocol.extensions == []
            await ws.send("plain " * 100)
            assert await ws.recv() == "plain " * 100
            await ws.close()

        asyncio.run(body())
        # A compressed frame on a connection without the extension is a protocol error.
        raw = RawClient("127.0.0.1", served.port)
        raw.sock.sendall(client_frame(b"\xca\x48\xcd\xc9\xc9\x07\x00", OP_TEXT, rsv=0x40))
        assert raw.read_until_close() == ([], 1002)
        raw.close_socket()


@pytest.mark.timeout(60)
def test_offered_is_negotiated_and_not_offered_stays_plain(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--compression", "--max-message-size", "16777216") as served:

        async def body() -> None:
            ws = await _deflate(served.url())
            header = ws.response.headers["Sec-WebSocket-Extensions"]
            assert header.startswith("permessage-deflate"), header
            assert "server_max_window_bits=12" in header
            assert "no_context_takeover" not in header
            rsv1 = _record_rsv1(ws)
            for message in ("hello " * 50, b"\x00\x01\x02" * 300, "é€ unicode " * 20, b"", ""):
                await ws.send(message)
                assert await ws.recv() == message
            large = _compressible(8 << 20)  # 8 MiB: many reads, both ways
            await ws.send(large)
            assert await ws.recv() == large
            # A fragmented compressed message (websockets deflates it across its frames).
            parts = [_compressible(300_000).decode(), "middle", "é" * 70_000]
            await ws.send(parts)
            assert await ws.recv() == "".join(parts)
            await ws.send([b"a" * 10, b"", b"b" * 100_000])
            assert await ws.recv() == b"a" * 10 + b"b" * 100_000
            # The same text again and again: context takeover shrinks it on the wire.
            for _ in range(5):
                await ws.send("again and again " * 40)
                assert await ws.recv() == "again and again " * 40
            assert rsv1 and all(rsv1), rsv1  # every message the server sent was deflated
            plain = await _plain(served.url())
            assert "Sec-WebSocket-Extensions" not in plain.response.headers
            await plain.send("not compressed")
            assert await plain.recv() == "not compressed"
            await ws.close()
            await plain.close()

        asyncio.run(body())
        # A plain request (no extension offered) still gets the fast, Godot-like 101.
        raw = RawClient("127.0.0.1", served.port)
        assert b"Sec-WebSocket-Extensions" not in raw.response_head
        assert b"Date:" not in raw.response_head
        raw.send(b"raw", OP_TEXT)
        assert raw.recv_frame() == (OP_TEXT, b"raw")
        raw.close_socket()
        assert served.status()["totals"]["closes_1002"] == 0


@pytest.mark.timeout(60)
def test_context_takeover_off_is_negotiated_as_asked(tmp_path: Path) -> None:
    """The options from a config file this time (the keys are the options' names)."""
    config = tmp_path / "wsfleet.toml"
    config.write_text(
        "compression = true\ncompression-no-context-takeover = true\ncompression_window_bits = 10\n"
    )
    with Served(tmp_path, 1, "--config", str(config)) as served:

        async def body() -> None:
            ws = await _deflate(served.url())
            header = ws.response.headers["Sec-WebSocket-Extensions"]
            assert "server_no_context_takeover" in header, header
            assert "client_no_context_takeover" in header, header
            assert "server_max_window_bits=10" in header, header
            extension = ws.protocol.extensions[0]
            assert extension.local_no_context_takeover and extension.remote_no_context_takeover
            rsv1 = _record_rsv1(ws)
            for index in range(20):
                message = f"message {index} " * (index * 10)
                await ws.send(message)
                assert await ws.recv() == message
            assert all(rsv1) and len(rsv1) == 20
            await ws.close()

        asyncio.run(body())


@pytest.mark.timeout(90)
def test_max_message_size_holds_after_inflation_and_a_zip_bomb_costs_only_its_sender(
    tmp_path: Path,
) -> None:
    limit = 1 << 20
    with Served(tmp_path, 1, "--compression", "--max-message-size", str(limit)) as served:
        shard_pid = served.status()["shards"][0]["pid"]

        async def body() -> None:
            bystander = await _deflate(served.url())
            plain = await _plain(served.url())
            ws = await _deflate(served.url())
            await ws.send(b"\x00" * limit)  # exactly the limit, inflated: accepted
            assert await ws.recv() == b"\x00" * limit
            # 64 MiB of zeros deflate to ~64 KiB: under the limit on the wire, not inflated.
            bomb = await _deflate(served.url())
            await bomb.send(b"\x00" * (64 << 20))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(bomb.recv(), 10)
            assert bomb.close_code == 1009, (bomb.close_code, bomb.close_reason)
            # Fragmented: each fragment small, the message over the limit once inflated.
            fragmented = await _deflate(served.url())
            await fragmented.send([b"\x00" * (limit // 2)] * 3)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(fragmented.recv(), 10)
            assert fragmented.close_code == 1009
            # One byte over, text this time.
            over = await _deflate(served.url())
            await over.send("a" * (limit + 1))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(over.recv(), 10)
            assert over.close_code == 1009
            for peer in (bystander, plain, ws):  # the others are served on
                await peer.send("still here")
                assert await peer.recv() == "still here"
                await peer.close()

        asyncio.run(body())
        doc = _status_when(served, lambda doc: doc["totals"]["closes_1009"] >= 3)
        assert doc["shards"][0]["pid"] == shard_pid and doc["shards"][0]["state"] == "running"
        assert doc["totals"]["closes_1009"] == 3


def _mixed_clients_body(server: WebSocketServer, recorder: Recorder) -> None:
    url = f"ws://127.0.0.1:{server.port}"

    async def body() -> None:
        async with polling(server):
            clients = [await _deflate(url), await _deflate(url), await _plain(url),
                       await _deflate(url, extensions=NO_TAKEOVER),
                       await _deflate(url, extensions=NO_TAKEOVER), await _plain(url)]  # fmt: skip
            deflating = {0, 1, 3, 4}
            rsv1 = {i: _record_rsv1(ws) for i, ws in enumerate(clients) if i in deflating}
            await until(lambda: len(recorder.named("connected")) == len(clients))
            for index, ws in enumerate(clients):
                await ws.send(str(index))
            await until(lambda: len(recorder.packets) == len(clients))
            peer_of = {int(p[0][0]): pid for pid, p in recorder.packets.items()}
            members = {0, 2, 3}
            for index in members:
                assert server.join(peer_of[index], "room") == Error.OK
            text = "to everyone " * 30
            expected: dict[int, list] = {i: [] for i in range(len(clients))}
            for round_ in range(3):  # the same message again: context takeover at work
                assert server.broadcast(text, text=True) == Error.OK
                assert server.broadcast(b"\x07" * 2000, exclude=[peer_of[1]]) == Error.OK
                room = f"room {round_} " * 20
                assert server.broadcast(room, text=True, group="room") == Error.OK
                for i in expected:
                    expected[i].append(text)
                    if i != 1:
                        expected[i].append(b"\x07" * 2000)
                    if i in members:
                        expected[i].append(room)
            for peer_id in peer_of.values():  # and one direct message each, interleaved
                server.get_peer(peer_id).put_packet(b"direct")
            for i in expected:
                expected[i].append(b"direct")
            for i, ws in enumerate(clients):
                got = [await asyncio.wait_for(ws.recv(), 10) for _ in expected[i]]
                assert got == expected[i], i
                with pytest.raises(TimeoutError):  # nothing more
                    await asyncio.wait_for(ws.recv(), 0.3)
            for i, seen in rsv1.items():
                assert seen == [True] * len(expected[i]), (i, seen)
            for ws in clients:
                await ws.close()

    asyncio.run(body())


@pytest.mark.timeout(90)
def test_a_broadcast_and_a_group_broadcast_reach_compressing_and_plain_peers() -> None:
    server = WebSocketServer(shards=1, ping_interval=None, compression=True)
    recorder = Recorder(server)
    assert server.listen(0) == Error.OK
    try:
        _mixed_clients_body(server, recorder)
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_multiplayer_relay_frames_are_valid_on_a_compressing_connection() -> None:
    """Relay frames (welcome, SYS_ADD, relayed packets) go uncompressed (RSV1 clear), which
    RFC 7692 allows: a compressing client reads them as any other."""
    server = WebSocketServer(shards=1, ping_interval=None, compression=True)
    assert server.listen(0, gd_mp_api=True) == Error.OK
    url = f"ws://127.0.0.1:{server.port}"
    try:

        async def body() -> None:
            async with polling(server):
                first = await _deflate(url)
                rsv1 = _record_rsv1(first)

                def subject(body: bytes) -> tuple[int, int]:  # (kind, the peer it is about)
                    return body[0], struct.unpack_from("<i", body, m.MP_HEADER_SIZE)[0]

                welcome = [await asyncio.wait_for(first.recv(), 10) for _ in range(2)]
                kind, me = subject(welcome[0])
                assert kind == m.SYS_ID and subject(welcome[1]) == (m.SYS_ADD, 1)
                second = await _deflate(url)
                kind, second_id = subject(await asyncio.wait_for(second.recv(), 10))
                assert kind == m.SYS_ID
                added = await asyncio.wait_for(first.recv(), 10)
                assert subject(added) == (m.SYS_ADD, second_id)
                for _ in range(2):  # its SYS_ADD of the server and of the first peer
                    await asyncio.wait_for(second.recv(), 10)
                packet = m.MP_HEADER.pack(m.SYS_NONE, second_id, me) + b"relayed " * 10
                await second.send(packet)
                relayed = await asyncio.wait_for(first.recv(), 10)
                assert relayed == packet
                assert rsv1 == [False] * 4
                await first.close()
                await second.close()

        asyncio.run(body())
    finally:
        server.stop()


def _reload(served: Served) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "reload", "--control", served.control],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(120)
def test_a_reload_closes_context_takeover_with_1012_and_moves_the_rest(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--compression") as served:

        async def body() -> None:
            url = served.url()
            takeover = await _deflate(url)  # the server's default: context takeover
            moving = await _deflate(url, extensions=NO_TAKEOVER)  # asked for none
            plain = await _plain(url)
            for ws in (takeover, moving, plain):
                await ws.send("before")
                assert await ws.recv() == "before"
            rsv1 = _record_rsv1(moving)
            before = served.status()["shards"][0]["pid"]
            await asyncio.to_thread(_reload, served)
            assert served.status()["shards"][0]["pid"] != before
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(takeover.recv(), 10)
            assert takeover.close_code == 1012, takeover.close_code
            assert takeover.close_reason == "service restart"
            for ws in (moving, plain):
                for message in ("after " * 100, b"\x01" * 5000):
                    await ws.send(message)
                    assert await ws.recv() == message
            assert rsv1 == [True, True]  # the successor deflates what it sends
            await moving.close()
            await plain.close()

        asyncio.run(body())
        totals = _status_when(served, lambda doc: doc["totals"]["deflate_reload_closes"])["totals"]
        assert totals["deflate_reload_closes"] == 1 and totals["handoff_dropped"] == 0
        assert totals["reloads"] == 1


@pytest.mark.timeout(120)
def test_without_context_takeover_a_reload_moves_compressing_peers(tmp_path: Path) -> None:
    """Every connection moves, even with half a compressed frame read by the old process;
    only one with a compressed message half received (its inflater holds it) is failed
    with 1012."""
    with Served(tmp_path, 1, "--compression", "--compression-no-context-takeover") as served:

        async def body() -> None:
            url = served.url()
            peers = [await _deflate(url) for _ in range(3)]
            rsv1 = [_record_rsv1(ws) for ws in peers]
            midway = await _deflate(url)
            go_on = asyncio.Event()

            async def fragments():  # type: ignore[no-untyped-def]
                yield "first fragment " * 10
                await go_on.wait()
                yield "the rest"

            sending = asyncio.create_task(midway.send(fragments()))
            await asyncio.sleep(0.3)  # the first fragment is read by the old shard
            await asyncio.to_thread(_reload, served)
            go_on.set()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(midway.recv(), 10)
            assert midway.close_code == 1012
            sending.cancel()
            for index, ws in enumerate(peers):
                message = f"moved {index} " * 50
                await ws.send(message)
                assert await ws.recv() == message
                assert rsv1[index] == [True]
                await ws.close()

        asyncio.run(body())
        totals = _status_when(served, lambda doc: doc["totals"]["deflate_reload_closes"])["totals"]
        assert totals["deflate_reload_closes"] == 1 and totals["handoff_dropped"] == 0


@pytest.mark.timeout(120)
def test_half_a_compressed_frame_crosses_the_reload(tmp_path: Path) -> None:
    """A raw client negotiates deflate (no context takeover), sends half a compressed
    frame, the reload happens, the rest follows: the successor inflates it whole."""
    import zlib

    with Served(tmp_path, 1, "--compression", "--compression-no-context-takeover") as served:
        extension = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
        raw = RawClient("127.0.0.1", served.port, headers=extension)
        assert b"permessage-deflate" in raw.response_head
        message = os.urandom(20_000).hex().encode()  # 40 KB of hex: deflates to ~half
        deflater = zlib.compressobj(wbits=-15)
        body = deflater.compress(message) + deflater.flush(zlib.Z_SYNC_FLUSH)
        assert body.endswith(b"\x00\x00\xff\xff")
        frame = client_frame(body[:-4], OP_BINARY, rsv=0x40)
        raw.sock.sendall(frame[: len(frame) // 2])
        time.sleep(0.3)
        _reload(served)
        raw.sock.sendall(frame[len(frame) // 2 :])
        opcode, payload, rsv = raw.recv_frame_rsv()
        assert opcode == OP_BINARY and rsv == 0x40
        inflater = zlib.decompressobj(wbits=-15)
        assert inflater.decompress(payload + b"\x00\x00\xff\xff") == message
        raw.close_socket()
        totals = served.status()["totals"]
        assert totals["deflate_reload_closes"] == 0 and totals["handoff_dropped"] == 0


@pytest.mark.timeout(60)
def test_an_upgrade_held_for_the_handshake_handler_negotiates_deflate_too() -> None:
    server = WebSocketServer(shards=1, ping_interval=None, compression=True)
    server.set_handshake_handler(lambda pending: Accept(headers=[("X-Checked", "yes")]))
    recorder = Recorder(server)
    assert server.listen(0) == Error.OK
    url = f"ws://127.0.0.1:{server.port}"
    try:

        async def body() -> None:
            async with polling(server):
                ws = await _deflate(url)
                assert ws.response.headers["X-Checked"] == "yes"
                assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
                rsv1 = _record_rsv1(ws)
                await ws.send("held " * 100)
                await until(lambda: recorder.packets)
                peer_id = recorder.connected_ids()[0]
                assert recorder.packets[peer_id] == [(b"held " * 100, True)]
                server.get_peer(peer_id).put_packet(b"back " * 100)
                assert await asyncio.wait_for(ws.recv(), 10) == b"back " * 100
                assert rsv1 == [True]
                await ws.close()

        asyncio.run(body())
    finally:
        server.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("compression_window_bits", 8),
        ("compression_window_bits", 16),
        ("compression_mem_level", 0),
        ("compression_mem_level", 10),
        ("compression_level", -1),
        ("compression_level", 10),
        ("compression_level", "6"),
        ("compression_window_bits", True),
    ],
)
def test_bad_compression_options_are_refused(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        WebSocketServer(shards=1, compression=True, **{name: value})
    server = WebSocketServer(shards=1)
    setattr(server, name, value)
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER
    assert not server.is_listening()
