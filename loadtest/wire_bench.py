"""Micro-benchmark of a shard's receive path: the old PeerConnection against the wire's.

Not a test (pytest does not collect it).  Feeds ``--frames`` small masked
frames through ``PeerConnection.data_received`` of the code at ``--rev`` (read
with ``git show``) and of the working tree, in-process, with a stand-in shard
whose ``emit`` is the real one's code, and the wire object alone; rounds
alternate old and new, the median per-frame time of each is printed::

    python -m wsfleet.loadtest.wire_bench [--rev 68761fd] [--frames 100000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from websockets.frames import apply_mask

from wsfleet.shards import connection as new_connection
from wsfleet.shards.wire import ServerWire

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (label, opcode, payload, frames per read)
    ("text 16 B, 1 frame a read", 1, b"hello world 1234", 1),
    ("binary 16 B, 1 frame a read", 2, bytes(16), 1),
    ("text 16 B, 32 frames a read", 1, b"hello world 1234", 32),
    ("binary 1 KiB, 1 frame a read", 2, bytes(1024), 1),
]


class _Handle:
    def cancel(self) -> None:
        pass


class _Loop:
    def call_later(self, _seconds: float, _callback: Any) -> _Handle:
        return _Handle()

    def call_soon(self, _callback: Any) -> None:
        pass

    def time(self) -> float:
        return 0.0


class _Transport:
    def write(self, _data: bytes) -> None:
        pass

    def writelines(self, _data: list[bytes]) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


class _Shard:
    """What PeerConnection uses of a Shard; `emit` is Shard.emit's code."""

    def __init__(self) -> None:
        self.loop = _Loop()
        self.refusing = self.reading_paused = self.mp = self.draining = False
        self.conn_log_level = None  # no per-connection log lines, as by default
        self.messages_in = self.bytes_in = self.paused_sockets = 0
        self.handshake_timeout = 10.0
        self.max_message = 1 << 20
        self.max_request_bytes = 8192
        self._backlog: list[tuple[int, int, int, bytes]] = []
        self._flush_scheduled = False
        self.select_subprotocol = lambda _protocol, _offered: None
        self.http_answerer = None  # no health path
        self.hold_upgrades = False  # no handshake handler
        self.wire_factory = ServerWire  # no compression
        self.message_rate = None  # no rate limit
        self.connections: set[Any] = set()

    def choose_subprotocol(self, _offered: Any) -> str:
        return ""

    def origin_allowed(self, _origins: Any) -> bool:
        return True

    def admit(self) -> bool:
        return True

    def count(self, _field: str) -> None:
        pass

    def peer_connected(self, _conn: Any, _protocol: str, _peer_id: int = 0) -> int:
        return 7

    def first_ping_time(self) -> float:
        return 0.0

    def emit(self, kind: int, peer: int, flags: int, payload: bytes) -> None:
        self._backlog.append((kind, peer, flags, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(None)


def _request() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def _frame(opcode: int, payload: bytes, mask: bytes = b"abcd") -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 254, n)
    return head + mask + apply_mask(payload, mask)


def _old_module(rev: str) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:shards/connection.py"], cwd=ROOT, check=True,
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "old_connection.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_connection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _connection_run(module: ModuleType, chunk: bytes, reads: int) -> float:
    shard = _Shard()
    conn = module.PeerConnection(shard)
    conn.connection_made(_Transport())
    conn.data_received(_request())
    start = time.perf_counter()
    for _ in range(reads):
        conn.data_received(chunk)
    elapsed = time.perf_counter() - start
    assert len(shard._backlog) >= reads, "every frame must be delivered"
    return elapsed


def _wire_run(chunk: bytes, reads: int) -> float:
    wire = ServerWire()
    wire.receive_data(_request())
    wire.data_to_send()
    start = time.perf_counter()
    for _ in range(reads):
        wire.receive_data(chunk)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", default="68761fd", help="the old code (before the wire)")
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    old = _old_module(args.rev)
    print(f"us per frame, median of {args.rounds} interleaved rounds of {args.frames} frames")
    print(f"{'case':32} {'old':>7} {'new':>7} {'wire':>7}")
    for label, opcode, payload, per_read in CASES:
        frame = _frame(opcode, payload)
        reads = args.frames // per_read
        chunk = frame * per_read
        times: dict[str, list[float]] = {"old": [], "new": [], "wire": []}
        for _ in range(args.rounds):
            times["old"].append(_connection_run(old, chunk, reads))
            times["new"].append(_connection_run(new_connection, chunk, reads))
            times["wire"].append(_wire_run(chunk, reads))
        us = {k: statistics.median(v) / (reads * per_read) * 1e6 for k, v in times.items()}
        print(f"{label:32} {us['old']:7.3f} {us['new']:7.3f} {us['wire']:7.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
