"""``--shard-handler module:attr``: application code inside every shard, against real
``wsfleet serve`` processes and real clients (handlers in tests/apps/shard_apps.py, whose
answers start with ``PID:INDEX:``)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer

from .opsproc import Served, wsfleet
from .wsserver import Recorder, polling, until

APPS = "tests.apps.shard_apps"


def _handler(name: str) -> tuple[str, str]:
    return ("--shard-handler", f"{APPS}:{name}")


def _origin(answer: str) -> tuple[int, int, str]:
    pid, index, rest = answer.split(":", 2)
    return int(pid), int(index), rest


@pytest.mark.timeout(60)
def test_an_echo_handler_answers_in_every_shard_and_nothing_reaches_the_front(
    tmp_path: Path,
) -> None:
    with Served(tmp_path, 2, *_handler("echo")) as served:

        async def body() -> tuple[set[int], list[str]]:
            clients = [await connect(served.url(), ping_interval=None) for _ in range(16)]
            indexes = set()
            for n, ws in enumerate(clients):
                await ws.send(f"hi{n}")
                pid, index, rest = _origin(await asyncio.wait_for(ws.recv(), 10))
                assert rest == f"hi{n}"
                indexes.add(index)
            await clients[0].send(b"bin")
            binary = await asyncio.wait_for(clients[0].recv(), 10)
            assert isinstance(binary, bytes) and binary.endswith(b":bin")
            # The front's echo would answer each message a second time: nothing more comes.
            extra = []
            for ws in clients:
                try:
                    extra.append(await asyncio.wait_for(ws.recv(), 0.05))
                except TimeoutError:
                    pass
                await ws.close()
            return indexes, extra

        indexes, extra = asyncio.run(body())
        assert indexes == {0, 1}  # 16 connections over 2 shards: both run the handler
        assert extra == []


@pytest.mark.timeout(60)
def test_a_handler_answers_a_compressing_peer_deflated(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--compression", *_handler("echo")) as served:

        async def body() -> tuple[str | None, list[str]]:
            async with connect(served.url(), ping_interval=None) as ws:  # offers deflate
                got = []
                for n in range(20):
                    await ws.send("x" * 500 + str(n))
                    got.append(_origin(await asyncio.wait_for(ws.recv(), 10))[2])
                return ws.response.headers.get("Sec-WebSocket-Extensions"), got

        extensions, got = asyncio.run(body())
        assert extensions is not None and "permessage-deflate" in extensions
        assert got == ["x" * 500 + str(n) for n in range(20)]


@pytest.mark.timeout(60)
def test_a_filter_forwards_some_messages_in_order_and_consumes_the_others(
    tmp_path: Path,
) -> None:
    with Served(tmp_path, 1, *_handler("filtering")) as served:

        async def body() -> list[str]:
            async with connect(served.url(), ping_interval=None) as ws:
                for n in range(200):
                    await ws.send(f"front{n}" if n % 2 else f"shard{n}")
                return [await asyncio.wait_for(ws.recv(), 10) for _ in range(200)]

        got = asyncio.run(body())
        from_front = [text for text in got if text.startswith("front")]
        from_shard = [_origin(text)[2] for text in got if not text.startswith("front")]
        assert from_front == [f"front{n}" for n in range(1, 200, 2)]  # poll() in order
        assert from_shard == [f"shard{n}" for n in range(0, 200, 2)]
        time.sleep(0.3)  # counters are published every 0.1 s
        totals = served.status()["totals"]
        assert totals["messages_in"] == 200 and totals["shard_handler_errors"] == 0


@pytest.mark.timeout(60)
def test_a_handler_fans_out_within_its_groups(tmp_path: Path) -> None:
    with Served(tmp_path, 1, *_handler("rooms")) as served:

        async def body() -> None:
            a, b, c = [await connect(served.url(), ping_interval=None) for _ in range(3)]
            for ws in (a, b):
                await ws.send("join:r")
                assert await asyncio.wait_for(ws.recv(), 10) == "joined:r"
            await a.send("say:r:hello")
            assert await asyncio.wait_for(a.recv(), 10) == "sent:1"
            assert await asyncio.wait_for(b.recv(), 10) == "hello"
            # c is in no room: the first thing it gets is the front's echo of its message.
            await c.send("front-check")
            assert await asyncio.wait_for(c.recv(), 10) == "front-check"
            await b.close()
            deadline = time.monotonic() + 10
            while True:  # b leaves its group once the shard sees its TCP connection end
                await a.send("members:r")
                answer = await asyncio.wait_for(a.recv(), 10)
                assert answer.startswith("members:")
                if answer[8:].isdigit():  # only a itself
                    break
                assert time.monotonic() < deadline, answer
                await asyncio.sleep(0.02)
            await a.send("say:r:alone")
            assert await asyncio.wait_for(a.recv(), 10) == "sent:0"
            await a.close()
            await c.close()

        asyncio.run(body())


@pytest.mark.timeout(60)
def test_an_exception_is_logged_counted_and_the_connection_goes_on(tmp_path: Path) -> None:
    with Served(tmp_path, 1, *_handler("raising")) as served:

        async def body() -> list[str]:
            async with connect(served.url(), ping_interval=None) as ws:
                got = []
                for text in ("a", "boom", "b", "boom", "c"):
                    await ws.send(text)
                for _ in range(3):
                    got.append(_origin(await asyncio.wait_for(ws.recv(), 10))[2])
                return got

        # The message it raised on is dropped: neither the shard nor the front answers it.
        assert asyncio.run(body()) == ["a", "b", "c"]
        time.sleep(0.3)
        assert served.status()["totals"]["shard_handler_errors"] == 2
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(20)
        log = served.proc.stderr.read()
        # The second within 10 s is counted, not logged again.
        assert log.count("tests.apps.shard_apps:raising: on_message raised") == 1, log
        assert "the test handler's boom" in log


@pytest.mark.timeout(90)
def test_the_handler_is_made_again_after_a_reload_and_after_a_restart(tmp_path: Path) -> None:
    with Served(tmp_path, 1, *_handler("echo")) as served:

        async def ask(ws, text: str) -> int:
            await ws.send(text)
            pid, _index, rest = _origin(await asyncio.wait_for(ws.recv(), 10))
            assert rest == text
            return pid

        async def body() -> tuple[int, int, int, int]:
            async with connect(served.url(), ping_interval=None) as ws:
                first = await ask(ws, "before")
                result = await asyncio.to_thread(
                    wsfleet, "reload", "--control", served.control, timeout=60
                )
                assert result.returncode == 0, result.stdout + result.stderr
                reloaded = await ask(ws, "after the reload")  # the same connection
            os.kill(reloaded, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while True:
                rows = (await asyncio.to_thread(served.status))["shards"]
                if rows[0]["state"] == "running" and rows[0]["pid"] not in (first, reloaded):
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.05)
            async with connect(served.url(), ping_interval=None) as ws:
                restarted = await ask(ws, "after the restart")
            return first, reloaded, restarted, rows[0]["pid"]

        first, reloaded, restarted, shard_pid = asyncio.run(body())
        assert first != reloaded  # the successor, a fresh interpreter, imported it again
        assert restarted not in (first, reloaded) and restarted == shard_pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("no_such_module_here:make", "cannot import no_such_module_here"),
        (f"{APPS}:missing", "has no missing"),
        (f"{APPS}:not_a_factory", "not_a_factory is not callable"),
        ("no-colon", "expected module:attr"),
    ],
)
def test_a_bad_handler_is_refused_at_start(spec: str, why: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "serve", "--port", "0", "--shard-handler", spec],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--shard-handler" in result.stderr and why in result.stderr, result.stderr


@pytest.mark.timeout(30)
def test_a_handler_with_the_multiplayer_relay_is_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "serve", "--port", "0", "--gd-mp-api",
         "--shard-handler", f"{APPS}:echo"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot be used with --gd-mp-api" in result.stderr


@pytest.mark.timeout(60)
def test_a_factory_that_raises_keeps_its_shard_from_booting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsfleet", "serve", "--port", "0", "--shards", "1",
         "--shard-handler", f"{APPS}:broken"],
        capture_output=True, text=True, timeout=50, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot make the shard handler {APPS}:broken: its factory raised" in result.stderr
    assert "this factory cannot make its handler" in result.stderr  # its traceback
    assert "shard 0 given up: it cannot boot" in result.stderr


@pytest.mark.timeout(60)
def test_in_the_api_what_the_handler_forwards_reaches_poll_in_order_with_the_peer_events() -> None:
    server = WebSocketServer(shards=2, ping_interval=None, shard_handler=f"{APPS}:filtering")
    recorder = Recorder(server)
    server.connect("data_received", lambda peer_id: recorder.events.append(("data", peer_id)))
    assert server.listen(0) == Error.OK
    try:

        async def body() -> list[str]:
            async with polling(server):
                ws = await connect(f"ws://127.0.0.1:{server.port}", ping_interval=None)
                for n in range(100):
                    await ws.send(f"front{n}" if n % 3 == 0 else f"shard{n}")
                answers = [await asyncio.wait_for(ws.recv(), 10) for n in range(100) if n % 3]
                await ws.close()
                await until(lambda: recorder.named("disconnected"), 10)
                return answers

        answers = asyncio.run(body())
        assert [_origin(a)[2] for a in answers] == [f"shard{n}" for n in range(100) if n % 3]
        (peer_id,) = recorder.connected_ids()
        forwarded = [f"front{n}".encode() for n in range(0, 100, 3)]
        assert recorder.packets[peer_id] == [(p, True) for p in forwarded]
        # The forwarded messages come between the peer's connect and its close, in order.
        names = [e[0] for e in recorder.events]
        assert names == ["connected", *["data"] * 34, "close_request", "disconnected"]
    finally:
        server.stop()


def test_the_api_refuses_a_bad_handler_and_one_with_the_multiplayer_relay() -> None:
    with pytest.raises(ValueError, match="has no missing"):
        WebSocketServer(shards=1, shard_handler=f"{APPS}:missing")
    server = WebSocketServer(shards=1, shard_handler=f"{APPS}:echo")
    assert server.listen(0, gd_mp_api=True) == Error.ERR_INVALID_PARAMETER
    server.shard_handler = "no_such_module_here:x"  # set after construction: listen checks it
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER
