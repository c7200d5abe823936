"""What listen() checks before any process starts: TLS files, bind_ip; and where it listens."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import psutil
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer
from wsfleet.binding import Address, bind, format_url
from wsfleet.channel import OutboundBudget, PeerLimits
from wsfleet.fleet import Fleet, FleetListener
from wsfleet.ipc.config import FleetConfig, Limits

from .wsserver import Recorder, run_with, until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def servers():
    started: list[WebSocketServer] = []

    def make(**attributes) -> WebSocketServer:
        server = WebSocketServer(shards=attributes.pop("shards", 2))
        for name, value in attributes.items():
            setattr(server, name, value)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def echo(server: WebSocketServer) -> None:
    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        packet = peer.get_packet()
        peer.set_write_mode(peer.WRITE_MODE_TEXT if peer.was_string_packet() else 1)
        assert peer.put_packet(packet) == Error.OK

    server.connect("data_received", on_data)


# -- TLS ---------------------------------------------------------------------------------


class Pems:
    """A certificate chain from a root through an intermediate, and spare bad parts."""

    def __init__(self) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        leaf = self.intermediate.issue_cert("127.0.0.1", "localhost")
        self.key = leaf.private_key_pem.bytes().decode()
        self.leaf = leaf.cert_chain_pems[0].bytes().decode()
        self.chain = self.intermediate.cert_pem.bytes().decode()
        self.other_key = trustme.CA().issue_cert("x").private_key_pem.bytes().decode()
        private = serialization.load_pem_private_key(self.key.encode(), None)
        self.encrypted_key = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ).decode()


@pytest.fixture(scope="module")
def pems() -> Pems:
    return Pems()


BROKEN_CERT = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
BROKEN_KEY = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    "case, named",
    [
        ("bad certificate", "ssl_certificate"),
        ("bad key", "private_key"),
        ("bad ca_chain", "ca_chain"),
        ("ca_chain that is a key", "ca_chain"),
        ("mismatched key", "does not belong"),
        ("encrypted key", "encrypted"),
        ("missing file", "cannot read"),
        ("key without certificate", "both"),
    ],
)
def test_a_bad_tls_part_fails_listen_before_any_process_starts(
    servers, pems, tmp_path, caplog, case, named
) -> None:
    cert, key, chain = pems.leaf, pems.key, pems.chain
    if case == "bad certificate":
        cert = BROKEN_CERT
    elif case == "bad key":
        key = BROKEN_KEY
    elif case == "bad ca_chain":
        chain = BROKEN_CERT
    elif case == "ca_chain that is a key":
        chain = pems.other_key
    elif case == "mismatched key":
        key = pems.other_key
    elif case == "encrypted key":
        key = pems.encrypted_key
    elif case == "missing file":
        cert = str(tmp_path / "no-such-cert.pem")
    elif case == "key without certificate":
        cert, chain = None, None
    server = servers(ssl_certificate=cert, private_key=key, ca_chain=chain)
    before = children()
    with caplog.at_level(logging.ERROR, logger="wsfleet"):
        assert server.listen(0) == Error.ERR_CANT_CREATE
    assert not server.is_listening()
    assert server.get_shard_status() == []
    assert children() == before  # no supervisor, no shard: nothing to crash-loop
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, [record.getMessage() for record in errors]
    assert named in errors[0].getMessage()
    assert "BEGIN PRIVATE KEY" not in errors[0].getMessage()


def test_a_good_chain_from_files_serves_wss_on_every_shard(servers, pems, tmp_path) -> None:
    """The check in listen() and the shards load the same text: every shard boots."""
    for name, text in (("cert.pem", pems.leaf), ("key.pem", pems.key), ("chain.pem", pems.chain)):
        (tmp_path / name).write_text(text)
    server = servers(
        shards=2,
        ssl_certificate=str(tmp_path / "cert.pem"),
        private_key=Path(tmp_path / "key.pem"),
        ca_chain=str(tmp_path / "chain.pem"),
    )
    assert server.listen(0) == Error.OK
    echo(server)
    failed: list = []
    server.connect("shard_failed", lambda index, reason: failed.append((index, reason)))
    client_context = ssl.create_default_context()
    pems.root.configure_trust(client_context)  # only the root: the chain must come along

    async def body() -> None:
        await until(lambda: all(s["state"] == "running" for s in server.get_shard_status()))
        sockets = [
            await connect(f"wss://127.0.0.1:{server.port}/", ssl=client_context) for _ in range(8)
        ]
        for i, ws in enumerate(sockets):
            await ws.send(f"chained {i}")
            assert await ws.recv() == f"chained {i}"
        for ws in sockets:
            await ws.close()

    run_with(server, body)
    assert failed == []
    assert all(status["state"] == "running" for status in server.get_shard_status())


# -- bind_ip -----------------------------------------------------------------------------


def localhost_addresses() -> list[str]:
    """What ``localhost`` resolves to here (from /etc/hosts: no query leaves the machine)."""
    infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    found: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        if sockaddr[0] not in found:
            found.append(sockaddr[0])
    return found


def test_bind_ip_localhost_serves_on_every_address_it_resolves_to(servers) -> None:
    expected = localhost_addresses()
    assert "127.0.0.1" in expected
    server = servers(shards=2, bind_ip="localhost")
    assert server.listen(0) == Error.OK
    assert server.bind_ip == "localhost"
    bound = server.get_bound_addresses()
    assert sorted(bound) == sorted((host, server.port) for host in expected)
    recorder = Recorder(server, read_data=False)
    echo(server)

    async def body() -> None:
        for host in expected:
            async with connect(format_url("ws", host, server.port, "/")) as ws:
                await ws.send(host)
                assert await ws.recv() == host
        await until(lambda: len(recorder.named("disconnected")) == len(expected))

    run_with(server, body)
    assert len(recorder.connected_ids()) == len(expected)
    server.stop()
    assert server.get_bound_addresses() == []


def test_bind_ip_star_and_an_address_report_what_is_bound(servers) -> None:
    star = servers(shards=1)
    assert star.listen(0) == Error.OK
    assert star.get_bound_addresses() in ([("::", star.port)], [("0.0.0.0", star.port)])
    one = servers(shards=1, bind_ip="127.0.0.1")
    assert one.listen(0) == Error.OK
    assert one.get_bound_addresses() == [("127.0.0.1", one.port)]


def test_an_unresolvable_name_is_err_cant_resolve_in_one_line(servers, caplog) -> None:
    # A label over 63 bytes: refused by the resolver without any query leaving the machine.
    name = "x" * 64 + ".example"
    server = servers(shards=1, bind_ip=name)
    before = children()
    with caplog.at_level(logging.ERROR, logger="wsfleet"):
        assert server.listen(0) == Error.ERR_CANT_RESOLVE
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and name in errors[0] and "resolve" in errors[0], errors
    assert not server.is_listening()
    assert children() == before


@pytest.mark.parametrize("value", ["not an address", "", "host:9080", "bad/name", "-x"])
def test_bind_ip_that_cannot_be_a_host_is_a_value_error(value) -> None:
    server = WebSocketServer(shards=1)
    with pytest.raises(ValueError):
        server.bind_ip = value
    assert server.bind_ip == "*"
    server.bind_ip = "::1"
    server.bind_ip = "game-server.example"


def test_format_url_brackets_ipv6() -> None:
    assert format_url("ws", "::1", 9080) == "ws://[::1]:9080"
    assert format_url("wss", "::", 443, "/x") == "wss://[::]:443/x"
    assert format_url("ws", "[::1]", 1) == "ws://[::1]:1"
    assert format_url("ws", "127.0.0.1", 9080) == "ws://127.0.0.1:9080"
    assert format_url("ws", "localhost", 80, "/") == "ws://localhost:80/"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_every_shard_serves_every_address_of_a_name() -> None:
    """Several addresses (as a name with several gives) on two shards: each serves them all.

    Driven through the fleet directly: ``localhost`` here may resolve to
    127.0.0.1 alone, and no other name resolves without a DNS query.  Two
    IPv4 loopback addresses, and ::1 where the machine has it.
    """
    hosts = ["127.0.0.1", "127.0.0.2"] + (["::1"] if _ipv6_loopback() else [])
    addresses = [
        Address(socket.AF_INET6, host, True) if ":" in host else Address(socket.AF_INET, host)
        for host in hosts
    ]
    port, sockets = bind(addresses, 0, 2)
    assert [len(socks) for socks in sockets] == [len(hosts)] * 2
    connected: list[tuple[int, str]] = []  # (shard, peer address) of every peer
    listener = FleetListener(
        peer_connected=lambda channel, ip, _p, _s, _h: connected.append((channel.link.index, ip)),
        peer_left=lambda channel, clean: None,
        close_requested=lambda peer_id, code, reason: None,
        shard_failed=lambda index, reason: None,
    )
    limits = Limits(5.0, 0, 65536, 8192, None, False, None, None)
    fleet = Fleet(2, listener, [], PeerLimits(64, 65536, 64, 65536, None), OutboundBudget(1 << 30))
    try:
        fleet.start(sockets, FleetConfig((), limits, None, False, 1 << 16))
    finally:
        for socks in sockets:
            for sock in socks:
                sock.close()

    async def body() -> None:
        clients = []
        for _ in range(12):  # the kernel spreads them over both shards' sockets
            for host in hosts:
                # From the same address, so that the peer's address tells which one it used.
                url = format_url("ws", host, port, "/")
                clients.append(await connect(url, local_addr=(host, 0)))
        while len(connected) < len(clients):
            fleet.poll(0.01)
            await asyncio.sleep(0)
        for ws in clients:
            await ws.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 30))
        assert set(connected) == {(shard, host) for shard in (0, 1) for host in hosts}
    finally:
        fleet.stop()
