"""Every scenario against every server, side by side: the figures for RESULTS.md.

    python -m wsfleet.loadtest.compare [SCENARIO ...] [--runs 5]
        [--servers websockets,wsfleet-1,wsfleet-2,godot,node,picows] [--server-cpus 0]
        [--client-cpus 1] [--client-procs 1] [--seconds S] [--warmup W] [--settle 0.5]
        [--godot BIN] [--godot-sleep-usec 0] [--node BIN] [--node-path DIR]
        [--json FILE] [--markdown FILE]

SCENARIO is any of echo, broadcast, connect, idle and mp-relay (default: all five,
in that order). Each is the benchmarks' own scenario at its defaults
(`scenarios.SCENARIOS`); ``--seconds``/``--warmup`` replace each one's window
when given, ``--client-procs`` applies where the load can be split (echo,
connect, mp-relay).

The servers come from `server_catalog` (``wsfleet-K`` is wsfleet with K
shards: ``wsfleet serve`` for echo, connect and idle, so the echo runs in the
front; ``wsfleet_apps broadcast``; ``wsfleet serve --gd-mp-api``). mp-relay only
runs the servers that speak Godot's multiplayer protocol (wsfleet and Godot);
the others are reported as not applicable. A server that is not installed (no
``godot3-server``, no ``node`` or no ``ws`` module for it, no ``picows``) is reported as skipped
and does not change the exit status.

For each scenario, ``--runs`` rounds run every server once, in the order given,
each started fresh under ``taskset -c --server-cpus`` on its own free port, with the
load processes pinned to ``--client-cpus`` (`bench.run_rounds`). The table gives
medians over the runs with the ratio of each server's headline figure to
``wsfleet-1``'s (the first server's if wsfleet-1 is not run), the load generator's
CPU and the errors. At the end, a summary in markdown (stdout, and ``--markdown
FILE``): the headline figure of every server in every scenario with its ratio to
wsfleet-1, then each wsfleet against each reference server (websockets, godot,
node, picows) as "how many times better" (the ratio of the figures, inverted for memory
per connection, where less is better), and the detailed table of each scenario.
``--json FILE`` keeps every run.

Exit status: 0 when every server that ran had runs without errors, 1 otherwise,
2 for bad options.

May import `bench`, `catalog`, `procstats`, `report`, `scenario` and `scenarios`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from typing import Any

from wsfleet.loadtest import bench
from wsfleet.loadtest.catalog import REFERENCES, server_catalog, use_node_path
from wsfleet.loadtest.procstats import parse_cpus
from wsfleet.loadtest.report import (
    Column,
    all_clean,
    client_capacity_pct,
    client_load_pct,
    config_of,
    print_table,
    ratio_base,
    summarize_servers,
)
from wsfleet.loadtest.scenario import Scenario
from wsfleet.loadtest.scenarios import SCENARIOS

DEFAULT_SERVERS = "websockets,wsfleet-1,wsfleet-2,godot,node,picows"
BASE = "wsfleet-1"
SERVER_NAME = re.compile(r"websockets|godot|node|picows|wsfleet-[1-9][0-9]*")
# Start, handshake wait, settle, drain and stop of one run, besides its window (a guess).
RUN_OVERHEAD_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenario",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--servers",
        default=DEFAULT_SERVERS,
        help=f"comma-separated, in table order (default {DEFAULT_SERVERS}; wsfleet-K: K shards)",
    )
    parser.add_argument("--server-cpus", default="0", help="taskset -c list; '' for no pinning")
    parser.add_argument("--client-cpus", default="1", help="CPUs for the load processes")
    parser.add_argument("--client-procs", type=int, default=1, help="echo, connect, mp-relay")
    parser.add_argument("--seconds", type=float, help="measured window (default: the scenario's)")
    parser.add_argument("--warmup", type=float, help="default: the scenario's (1 s)")
    parser.add_argument("--settle", type=float, help="wait after a server's first handshake")
    parser.add_argument("--godot", default=os.environ.get("WSFLEET_GODOT", "godot3-server"))
    parser.add_argument("--godot-sleep-usec", type=int, default=0)
    parser.add_argument("--node", default="node")
    parser.add_argument("--node-path", help="the node_modules folder that holds ws (NODE_PATH)")
    parser.add_argument("--json", metavar="FILE", help="every run of every scenario")
    parser.add_argument("--markdown", metavar="FILE", help="the summary, for RESULTS.md")
    return parser


def scenario_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scenario: Scenario
) -> argparse.Namespace:
    """The scenario's benchmark options at their defaults, with this command's on top."""
    ns = bench.scenario_parser(scenario, runs=args.runs).parse_args([])
    ns.runs = args.runs
    ns.server_cpus, ns.client_cpus = args.server_cpus, args.client_cpus
    if not scenario.one_process:
        ns.client_procs = args.client_procs
    if args.seconds is not None and scenario.seconds is not None:
        ns.seconds = args.seconds
    if args.warmup is not None and scenario.seconds is not None:
        ns.warmup = args.warmup
    if args.settle is not None:
        ns.settle = args.settle
    ns.godot, ns.godot_sleep_usec = args.godot, args.godot_sleep_usec
    ns.node, ns.node_path = args.node, args.node_path
    ns.only = args.servers
    bench.check_scenario(parser, ns, scenario)
    return ns


def estimate_s(plan: list[tuple[Scenario, argparse.Namespace]], servers: int) -> float:
    total = 0.0
    for scenario, ns in plan:
        window = scenario.expected_seconds(ns)
        n = servers if scenario.mode != "mp-relay" else min(servers, 3)
        total += ns.runs * n * (window + ns.settle + RUN_OVERHEAD_S)
    return total


def run_scenario(
    scenario: Scenario, ns: argparse.Namespace, names: list[str], workdir: str
) -> dict[str, Any]:
    """``ns.runs`` interleaved rounds of ``scenario`` over the servers ``names``."""
    print(f"\n== {scenario.config_text(ns)}, {bench.where_text(ns, scenario)}", flush=True)
    everything = server_catalog(scenario.mode, ns, workdir, names)
    skipped = [{"name": s["name"], "skip": s["skip"]} for s in everything if s["skip"]]
    servers = [s for s in everything if not s["skip"]]
    for s in skipped:
        print(f"{s['name']}: {s['skip']}; skipped", flush=True)
    result: dict[str, Any] = {
        "config_text": scenario.config_text(ns),
        "config": config_of(ns),
        "servers": servers,
        "skipped": skipped,
    }
    try:
        scenario.prepare(ns)  # before its servers start: they inherit what it sets
    except RuntimeError as e:
        print(f"{scenario.name}: {e}; not run", flush=True)
        result["servers"] = []
        result["skipped"] = [{"name": s["name"], "skip": str(e)} for s in everything]
        return result
    if servers:
        bench.run_rounds(servers, ns, scenario)
    summarize_servers(servers, scenario.table)
    capacity = client_capacity_pct(ns, parse_cpus(ns.client_cpus))
    result["client_capacity_pct"] = capacity
    if servers:
        print()
        print_table(servers, scenario.table, capacity, base=BASE)
    return result


# -- the summary ------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


def _cell(column: Column, summary: dict[str, Any]) -> str:
    value = summary.get(column.key)
    if not _is_number(value):
        return "–"
    return f"{value:{column.spec}}{column.suffix.replace('%', ' %')}"


def headline(scenario: Scenario) -> Column:
    table = scenario.table
    return next(c for c in table.columns if c.key == table.rate)


def advantage(scenario: Scenario, mine: float, theirs: float) -> float:
    """How many times better ``mine`` is than ``theirs`` (> 1: better), whatever the direction."""
    if not (_is_number(mine) and _is_number(theirs)) or not mine or not theirs:
        return float("nan")
    return theirs / mine if scenario.table.lower_is_better else mine / theirs


def markdown(args: argparse.Namespace, argv: list[str], results: dict[str, dict[str, Any]]) -> str:
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    procs = args.client_procs
    lines = [
        f"Median of {args.runs} interleaved run(s) per server and scenario, "
        f"{datetime.date.today().isoformat()}: servers pinned with `taskset -c "
        f"{args.server_cpus or '(none)'}`, the load generator on CPUs "
        f"{args.client_cpus or 'any'} ({procs} load process(es) where the load splits); "
        f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}.",
        "",
        f"`{shlex.join(['python', '-m', 'wsfleet.loadtest.compare', *argv])}`",
        "",
        "| scenario | figure | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for name, result in results.items():
        scenario = SCENARIOS[name]
        column = headline(scenario)
        by_name = {s["name"]: s for s in result["servers"]}
        skipped = {s["name"]: s["skip"] for s in result["skipped"]}
        base = ratio_base(result["servers"], BASE)
        base_rate = base["summary"][column.key] if base and base["summary"] else None
        rates = [
            s["summary"][column.key]
            for s in result["servers"]
            if s["summary"] and _is_number(s["summary"][column.key])
        ]
        best = (min if scenario.table.lower_is_better else max)(rates) if rates else None
        cells = []
        for server in names:
            s = by_name.get(server)
            if s is None:
                why = skipped.get(server, "not run")
                cells.append("n/a" if why.startswith("not applicable") else "skipped")
                continue
            if s["summary"] is None:
                cells.append("failed")
                continue
            rate = s["summary"][column.key]
            text = _cell(column, s["summary"])
            if rate == best and len(rates) > 1:
                text = f"**{text}**"
            if base_rate and s is not base and _is_number(rate):
                text += f" ({rate / base_rate:.2f}×)"
            cells.append(text)
        title = column.title + (" (less is better)" if scenario.table.lower_is_better else "")
        lines.append(f"| {name} | {title} | " + " | ".join(cells) + " |")
    base_name = BASE if BASE in names else (names[0] if names else "")
    lines += ["", f"Ratios in brackets: to {base_name}."]

    wsfleets = [n for n in names if n.startswith("wsfleet-")]
    refs = [n for n in names if n in REFERENCES]
    if wsfleets and refs:
        lines += [
            "",
            "wsfleet against each reference: how many times better (the ratio of the figures, "
            "inverted where less is better):",
            "",
            "| scenario | wsfleet | " + " | ".join(f"vs {r}" for r in refs) + " |",
            "|---|---|" + "---:|" * len(refs),
        ]
        for name, result in results.items():
            scenario = SCENARIOS[name]
            key = scenario.table.rate
            summaries = {s["name"]: s["summary"] for s in result["servers"] if s["summary"]}
            for w in wsfleets:
                if w not in summaries:
                    continue
                cells = []
                for r in refs:
                    x = advantage(scenario, summaries[w][key], summaries.get(r, {}).get(key))
                    cells.append(f"{x:.2f}×" if _is_number(x) else "–")
                lines.append(f"| {name} | {w} | " + " | ".join(cells) + " |")

    floors = []
    for name, result in results.items():
        detail = _detail(SCENARIOS[name], result, floors)
        lines += ["", *detail]
    if floors:
        lines += [
            "",
            "The load generator was near saturation (≥ 90 % of its CPUs, counting run-queue "
            "wait) for " + ", ".join(floors) + ": those figures are floors.",
        ]
    return "\n".join(lines) + "\n"


def _detail(scenario: Scenario, result: dict[str, Any], floors: list[str]) -> list[str]:
    """One scenario's markdown table: every column of its console table."""
    table = scenario.table
    base = ratio_base(result["servers"], BASE)
    titles = [c.title or f"× {base['name'] if base else '-'}" for c in table.columns]
    lines = [
        f"**{scenario.name}** ({result['config_text']}):",
        "",
        "| server | " + " | ".join(titles) + " |",
        "|---|" + "---:|" * len(titles),
    ]
    base_rate = base["summary"][table.rate] if base and base["summary"] else None
    for s in result["servers"]:
        m = s["summary"]
        if m is None:
            lines.append(f"| {s['name']} | failed: {s['failure']} |" + " |" * (len(titles) - 1))
            continue
        cells = []
        for c in table.columns:
            if not c.key:
                rate = m[table.rate]
                ok = base_rate and _is_number(rate)
                cells.append(f"{rate / base_rate:.2f}×" if ok else "–")
            else:
                cells.append(_cell(c, m))
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
        if client_load_pct(m) >= 0.9 * result.get("client_capacity_pct", math.inf):
            floors.append(f"{scenario.name}/{s['name']}")
    for s in result["skipped"]:
        lines.append(f"| {s['name']} | {s['skip']} |" + " |" * (len(titles) - 1))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    chosen = args.scenario or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    bad = [n for n in names if not SERVER_NAME.fullmatch(n)]
    if not names or bad or len(set(names)) != len(names):
        parser.error(
            f"--servers: websockets, wsfleet-K, godot, node, picows, each once (not {bad})"
        )
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    plan = [(SCENARIOS[n], scenario_args(parser, args, SCENARIOS[n])) for n in chosen]
    use_node_path(args.node_path)
    estimate = estimate_s(plan, len(names))
    print(
        f"compare: {', '.join(chosen)} x {', '.join(names)}, {args.runs} run(s) each; about "
        + (f"{estimate / 60:.0f} min" if estimate >= 90 else f"{estimate:.0f} s"),
        flush=True,
    )

    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="wsfleet-compare-") as workdir:
        for scenario, ns in plan:
            results[scenario.name] = run_scenario(scenario, ns, names, workdir)
    text = markdown(args, argv, results)
    print(f"\n{text}", end="")
    print(f"({time.monotonic() - started:.0f} s)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": vars(args),
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "scenarios": results,
                },
                f,
                indent=1,
            )
    clean = all(
        all_clean(result["servers"], SCENARIOS[name].table) for name, result in results.items()
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
