"""`wsfleet serve` as an operator runs it: its exit status when the fleet is lost, options from
a TOML file and ``WSFLEET_*`` variables (and their precedence), and ``--app module:attr``.

Real processes on loopback; whatever a test starts is killed by pid at the end.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.sync.client import connect

from wsfleet.shards.worker import STOP_SIGNAL

from .conftest import free_port
from .serveproc import ServeProcess

ROOT = str(Path(__file__).resolve().parent.parent)  # where tests.apps imports from


@pytest.fixture
def serve() -> Iterator[type[ServeProcess]]:
    started: list[ServeProcess] = []

    def start(*options: str, **kwargs) -> ServeProcess:
        server = ServeProcess(*options, cwd=ROOT, **kwargs)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.end()


def exchange(port: int, message: str, **kwargs) -> str | bytes:
    with connect(f"ws://127.0.0.1:{port}", open_timeout=5, **kwargs) as ws:
        ws.send(message)
        return ws.recv(5)


# -- exit status -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_serve_exits_1_when_every_shard_is_given_up(serve) -> None:
    server = serve("--shards", "1")
    server.wait_up()
    (shard,) = server.wait_shards(1)
    # A shard told to stop by someone else than the supervisor is given up at once.
    os.kill(shard.pid, STOP_SIGNAL)
    assert server.proc.wait(20) == 1
    server.wait_for(r"ERROR front: every shard was given up: exiting with status 1")


@pytest.mark.timeout(60)
def test_serve_exits_1_when_the_supervisor_dies(serve) -> None:
    server = serve("--shards", "2")
    server.wait_up()
    server.wait_shards(2)
    supervisor = server.record_tree()[1]
    os.kill(supervisor.pid, signal.SIGKILL)
    assert server.proc.wait(20) == 1
    server.wait_for(r"ERROR front: the supervisor exited: exiting with status 1")


@pytest.mark.timeout(60)
def test_serve_exits_0_on_an_orderly_stop_after_a_shard_was_replaced(serve) -> None:
    server = serve("--shards", "2", "--shard-timeout", "2")
    server.wait_up()
    first, _ = server.wait_shards(2)
    os.kill(first.pid, signal.SIGKILL)  # a crash: restarted, not given up
    server.wait_for(r"shard \d exited \(-9\); restarting")
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0


@pytest.mark.timeout(60)
def test_serve_replaces_a_stopped_shard_after_shard_timeout(serve) -> None:
    server = serve("--shards", "2", "--shard-timeout", "3")
    server.wait_up()
    shards = server.wait_shards(2)
    victim = shards[0]
    os.kill(victim.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    server.wait_for(rf"ERROR supervisor: shard \d \(pid {victim.pid}\) is hung", timeout=10)
    deadline = time.monotonic() + 10
    while True:
        pids = {shard.pid for shard in server.shards()}
        if len(pids) == 2 and victim.pid not in pids:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert time.monotonic() - stopped <= 3 + 2
    assert exchange(server.port, "still here") == "still here"


# -- --config and WSFLEET_* ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_options_from_a_file_and_the_environment_with_the_command_line_first(
    serve, tmp_path: Path
) -> None:
    config = tmp_path / "wsfleet.toml"
    config.write_text(
        'bind = "127.0.0.1"\nshards = 3\nprotocols = ["chat", "other"]\n'
        'max_peers = 5\naccess-log = true\nlog_level = "debug"\n'
    )
    port = free_port()  # from WSFLEET_PORT, not the command line
    server = serve(
        "--config", str(config), "--shards", "2",
        env={"WSFLEET_SHARDS": "1", "WSFLEET_PORT": str(port), "WSFLEET_LOG_LEVEL": "info"},
        add_port=False,
    )  # fmt: skip
    server.port = port
    server.wait_up()
    # --shards 2 on the command line beats WSFLEET_SHARDS=1, which beats the file's 3.
    server.wait_for(r"echo on ws://127\.0\.0\.1:\d+ with 2 shards")
    assert exchange(port, "hi", subprotocols=["other"]) == "hi"  # the file's protocols
    server.wait_for(r"INFO shard \d: peer \d+ connected from 127\.0\.0\.1.*subprotocol other")
    # WSFLEET_LOG_LEVEL=info beat the file's debug: no supervisor debug lines.
    assert "DEBUG" not in server.log()


@pytest.mark.timeout(30)
def test_a_bad_environment_value_is_one_line_and_status_2(serve) -> None:
    server = serve("--shards", "1", env={"WSFLEET_MAX_PEERS": "lots"})
    assert server.proc.wait(20) == 2
    time.sleep(0.2)
    assert server.lines == [
        "wsfleet serve: error: WSFLEET_MAX_PEERS: --max-peers: not a number: 'lots'"
    ]


# -- --app ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_app_gets_the_server_before_listen_and_a_tick_after_every_poll(serve) -> None:
    server = serve("--shards", "2", "--app", "tests.apps.upper:setup")
    server.wait_up()
    server.wait_for(r"app: set up, listening: False")  # called before listen
    server.wait_for(r"application tests\.apps\.upper:setup on ws://")
    assert exchange(server.port, "shout") in ("SHOUT", b"SHOUT")
    ticks = int(exchange(server.port, "ticks"))
    time.sleep(0.5)
    later = int(exchange(server.port, "ticks"))
    assert later - ticks >= 8  # a poll (and a tick) every 50 ms at least, idle or not
    server.wait_for(r"app: peer \d+ gone")
    with connect(f"ws://127.0.0.1:{server.port}") as ws:
        ws.send("stop")  # the tick returns False: an orderly stop
        assert server.proc.wait(20) == 0
    server.wait_for(r"asked to stop")


@pytest.mark.timeout(60)
def test_an_app_may_live_in_its_signal_handlers_alone(serve) -> None:
    server = serve("--shards", "1", "--app", "tests.apps.upper:setup_signals_only")
    server.wait_up()
    assert exchange(server.port, "x") in ("only:x", b"only:x")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0


@pytest.mark.timeout(60)
def test_an_app_that_raises_ends_serve_with_status_1_and_a_bad_one_with_2(serve) -> None:
    raising = serve("--shards", "1", "--app", "tests.apps.upper:setup_raises")
    assert raising.proc.wait(20) == 1
    raising.wait_for(r"RuntimeError: the application cannot start")
    bad = serve("--shards", "1", "--app", "tests.apps.upper:setup_bad_return")
    assert bad.proc.wait(20) == 2
    bad.wait_for(r"error: --app tests\.apps\.upper:setup_bad_return: it returned int")
