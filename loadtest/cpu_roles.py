"""Where a wsfleet server's CPU goes, by process: front, supervisor, shards.

Runs one load (``echo``: the echo scenario's closed loop; ``connect``: handshake
+ close cycles) against each server given, and prints every process's CPU
time per operation (µs per echoed message, or per connect cycle), named by
its process title (``wsfleet front``, ``wsfleet supervisor``, ``wsfleet shard
1/1``; `wsfleet.ipc.proctitle`).  The servers run one after another, in
rounds, so that the machine's noise hits each of them:

    python -m wsfleet.loadtest.cpu_roles echo --rounds 3 --seconds 3 \\
        --server "before=OLD/bin/python -m wsfleet serve --quiet --port {port} --shards 1" \\
        --server "after=python -m wsfleet serve --quiet --port {port} --shards 1"

Servers on ``--server-cpus`` (0), the load in this process on ``--client-cpus`` (1).
The whole load call is measured (connection set-up and warm-up included) and
divided by every operation done in it.  May import `echo_bench`, `connect`,
`procstats` and `servers`.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import defaultdict

import psutil

from wsfleet.loadtest.connect import run_connect
from wsfleet.loadtest.echo_bench import run_echo_load
from wsfleet.loadtest.procstats import parse_cpus
from wsfleet.loadtest.servers import ServerProcess


def role_of(process: psutil.Process) -> str:
    """``front``, ``supervisor``, ``shard`` (all shards together) or the command's name."""
    try:
        title = " ".join(process.cmdline())
    except psutil.Error:
        return "gone"
    for role in ("front", "supervisor", "shard"):
        if title.startswith(f"wsfleet {role}"):
            return role
    return os.path.basename(title.split(" ", 1)[0]) or "?"


def cpu_by_role(server: ServerProcess) -> dict[str, float]:
    server.tree.refresh()
    seconds: dict[str, float] = defaultdict(float)
    for process in server.tree.procs.values():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        seconds[role_of(process)] += times.user + times.system
    return seconds


def one_run(name: str, template: str, args: argparse.Namespace) -> dict[str, float]:
    server = ServerProcess(name, template, args.server_cpus)
    try:
        server.wait_ready(timeout=15, settle=0.5)
        before = cpu_by_role(server)
        if args.scenario == "echo":
            counts = run_echo_load(
                "127.0.0.1", server.port, seconds=args.seconds, warmup=0.2, connections=50
            )
            operations = counts.received
        else:
            counts = run_connect("127.0.0.1", server.port, seconds=args.seconds, warmup=0.2)
            operations = counts.cycles
        after = cpu_by_role(server)
    finally:
        server.stop(5)
    if counts.errors:
        raise SystemExit(f"{name}: {counts.errors} errors in the load")
    per_op = {role: (after[role] - before.get(role, 0.0)) / operations * 1e6 for role in after}
    per_op["total"] = sum(per_op.values())
    per_op["ops_per_s"] = operations / (args.seconds + 0.2)
    return per_op


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("echo", "connect"))
    parser.add_argument("--server", action="append", required=True, metavar="NAME=COMMAND")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    args = parser.parse_args(argv)
    servers = []
    for spec in args.server:
        name, sep, template = spec.partition("=")
        if not sep or not name or "{port}" not in template:
            parser.error(f"--server NAME=COMMAND with {{port}} in it: {spec!r}")
        servers.append((name, template))
    if args.client_cpus:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))
    results: dict[str, list[dict[str, float]]] = defaultdict(list)
    for round_index in range(args.rounds):
        for name, template in servers:
            figures = one_run(name, template, args)
            results[name].append(figures)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in figures.items() if k != "ops_per_s")
            print(
                f"[{round_index + 1}/{args.rounds}] {name}: {figures['ops_per_s']:,.0f}/s; "
                f"µs per op: {shown}",
                flush=True,
            )
    unit = "message" if args.scenario == "echo" else "cycle"
    print(f"\nserver CPU µs per {unit}, medians of {args.rounds} round(s):")
    roles = sorted(
        {role for runs in results.values() for run in runs for role in run} - {"ops_per_s", "total"}
    )
    print(
        f"{'server':12}" + "".join(f"{role:>12}" for role in [*roles, "total"]) + f"{'ops/s':>12}"
    )
    for name, runs in results.items():
        cells = [
            statistics.median(run.get(role, 0.0) for run in runs) for role in [*roles, "total"]
        ]
        rate = statistics.median(run["ops_per_s"] for run in runs)
        print(f"{name:12}" + "".join(f"{cell:12.1f}" for cell in cells) + f"{rate:12,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
