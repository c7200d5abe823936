"""A cluster of wsfleet nodes over a real nats-server (issue 14).

Real parts only: a ``nats-server -js`` on a loopback port (`natsproc`), real
``wsfleet serve --cluster`` node processes running ``tests/apps/cluster_app.py``
(each text message a command: send to a peer of any node, close one,
broadcast, join a group, list the cluster's peers), real websockets clients.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import subprocess
import sys
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from wsfleet.ipc import messages as m
from wsfleet.variant import encode_variant

from .conftest import TESTS_DIR, free_port
from .natsproc import NatsServer, operator_mode
from .serveproc import ServeProcess

APP = "tests.apps.cluster_app:setup"
#: The bound on noticing a dead node (README "Cluster"): 3 s of silence, checked every
#: 0.25 s, plus a poll.  The waits below allow more on a loaded machine; the log line
#: says which rule removed the node.
DEAD_BOUND = 5.0
WAIT = 20.0
ERR_CONNECTION_ERROR = 27
ERR_OUT_OF_MEMORY = 6


def start_node(
    nats: NatsServer,
    name: str,
    shards: int = 1,
    control: str = "off",
    *extra: str,
    url: str | None = None,
) -> ServeProcess:
    node = ServeProcess(
        *extra,
        "--cluster",
        url or nats.url,
        "--node-name",
        name,
        "--app",
        APP,
        "--shards",
        str(shards),
        "--control",
        control,
        "--ping-interval",
        "0",
        cwd=str(TESTS_DIR.parent),
    )
    return node


class Client:
    """A websockets client of one node: answers to its commands apart from what peers send."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[str] = []  # every text message but answers
        self.binary: list[bytes] = []
        self._answers: asyncio.Queue[str] = asyncio.Queue()
        self._new = asyncio.Event()
        self.closed: tuple[int | None, str | None] | None = None
        self._reader = asyncio.ensure_future(self._read())
        self.id = 0
        self.node = ""

    @classmethod
    async def open(cls, port: int) -> Client:
        client = cls(await connect(f"ws://127.0.0.1:{port}", open_timeout=10, max_queue=None))
        client.id, client.node = await client.whoami()
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):  # put_var's
                    self.binary.append(message)
                    self._new.set()
                    continue
                text = message
                head = text.split(" ", 1)[0]
                answers = (
                    "id",
                    "sent",
                    "close",
                    "bcast",
                    "gbcast",
                    "join",
                    "peers",
                    "status",
                    "addr",
                )
                if head in answers:
                    self._answers.put_nowait(text)
                else:
                    self.received.append(text)
                    self._new.set()
        except ConnectionClosed:
            pass
        self.closed = (self.ws.close_code, self.ws.close_reason)
        self._new.set()

    async def ask(self, command: str) -> str:
        await self.ws.send(command)
        return await asyncio.wait_for(self._answers.get(), WAIT)

    async def whoami(self) -> tuple[int, str]:
        _, peer_id, node = (await self.ask("whoami")).split(" ")
        return int(peer_id), node

    async def peers(self) -> list[int]:
        return json.loads((await self.ask("peers")).split(" ", 1)[1])

    async def status(self) -> dict:
        return json.loads((await self.ask("status")).split(" ", 1)[1])

    async def until(self, text: str) -> list[str]:
        """What arrived up to and including ``text`` (waits for it)."""
        async with asyncio.timeout(WAIT):
            while text not in self.received:
                self._new.clear()
                if self.closed is not None:
                    raise AssertionError(f"closed {self.closed} before {text!r}: {self.received}")
                await self._new.wait()
        return self.received[: self.received.index(text) + 1]

    async def wait_closed(self) -> tuple[int | None, str | None]:
        async with asyncio.timeout(WAIT):
            while self.closed is None:
                self._new.clear()
                await self._new.wait()
        return self.closed

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def wait_view(client: Client, expected: set[int]) -> None:
    """Until ``client``'s node sees exactly ``expected`` as the cluster's peers."""
    async with asyncio.timeout(WAIT):
        while set(await client.peers()) != expected:
            await asyncio.sleep(0.1)


