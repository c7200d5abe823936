"""One orderly stop, whoever sends the signal: `wsfleet serve` as systemd would stop it.

``systemctl stop`` (``KillMode=control-group``) and ``kill -TERM -PGID`` send
SIGTERM to every process of the tree at once.  The front must still drive the
stop: every packet it sent arrives, then close 1001, nothing is restarted (or
said to be), exit status 0.  The race this guards against went one way or
the other from run to run, so the stop is tried many times.  When the front
dies alone (SIGKILL), the rest of the tree stops quietly and frees the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from .conftest import free_port
from .rawclient import OP_BINARY, RawClient

CLIENTS = 6
#: Echoed before the signal: 40 x 1500 bytes stay under the 64 KiB outbound limit of a peer
#: and, with a 4 KiB receive buffer, most of it waits in the server.
OWED, OWED_SIZE = 40, 1500


class Serve:
    """``wsfleet serve`` in a session (process group) of its own; stderr gathered by a thread."""

    def __init__(self, *options: str) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "wsfleet", "serve", "--port", str(self.port), *options]
        self.proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.tree: list[psutil.Process] = []

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # until every process of the tree closed it
            self.lines.append(line.rstrip("\n"))

    def connect(self, **kwargs) -> RawClient:
        deadline = time.monotonic() + 20
        while True:
            try:
                return RawClient("127.0.0.1", self.port, **kwargs)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def record_tree(self) -> list[psutil.Process]:
        front = psutil.Process(self.proc.pid)
        self.tree = [front, *front.children(recursive=True)]
        return self.tree

    def log(self) -> str:
        self._reader.join(15)
        return "\n".join(self.lines)

    def end(self) -> None:
        """Kill (by pid) whatever this test started that is still alive."""
        for process in self.tree or [psutil.Process(self.proc.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def serve() -> Iterator[type[Serve]]:
    started: list[Serve] = []

    def start(*options: str) -> Serve:
        server = Serve(*options)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.end()


def owe_data(server: Serve) -> tuple[list[RawClient], list[list[bytes]]]:
    """Clients that sent OWED messages and read none of the echoes."""
    clients = [server.connect(rcvbuf=4096) for _ in range(CLIENTS)]
    sent: list[list[bytes]] = []
    for index, client in enumerate(clients):
        messages = [b"%d:%d:" % (index, n) + b"x" * OWED_SIZE for n in range(OWED)]
        for message in messages:
            client.send(message)
        sent.append(messages)
    return clients, sent


def read_all(clients: list[RawClient]) -> list[tuple[list[tuple[int, bytes]], int | None]]:
    results: list[tuple[list[tuple[int, bytes]], int | None]] = [([], None)] * len(clients)

    def read(index: int) -> None:
        results[index] = clients[index].read_until_close()

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return results


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attempt", range(10))
def test_sigterm_to_the_process_group_is_one_orderly_stop(serve, attempt: int) -> None:
    server = serve("--shards", "2")
    clients, sent = owe_data(server)
    time.sleep(0.3)  # the echoes are sent: in the shards' buffers, which the clients do not read
    tree = server.record_tree()
    assert len(tree) == 4, tree  # front, supervisor, two shards
    os.killpg(server.proc.pid, signal.SIGTERM)  # every process at once, as systemd does
    results = read_all(clients)
    assert server.proc.wait(15) == 0
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    log = server.log()
    assert "restart" not in log and "Traceback" not in log and "given up" not in log, log
    for index, ((messages, code), expected) in enumerate(zip(results, sent, strict=True)):
        assert [payload for _, payload in messages] == expected, (index, len(messages))
        assert {opcode for opcode, _ in messages} <= {OP_BINARY}
        assert code == 1001, (index, code)
    for client in clients:
        client.close_socket()
    assert port_is_free(server.port)


@pytest.mark.timeout(60)
def test_sigterm_to_the_group_during_traffic_delivers_a_prefix_then_1001(serve) -> None:
    """Echoes in flight when the signal comes: each client gets what was echoed, in order."""
    server = serve("--shards", "2")
    clients, sent = owe_data(server)
    time.sleep(0.3)
    tree = server.record_tree()
    for index, client in enumerate(clients):  # a second burst, racing the signal
        for n in range(OWED, 2 * OWED):
            message = b"%d:%d:" % (index, n) + b"y" * 100
            client.send(message)
            sent[index].append(message)
    os.killpg(server.proc.pid, signal.SIGTERM)
    results = read_all(clients)
    assert server.proc.wait(15) == 0
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    assert "restart" not in server.log()
    for (messages, code), expected in zip(results, sent, strict=True):
        received = [payload for _, payload in messages]
        assert len(received) >= OWED and received == expected[: len(received)]
        assert code == 1001


@pytest.mark.timeout(60)
def test_the_front_killed_alone_stops_the_tree_quietly_and_frees_the_port(serve) -> None:
    server = serve("--shards", "2")
    clients, _ = owe_data(server)
    time.sleep(0.3)
    tree = server.record_tree()
    os.kill(server.proc.pid, signal.SIGKILL)
    results = read_all(clients)
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert alive == []
    log = server.log()
    assert "restart" not in log and "Traceback" not in log and "given up" not in log, log
    # The front held the echoes it had not sent yet; the shards close what they hold: 1001.
    assert [code for _, code in results] == [1001] * CLIENTS
    for client in clients:
        client.close_socket()
    assert port_is_free(server.port)


@pytest.mark.timeout(60)
def test_a_shard_killed_alone_is_still_restarted(serve) -> None:
    server = serve("--shards", "2")
    server.connect().close_socket()
    server.record_tree()
    (supervisor,) = psutil.Process(server.proc.pid).children()  # the front's only child
    shards = supervisor.children()
    assert len(shards) == 2
    os.kill(shards[0].pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = supervisor.children()
        if len(now) == 2 and shards[0] not in now:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed shard was not replaced")
    server.record_tree()
    client = server.connect()
    client.send(b"still here")
    assert client.recv_frame() == (OP_BINARY, b"still here")
    client.close_socket()
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert "exited (-9); restarting" in server.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("attempt", range(10))
def test_sigterm_to_an_idle_process_group_is_one_orderly_stop(serve, attempt: int) -> None:
    """Idle shards exit within a millisecond of a signal: the race at its tightest."""
    server = serve("--shards", "2")
    server.connect().close_socket()  # up and serving
    time.sleep(0.1)
    tree = server.record_tree()
    os.killpg(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(15) == 0
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    log = server.log()
    assert "restart" not in log and "Traceback" not in log and "given up" not in log, log
    assert port_is_free(server.port)


#: A front with no SIGTERM handler of its own (Python's default: die at once).
PLAIN_FRONT = """
import sys, time
from wsfleet import WebSocketServer, Error
server = WebSocketServer(shards=2)
def echo(peer_id):
    peer = server.get_peer(peer_id)
    peer.put_packet(peer.get_packet())
