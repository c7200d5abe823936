"""`wsfleet serve`: the echo server from the command line, how it stops, how it refuses misuse.

Every misuse is one line on stderr and status 2: `BAD_VALUES` holds bad values
for every option of ``wsfleet serve``, and a test walks the parser so that a
new option without its bad values fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsfleet.binding import resolve
from wsfleet.cli import serve_parser, url

from .conftest import connect_when_up, free_port
from .rawclient import OP_BINARY, OP_TEXT, RawClient


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_echoes_and_stops_on_a_signal_with_close_1001(signum: int) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "2"]
    argv += ["--protocols", "chat,other", "--access-log"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:

        async def body() -> None:
            ws = await connect_when_up(f"ws://127.0.0.1:{port}", subprotocols=["other"])
            assert ws.subprotocol == "other"
            await ws.send("text")
            assert await ws.recv() == "text"
            await ws.send(b"\x00binary")
            assert await ws.recv() == b"\x00binary"
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            proc.send_signal(signum)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
            _, alive = await asyncio.to_thread(psutil.wait_procs, tree, 10)
            assert alive == []

        asyncio.run(asyncio.wait_for(body(), 40))
        assert proc.wait(10) == 0
        log = proc.stderr.read()
        assert "connected from 127.0.0.1" in log and "stopped in" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_serve_reports_a_port_in_use() -> None:
    port = free_port()
    import socket

    with socket.socket() as holder:
        holder.bind(("0.0.0.0", port))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--shards", "1"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "ERR_ALREADY_IN_USE" in result.stderr


@pytest.mark.timeout(60)
def test_serve_gd_mp_api_is_a_multiplayer_relay() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "wsfleet", "serve", "--port", str(port), "--gd-mp-api"]
    proc = subprocess.Popen([*argv, "--shards", "2", "--quiet"])
    header = struct.Struct("<Bii")
    try:

        async def body() -> None:
            first = await connect_when_up(f"ws://127.0.0.1:{port}")
            second = await connect(f"ws://127.0.0.1:{port}")
            ids = []
            for ws in (first, second):
                kind, sender, to = header.unpack_from(frame := await ws.recv())
                assert (kind, sender, to) == (3, 1, 0)  # SYS_ID from the server
                ids.append(struct.unpack_from("<i", frame, 9)[0])
            relayed = header.pack(0, ids[0], ids[1]) + b"\x04raw"
            await first.send(relayed)
            while (frame := await second.recv())[0] != 0:
                pass  # system messages first
            assert frame == relayed  # byte for byte, from kept
            await first.send(header.pack(0, ids[0], 1) + b"\x04to the server")
            await first.close()
            await second.close()

        asyncio.run(asyncio.wait_for(body(), 40))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- misuse: one line, status 2, for a bad value of every option -------------------------

#: Bad values of each `wsfleet serve` option. ``{cert}``, ``{key}``, ``{other_key}`` and
#: ``{dir}`` name files of the `tls_files` fixture; ``{in_use}`` a port another socket holds.
BAD_VALUES: dict[str, list[list[str]]] = {
    "--port": [["--port", "-1"], ["--port", "70000"], ["--port", "x"], ["--port", "{in_use}"]],
    "--bind": [
        # Names that fail before any DNS query (a label over 63 bytes, an empty label): the
        # tests send nothing to a resolver off this machine.
        ["--bind", "x" * 64 + ".example"],
        ["--bind", "bad..name"],
        ["--bind", "192.0.2.1"],  # TEST-NET-1: an address of no interface here
        ["--bind", ""],
    ],
    "--shards": [["--shards", "0"], ["--shards", "-1"], ["--shards", "two"], ["--shards", "1e9"]],
    "--protocols": [["--protocols", "chat room"], ["--protocols", "chat,,other"]],
    "--tls-cert": [
        ["--tls-cert", "{cert}"],
        ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "{key}"],
        ["--tls-cert", "{dir}", "--tls-key", "{key}"],
        ["--tls-cert", "/etc/hostname", "--tls-key", "{key}"],
        ["--tls-cert", "{cert}", "--tls-key", "{other_key}"],
    ],
    "--tls-key": [
        ["--tls-key", "{key}"],
        ["--tls-cert", "{cert}", "--tls-key", "/nonexistent/key.pem"],
        ["--tls-cert", "{cert}", "--tls-key", "{cert}"],  # no private key in it
    ],
    "--gd-mp-api": [["--gd-mp-api=yes"]],
    "--quiet": [["--quiet=1"]],
    "--max-peers": [["--max-peers", "-1"], ["--max-peers", "many"], ["--max-peers", "1.5"]],
    "--max-peers-per-address": [
        ["--max-peers-per-address", "-1"],
        ["--max-peers-per-address", "some"],
    ],
    "--health-path": [["--health-path", "healthz"], ["--health-path", ""]],
    "--max-message-rate": [["--max-message-rate", "0"], ["--max-message-rate", "fast"]],
    "--message-burst": [["--message-burst", "0"], ["--message-burst", "-3"]],
    "--forwarded-allow-ips": [
        ["--forwarded-allow-ips", "proxy.example"],
        ["--forwarded-allow-ips", "10.0.0.0/33"],
    ],
    "--max-message-size": [
        ["--max-message-size", "0"],
        ["--max-message-size", "-1"],
        ["--max-message-size", "16777217"],
        ["--max-message-size", "1MiB"],
    ],
    "--max-buffered-bytes": [
        ["--max-buffered-bytes", "0"],
        ["--max-buffered-bytes", "-5"],
        ["--max-buffered-bytes", "lots"],
    ],
    "--handshake-timeout": [
        ["--handshake-timeout", "0"],
        ["--handshake-timeout", "-1"],
        ["--handshake-timeout", "soon"],
        ["--handshake-timeout", "inf"],
        ["--handshake-timeout", "nan"],
    ],
    "--max-request-bytes": [
        ["--max-request-bytes", "10"],
        ["--max-request-bytes", "0"],
        ["--max-request-bytes", "8k"],
    ],
    "--allowed-origins": [
        ["--allowed-origins", ""],
        ["--allowed-origins", "game.example"],
        ["--allowed-origins", "https://game.example/path"],
        ["--allowed-origins", "https://game.example:port"],
    ],
    "--require-origin": [["--require-origin"], ["--require-origin=1"]],
    "--compression": [["--compression=yes"]],
    "--compression-no-context-takeover": [["--compression-no-context-takeover=1"]],
    "--compression-window-bits": [
        ["--compression-window-bits", "8"],
        ["--compression-window-bits", "16"],
        ["--compression-window-bits", "x"],
    ],
    "--compression-mem-level": [
        ["--compression-mem-level", "0"],
        ["--compression-mem-level", "10"],
    ],
    "--compression-level": [["--compression-level", "-1"], ["--compression-level", "10"]],
    "--ping-interval": [
        ["--ping-interval", "-1"],
        ["--ping-interval", "x"],
        ["--ping-interval", "nan"],
    ],
    "--ping-timeout": [["--ping-timeout", "-0.5"], ["--ping-timeout", "inf"]],
    "--slow-consumer-close-code": [
        ["--slow-consumer-close-code", "1000"],
        ["--slow-consumer-close-code", "x"],
    ],
    "--control": [["--control", "/nonexistent/folder/x.sock"], ["--control", "{dir}"]],
    "--metrics": [
        ["--metrics", "9100"],
        ["--metrics", "127.0.0.1:x"],
        ["--metrics", "127.0.0.1:{in_use}"],
    ],
    "--log-level": [["--log-level", "loud"], ["--log-level", ""]],
    "--log-format": [["--log-format", "xml"]],
    "--access-log": [["--access-log=yes"]],
    "--shard-timeout": [
        ["--shard-timeout", "1"],
        ["--shard-timeout", "0"],
        ["--shard-timeout", "x"],
    ],
    "--data-received-mode": [["--data-received-mode", "batch"], ["--data-received-mode", ""]],
    "--shard-handler": [
        ["--shard-handler", "no_such_module_here:make"],
        ["--shard-handler", "os"],
        ["--shard-handler", "os:no_such_attr"],
        ["--shard-handler", "os:sep"],  # not callable
        ["--gd-mp-api", "--shard-handler", "tests.apps.shard_apps:echo"],
    ],
    "--app": [
        ["--app", "no_such_module_here:setup"],
        ["--app", "os"],
        ["--app", "os:no_such_attr"],
        ["--app", "os:sep"],  # not callable
    ],
    "--cluster": [
        ["--cluster", ""],
        ["--cluster", "127.0.0.1:4222"],  # no scheme
        ["--cluster", "http://127.0.0.1:4222"],
        ["--cluster", "nats://127.0.0.1:port"],
    ],
    "--cluster-tls-ca": [
        ["--cluster-tls-ca", "{cert}"],  # without --cluster
        ["--cluster", "nats://127.0.0.1:4222", "--cluster-tls-ca", "/nonexistent/ca.pem"],
        ["--cluster", "nats://127.0.0.1:4222", "--cluster-tls-ca", "/etc/hostname"],
    ],
    "--cluster-creds": [
        ["--cluster-creds", "{cert}"],  # without --cluster
        ["--cluster", "nats://127.0.0.1:4222", "--cluster-creds", "/nonexistent/node.creds"],
        ["--cluster", "nats://127.0.0.1:4222", "--cluster-creds", "{cert}"],  # no JWT in it
    ],
    "--node-name": [
        ["--node-name", "a"],  # without --cluster
        ["--cluster", "nats://127.0.0.1:4222", "--node-name", "a.b"],
        ["--cluster", "nats://127.0.0.1:4222", "--node-name", ""],
        ["--cluster", "nats://127.0.0.1:4222", "--node-name", "x" * 65],
    ],
    "--config": [
        ["--config", "/nonexistent/wsfleet.toml"],
        ["--config", "{not_toml}"],
        ["--config", "{unknown_key}"],
        ["--config", "{bad_value}"],
        ["--config", "{bad_switch}"],
    ],
}

#: Misuse of the command itself rather than of one option.
BAD_COMMANDS: list[list[str]] = [["bogus"], ["serve", "extra"], ["serve", "--no-such-option"]]


def serve_options() -> set[str]:
    """Every option of ``wsfleet serve`` but --help, from the parser itself."""
    return {
        action.option_strings[-1]
        for action in serve_parser()._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }


def test_every_serve_option_has_bad_values() -> None:
    assert serve_options() == set(BAD_VALUES)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import trustme

    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    other = ca.issue_cert("localhost")
    files = {
        "cert": folder / "cert.pem",
        "key": folder / "key.pem",
        "other_key": folder / "other-key.pem",
    }
    cert.cert_chain_pems[0].write_to_path(files["cert"])
    cert.private_key_pem.write_to_path(files["key"])
    other.private_key_pem.write_to_path(files["other_key"])
    return {**{name: str(path) for name, path in files.items()}, "dir": str(folder)}


@pytest.fixture(scope="module")
def config_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Bad --config files, one problem each."""
    folder = tmp_path_factory.mktemp("config")
    texts = {
        "not_toml": "port = = 1\n",
        "unknown_key": "portt = 9080\n",
        "bad_value": "max-peers = -1\n",
        "bad_switch": 'access_log = "sometimes"\n',
    }
    paths = {}
    for name, text in texts.items():
        path = folder / f"{name}.toml"
        path.write_text(text)
        paths[name] = str(path)
    return paths


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


