"""The RPC benchmark's load and its server application agree: against a real
``wsfleet serve --gd-mp-api --app wsfleet.loadtest.rpc_bench:setup`` (a process on
127.0.0.1, stopped by pid at the end), every call sent is answered once, in order,
with no error, in both of ``rpc_bench``'s own rows; and ``rpc_api_bench``'s
in-process run counts every reply.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wsfleet.loadtest import rpc_api_bench
from wsfleet.loadtest.rpc_bench import run_rpc_load, server_command
from wsfleet.loadtest.servers import HOST, ServerProcess


@pytest.fixture
def bench_server() -> Iterator[ServerProcess]:
    server = ServerProcess("rpc", server_command(shards=2), "")
    try:
        server.wait_ready(20, 0.2)
        yield server
    finally:
        stop = server.stop(10)
        assert not stop["left_running"], stop


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rpc", [True, False], ids=["rpc", "raw"])
def test_every_call_is_answered_once_in_order(bench_server: ServerProcess, rpc: bool) -> None:
    result = run_rpc_load(
        HOST, bench_server.port, clients=6, rpc=rpc, inflight=4, seconds=0.5, warmup=0.2
    )
    assert result.errors == 0, result.error_samples
    assert result.sent > 6 * 4 and result.received == result.sent
    assert result.window_received > 0 and result.latency_samples > 0


@pytest.mark.timeout(60)
def test_the_in_process_run_counts_every_reply() -> None:
    assert rpc_api_bench.us_per_call(peers=3, calls=2000) > 0
