"""`wsfleet serve`: the echo server from the command line, and how it stops."""

from __future__ import annotations

import asyncio
import signal
import struct
import subprocess
import sys

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import connect_when_up, free_port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_echoes_and_stops_on_a_signal_with_close_1001(signum: int) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "2"]
    proc = subprocess.Popen([*argv, "--protocols", "chat,other"], stderr=subprocess.PIPE, text=True)
    try:

        async def body() -> None:
            ws = await connect_when_up(f"ws://127.0.0.1:{port}", subprotocols=["other"])
            assert ws.subprotocol == "other"
            await ws.send("text")
            assert await ws.recv() == "text"
            await ws.send(b"\x00binary")
            assert await ws.recv() == b"\x00binary"
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            proc.send_signal(signum)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
            _, alive = await asyncio.to_thread(psutil.wait_procs, tree, 10)
            assert alive == []

        asyncio.run(asyncio.wait_for(body(), 40))
        assert proc.wait(10) == 0
        log = proc.stderr.read()
        assert "connected from 127.0.0.1" in log and "stopped in" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_serve_reports_a_port_in_use() -> None:
    port = free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("0.0.0.0", port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "1"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 1
    assert "ERR_ALREADY_IN_USE" in result.stderr


@pytest.mark.timeout(60)
def test_serve_gd_mp_api_is_a_multiplayer_relay() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--gd-mp-api"]
    proc = subprocess.Popen([*argv, "--shards", "2", "--quiet"])
    header = struct.Struct("<Bii")
    try:

        async def body() -> None:
            first = await connect_when_up(f"ws://127.0.0.1:{port}")
            second = await connect(f"ws://127.0.0.1:{port}")
            ids = []
            for ws in (first, second):
                kind, sender, to = header.unpack_from(frame := await ws.recv())
                assert (kind, sender, to) == (3, 1, 0)  # SYS_ID from the server
                ids.append(struct.unpack_from("<i", frame, 9)[0])
            relayed = header.pack(0, ids[0], ids[1]) + b"\x04raw"
            await first.send(relayed)
            while (frame := await second.recv())[0] != 0:
                pass  # system messages first
            assert frame == relayed  # byte for byte, from kept
            await first.send(header.pack(0, ids[0], 1) + b"\x04to the server")
            await first.close()
            await second.close()

        asyncio.run(asyncio.wait_for(body(), 40))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
