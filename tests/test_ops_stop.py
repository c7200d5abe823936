"""``wsfleet stop`` and ``wsfleet drain`` against real servers: an orderly stop within the
timeout (1001, exit 0), a library application that ignores ``stop_requested`` (reported,
non-zero), and draining (503 for new upgrades, the old peers still served)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from wsfleet import Error, WebSocketServer

from .conftest import free_port
from .opsproc import Served, wsfleet


@pytest.mark.timeout(60)
def test_stop_delivers_closes_with_1001_and_serve_exits_0(tmp_path: Path) -> None:
    with Served(tmp_path, 2) as served:

        async def body() -> tuple[float, subprocess.CompletedProcess, int | None]:
            ws = await connect(served.url(), ping_interval=None)
            await ws.send("before")
            assert await ws.recv() == "before"
            started = time.monotonic()
            result = await asyncio.to_thread(
                wsfleet, "stop", "--control", served.control, "--timeout", "10"
            )
            took = time.monotonic() - started
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed:
                pass
            return took, result, ws.close_code

        took, result, close_code = asyncio.run(body())
        assert result.returncode == 0, result.stderr
        assert took < 10
        assert close_code == 1001
        assert served.proc.wait(10) == 0
        assert not Path(served.control).exists()


@pytest.mark.timeout(60)
def test_a_library_application_gets_stop_requested(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    path = str(tmp_path / "lib.sock")
    server = WebSocketServer(shards=1, control=path)
    asked: list[bool] = []
    server.connect("stop_requested", lambda: asked.append(True))
    assert server.listen(0) == Error.OK
    try:
        # The application does not stop: the command says so after its timeout.
        results: list[subprocess.CompletedProcess] = []
        command = threading.Thread(
            target=lambda: results.append(wsfleet("stop", "--control", path, "--timeout", "1.5"))
        )
        command.start()
        while command.is_alive():
            server.poll(0.05)
        assert asked == [True]
        assert results[0].returncode == 1 and "stop: not done within" in results[0].stderr
        # Now it does: the stop is clean.
        command = threading.Thread(
            target=lambda: results.append(wsfleet("stop", "--control", path, "--timeout", "10"))
        )
        command.start()
        deadline = time.monotonic() + 10
        while len(asked) < 2 and time.monotonic() < deadline:
            server.poll(0.05)
        server.stop()
        command.join(15)
        assert results[1].returncode == 0, results[1].stderr
    finally:
        server.stop()


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(60)
def test_drain_refuses_new_upgrades_and_keeps_serving_the_old(tmp_path: Path) -> None:
    metrics_port = free_port()
    with Served(tmp_path, 2, "--metrics", f"127.0.0.1:{metrics_port}") as served:

        async def body() -> None:
            old = [await connect(served.url(), ping_interval=None) for _ in range(4)]
            drained = await asyncio.to_thread(wsfleet, "drain", "--control", served.control)
            assert drained.returncode == 0 and "draining" in drained.stdout
            assert await asyncio.to_thread(_healthz, metrics_port) == (503, "draining\n")
            for _ in range(4):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(served.url(), ping_interval=None, open_timeout=5)
                assert refused.value.response.status_code == 503
            for i, ws in enumerate(old):  # the old peers are still served
                await ws.send(f"still {i}")
                assert await ws.recv() == f"still {i}"
            await asyncio.sleep(0.3)
            doc = served.status()
            assert doc["draining"] is True and doc["peers"] == 4
            assert doc["totals"]["refused_503"] == 4
            undrained = await asyncio.to_thread(
                wsfleet, "drain", "--off", "--control", served.control
            )
            assert undrained.returncode == 0
            assert await asyncio.to_thread(_healthz, metrics_port) == (200, "ok\n")
            new = await connect(served.url(), ping_interval=None)
            await new.send("new")
            assert await new.recv() == "new"
            for ws in [*old, new]:
                await ws.close()

        asyncio.run(body())


def test_serve_help_names_the_ops_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "--help"], capture_output=True, text=True, timeout=20
    )
    for command in ("status", "stop", "drain"):
        assert command in result.stdout


@pytest.mark.timeout(60)
def test_get_stats_in_process_matches_what_the_clients_did(tmp_path: Path) -> None:
    from .wsserver import echo, run_with, until

    server = WebSocketServer(shards=2, control=False)
    echo(server)
    assert server.get_stats() == {}
    assert server.listen(0) == Error.OK
    try:

        async def body() -> dict:
            conns = [
                await connect(f"ws://127.0.0.1:{server.port}", ping_interval=None) for _ in range(6)
            ]
            for ws in conns:
                for _ in range(3):
                    await ws.send(b"x" * 10)
                    assert await ws.recv() == b"x" * 10
            await until(lambda: server.get_stats()["totals"]["messages_out"] == 18, 5)
            stats = server.get_stats()
            for ws in conns:
                await ws.close()
            return stats

        stats = run_with(server, body)
        assert stats["peers"] == 6 and stats["totals"]["messages_in"] == 18
        assert stats["totals"]["bytes_out"] == 180
        assert {row["pid"] for row in stats["shards"]} == {
            s["pid"] for s in server.get_shard_status()
        }
        assert all(row["state"] == "running" for row in stats["shards"])
    finally:
        server.stop()