def run_wsfleet(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
    """``wsfleet ARGV...``; a server that starts anyway is ended by the timeout (a failure)."""
    return subprocess.run(
        [sys.executable, "-m", "wsfleet", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_and_status_2(result: subprocess.CompletedProcess) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and "error:" in lines[0], lines
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    "bad", [case for cases in BAD_VALUES.values() for case in cases], ids=" ".join
)
def test_a_bad_serve_option_is_one_line_and_status_2(
    bad: list[str], tls_files: dict[str, str], config_files: dict[str, str], port_in_use: int
) -> None:
    values = {**tls_files, **config_files, "in_use": str(port_in_use)}
    argv = ["serve", "--port", str(free_port()), "--shards", "1"]
    argv += [part.format(**values) for part in bad]
    assert_one_line_and_status_2(run_wsfleet(argv))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("argv", BAD_COMMANDS, ids=" ".join)
def test_a_bad_command_is_one_line_and_status_2(argv: list[str]) -> None:
    assert_one_line_and_status_2(run_wsfleet(argv))


# -- --bind with a host name, and URLs ------------------------------------------------------


def test_urls_put_ipv6_addresses_in_brackets() -> None:
    assert url("ws", "::1", 9080) == "ws://[::1]:9080"
    assert url("wss", "fe80::1%eth0", 443) == "wss://[fe80::1%eth0]:443"
    assert url("ws", "127.0.0.1", 9080) == "ws://127.0.0.1:9080"
    assert url("ws", "localhost", 1) == "ws://localhost:1"
    assert url("ws", "[::1]", 2) == "ws://[::1]:2"


class Serving:
    """``wsfleet serve ARGV...`` in its own session, its stderr read by a thread."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsfleet", "serve", *argv],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def connect(self, host: str, port: int, **kwargs) -> RawClient:
        deadline = time.monotonic() + 20
        while True:
            try:
                return RawClient(host, port, **kwargs)
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self) -> str:
        """SIGTERM, status 0, and the log."""
        tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(15) == 0
        psutil.wait_procs(tree, timeout=5)
        self._reader.join(10)
        return "\n".join(self.lines)

    def end(self) -> None:
        if self.proc.poll() is None:
            for process in psutil.Process(self.proc.pid).children(True):
                process.kill()
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def serving() -> Iterator[type[Serving]]:
    started: list[Serving] = []

    def start(*argv: str) -> Serving:
        started.append(Serving(*argv))
        return started[-1]

    yield start  # type: ignore[misc]
    for server in started:
        server.end()


def echo_once(client: RawClient) -> None:
    client.send(b"ping over " + str(client.sock.getpeername()).encode())
    opcode, payload = client.recv_frame()
    assert (opcode, payload) == (OP_BINARY, b"ping over " + str(client.sock.getpeername()).encode())


@pytest.mark.timeout(60)
def test_bind_localhost_serves_on_every_address_localhost_has(serving) -> None:
    """Needs WebSocketServer.bind_ip to take host names for ::1 (where localhost has it)."""
    port = free_port()
    server = serving("--bind", "localhost", "--port", str(port), "--shards", "1")
    addresses = [address.host for address in resolve("localhost")]
    assert "127.0.0.1" in addresses
    for address in addresses:
        client = server.connect(address, port)
        echo_once(client)
        client.close_socket()
    log = server.stop()
    assert f"echo on ws://localhost:{port} with 1 shards" in log


@pytest.mark.timeout(60)
def test_bind_ipv6_loopback_prints_the_url_in_brackets(serving) -> None:
    port = free_port()
    server = serving("--bind", "::1", "--port", str(port), "--shards", "1")
    client = server.connect("::1", port)
    echo_once(client)
    client.close_socket()
    assert f"echo on ws://[::1]:{port} with 1 shards" in server.stop()


# -- the echo never drops what it accepted ----------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", ["binary", "text"])
def test_the_echo_keeps_every_message_for_a_slow_reader(serving, mode: str) -> None:
    """A client that stops reading while the server echoes ~6 MB gets all of it, in order."""
    port = free_port()
    server = serving("--port", str(port), "--shards", "2", "--quiet")
    client = server.connect("127.0.0.1", port, rcvbuf=4096, timeout=60)
    count, size = 200, 30000
    opcode = OP_BINARY if mode == "binary" else OP_TEXT
    messages = [(b"%05d" % n) + bytes([65 + n % 26]) * size for n in range(count)]

    def send_all() -> None:  # blocks while the server, waiting for us, stops reading
        for message in messages:
            client.send(message, opcode)

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    time.sleep(3)  # not reading: the echo fills our buffers and the server's, then waits
    received: list[bytes] = []
    while len(received) < count:
        got_opcode, payload = client.recv_frame()
        assert got_opcode == opcode
        received.append(payload)
    sender.join(30)
    assert not sender.is_alive()
    assert received == messages  # every one, in order, intact
    client.close_socket()
    log = server.stop()
    assert "waited for room in a slow reader's outbound buffer" in log and "none dropped" in log
    # Rate-limited: the first wait says so at once, the rest within 10 s at the stop.
    assert log.count("waited for room") <= 2, log


@pytest.mark.timeout(90)
def test_the_echo_returns_a_message_of_the_largest_accepted_size(serving) -> None:
    port = free_port()
    largest = 2 * 1024 * 1024
    server = serving("--port", str(port), "--shards", "1", "--max-message-size", str(largest))
    client = server.connect("127.0.0.1", port, timeout=60)
    message = os.urandom(largest)
    client.send(message)
    assert client.recv_frame() == (OP_BINARY, message)
    client.close_socket()
    server.stop()
