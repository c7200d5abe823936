"""uvloop sets TCP_NODELAY on the connections it accepts, which the shard relies on.

Godot's server disables Nagle on every peer; the shard's `PeerConnection`
does not set the option itself (it would build a socket object per
connection to do so), because uvloop, the shard's loop, already has.  This
test holds uvloop to that on real loopback connections, IPv4 and IPv6.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

pytestmark = pytest.mark.timeout(30)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


async def _accepted_nodelay(host: str) -> int:
    """TCP_NODELAY of the server side of one connection, as connection_made sees it."""
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, host, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_uvloop_accepts_with_nodelay(host: str) -> None:
    if host == "::1" and not _has_ipv6_loopback():
        pytest.fail("no IPv6 loopback here: the IPv6 case cannot be checked")
    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(_accepted_nodelay(host)) != 0
    finally:
        loop.close()
