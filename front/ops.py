"""The operator's commands: ``wsfleet status``, ``stop``, ``drain``, ``reload``.

Each talks to a running server's control socket (`wsfleet.ipc.opsock`),
served by its supervisor, found by ``--port`` (the default path for that
port) or ``--control PATH``.  Also binds the operator's sockets for
``listen`` (`bind_ops_sockets`).

Exit statuses: 0 done; 1 the server answered but the stop was not clean or
the reload not complete, or either was not done in time; 2 misuse; 3 no
server answers at that socket.

Imports `wsfleet.ipc` and `.fleet` only.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from wsfleet.ipc import opsock

from .fleet import OpsSockets

log = logging.getLogger("wsfleet")

EXIT_NOT_CLEAN = 1
EXIT_NO_SERVER = 3
DEFAULT_STOP_TIMEOUT = 10.0
#: A reload moves the shards one at a time: a fresh interpreter each (~0.5 s), then
#: the handoff (up to a few seconds for peers that are slow to take their data).
DEFAULT_RELOAD_TIMEOUT = 300.0


def bind_ops_sockets(
    control: str | bool | None, metrics: tuple[str, int] | None, port: int
) -> OpsSockets:
    """Bind the control socket (unless ``control`` is False) and the metrics socket."""
    control_sock, path = None, ""
    if control in (None, True):
        # The default socket is a convenience: if its folder is unusable (another user's,
        # open to others) the server runs without one rather than not at all.
        try:
            control_sock, path = opsock.bind(None, port)
        except OSError as exc:
            log.warning("listen: no control socket (wsfleet status/stop/drain): %s", exc)
    elif control is not False:
        control_sock, path = opsock.bind(str(control), port)  # asked for: failing is an error
    metrics_sock = None
    if metrics is not None:
        host, metrics_port = metrics
        try:
            infos = socket.getaddrinfo(host, metrics_port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            metrics_sock = socket.socket(family, socket.SOCK_STREAM)
            metrics_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            metrics_sock.bind(address)
            metrics_sock.listen(64)
        except OSError as exc:
            if metrics_sock is not None:
                metrics_sock.close()
            if control_sock is not None:
                os.unlink(path)
                control_sock.close()
            raise OSError(exc.errno, f"metrics {host}:{metrics_port}: {exc.strerror}") from None
    return OpsSockets(control_sock, path, metrics_sock)


# -- the commands -----------------------------------------------------------------------------


def add_target_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--port", type=int, default=9080, help="the server's port (default 9080): its socket"
    )
    where.add_argument("--control", metavar="PATH", help="the server's control socket")


def add_commands(commands: Any) -> None:
    """Add ``status``, ``stop``, ``drain`` and ``reload`` to the ``wsfleet`` subparsers."""
    status = commands.add_parser("status", help="a running server's figures, per shard")
    add_target_options(status)
    status.add_argument("--json", action="store_true", help="the status document (stable)")
    status.add_argument("--watch", action="store_true", help="redraw every second, with rates")
    status.add_argument("--count", type=int, default=0, help="with --watch: stop after N")
    status.set_defaults(ops_command=run_status)
    stop = commands.add_parser("stop", help="stop a running server in order (close 1001)")
    add_target_options(stop)
    stop.add_argument(
        "--timeout", type=float, default=DEFAULT_STOP_TIMEOUT, help="seconds (default 10)"
    )
    stop.set_defaults(ops_command=run_stop)
    drain = commands.add_parser(
        "drain", help="health 503 and new upgrades refused (503); peers stay"
    )
    add_target_options(drain)
    drain.add_argument("--off", action="store_true", help="accept new upgrades again")
    drain.set_defaults(ops_command=run_drain)
    reload = commands.add_parser(
        "reload", help="replace every shard process, one at a time, keeping every connection"
    )
    add_target_options(reload)
    reload.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_RELOAD_TIMEOUT,
        help="seconds for the whole reload (default 300)",
    )
    reload.set_defaults(ops_command=run_reload)


def socket_path(args: argparse.Namespace) -> str:
    return args.control or opsock.default_path(args.port)


def _fail(prog: str, path: str, exc: OSError) -> int:
    print(f"wsfleet {prog}: no server answers at {path}: {exc}", file=sys.stderr)
    return EXIT_NO_SERVER


def run_status(args: argparse.Namespace) -> int:
    path = socket_path(args)
    previous: tuple[float, dict[str, Any]] | None = None
    shown = 0
    try:
        while True:
            try:
                doc = opsock.request(path, {"cmd": "status"}, 5.0)[0]
            except (OSError, IndexError) as exc:
                return _fail("status", path, exc if isinstance(exc, OSError) else OSError(str(exc)))
            now = time.monotonic()
            if args.json:
                sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            else:
                if args.watch:
                    sys.stdout.write("\x1b[H\x1b[2J")
                sys.stdout.write(format_status(doc, previous and (now - previous[0], previous[1])))
            sys.stdout.flush()
            shown += 1
            if not args.watch or (args.count and shown >= args.count):
                return 0
            previous = (now, doc)
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def format_status(doc: dict[str, Any], since: tuple[float, dict[str, Any]] | None = None) -> str:
    """The human form of the status document (with rates when ``since`` has an earlier one)."""
    lines = [
        f"wsfleet :{doc.get('port')}  supervisor {doc.get('supervisor_pid')}  "
        f"front {doc.get('front_pid')}  up {doc.get('uptime', 0):.0f} s  "
        f"peers {doc['peers']}{'  DRAINING' if doc['draining'] else ''}"
    ]
    header = (
        f"{'shard':>5} {'pid':>8} {'state':<8} {'peers':>7} {'acc':>7} {'refused':>8} "
        f"{'msg in':>10} {'msg out':>10} {'B in':>10} {'B out':>10} {'ring':>6} "
        f"{'paused':>6} {'rst':>4} {'cpu%':>6} {'rss':>10} {'up s':>7}"
    )
    lines.append(header)
    old = {row["index"]: row for row in since[1]["shards"]} if since else {}
    for row in [*doc["shards"], {**doc["totals"], "index": "all", "pid": "", "state": ""}]:
        refused = sum(v for k, v in row.items() if k.startswith("refused_"))
        ring = row["ring_fill"] / row["ring_capacity"] if row.get("ring_capacity") else 0.0
        msg_in, msg_out = f"{row['messages_in']}", f"{row['messages_out']}"
        before = old.get(row["index"]) if since else None
        if row["index"] == "all" and since:
            before = since[1]["totals"]
        if before is not None and since and since[0] > 0:
            rate_in = (row["messages_in"] - before["messages_in"]) / since[0]
            rate_out = (row["messages_out"] - before["messages_out"]) / since[0]
            msg_in, msg_out = f"{rate_in:.0f}/s", f"{rate_out:.0f}/s"
        lines.append(
            f"{row['index']!s:>5} {row.get('pid') or '-'!s:>8} {row.get('state', ''):<8} "
            f"{row['peers']:>7} {row['handshakes_accepted']:>7} {refused:>8} "
            f"{msg_in:>10} {msg_out:>10} {_size(row['bytes_in']):>10} "
            f"{_size(row['bytes_out']):>10} {ring:>6.1%} {row['paused_sockets']:>6} "
            f"{row['restarts']:>4} {row['cpu_percent']:>6.1f} {_size(row['rss']):>10} "
            f"{row.get('uptime', 0):>7.0f}"
        )
        if row.get("reason"):
            lines.append(f"      shard {row['index']} {row['state']}: {row['reason']}")
    cluster = doc.get("cluster")
    if cluster:
        lines.extend(_format_cluster(cluster))
    closes = {k[7:]: v for k, v in doc["totals"].items() if k.startswith("closes_") and v}
    refusals = {k[8:]: v for k, v in doc["totals"].items() if k.startswith("refused_") and v}
    lines.append("closes: " + (", ".join(f"{k} {v}" for k, v in closes.items()) or "none"))
    lines.append("refused: " + (", ".join(f"{k} {v}" for k, v in refusals.items()) or "none"))
    return "\n".join(lines) + "\n"


def _format_cluster(cluster: dict[str, Any]) -> list[str]:
    """The cluster section: this node, NATS, the other nodes and the cross-node traffic."""
    lines = [
        f"cluster node {cluster['node']} (id slot {cluster['slot']}"
        f"{', provisional' if cluster.get('provisional') else ''}) {cluster['state']}  "
        f"NATS {'connected' if cluster['nats_connected'] else 'NOT CONNECTED'} "
        f"{cluster['nats_url']}  peers {cluster['peers']} here, "
        f"{cluster['remote_peers']} on {len(cluster['nodes'])} other nodes"
    ]
    lines.append(
        f"{'node':>16} {'slot':>5} {'peers':>7} {'synced':>6} {'seen s':>7} "
        f"{'msg in':>9} {'msg out':>9} {'B in':>10} {'B out':>10}"
    )
    for node in cluster["nodes"]:
        lines.append(
            f"{node['name']:>16} {node['slot']:>5} {node['peers']:>7} "
            f"{'yes' if node['synced'] else 'no':>6} {node['last_seen_s']:>7.1f} "
            f"{node['messages_in']:>9} {node['messages_out']:>9} "
            f"{_size(node['bytes_in']):>10} {_size(node['bytes_out']):>10}"
        )
    lines.append(
        f"cross-node: in {cluster['messages_in']} messages ({_size(cluster['bytes_in'])}), "
        f"out {cluster['messages_out']} ({_size(cluster['bytes_out'])}); "
        f"refused sends (NATS down) {cluster['sends_refused_down']}, "
        f"wrong wire version {cluster['refused_version']}, bad {cluster['bad_messages']}"
    )
    return lines


def _final_answer(
    prog: str,
    args: argparse.Namespace,
    request: dict[str, Any],
    last: str,
    on_line: Callable[[dict[str, Any]], None] | None = None,
    late: str = "",
) -> dict[str, Any] | int:
    """Send ``request``; give every answer line to ``on_line`` until the one with key
    ``last``, which is returned; or an exit status (said on stderr) when none comes in
    ``args.timeout`` (``late`` is added to that message)."""
    path = socket_path(args)
    deadline = time.monotonic() + args.timeout
    try:
        sock = opsock.send_request(path, request, max(0.1, args.timeout))
    except OSError as exc:
        return _fail(prog, path, exc)
    try:
        for line in _read_lines(sock, deadline):
            if line.get(last):
                return line
            if on_line is not None:
                on_line(line)
    except TimeoutError:
        print(f"wsfleet {prog}: not done within {args.timeout:g} s{late}", file=sys.stderr)
        return EXIT_NOT_CLEAN
    except OSError as exc:
        print(f"wsfleet {prog}: lost the server: {exc}", file=sys.stderr)
        return EXIT_NOT_CLEAN
    finally:
        sock.close()
    print(f"wsfleet {prog}: the server went away before it was done", file=sys.stderr)
    return EXIT_NOT_CLEAN


def _read_lines(sock: socket.socket, deadline: float) -> Iterator[dict[str, Any]]:
    """The server's JSON lines as they come, until it closes; TimeoutError at ``deadline``."""
    buffered = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            if line.strip():
                yield orjson.loads(line)


