"""``set_handshake_handler``: the application decides each upgrade before its 101 - at
once or later (``accept_handshake`` / ``refuse_handshake``) within ``handshake_timeout`` -
with real clients against a real server of 2 shards."""

from __future__ import annotations

import asyncio
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

import wsfleet
from wsfleet import Error, WebSocketServer

from .wsserver import Recorder, polling, until


def serve(handler, protocols=(), **kwargs) -> tuple[WebSocketServer, Recorder]:
    server = WebSocketServer(shards=2, **kwargs)
    assert server.set_handshake_handler(handler) == Error.OK
    recorder = Recorder(server)
    assert server.listen(0, protocols) == Error.OK
    return server, recorder


@pytest.mark.timeout(60)
def test_a_bad_token_is_refused_with_its_reason_before_any_client_connected() -> None:
    seen: list[wsfleet.PendingHandshake] = []

    def handler(pending: wsfleet.PendingHandshake) -> wsfleet.Accept | wsfleet.Refuse:
        seen.append(pending)
        if pending.request.query.get("token") == ["good"]:
            return wsfleet.Accept(subprotocol="game", headers=(("X-Room", "7"),))
        return wsfleet.Refuse(401, "bad token\n", (("WWW-Authenticate", "Bearer"),))

    server, recorder = serve(handler, ["chat", "game"])
    url = f"ws://127.0.0.1:{server.port}"
    try:

        async def body() -> None:
            async with polling(server):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"{url}/play?token=bad", subprotocols=["chat"])
                response = refused.value.response
                assert response.status_code == 401 and bytes(response.body) == b"bad token\n"
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert recorder.named("connected") == []  # nothing happened for it
                ws = await connect(f"{url}/play?token=good", subprotocols=["chat", "game"])
                assert ws.subprotocol == "game" and ws.response.headers["X-Room"] == "7"
                await until(lambda: recorder.named("connected"))
                await ws.send("hello")
                await until(lambda: recorder.packets)
                await ws.close()

        asyncio.run(body())
        [(_, peer_id, protocol)] = recorder.named("connected")
        assert protocol == "game" and peer_id == seen[1].token  # the token is its id
        assert [p.request.path for p in seen] == ["/play", "/play"]
        assert seen[1].offered == ["chat", "game"] and seen[1].subprotocol == "chat"
        assert seen[0].address == "127.0.0.1"
        assert recorder.packets[peer_id] == [(b"hello", True)]
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_verdict_given_later_works_and_a_late_one_finds_the_connection_dropped() -> None:
    waiting: list[int] = []
    server, recorder = serve(lambda pending: waiting.append(pending.token), handshake_timeout=1.0)
    url = f"ws://127.0.0.1:{server.port}"
    try:

        async def body() -> tuple[Error, float]:
            async with polling(server):

                async def accept_soon() -> None:
                    await until(lambda: waiting)
                    await asyncio.sleep(0.3)
                    assert server.accept_handshake(waiting[0]) == Error.OK

                task = asyncio.create_task(accept_soon())
                ws = await connect(url, open_timeout=5)
                await task
                await until(lambda: recorder.named("connected"))
                await ws.close()
                # Too late: the shard drops the connection at its deadline.
                started = time.monotonic()
                with pytest.raises((OSError, InvalidMessage, InvalidStatus)) as late:
                    await connect(url, open_timeout=5)
                dropped_after = time.monotonic() - started
                await asyncio.sleep(0.2)  # the shard's report of the drop reaches poll()
                late_answer = server.accept_handshake(waiting[1])
                assert not isinstance(late.value, InvalidStatus)
                return late_answer, dropped_after

        late_answer, dropped_after = asyncio.run(body())
        assert late_answer == Error.ERR_DOES_NOT_EXIST
        assert 0.9 < dropped_after < 3
        assert len(recorder.named("connected")) == 1
        time.sleep(0.3)
        assert server.get_stats()["totals"]["refused_timeout"] == 1
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_a_handler_that_raises_refuses_with_500_and_the_server_goes_on(caplog) -> None:
    def handler(pending: wsfleet.PendingHandshake) -> wsfleet.Accept:
        if pending.request.path == "/boom":
            raise RuntimeError("the token service is down")
        return wsfleet.Accept()

    server, recorder = serve(handler)
    url = f"ws://127.0.0.1:{server.port}"
    try:

        async def body() -> None:
            async with polling(server):
                with pytest.raises(InvalidStatus) as refused:
                    await connect(f"{url}/boom")
                assert refused.value.response.status_code == 500
                async with connect(f"{url}/fine") as ws:
                    await ws.send("ok")
                    await until(lambda: recorder.packets)

        asyncio.run(body())
        assert "the handshake handler raised" in caplog.text
    finally:
        server.stop()


def test_bad_verdicts_are_refused_where_they_are_made() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        wsfleet.Refuse(200)
    with pytest.raises(ValueError, match="not a valid response header"):
        wsfleet.Accept(headers=(("X-Evil", "a\r\nSet-Cookie: x=1"),))
    with pytest.raises(ValueError, match="not a subprotocol token"):
        wsfleet.Accept(subprotocol="two words")
    server = WebSocketServer(shards=1)
    try:
        assert server.listen(0) == Error.OK
        assert server.set_handshake_handler(lambda p: None) == Error.ERR_ALREADY_IN_USE
        assert server.accept_handshake(12345) == Error.ERR_DOES_NOT_EXIST
    finally:
        server.stop()
