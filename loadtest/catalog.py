"""The servers a benchmark compares: websockets, ``wsfleet-K``, Godot 3.2.3, Node's ws and
picows, each for the application a scenario needs (echo, broadcast, the multiplayer relay).

Owns: `server_catalog` (a server record per name, with ``skip`` set for those not
installed or without that mode), `select_servers` (``--server``/``--only``),
`node_status`, `use_node_path`, and the command-line options that pick the
programs (`add_server_arguments`).

Imports only the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LOADTEST_DIR = Path(__file__).resolve().parent
GODOT_SCRIPT = LOADTEST_DIR / "godot_server.gd"  # plain mode: echo or broadcast
GODOT_MP_SCRIPT = LOADTEST_DIR.parent / "tests" / "godot" / "mp_server.gd"  # multiplayer relay
NODE_SCRIPT = LOADTEST_DIR / "node_ws_server.js"
MODES = ("echo", "broadcast", "mp-relay")
# The default set of each mode, the first one being the baseline of the benchmark's ratios.
DEFAULT_NAMES = {
    "echo": ("websockets", "wsfleet-1", "wsfleet-2", "godot", "node", "picows"),
    "broadcast": ("websockets", "wsfleet-1", "wsfleet-2", "godot", "node"),
    "mp-relay": ("godot", "wsfleet-1", "wsfleet-2"),
}
REFERENCES = ("websockets", "godot", "node", "picows")  # the servers that are not wsfleet


def picows_status() -> str | None:
    """None when picows can be imported by this interpreter (the one that runs its server),
    else why not."""
    try:
        found = importlib.util.find_spec("picows") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return "not installed: picows (pip install 'wsfleet[bench]' or pip install picows)"
    return None


def node_status(node: str) -> str | None:
    """None when ``node`` runs and finds the ``ws`` module, else why not ("not installed: ...")."""
    exe = shutil.which(node)
    if exe is None:
        return f"not installed: {node} not found"
    try:
        # From the script's folder, as require() in the script resolves (plus NODE_PATH).
        check = subprocess.run(
            [exe, "-e", "require.resolve('ws')"], cwd=LOADTEST_DIR, capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not installed: {node} does not run ({e})"
    if check.returncode != 0:
        return "not installed: the ws module is missing (npm install ws; --node-path or NODE_PATH)"
    return None


def _godot_command(args: argparse.Namespace, workdir: str, script: Path, options: str) -> str:
    # Godot writes logs/ under res:// (its working directory without a project) and user data
    # under $HOME: both go to a temporary directory. LANG: Godot complains of "C".
    w = shlex.quote(workdir)
    return (
        f"env -C {w} HOME={w} XDG_DATA_HOME={w} XDG_CONFIG_HOME={w} XDG_CACHE_HOME={w} "
        f"LANG=en_US.UTF-8 {shlex.quote(args.godot)} --no-window -s {shlex.quote(str(script))}"
        f" --wsfleet-port={{port}} {options} --wsfleet-sleep-usec={args.godot_sleep_usec}"
    )


def server_catalog(
    mode: str, args: argparse.Namespace, workdir: str, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The servers ``names`` (default: the mode's set) for ``mode`` as server records, in that
    order, with ``skip`` set (why) for those not installed or without that mode.

    Names: ``websockets``, ``wsfleet-K`` (K shards), ``wsfleet-K-sh`` (echo only: the echo
    as a shard handler, `shard_echo`), ``godot``, ``node``, ``picows`` (echo only:
    `picows_server`, picows' own server on uvloop). The options
    ``args.godot``, ``args.godot_sleep_usec``, ``args.node`` and, for mp-relay,
    ``args.godot_script`` (`add_server_arguments`) pick the programs. Raises ValueError for
    an unknown name.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    servers = []
    for name in names or DEFAULT_NAMES[mode]:
        skip = None
        shards = name.removeprefix("wsfleet-")
        in_shards = mode == "echo" and shards.endswith("-sh")
        if in_shards:
            shards = shards.removesuffix("-sh")
        if name.startswith("wsfleet-") and shards.isdigit() and int(shards) >= 1:
            if in_shards:  # the echo as a shard handler: answered in the shards
                command = f"wsfleet serve --bind {{host}} --port {{port}} --shards {shards} --quiet"
                command += " --shard-handler wsfleet.loadtest.shard_echo:echo"
            elif mode == "echo":  # the echo application of `wsfleet serve`: echo in the front
                command = f"wsfleet serve --bind {{host}} --port {{port}} --shards {shards} --quiet"
            elif mode == "broadcast":
                command = "python -m wsfleet.loadtest.wsfleet_apps broadcast --bind {host}"
                command += f" --port {{port}} --shards {shards}"
            else:
                command = "wsfleet serve --gd-mp-api --quiet --bind {host} --port {port}"
                command += f" --shards {shards}"
        elif name == "websockets":
            # The one websockets baseline (`ws_server`), in the mode's application.
            command = f"python -m wsfleet.loadtest.ws_server --mode {mode} --port {{port}}"
            if mode == "mp-relay":
                command, skip = "", "not applicable: no Godot multiplayer mode"
        elif name == "godot":
            if mode == "mp-relay":
                script = Path(args.godot_script)
                options = "--wsfleet-clients=0 --wsfleet-timeout=0 --wsfleet-quiet=1"
            else:
                script, options = GODOT_SCRIPT, f"--wsfleet-mode={mode}"
            command = _godot_command(args, workdir, script, options)
            if shutil.which(args.godot) is None:
                skip = f"not installed: {args.godot}"
            elif not script.is_file():
                skip = f"not installed: {script} not found"
        elif name == "node":
            command = f"{shlex.quote(args.node)} {shlex.quote(str(NODE_SCRIPT))} --port {{port}}"
            command += f" --mode {mode}"
            if mode == "mp-relay":
                skip = "not applicable: no Godot multiplayer mode"
            else:
                skip = node_status(args.node)
        elif name == "picows":
            command = "python -m wsfleet.loadtest.picows_server --mode echo --port {port}"
            if mode != "echo":
                skip = "not applicable: echo only"
            else:
                skip = picows_status()
        else:
            raise ValueError(
                f"unknown server {name!r} (websockets, wsfleet-K, godot, node, picows)"
            )
        servers.append(
            {"name": name, "command": command, "runs": [], "failure": None, "skip": skip}
        )
    return servers


def select_servers(
    parser: argparse.ArgumentParser, args: argparse.Namespace, mode: str, workdir: str
) -> list[dict[str, Any]]:
    """The servers of a benchmark: ``--server`` specs (``{mode}`` replaced) or the catalog's,
    narrowed by ``--only``; with ``skip`` set for those that cannot run."""
    only = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    if args.server:
        specs = [spec.replace("{mode}", mode) for spec in args.server]
        servers = servers_from_specs(parser, specs)
        if only:
            unknown = set(only) - {s["name"] for s in servers}
            if unknown:
                parser.error(f"--only: unknown server(s) {sorted(unknown)}")
            servers = [s for s in servers if s["name"] in only]
        return servers
    try:
        return server_catalog(mode, args, workdir, only or None)
    except ValueError as e:
        parser.error(f"--only: {e}")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """The servers of `select_servers`."""
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=COMMAND",
        help="a server command with {port} (and {host}, {mode}); repeat; replaces the default set",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="comma-separated servers to run: from the default set or websockets, wsfleet-K, "
        "godot, node, picows",
    )
    parser.add_argument("--godot", default=os.environ.get("WSFLEET_GODOT", "godot3-server"))
    parser.add_argument("--godot-sleep-usec", type=int, default=0)
    parser.add_argument(
        "--godot-script",
        type=Path,
        default=GODOT_MP_SCRIPT,
        help="Godot's multiplayer relay script (mp-relay; default: tests/godot/mp_server.gd)",
    )
    parser.add_argument("--node", default="node")
    parser.add_argument("--node-path", help="the node_modules folder that holds ws (NODE_PATH)")


def use_node_path(node_path: str | None) -> None:
    """Put ``node_path`` first in NODE_PATH for the Node servers started from now on."""
    if node_path:
        os.environ["NODE_PATH"] = os.pathsep.join(
            filter(None, [node_path, os.environ.get("NODE_PATH")])
        )


def servers_from_specs(parser: argparse.ArgumentParser, specs: Sequence[str]) -> list[dict]:
    """``NAME=COMMAND`` specs as the servers' records (their runs added by `run_rounds`)."""
    servers: list[dict[str, Any]] = []
    for spec in specs:
        name, sep, command = spec.partition("=")
        if not sep or not name.strip() or "{port}" not in command:
            parser.error(f"--server {spec!r}: expected NAME=COMMAND with {{port}} in COMMAND")
        servers.append(
            {"name": name.strip(), "command": command.strip(), "runs": [], "failure": None}
        )
    return servers
