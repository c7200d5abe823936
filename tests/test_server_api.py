"""Godot 3.2's WebSocketServer members against real `websockets` clients on loopback."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsfleet import Error, WebSocketServer
from wsfleet.variant import Color, Vector2

from .wsserver import Recorder, echo, poll_until, run_with, until, url

pytestmark = pytest.mark.timeout(60)


# -- listen and its errors -------------------------------------------------------------


def test_listen_twice_and_set_buffers_after_listen_fail(servers) -> None:
    server = servers(shards=1)
    assert server.is_listening()
    assert server.listen(server.port) == Error.ERR_ALREADY_IN_USE
    assert server.set_buffers(64, 1024, 64, 1024) == Error.FAILED
    server.stop()
    assert not server.is_listening()
    server.stop()  # a second stop is harmless


def test_listen_on_a_port_another_process_holds_is_already_in_use(servers) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        server = WebSocketServer(shards=2)
        assert server.listen(holder.getsockname()[1]) == Error.ERR_ALREADY_IN_USE
        assert not server.is_listening()
    finally:
        holder.close()


def test_a_second_wsfleet_on_the_same_port_is_refused_despite_so_reuseport(servers) -> None:
    first = servers(shards=2)
    second = WebSocketServer(shards=2)
    assert second.listen(first.port) == Error.ERR_ALREADY_IN_USE


def test_unknown_peer_ids(servers, caplog) -> None:
    server = servers(shards=1)
    with caplog.at_level(logging.ERROR, logger="wsfleet"):
        assert not server.has_peer(12345)
        assert server.get_peer(12345) is None
        assert server.get_peer_address(12345) == ""
        assert server.get_peer_port(12345) == 0
        server.disconnect_peer(12345)
    assert "no peer 12345" in caplog.text


def test_bind_ip_is_validated_and_fixed_while_listening(servers) -> None:
    server = WebSocketServer(shards=1)
    with pytest.raises(ValueError):
        server.bind_ip = "not an address"
    server.bind_ip = "127.0.0.1"
    assert server.listen(0) == Error.OK
    try:
        with pytest.raises(RuntimeError):
            server.bind_ip = "*"
    finally:
        server.stop()


def test_bind_ip_limits_where_the_server_listens(servers) -> None:
    server = servers(shards=1, bind_ip="127.0.0.1")
    recorder = Recorder(server)

    async def body() -> None:
        async with connect(url(server, "127.0.0.1")):
            await until(lambda: recorder.connected_ids())
        with pytest.raises(OSError):  # 127.0.0.2 is loopback too, but not bound
            await connect(url(server, "127.0.0.2"), open_timeout=2)

    run_with(server, body)
    assert len(recorder.connected_ids()) == 1


# -- peers, data, write modes ---------------------------------------------------------------


def test_text_and_binary_keep_their_kind_both_ways(servers) -> None:
    server = servers(shards=2)
    echo(server)

    async def body() -> None:
        async with connect(url(server)) as ws:
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\xffbinary")
            assert await ws.recv() == b"\x00\xffbinary"
            big = bytes(range(256)) * 200  # 51,200 bytes: 16-bit length header
            await ws.send(big)
            assert await ws.recv() == big

    run_with(server, body)


def test_peer_members(servers) -> None:
    server = servers(shards=2)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        async with connect(url(server)) as ws:
            await until(lambda: recorder.connected_ids())
            peer_id = recorder.connected_ids()[0]
            peer = server.get_peer(peer_id)
            local_port = ws.local_address[1]
            assert server.has_peer(peer_id)
            assert server.get_peer_address(peer_id) == "127.0.0.1"
            assert server.get_peer_port(peer_id) == local_port
            assert peer.get_connected_host() == "127.0.0.1"
            assert peer.get_connected_port() == local_port
            assert peer.is_connected_to_host()
            assert peer.get_write_mode() == peer.WRITE_MODE_BINARY
            assert peer.get_available_packet_count() == 0
            assert peer.get_packet() == b""
            assert peer.get_packet_error() == Error.ERR_UNAVAILABLE
            peer.set_no_delay(False)
            peer.set_no_delay(True)
            await ws.send("one")
            await ws.send(b"two")
            await until(lambda: peer.get_available_packet_count() == 2)
            assert peer.get_packet() == b"one" and peer.was_string_packet()
            assert peer.get_packet() == b"two" and not peer.was_string_packet()
            peer.set_write_mode(peer.WRITE_MODE_TEXT)
            assert peer.put_packet("text ✓") == Error.OK
            assert await ws.recv() == "text ✓"
            assert peer.put_packet(b"\xff\xfe") == Error.ERR_INVALID_PARAMETER  # not UTF-8
            with pytest.raises(ValueError):
                peer.set_write_mode(7)
        await until(lambda: recorder.named("disconnected"))
        assert not server.has_peer(peer_id)
        assert not peer.is_connected_to_host()
        assert peer.put_packet(b"late") == Error.FAILED
        assert peer.get_packet() == b"" and peer.get_packet_error() == Error.FAILED
        assert peer.get_available_packet_count() == 0

    run_with(server, body)
    assert server.get_peers() == []


def test_put_var_and_get_var_use_godots_encoding(servers) -> None:
    server = servers(shards=1)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        async with connect(url(server)) as ws:
            await until(lambda: recorder.connected_ids())
            peer = server.get_peer(recorder.connected_ids()[0])
            # docs/GODOT_VARIANT.md §2, byte for byte.
            expected = {
                42: "020000002a000000",
                -7: "02000000f9ffffff",
                2**40: "020001000000000000010000",
                1.5: "030000000000c03f",
                0.1: "030001009a9999999999b93f",
                "hé": "040000000300000068c3a900",
            }
            for value, hex_bytes in expected.items():
                assert peer.put_var(value) == Error.OK
                assert (await ws.recv()).hex() == hex_bytes
            assert peer.put_var([1, "two", 3.0, [4]]) == Error.OK
            assert (await ws.recv()).hex() == (
                "13000000040000000200000001000000040000000300000074776f00"
                "030000000000404013000000010000000200000004000000"
            )
            await ws.send(bytes.fromhex("050000000000c03f000000c0"))
            await ws.send(bytes.fromhex("0e0000000000803f0000003f000000000000803f"))
            await ws.send(bytes.fromhex("120000000100000004000000010000006b0000000200000001000000"))
            await ws.send(b"\x99")  # not a Variant
            await until(lambda: peer.get_available_packet_count() == 4)
            assert peer.get_var() == Vector2(1.5, -2.0)
            assert peer.get_var() == Color(1.0, 0.5, 0.0, 1.0)
            assert peer.get_var() == {"k": 1}
            assert peer.get_var() is None
            assert peer.get_packet_error() == Error.ERR_INVALID_DATA

    run_with(server, body)


def test_broadcast_reaches_every_peer_but_the_excluded(servers) -> None:
    server = servers(shards=2)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        clients = [await connect(url(server)) for _ in range(6)]
        await until(lambda: len(recorder.connected_ids()) == 6)
        excluded = recorder.connected_ids()[0]
        assert server.broadcast("to all but one", text=True, exclude=[excluded]) == Error.OK
        got = []
        for ws in clients:
            try:
                got.append(await asyncio.wait_for(ws.recv(), 0.5))
            except TimeoutError:
                got.append(None)
        assert sorted(got, key=str) == [None] + ["to all but one"] * 5
        assert server.broadcast(b"\x01\x02") == Error.OK
        for ws in clients:
            assert await ws.recv() == b"\x01\x02"
        for ws in clients:
            await ws.close()

    run_with(server, body)


# -- subprotocols -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "agreed"),
    [
        (["chat", "godot-test"], "chat"),
        (["godot-test", "chat"], "godot-test"),
        (["nope", "chat"], "chat"),
    ],
)
def test_the_first_protocol_the_client_offers_that_the_server_speaks_wins(
    servers, offered, agreed
) -> None:
    server = servers(shards=1, protocols=("godot-test", "chat"))
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        async with connect(url(server), subprotocols=offered) as ws:
            assert ws.subprotocol == agreed
            await until(lambda: recorder.connected_ids())

    run_with(server, body)
    assert recorder.named("connected")[0][2] == agreed


@pytest.mark.parametrize(
    ("server_protocols", "offered"),
    [(("chat",), None), (("chat",), ["other"]), ((), ["chat"])],
)
def test_no_common_protocol_is_refused_with_400(servers, server_protocols, offered) -> None:
    server = servers(shards=1, protocols=server_protocols)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(server), subprotocols=offered)
        assert refused.value.response.status_code == 400
        assert b"protocol" in refused.value.response.body

    run_with(server, body)
    assert recorder.events == []


# -- closing -------------------------------------------------------------------------------


def test_client_close_is_reported_as_godot_does(servers) -> None:
    server = servers(shards=2)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        ws = await connect(url(server))
        await ws.close(4000, "bye")
        assert ws.close_code == 4000 and ws.close_reason == "bye"  # echoed by the server
        godot_style = await connect(url(server))
        await godot_style.close(4002, "bye\0")  # Godot appends a NUL to its reasons
        await until(lambda: len(recorder.named("disconnected")) == 2)

    run_with(server, body)
    first, second = recorder.connected_ids()
    assert recorder.named("close_request") == [
        ("close_request", first, 4000, "bye"),
        ("close_request", second, 4002, "bye"),
    ]
    assert ("disconnected", first, True) in recorder.events
    events_of_first = [e for e in recorder.events if e[1] == first]
    assert [e[0] for e in events_of_first] == ["connected", "close_request", "disconnected"]


def test_disconnect_peer_sends_code_and_reason(servers) -> None:
    server = servers(shards=2)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        ws = await connect(url(server))
        await until(lambda: recorder.connected_ids())
        peer_id = recorder.connected_ids()[0]
        with pytest.raises(ValueError):
            server.disconnect_peer(peer_id, 1005)  # reserved: never sent
        with pytest.raises(ValueError):
            server.disconnect_peer(peer_id, 1000, "x" * 124)
        server.disconnect_peer(peer_id, 4001, "kick")
        assert server.get_peer(peer_id).put_packet(b"after close") == Error.FAILED
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 4001 and ws.close_reason == "kick"
        await until(lambda: recorder.named("disconnected"))

    run_with(server, body)
    # As in Godot: no close request, and the side that started the close reports False.
    assert recorder.named("close_request") == []
    assert recorder.named("disconnected") == [("disconnected", recorder.connected_ids()[0], False)]


def test_a_dropped_tcp_connection_is_an_unclean_disconnect(servers) -> None:
    server = servers(shards=1)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        ws = await connect(url(server))
        await until(lambda: recorder.connected_ids())
        ws.transport.abort()
        await until(lambda: recorder.named("disconnected"))

    run_with(server, body)
    assert recorder.named("disconnected")[0][2] is False


# -- limits ------------------------------------------------------------------------------


def test_put_packet_refuses_with_out_of_memory_when_the_peer_does_not_read() -> None:
    server = WebSocketServer(shards=1)
    assert server.set_buffers(64, 1024, 16, 8) == Error.OK  # 16 KiB / 8 packets out
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    try:

        async def body() -> None:
            ws = await connect(url(server), max_queue=None)
            await until(lambda: recorder.connected_ids())
            peer = server.get_peer(recorder.connected_ids()[0])
            results = [peer.put_packet(bytes(1000)) for _ in range(10)]
            assert results[:8] == [Error.OK] * 8
            assert results[8:] == [Error.ERR_OUT_OF_MEMORY] * 2
            assert peer.put_packet(bytes(16 * 1024)) == Error.ERR_OUT_OF_MEMORY  # bytes limit
            for _ in range(8):
                assert await ws.recv() == bytes(1000)
            # Credits come back once the shard has handed the packets to the kernel.
            await until(lambda: peer.put_packet(b"more") == Error.OK)
            await ws.close()

        run_with(server, body)
    finally:
        server.stop()


def test_an_unread_inbound_flood_is_held_back_not_dropped() -> None:
    server = WebSocketServer(shards=1, ring_capacity=1 << 16)
    assert server.set_buffers(4, 16, 64, 1024) == Error.OK  # 4 KiB / 16 packets in
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    try:

        async def body() -> None:
            ws = await connect(url(server))
            await until(lambda: recorder.connected_ids())
            peer = server.get_peer(recorder.connected_ids()[0])
            count = 20_000  # 20 MB: more than the ring and the socket buffers hold

            async def send_all() -> None:
                for i in range(count):
                    await ws.send(i.to_bytes(4, "little") * 250)

            sender = asyncio.create_task(send_all())
            await until(lambda: peer.get_available_packet_count() >= 16)
            await asyncio.sleep(0.3)
            # Reading paused: far fewer than all of them wait in the front.
            assert peer.get_available_packet_count() < count
            received = []
            while len(received) < count:
                if peer.get_available_packet_count():
                    received.append(int.from_bytes(peer.get_packet()[:4], "little"))
                else:
                    await asyncio.sleep(0.001)
            assert received == list(range(count))
            await sender
            await ws.close()

        run_with(server, body)
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_a_full_events_ring_holds_every_socket_back_and_loses_nothing() -> None:
    """A front that stops polling fills its shard's events ring (16 KiB here, 8 MB sent): the
    shard stops reading every socket until the front drains it; then every message of every
    client arrives, in order."""
    server = WebSocketServer(shards=1, ring_capacity=1 << 14)
    assert server.listen(0) == Error.OK
    received: dict[int, list[int]] = {}

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            received.setdefault(peer_id, []).append(int.from_bytes(peer.get_packet()[:4], "big"))

    server.connect("data_received", on_data)
    clients, count, size = 40, 200, 1000
    loop = asyncio.new_event_loop()
    try:

        async def open_all() -> list:
            # The shard answers the upgrade: the front need not poll for it.
            return await asyncio.gather(*(connect(url(server)) for _ in range(clients)))

        sockets = loop.run_until_complete(open_all())
        poll_until(server, lambda: len(server.get_peers()) == clients)

        async def send_all() -> None:
            async def one(ws) -> None:
                for i in range(count):
                    await ws.send(i.to_bytes(4, "big") * (size // 4))

            await asyncio.gather(*(one(ws) for ws in sockets))

        sending = loop.create_task(send_all())
        # The front does not poll while the clients send: 8 MB against a 16 KiB ring.
        loop.run_until_complete(asyncio.wait([sending], timeout=1.5))
        deadline = time.monotonic() + 60
        while not sending.done() or sum(map(len, received.values())) < clients * count:
            assert time.monotonic() < deadline, sum(map(len, received.values()))
            server.poll(0.001)
            loop.run_until_complete(asyncio.sleep(0))
        sending.result()
        assert len(received) == clients
        assert all(numbers == list(range(count)) for numbers in received.values())
        for ws in sockets:
            loop.run_until_complete(ws.close())
    finally:
        server.stop()
        loop.close()


def test_messages_over_the_input_buffer_close_with_1009(servers) -> None:
    server = servers(shards=1)  # default input buffer: 64 KiB

    async def body() -> None:
        async with connect(url(server)) as ws:
            await ws.send(bytes(64 * 1024 + 1))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009

    run_with(server, body)


# -- TLS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("as_files", [True, False])
def test_tls_with_certificate_and_key(servers, tmp_path, as_files) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    key_pem = cert.private_key_pem.bytes().decode()
    chain_pem = "".join(blob.bytes().decode() for blob in cert.cert_chain_pems)
    if as_files:
        (tmp_path / "key.pem").write_text(key_pem)
        (tmp_path / "cert.pem").write_text(chain_pem)
        key_pem, chain_pem = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    server = servers(shards=2, private_key=key_pem, ssl_certificate=chain_pem)
    echo(server)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def body() -> None:
        async with connect(url(server, scheme="wss"), ssl=client_context) as ws:
            await ws.send("over TLS")
            assert await ws.recv() == "over TLS"

    run_with(server, body)


def test_ca_chain_completes_the_chain_the_client_needs(servers) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("127.0.0.1")
    server = servers(
        shards=1,
        private_key=leaf.private_key_pem.bytes().decode(),
        ssl_certificate=leaf.cert_chain_pems[0].bytes().decode(),  # the leaf alone
        ca_chain=intermediate.cert_pem.bytes().decode(),
    )
    echo(server)
    client_context = ssl.create_default_context()
    root.configure_trust(client_context)  # the client trusts only the root

    async def body() -> None:
        async with connect(url(server, scheme="wss"), ssl=client_context) as ws:
            await ws.send("chained")
            assert await ws.recv() == "chained"

    run_with(server, body)


def test_tls_with_a_broken_key_fails_listen() -> None:
    server = WebSocketServer(shards=1)
    server.private_key = "-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n"
    server.ssl_certificate = server.private_key
    assert server.listen(0) == Error.ERR_CANT_CREATE
    assert not server.is_listening()


# -- polling styles ------------------------------------------------------------------------


def test_blocking_poll_with_timeout_and_a_select_loop(servers) -> None:
    import select
    import threading

    from websockets.sync.client import connect as sync_connect

    server = servers(shards=2)
    echo(server)
    replies = []

    def client() -> None:
        with sync_connect(url(server)) as ws:
            for i in range(20):
                ws.send(f"m{i}")
                replies.append(ws.recv(timeout=10))

    thread = threading.Thread(target=client)
    thread.start()
    fd = server.fileno()
    while thread.is_alive():
        select.select([fd], [], [], 0.5)
        server.poll()
    thread.join()
    assert replies == [f"m{i}" for i in range(20)]
    # poll(timeout) waits when there is nothing to do, but not longer.
    import time

    started = time.monotonic()
    server.poll(0.2)
    assert 0.1 < time.monotonic() - started < 2
    poll_until(server, lambda: True)