def serves_its_own(node: ServeProcess, state: str) -> None:
    """A node outside the cluster (in ``state``) still serves its own peers."""

    async def body() -> None:
        client = await Client.open(node.port)
        assert await client.ask(f"send {client.id} still-served") == "sent 0"
        await client.until("still-served")
        assert (await client.status())["state"] == state
        await client.close()

    asyncio.run(body())


def kill_tree(node: ServeProcess) -> None:
    """SIGKILL a node: its front, supervisor and shards at once (by pid)."""
    for process in node.record_tree():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    node.proc.wait(10)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nodes(nats: NatsServer) -> Iterator[list[ServeProcess]]:
    """Three nodes (the first with 2 shards) on one nats-server."""
    started = [start_node(nats, "n1", shards=2), start_node(nats, "n2"), start_node(nats, "n3")]
    try:
        for node in started:
            node.wait_up(30)
        yield started
    finally:
        for node in started:
            node.end()


@pytest.mark.timeout(60)
def test_without_cluster_nothing_of_nats_is_imported() -> None:
    code = (
        "import sys\n"
        "from wsfleet import WebSocketServer\n"
        "server = WebSocketServer(shards=1, control=False)\n"
        "assert server.listen(0) == 0\n"
        "server.poll(0.05)\n"
        "print(sorted(name for name in sys.modules if name == 'nats' or "
        "name.startswith(('nats.', 'wsfleet.cluster_link'))))\n"
        "server.stop()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.timeout(30)
def test_bad_cluster_settings_are_refused() -> None:
    from wsfleet import Error, WebSocketServer

    for bad in ({"cluster": "localhost:4222"}, {"cluster": ""}, {"node_name": "a.b"}):
        with pytest.raises(ValueError):
            WebSocketServer(shards=1, control=False, **bad)
    server = WebSocketServer(shards=1, control=False, cluster="nats://127.0.0.1:1")
    server.node_name = "has space"
    assert server.listen(0) == Error.ERR_INVALID_PARAMETER
    assert not server.is_listening()
    server = WebSocketServer(
        shards=1, control=False, cluster="nats://127.0.0.1:1", cluster_credentials="/no/such.creds"
    )
    assert server.listen(0) == Error.ERR_CANT_OPEN
    assert not server.is_listening()


@pytest.mark.timeout(180)
def test_three_nodes_send_close_and_broadcast_across(nodes: list[ServeProcess]) -> None:
    per_node = 70  # 210 peers in all

    async def body() -> None:
        clients = await asyncio.gather(
            *(Client.open(node.port) for node in nodes for _ in range(per_node))
        )
        by_node = [clients[i * per_node : (i + 1) * per_node] for i in range(3)]
        ids = {client.id for client in clients}
        # Unique over the cluster, valid Godot ids, each node's in its own slot.
        assert len(ids) == len(clients)
        assert all(1 < peer_id < 2**31 for peer_id in ids)
        slots = [{m.slot_of(c.id) for c in group} for group in by_node]
        assert all(len(s) == 1 for s in slots) and len(set.union(*slots)) == 3, slots
        assert [group[0].node for group in by_node] == ["n1", "n2", "n3"]
        for group in by_node:
            await wait_view(group[0], ids)
        first = [group[0] for group in by_node]

        # put_packet to a peer of another node, and has_peer/get_peer for it.
        a, b, c = first
        assert await a.ask(f"send {c.id} hello-from-n1") == "sent 0"
        assert await c.until("hello-from-n1") == ["hello-from-n1"]
        assert await c.ask(f"send {b.id} hello-from-n3") == "sent 0"
        assert (await b.until("hello-from-n3"))[-1] == "hello-from-n3"

        # put_var, and the address of a peer of another node (as its node saw it).
        assert await a.ask(f"var {c.id}") == "sent 0"
        async with asyncio.timeout(WAIT):
            while not c.binary:
                await asyncio.sleep(0.02)
        assert c.binary == [encode_variant([1, "two", 3.5])]
        local = c.ws.local_address
        assert await a.ask(f"addr {c.id}") == f"addr {local[0]} {local[1]} True"
        assert await a.ask("addr 12345") == "addr  0 False"

        # A broadcast reaches each peer of the cluster once (then a marker, same path).
        assert await b.ask("bcast all-1") == "bcast 0"
        assert await b.ask("bcast marker-1") == "bcast 0"
        for client in clients:
            got = await client.until("marker-1")
            assert got.count("all-1") == 1, (client.id, got)

        # A group broadcast: each node delivers to its members, once.
        members = [client for i, client in enumerate(clients) if i % 3 == 0]
        for client in members:
            assert await client.ask("join room") == "join 0"
        assert await c.ask("gbcast room to-room") == "gbcast 0"
        assert await c.ask("bcast marker-2") == "bcast 0"
        for client in clients:
            got = await client.until("marker-2")
            seen = got[got.index("marker-1") + 1 :]
            assert seen.count("to-room") == (1 if client in members else 0), (client.id, seen)

        # exclude= names peers of any node.
        skipped = {by_node[1][5].id, by_node[2][7].id, by_node[0][3].id}
        ids_text = ",".join(map(str, sorted(skipped)))
        assert await a.ask(f"bcastex {ids_text} not-you") == "bcast 0"
        assert await a.ask("bcast marker-3") == "bcast 0"
        for client in clients:
            got = await client.until("marker-3")
            seen = got[got.index("marker-2") + 1 :]
            assert seen.count("not-you") == (0 if client.id in skipped else 1), (client.id, seen)

        # disconnect_peer of a remote peer: the client sees the code and the reason.
        victim = by_node[2][10]
        assert await a.ask(f"close {victim.id} 4001 bye-from-n1") == "close"
        assert await victim.wait_closed() == (4001, "bye-from-n1")
        for head in first:
            await wait_view(head, ids - {victim.id})

        status = await a.status()
        assert status["state"] == "member" and status["nats_connected"]
        assert {n["name"]: n["peers"] for n in status["nodes"]} == {"n2": 70, "n3": 69}
        assert status["refused_version"] == 0 and status["bad_messages"] == 0
        await asyncio.gather(*(client.close() for client in clients))

    asyncio.run(body())


@pytest.mark.timeout(120)
def test_wsfleet_status_shows_the_cluster(nats: NatsServer, tmp_path: Path) -> None:
    control = str(tmp_path / "n1.sock")
    metrics_port = free_port()
    nodes = [
        start_node(nats, "n1", 1, control, "--metrics", f"127.0.0.1:{metrics_port}"),
        start_node(nats, "n2"),
    ]
    try:
        for node in nodes:
            node.wait_up(30)

        def status(*options: str) -> str:
            argv = [sys.executable, "-m", "wsfleet", "status", "--control", control, *options]
            return subprocess.run(
                argv, capture_output=True, text=True, timeout=20, check=True
            ).stdout

        async def body() -> None:
            here = await Client.open(nodes[0].port)
            there = [await Client.open(nodes[1].port) for _ in range(2)]
            await wait_view(here, {here.id, *(c.id for c in there)})
            assert await here.ask(f"send {there[0].id} counted") == "sent 0"
            await there[0].until("counted")
            # One NATS message per destination node per poll: 50 sends, one batch, in order.
            before = (await here.status())["nodes"][0]["messages_out"]
            assert await here.ask(f"sendmany {there[1].id} 50") == "sent 0"
            assert await there[1].until("49") == [str(i) for i in range(50)]
            assert (await here.status())["nodes"][0]["messages_out"] == before + 1
            async with asyncio.timeout(WAIT):  # published once a second
                while True:
                    cluster = json.loads(status("--json")).get("cluster")
                    if cluster and cluster["nodes"] and cluster["messages_out"] >= 1:
                        break
                    await asyncio.sleep(0.2)
            assert cluster["node"] == "n1" and cluster["state"] == "member"
            assert cluster["nats_connected"] and cluster["nats_url"] == nats.url
            assert cluster["peers"] == 1 and cluster["remote_peers"] == 2
            [n2] = cluster["nodes"]
            assert n2["name"] == "n2" and n2["peers"] == 2 and n2["bytes_out"] > 0
            text = status()
            assert "cluster node n1 (id slot" in text and "NATS connected" in text, text
            assert "peers 1 here, 2 on 1 other nodes" in text, text
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            scraped = urllib.request.urlopen(url, timeout=10).read().decode()
            for line in (
                "wsfleet_cluster_connected 1.0",
                "wsfleet_cluster_member 1.0",
                "wsfleet_cluster_nodes 1.0",
                "wsfleet_cluster_remote_peers 2.0",
                'wsfleet_cluster_sends_refused_total{reason="down"} 0.0',
            ):
                assert line in scraped.splitlines(), (line, scraped)
            for client in (here, *there):
                await client.close()

        asyncio.run(body())
    finally:
        for node in nodes:
            node.end()


@pytest.mark.timeout(120)
def test_a_provisional_slot_leased_by_another_node_keeps_this_one_out(tmp_path: Path) -> None:
    import nats as nats_py

    from wsfleet import cluster_wire as w

    slot = zlib.crc32(b"late") % m.CLUSTER_SLOTS  # the provisional slot of node "late"
    nats = NatsServer(tmp_path / "taken").start()

    async def take_slot() -> None:  # another node's lease, as a node writes it
        connection = await nats_py.connect(nats.url)
        # A longer TTL than the nodes' own (they then use the bucket as it is): the lease
        # outlives however long the node takes to start on a loaded machine.
        kv = await connection.jetstream().create_key_value(
            bucket=w.SLOTS_BUCKET, ttl=120.0, history=1
        )
        await kv.create(f"slot.{slot}", b"intruder 1")
        await connection.close()

    asyncio.run(take_slot())
    nats.kill()  # the lease stays in the store: the node starts while NATS is away
    late = start_node(nats, "late")
    try:
        late.wait_up(30)
        assert int(late.wait_for(r"provisional id slot (\d+)").group(1)) == slot
        nats.start()
        late.wait_for(
            rf"id slot {slot} is leased by node intruder: node late stays out of the cluster",
            WAIT,
        )
        serves_its_own(late, "conflict")
    finally:
        late.end()
        nats.kill()


@pytest.mark.timeout(120)
def test_sends_beyond_what_waits_for_nats_are_refused(nats: NatsServer) -> None:
    nodes = [start_node(nats, "n1"), start_node(nats, "n2")]
    try:
        for node in nodes:
            node.wait_up(30)

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            await wait_view(a, {a.id, b.id})
            assert nats.proc is not None
            nats.proc.send_signal(signal.SIGSTOP)  # NATS stops reading: n1's sends pile up
            try:
                # 100 MB in one poll: taken (the cap counts what earlier polls left waiting).
                assert await a.ask(f"flood {b.id} 100 1000000") == "sent 0"
                # Until what waits stands still (the sockets' buffers took what they could).
                async with asyncio.timeout(WAIT):
                    before = -1
                    while (backlog := (await a.status())["backlog_bytes"]) != before:
                        before = backlog
                        await asyncio.sleep(0.3)
                assert backlog > 64 * 1024 * 1024
                assert await a.ask(f"send {b.id} one-more") == f"sent {ERR_OUT_OF_MEMORY}"
                assert (await a.status())["sends_refused_backlog"] == 1
            finally:
                nats.proc.send_signal(signal.SIGCONT)
            async with asyncio.timeout(WAIT):  # the backlog drains, sends are taken again
                while (await a.ask(f"send {b.id} after")) != "sent 0":
                    await asyncio.sleep(0.2)
            await b.until("after")
            await a.close()
            await b.close()

        asyncio.run(body())
        nodes[0].wait_for(r"refused: \d+ bytes wait for NATS already \(ERR_OUT_OF_MEMORY")
    finally:
        for node in nodes:
            node.end()


@pytest.mark.timeout(120)
def test_nats_over_tls_with_a_private_ca(tmp_path: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    for name, pem in (
        ("ca.pem", ca.cert_pem),
        ("cert.pem", cert.cert_chain_pems[0]),
        ("key.pem", cert.private_key_pem),
    ):
        pem.write_to_path(str(tmp_path / name))
    nats = NatsServer(
        tmp_path / "tls", None, "--tls", "--tlscert", str(tmp_path / "cert.pem"),
        "--tlskey", str(tmp_path / "key.pem"),
    ).start()  # fmt: skip
    url = f"tls://127.0.0.1:{nats.port}"
    ca_option = ("--cluster-tls-ca", str(tmp_path / "ca.pem"))
    nodes = [start_node(nats, name, 1, "off", *ca_option, url=url) for name in ("t1", "t2")]
    stranger = start_node(nats, "stranger", url=url)  # without the CA: NATS is not trusted
    try:
        for node in (*nodes, stranger):
            node.wait_up(30)
        stranger.wait_for(r"cannot reach NATS at tls://127\.0\.0\.1:\d+ .*(SSL|certificate)")

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            await wait_view(a, {a.id, b.id})
            assert await a.ask(f"send {b.id} over-tls") == "sent 0"
            await b.until("over-tls")
            await a.close()
            await b.close()

        asyncio.run(body())
    finally:
        for node in (*nodes, stranger):
            node.end()
        nats.kill()


@pytest.mark.timeout(150)
def test_small_max_payload_snapshots_and_batches_in_parts(tmp_path: Path) -> None:
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 4096\n")
    nats = NatsServer(tmp_path / "small", None, "-c", str(conf)).start()
    first = start_node(nats, "big")
    later: ServeProcess | None = None
    try:
        first.wait_up(30)

        async def body() -> None:
            nonlocal later
            crowd = await asyncio.gather(*(Client.open(first.port) for _ in range(250)))
            later = start_node(nats, "late")  # asks "big" for a snapshot: ~7 KB of peers
            later.wait_up(30)
            newcomer = await Client.open(later.port)
            ids = {c.id for c in crowd} | {newcomer.id}
            await wait_view(newcomer, ids)
            await wait_view(crowd[0], ids)  # "big" learns of the newcomer through NATS too
            status = await newcomer.status()
            assert status["bad_messages"] == 0 and status["publish_failed"] == 0
            # Ten 3,000-byte packets in one poll: several NATS messages, all delivered.
            assert await crowd[0].ask(f"flood {newcomer.id} 10 3000") == "sent 0"
            async with asyncio.timeout(WAIT):
                while len(newcomer.binary) < 10:
                    await asyncio.sleep(0.05)
            assert newcomer.binary == [bytes(3000)] * 10
            # One larger than a NATS message carries: refused, counted.
            assert await crowd[0].ask(f"flood {newcomer.id} 1 5000") == f"sent {ERR_OUT_OF_MEMORY}"
            assert (await crowd[0].status())["sends_refused_too_large"] == 1
            await asyncio.gather(*(c.close() for c in (*crowd, newcomer)))

        asyncio.run(body())
    finally:
        first.end()
        if later is not None:
            later.end()
        nats.kill()


@pytest.mark.timeout(120)
def test_credentials_in_the_url_work_and_stay_out_of_logs(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "auth", None, "--user", "wsf", "--pass", "s3cr3t-pw").start()
    url = f"nats://wsf:s3cr3t-pw@127.0.0.1:{nats.port}"
    nodes = [start_node(nats, name, url=url) for name in ("n1", "n2")]
    try:
        for node in nodes:
            node.wait_up(30)

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            await wait_view(a, {a.id, b.id})
            assert await a.ask(f"send {b.id} authenticated") == "sent 0"
            await b.until("authenticated")
            assert (await a.status())["nats_url"] == f"nats://***@127.0.0.1:{nats.port}"
            await a.close()
            await b.close()

        asyncio.run(body())
        for node in nodes:
            assert "s3cr3t-pw" not in node.log()
    finally:
        for node in nodes:
            node.end()
        nats.kill()


@pytest.mark.timeout(120)
def test_a_credentials_file_joins_a_nats_server_in_operator_mode(tmp_path: Path) -> None:
    """``--cluster-creds``: nodes with a user of the server's account form the cluster (JWT
    auth, JetStream for the leases); a user of an account the server does not know is
    refused, says so, and serves its own peers."""
    config, creds, stranger_creds = operator_mode(tmp_path / "jwt")
    nats = NatsServer(tmp_path / "op", None, "-c", config).start()
    nodes = [
        start_node(nats, name, 1, "off", "--cluster-creds", str(creds)) for name in ("c1", "c2")
    ]
    stranger = start_node(nats, "c3", 1, "off", "--cluster-creds", str(stranger_creds))
    try:
        for node in (*nodes, stranger):
            node.wait_up(30)
        stranger.wait_for(r"cannot reach NATS at nats://127\.0\.0\.1:\d+ .*[Aa]uthoriz")

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            c = await Client.open(stranger.port)
            await wait_view(a, {a.id, b.id})
            assert await a.ask(f"send {b.id} signed") == "sent 0"
            await b.until("signed")
            assert await c.ask(f"send {c.id} alone") == "sent 0"  # its own peers: served
            await c.until("alone")
            assert c.id not in await a.peers()
            for client in (a, b, c):
                await client.close()

        asyncio.run(body())
    finally:
        for node in (*nodes, stranger):
            node.end()
        nats.kill()


def test_a_bad_credentials_file_is_refused_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.creds"
    bad.write_text("not a credentials file\n")
    for creds in (bad, tmp_path / "missing.creds"):
        result = subprocess.run(
            [sys.executable, "-m", "wsfleet", "serve", "--cluster", "nats://127.0.0.1:1",
             "--cluster-creds", str(creds), "--port", "0"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result
        assert f"--cluster-creds {creds}:" in result.stderr


@pytest.mark.timeout(120)
def test_without_jetstream_a_node_says_so_and_serves_its_own(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "plain", jetstream=False).start()
    node = start_node(nats, "nojs")
    try:
        node.wait_up(30)
        node.wait_for(r"cannot lease an id slot from NATS' key-value store .*JetStream on")
        node.wait_for(r"provisional id slot \d+")
        serves_its_own(node, "joining")
    finally:
        node.end()
        nats.kill()


@pytest.mark.timeout(120)
def test_a_message_of_another_wire_version_or_malformed_is_refused(
    nats: NatsServer, tmp_path: Path
) -> None:
    import nats as nats_py

    from wsfleet import cluster_wire as w

    node = start_node(nats, "solo")
    try:
        node.wait_up(30)

        async def body() -> None:
            client = await Client.open(node.port)
            connection = await nats_py.connect(nats.url)
            future = bytes(w.encode_header(w.BATCH, 3, 1, b"future"))
            future = future[:2] + bytes([w.WIRE_VERSION + 1]) + future[3:]
            await connection.publish(w.inbox_subject("solo"), future + b"whatever")
            await connection.publish(w.inbox_subject("solo"), b"not wsfleet at all")
            # Well-formed headers, bad bodies: each is counted, and nothing else happens.
            odd = w.encode_header(w.BATCH, 5, 7, b"odd")
            for body in (
                struct.pack("<BBiI", w.R_SEND, 0, client.id, 100) + b"cut",  # truncated
                w.encode_record(w.R_CLOSE, 0, client.id, b"\x03"),  # no room for a code
                w.encode_record(w.R_JOIN, 0, 5 * 8388607 + 9, b"??"),  # no join in it
                w.encode_record(200, 0, 0, b"from a later version"),  # unknown: skipped
            ):
                await connection.publish(w.inbox_subject("solo"), odd + body)
            await connection.flush()
            await connection.close()
            async with asyncio.timeout(WAIT):
                while (status := await client.status())["bad_messages"] < 4:
                    await asyncio.sleep(0.1)
            assert status["refused_version"] == 1 and status["unknown_records"] == 1
            assert await client.ask(f"send {client.id} still-fine") == "sent 0"
            await client.until("still-fine")
            assert client.closed is None
            await client.close()

        asyncio.run(body())
        node.wait_for(rf"refused a message of wire version {w.WIRE_VERSION + 1}")
    finally:
        node.end()


@pytest.mark.timeout(120)
def test_a_killed_node_s_peers_are_reported_gone(nodes: list[ServeProcess]) -> None:
    async def body() -> None:
        clients = [await Client.open(node.port) for node in nodes for _ in range(3)]
        ids = {client.id for client in clients}
        for client in clients[::3]:
            await wait_view(client, ids)
        dead = {client.id for client in clients if client.node == "n3"}
        a, b = clients[0], clients[3]  # on n1 and n2
        stop = asyncio.Event()

        async def stream(source: Client, target: Client, tag: str) -> int:
            """Numbered messages, one after another, until `stop`: how many were sent."""
            sent = 0
            while not stop.is_set():
                assert await source.ask(f"send {target.id} {tag}-{sent}") == "sent 0"
                sent += 1
            return sent

        # Numbered traffic both ways between the survivors while n3 dies.
        streams = [
            asyncio.ensure_future(stream(a, b, "ab")),
            asyncio.ensure_future(stream(b, a, "ba")),
        ]
        await asyncio.sleep(0.3)
        kill_tree(nodes[2])
        for client in (clients[1], clients[2], clients[4], clients[5]):  # n1's and n2's
            await wait_view(client, ids - dead)  # (a and b ask only for their stream)
        stop.set()
        counts = await asyncio.gather(*streams)
        for client in (a, b):
            await wait_view(client, ids - dead)
        assert counts[0] > 0 and counts[1] > 0
        # Nothing lost among the survivors, nothing twice, in order.
        assert await b.until(f"ab-{counts[0] - 1}") == [f"ab-{i}" for i in range(counts[0])]
        assert await a.until(f"ba-{counts[1] - 1}") == [f"ba-{i}" for i in range(counts[1])]
        for client in clients[:6]:
            await client.close()

    asyncio.run(body())
    for node in nodes[:2]:
        node.wait_for(r"node n3 left \(silent for 3 s\): 3 of its peers gone")
        assert sum("remote peer" in line and "of n3 gone" in line for line in node.lines) == 3


@pytest.mark.timeout(150)
def test_nats_restart_traffic_resumes_and_nothing_stale(nats: NatsServer) -> None:
    nodes = [start_node(nats, "n1"), start_node(nats, "n2")]
    try:
        for node in nodes:
            node.wait_up(30)

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            leaving = await Client.open(nodes[1].port)
            await wait_view(a, {a.id, b.id, leaving.id})
            nats.kill()
            # Cut off: a send to another node's peer is refused with a clear error. (Sends
            # accepted before the node noticed wait in nats-py's buffer for the reconnect:
            # those may arrive later; a refused one never does.)
            refused: list[str] = []
            async with asyncio.timeout(WAIT):
                while not refused:
                    text = f"lost-{len(b.received)}-{asyncio.get_running_loop().time()}"
                    if await a.ask(f"send {b.id} {text}") == f"sent {ERR_CONNECTION_ERROR}":
                        refused.append(text)
                    else:
                        await asyncio.sleep(0.1)
            # Meanwhile on n2: one peer leaves, another comes; every node serves its own.
            await leaving.close()
            newcomer = await Client.open(nodes[1].port)
            assert await newcomer.ask(f"send {b.id} local-only") == "sent 0"
            await b.until("local-only")
            nats.restart()
            # Traffic resumes, and n1's view is the live one: no stale peer.
            await wait_view(a, {a.id, b.id, newcomer.id})
            await wait_view(newcomer, {a.id, b.id, newcomer.id})
            assert await a.ask(f"send {newcomer.id} back-again") == "sent 0"
            await newcomer.until("back-again")
            assert await newcomer.ask(f"send {a.id} and-back") == "sent 0"
            await a.until("and-back")
            assert not set(refused) & set(b.received)
            status = await a.status()
            assert status["sends_refused_down"] >= 1 and status["state"] == "member"
            for client in (a, b, newcomer):
                await client.close()

        asyncio.run(body())
        nodes[0].wait_for(r"lost NATS: this node serves its own peers")
        nodes[0].wait_for(r"refused: NATS is unreachable \(ERR_CONNECTION_ERROR")
    finally:
        for node in nodes:
            node.end()


@pytest.mark.timeout(150)
def test_a_nats_outage_longer_than_the_lease_rebuilds_the_cluster(nats: NatsServer) -> None:
    """Down for longer than the dead bound and the lease's TTL: each node drops the other
    (this node lost NATS), takes its slot again when NATS is back, and both views refill."""
    nodes = [start_node(nats, "n1"), start_node(nats, "n2")]
    try:
        for node in nodes:
            node.wait_up(30)

        async def body() -> None:
            a = await Client.open(nodes[0].port)
            b = await Client.open(nodes[1].port)
            await wait_view(a, {a.id, b.id})
            nats.kill()
            await wait_view(a, {a.id})  # b's node is silent: gone
            await wait_view(b, {b.id})
            await asyncio.sleep(11)  # past the slot lease's 10 s TTL
            nats.start()
            await wait_view(a, {a.id, b.id})
            await wait_view(b, {a.id, b.id})
            assert await b.ask(f"send {a.id} after-the-outage") == "sent 0"
            await a.until("after-the-outage")
            for client in (a, b):
                status = await client.status()
                assert status["state"] == "member" and status["slot"] == m.slot_of(client.id)
            await a.close()
            await b.close()

        asyncio.run(body())
        for node in nodes:
            node.wait_for(r"left \(silent for 3 s: this node lost NATS\)")
            assert not any("stays out of the cluster" in line for line in node.lines)
    finally:
        for node in nodes:
            node.end()


@pytest.mark.timeout(120)
def test_a_node_that_cannot_reach_nats_serves_its_own_then_joins(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "late")  # not started yet: nothing listens on its port
    late = start_node(nats, "late")
    other: ServeProcess | None = None
    try:
        late.wait_up(30)
        late.wait_for(r"cannot reach NATS at nats://127\.0\.0\.1")
        slot = int(late.wait_for(r"provisional id slot (\d+)").group(1))

        async def body() -> None:
            nonlocal other
            alone = await Client.open(late.port)
            assert m.slot_of(alone.id) == slot
            assert await alone.ask(f"send {alone.id} to-myself") == "sent 0"
            await alone.until("to-myself")
            nats.start()
            late.wait_for(rf"leased the provisional id slot {slot}: in the cluster now", WAIT)
            other = start_node(nats, "other")
            other.wait_up(30)
            friend = await Client.open(other.port)
            await wait_view(alone, {alone.id, friend.id})
            assert await friend.ask(f"send {alone.id} welcome") == "sent 0"
            await alone.until("welcome")
            await alone.close()
            await friend.close()

        asyncio.run(body())
    finally:
        late.end()
        if other is not None:
            other.end()
        nats.kill()
