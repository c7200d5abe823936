"""``--metrics``: /metrics parses as Prometheus text with one series per shard that matches
``wsfleet status``; /healthz is 200 while every shard runs, 503 once one is given up."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from wsfleet.supervisor.arbiter import CRASH_LIMIT

from .conftest import free_port
from .opsproc import Served


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.timeout(90)
def test_metrics_match_status_and_healthz_follows_the_shards(tmp_path: Path) -> None:
    metrics_port = free_port()
    with Served(tmp_path, 3, "--metrics", f"127.0.0.1:{metrics_port}") as served:
        assert fetch(metrics_port, "/healthz") == (200, "ok\n")

        async def clients() -> list:
            conns = [await connect(served.url(), ping_interval=None) for _ in range(12)]
            for ws in conns:
                await ws.send(b"12345")
                assert await ws.recv() == b"12345"
            return conns

        loop = asyncio.new_event_loop()
        try:
            conns = loop.run_until_complete(clients())
            time.sleep(0.4)  # the shards publish every 0.1 s
            doc = served.status()
            status, text = fetch(metrics_port, "/metrics")
            assert status == 200
            got = samples(text)
            for row in doc["shards"]:
                shard = (("shard", str(row["index"])),)
                assert got["wsfleet_peers", shard] == row["peers"]
                assert got["wsfleet_messages_in_total", shard] == row["messages_in"]
                assert got["wsfleet_messages_out_total", shard] == row["messages_out"]
                assert got["wsfleet_bytes_out_total", shard] == row["bytes_out"]
                assert got["wsfleet_handshakes_accepted_total", shard] == row["handshakes_accepted"]
                assert got["wsfleet_shard_state", (*shard, ("state", "running"))] == 1
            peers = [value for (name, _), value in got.items() if name == "wsfleet_peers"]
            assert len(peers) == 3 and sum(peers) == 12  # one series per shard, no total
            assert sum(v for (n, _), v in got.items() if n == "wsfleet_messages_in_total") == 12

            # The busiest shard killed once is restarted at once: healthy again, one restart
            # counted; another one is then killed until it is given up.
            busy = max(doc["shards"], key=lambda row: row["messages_in"])["index"]
            doomed = (busy + 1) % 3
            victim = doc["shards"][busy]["pid"]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while (row := served.status()["shards"][busy])["pid"] in (victim, None) or row[
                "state"
            ] != "running":
                assert time.monotonic() < deadline, row
                time.sleep(0.01)
            assert row["restarts"] == 1
            assert fetch(metrics_port, "/healthz") == (200, "ok\n")
            got = samples(fetch(metrics_port, "/metrics")[1])
            assert got["wsfleet_restarts_total", (("shard", str(busy)),)] == 1
            # Its successor continues the running totals (a counter never goes back).
            assert row["messages_in"] == doc["shards"][busy]["messages_in"] > 0
            assert got["wsfleet_messages_in_total", (("shard", str(busy)),)] == row["messages_in"]

            # Now one is killed until the supervisor gives it up: /healthz turns 503.
            kills = 0
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                row = served.status()["shards"][doomed]
                if row["state"] == "failed":
                    break
                if row["state"] == "running":
                    os.kill(row["pid"], signal.SIGKILL)
                    kills += 1
                    while served.status()["shards"][doomed]["pid"] == row["pid"]:
                        time.sleep(0.01)
                time.sleep(0.01)
            assert kills == CRASH_LIMIT + 1
            code, body = fetch(metrics_port, "/healthz")
            assert code == 503 and f"shard {doomed} failed: it died" in body
            got = samples(fetch(metrics_port, "/metrics")[1])
            label = ("shard", str(doomed))
            assert got["wsfleet_shard_state", (label, ("state", "failed"))] == 1
            assert got["wsfleet_restarts_total", (label,)] == CRASH_LIMIT
            assert got["wsfleet_peers", (label,)] == 0
            for ws in conns:
                loop.run_until_complete(ws.close())
        finally:
            loop.close()
        assert fetch(metrics_port, "/nothing")[0] == 404
