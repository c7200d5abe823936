"""The counters, error samples and latency histograms every scenario reports with.

Owns: `Counters` (what one load process reports, as a plain dataclass so it pickles
as a dict across the spawned load processes), `ErrorSamples` (an error count with
the first few texts), `LoadState` (the live counts the connections of one load
process share while it runs), the HdrHistogram helpers (microseconds, PyPI package
``hdrhistogram``; results carry histograms encoded so load processes' add up), and
the figures drawn from a list of results (`cpu_figures`, `latency_figures`,
`error_samples`, `total`).

Imports only the standard library and ``hdrh``: every other loadtest module may
import it.
"""

from __future__ import annotations

import time
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hdrh.histogram import HdrHistogram

MAX_ERROR_SAMPLES = 5
# Latency histograms: microseconds from 1 us to one minute (longer ones are clamped), 3 digits.
HIST_HIGHEST_US = 60_000_000
HIST_DIGITS = 3
# The most latency samples one load process keeps (memory stays bounded on long runs).
MAX_LATENCY_SAMPLES = 2_000_000


# -- latency histograms ---------------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_HIGHEST_US, HIST_DIGITS)


def histogram_of(samples_us: Iterable[float]) -> HdrHistogram:
    """An HdrHistogram of microsecond samples (equal values recorded once, with a count)."""
    hist = new_histogram()
    for value, count in Counter(round(x) for x in samples_us).items():
        hist.record_value(min(max(value, 1), HIST_HIGHEST_US), count)
    return hist


def encode_histogram(hist: HdrHistogram) -> str:
    """How results carry a histogram (ASCII; "" when empty) so that load processes' add up."""
    return hist.encode().decode("ascii") if hist.get_total_count() else ""


def merge_histograms(encoded: Iterable[str]) -> HdrHistogram:
    """The sum of histograms as the results carry them (`encode_histogram`)."""
    total = new_histogram()
    for text in encoded:
        if text:
            total.add(HdrHistogram.decode(text.encode("ascii")))
    return total


def percentiles_us(hist: HdrHistogram) -> tuple[float, float, float]:
    """(p50, p99, max) in microseconds; NaN when nothing was recorded."""
    if hist.get_total_count() == 0:
        return float("nan"), float("nan"), float("nan")
    return (
        float(hist.get_value_at_percentile(50)),
        float(hist.get_value_at_percentile(99)),
        float(hist.get_max_value()),
    )


# -- errors -----------------------------------------------------------------------------------


class ErrorSamples:
    """An error count with the first `MAX_ERROR_SAMPLES` descriptions."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def __call__(self, why: str) -> None:
        self.count += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            self.samples.append(why)


# -- what a load process reports --------------------------------------------------------------


@dataclass(kw_only=True)
class Counters:
    """What every load process reports; each scenario adds its own counts in a subclass.
    Counts cover the whole run unless they say ``window``; what ``sent`` and
    ``received`` count (messages, broadcasts, deliveries, handshakes) is the scenario's."""

    sent: int = 0
    received: int = 0
    window_received: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time (user + system) in the window
    # Its time runnable but waiting for a CPU in the window (another process had it): with
    # cpu_s, how much of the window the load could have used a CPU. NaN where the kernel
    # does not say (no /proc/self/schedstat).
    wait_s: float = 0.0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latency_samples: int = 0
    latency_hist: str = ""  # microseconds, in the window (`encode_histogram`)

    @property
    def rate(self) -> float:
        """``window_received`` per second of the window."""
        return self.window_received / self.window_s if self.window_s > 0 else 0.0

    def latency_us(self) -> tuple[float, float, float]:
        """(p50, p99, max) of this process's latencies; NaN when there are none."""
        return percentiles_us(merge_histograms([self.latency_hist]))


def run_queue_wait_s() -> float:
    """This process's time so far runnable but waiting for a CPU (seconds; the main thread's,
    which runs the whole load); NaN where /proc/self/schedstat is missing."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


class WindowClock:
    """The load process's CPU time and run-queue wait over a window: `stop` puts them in a
    result (``cpu_s``, ``wait_s``)."""

    def __init__(self) -> None:
        self.cpu0 = time.process_time()
        self.wait0 = run_queue_wait_s()

    def stop(self, result: Counters) -> None:
        result.cpu_s = time.process_time() - self.cpu0
        result.wait_s = run_queue_wait_s() - self.wait0


class _HasError(Protocol):
    error: str | None  # a connection's protocol error (`wsclient.WSConnection.error`)


class LoadState:
    """The live counts the connections of one load process share (one event loop, no
    locking): what the scenario's `Counters` will hold once the run is over."""

    def __init__(self) -> None:
        self.sending = False
        self.measuring = False
        self.sent = 0
        self.received = 0
        self.error = ErrorSamples()
        # Microseconds; the histogram is made once the run is over (recording one value in
        # hdrh costs ~2 us, too much on the hot path).
        self.latencies = array("d")

    def finish(self, result: Counters, conns: Sequence[_HasError] = ()) -> None:
        """Count the connections' protocol errors, then copy the counts into ``result``."""
        for conn in conns:
            if conn.error is not None:
                self.error(f"protocol: {conn.error}")
        result.sent = self.sent
        result.received = self.received
        result.errors = self.error.count
        result.error_samples = self.error.samples
        result.latency_samples = len(self.latencies)
        result.latency_hist = encode_histogram(histogram_of(self.latencies))


# -- figures of a run, from its load processes' results ------------------------------------


def total(results: Iterable[Any], name: str) -> int:
    """The sum of one count over the load processes."""
    return sum(getattr(r, name) for r in results)


def cpu_figures(
    results: Sequence[Counters], server_cpu: float, window: float, rate: float, per: str
) -> dict[str, float]:
    """The load processes' CPU (each over its own window, summed: 100 = one core), how busy
    they were (CPU plus time runnable but waiting for a CPU taken by another process: what
    they would have used; NaN where the kernel does not say), their microseconds of CPU per
    unit of ``rate`` (``client_us_per_<per>``), the server's CPU over ``window``, and the
    server's microseconds per unit of ``rate`` (``server_us_per_<per>``)."""
    timed = [r for r in results if r.window_s > 0]
    client_cpu = sum(r.cpu_s for r in timed)
    busy = 100 * sum((r.cpu_s + r.wait_s) / r.window_s for r in timed)
    return {
        "client_cpu_pct": 100 * sum(r.cpu_s / r.window_s for r in timed),
        "client_busy_pct": busy,
        f"client_us_per_{per}": 1e6 * client_cpu / (rate * window) if rate else float("nan"),
        "server_cpu_pct": 100 * server_cpu / window,
        f"server_us_per_{per}": 1e6 * server_cpu / (rate * window) if rate else float("nan"),
    }


def error_samples(results: Iterable[Counters]) -> list[str]:
    """The first `MAX_ERROR_SAMPLES` error texts of the load processes together."""
    return [s for r in results for s in r.error_samples][:MAX_ERROR_SAMPLES]


def latency_figures(results: Iterable[Counters]) -> dict[str, float]:
    """p50, p99 and max (microseconds) of the load processes' histograms together."""
    p50, p99, top = percentiles_us(merge_histograms(r.latency_hist for r in results))
    return {"p50_us": p50, "p99_us": p99, "max_us": top}
