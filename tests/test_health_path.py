"""Plain HTTP on the WebSocket port: a GET of the health path is answered by the shard that
accepted it (200, or 503 while draining, with the shard's header), anything else is 426."""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .opsproc import Served, wsfleet


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.timeout(60)
def test_every_shard_answers_the_health_check_and_anything_else_gets_426(tmp_path: Path) -> None:
    with Served(tmp_path, 4) as served:
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while len(seen) < 4:  # the kernel spreads connections over the shards by hash
            assert time.monotonic() < deadline, f"only shards {sorted(seen)} answered"
            status, headers, body = get(served.port, "/healthz")
            assert (status, body) == (200, b"ok\n")
            shard = headers["X-Wsfleet-Shard"]
            seen[shard] = seen.get(shard, 0) + 1
        assert sorted(seen) == ["0", "1", "2", "3"]
        assert get(served.port, "/healthz?probe=lb")[0] == 200  # the query does not matter
        status, headers, body = get(served.port, "/")
        assert status == 426 and headers["Upgrade"] == "websocket"
        assert get(served.port, "/other")[0] == 426
        # Draining: every shard says 503 (load balancers stop sending), then 200 again.
        assert wsfleet("drain", "--control", served.control).returncode == 0
        answers = {get(served.port, "/healthz")[0] for _ in range(20)}
        assert answers == {503}
        assert wsfleet("drain", "--off", "--control", served.control).returncode == 0
        assert get(served.port, "/healthz")[0] == 200
        time.sleep(0.3)  # the counters are published every 0.1 s
        assert served.status()["totals"]["health_checks"] >= sum(seen.values()) + 22


@pytest.mark.timeout(60)
def test_a_server_without_a_health_path_answers_426_to_it(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--health-path", "off") as served:
        assert get(served.port, "/healthz")[0] == 426


@pytest.mark.timeout(60)
def test_another_health_path(tmp_path: Path) -> None:
    with Served(tmp_path, 1, "--health-path", "/ready") as served:
        assert get(served.port, "/ready")[0] == 200
        assert get(served.port, "/healthz")[0] == 426


@pytest.mark.timeout(60)
def test_curl_gets_200_from_every_shard_and_426_for_a_plain_get(tmp_path: Path) -> None:
    """What an operator or a load balancer's probe does: `curl` (the real client)."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is not on the PATH (Debian: apt-get install curl)"

    def curl_get(port: int, path: str) -> tuple[int, str]:
        out = subprocess.run(
            [curl, "-s", "-i", "--max-time", "10", f"http://127.0.0.1:{port}{path}"],
            capture_output=True,
            timeout=20,
            check=True,
        ).stdout.decode()  # not text=True: its newline translation would eat the CRs
        head, _, body = out.partition("\r\n\r\n")
        status = int(head.split()[1])
        shard = next(
            (line.split(":", 1)[1].strip() for line in head.splitlines()
             if line.lower().startswith("x-wsfleet-shard:")),
            "",
        )  # fmt: skip
        return status, f"{shard}|{body}"

    with Served(tmp_path, 4) as served:
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < 4:
            assert time.monotonic() < deadline, f"only shards {sorted(seen)} answered"
            status, answer = curl_get(served.port, "/healthz")
            shard, body = answer.split("|", 1)
            assert (status, body) == (200, "ok\n")
            seen.add(shard)
        assert seen == {"0", "1", "2", "3"}
        assert curl_get(served.port, "/")[0] == 426
