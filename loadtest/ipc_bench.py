"""Records/s and MB/s between two processes: wsfleet's ring against the usual queues.

    python -m wsfleet.loadtest.ipc_bench [--runs 5] [--sizes 64,1024,65536] [--json FILE]

For each record size and each mode, one producer process sends a fixed
number of records to this process, which counts them; each transport is run
``--runs`` times, interleaved, and the median is reported.  The producer is
pinned to one CPU and the consumer to another (when there are two).

Transports:

* ``ring``: `wsfleet.ipc` (a fresh interpreter attached through ``pass_fds``),
  records of ``(kind, peer, flags, payload)``.
* ``faster-fifo``: ``faster_fifo.Queue`` (C++ shared-memory queue), payloads only.
* ``mp.Queue``: ``multiprocessing.Queue``, payloads only.

Modes: ``batched`` (the ring's ``push_many``/``pop_all``; faster-fifo's
``put_many``/``get_many``; one ``mp.Queue.put`` of a list of records) with
batches of 256 records (fewer for large records: a batch holds at most a
quarter of the 1 MiB buffer each transport gets), and ``single`` (one record
per put/push+flush and per get/pop).

This is a benchmark, not a test: it asserts only that every record arrived.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from wsfleet.ipc import Consumer, Lifeline, Producer, RingFds, SharedRing

BATCH = 256
RING_CAPACITY = 1 << 20
TRANSPORTS = ("ring", "faster-fifo", "mp.Queue")


def records_per_run(size: int, mode: str) -> int:
    if size <= 64:
        return 1_000_000 if mode == "batched" else 200_000
    if size <= 1024:
        return 300_000 if mode == "batched" else 100_000
    return 10_000


def batch_size(size: int) -> int:
    return max(1, min(BATCH, RING_CAPACITY // 4 // max(size, 1)))


def distinct_payloads(size: int) -> list[bytes]:
    """One batch of payloads that are distinct objects (pickle would send a repeated one once)."""
    return [bytes([i % 251]) * size for i in range(batch_size(size))]


def pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# -- producers (run in the child process) --------------------------------------


def produce_ring(fds: RingFds, go_fd: int, count: int, size: int, mode: str) -> None:
    ring = SharedRing.attach(fds)
    producer = Producer(ring)
    payloads = distinct_payloads(size)
    os.read(go_fd, 1)
    if mode == "batched":
        sent = 0
        while sent < count:
            batch = [(1, sent + i, 0, p) for i, p in enumerate(payloads[: count - sent])]
            producer.push_all(batch, timeout=30)
            sent += len(batch)
    else:
        payload = payloads[0]
        for i in range(count):
            while not producer.push(1, i, payload):
                producer.wait_for_space(30)
            producer.flush()
    ring.close()


def produce_queue(queue, go, count: int, size: int, mode: str, cpu: int | None, fifo: bool) -> None:
    pin(cpu)
    payloads = distinct_payloads(size)
    payload = payloads[0]
    go.wait()
    if mode == "single":
        for _ in range(count):
            queue.put(payload, timeout=30) if fifo else queue.put(payload)
        return
    sent = 0
    while sent < count:
        batch = payloads[: count - sent]
        if fifo:
            queue.put_many(batch, block=True, timeout=30)
        else:
            queue.put(batch)
        sent += len(batch)


# -- one run of each transport (consumer side, this process) --------------------


def run_ring(count: int, size: int, mode: str, cpus: tuple[int, int] | None) -> float:
    ring = SharedRing.create(RING_CAPACITY, max_message=max(size, 1 << 16))
    life = Lifeline()
    go_read, go_write = os.pipe()
    argv = [sys.executable, "-m", "wsfleet.loadtest.ipc_bench", "--produce-ring",
            ring.fds.encode(), str(go_read), str(count), str(size), mode,
            str(cpus[1] if cpus else -1)]  # fmt: skip
    proc = subprocess.Popen(argv, pass_fds=(*ring.fds, go_read, life.hold_fd))
    life.release_hold()
    os.close(go_read)
    consumer = Consumer(ring)
    limit = 1 if mode == "single" else None
    try:
        time.sleep(0.2)  # let the interpreter start before the clock does
        started = time.perf_counter()
        os.write(go_write, b"g")
        got = 0
        while got < count:
            records = consumer.pop_all(limit)
            if records:
                got += len(records)
                assert len(records[-1][3]) == size
            else:
                consumer.wait(30, life.watch_fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(go_write)
        if proc.wait(timeout=30) != 0:
            raise RuntimeError(f"ring producer exited with {proc.returncode}")
        life.close()
        ring.close()
    return elapsed


def run_queue(fifo: bool, count: int, size: int, mode: str, cpus: tuple[int, int] | None) -> float:
    context = multiprocessing.get_context("fork")
    if fifo:
        from faster_fifo import Queue as FasterFifo

        queue = FasterFifo(max_size_bytes=RING_CAPACITY)
    else:
        queue = context.Queue()
    go = context.Event()
    proc = context.Process(
        target=produce_queue,
        args=(queue, go, count, size, mode, cpus[1] if cpus else None, fifo),
        daemon=True,
    )
    proc.start()
    try:
        time.sleep(0.2)
        started = time.perf_counter()
        go.set()
        got = 0
        while got < count:
            if fifo and mode == "batched":
                got += len(queue.get_many(block=True, timeout=30, max_messages_to_get=BATCH * 4))
            elif fifo:
                queue.get(block=True, timeout=30)
                got += 1
            elif mode == "batched":
                got += len(queue.get(timeout=30))
            else:
                queue.get(timeout=30)
                got += 1
        elapsed = time.perf_counter() - started
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return elapsed


RUNNERS: dict[str, Callable[..., float]] = {
    "ring": run_ring,
    "faster-fifo": lambda *a: run_queue(True, *a),
    "mp.Queue": lambda *a: run_queue(False, *a),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="64,1024,65536")
    parser.add_argument("--modes", default="batched,single")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--produce-ring", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.produce_ring:
        fds, go_fd, count, size, mode, cpu = args.produce_ring
        pin(None if int(cpu) < 0 else int(cpu))
        produce_ring(RingFds.decode(fds), int(go_fd), int(count), int(size), mode)
        return 0

    cpus_available = sorted(os.sched_getaffinity(0))
    cpus = (cpus_available[0], cpus_available[1]) if len(cpus_available) >= 2 else None
    pin(cpus[0] if cpus else None)
    transports = args.transports.split(",")
    results = []
    header = f"{'size':>6} {'mode':>8} {'transport':>12} {'records/s':>12} {'MB/s':>9}"
    print(f"{header}  runs (records/s)")
    for size in map(int, args.sizes.split(",")):
        for mode in args.modes.split(","):
            count = records_per_run(size, mode)
            rates: dict[str, list[float]] = {t: [] for t in transports}
            for _ in range(args.runs):  # interleaved, so drift hits every transport alike
                for transport in transports:
                    rates[transport].append(count / RUNNERS[transport](count, size, mode, cpus))
            for transport in transports:
                median = statistics.median(rates[transport])
                runs = " ".join(f"{r / 1e3:.0f}k" for r in rates[transport])
                print(f"{size:>6} {mode:>8} {transport:>12} {median:>12,.0f} "
                      f"{median * size / 1e6:>9.1f}  {runs}", flush=True)  # fmt: skip
                results.append({"size": size, "mode": mode, "transport": transport,
                                "records_per_s": median, "mb_per_s": median * size / 1e6,
                                "runs": rates[transport], "records_per_run": count})  # fmt: skip
            if "ring" in rates and "faster-fifo" in rates:
                ratio = statistics.median(rates["ring"]) / statistics.median(rates["faster-fifo"])
                print(f"{'':>6} {'':>8} {'ring/fifo':>12} {ratio:>12.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": cpus, "batch": BATCH, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
