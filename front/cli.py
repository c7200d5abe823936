"""The ``wsfleet`` command: ``wsfleet serve`` runs a server with a built-in application,
``wsfleet loadtest`` drives load against any WebSocket URL (`wsfleet.loadtest.cli`).

Misuse never ends in a traceback: every bad option value, a host name that
does not resolve, unreadable TLS files, a port in use... ends with one line
on stderr (``wsfleet serve: error: ...``) and exit status 2.  The options are
checked by their argparse types where the value alone tells, then together
(`check_serve_args`), then by ``listen()``, whose own log lines are folded
into that one line.

The built-in echo (`Echo`) never loses a message it took: when
``put_packet`` refuses (a peer reads slower than it sends), the echo keeps the
packet, reads nothing more from that peer (its inbound queue fills and the
front stops reading its socket: TCP pushes back on it) and sends the packet
once there is room.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn
from urllib.parse import urlsplit

from wsfleet.ipc.config import (
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_COMPRESSION_MEM_LEVEL,
    DEFAULT_COMPRESSION_WINDOW_BITS,
    DEFAULT_SHARD_TIMEOUT,
    MIN_SHARD_TIMEOUT,
)
from wsfleet.ipc.logconfig import FORMATS, LEVELS, LogConfig
from wsfleet.ipc.logconfig import apply as apply_logging
from wsfleet.ipc.proctitle import set_title

from . import __version__, config_file, userapp
from . import ops as ops_commands
from .binding import format_url
from .cluster import check_cluster_url, check_node_name, credentials_problem
from .errors import Error
from .peer import WebSocketPeer
from .server import (
    DATA_RECEIVED_MODES,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    SLOW_CONSUMER_CLOSE_CODES,
    WebSocketServer,
)

log = logging.getLogger("wsfleet")

_TEXT, _BINARY = WebSocketPeer.WRITE_MODE_TEXT, WebSocketPeer.WRITE_MODE_BINARY
_OUT_OF_MEMORY = Error.ERR_OUT_OF_MEMORY
#: Exit status of every misuse (argparse's own).
EXIT_USAGE = 2
#: Exit status when the server cannot go on: every shard given up, the supervisor gone,
#: or the application (--app) raised.
EXIT_FAILED = 1
#: File descriptors a shard keeps for itself (listening sockets, rings, stdio, Python's).
_FDS_RESERVED = 64
MAX_SHARDS = 1024
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # WebSocketServer's ceiling for max_message_size
#: A subprotocol name is an HTTP token (RFC 6455 4.1, RFC 7230 3.2.6).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a misuse is one line (``PROG: error: MESSAGE``) and status 2, no usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def usage_error(message: str, prog: str = "wsfleet serve") -> int:
    """Say what is wrong in one line; the status to exit with."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


# -- option types: each turns a string into a value or says in a few words why not ----------


