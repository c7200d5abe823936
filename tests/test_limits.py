"""Limits and protections, against real server processes and real (or deliberately bad) clients.

Each limit is checked on the shard's fast handshake path (a plain upgrade
request) and on websockets' path (the same request with a repeated harmless
header, which the fast path hands over), and each test makes sure that the
other peers keep being served.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsfleet import Error, WebSocketServer
from wsfleet.cli import build_parser, server_from_args
from wsfleet.loadtest.wsclient import build_frame
from wsfleet.supervisor.arbiter import CRASH_LIMIT, MAX_BACKOFF_SECONDS

from .conftest import connect_when_up, free_port
from .wsframes import BINARY, CLOSE, CONT, PING, PONG, TEXT, handshake_request, read_frame
from .wsserver import Recorder, echo, run_with, until, url

#: A header the fast path leaves to websockets (it is repeated), harmless otherwise.
TO_WEBSOCKETS = ("X-Twice: a", "X-Twice: b")
PATHS = {"fast path": (), "websockets path": TO_WEBSOCKETS}


async def http_answer(port: int, request: bytes, pieces: int = 1) -> tuple[int, bytes, bytes]:
    """Send ``request`` (in ``pieces`` writes) and read the answer: (status, head, body).

    A refused request is answered and the connection closed, so the body is
    whatever comes until the end of the stream.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        step = -(-len(request) // pieces)
        for i in range(0, len(request), step):
            writer.write(request[i : i + step])
            await writer.drain()
            if pieces > 1:
                await asyncio.sleep(0.05)  # separate reads on the server's side
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if head.startswith(b"HTTP/1.1 101"):
            return 101, head, b""
        body = await asyncio.wait_for(reader.read(), 5)
        return int(head.split()[1]), head, body
    finally:
        writer.close()


async def echoes(ws, payload: str = "still served") -> None:
    """``ws`` still gets its messages echoed."""
    await ws.send(payload)
    assert await asyncio.wait_for(ws.recv(), 5) == payload


async def open_raw_with(
    port: int, *extra: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(handshake_request(port, *extra))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0]


# -- max_peers -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_max_peers_over_every_shard_answers_503_on_both_paths(servers) -> None:  # noqa: F811
    server = servers(shards=2, max_peers=3)
    echo(server)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        clients = [await connect(url(server)) for _ in range(3)]
        await until(lambda: len(recorder.connected_ids()) == 3)
        # Whichever shard the kernel picks for each attempt, the server is full.
        for attempt in range(6):
            extra = TO_WEBSOCKETS if attempt % 2 else ()
            status, head, text = await http_answer(
                server.port, handshake_request(server.port, *extra)
            )
            assert status == 503, head
            assert b"connection: close" in head.lower()
            assert text == b"Server full: try again later.\n"
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(server), open_timeout=5)
        assert refused.value.response.status_code == 503
        for ws in clients:
            await echoes(ws)
        # A slot freed by a leaving peer is taken again, and only one.
        await clients.pop().close()
        await until(lambda: len(recorder.named("disconnected")) == 1)
        clients.append(await connect(url(server), open_timeout=5))
        await echoes(clients[-1])
        with pytest.raises(InvalidStatus):
            await connect(url(server), open_timeout=5)
        for ws in clients:
            await ws.close()

    run_with(server, body)
    assert len(recorder.connected_ids()) == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("given_up", [False, True])
def test_a_dead_shard_gives_its_max_peers_slots_back(servers, given_up: bool) -> None:  # noqa: F811
    server = servers(shards=2, max_peers=2)
    echo(server)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        clients = [await connect(url(server)) for _ in range(2)]
        await until(lambda: len(recorder.connected_ids()) == 2)
        with pytest.raises(InvalidStatus):
            await connect(url(server), open_timeout=5)
        victim = server.get_peer_shard(recorder.connected_ids()[0])
        victims = [i for i in recorder.connected_ids() if server.get_peer_shard(i) == victim]
        victim_ports = {server.get_peer_port(i) for i in victims}
        survivors = [ws for ws in clients if ws.local_address[1] not in victim_ports]
        # Killed once it is restarted; killed again and again, the supervisor gives it up
        # and only the other shard takes connections: no new process resets the count.
        for _ in range(CRASH_LIMIT + 1 if given_up else 1):
            await until(lambda: server.get_shard_status()[victim]["pid"] is not None)
            pid = server.get_shard_status()[victim]["pid"]
            os.kill(pid, signal.SIGKILL)
            await until(lambda pid=pid: server.get_shard_status()[victim]["pid"] != pid)
        await until(lambda: len(recorder.named("disconnected")) == len(victims))
        if given_up:
            await asyncio.sleep(MAX_BACKOFF_SECONDS + 0.5)
            assert server.get_shard_status()[victim]["pid"] is None
        # Exactly the dead shard's slots are free again, whichever shard takes them.
        fresh = [await connect(url(server), open_timeout=5) for _ in victims]
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(server), open_timeout=5)
        assert refused.value.response.status_code == 503
        for ws in survivors + fresh:
            await echoes(ws)
        for ws in clients + fresh:
            await ws.close()

    run_with(server, body)


