"""Benchmarks and the load generator (``wsfleet loadtest``).

Owns: the tools that measure wsfleet against other servers (websockets, Godot 3.2.3,
Node's ws, picows) and its own parts (``ipc_bench``), and the figures in ``RESULTS.md``.
Never imported by the server itself; it may import the public API of ``wsfleet``
(``wsfleet_apps``) and ``wsfleet.ipc`` (``ipc_bench``) and nothing else of the
project. The tests import it, never the other way round.

One framework, in layers (each module's docstring says what it may import):

* the wire and the numbers: ``wsclient`` (the fast raw WebSocket client),
  ``counters`` (`Counters`, `ErrorSamples`, `LoadState`, HdrHistogram latencies:
  every scenario reports with these), ``procstats`` (CPU and memory of a process
  tree, CPU lists, the open-files limit);
* a run: ``loadclient`` (inside a load process: connections, the measured window,
  the close), ``loadprocs`` (the load processes from the driving process),
  ``servers`` (the `Target` of a run; `ServerProcess` starts and stops one);
* what is measured: ``scenario`` (the `Scenario` base class and `ProcessScenario`),
  one module per scenario: ``echo_bench``, ``broadcast``, ``connect``, ``idle``,
  ``relay_bench`` (mp-relay), and ``scenarios`` (the registry, `SCENARIOS`);
* ``rpc_bench``: RPC calls per second into the Python server
  (``server.multiplayer``), with the relay and RAW figures of the same server beside
  them (its own rows and table over `bench.one_run`; its server is ``wsfleet serve
  --app wsfleet.loadtest.rpc_bench:setup``), and ``rpc_api_bench`` (the RPC layer
  alone, in-process, by the number of peers);
* the front ends: ``bench`` (a benchmark's rounds over servers it starts, the
  command lines of ``echo_bench``, ``relay_bench`` and ``scenarios``), ``catalog``
  (the servers it compares), ``report`` (medians, table, JSON), ``cli``
  (``wsfleet loadtest`` on any URL), ``compare`` (every scenario against every
  server), ``soak`` (10,000 connections for minutes);
* the servers under test besides ``wsfleet serve``: ``ws_server`` (the one
  ``websockets`` baseline, echo or broadcast), ``wsfleet_apps`` (wsfleet's
  broadcast application), ``shard_echo`` (the echo as a shard handler: ``wsfleet-K-sh``),
  ``picows_server`` (picows' own server, echo), ``godot_server.gd``,
  ``node_ws_server.js``; and ``scaling.sh`` (echo with 1-8 shards on a 16-core machine,
  in the front and in shard handlers);
* ``cluster_bench``: a cluster over NATS (``wsfleet serve --cluster``): cross-node echo
  against same-node echo, and ids unique over 10,000 connections on 3 nodes;
* micro-benchmarks of one shard's code, in-process: ``wire_bench`` (the receive
  path), ``handshake_bench`` (upgrade + close cycles); and of the front's:
  ``dispatch_bench`` (``poll()``'s dispatch and a handler per message, without
  sockets: it wires the server's fleet by hand, so it imports the front's modules);
* ``cpu_roles``: a server's CPU per message or per connect cycle, by process
  (front, supervisor, shards).
"""
