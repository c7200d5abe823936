"""`wsfleet loadtest` against a server the test starts, and `compare` end to end.

The load tests run `wsfleet loadtest` as a user would (``python -m wsfleet
loadtest ...`` in a subprocess) against the websockets echo baseline
(``ws_server --port 0 --report-count``): the count it reports must be
plausible and match what the server echoed, with no errors. `compare` runs one
short round of echo over websockets and wsfleet-1 and writes its markdown and
JSON. Every process a test starts is killed by pid at the end, with everything
under it (compare starts servers in their own sessions).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import CountingServer

HOST = "127.0.0.1"


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, each by pid; reap ``proc``."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.kill()
    for p in tree:
        try:
            p.kill()  # psutil checks that the pid still names the same process
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)
    psutil.wait_procs(tree, timeout=10)


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        kill_tree(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def echo_server(counting_server: Callable[..., CountingServer]) -> CountingServer:
    """The websockets echo baseline on a free port."""
    return counting_server("wsfleet.loadtest.ws_server", "--mode", "echo")


def run(started: list[subprocess.Popen], argv: list[str], timeout: float) -> tuple[int, str, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(proc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.timeout(90)
def test_loadtest_echo_reports_what_the_server_echoed(echo_server, started, tmp_path) -> None:
    server, port = echo_server.proc, echo_server.port
    out_json = tmp_path / "echo.json"
    argv = [sys.executable, "-m", "wsfleet", "loadtest", "echo"]
    argv += ["--url", f"ws://{HOST}:{port}/any/path?x=1", "--connections", "4"]
    argv += ["--inflight", "4", "--size", "100", "--seconds", "1", "--warmup", "0.2"]
    argv += ["--procs", "2", "--server-pid", str(server.pid), "--json", str(out_json)]
    status, out, err = run(started, argv, timeout=60)
    assert status == 0, out + err
    # The table, and the phases on stderr while it ran.
    assert re.search(r"^msg/s +[\d,]+$", out, re.M), out
    assert re.search(r"^errors +0$", out, re.M), out
    assert "measuring" in err and "draining" in err, err

    report = json.loads(out_json.read_text())
    assert report["scenario"] == "echo" and report["config"]["client_procs"] == 2
    r = report["run"]
    assert r["ok"] and r["errors"] == 0 and r["mismatches"] == 0, r
    # Plausible: 16 messages in flight on loopback make thousands of round trips per second.
    assert 500 < r["msgs_per_s"] < 10_000_000
    assert 0 < r["window_received"] <= r["received"]
    assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]
    assert r["server_cpu_pct"] > 0 and r["server_processes"] == 1
    # Every message came back (drained before the close), and the server saw them all.
    assert r["in_flight_at_close"] == 0 and r["received"] == r["sent"]
    seen = echo_server.stop_and_count()
    assert seen["received"] == seen["echoed"] == r["sent"]


@pytest.mark.timeout(60)
def test_loadtest_idle_without_a_server_pid_reports_open_connections(echo_server, started) -> None:
    port = echo_server.port
    argv = [sys.executable, "-m", "wsfleet", "loadtest", "idle", "--url", f"ws://{HOST}:{port}"]
    argv += ["--connections", "40", "--rate", "400", "--hold", "0.2", "--no-progress"]
    status, out, err = run(started, argv, timeout=45)
    assert status == 0, out + err
    assert re.search(r"^still open +40$", out, re.M), out
    assert re.search(r"^KiB/conn +-$", out, re.M), out  # no pid: no memory figure
    assert "give --server-pid" in out and err == ""


@pytest.mark.timeout(30)
def test_loadtest_refuses_what_it_cannot_run(started) -> None:
    base = [sys.executable, "-m", "wsfleet", "loadtest"]
    for args, message in [
        (["echo", "--url", "wss://127.0.0.1:1"], "no TLS"),
        (["echo", "--url", "http://127.0.0.1:1"], "not a ws://"),
        (["echo", "--url", "ws://127.0.0.1:1", "--connections", "1000000"], "at most"),
        (["broadcast", "--url", "ws://127.0.0.1:1", "--procs", "2"], "unrecognized"),
    ]:
        status, out, err = run(started, base + args, timeout=20)
        assert status == 2 and message in err, (args, err)
    # Nothing listens: the run fails, bounded, with a reason.
    status, out, _ = run(started, base + ["connect", "--url", "ws://127.0.0.1:1"], timeout=25)
    assert status == 1


@pytest.mark.timeout(240)
def test_compare_runs_echo_over_two_servers(started, tmp_path: Path) -> None:
    md, js = tmp_path / "compare.md", tmp_path / "compare.json"
    argv = [sys.executable, "-m", "wsfleet.loadtest.compare", "echo", "--runs", "1"]
    argv += ["--seconds", "1", "--warmup", "0.3", "--settle", "0.2"]
    argv += ["--servers", "websockets,wsfleet-1", "--server-cpus", "", "--client-cpus", ""]
    argv += ["--markdown", str(md), "--json", str(js)]
    status, out, err = run(started, argv, timeout=200)
    assert status == 0, out + err
    for name in ("websockets", "wsfleet-1"):
        assert re.search(rf"\[1/1\] {name}: [\d,]+ msg/s, .* errors 0; stopped: status 0", out)

    text = md.read_text()
    assert "| scenario | figure | websockets | wsfleet-1 |" in text
    row = re.search(r"^\| echo \| msg/s \| (.*) \| (.*) \|$", text, re.M)
    assert row and "×" in row[1], text  # websockets, with its ratio to wsfleet-1
    assert "| echo | wsfleet-1 | " in text  # wsfleet-1 against the reference
    assert "| server | msg/s | × wsfleet-1 | client CPU |" in text

    report = json.loads(js.read_text())
    servers = report["scenarios"]["echo"]["servers"]
    assert [s["name"] for s in servers] == ["websockets", "wsfleet-1"]
    for s in servers:
        (one,) = s["runs"]
        assert one["ok"] and one["errors"] == 0 and one["msgs_per_s"] > 0, one
        assert not math.isnan(one["p99_us"])
        assert one["stop"]["left_running"] == []
