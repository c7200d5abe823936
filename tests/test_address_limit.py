"""The per-address connection limit (``max_peers_per_address``, ``--max-peers-per-address``):
counted over every shard, 429 past it, freed as peers leave or their shard dies.

Clients take distinct loopback source addresses (127.0.0.2, 127.0.0.3, ...) so that
each test has addresses of its own; the kernel spreads one address's connections
over the shards by their ports (``SO_REUSEPORT``), so a limit larger than one shard's
share is only kept by counting across the shards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from wsfleet import Error, WebSocketServer
from wsfleet.ipc.shardstate import ADDRESS_SLOTS, AddressTableFull, ShardState

from .conftest import free_port, servers  # noqa: F401 (fixture)
from .opsproc import Served, wsfleet
from .test_limits import echoes
from .test_ops_metrics import fetch, samples
from .wsframes import handshake_request
from .wsserver import Recorder, echo, run_with, until, url


async def connect_from(server_url: str, address: str) -> ClientConnection:
    return await connect(server_url, local_addr=(address, 0), open_timeout=5, ping_interval=None)


async def refused_status(server_url: str, address: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect_from(server_url, address)
    return refused.value.response.status_code


async def connect_once_freed(server_url: str, address: str) -> ClientConnection:
    """A connection from ``address`` once the server has seen one of its peers leave (429
    until then; the client's close returns before the shard's side is gone)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await connect_from(server_url, address)
        except InvalidStatus as refused:
            assert refused.response.status_code == 429
            assert time.monotonic() < deadline, "the leaving peer was never released"
            await asyncio.sleep(0.05)


def shards_of(server: WebSocketServer, recorder: Recorder, ports: set[int]) -> Counter[int]:
    """How many of the peers whose client ports are ``ports`` each shard holds."""
    return Counter(
        server.get_peer_shard(i)
        for i in recorder.connected_ids()
        if server.get_peer_port(i) in ports
    )


@pytest.mark.timeout(60)
def test_the_limit_holds_over_every_shard_per_address_and_frees_as_peers_leave(
    servers,  # noqa: F811
) -> None:
    server = servers(shards=4, max_peers_per_address=10)
    echo(server)
    recorder = Recorder(server, read_data=False)
    crowded, other = "127.0.0.2", "127.0.0.3"

    async def body() -> None:
        clients = [await connect_from(url(server), crowded) for _ in range(10)]
        await until(lambda: len(recorder.connected_ids()) == 10)
        spread = shards_of(server, recorder, {ws.local_address[1] for ws in clients})
        # No shard holds all ten (odds 4 ** -9 that one does): only a count over the shards
        # can refuse the eleventh.
        assert len(spread) > 1 and max(spread.values()) < 10, spread
        for _ in range(8):  # whichever shard the kernel picks
            assert await refused_status(url(server), crowded) == 429
        # The raw answer, on the fast path and on websockets' path (a repeated header).
        for extra in ((), ("X-Twice: a", "X-Twice: b")):
            status, head, body_text = await asyncio.wait_for(
                http_answer_from(server.port, handshake_request(server.port, *extra), crowded), 10
            )
            assert status == 429, head
            assert body_text == b"Too many connections from your address: try again later.\n"
        # Another address is not affected, and the crowded one's peers are served.
        bystander = await connect_from(url(server), other)
        await echoes(bystander)
        for ws in clients:
            await echoes(ws)
        # A leaving peer frees exactly one connection for its address.
        await clients.pop().close()
        await until(lambda: len(recorder.named("disconnected")) == 1)
        clients.append(await connect_from(url(server), crowded))
        await echoes(clients[-1])
        assert await refused_status(url(server), crowded) == 429
        for ws in [*clients, bystander]:
            await ws.close()
        await until(lambda: len(recorder.named("disconnected")) == 12)
        # All gone: the address has its ten again.
        again = [await connect_from(url(server), crowded) for _ in range(10)]
        for ws in again:
            await ws.close()

    run_with(server, body, timeout=50)
    time.sleep(0.3)  # the shards publish their counters every 0.1 s
    totals = server.get_stats()["totals"]
    assert totals["refused_429"] == 8 + 2 + 1
    assert totals["refused_503"] == 0


