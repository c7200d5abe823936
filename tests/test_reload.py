"""``wsfleet reload`` against real ``wsfleet serve`` processes: every shard process replaced
under load with no connection dropped and no message lost or reordered; a shard killed
during the reload loses only its own peers; protocol state (half a frame, a fragmented
message, half an upgrade request) crosses; refusals say why and change nothing."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trustme
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .opsproc import Served, wsfleet
from .rawclient import OP_BINARY, OP_TEXT, RawClient, client_frame
from .wsframes import handshake_request

RATE_INTERVAL = 0.1  # each client sends one message every 0.1 s


@dataclass
class SeqClient:
    """One connection sending "index:seq" at a steady rate and checking the echoes in order."""

    index: int
    ws: ClientConnection
    sent: int = 0
    received: int = 0
    errors: list[str] = field(default_factory=list)
    closed: str | None = None  # why the connection ended, if it did

    async def send_loop(self, until: asyncio.Event) -> None:
        try:
            while not until.is_set():
                await self.ws.send(f"{self.index}:{self.sent}")
                self.sent += 1
                await asyncio.sleep(RATE_INTERVAL)
        except ConnectionClosed as exc:
            self.closed = f"send: {exc}"

    async def recv_loop(self) -> None:
        try:
            async for message in self.ws:
                expected = f"{self.index}:{self.received}"
                if message != expected:
                    self.errors.append(f"got {message!r}, expected {expected!r}")
                self.received += 1
        except ConnectionClosed as exc:
            self.closed = f"recv: {exc}"
        if self.closed is None:
            self.closed = "closed"


async def _connect_all(url: str, count: int) -> list[SeqClient]:
    clients = []
    for i in range(count):
        ws = await connect(url, open_timeout=20, ping_interval=None, close_timeout=2)
        clients.append(SeqClient(i, ws))
    return clients


def _shard_of_clients(served: Served, clients: list[SeqClient]) -> dict[int, int]:
    """Client index -> the pid of the shard process serving it (by the TCP connection)."""
    by_port: dict[int, int] = {}
    for row in served.status()["shards"]:
        for conn in psutil.Process(row["pid"]).net_connections(kind="tcp"):
            if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                by_port[conn.raddr.port] = row["pid"]
    return {c.index: by_port[c.ws.local_address[1]] for c in clients}


async def _run_load(
    served: Served, count: int, during, settle: float = 1.0
) -> tuple[list[SeqClient], object]:
    """``count`` clients at a steady rate; ``during(clients)`` runs in a thread meanwhile."""
    clients = await _connect_all(served.url(), count)
    stop = asyncio.Event()
    senders = [asyncio.create_task(c.send_loop(stop)) for c in clients]
    readers = [asyncio.create_task(c.recv_loop()) for c in clients]
    await asyncio.sleep(settle)
    result = await asyncio.to_thread(during, clients)
    await asyncio.sleep(settle)
    stop.set()
    await asyncio.gather(*senders)
    # Every echo of what was sent arrives (or the connection is gone).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        c.closed is None and c.received < c.sent for c in clients
    ):
        await asyncio.sleep(0.05)
    for c in clients:
        await c.ws.close()
    await asyncio.gather(*readers)
    return clients, result


def _reload(served: Served) -> tuple[list[int], object]:
    before = [row["pid"] for row in served.status()["shards"]]
    return before, wsfleet("reload", "--control", served.control, timeout=120)


@pytest.mark.timeout(180)
def test_reload_under_load_replaces_every_shard_and_keeps_every_connection(
    tmp_path: Path,
) -> None:
    with Served(tmp_path, 4) as served:
        clients, (before, result) = asyncio.run(
            _run_load(served, 400, lambda _clients: _reload(served))
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "4 shard process(es) replaced" in result.stdout
        doc = served.status()
        after = [row["pid"] for row in doc["shards"]]
        # Every shard is a new process, a child of the supervisor, titled as a shard.
        assert not set(before) & set(after), (before, after)
        supervisor = psutil.Process(doc["supervisor_pid"])
        assert sorted(p.pid for p in supervisor.children()) == sorted(after)
        for i, pid in enumerate(after):
            assert f"wsfleet shard {i}/4 :{served.port}" in " ".join(psutil.Process(pid).cmdline())
        for pid in before:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        # Not one connection dropped, not one message lost or out of order.
        assert [c.closed for c in clients if c.closed != "closed"] == []
        assert [e for c in clients for e in c.errors] == []
        assert all(c.received == c.sent > 10 for c in clients), [
            (c.sent, c.received) for c in clients if c.received != c.sent
        ][:5]
        totals = doc["totals"]
        assert totals["reloads"] == 4 and totals["handoff_dropped"] == 0
        assert all(row["restarts"] == 0 for row in doc["shards"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "victim_index",
    [0, 3],
    ids=["the-shard-being-replaced", "a-shard-not-reached-yet"],
)
def test_a_shard_killed_during_the_reload_loses_only_its_own_peers(
    tmp_path: Path, victim_index: int
) -> None:
    with Served(tmp_path, 4) as served:
        victims: dict = {}

        def kill_one_during_reload(clients: list[SeqClient]) -> object:
            shards = _shard_of_clients(served, clients)
            doc = served.status()
            victim = doc["shards"][victim_index]["pid"]
            victims["pid"] = victim
            victims["clients"] = {i for i, pid in shards.items() if pid == victim}
            reload = psutil.Popen(
                [sys.executable, "-m", "wsfleet", "reload", "--control", served.control],
                stdout=-1,
                stderr=-1,
                text=True,
            )
            # The reload is under way once shard 0's successor exists (it boots for
            # ~0.2 s, a fresh interpreter): kill the victim then.
            supervisor = psutil.Process(doc["supervisor_pid"])
            shard_pids = {row["pid"] for row in doc["shards"]}
            deadline = time.monotonic() + 10
            while not {p.pid for p in supervisor.children()} - shard_pids:
                assert time.monotonic() < deadline, "no successor started"
                time.sleep(0.002)
            psutil.Process(victim).kill()
            out, err = reload.communicate(timeout=120)
            return reload.returncode, out + err

        clients, (code, output) = asyncio.run(_run_load(served, 200, kill_one_during_reload))
        lost = {c.index for c in clients if c.closed != "closed"}
        assert victims["clients"], "the victim shard had no clients"
        assert lost == victims["clients"], output
        kept = [c for c in clients if c.index not in lost]
        assert [e for c in kept for e in c.errors] == []
        assert all(c.received == c.sent > 10 for c in kept)
        doc = served.status()
        assert all(row["state"] == "running" for row in doc["shards"])
        assert victims["pid"] not in [row["pid"] for row in doc["shards"]]
        assert doc["shards"][victim_index]["restarts"] == 1
        if victim_index == 0:  # its successor was killed with it; the reload went on
            assert code == 1 and "shard 0 not reloaded: it died during the reload" in output
            assert "3 shard" not in output and doc["totals"]["reloads"] == 3
        else:  # restarted before the reload reached it, then replaced like the others
            assert code == 0, output


def _raw_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_101(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, "closed before the upgrade answer"
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return rest


@pytest.mark.timeout(120)
def test_protocol_state_crosses_the_reload(tmp_path: Path) -> None:
    """Half a frame, a fragmented message and half an upgrade request sent before the
    reload are completed after it, and the new process carries on with each."""
    with Served(tmp_path, 1) as served:
        half_frame = RawClient("127.0.0.1", served.port)
        fragmented = RawClient("127.0.0.1", served.port)
        upgrading = _raw_connect(served.port)
        big = bytes(range(256)) * 200  # 50 KiB (under the 64 KiB default): several reads
        frame = client_frame(big, OP_BINARY)
        half_frame.sock.sendall(frame[: len(frame) // 2])
        fragmented.sock.sendall(client_frame(b"first ", OP_TEXT, fin=False))
        fragmented.sock.sendall(client_frame(b"second ", 0, fin=False))
        request = handshake_request(served.port)
        upgrading.sendall(request[:40])
        time.sleep(0.3)  # all of it read by the old shard
        before = served.status()["shards"][0]["pid"]

        result = wsfleet("reload", "--control", served.control, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert served.status()["shards"][0]["pid"] != before

        half_frame.sock.sendall(frame[len(frame) // 2 :])
        assert half_frame.recv_frame() == (OP_BINARY, big)
        fragmented.sock.sendall(client_frame(b"third", 0, fin=True))
        assert fragmented.recv_frame() == (OP_TEXT, b"first second third")
        upgrading.sendall(request[40:])
        assert _read_101(upgrading) == b""
        upgrading.sendall(client_frame(b"after", OP_TEXT))
        upgrading.settimeout(10)
        assert upgrading.recv(64) == b"\x81\x05after"
        for client in (half_frame, fragmented):
            client.send(b"again", OP_TEXT)
            assert client.recv_frame() == (OP_TEXT, b"again")
            client.close_socket()
        upgrading.close()
        totals = served.status()["totals"]
        assert totals["reloads"] == 1 and totals["handoff_dropped"] == 0


@pytest.mark.timeout(60)
def test_reload_is_refused_under_tls_and_nothing_changes(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    folder = tmp_path / "sock"
    folder.mkdir()
    with Served(folder, 2, "--tls-cert", str(cert_file), "--tls-key", str(key_file)) as served:
        before = [row["pid"] for row in served.status()["shards"]]
        result = wsfleet("reload", "--control", served.control)
        assert result.returncode == 1
        assert "TLS cannot move to another process" in result.stderr
        assert [row["pid"] for row in served.status()["shards"]] == before


def _copy_of_the_installed_package(target: Path) -> Path:
    """A copy of the wsfleet this test runs (editable or not) under ``target``, to import
    from with ``PYTHONPATH``."""
    import importlib

    root = target / "wsfleet"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(importlib.import_module("wsfleet").__file__).parent, root, ignore=ignore)
    for sub in ("shards", "supervisor", "ipc", "loadtest"):
        source = Path(importlib.import_module(f"wsfleet.{sub}").__file__).parent
        shutil.copytree(source, root / sub, ignore=ignore, dirs_exist_ok=True)
    return target


@pytest.mark.timeout(90)
def test_a_successor_that_cannot_boot_stops_the_reload_and_the_old_shards_serve_on(
    tmp_path: Path,
) -> None:
    """A broken upgrade: the code the server was started from changes under it."""
    site = _copy_of_the_installed_package(tmp_path / "site")
    folder = tmp_path / "sock"
    folder.mkdir()
    with Served(folder, 2, env={"PYTHONPATH": str(site)}) as served:
        (site / "wsfleet" / "shards" / "successor.py").write_text(
            'raise SystemExit("this upgrade is broken")\n'
        )
        before = [row["pid"] for row in served.status()["shards"]]

        async def echo() -> str:
            async with connect(served.url()) as ws:
                await ws.send("still here")
                return await ws.recv()

        result = wsfleet("reload", "--control", served.control)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "shard 0 not reloaded: its successor exited (1) before it was ready" in (
            result.stderr
        )  # 1: Python's status for the SystemExit the broken module raises
        assert "the reload stopped: shard 1 keeps its process" in result.stderr
        assert [row["pid"] for row in served.status()["shards"]] == before
        assert asyncio.run(echo()) == "still here"


@pytest.mark.timeout(90)
def test_a_reload_while_the_application_does_not_poll_loses_no_event(tmp_path: Path) -> None:
    """A library server whose events ring is full (its application stops polling for
    longer than the handoff's settle time): the old shard waits for the ring, hands over
    once the application polls again, and every message arrives, in order."""
    import threading

    from wsfleet import WebSocketServer

    from .conftest import free_port

    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    control = str(folder / "control.sock")
    server = WebSocketServer(shards=1, ring_capacity=4096, control=control)
    port = free_port()
    assert server.listen(port) == 0
    received: dict[int, list[bytes]] = {}

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            received.setdefault(peer_id, []).append(peer.get_packet())

    server.connect("data_received", on_data)
    count = 2000
    clients = [RawClient("127.0.0.1", port) for _ in range(2)]
    senders = [
        threading.Thread(
            target=lambda c=c, i=i: [c.send(f"{i}:{n:05}".encode() * 8) for n in range(count)]
        )
        for i, c in enumerate(clients)
    ]
    try:
        for sender in senders:
            sender.start()
        time.sleep(0.5)  # the 4 KiB ring is full long before this
        reload = psutil.Popen(
            [sys.executable, "-m", "wsfleet", "reload", "--control", control],
            stdout=-1,
            stderr=-1,
            text=True,
        )
        time.sleep(7)  # no poll: past the 5 s the old shard gives its connections to settle
        deadline = time.monotonic() + 40
        while reload.poll() is None or sum(map(len, received.values())) < 2 * count:
            assert time.monotonic() < deadline, (reload.poll(), sum(map(len, received.values())))
            server.poll(0.01)
        out, err = reload.communicate()
        assert reload.returncode == 0, out + err
        for sender in senders:
            sender.join(10)
        by_client = sorted(received.values(), key=lambda packets: packets[0])
        for i, packets in enumerate(by_client):
            assert packets == [f"{i}:{n:05}".encode() * 8 for n in range(count)]
        assert server.get_stats()["totals"]["reloads"] == 1
    finally:
        for client in clients:
            client.close_socket()
        server.stop()


@pytest.mark.timeout(90)
def test_a_reload_in_multiplayer_mode_keeps_the_relay_and_tells_nobody(tmp_path: Path) -> None:
    """``--gd-mp-api``: clients relaying to each other through 2 shards go on through a
    reload in order, and nobody gets a SYS_DEL or SYS_ADD for a peer that merely moved."""
    import struct

    header = struct.Struct("<Bii")
    with Served(tmp_path, 2, "--gd-mp-api") as served:

        async def body() -> tuple[dict, object]:
            clients = [await connect(served.url(), ping_interval=None) for _ in range(6)]
            ids = []
            for ws in clients:
                first = await ws.recv()
                ids.append(struct.unpack_from("<i", first, 9)[0])
            # Every one has heard of every other (SYS_ADD), then the traffic starts.
            await asyncio.sleep(0.5)
            system: dict[int, list[bytes]] = {i: [] for i in ids}
            data: dict[int, list[bytes]] = {i: [] for i in ids}

            async def read(me: int, ws: ClientConnection) -> None:
                try:
                    async for frame in ws:
                        (system if frame[0] else data)[me].append(frame)
                except ConnectionClosed:
                    pass

            for ws in clients:
                while True:  # the SYS_ADDs of the join, before the measured part
                    try:
                        await asyncio.wait_for(ws.recv(), 0.2)
                    except TimeoutError:
                        break
            pairs = list(zip(ids, clients, strict=True))
            readers = [asyncio.create_task(read(me, ws)) for me, ws in pairs]
            sent = 60

            async def send(me: int, ws: ClientConnection) -> None:
                for n in range(sent):
                    await ws.send(header.pack(0, me, 0) + f"{me}:{n}".encode())
                    await asyncio.sleep(0.02)

            senders = asyncio.gather(*(send(me, ws) for me, ws in pairs))
            await asyncio.sleep(0.3)
            result = await asyncio.to_thread(
                wsfleet, "reload", "--control", served.control, timeout=60
            )
            await senders
            await asyncio.sleep(1.0)
            for ws in clients:
                await ws.close()
            await asyncio.gather(*readers)
            return {"ids": ids, "system": system, "data": data, "sent": sent}, result

        got, result = asyncio.run(body())
        assert result.returncode == 0, result.stdout + result.stderr
        ids, sent = got["ids"], got["sent"]
        for me in ids:
            # Until the closes at the end: no peer left or joined for anyone.
            frames = got["system"][me]
            assert not frames or all(f[0] == 2 for f in frames[-(len(ids) - 1) :]), frames
            payloads = [f[9:].decode() for f in got["data"][me]]
            for other in ids:
                if other != me:
                    mine = [p for p in payloads if p.startswith(f"{other}:")]
                    assert mine == [f"{other}:{n}" for n in range(sent)], (me, other)


@pytest.mark.timeout(90)
def test_upgrades_waiting_for_their_verdict_cross_the_reload(tmp_path: Path) -> None:
    """A handshake handler that answers later: upgrades still waiting when the reload
    starts wait on in the successor under the same token, and the verdicts given after
    it reach them (one accepted, with a frame sent before its 101; one refused); an
    upgrade that ends during the reload is reported ended; the per-address count moves."""
    from wsfleet import Error, WebSocketServer

    from .conftest import free_port
    from .wsframes import handshake_request

    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    control = str(folder / "control.sock")
    server = WebSocketServer(shards=2, control=control, max_peers_per_address=3)
    token_of_port: dict[int, int] = {}
    server.set_handshake_handler(
        lambda pending: token_of_port.__setitem__(pending.port, pending.token)
    )
    connected: list[int] = []
    server.connect("client_connected", lambda peer_id, _protocol: connected.append(peer_id))
    received: list[bytes] = []

    def on_data(peer_id: int) -> None:
        received.append(server.get_peer(peer_id).get_packet())

    server.connect("data_received", on_data)
    port = free_port()
    assert server.listen(port) == Error.OK

    def poll_until(condition, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            server.poll(0.01)

    sockets = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(handshake_request(port))
            sockets.append(sock)
        poll_until(lambda: len(token_of_port) == 3)
        waiting = [token_of_port[sock.getsockname()[1]] for sock in sockets]
        # The first sends a frame before its 101 (kept, delivered after it).
        sockets[0].sendall(client_frame(b"sent while waiting"))
        time.sleep(0.2)
        before = [row["pid"] for row in server.get_shard_status()]
        reload = psutil.Popen(
            [sys.executable, "-m", "wsfleet", "reload", "--control", control],
            stdout=-1,
            stderr=-1,
            text=True,
        )
        poll_until(lambda: reload.poll() is not None, 60)
        out, err = reload.communicate()
        assert reload.returncode == 0, out + err
        after = [row["pid"] for row in server.get_shard_status()]
        assert all(new != old for new, old in zip(after, before, strict=True))
        assert all(server.is_handshake_waiting(token) for token in waiting)  # none was lost
        # Still full: the three waiting upgrades count for their address.
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        extra.sendall(handshake_request(port))
        assert extra.recv(100).startswith(b"HTTP/1.1 429")
        extra.close()
        server.accept_handshake(waiting[0])
        server.refuse_handshake(waiting[1], 401, "bad token")
        sockets[2].close()  # the third leaves before its verdict
        poll_until(lambda: connected and received and not server.is_handshake_waiting(waiting[2]))
        assert connected == [waiting[0]] and received == [b"sent while waiting"]
        assert sockets[0].recv(4096).startswith(b"HTTP/1.1 101")
        answer = sockets[1].recv(4096)
        assert answer.startswith(b"HTTP/1.1 401") and answer.endswith(b"bad token")
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


@pytest.mark.timeout(90)
def test_refusing_new_connections_survives_the_reload(tmp_path: Path) -> None:
    """``set_refuse_new_connections(True)`` is the shard's state, not a connection's: it
    crosses the handoff, so the successor drops new connections from its first accept."""
    from wsfleet import Error, WebSocketServer

    from .conftest import free_port

    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    control = str(folder / "control.sock")
    server = WebSocketServer(shards=2, control=control)
    port = free_port()
    assert server.listen(port) == Error.OK
    try:
        server.set_refuse_new_connections(True)
        for _ in range(20):
            server.poll(0.01)  # the command reaches both shards
        reload = psutil.Popen(
            [sys.executable, "-m", "wsfleet", "reload", "--control", control],
            stdout=-1,
            stderr=-1,
            text=True,
        )
        deadline = time.monotonic() + 60
        while reload.poll() is None:
            assert time.monotonic() < deadline
            server.poll(0.01)
        out, err = reload.communicate()
        assert reload.returncode == 0, out + err
        for _ in range(8):  # whichever shard the kernel picks: cut, no answer
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(handshake_request(port))
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass  # the abort's RST came first
            finally:
                sock.close()
        server.set_refuse_new_connections(False)
        for _ in range(20):
            server.poll(0.01)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(handshake_request(port))
        assert sock.recv(100).startswith(b"HTTP/1.1 101")
        sock.close()
    finally:
        server.stop()
