"""`wsfleet serve`'s logs: time, level and process on every line, JSON, the access log,
refusals and abnormal closes with their reason; process titles; the open-files limit.

Real processes on loopback; every process a test starts is killed by pid at the end.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import psutil
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from .serveproc import ServeProcess

TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(front|supervisor|shard \d+): "
)


@pytest.fixture
def serve() -> Iterator[type[ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*options: str, **kwargs) -> ServeProcess:
        server = ServeProcess(*options, **kwargs)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.end()


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def upgrade(port: int, extra: str = "") -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


@pytest.mark.timeout(60)
def test_every_line_names_time_level_and_process_and_refusals_show_at_debug(serve) -> None:
    server = serve(
        "--shards", "2", "--log-level", "debug", "--max-peers", "1",
        "--allowed-origins", "https://game.example", "--max-request-bytes", "512",
        "--handshake-timeout", "0.5", "--max-message-size", "1024",
    )  # fmt: skip
    server.wait_up()
    with connect(f"ws://127.0.0.1:{server.port}") as client:
        client.send(b"hello")
        assert client.recv(5) == b"hello"
        assert raw_request(server.port, upgrade(server.port)).startswith(b"HTTP/1.1 503")
        client.send(b"x" * 2000)  # over --max-message-size: closed with 1009
        with pytest.raises(ConnectionClosed):
            client.recv(5)
    server.wait_for(r"DEBUG shard \d: peer \d+ from 127\.0\.0\.1:\d+ failed: close 1009")
    server.wait_for(r"DEBUG shard \d: peer \d+ .* left: code 1006 \(we sent 1009\).*abnormal")
    bad_origin = upgrade(server.port, "Origin: https://evil.example\r\n")
    time.sleep(0.5)  # the slot is free (a normal departure: no line without the access log)
    assert raw_request(server.port, bad_origin).startswith(b"HTTP/1.1 403")
    big = upgrade(server.port, "X-Pad: " + "x" * 600 + "\r\n")
    assert raw_request(server.port, big).startswith(b"HTTP/1.1 431")
    no_key = upgrade(server.port).replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
    assert raw_request(server.port, no_key).startswith(b"HTTP/1.1 400")
    assert raw_request(server.port, b"NOT HTTP AT ALL\r\n\r\n") == b""  # no answer at all
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.settimeout(5)
        assert idle.recv(10) == b""  # dropped at the handshake timeout
    server.wait_for(r"handshake refused: HTTP 503 from 127\.0\.0\.1:\d+")
    server.wait_for(r"handshake refused: HTTP 403 from 127\.0\.0\.1")
    server.wait_for(r"handshake refused: HTTP 431 from 127\.0\.0\.1")
    server.wait_for(r"handshake refused: HTTP 400 from 127\.0\.0\.1")
    server.wait_for(r"handshake refused: HTTP none from 127\.0\.0\.1")
    server.wait_for(r"handshake timeout from 127\.0\.0\.1")
    server.wait_for(r"DEBUG supervisor: shard 1 started")
    server.proc.terminate()
    assert server.proc.wait(20) == 0
    time.sleep(0.2)
    lines = [line for line in server.lines if line]
    assert lines
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert bad == []
    processes = {TEXT_LINE.match(line).group(2) for line in lines}
    assert {"front", "supervisor", "shard 0", "shard 1"} <= processes or {
        "front",
        "supervisor",
    } <= processes


@pytest.mark.timeout(60)
def test_json_lines_and_the_access_log(serve) -> None:
    server = serve("--shards", "1", "--log-format", "json", "--access-log", "--protocols", "chat")
    server.wait_up()
    with connect(f"ws://127.0.0.1:{server.port}", subprotocols=["chat"]) as client:
        client.send(b"x" * 10)
        assert client.recv(5) == b"x" * 10
    server.wait_for(r"left: code 1000")
    # An abnormal departure: the TCP connection cut without a close frame.
    with connect(f"ws://127.0.0.1:{server.port}", subprotocols=["chat"]) as cut:
        cut.socket.shutdown(socket.SHUT_RDWR)
    server.wait_for(r"left: code 1006.*abnormal")
    server.proc.terminate()
    assert server.proc.wait(20) == 0
    time.sleep(0.2)
    entries = [json.loads(line) for line in server.lines if line]
    for entry in entries:
        assert set(entry) >= {"time", "level", "process", "logger", "message"}
    connects = [e for e in entries if "connected from 127.0.0.1" in e["message"]]
    assert connects and connects[0]["process"] == "shard 0"
    assert connects[0]["logger"] == "wsfleet.access"
    assert "subprotocol chat" in connects[0]["message"]
    assert any(e["process"] == "front" and e["level"] == "info" for e in entries)


@pytest.mark.timeout(60)
def test_no_connection_lines_by_default(serve) -> None:
    server = serve("--shards", "1", "--max-peers", "1")
    server.wait_up()
    with connect(f"ws://127.0.0.1:{server.port}"):
        assert raw_request(server.port, upgrade(server.port)).startswith(b"HTTP/1.1 503")
    time.sleep(0.5)
    server.proc.terminate()
    assert server.proc.wait(20) == 0
    time.sleep(0.2)
    text = server.log()
    assert "connected from" not in text and "refused" not in text and "left:" not in text
    assert "open files limit" in text


@pytest.mark.timeout(60)
def test_process_titles_name_role_shard_and_port(serve) -> None:
    server = serve("--shards", "3")
    server.wait_up()

    def title(process: psutil.Process) -> str:  # what ps shows (setproctitle pads it)
        return " ".join(process.cmdline()).strip()

    deadline = time.monotonic() + 10  # each process titles itself once it knows the port
    while True:
        front, supervisor, *shards = server.record_tree()
        if len(shards) == 3 and all(title(p).startswith("wsfleet ") for p in server.tree):
            break
        assert time.monotonic() < deadline, [title(p) for p in server.tree]
        time.sleep(0.05)

    assert title(front) == f"wsfleet front :{server.port}"
    assert title(supervisor) == f"wsfleet supervisor :{server.port}"
    titles = sorted(title(shard) for shard in shards)
    assert titles == [f"wsfleet shard {i}/3 :{server.port}" for i in range(3)]


@pytest.mark.timeout(60)
def test_the_open_files_limit_is_raised_to_the_hard_limit(serve) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, hard, 512)

    def lower() -> None:  # in the child, before it runs wsfleet
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    server = serve("--shards", "1", preexec_fn=lower)
    server.wait_up()
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    server.wait_for(rf"open files limit {expected} \(was {low}\): about \d+ connections")
    (shard,) = server.wait_shards(1)
    assert shard.rlimit(psutil.RLIMIT_NOFILE)[0] == expected