# -- max message size ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_max_message_size_closes_with_1009_whole_or_fragmented(servers) -> None:  # noqa: F811
    server = servers(shards=1, max_message_size=1000)
    echo(server)

    async def body() -> None:
        bystander = await connect(url(server))
        async with connect(url(server), max_size=None) as ws:
            await ws.send(bytes(1000))  # at the limit: fine
            assert await ws.recv() == bytes(1000)
        for frames in (
            build_frame(BINARY, bytes(1001)),  # one frame (the fast path's check)
            build_frame(TEXT, b"a" * 600, fin=False) + build_frame(CONT, b"b" * 401),
        ):
            reader, writer = await open_raw_with(server.port)
            writer.write(frames)
            opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
            assert (opcode, close_code(payload)) == (CLOSE, 1009)
            writer.close()
        await echoes(bystander)
        await bystander.close()

    run_with(server, body)


@pytest.mark.timeout(60)
def test_max_message_size_may_exceed_the_input_buffer(servers) -> None:  # noqa: F811
    server = servers(shards=1, max_message_size=200_000)  # set_buffers' input: 64 KiB
    recorder = Recorder(server)

    async def body() -> None:
        async with connect(url(server), max_size=None) as ws:
            await ws.send(bytes(150_000))
            await until(lambda: recorder.packets)
            await ws.send(bytes(200_001))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009

    run_with(server, body)
    assert [len(p) for p, _ in next(iter(recorder.packets.values()))] == [150_000]


def test_bad_limits_are_refused() -> None:
    for bad in (
        {"max_peers": -1},
        {"max_message_size": 0},
        {"max_message_size": 17 * 1024 * 1024},
        {"max_request_bytes": 100},
        {"handshake_timeout": 0},
        {"allowed_origins": "https://one.example"},
        {"ping_interval": -1},
        {"slow_consumer_close_code": 1000},
    ):
        with pytest.raises(ValueError):
            WebSocketServer(shards=1, **bad)
    server = WebSocketServer(shards=1)
    server.max_request_bytes = 10  # set as an attribute: listen() checks it
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER
    assert not server.is_listening()


# -- handshake timeout -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_slowloris_is_dropped_at_the_handshake_timeout(servers) -> None:  # noqa: F811
    server = servers(shards=1, handshake_timeout=1.0)
    echo(server)

    async def slowloris() -> float:
        """The request line, then one header byte every 0.2 s: seconds until the server cuts."""
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\n")
        try:
            for byte in b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                await asyncio.sleep(0.2)
                writer.write(bytes([byte]))
                await writer.drain()
                if reader.at_eof():
                    break
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            data = b""
        writer.close()
        assert data == b"", data  # no answer at all: dropped
        return time.monotonic() - started

    async def body() -> None:
        async with connect(url(server)) as bystander:
            cut = asyncio.create_task(slowloris())
            served = 0
            while not cut.done():
                await echoes(bystander, f"meanwhile {served}")
                served += 1
                await asyncio.sleep(0.05)
            elapsed = await cut
            assert 0.9 <= elapsed <= 2.5, elapsed
            assert served >= 10
            await echoes(bystander)

    run_with(server, body)


