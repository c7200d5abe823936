"""The per-peer message-rate limit (``--max-message-rate``, ``--message-burst``): a peer
that sends faster is closed with 1008 and counted; one that keeps to the rate is served."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .opsproc import Served


@pytest.mark.timeout(60)
def test_a_peer_over_the_rate_is_closed_with_1008_and_one_under_it_is_served(
    tmp_path: Path,
) -> None:
    with Served(tmp_path, 1, "--max-message-rate", "50", "--message-burst", "10") as served:

        async def body() -> tuple[int | None, int, int]:
            flood = await connect(served.url(), ping_interval=None)
            calm = await connect(served.url(), ping_interval=None)
            for n in range(200):  # 200 at once, against a burst of 10
                await flood.send(f"f{n}")
            code = None
            try:
                while True:
                    await asyncio.wait_for(flood.recv(), 10)
            except ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else None
            echoed = 0
            for n in range(30):  # 20 a second: under 50
                await calm.send(f"c{n}")
                assert await asyncio.wait_for(calm.recv(), 10) == f"c{n}"
                echoed += 1
                await asyncio.sleep(0.05)
            await calm.close()
            return code, echoed, 0

        code, echoed, _ = asyncio.run(body())
        assert code == 1008
        assert echoed == 30
        time.sleep(0.3)  # the counters are published every 0.1 s
        totals = served.status()["totals"]
        assert totals["rate_limited"] == 1 and totals["closes_1008"] == 1


@pytest.mark.timeout(60)
def test_without_a_rate_a_flood_is_echoed(tmp_path: Path) -> None:
    with Served(tmp_path, 1) as served:

        async def body() -> int:
            async with connect(served.url(), ping_interval=None) as ws:
                for n in range(500):
                    await ws.send(f"f{n}")
                return sum([await asyncio.wait_for(ws.recv(), 10) == f"f{n}" for n in range(500)])

        assert asyncio.run(body()) == 500
        assert served.status()["totals"]["rate_limited"] == 0
