"""A hung shard (its loop stuck, the process alive) is found by its heartbeat and replaced.

SIGSTOP stands for a loop stuck in application-independent code: the process
lives, its sockets stay open, nothing turns.  With ``shard_timeout=3`` the
supervisor must SIGKILL it and start a successor within 3 + 2 s, the hung
shard's peers must be reported gone (``client_disconnected(id, False)``), and
the other shard's peers must not notice.  A shard that is only busy (a long
burst of traffic) keeps beating and is left alone, even at a short timeout.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from wsfleet import WebSocketServer
from wsfleet.ipc import messages as m

from .rawclient import RawClient
from .wsserver import Recorder, echo

TIMEOUT = 3.0


def poll_until(server: WebSocketServer, condition, timeout: float) -> float:
    """Poll until ``condition()``; the seconds it took (fails after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out waiting for {condition}"
        server.poll(0.02)
    return time.monotonic() - started


def echoed(server: WebSocketServer, client: RawClient, payload: bytes) -> bytes:
    client.send(payload)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(client.recv_frame()[1]), daemon=True)
    reader.start()
    poll_until(server, lambda: not reader.is_alive(), 10)
    return got[0]


@pytest.mark.timeout(60)
def test_a_stopped_shard_is_replaced_within_its_timeout_and_its_peers_reported_gone(
    servers,
) -> None:
    server = servers(shards=2, shard_timeout=TIMEOUT)
    recorder = Recorder(server, read_data=False)
    echo(server)
    clients = [RawClient("127.0.0.1", server.port) for _ in range(16)]
    try:
        poll_until(server, lambda: len(recorder.connected_ids()) == 16, 10)
        span = m.id_span(2)
        by_shard: dict[int, list[int]] = {0: [], 1: []}
        for peer_id in recorder.connected_ids():
            by_shard[m.owner_of(peer_id, span)].append(peer_id)
        assert by_shard[0] and by_shard[1], by_shard  # the kernel spread them (2^-15 odds)
        by_port = {client.sock.getsockname()[1]: client for client in clients}
        survivor = by_port[server.get_peer_port(by_shard[1][0])]

        hung_pid = server.get_shard_status()[0]["pid"]
        os.kill(hung_pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # The other shard serves on meanwhile.
        assert echoed(server, survivor, b"during") == b"during"

        def replaced() -> bool:
            status = server.get_shard_status()[0]
            return status["state"] == "running" and status["pid"] not in (None, hung_pid)

        poll_until(server, replaced, TIMEOUT + 10)
        took = time.monotonic() - stopped_at
        assert took <= TIMEOUT + 2, f"replaced after {took:.2f} s"
        print(f"\nhung shard replaced {took:.2f} s after SIGSTOP (shard_timeout {TIMEOUT:g} s)")
        assert not psutil.pid_exists(hung_pid)  # killed and reaped
        gone = {(event[1], event[2]) for event in recorder.named("disconnected")}
        assert gone == {(peer_id, False) for peer_id in by_shard[0]}
        assert server.get_shard_status()[1]["peers"] == len(by_shard[1])
        assert echoed(server, survivor, b"after") == b"after"
        # The successor takes new connections.
        newcomers = [RawClient("127.0.0.1", server.port) for _ in range(8)]
        clients += newcomers
        poll_until(server, lambda: len(recorder.connected_ids()) == 24, 10)
    finally:
        for client in clients:
            client.close_socket()


@pytest.mark.timeout(60)
def test_a_busy_shard_keeps_beating_and_is_not_killed(servers) -> None:
    server = servers(shards=1, shard_timeout=2.0)
    recorder = Recorder(server, read_data=False)

    def echo_what_fits(peer_id: int) -> None:  # a burst fills the peer's outbound buffer
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            peer.put_packet(peer.get_packet())

    server.connect("data_received", echo_what_fits)
    client = RawClient("127.0.0.1", server.port)
    payload = b"b" * 16384
    burst_seconds = 5.0  # longer than the timeout
    received = [0]
    stop = threading.Event()

    def send() -> None:
        deadline = time.monotonic() + burst_seconds
        while time.monotonic() < deadline:
            client.send(payload)
        stop.set()

    def read() -> None:
        while True:
            try:
                client.recv_frame()
            except OSError:
                return
            received[0] += 1

    threads = [
        threading.Thread(target=send, daemon=True),
        threading.Thread(target=read, daemon=True),
    ]
    try:
        poll_until(server, lambda: recorder.connected_ids(), 10)
        pid = server.get_shard_status()[0]["pid"]
        for thread in threads:
            thread.start()
        poll_until(server, stop.is_set, burst_seconds + 20)
        assert received[0] > 100
        status = server.get_shard_status()[0]
        assert status["pid"] == pid and status["state"] == "running"
        assert recorder.named("disconnected") == []
    finally:
        client.close_socket()