def _number(text: str, kind: Callable[[str], float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def port_number(text: str) -> int:
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one): {value}")
    return value


def shard_count(text: str) -> int:
    value = int(_number(text, int))
    if not 1 <= value <= MAX_SHARDS:
        raise argparse.ArgumentTypeError(f"shards are 1 to {MAX_SHARDS}: {value}")
    return value


def at_least(minimum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int(_number(text, int))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    convert.__name__ = "integer"  # argparse names the type in some of its messages
    return convert


def bounded(minimum: int, maximum: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int(_number(text, int))
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be {minimum} to {maximum}: {value}")
        return value

    convert.__name__ = "integer"
    return convert


def rate(text: str) -> float:
    """Messages a second: more than 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 messages a second: {text}")
    return value


def message_size(text: str) -> int:
    value = int(_number(text, int))
    if not 1 <= value <= MAX_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_MESSAGE_SIZE} bytes: {value}")
    return value


def seconds(zero_means_off: bool) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = _number(text, float)
        if value < 0 or (value == 0 and not zero_means_off):
            raise argparse.ArgumentTypeError(
                f"must be {'0 (off) or more' if zero_means_off else 'more than 0'}: {text}"
            )
        return value

    convert.__name__ = "seconds"
    return convert


def protocol_list(text: str) -> list[str]:
    """Comma-separated subprotocol names ("" for none); each an HTTP token."""
    if not text.strip():
        return []
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if not _TOKEN.fullmatch(name):
            raise argparse.ArgumentTypeError(
                f"{name!r} is not a subprotocol name (letters, digits and !#$%&'*+-.^_`|~; "
                "comma-separated)"
            )
    return names


def origin_list(text: str) -> list[str]:
    """Comma-separated Origin values, each ``scheme://host[:port]`` (or ``null``)."""
    origins = [origin.strip() for origin in text.split(",") if origin.strip()]
    if not origins:
        raise argparse.ArgumentTypeError("needs at least one origin, e.g. https://game.example")
    for origin in origins:
        if origin == "null":
            continue
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018  (ValueError for a port that is not a number)
            valid = bool(parts.scheme and parts.hostname) and not (
                parts.path or parts.query or parts.fragment or parts.username
            )
        except ValueError:  # a bad port
            valid = False
        if not valid:
            raise argparse.ArgumentTypeError(
                f"{origin!r} is not an origin: scheme://host[:port], e.g. https://game.example"
            )
    return origins


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="wsfleet",
        description="Godot 3.2's WebSocketServer API over one worker process per core.",
    )
    parser.add_argument("--version", action="version", version=f"wsfleet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run a server: the built-in echo application, or with --gd-mp-api a relay for "
        "Godot 3.2 multiplayer games (Ctrl-C stops it)",
    )
    serve.add_argument(
        "--port", type=port_number, default=9080, help="TCP port (default 9080; 0: any free one)"
    )
    serve.add_argument(
        "--bind",
        default="*",
        help='address or host name to listen on (default "*": every address)',
    )
    serve.add_argument(
        "--shards", type=shard_count, default=None, help="worker processes (default: CPUs)"
    )
    serve.add_argument(
        "--protocols",
        type=protocol_list,
        default=[],
        help="comma-separated subprotocols the server speaks",
    )
    serve.add_argument("--tls-cert", help="PEM certificate (chain) file: serve wss://")
    serve.add_argument("--tls-key", help="PEM private key file")
    serve.add_argument(
        "--gd-mp-api",
        action="store_true",
        help="be peer 1 of Godot's high-level multiplayer API: relay between Godot clients",
    )
    serve.add_argument(
        "--quiet", action="store_true", help="log warnings and errors only (--log-level warning)"
    )
    serve.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="run this application instead of the echo: ATTR(server) is called before listen "
        "and returns None or a function called after every poll (see the README)",
    )
    serve.add_argument(
        "--shard-handler",
        metavar="MODULE:ATTR",
        help="application code run inside every shard: ATTR(context) is called once per shard "
        "process and returns a handler whose on_message(peer_id, data, is_text) sees each "
        "message first (False: consumed there; else on to the front); not with --gd-mp-api "
        "(README: Application code in the shards)",
    )
    serve.add_argument(
        "--data-received-mode",
        choices=DATA_RECEIVED_MODES,
        default="message",
        help="data_received per message (Godot's, the default) or once per peer per batch with "
        "all its new messages waiting (get_packets; README: Per-peer delivery)",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of serve options (keys: option names); the command line and "
        "WSFLEET_* variables win over it",
    )
    _add_operations_options(serve)
    _add_ops_options(serve)
    _add_limit_options(serve)
    _add_cluster_options(serve)
    _add_compression_options(serve)
    serve.set_defaults(serve_parser=serve)  # for messages that name its options
    # Its options are wsfleet.loadtest.cli's, parsed there (imported only when it runs).
    loadtest = commands.add_parser(
        "loadtest",
        help="drive load against any WebSocket URL (wsfleet loadtest --help)",
        add_help=False,
        prefix_chars="\0",
    )
    loadtest.add_argument("args", nargs=argparse.REMAINDER)
    ops_commands.add_commands(commands)  # status, stop, drain, reload
    return parser


def cluster_url(text: str) -> str:
    try:
        return check_cluster_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def node_name(text: str) -> str:
    try:
        return check_node_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_cluster_options(serve: argparse.ArgumentParser) -> None:
    """A cluster of nodes over NATS (README "Cluster"; needs wsfleet[cluster])."""
    group = serve.add_argument_group(
        "cluster (several hosts, over NATS; pip install wsfleet[cluster])"
    )
    group.add_argument(
        "--cluster",
        metavar="URL",
        type=cluster_url,
        default=None,
        help="join the wsfleet nodes of this NATS server (JetStream on), e.g. "
        "nats://10.0.0.5:4222 (several: comma-separated): unique peer ids over the "
        "cluster, and every node reaches every peer",
    )
    group.add_argument(
        "--node-name",
        metavar="NAME",
        type=node_name,
        default=None,
        help="this node's name in the cluster (letters, digits, _ and -; default hostname-pid)",
    )
    group.add_argument(
        "--cluster-tls-ca",
        metavar="FILE",
        default=None,
        help="PEM file of the CA(s) that signed the NATS server's certificate (tls://); "
        "default: the system's CAs",
    )
    group.add_argument(
        "--cluster-creds",
        metavar="FILE",
        default=None,
        help="a NATS credentials file (.creds: a user JWT and its nkey seed), for a NATS "
        "server in operator mode; default: none (or credentials in the URL)",
    )


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), port_number(port)


