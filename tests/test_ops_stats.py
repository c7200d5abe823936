"""`wsfleet.ipc.stats`: the shared counters across real processes (a forked writer), the
seqlock's consistent snapshots, a successor continuing its predecessor's totals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from wsfleet.ipc.stats import GAUGES, SHARD_FIELDS, Stats, close_field, refuse_field


def _figures(value: int) -> dict[str, int]:
    return dict.fromkeys(SHARD_FIELDS, value)


@pytest.mark.timeout(30)
def test_snapshots_are_consistent_while_another_process_writes() -> None:
    stats = Stats.create(2)
    pid = os.fork()
    if pid == 0:  # the writer: every field of a snapshot holds the same value
        try:
            writer = stats.writer(1)
            value = 0
            while True:
                value += 1
                writer.publish(_figures(value))
        finally:
            os._exit(0)
    try:
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            snapshot = stats.read_shard(1)
            assert len(set(snapshot.values())) == 1, snapshot  # never torn
            seen.add(snapshot["messages_in"])
        assert len(seen) > 10
        assert set(stats.read_shard(0).values()) == {0}  # the other shard's block is apart
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # The writer died (maybe in the middle of a write): the supervisor clears its gauges,
    # and a successor continues its running totals.
    stats.clear_gauges(1)
    last = stats.read_shard(1)
    assert all(last[name] == 0 for name in GAUGES)
    resumed = stats.writer(1).resume()
    assert resumed["messages_in"] == last["messages_in"] > 0
    resumed["messages_in"] += 1
    stats.writer(1).publish(resumed)
    assert stats.read_shard(1)["messages_in"] == last["messages_in"] + 1
    stats.draining = True
    assert stats.writer(0).draining
    stats.close()


def test_the_buckets() -> None:
    assert refuse_field(403) == "refused_403" and refuse_field(414) == "refused_431"
    assert refuse_field(None) == "refused_400" and refuse_field(426) == "refused_400"
    assert close_field(1001) == "closes_1001" and close_field(4000) == "closes_other"
    assert {close_field(c) for c in (1000, 1006, 1011)} <= set(SHARD_FIELDS)