server.connect("data_received", echo)
assert server.listen(int(sys.argv[1])) == Error.OK
print("listening", flush=True)
while True:
    server.poll(0.05)
"""


@pytest.mark.timeout(60)
def test_a_front_without_a_handler_dies_of_the_group_sigterm_and_the_rest_stops(
    tmp_path,
) -> None:
    """Supervisor and shards ignore the SIGTERM; the front's death then stops them: 1001."""
    port = free_port()
    script = tmp_path / "front.py"
    script.write_text(PLAIN_FRONT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    tree: list[psutil.Process] = []
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
        clients = [RawClient("127.0.0.1", port) for _ in range(CLIENTS)]
        for client in clients:
            client.send(b"hello")
            assert client.recv_frame() == (OP_BINARY, b"hello")
        front = psutil.Process(proc.pid)
        tree = [front, *front.children(recursive=True)]
        os.killpg(proc.pid, signal.SIGTERM)
        results = read_all(clients)
        assert proc.wait(15) == -signal.SIGTERM
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == []
        assert [code for _, code in results] == [1001] * CLIENTS
        _, log = proc.communicate(timeout=10)
        assert "restart" not in log and "Traceback" not in log, log
        assert port_is_free(port)
        for client in clients:
            client.close_socket()
    finally:
        for process in tree or [psutil.Process(proc.pid)]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(10)