def _add_ops_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--control",
        metavar="PATH",
        default=None,
        help="the control socket for wsfleet status/stop/drain (default: one per port under "
        "$XDG_RUNTIME_DIR/wsfleet; 'off': none)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=host_port,
        default=None,
        help="serve Prometheus /metrics and /healthz there (e.g. 127.0.0.1:9100)",
    )


def log_level(text: str) -> str:
    value = text.strip().lower()
    if value not in LEVELS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(LEVELS)}: {text!r}")
    return value


def log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in FORMATS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(FORMATS)}: {text!r}")
    return value


def health_path(text: str) -> str | None:
    """``off``, or a path from the root (``/healthz``)."""
    if text == "off":
        return None
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"a path starting with '/', or off: {text!r}")
    return text


def shard_timeout(text: str) -> float:
    value = _number(text, float)
    if value < MIN_SHARD_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_SHARD_TIMEOUT:g} s: {text}")
    return value


def _add_operations_options(serve: argparse.ArgumentParser) -> None:
    """Logs and the supervision of the shards."""
    group = serve.add_argument_group("logs and supervision")
    group.add_argument(
        "--log-level",
        type=log_level,
        default="info",
        metavar="LEVEL",
        help=f"{', '.join(LEVELS)} (default info; debug shows every refused handshake)",
    )
    group.add_argument(
        "--log-format",
        type=log_format,
        default="text",
        metavar="FORMAT",
        help="text, or json: one object per line with time, level, process, logger, message",
    )
    group.add_argument(
        "--access-log",
        action="store_true",
        help="a line per connection (connect, departure with its close code) and refusal",
    )
    group.add_argument(
        "--shard-timeout",
        type=shard_timeout,
        default=DEFAULT_SHARD_TIMEOUT,
        metavar="S",
        help="replace a shard whose loop has not turned for S seconds "
        f"(default {DEFAULT_SHARD_TIMEOUT:g}, at least {MIN_SHARD_TIMEOUT:g})",
    )


def _add_compression_options(serve: argparse.ArgumentParser) -> None:
    """permessage-deflate (RFC 7692): off unless --compression."""
    group = serve.add_argument_group(
        "compression",
        "permessage-deflate (RFC 7692) for clients that offer it; off by default: it costs "
        "memory per connection, and Godot 3.2's client cannot compress",
    )
    group.add_argument(
        "--compression",
        action="store_true",
        help="negotiate permessage-deflate with clients that offer it (browsers); messages "
        "are checked against --max-message-size after inflation",
    )
    group.add_argument(
        "--compression-no-context-takeover",
        action="store_true",
        help="ask for server_no_context_takeover and client_no_context_takeover: a fresh "
        "zlib context per message (less memory, worse ratio); only such connections survive "
        "`wsfleet reload`, others are closed with 1012 (default: context takeover)",
    )
    group.add_argument(
        "--compression-window-bits",
        type=bounded(9, 15),
        default=DEFAULT_COMPRESSION_WINDOW_BITS,
        metavar="N",
        help="server_max_window_bits (and client_max_window_bits when offered), 9-15 "
        f"(default {DEFAULT_COMPRESSION_WINDOW_BITS})",
    )
    group.add_argument(
        "--compression-mem-level",
        type=bounded(1, 9),
        default=DEFAULT_COMPRESSION_MEM_LEVEL,
        metavar="N",
        help=f"zlib memLevel of what the server deflates, 1-9 (default "
        f"{DEFAULT_COMPRESSION_MEM_LEVEL})",
    )
    group.add_argument(
        "--compression-level",
        type=bounded(0, 9),
        default=DEFAULT_COMPRESSION_LEVEL,
        metavar="N",
        help=f"zlib level of what the server deflates, 0-9 (default {DEFAULT_COMPRESSION_LEVEL})",
    )


