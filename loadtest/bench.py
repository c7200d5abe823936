"""A benchmark: one scenario on each selected server, started fresh for every run, in
interleaved rounds, then the table.

Owns: `measure` (one run of a scenario against a server that is up, as a run
record with ``ok``), `one_run` (a `servers.ServerProcess` under ``taskset``, a
bounded wait for a handshake, `measure`, the stop), `run_rounds`, and a
benchmark's whole command line (`scenario_parser`, `check_scenario`,
`run_benchmark`) with the load and run options every benchmark shares.

May import `catalog`, `loadclient`, `loadprocs`, `procstats`, `report`, `scenario`
and `servers`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import psutil

from wsfleet.loadtest.catalog import add_server_arguments, select_servers, use_node_path
from wsfleet.loadtest.loadclient import CONNECT_CONCURRENCY
from wsfleet.loadtest.loadprocs import Progress, no_progress
from wsfleet.loadtest.procstats import parse_cpus
from wsfleet.loadtest.report import report
from wsfleet.loadtest.scenario import Scenario
from wsfleet.loadtest.servers import ServerFailed, ServerProcess, Target

# -- one run --------------------------------------------------------------------------------


def measure(
    scenario: Scenario, args: argparse.Namespace, target: Target, progress: Progress | None = None
) -> dict[str, Any]:
    """One run of ``scenario`` against a server that is up: its figures, with ``ok`` (False
    and ``failure`` when the load could not run)."""
    try:
        figures = scenario.measure(args, target, progress or no_progress)
    except (RuntimeError, OSError, EOFError, psutil.Error) as e:
        return {"ok": False, "failure": repr(e)}
    return {"ok": True, **figures}


def one_run(
    name: str, template: str, args: argparse.Namespace, scenario: Scenario
) -> dict[str, Any]:
    """Start the server, load it, stop it. Raises ServerFailed if it never served."""
    server = ServerProcess(name, template, args.server_cpus)
    run: dict[str, Any] = {"port": server.port, "argv": server.argv}
    try:
        server.wait_ready(args.start_timeout, args.settle)
        run.update(measure(scenario, args, server))
        if not run["ok"]:
            run["failure"] += f"; server log: {server.log_tail(4)}"
        return run
    finally:
        run["stop"] = server.stop(args.stop_timeout)


def describe_stop(stop: dict[str, Any]) -> str:
    text = f"stopped: status {stop['exit_status']} in {stop['stop_s']:.2f} s"
    if stop["killed"]:
        text += f", SIGKILLed {stop['killed']}"
    if stop["left_running"]:
        text += f", STILL RUNNING {stop['left_running']}"
    return text


def run_rounds(servers: list[dict[str, Any]], args: argparse.Namespace, scenario: Scenario) -> None:
    """``--runs`` rounds, each running every server once, in the same order, so drift on a
    shared machine hits all alike. A server that never started is not retried."""
    for round_no in range(1, args.runs + 1):
        for s in servers:
            if s["failure"] is not None and not s["runs"]:
                continue  # never started: do not retry every round
            print(f"[{round_no}/{args.runs}] {s['name']}: ", end="", flush=True)
            try:
                run = one_run(s["name"], s["command"], args, scenario)
            except ServerFailed as e:
                s["failure"] = str(e)
                print(f"FAILED: {e}", flush=True)
                if s["runs"]:
                    s["runs"].append({"ok": False, "failure": str(e)})
                continue
            s["runs"].append(run)
            stop_text = describe_stop(run["stop"])
            if not run.get("ok"):
                print(f"run failed: {run['failure']}; {stop_text}", flush=True)
                continue
            print(f"{scenario.describe(run)}; {stop_text}", flush=True)
            for sample in run["error_samples"]:
                print(f"    {sample}")


# -- the command line -----------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--client-procs", type=int, default=1)
    parser.add_argument("--server-cpus", default="0", help="taskset -c list; '' for no pinning")
    parser.add_argument("--client-cpus", default="1", help="CPUs for the load processes")
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=CONNECT_CONCURRENCY,
        help="handshakes each load process has in progress at once (default %(default)s; "
        "Godot 3.2 listens with a backlog of 8)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-timeout", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=0.5, help="wait after the first handshake")
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    parser.add_argument("--json", metavar="FILE")


def check_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[int]:
    """Refuse what `add_load_arguments` cannot run; return the client CPUs."""
    if args.client_procs < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--client-procs must be >= 1, --seconds > 0, --warmup >= 0")
    if args.connect_concurrency < 1:
        parser.error("--connect-concurrency must be >= 1")
    allowed = os.sched_getaffinity(0)
    client_cpus = parse_cpus(args.client_cpus)
    if not set(client_cpus) <= allowed:
        parser.error(f"--client-cpus {args.client_cpus} not within this process's CPUs {allowed}")
    if set(client_cpus) & set(parse_cpus(args.server_cpus)):
        print("warning: client and server CPUs overlap; the figures will be noisier")
    return client_cpus


def add_scenario_arguments(parser: argparse.ArgumentParser, scenario: Scenario, runs: int) -> None:
    """A benchmark's options for ``scenario`` (`run_benchmark` runs it)."""
    parser.add_argument("--runs", type=int, default=runs)
    scenario.add_arguments(parser)
    add_load_arguments(parser)
    if scenario.seconds is not None:
        parser.set_defaults(seconds=scenario.seconds)
    add_server_arguments(parser)
    add_run_arguments(parser)


def scenario_parser(
    scenario: Scenario, runs: int, description: str = ""
) -> argparse.ArgumentParser:
    """A benchmark's command line for ``scenario``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_scenario_arguments(parser, scenario, runs)
    return parser


def where_text(args: argparse.Namespace, scenario: Scenario) -> str:
    load = (
        "the load in this process"
        if scenario.in_this_process
        else f"{args.client_procs} load process(es)"
    )
    return (
        f"{args.runs} run(s); server CPUs {args.server_cpus or 'any'}, {load} on CPUs "
        f"{args.client_cpus or 'any'}"
    )


def check_scenario(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> list[int]:
    """Refuse what ``scenario`` cannot run with ``args``; return the client CPUs."""
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if scenario.one_process and args.client_procs != 1:
        parser.error(f"{scenario.name} runs in one load process (--client-procs 1)")
    scenario.check(parser, args)
    return check_load_arguments(parser, args)


def run_benchmark(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> int:
    """A benchmark's main: ``scenario`` on each selected server, ``--runs`` rounds, the table.

    Servers not installed are reported as skipped (not an error). The exit status is 1 if
    a server failed or any run counted errors, 2 if ``scenario.prepare`` refused.
    """
    client_cpus = check_scenario(parser, args, scenario)
    use_node_path(args.node_path)
    try:
        scenario.prepare(args)  # before any server starts: they inherit what it sets
    except RuntimeError as e:
        print(f"{scenario.name}: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix=f"wsfleet-{scenario.name}-") as workdir:
        servers = select_servers(parser, args, scenario.mode, workdir)
        skipped = [s for s in servers if s.get("skip")]
        servers = [s for s in servers if not s.get("skip")]
        print(f"{scenario.config_text(args)}, {where_text(args, scenario)}", flush=True)
        for s in skipped:
            print(f"{s['name']}: {s['skip']}; skipped", flush=True)
        if not servers:
            print("no server to run")
            return 1
        run_rounds(servers, args, scenario)
        status = report(servers, args, client_cpus, scenario.table)
    for s in skipped:
        print(f"{s['name']:<{scenario.table.name_width}} {s['skip']}")
    return status
