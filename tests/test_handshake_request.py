"""What the application sees of a peer's upgrade request (``get_peer(id).get_request()``):
path, query, headers, cookies, over both handshake paths of the shard (the fast one and
websockets'), and the client's address behind a trusted proxy (``forwarded_allow_ips``)."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect

from wsfleet import WebSocketServer
from wsfleet.request import ForwardedPolicy, HandshakeRequest

from .wsserver import Recorder, run_with, until


def _one_peer(server: WebSocketServer, request: bytes | None = None, **connect_kwargs) -> int:
    """Connect one client (``request``: raw bytes instead of a websockets client); its id."""
    recorder = Recorder(server)
    clients = []

    async def body() -> int:
        if request is None:
            target = connect_kwargs.pop("target", "/")
            client = await connect(f"ws://127.0.0.1:{server.port}{target}", **connect_kwargs)
            clients.append(client)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        await until(lambda: recorder.named("connected"))
        return recorder.named("connected")[0][1]

    return run_with(server, body)


@pytest.mark.timeout(30)
def test_path_query_headers_and_cookies_reach_the_application(servers) -> None:
    server = servers(2)
    peer_id = _one_peer(
        server,
        target="/game/room%201?token=abc&x=1&x=2&empty=",
        additional_headers=[
            ("X-Trace", "one"),
            ("x-trace", "two"),
            ("Cookie", "session=s3cr3t; theme=dark"),
            ("Cookie", "lang=fr"),
        ],
        user_agent_header="pytest-client/1",
    )
    request = server.get_peer(peer_id).get_request()
    assert (request.method, request.target) == ("GET", "/game/room%201?token=abc&x=1&x=2&empty=")
    assert request.path == "/game/room 1"
    assert request.query == {"token": ["abc"], "x": ["1", "2"], "empty": [""]}
    assert request.headers["user-agent"] == "pytest-client/1"
    assert request.headers.get_all("X-TRACE") == ["one", "two"]  # repeated: both kept
    assert request.headers["Host"] == f"127.0.0.1:{server.port}"
    assert request.cookies == {"session": "s3cr3t", "theme": "dark", "lang": "fr"}


@pytest.mark.timeout(30)
def test_a_request_judged_by_websockets_reaches_the_application_too(servers) -> None:
    """A request the fast path leaves to websockets (a repeated header) is seen the same."""
    server = servers(1)
    head = (
        f"GET /slow?a=b HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nX-Twice: 1\r\nX-Twice: 2\r\n\r\n"
    ).encode()
    peer_id = _one_peer(server, request=head)
    request = server.get_peer(peer_id).get_request()
    assert request.path == "/slow" and request.query == {"a": ["b"]}
    assert request.headers.get_all("x-twice") == ["1", "2"]
    assert request.raw == head[:-4]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("allowed", "headers", "client"),
    [
        (None, [("X-Forwarded-For", "203.0.113.7")], "127.0.0.1"),  # never by default
        ("10.0.0.0/8", [("X-Forwarded-For", "203.0.113.7")], "127.0.0.1"),  # not our proxy
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.7, 198.51.100.2")], "198.51.100.2"),
        (
            "127.0.0.0/8,198.51.100.2",
            [("X-Forwarded-For", "203.0.113.7, 198.51.100.2")],
            "203.0.113.7",
        ),  # fmt: skip
        ("*", [("Forwarded", 'for="[2001:db8::1]:4711";proto=https')], "2001:db8::1"),
        (
            "127.0.0.1",
            [("Forwarded", "for=192.0.2.60;proto=http, for=198.51.100.17")],
            "198.51.100.17",
        ),  # fmt: skip
        ("127.0.0.1", [], "127.0.0.1"),  # a trusted proxy that forwarded nothing
    ],
)
def test_the_client_address_behind_a_trusted_proxy(servers, allowed, headers, client) -> None:
    server = servers(1, forwarded_allow_ips=allowed)
    peer_id = _one_peer(server, additional_headers=headers)
    peer = server.get_peer(peer_id)
    assert server.get_peer_address(peer_id) == client == peer.get_connected_host()
    assert peer.get_proxy_address() == ("127.0.0.1" if client != "127.0.0.1" else "")


def test_forwarded_allow_ips_are_checked_when_the_server_is_made() -> None:
    with pytest.raises(ValueError, match="not an address: 'proxy.example'"):
        WebSocketServer(1, forwarded_allow_ips=["proxy.example"])
    assert not ForwardedPolicy([])
    assert ForwardedPolicy(["::1"]).trusts("::1") and not ForwardedPolicy(["::1"]).trusts("x")


def test_a_request_without_headers_parses_to_empty_fields() -> None:
    request = HandshakeRequest(b"GET / HTTP/1.1")
    assert (request.path, request.query, list(request.headers), request.cookies) == (
        "/",
        {},
        [],
        {},
    )
    broken = HandshakeRequest(b"GET /?%zz HTTP/1.1\r\nCookie: =;;")
    assert broken.cookies == {} and broken.query == {"%zz": [""]}