def _add_limit_options(serve: argparse.ArgumentParser) -> None:
    """WebSocketServer's limits (its docstring says more), with the same defaults."""
    group = serve.add_argument_group("limits and protections")
    group.add_argument(
        "--max-peers",
        type=at_least(0),
        default=None,
        metavar="N",
        help="peers over all shards; more handshakes get 503 (default, or 0: no limit)",
    )
    group.add_argument(
        "--max-peers-per-address",
        type=at_least(0),
        default=0,
        metavar="N",
        help="connections from one IP address over all shards; more handshakes get 429 "
        "(default, or 0: no limit)",
    )
    group.add_argument(
        "--max-message-size",
        type=message_size,
        default=None,
        metavar="BYTES",
        help="largest message a peer may send, else close 1009 (default 65536, at most 16 MiB)",
    )
    group.add_argument(
        "--max-buffered-bytes",
        type=at_least(1),
        default=None,
        metavar="BYTES",
        help="bytes sent and not yet handed to the kernel, over all peers; beyond it "
        "put_packet refuses (default: WebSocketServer's)",
    )
    group.add_argument(
        "--handshake-timeout",
        type=seconds(zero_means_off=False),
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        metavar="S",
        help="seconds from accept to upgrade, else dropped "
        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})",
    )
    group.add_argument(
        "--max-request-bytes",
        type=at_least(1),
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help=f"upgrade request size, else 431 (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    group.add_argument(
        "--allowed-origins",
        type=origin_list,
        default=None,
        metavar="ORIGINS",
        help="comma-separated Origin values accepted, others get 403 (default: any)",
    )
    group.add_argument(
        "--max-message-rate",
        type=rate,
        default=None,
        metavar="N",
        help="messages a second per peer, on average; a peer over it is closed with 1008 "
        "(default: no limit)",
    )
    group.add_argument(
        "--message-burst",
        type=at_least(1),
        default=0,
        metavar="N",
        help="messages a peer may send at once under --max-message-rate (default: a second's)",
    )
    group.add_argument(
        "--health-path",
        type=health_path,
        default="/healthz",
        metavar="PATH",
        help="a plain GET of PATH on the WebSocket port gets 200 from its shard (503 while "
        "draining), any other plain request 426 (default /healthz; off: none)",
    )
    group.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="IPS",
        help="comma-separated addresses or networks (or *) of proxies whose X-Forwarded-For "
        "/ Forwarded give the client's address (default: none)",
    )
    group.add_argument(
        "--require-origin",
        action="store_true",
        help="with --allowed-origins: refuse requests without Origin too (default: allow them)",
    )
    group.add_argument(
        "--ping-interval",
        type=seconds(zero_means_off=True),
        default=DEFAULT_PING_INTERVAL,
        metavar="S",
        help=f"ping every peer every S seconds; 0: off (default {DEFAULT_PING_INTERVAL:g})",
    )
    group.add_argument(
        "--ping-timeout",
        type=seconds(zero_means_off=True),
        default=DEFAULT_PING_TIMEOUT,
        metavar="S",
        help="close with 1011 a peer whose pong is this late; 0: never "
        f"(default {DEFAULT_PING_TIMEOUT:g})",
    )
    group.add_argument(
        "--slow-consumer-close-code",
        type=int,
        default=None,
        choices=SLOW_CONSUMER_CLOSE_CODES,
        help="close a peer whose outbound buffer is full with this code (default: keep it; "
        "the echo waits for room)",
    )


