"""What the front tells the fleet before it starts: typed, frozen, checked on construction.

Owns the configuration contract between the processes: `Limits` (the
protections every shard applies), `TlsConfig` (the PEM texts every shard
loads), `FleetConfig` (what the front sends the supervisor once, through the
control channel, see `wsfleet.ipc.control`) and `ShardConfig` (what the
supervisor hands each shard it forks).  Every class checks its own values in
``__post_init__``, so a configuration that exists is a valid one, whichever
process built it (the front from the user's values, the control codec from a
received message).

Imports the standard library, `wsfleet.ipc.messages` (the id ranges),
`wsfleet.ipc.ring` (the largest record) and `wsfleet.ipc.logconfig` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .logconfig import LogConfig
from .messages import ALL_IDS, FIRST_PEER_ID, id_range
from .ring import DEFAULT_MAX_MESSAGE, MIN_CAPACITY

#: The largest ``max_message_size``: what one ring record may carry.
MAX_MESSAGE_SIZE = DEFAULT_MAX_MESSAGE
#: How long a shard's heartbeat may stand still before the supervisor replaces it.
DEFAULT_SHARD_TIMEOUT = 30.0
#: Two heartbeats (`wsfleet.ipc.shardstate.HEARTBEAT_SECONDS`): a shorter timeout would kill
#: a shard between two beats.
MIN_SHARD_TIMEOUT = 2.0
#: The smallest ``max_request_bytes``: a minimal upgrade request is about 200 bytes.
MIN_REQUEST_BYTES = 256
#: permessage-deflate's defaults (``websockets``' own ``enable_server_permessage_deflate``):
#: a 4 KiB LZ77 window each way and zlib's memLevel 5 keep a connection's contexts small.
DEFAULT_COMPRESSION_WINDOW_BITS = 12
DEFAULT_COMPRESSION_MEM_LEVEL = 5
DEFAULT_COMPRESSION_LEVEL = 6


@dataclass(frozen=True, slots=True)
class Limits:
    """The protections of `WebSocketServer` (its docstring has the details), as shards take them.

    ``max_peers`` 0 means no limit; ``ping_interval`` / ``ping_timeout`` None
    means off; ``allowed_origins`` None means no Origin check.
    """

    handshake_timeout: float
    max_peers: int
    max_message_size: int
    max_request_bytes: int
    allowed_origins: tuple[str, ...] | None
    require_origin: bool
    ping_interval: float | None
    ping_timeout: float | None
    #: A plain GET of this path (no Upgrade) is the shard's health check: 200, or 503
    #: while draining or stopping.  None: every plain request gets 426.
    health_path: str | None = "/healthz"
    #: A token bucket per peer: at most this many messages a second on average (None:
    #: off), ``message_burst`` at once (0: one second's worth); over it: close 1008.
    max_message_rate: float | None = None
    message_burst: int = 0
    #: At most this many connections (open peers and upgrades waiting for their verdict)
    #: from one IP address across the shards; over it an upgrade gets 429 (0: no limit).
    max_peers_per_address: int = 0
    #: A handshake handler is set: valid upgrades wait for the front's verdict.
    hold_upgrades: bool = False
    #: permessage-deflate (RFC 7692), negotiated with clients that offer it (False: never).
    compression: bool = False
    #: False: the server asks for ``server_no_context_takeover`` and
    #: ``client_no_context_takeover`` (a fresh zlib context per message, none kept between
    #: messages: less memory, worse ratio; such a connection survives ``wsfleet reload``).
    compression_context_takeover: bool = True
    #: ``server_max_window_bits`` (and ``client_max_window_bits`` when the client offers it).
    compression_window_bits: int = DEFAULT_COMPRESSION_WINDOW_BITS
    #: zlib's ``memLevel`` (1-9) and compression level (0-9) of what the server sends.
    compression_mem_level: int = DEFAULT_COMPRESSION_MEM_LEVEL
    compression_level: int = DEFAULT_COMPRESSION_LEVEL

    def __post_init__(self) -> None:
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive: {self.handshake_timeout}")
        if self.max_peers < 0:
            raise ValueError(f"max_peers must be None, 0 (no limit) or positive: {self.max_peers}")
        if not 1 <= self.max_message_size <= MAX_MESSAGE_SIZE:
            raise ValueError(
                f"max_message_size must be 1 to {MAX_MESSAGE_SIZE}: {self.max_message_size}"
            )
        if self.max_request_bytes < MIN_REQUEST_BYTES:
            raise ValueError(
                f"max_request_bytes must be at least {MIN_REQUEST_BYTES}: {self.max_request_bytes}"
            )
        if self.allowed_origins is not None and not all(
            isinstance(origin, str) for origin in self.allowed_origins
        ):
            raise ValueError("allowed_origins must be strings")
        if self.max_message_rate is not None and not self.max_message_rate > 0:
            raise ValueError(f"max_message_rate must be None or positive: {self.max_message_rate}")
        if self.max_peers_per_address < 0:
            raise ValueError(
                f"max_peers_per_address must be 0 (no limit) or positive: "
                f"{self.max_peers_per_address}"
            )
        if self.message_burst < 0:
            raise ValueError(f"message_burst must be 0 or positive: {self.message_burst}")
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ValueError(f"health_path must start with '/': {self.health_path!r}")
        # 8 is refused: zlib cannot compress with an 8-bit raw window (websockets refuses it).
        if not 9 <= self.compression_window_bits <= 15:
            raise ValueError(
                f"compression_window_bits must be 9 to 15: {self.compression_window_bits}"
            )
        if not 1 <= self.compression_mem_level <= 9:
            raise ValueError(f"compression_mem_level must be 1 to 9: {self.compression_mem_level}")
        if not 0 <= self.compression_level <= 9:
            raise ValueError(f"compression_level must be 0 to 9: {self.compression_level}")
        for name in ("ping_interval", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None, 0 (off) or positive: {value}")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A certificate chain and its key as PEM text (`wsfleet.ipc.tls` reads and checks them).

    ``ca_chain`` ("" for none): further certificates sent after
    ``certificate`` in the handshake, so that clients can build the chain.
    """

    certificate: str
    private_key: str
    ca_chain: str = ""

    def __post_init__(self) -> None:
        if not self.certificate or not self.private_key:
            raise ValueError("TLS needs both a certificate and a private key")

    def __repr__(self) -> str:  # never print a private key into a log
        return f"TlsConfig(certificate=<{len(self.certificate)} chars>, private_key=<hidden>)"


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What the front sends the supervisor, once, before any shard starts."""

    protocols: tuple[str, ...]
    limits: Limits
    tls: TlsConfig | None
    gd_mp_api: bool
    ring_capacity: int
    #: How every process logs (`wsfleet.ipc.logconfig`).
    log: LogConfig = LogConfig()
    #: Seconds a shard's heartbeat may stand still before it is killed and replaced.
    shard_timeout: float = DEFAULT_SHARD_TIMEOUT
    #: Port the front listens on, for process titles ("wsfleet shard 3/8 :9080").
    port: int = 0
    #: The node's peer ids, which its shards split among them: every id for a lone
    #: server, the leased slot's (`wsfleet.ipc.messages.slot_range`) in a cluster.
    id_base: int = FIRST_PEER_ID
    id_total: int = ALL_IDS
    #: ``module:attr`` of the application code each shard runs (`wsfleet.shards.app`);
    #: None: none, every message goes to the front.
    shard_handler: str | None = None

    def __post_init__(self) -> None:
        if self.id_base < FIRST_PEER_ID or self.id_total < 1:
            raise ValueError(f"bad node id range: {self.id_base}, {self.id_total}")
        capacity = self.ring_capacity
        if capacity < MIN_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"ring_capacity must be a power of two >= {MIN_CAPACITY}: {capacity}")
        if not self.shard_timeout >= MIN_SHARD_TIMEOUT:
            raise ValueError(
                f"shard_timeout must be at least {MIN_SHARD_TIMEOUT:g} s: {self.shard_timeout}"
            )

    def for_shard(self, index: int, shards: int) -> ShardConfig:
        """Shard ``index`` of ``shards``: this configuration and its own peer id range."""
        ids = id_range(index, shards, self.id_base, self.id_total)
        return ShardConfig(
            index=index,
            id_base=ids.start,
            id_span=len(ids),
            protocols=self.protocols,
            limits=self.limits,
            tls=self.tls,
            gd_mp_api=self.gd_mp_api,
            log=self.log,
            shards=shards,
            port=self.port,
            shard_handler=self.shard_handler,
        )


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """What one shard runs with: handed over by fork, or to a fresh interpreter in a
    `wsfleet.ipc.control.ShardBoot` (``wsfleet reload``)."""

    index: int
    id_base: int
    id_span: int
    protocols: tuple[str, ...]
    limits: Limits
    tls: TlsConfig | None
    gd_mp_api: bool
    log: LogConfig = LogConfig()
    #: How many shards the fleet has, and the port it serves (for the process title).
    shards: int = 1
    port: int = 0
    #: ``module:attr`` of its shard handler (`wsfleet.shards.app`), or None.
    shard_handler: str | None = None

    def __post_init__(self) -> None:
        if self.index < 0 or self.id_span < 1:
            raise ValueError(f"bad shard index or id range: {self.index}, {self.id_span}")
