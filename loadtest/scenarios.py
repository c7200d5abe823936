"""Every scenario in one registry, and the benchmark command line of those beyond echo.

    python -m wsfleet.loadtest.scenarios broadcast [--connections 100] [--senders 10]
        [--size 64] [--inflight 2] [--seconds 3] [--warmup 1]
    python -m wsfleet.loadtest.scenarios connect [--concurrency 32] [--client-procs 1]
        [--seconds 3] [--warmup 1]
    python -m wsfleet.loadtest.scenarios idle [--connections 2000] [--rate 1000] [--hold 1]
  and for all three:
        [--runs 1] [--server-cpus 0] [--client-cpus 1] [--server NAME=COMMAND ...]
        [--only NAMES] [--godot BIN] [--godot-sleep-usec 0] [--node BIN] [--node-path DIR]
        [--json FILE]

`SCENARIOS` maps each name to its `scenario.Scenario` object, in the order the front
ends list them: ``echo`` (`echo_bench`), ``broadcast`` (`broadcast`), ``connect``
(`connect`), ``idle`` (`idle`) and ``mp-relay`` (`relay_bench`); each module's
docstring says what it sends and checks. ``wsfleet loadtest`` (any URL) and
``compare`` take them from here.

The command line runs one scenario against a set of servers in one invocation, on
the same CPUs, with `bench.run_benchmark` (each server started fresh for each run
under ``taskset -c --server-cpus``, ready once a WebSocket handshake succeeds, the
load processes pinned to ``--client-cpus``, the server tree's CPU time over the
window, SIGTERM then SIGKILL; the medians over ``--runs``, the table with the
ratio to the first server and the load generator's own CPU, the JSON file). A row
where the load generator was near saturation (CPU plus run-queue wait >= 90 % of the
CPUs it had) is flagged, and named in one sentence under the table: a floor. The
idle scenario runs its connections in this process (it reads the server's memory).
The servers are
`catalog.server_catalog`'s (``echo`` set for connect and idle, ``broadcast`` set
for broadcast), first the baseline the ratio compares with:

* ``websockets``: ``python -m wsfleet.loadtest.ws_server --mode echo|broadcast``
  (websockets on uvloop, one process; broadcast with
  ``websockets.asyncio.server.broadcast``);
* ``wsfleet-1``, ``wsfleet-2``: ``wsfleet serve --bind 127.0.0.1 --shards K --quiet``
  (echo), or ``python -m wsfleet.loadtest.wsfleet_apps broadcast --shards K``;
* ``godot``: ``godot3-server`` running ``loadtest/godot_server.gd`` (Godot 3.2.3's
  ``WebSocketServer``, plain mode, main loop without sleep with the default
  ``--godot-sleep-usec 0``: it burns its core even when idle, so its CPU figure
  is 100 %) in a temporary working directory;
* ``node``: ``node loadtest/node_ws_server.js --mode {mode}`` (npm package ``ws``);
* ``picows`` (echo set only: connect and idle): ``python -m wsfleet.loadtest.picows_server``
  (picows' Cython server on uvloop; "not installed" without the package).

A server whose program (``godot3-server``, ``node``) or, for Node, whose ``ws``
module is missing is reported as "not installed" and skipped; that does not
change the exit status (``--node-path DIR`` or ``NODE_PATH`` names the
``node_modules`` folder that holds ``ws``). ``--server NAME=COMMAND`` (with
``{port}``, and ``{mode}`` if wanted) replaces the default set, ``--only``
picks from it (or names ``wsfleet-K`` for K shards). The exit status is 1 if a
server failed or any run counted errors (or, for broadcast, missing deliveries).

May import every scenario module and `bench`.
"""

from __future__ import annotations

import argparse
import sys

from wsfleet.loadtest import bench, broadcast, connect, echo_bench, idle, relay_bench
from wsfleet.loadtest.scenario import Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        echo_bench.SCENARIO,
        broadcast.SCENARIO,
        connect.SCENARIO,
        idle.SCENARIO,
        relay_bench.SCENARIO,
    )
}
HELP = {
    "echo": "messages in flight per connection, each echo checked: msg/s and round trips",
    "broadcast": "every message to every other client: deliveries/s and delivery latency",
    "connect": "handshake + close cycles per second",
    "idle": "connections that stay open; with --server-pid, the server's memory per connection",
    "mp-relay": "Godot 3.2 multiplayer clients relaying through the server: deliveries/s",
}
# The scenarios this module's command line runs (echo and mp-relay have their own).
BENCHMARKS = {
    "broadcast": "fan-out: deliveries/s and delivery latency",
    "connect": "handshake + close cycles per second",
    "idle": "server memory per idle connection",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, text in BENCHMARKS.items():
        bench.add_scenario_arguments(sub.add_parser(name, help=text), SCENARIOS[name], runs=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return bench.run_benchmark(parser, args, SCENARIOS[args.scenario])


if __name__ == "__main__":
    sys.exit(main())