# -- checks of options together, before anything starts -----------------------------------


#: ``scheme://host:port``, an IPv6 address in brackets (``ws://[::1]:9080``).
url = format_url


def _read_pem(option: str, path: str) -> str | None:
    """None, or why ``path`` cannot be the PEM file ``option`` names."""
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        return f"cannot read {option} {path}: {exc.strerror or exc}"
    if b"-----BEGIN" not in text:
        return f"{option} {path} is not a PEM file"
    return None


def check_serve_args(args: argparse.Namespace) -> str | None:
    """None when the options make sense together, else the one line that says why not."""
    if args.require_origin and args.allowed_origins is None:
        return "--require-origin needs --allowed-origins"
    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.shard_handler and args.gd_mp_api:
        return "--shard-handler cannot be used with --gd-mp-api: the relay owns every message"
    if args.node_name is not None and args.cluster is None:
        return "--node-name needs --cluster"
    if args.cluster_tls_ca is not None:
        if args.cluster is None:
            return "--cluster-tls-ca needs --cluster"
        problem = _read_pem("--cluster-tls-ca", args.cluster_tls_ca)
        if problem:
            return problem
    if args.cluster_creds is not None:
        if args.cluster is None:
            return "--cluster-creds needs --cluster"
        problem = credentials_problem(args.cluster_creds)
        if problem:
            return f"--cluster-creds {args.cluster_creds}: {problem}"
    if args.tls_cert:
        for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            problem = _read_pem(option, path)
            if problem:
                return problem
    # The certificate and key themselves, and a --bind name, are checked by listen() (the
    # one TLS loader, the one resolver); its logged reason becomes the one line.
    return None