async def http_answer_from(port: int, request: bytes, address: str) -> tuple[int, bytes, bytes]:
    """`http_answer` from the source ``address``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        body = b"" if head.startswith(b"HTTP/1.1 101") else await reader.read()
        return int(head.split()[1]), head, body
    finally:
        writer.close()


@pytest.mark.timeout(60)
def test_a_dead_shard_gives_its_addresses_back(servers) -> None:  # noqa: F811
    server = servers(shards=2, max_peers_per_address=4)
    echo(server)
    recorder = Recorder(server, read_data=False)
    address = "127.0.0.4"

    async def body() -> None:
        clients = [await connect_from(url(server), address) for _ in range(4)]
        await until(lambda: len(recorder.connected_ids()) == 4)
        assert await refused_status(url(server), address) == 429
        ids = recorder.connected_ids()
        victim = server.get_peer_shard(ids[0])
        victim_ports = {server.get_peer_port(i) for i in ids if server.get_peer_shard(i) == victim}
        survivors = [ws for ws in clients if ws.local_address[1] not in victim_ports]
        pid = server.get_shard_status()[victim]["pid"]
        os.kill(pid, signal.SIGKILL)
        await until(lambda: len(recorder.named("disconnected")) == len(victim_ports))
        # Exactly the dead shard's connections are free again, whichever shard takes them.
        fresh = [await connect_from(url(server), address) for _ in victim_ports]
        assert await refused_status(url(server), address) == 429
        for ws in survivors + fresh:
            await echoes(ws)
        for ws in clients + fresh:
            await ws.close()

    run_with(server, body, timeout=50)


@pytest.mark.timeout(60)
def test_an_upgrade_waiting_for_its_verdict_counts() -> None:
    """With a handshake handler, a pending upgrade holds its address's slot; a refused
    one gives it back."""
    server = WebSocketServer(shards=2, max_peers_per_address=2)
    waiting = []
    server.set_handshake_handler(lambda request: waiting.append(request.token))
    assert server.listen(0) == Error.OK
    echo(server)
    address = "127.0.0.5"

    async def body() -> None:
        first = asyncio.ensure_future(connect_from(url(server), address))
        second = asyncio.ensure_future(connect_from(url(server), address))
        await until(lambda: len(waiting) == 2)
        assert await refused_status(url(server), address) == 429  # two wait: full
        server.refuse_handshake(waiting[0], 403, "no")
        server.accept_handshake(waiting[1])
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        opened = [ws for ws in outcomes if isinstance(ws, ClientConnection)]
        assert len(opened) == 1
        third = asyncio.ensure_future(connect_from(url(server), address))  # the refused slot
        await until(lambda: len(waiting) == 3)
        server.accept_handshake(waiting[2])
        opened.append(await third)
        for ws in opened:
            await echoes(ws)
            await ws.close()

    try:
        run_with(server, body, timeout=50)
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_the_cli_option_and_its_counter_in_the_metrics(tmp_path: Path) -> None:
    metrics_port = free_port()
    with Served(
        tmp_path, 2, "--max-peers-per-address", "1", "--metrics", f"127.0.0.1:{metrics_port}"
    ) as served:

        async def body() -> None:
            kept = await connect_from(served.url(), "127.0.0.6")
            assert await refused_status(served.url(), "127.0.0.6") == 429
            other = await connect_from(served.url(), "127.0.0.7")
            await kept.close()
            await other.close()

        asyncio.run(body())
        time.sleep(0.3)  # the shards publish every 0.1 s
        assert served.status()["totals"]["refused_429"] == 1
        status, text = fetch(metrics_port, "/metrics")
        assert status == 200
        refused = {
            labels: value
            for (name, labels), value in samples(text).items()
            if name == "wsfleet_handshakes_refused_total" and ("reason", "429") in labels
        }
        assert len(refused) == 2 and sum(refused.values()) == 1  # a series per shard


@pytest.mark.timeout(120)
def test_counts_move_with_a_reload(tmp_path: Path) -> None:
    """The successor keeps its predecessor's table: the moved peers still count, and
    release their address when they leave."""
    with Served(tmp_path, 2, "--max-peers-per-address", "3") as served:
        loop = asyncio.new_event_loop()
        try:
            address = "127.0.0.8"
            kept = [loop.run_until_complete(connect_from(served.url(), address)) for _ in range(3)]
            reloaded = wsfleet("reload", "--control", served.control, timeout=100)
            assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
            assert loop.run_until_complete(refused_status(served.url(), address)) == 429
            for ws in kept:
                loop.run_until_complete(echoes(ws))
            loop.run_until_complete(kept.pop().close())
            kept.append(loop.run_until_complete(connect_once_freed(served.url(), address)))
            assert loop.run_until_complete(refused_status(served.url(), address)) == 429
            for ws in kept:
                loop.run_until_complete(ws.close())
        finally:
            loop.close()


def test_the_shared_count_is_exact_over_shards_and_reuses_entries() -> None:
    """The shared count itself: one block, three shards' tables, in this process."""
    state = ShardState(3)
    addresses = [f"10.0.{n // 256}.{n % 256}" for n in range(2000)]
    for n, address in enumerate(addresses):
        for shard in range(3):
            assert state.claim_address(shard, address, 3 + n % 2)
    # Each address is at its limit of 3 (even n) or has one left (odd n).
    for n, address in enumerate(addresses):
        if n % 2:
            assert state.claim_address(n % 3, address, 4)
        assert not state.claim_address((n + 1) % 3, address, 4 if n % 2 else 3)
        assert state.address_count(address) == 3 + n % 2
    state.forget(0)  # shard 0 died: one connection less for every address (two for some)
    for n, address in enumerate(addresses):
        assert state.address_count(address) == 2 + (n % 2 and n % 3 != 0)
    for address in addresses:
        state.release_address(1, address)
        state.release_address(2, address)
    assert all(
        state.address_count(a) == (n % 2 and n % 3 in (1, 2)) for n, a in enumerate(addresses)
    )
    # Another process maps the same block and sees the same counts (the same secret too).
    twin = ShardState.attach(os.dup(state.fd), 3)
    assert [twin.address_count(a) for a in addresses] == [state.address_count(a) for a in addresses]
    # Entries whose count fell to 0 are reused: many more addresses than slots over time.
    for n in range(3 * ADDRESS_SLOTS // 2):
        address = f"fd00::{n:x}"
        assert state.claim_address(0, address, 1)
        state.release_address(0, address)
    assert state.claim_address(0, "fd00::1", 1) and not state.claim_address(1, "fd00::1", 1)


def test_a_full_address_table_says_so() -> None:
    state = ShardState(1)
    for n in range(ADDRESS_SLOTS):
        assert state.claim_address(0, f"fd01::{n:x}", 1)
    with pytest.raises(AddressTableFull):
        state.claim_address(0, "fd02::1", 1)
    assert state.claim_address(0, "fd01::7", 2)  # a known address still counts
    state.release_address(0, "fd01::3")
    assert state.claim_address(0, "fd02::1", 1)  # in the freed entry


def _race(state: ShardState, held_word, index: int, rounds: int, limit: int, out) -> None:
    """Child of the race test: claim and release one address as fast as it can, counting
    the connections held by every child together in ``held_word`` (a claim may show in
    the table for a moment before it is taken back; a connection held may not pass)."""
    held, highest = 0, 0
    for n in range(rounds):
        if state.claim_address(index, "192.0.2.1", limit):
            held += 1
            highest = max(highest, held_word.add(0, 1))
        if held and (n % 3 == 0 or held == limit):
            held_word.add(0, -1)  # before the release: never counts one that is gone
            state.release_address(index, "192.0.2.1")
            held -= 1
    out.send((held, highest))


@pytest.mark.timeout(60)
def test_shards_racing_for_an_address_never_pass_its_limit() -> None:
    """Four processes (four shards' tables in one block) claim and release the same address
    at once: the connections held never pass the limit (a claim is published before the
    other tables are read), and what is left counted is what they hold."""
    import mmap
    import multiprocessing

    from wsfleet.ipc.atomic import AtomicWords

    context = multiprocessing.get_context("fork")
    state = ShardState(4)
    shared = mmap.mmap(-1, 8)
    held_word = AtomicWords(shared)
    pipes, children = [], []
    for index in range(4):
        ours, theirs = context.Pipe(duplex=False)
        child = context.Process(target=_race, args=(state, held_word, index, 20_000, 3, theirs))
        child.start()
        pipes.append(ours)
        children.append(child)
    try:
        results = [pipe.recv() for pipe in pipes]
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
    assert all(highest <= 3 for _held, highest in results), results
    assert max(highest for _held, highest in results) == 3  # the limit was reached
    assert state.address_count("192.0.2.1") == sum(held for held, _ in results) <= 3
    held_word.close()