# -- request header size ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", list(PATHS))
def test_max_request_bytes_answers_431_on_both_paths(servers, path: str) -> None:  # noqa: F811
    server = servers(shards=1, max_request_bytes=1024)
    extra = PATHS[path]

    def request_of(size: int) -> bytes:
        bare = handshake_request(server.port, *extra, "X-Pad: ")
        return handshake_request(server.port, *extra, "X-Pad: " + "p" * (size - len(bare)))

    async def body() -> None:
        assert len(request_of(1024)) == 1024
        assert (await http_answer(server.port, request_of(1024)))[0] == 101  # at the limit
        status, head, text = await http_answer(server.port, request_of(1025))
        assert status == 431 and b"connection: close" in head.lower(), head
        assert text == b"Request headers too large.\n"
        # In pieces, without its end: refused as soon as it cannot fit any more.
        unfinished = request_of(1100)[:-4]
        assert (await http_answer(server.port, unfinished, pieces=3))[0] == 431

    run_with(server, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", list(PATHS))
def test_a_refused_client_still_sending_gets_the_answer(servers, path: str) -> None:  # noqa: F811
    """The server half-closes and discards instead of closing: no reset destroys the answer."""
    server = servers(shards=1, max_peers=1)

    async def body() -> None:
        async with connect(url(server)):  # the server is full from now on
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(handshake_request(server.port, *PATHS[path]))
            await asyncio.sleep(0.2)  # answered and half-closed by now
            for _ in range(16):
                writer.write(b"x" * 65536)  # a client that goes on sending
                await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 503 "), head
            writer.close()

    run_with(server, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", list(PATHS))
def test_max_request_bytes_can_allow_larger_requests(servers, path: str) -> None:  # noqa: F811
    server = servers(shards=1, max_request_bytes=16384)
    pads = [f"X-Pad-{i}: " + "p" * 90 for i in range(100)]  # ~10 KB, short lines
    request = handshake_request(server.port, *PATHS[path], *pads)
    assert 8192 < len(request) < 16384

    async def body() -> None:
        assert (await http_answer(server.port, request))[0] == 101

    run_with(server, body)


# -- Origin ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_allowed_origins_answer_403_to_others(servers) -> None:  # noqa: F811
    good, evil = "https://game.example", "https://evil.example"
    server = servers(shards=2, allowed_origins=[good, "http://localhost:8060"])
    echo(server)

    async def body() -> None:
        async with connect(url(server), origin=good) as ws:  # a browser from the game's page
            await echoes(ws)
        async with connect(url(server)) as ws:  # no Origin: a native client, allowed
            await echoes(ws)
        with pytest.raises(InvalidStatus) as refused:
            await connect(url(server), origin=evil, open_timeout=5)
        assert refused.value.response.status_code == 403
        for extra in PATHS.values():
            status, head, text = await http_answer(
                server.port, handshake_request(server.port, *extra, f"Origin: {evil}")
            )
            assert (status, text) == (403, b"Origin not allowed.\n"), head
            assert b"connection: close" in head.lower()
            request = handshake_request(server.port, *extra, f"Origin: {good}")
            assert (await http_answer(server.port, request))[0] == 101
        # Two Origin headers (websockets' path) make a bad request, even if one is allowed.
        twice = handshake_request(server.port, f"Origin: {good}", f"Origin: {evil}")
        assert (await http_answer(server.port, twice))[0] == 400

    run_with(server, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", list(PATHS))
def test_require_origin_refuses_requests_without_one(servers, path: str) -> None:  # noqa: F811
    server = servers(shards=1, allowed_origins=["https://game.example"], require_origin=True)

    async def body() -> None:
        request = handshake_request(server.port, *PATHS[path])
        assert (await http_answer(server.port, request))[0] == 403
        request = handshake_request(server.port, *PATHS[path], "Origin: https://game.example")
        assert (await http_answer(server.port, request))[0] == 101

    run_with(server, body)


# -- keepalive -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_keepalive_closes_a_silent_peer_with_1011_and_keeps_the_others(servers) -> None:  # noqa: F811
    server = servers(shards=1, ping_interval=0.3, ping_timeout=0.3)
    echo(server)
    recorder = Recorder(server, read_data=False)

    async def answering(reader, writer, stop: asyncio.Event) -> int:
        """A raw client that answers every ping: how many it answered."""
        pings = 0
        while not stop.is_set():
            try:
                opcode, payload = await asyncio.wait_for(read_frame(reader), 0.1)
            except TimeoutError:
                continue
            assert opcode == PING, opcode
            writer.write(build_frame(PONG, payload))
            pings += 1
        return pings

    async def body() -> None:
        websockets_client = await connect(url(server))  # answers pings by itself
        reader, writer = await open_raw_with(server.port)
        stop = asyncio.Event()
        responsive = asyncio.create_task(answering(reader, writer, stop))
        await until(lambda: len(recorder.connected_ids()) == 2)
        silent_reader, silent_writer = await open_raw_with(server.port)
        await until(lambda: len(recorder.connected_ids()) == 3)
        silent_id = recorder.connected_ids()[2]
        opcode, _ = await asyncio.wait_for(read_frame(silent_reader), 3)
        pinged = time.monotonic()
        assert opcode == PING
        opcode, payload = await asyncio.wait_for(read_frame(silent_reader), 3)
        assert (opcode, close_code(payload)) == (CLOSE, 1011)
        assert time.monotonic() - pinged >= 0.2  # the pong had ping_timeout to come
        assert await asyncio.wait_for(silent_reader.read(), 3) == b""  # and TCP is closed
        await until(lambda: ("disconnected", silent_id, False) in recorder.events, timeout=3)
        await asyncio.sleep(1.0)  # several more intervals: the answering peers stay
        stop.set()
        assert await responsive >= 3
        await echoes(websockets_client)
        assert len(recorder.named("disconnected")) == 1
        await websockets_client.close()
        writer.close()
        silent_writer.close()

    run_with(server, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split", [None, 1, 3])
def test_pongs_between_data_frames_in_any_split_keep_a_peer_alive(servers, split) -> None:  # noqa: F811
    server = servers(shards=1, ping_interval=0.3, ping_timeout=0.3)
    echo(server)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        reader, writer = await open_raw_with(server.port)
        received: list[tuple[int, bytes]] = []
        for round_ in range(4):
            # Wait for a ping, then answer it between two messages, cut anywhere.
            while (frame := await asyncio.wait_for(read_frame(reader), 3))[0] != PING:
                received.append(frame)
            stream = (
                build_frame(TEXT, f"before {round_}".encode())
                # A fixed key, none of whose bytes looks like a frame's first byte: a
                # control frame cut right after its header makes the shard's parser resume
                # too early (a known fast-path issue of its own, see test_conformance).
                + build_frame(PONG, frame[1], mask=b"\x01\x02\x03\x04")
                + build_frame(BINARY, bytes([round_]) * 130)  # 16-bit length
            )
            step = split or len(stream)
            for i in range(0, len(stream), step):
                writer.write(stream[i : i + step])
                await writer.drain()
        while len(received) < 8:
            opcode, payload = await asyncio.wait_for(read_frame(reader), 3)
            if opcode != PING:
                received.append((opcode, payload))
        expected = []
        for round_ in range(4):
            expected += [(TEXT, f"before {round_}".encode()), (BINARY, bytes([round_]) * 130)]
        assert received == expected
        assert recorder.named("disconnected") == []  # four intervals, every ping answered
        writer.close()

    run_with(server, body)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("off", [None, 0])
def test_keepalive_off_sends_no_pings(servers, off) -> None:  # noqa: F811
    server = servers(shards=1, ping_interval=off)
    echo(server)

    async def body() -> None:
        reader, writer = await open_raw_with(server.port)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_frame(reader), 1.0)
        writer.write(build_frame(TEXT, b"alive"))
        assert await asyncio.wait_for(read_frame(reader), 5) == (TEXT, b"alive")
        writer.close()

    run_with(server, body)


@pytest.mark.timeout(60)
def test_a_close_handshake_the_peer_ignores_is_cut_after_ping_timeout(servers) -> None:  # noqa: F811
    server = servers(shards=1, ping_interval=0.3, ping_timeout=0.3)
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        reader, writer = await open_raw_with(server.port)
        await until(lambda: recorder.connected_ids())
        peer_id = recorder.connected_ids()[0]
        server.disconnect_peer(peer_id, 4000, "bye")
        opcode, payload = await asyncio.wait_for(read_frame(reader), 3)
        assert (opcode, close_code(payload)) == (CLOSE, 4000)
        started = time.monotonic()  # we never answer the close frame
        try:
            assert await asyncio.wait_for(reader.read(), 3) == b""
        except ConnectionResetError:
            pass  # cut: a reset is as good as an end
        assert time.monotonic() - started < 2
        await until(lambda: ("disconnected", peer_id, False) in recorder.events, timeout=3)
        writer.close()

    run_with(server, body)


# -- slow consumers --------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("code", [1008, 1013])
def test_a_slow_consumer_is_closed_with_the_code(code: int) -> None:
    server = WebSocketServer(shards=1, slow_consumer_close_code=code)
    assert server.set_buffers(64, 1024, 256, 1024) == Error.OK  # 256 KiB out per peer
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)
    chunk = bytes(32 * 1024)

    async def body() -> None:
        bystander = await connect(url(server))
        await until(lambda: recorder.connected_ids())
        echo(server)
        # A client that stops reading: its socket buffers fill, then the shard's.
        reader, writer = await open_raw_with(server.port)
        await until(lambda: len(recorder.connected_ids()) == 2)
        peer = server.get_peer(recorder.connected_ids()[1])
        results = []
        while not results or results[-1] == Error.OK:
            results.append(peer.put_packet(chunk))
            await asyncio.sleep(0.002)  # one packet per tick: only a full buffer stops it
            assert len(results) < 5000, "the outbound limit was never reached"
        assert results[-1] == Error.ERR_OUT_OF_MEMORY and len(results) > 8
        assert peer.put_packet(b"after") == Error.FAILED  # it is being disconnected
        await echoes(bystander)
        # The client reads again (within the grace): everything sent, then the close frame.
        received = 0
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
            if opcode != BINARY:
                break
            received += 1
        assert (opcode, close_code(payload)) == (CLOSE, code)
        assert received == len(results) - 1  # nothing lost without an error
        await until(lambda: ("disconnected", peer.id, False) in recorder.events, timeout=5)
        await echoes(bystander)
        await bystander.close()
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_slow_consumer_that_never_reads_is_cut_off() -> None:
    server = WebSocketServer(shards=1, slow_consumer_close_code=1013)
    assert server.set_buffers(64, 1024, 256, 1024) == Error.OK
    assert server.listen(0) == Error.OK
    recorder = Recorder(server, read_data=False)

    async def body() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(handshake_request(server.port))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await until(lambda: recorder.connected_ids())
        peer = server.get_peer(recorder.connected_ids()[0])
        while peer.put_packet(bytes(32 * 1024)) == Error.OK:
            await asyncio.sleep(0.002)
        started = time.monotonic()
        await until(lambda: recorder.named("disconnected"), timeout=5)
        assert recorder.named("disconnected") == [("disconnected", peer.id, False)]
        assert time.monotonic() - started < 3  # the 1 s grace, then cut
        writer.close()

    try:
        run_with(server, body)
    finally:
        server.stop()


# -- wsfleet serve ---------------------------------------------------------------------------


def test_serve_options_reach_the_server() -> None:
    argv = [
        "serve", "--max-peers", "7", "--max-message-size", "5000", "--handshake-timeout", "2.5",
        "--max-request-bytes", "4096", "--allowed-origins", "https://a.example,https://b.example",
        "--require-origin", "--ping-interval", "0", "--ping-timeout", "3",
        "--slow-consumer-close-code", "1008",
    ]  # fmt: skip
    server = server_from_args(build_parser().parse_args(argv))
    assert (server.max_peers, server.max_message_size, server.handshake_timeout) == (7, 5000, 2.5)
    assert server.max_request_bytes == 4096
    assert server.allowed_origins == ["https://a.example", "https://b.example"]
    assert server.require_origin
    assert (server.ping_interval, server.ping_timeout) == (0, 3)
    assert server.slow_consumer_close_code == 1008
    defaults = server_from_args(build_parser().parse_args(["serve"]))
    assert defaults.max_peers is None and defaults.allowed_origins is None
    assert (defaults.ping_interval, defaults.ping_timeout, defaults.handshake_timeout) == (
        20,
        20,
        5,
    )
    assert defaults.slow_consumer_close_code is None and defaults.max_request_bytes == 8192


@pytest.mark.timeout(60)
def test_serve_enforces_its_limits() -> None:
    port = free_port()
    argv = [
        sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "2", "--quiet",
        "--max-peers", "1", "--allowed-origins", "https://ok.example", "--max-request-bytes",
        "1024", "--max-message-size", "1000", "--handshake-timeout", "1",
        "--ping-interval", "0.3", "--ping-timeout", "0.3",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:

        async def body() -> None:
            ws = await connect_when_up(f"ws://127.0.0.1:{port}", origin="https://ok.example")
            await echoes(ws)
            full = handshake_request(port)
            assert (await http_answer(port, full))[0] == 503
            evil = handshake_request(port, "Origin: https://evil.example")
            assert (await http_answer(port, evil))[0] == 403
            large = handshake_request(port, "X-Pad: " + "p" * 1024)
            assert (await http_answer(port, large))[0] == 431
            await asyncio.sleep(1.0)  # pings come and go: the client answers them
            await echoes(ws)
            await ws.send(bytes(1001))
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1009
            # Its slot is free again.
            for _ in range(100):
                try:
                    ws = await connect(f"ws://127.0.0.1:{port}", open_timeout=2)
                    break
                except InvalidStatus:
                    await asyncio.sleep(0.05)
            await echoes(ws)
            await ws.close()

        asyncio.run(asyncio.wait_for(body(), 40))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_serve_refuses_a_bad_limit() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "serve", "--port", "0", "--max-request-bytes", "10"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "max_request_bytes" in result.stderr