def _option_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` (WebSocketServer's, naming its keywords) led by the option it is about."""
    for action in parser._actions:
        if action.option_strings and re.search(rf"\b{action.dest}\b", message):
            return f"{action.option_strings[0]}: {message}"
    return message


def log_config_from_args(args: argparse.Namespace) -> LogConfig:
    """How every process of `wsfleet serve` logs (--quiet: warnings and errors only)."""
    level = "warning" if args.quiet and args.log_level in ("debug", "info") else args.log_level
    return LogConfig(level=level, format=args.log_format, access_log=args.access_log)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's open-files soft limit to its hard limit; (before, after).

    The supervisor and the shards inherit it; each shard holds one descriptor per
    connection.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = 1 << 20  # Linux's nr_open default: "unlimited" cannot be set as is
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def server_from_args(args: argparse.Namespace) -> WebSocketServer:
    """A server configured by `wsfleet serve`'s options (ValueError for a bad limit)."""
    # Given only when set, so that WebSocketServer's own default applies otherwise.
    extra = {}
    if args.max_buffered_bytes is not None:
        extra["max_buffered_bytes"] = args.max_buffered_bytes
    server = WebSocketServer(
        shards=args.shards,
        handshake_timeout=args.handshake_timeout,
        max_peers=args.max_peers,
        max_peers_per_address=args.max_peers_per_address,
        max_message_size=args.max_message_size,
        max_request_bytes=args.max_request_bytes,
        allowed_origins=args.allowed_origins,
        require_origin=args.require_origin,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        slow_consumer_close_code=args.slow_consumer_close_code,
        control=False if args.control == "off" else args.control,
        metrics=args.metrics,
        shard_timeout=args.shard_timeout,
        log_config=log_config_from_args(args),
        forwarded_allow_ips=args.forwarded_allow_ips,
        health_path=args.health_path,
        max_message_rate=args.max_message_rate,
        message_burst=args.message_burst,
        cluster=args.cluster,
        node_name=args.node_name,
        cluster_tls_ca=args.cluster_tls_ca,
        cluster_credentials=args.cluster_creds,
        compression=args.compression,
        compression_context_takeover=not args.compression_no_context_takeover,
        compression_window_bits=args.compression_window_bits,
        compression_mem_level=args.compression_mem_level,
        compression_level=args.compression_level,
        shard_handler=args.shard_handler,
        data_received_mode=args.data_received_mode,
        **extra,
    )
    # No set_buffers here: the server sizes every peer's outbound buffer for the largest
    # message it accepts, so the echo of any accepted message fits an empty buffer.
    return server


# -- the built-in echo ---------------------------------------------------------------------


class Echo:
    """Every message back to its sender, in its write mode (text/binary); none lost.

    A packet ``put_packet`` refuses (``ERR_OUT_OF_MEMORY``: the peer's outbound
    buffer is full, it reads slower than it sends) is kept, and nothing more is
    taken from that peer: what it sends waits in its inbound queue, whose
    limit makes the front stop reading from its socket.  `retry` (every poll
    tick) sends it once there is room, then goes on with the queue.  Waits
    are counted and logged at most once per ``LOG_EVERY`` seconds.
    """

    LOG_EVERY = 10.0

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.waiting: dict[int, tuple[bytes, bool]] = {}  # peer id -> (packet, was text)
        self.waits = 0  # since the last log line
        self.total_waits = 0
        self._logged_at = -math.inf

    def on_data(self, peer_id: int) -> None:
        # The echo's hot path: per message, one dict lookup and one comparison more than
        # an echo that drops what put_packet refuses.
        if peer_id in self.waiting:
            return  # its packets stay in its inbound queue until the kept one is out
        peer = self.server.get_peer(peer_id)
        if peer is None:
            return
        while peer.get_available_packet_count():
            packet = peer.get_packet()
            text = peer.was_string_packet()
            peer.set_write_mode(_TEXT if text else _BINARY)
            if peer.put_packet(packet) is _OUT_OF_MEMORY:
                self.waiting[peer_id] = (packet, text)
                self.waits += 1
                self.total_waits += 1
                self.log_waits()
                return

    @staticmethod
    def _send(peer: WebSocketPeer, packet: bytes, text: bool) -> bool:
        """False when there is no room for it yet (any other error: the peer is leaving)."""
        peer.set_write_mode(_TEXT if text else _BINARY)
        return peer.put_packet(packet) is not _OUT_OF_MEMORY

    def retry(self) -> None:
        """Send the kept packets that fit now; called after every poll."""
        for peer_id, (packet, text) in list(self.waiting.items()):
            peer = self.server.get_peer(peer_id)
            if peer is None or not peer.is_connected_to_host():
                del self.waiting[peer_id]  # gone: nobody left to send it to
            elif peer.get_outbound_room() >= len(packet) and self._send(peer, packet, text):
                # Asking for room first keeps a retry that cannot fit out of the server's
                # refusal count and log.
                del self.waiting[peer_id]
                self.on_data(peer_id)  # then what waited behind it
        if self.waits:
            self.log_waits()

    def log_waits(self, force: bool = False) -> None:
        """Say how many packets waited since the last line, at most once per ``LOG_EVERY``."""
        now = time.monotonic()
        if now - self._logged_at < self.LOG_EVERY and not force:
            return
        log.warning(
            "echo: %d packet(s) waited for room in a slow reader's outbound buffer "
            "(%d peer(s) waiting now; none dropped)",
            self.waits,
            len(self.waiting),
        )
        self.waits = 0
        self._logged_at = now


#: How long a stop waits for the echo's kept packets to go out.
STOP_FLUSH_SECONDS = 1.0


@contextmanager
def folded_errors() -> Iterator[list[str]]:
    """Hold back the error lines logged inside (listen's), to be said in one line instead."""
    held: list[str] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            held.append(record.getMessage())
            return False
        return True

    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(hold)
    try:
        yield held
    finally:
        for handler in handlers:
            handler.removeFilter(hold)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Echo every message back to its sender (or relay, with ``--gd-mp-api``) until a signal."""
    problem = check_serve_args(args)
    if problem:
        return usage_error(problem)
    try:
        server = server_from_args(args)
    except ValueError as exc:
        return usage_error(_option_names(str(exc), parser))
    try:
        server.bind_ip = args.bind  # a host name serves every address it resolves to
    except ValueError as exc:
        return usage_error(f"--bind {args.bind}: {exc}")
    if args.tls_cert:
        server.ssl_certificate, server.private_key = args.tls_cert, args.tls_key

    echo = Echo(server)
    tick: userapp.Tick | None = None
    if args.app:
        try:
            tick = userapp.check_tick(args.app, userapp.load(args.app)(server))
        except userapp.AppError as exc:
            return usage_error(str(exc))
        except Exception:
            log.exception("--app %s: its setup raised", args.app)
            return EXIT_FAILED
    elif args.gd_mp_api:
        server.connect("peer_packet", lambda peer_id: _drain_packets(server))
    else:
        server.connect("data_received", echo.on_data)
    # Connects and departures are the shards' access log (--access-log).

    failed: set[int] = set()  # shards given up: checked once per tick, not per message
    server.connect("shard_failed", lambda index, reason: failed.add(index))
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    server.connect("stop_requested", lambda: stopping.append(True))  # wsfleet stop
    before, after = raise_open_files_limit()
    with folded_errors() as held:
        error = server.listen(args.port, args.protocols, gd_mp_api=args.gd_mp_api)
    if error != Error.OK:
        reason = held[0].removeprefix("listen: ") if held else "listen() failed"
        return usage_error(f"{reason} ({error.name})")
    set_title("front", server.port)
    log.info(
        "wsfleet %s: %s on %s with %d shards (Ctrl-C stops)",
        __version__,
        f"application {args.app}" if args.app else
        "multiplayer relay" if args.gd_mp_api else "echo",
        url("wss" if args.tls_cert else "ws", args.bind, server.port),
        server.shards,
    )  # fmt: skip
    if server.cluster:
        state = server.get_cluster_status()
        log.info(
            "cluster node %s (id slot %d%s), NATS %s",
            state["node"],
            state["slot"],
            ", provisional" if state["provisional"] else "",
            state["nats_url"],
        )
    log.info(
        "open files limit %d (was %d): about %d connections per shard, %d in all",
        after,
        before,
        max(0, after - _FDS_RESERVED),
        max(0, after - _FDS_RESERVED) * server.shards,
    )
    status = 0
    try:
        while not stopping:
            server.poll(0.05)
            if echo.waiting:
                echo.retry()
            if tick is not None and tick() is False:
                log.info("--app %s asked to stop", args.app)
                break
            problem = fleet_problem(server, failed)
            if problem and not stopping:
                log.error("%s: exiting with status %d", problem, EXIT_FAILED)
                status = EXIT_FAILED
                break
    except KeyboardInterrupt:
        pass
    except Exception:  # the application's tick or a signal handler of it
        log.exception("--app %s raised", args.app) if args.app else log.exception("serve failed")
        status = EXIT_FAILED
    finally:
        started = time.monotonic()
        try:
            # The kept echoes were accepted: give them a moment to go out before the close.
            while echo.waiting and time.monotonic() - started < STOP_FLUSH_SECONDS:
                server.poll(0.01)
                echo.retry()
        except KeyboardInterrupt:
            pass
        server.stop()
        if echo.waits:
            echo.log_waits(force=True)
        log.info("stopped in %.2f s", time.monotonic() - started)
    return status


def _drain_packets(server: WebSocketServer) -> None:
    """The relay's own packets (addressed to the server, peer 1): read and let go."""
    while server.get_available_packet_count():
        server.get_packet()


def fleet_problem(server: WebSocketServer, failed: set[int]) -> str | None:
    """Why the server cannot serve any more (every shard given up, no supervisor), or None."""
    if not server.is_supervisor_alive():
        return "the supervisor exited"
    if len(failed) >= server.shards:
        return "every shard was given up"
    return None


def serve_parser() -> argparse.ArgumentParser:
    """The parser of ``wsfleet serve`` alone (its tests walk its options)."""
    return build_parser().parse_args(["serve"]).serve_parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            args = config_file.apply_sources(args.serve_parser, lambda: parser.parse_args(argv))
        except config_file.ConfigError as exc:
            return usage_error(str(exc))
        apply_logging(log_config_from_args(args), "front")
        return serve(args, args.serve_parser)
    logging.basicConfig(level=logging.INFO, format="wsfleet %(message)s", stream=sys.stderr)
    if args.command == "loadtest":
        from .loadtest.cli import main as loadtest

        return loadtest(args.args)
    if getattr(args, "ops_command", None) is not None:
        return args.ops_command(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
