"""The broadcast, connect and idle scenarios count what the server saw.

Each accounting test runs a scenario's load function (`broadcast.run_broadcast`,
`connect.run_connect`, `idle.run_idle`) against a real server process on 127.0.0.1
that counts what it saw and prints the counts on SIGTERM (conftest's
`counting_server`): the websockets baseline ``ws_server --mode echo|broadcast
--report-count``, or wsfleet's broadcast application (``wsfleet_apps broadcast
--report-count``, the public API over two shards).
Every scenario drains before it returns, so nothing is in flight at the end and
the counts must match exactly, with no errors. The server is killed by pid at
teardown if it is still running. The last tests cover the file descriptor
limit (with a fake getrlimit, so the real limits stay as they are), the Node
check ("not installed") and one run of the command line through `bench`.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from wsfleet.loadtest import procstats, scenarios
from wsfleet.loadtest.broadcast import BroadcastCounts, run_broadcast
from wsfleet.loadtest.catalog import node_status, server_catalog
from wsfleet.loadtest.connect import run_connect
from wsfleet.loadtest.counters import merge_histograms
from wsfleet.loadtest.echo_bench import run_echo_load
from wsfleet.loadtest.idle import run_idle
from wsfleet.loadtest.procstats import FD_MARGIN, ResourceLimitError, raise_nofile

from .conftest import CountingServer

HOST = "127.0.0.1"


def websockets_server(start: Callable[..., CountingServer], mode: str) -> CountingServer:
    return start("wsfleet.loadtest.ws_server", "--mode", mode)


def check_broadcast(r: BroadcastCounts, seen: dict[str, int], clients: int) -> None:
    assert r.errors == 0, r.error_samples
    assert r.sequence_errors == 0 and r.missing == 0
    assert r.sent > 0 and r.completed == r.sent
    # Every broadcast reached every other client, exactly once.
    assert r.expected == r.sent * (clients - 1)
    assert r.delivered == r.expected
    assert 0 < r.window_received <= r.delivered == r.received
    assert 0 < r.window_completed <= r.completed
    assert r.rate > 0 and r.broadcasts_per_s > 0
    # What the server saw: every client, every broadcast, and the deliveries it made.
    assert seen["connected"] == clients
    assert seen["received"] == r.sent
    assert seen["deliveries"] == r.delivered
    assert r.latency_samples > 0
    p50, p99, top = r.latency_us()
    assert 0 < p50 <= p99 <= top
    hist = merge_histograms([r.latency_hist])
    assert hist.get_total_count() == r.latency_samples


@pytest.mark.timeout(60)
def test_broadcast_counts_what_the_websockets_server_sent(counting_server) -> None:
    server = websockets_server(counting_server, "broadcast")
    clients = 20
    r = run_broadcast(
        HOST, server.port, connections=clients, senders=4, inflight=3, seconds=0.6, warmup=0.2
    )
    seen = server.stop_and_count()
    check_broadcast(r, seen, clients)
    assert seen["peak"] == clients and seen["closed"] == clients


@pytest.mark.timeout(60)
def test_broadcast_counts_what_wsfleet_sent(counting_server) -> None:
    server = counting_server("wsfleet.loadtest.wsfleet_apps", "broadcast", "--shards", "2")
    clients = 16
    # settle: the front learns of each client from its shard; the count it prints relies on it.
    r = run_broadcast(
        HOST,
        server.port,
        connections=clients,
        senders=16,
        inflight=2,
        seconds=0.6,
        warmup=0.2,
        settle=0.5,
    )
    seen = server.stop_and_count()
    check_broadcast(r, seen, clients)
    assert seen["broadcasts"] == r.sent


@pytest.mark.timeout(60)
def test_connect_counts_every_handshake_the_server_accepted(counting_server) -> None:
    server = websockets_server(counting_server, "echo")
    r = run_connect(HOST, server.port, concurrency=4, seconds=0.6, warmup=0.2)
    seen = server.stop_and_count()
    assert r.errors == 0 and r.failures == 0, r.error_samples
    assert r.unclean_closes == 0  # websockets answers the close handshake
    assert r.handshakes == r.received == r.attempts == r.sent == r.cycles > 0
    assert 0 < r.window_received <= r.cycles
    assert r.rate > 0
    assert seen["connected"] == r.handshakes
    assert seen["closed"] == r.handshakes
    assert seen["received"] == 0
    assert seen["peak"] <= 4  # one connection per loop at a time
    p50, p99, _ = r.latency_us()
    assert 0 < p50 <= p99
    assert r.latency_samples > 0


@pytest.mark.timeout(60)
def test_picows_server_echoes_and_closes_what_the_load_sent(counting_server) -> None:
    server = counting_server("wsfleet.loadtest.picows_server", "--mode", "echo")
    echo = run_echo_load(HOST, server.port, connections=4, inflight=8, seconds=0.5, warmup=0.1)
    text = run_echo_load(
        HOST, server.port, connections=2, inflight=2, size=70_000, text=True, seconds=0.2,
        warmup=0.0, first_index=4,
    )  # fmt: skip
    cycles = run_connect(HOST, server.port, concurrency=3, seconds=0.5, warmup=0.1)
    seen = server.stop_and_count()
    for r in (echo, text):
        assert r.errors == 0 and r.mismatches == 0, r.error_samples
        assert r.in_flight == 0 and r.received == r.sent > 0
    assert cycles.errors == 0 and cycles.failures == 0, cycles.error_samples
    assert cycles.unclean_closes == 0 and cycles.cycles == cycles.handshakes > 0
    assert seen["echoed"] == seen["received"] == echo.sent + text.sent
    assert seen["connected"] == seen["closed"] == 6 + cycles.handshakes


@pytest.mark.timeout(30)
def test_picows_missing_is_not_installed_and_its_server_says_so() -> None:
    ns = argparse.Namespace(godot="godot3-server", godot_sleep_usec=0, node="node")
    assert server_catalog("echo", ns, "/tmp", ["picows"])[0]["skip"] is None
    assert server_catalog("broadcast", ns, "/tmp", ["picows"])[0]["skip"].startswith(
        "not applicable"
    )
    # An interpreter where `import picows` fails: the catalog skips it, the server refuses.
    code = (
        "import sys; sys.modules['picows'] = None; "
        "from wsfleet.loadtest.catalog import picows_status; print(picows_status()); "
        "from wsfleet.loadtest.picows_server import main; sys.exit(main(['--port', '0']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stdout.startswith("not installed: picows")
    assert "picows is not installed" in proc.stderr


@pytest.mark.timeout(60)
def test_idle_holds_every_connection_and_measures_the_server(counting_server) -> None:
    server = websockets_server(counting_server, "echo")
    n = 300
    r = run_idle(HOST, server.port, server_pid=server.proc.pid, connections=n, rate=1500, hold=0.3)
    seen = server.stop_and_count()
    assert r.errors == 0 and r.failures == 0, r.error_samples
    assert r.opened == r.still_open == n and r.closed_early == 0
    assert seen["connected"] == n and seen["peak"] == n and seen["closed"] == n
    assert seen["received"] == 0
    # At the asked rate (300 at 1500/s is 0.2 s), within scheduling noise.
    assert 0.15 < r.open_s < 5
    assert r.nofile_soft >= n + FD_MARGIN
    assert r.server_processes == 1
    # websockets keeps a few KiB per connection in the process; the figure must show it.
    assert r.rss_after > r.rss_before
    assert 0 < r.rss_per_connection < 1024 * 1024
    assert r.uss_per_connection is None or not math.isnan(r.uss_per_connection)


@pytest.mark.timeout(30)
def test_the_descriptor_limit_is_raised_up_to_the_hard_limit(monkeypatch) -> None:
    calls: list[tuple[int, tuple[int, int]]] = []
    monkeypatch.setattr(procstats.resource, "getrlimit", lambda _which: (256, 4096))
    monkeypatch.setattr(procstats.resource, "setrlimit", lambda w, lim: calls.append((w, lim)))
    assert raise_nofile(100) == 256
    assert calls == []
    assert raise_nofile(3000) == 3000
    assert calls == [(procstats.resource.RLIMIT_NOFILE, (3000, 4096))]
    with pytest.raises(ResourceLimitError, match="hard limit is 4096"):
        raise_nofile(5000)
    # run_idle refuses before it opens anything (no server listens on port 1).
    with pytest.raises(ResourceLimitError, match=r"at most 4032 connections"):
        run_idle(HOST, 1, server_pid=1, connections=5000)
    assert len(calls) == 1


@pytest.mark.timeout(30)
def test_node_without_ws_is_not_installed(tmp_path: Path) -> None:
    assert node_status(str(tmp_path / "no-such-node")).startswith("not installed")
    fake = tmp_path / "node"
    fake.write_text("#!/bin/sh\nexit 1\n")  # as node does when require.resolve('ws') fails
    fake.chmod(0o755)
    assert node_status(str(fake)) == (
        "not installed: the ws module is missing (npm install ws; --node-path or NODE_PATH)"
    )


@pytest.mark.timeout(90)
def test_command_line_runs_a_scenario_and_skips_what_is_missing(capsys, tmp_path: Path) -> None:
    # The default set, narrowed to the websockets server and a Node that does not exist.
    status = scenarios.main(
        [
            "connect",
            "--only",
            "websockets,node",
            "--node",
            str(tmp_path / "no-such-node"),
            "--concurrency",
            "2",
            "--seconds",
            "0.3",
            "--warmup",
            "0.1",
            "--settle",
            "0.1",
            "--server-cpus",
            "",
            "--client-cpus",
            "",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"\[1/1\] websockets: [\d,]+ handshakes/s .* errors 0; stopped: status 0", out)
    assert "node: not installed" in out
