"""The load-test framework's shared types: counters, error samples, latency histograms, and
the scenario objects every front end runs.

In-process and quick: no server. What crosses from a load process to the driving one
is a `Counters` subclass as a dict (`loadprocs.client_main`), so every scenario's
counts must rebuild from that dict; a `LoadState` must turn microsecond latencies
and its connections' protocol errors into the result; and every scenario in the
registry must parse its defaults and name table columns that its figures carry.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from wsfleet.loadtest import bench
from wsfleet.loadtest.broadcast import BroadcastCounts
from wsfleet.loadtest.connect import ConnectCounts
from wsfleet.loadtest.counters import (
    MAX_ERROR_SAMPLES,
    Counters,
    ErrorSamples,
    LoadState,
    error_samples,
    histogram_of,
    latency_figures,
    merge_histograms,
    percentiles_us,
)
from wsfleet.loadtest.echo_bench import EchoCounts
from wsfleet.loadtest.idle import IdleCounts
from wsfleet.loadtest.relay_bench import RelayCounts
from wsfleet.loadtest.scenario import ProcessScenario, Scenario
from wsfleet.loadtest.scenarios import HELP, SCENARIOS
from wsfleet.loadtest.soak import SoakCounts

pytestmark = pytest.mark.timeout(30)


class _Conn:
    def __init__(self, error: str | None) -> None:
        self.error = error


def test_error_samples_count_everything_and_keep_the_first_few() -> None:
    errors = ErrorSamples()
    for i in range(MAX_ERROR_SAMPLES + 3):
        errors(f"e{i}")
    assert errors.count == MAX_ERROR_SAMPLES + 3
    assert errors.samples == [f"e{i}" for i in range(MAX_ERROR_SAMPLES)]


def test_load_state_finishes_into_counters_with_a_microsecond_histogram() -> None:
    load = LoadState()
    load.sent, load.received = 10, 9
    load.latencies.extend([100.4, 200.0, 200.2, 5_000.0])
    load.error("lost one")
    result = EchoCounts(connections=2)
    load.finish(result, [_Conn(None), _Conn("masked frame from the server")])
    assert (result.sent, result.received) == (10, 9)
    assert result.errors == 2
    assert result.error_samples == ["lost one", "protocol: masked frame from the server"]
    assert result.latency_samples == 4
    p50, p99, top = result.latency_us()
    assert p50 == pytest.approx(200, rel=0.01)
    assert top == pytest.approx(5_000, rel=0.01) and p99 <= top


def test_histograms_of_load_processes_add_up() -> None:
    a, b = EchoCounts(connections=1), EchoCounts(connections=1)
    for result, samples in ((a, [10] * 99), (b, [1_000])):
        state = LoadState()
        state.latencies.extend(samples)
        state.finish(result)
    merged = merge_histograms([a.latency_hist, b.latency_hist, ""])
    assert merged.get_total_count() == 100
    figures = latency_figures([a, b])
    assert figures["p50_us"] == 10 and figures["max_us"] == pytest.approx(1_000, rel=0.01)
    assert all(math.isnan(x) for x in percentiles_us(histogram_of([])))
    assert error_samples([a, b]) == []


@pytest.mark.parametrize(
    "counts",
    [
        EchoCounts(connections=3, sent=5, in_flight=1),
        RelayCounts(clients=4, fanout=3, window_sent=7),
        BroadcastCounts(connections=5, senders=2, size=64, inflight=2, missing=1),
        ConnectCounts(concurrency=2, cycles=4, unclean_closes=1),
        IdleCounts(requested=10, asked_rate=100.0, received=9, uss_before=None),
        SoakCounts(connections=3, lost=1),
    ],
)
def test_every_scenarios_counts_rebuild_from_the_dict_a_load_process_sends(
    counts: Counters,
) -> None:
    counts.error_samples = ["x"]
    rebuilt = type(counts)(**asdict(counts))
    assert rebuilt == counts and isinstance(rebuilt, Counters)


def test_every_scenario_is_an_object_with_defaults_that_parse() -> None:
    assert list(SCENARIOS) == ["echo", "broadcast", "connect", "idle", "mp-relay"]
    assert set(HELP) == set(SCENARIOS)
    for name, scenario in SCENARIOS.items():
        assert isinstance(scenario, Scenario) and scenario.name == name
        assert scenario.in_this_process != isinstance(scenario, ProcessScenario), name
        parser = bench.scenario_parser(scenario, runs=1)
        args = parser.parse_args([])
        bench.check_scenario(parser, args, scenario)
        assert scenario.config_text(args).startswith(("relay", name))
        assert scenario.expected_seconds(args) > 0
        table = scenario.table
        keys = {c.key for c in table.columns if c.key}
        assert table.rate in keys and set(table.sums) <= keys | {"missing"}, name
        assert set(table.medians) >= {table.rate}, name
        if isinstance(scenario, ProcessScenario):
            assert scenario.load(args).configs, name


def test_a_scenario_refuses_what_it_cannot_run(capsys) -> None:
    scenario = SCENARIOS["broadcast"]
    parser = bench.scenario_parser(scenario, runs=1)
    with pytest.raises(SystemExit) as exit_info:
        bench.check_scenario(parser, parser.parse_args(["--connections", "1"]), scenario)
    assert exit_info.value.code == 2
    assert "--connections >= 2" in capsys.readouterr().err


def test_the_abstract_base_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        Scenario()  # type: ignore[abstract]
