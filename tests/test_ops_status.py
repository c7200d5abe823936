"""``wsfleet status`` and the control socket against real ``wsfleet serve`` processes:
the figures match what the clients did, the socket is private, a stale one is replaced."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer
from wsfleet.ipc import opsock

from .opsproc import Served, status_json, wsfleet

CLIENTS = 300
MESSAGES = 5


async def _clients_send(url: str) -> list:
    conns = []
    for _ in range(CLIENTS):
        conns.append(await connect(url, open_timeout=10, ping_interval=None))
    for i in range(MESSAGES):
        for ws in conns:
            await ws.send(f"m{i}")
        for ws in conns:
            assert await ws.recv() == f"m{i}"
    return conns


@pytest.mark.timeout(120)
def test_status_json_with_4_shards_and_300_clients(tmp_path: Path) -> None:
    with Served(tmp_path, 4) as served:

        async def body() -> dict:
            conns = await _clients_send(served.url())
            doc: dict = {}
            deadline = time.monotonic() + 5
            # The shards publish every 0.1 s: wait for the last figures to land.
            while time.monotonic() < deadline:
                doc = await asyncio.to_thread(status_json, served.control)
                if doc["totals"]["messages_out"] == CLIENTS * MESSAGES:
                    break
                await asyncio.sleep(0.1)
            for ws in conns:
                await ws.close()
            return doc

        doc = asyncio.run(body())
        assert doc["peers"] == CLIENTS
        assert sum(row["peers"] for row in doc["shards"]) == CLIENTS
        assert [row["index"] for row in doc["shards"]] == [0, 1, 2, 3]
        shard_pids = {p.pid for p in served.tree[2:]}  # serve, supervisor, then the shards
        assert {row["pid"] for row in doc["shards"]} == shard_pids
        for row in doc["shards"]:
            assert row["state"] == "running" and row["restarts"] == 0
            assert psutil.Process(row["pid"]).ppid() == doc["supervisor_pid"]
            assert row["rss"] > 0 and row["ring_capacity"] > 0
            assert row["messages_in"] == row["messages_out"] == row["peers"] * MESSAGES
        totals = doc["totals"]
        assert totals["handshakes_accepted"] == CLIENTS
        assert totals["messages_in"] == totals["messages_out"] == CLIENTS * MESSAGES
        assert totals["bytes_out"] == CLIENTS * MESSAGES * 2  # "m0".."m4"
        assert totals["bytes_in"] > totals["bytes_out"]  # handshakes, masks and headers
        assert doc["supervisor_pid"] == served.tree[1].pid
        assert doc["front_pid"] == served.proc.pid and doc["port"] == served.port

        # The clients closed (1000): the peers and the close counter follow.
        deadline = time.monotonic() + 10
        while (doc := served.status())["peers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert doc["peers"] == 0
        assert doc["totals"]["closes_1000"] == CLIENTS

        human = wsfleet("status", "--control", served.control)
        assert human.returncode == 0 and "running" in human.stdout
        watched = wsfleet("status", "--control", served.control, "--watch", "--count", "2")
        assert watched.returncode == 0 and watched.stdout.count("supervisor") == 2
        assert "/s" in watched.stdout  # the second drawing shows rates


@pytest.mark.timeout(60)
def test_refusals_are_counted_by_reason(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--allowed-origins", "https://ok.example") as served:

        def ask(request: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
                sock.sendall(request)
                return sock.recv(4096)

        upgrade = (
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        )
        assert ask((upgrade + "Origin: https://bad.example\r\n\r\n").encode())[9:12] == b"403"
        assert ask(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[9:12] in (b"400", b"426")
        big = upgrade + "X-Big: " + "a" * 9000 + "\r\n\r\n"
        assert ask(big.encode())[9:12] == b"431"
        time.sleep(0.3)
        totals = served.status()["totals"]
        assert totals["refused_403"] == 1 and totals["refused_431"] == 1
        assert totals["refused_400"] == 1 and totals["handshakes_accepted"] == 0


@pytest.mark.timeout(60)
def test_the_socket_is_private_and_another_uid_cannot_connect() -> None:
    if os.getuid() != 0:
        pytest.fail("this test needs root, to connect as nobody with setpriv")
    # Not pytest's tmp_path: its parents are 0700, and nobody must reach the folder.
    tmp_path = Path(tempfile.mkdtemp(prefix="wsfleet-ops-"))
    try:
        _private_socket_checks(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def _private_socket_checks(tmp_path: Path) -> None:
    with Served(tmp_path, 1) as served:
        info = os.lstat(served.control)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
        probe = (
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print('connected')\n"
            "except OSError as e: print(type(e).__name__)\n"
        )
        nobody = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", probe, served.control],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert nobody.stdout.strip() == "PermissionError", (nobody.stdout, nobody.stderr)
        # Even with the folder and the socket opened up by hand, the supervisor checks the
        # caller's uid (SO_PEERCRED) and answers nothing.
        os.chmod(tmp_path, 0o755)
        os.chmod(served.control, 0o666)
        probe_read = (
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(5)\n"
            "s.connect(sys.argv[1])\n"
            'try:\n s.sendall(b\'{"cmd":"status"}\'); s.shutdown(1); print(repr(s.recv(99)))\n'
            "except OSError: print('closed')\n"
        )
        nobody = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             sys.executable, "-c", probe_read, served.control],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert nobody.stdout.strip() in ("b''", "closed"), (nobody.stdout, nobody.stderr)
        assert served.status()["peers"] == 0  # and we still can


@pytest.mark.timeout(60)
def test_a_stale_socket_is_replaced_and_a_live_one_or_a_symlink_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # a killed server's socket: the file stays, nobody listens
    server = WebSocketServer(shards=1, control=str(stale))
    assert server.listen(0) == Error.OK
    try:
        assert opsock.request(str(stale), {"cmd": "status"}, 5)[0]["port"] == server.port
        other = WebSocketServer(shards=1, control=str(stale))
        assert other.listen(0) == Error.ERR_ALREADY_IN_USE  # a live server's socket
        link = tmp_path / "link.sock"
        link.symlink_to(stale)
        third = WebSocketServer(shards=1, control=str(link))
        assert third.listen(0) == Error.ERR_CANT_CREATE  # never followed
        assert stale.exists()
    finally:
        server.stop()
    assert not stale.exists()  # the supervisor removed its socket


def test_a_default_folder_open_to_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "wsfleet"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", "from wsfleet.ipc import opsock; opsock.bind(None, 1)"],
        capture_output=True, text=True, env=env, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "open to others" in result.stderr


def test_no_server_is_exit_status_3(tmp_path: Path) -> None:
    result = wsfleet("status", "--control", str(tmp_path / "none.sock"))
    assert result.returncode == 3 and "no server answers" in result.stderr


@pytest.mark.timeout(60)
def test_the_default_socket_is_found_by_port_and_an_unusable_folder_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    try:
        path = tmp_path / "wsfleet" / f"{server.port}.sock"
        assert stat.S_IMODE(os.stat(tmp_path / "wsfleet").st_mode) == 0o700
        assert opsock.default_path(server.port) == str(path)
        result = subprocess.run(
            [sys.executable, "-m", "wsfleet", "status", "--port", str(server.port), "--json"],
            capture_output=True, text=True, timeout=20, check=False,
            env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        )  # fmt: skip
        assert result.returncode == 0 and f'"port":{server.port}' in result.stdout
    finally:
        server.stop()
    assert not path.exists()
    (tmp_path / "wsfleet").chmod(0o755)  # now open to others: no socket, but a server
    server = WebSocketServer(shards=1)
    assert server.listen(0) == Error.OK
    try:
        assert "no control socket" in caplog.text and "open to others" in caplog.text
        assert not (tmp_path / "wsfleet" / f"{server.port}.sock").exists()
    finally:
        server.stop()