def run_stop(args: argparse.Namespace) -> int:
    """Ask the server to stop; wait for its supervisor to say every shard has exited."""
    late = " (does the application handle stop_requested?)"
    done = _final_answer("stop", args, {"cmd": "stop"}, "stopped", late=late)
    if isinstance(done, int):
        return done
    if not done.get("clean"):
        print("wsfleet stop: stopped, but a shard had to be killed", file=sys.stderr)
        return EXIT_NOT_CLEAN
    print("wsfleet stop: stopped")
    return 0


def run_reload(args: argparse.Namespace) -> int:
    """Replace every shard process; print a line per shard; 0 only if all were replaced."""

    def on_line(line: dict[str, Any]) -> None:
        if "error" in line and "shard" in line:
            print(f"wsfleet reload: {line['error']}", file=sys.stderr)
        elif "shard" in line:
            print(
                f"wsfleet reload: shard {line['shard']}: pid {line['old_pid']} -> "
                f"{line['pid']}, {line['connections']} connection(s) moved in "
                f"{line['seconds']:.2f} s"
            )

    done = _final_answer("reload", args, {"cmd": "reload"}, "reloaded", on_line)
    if isinstance(done, int):
        return done
    if not done.get("ok"):
        for error in done.get("errors", []):
            if not error.startswith("shard "):  # those were printed as they came
                print(f"wsfleet reload: {error}", file=sys.stderr)
        return EXIT_NOT_CLEAN
    print(f"wsfleet reload: {done.get('replaced', 0)} shard process(es) replaced")
    return 0


def run_drain(args: argparse.Namespace) -> int:
    path = socket_path(args)
    try:
        answer = opsock.request(path, {"cmd": "drain", "on": not args.off}, 5.0)[0]
    except (OSError, IndexError) as exc:
        return _fail("drain", path, exc if isinstance(exc, OSError) else OSError(str(exc)))
    print("wsfleet drain: " + ("draining" if answer.get("draining") else "accepting again"))
    return 0
