"""`wsfleet serve`'s built-in echo at the message size limit, over real processes.

A message of exactly the largest size the server accepts (``--max-message-size``, or
the default: the 64 KiB input buffer) must come back whole, text and binary alike:
an accepted message is never dropped (issue 10).  One byte more is refused with close
1009, and the server goes on serving others.  Each server is a `wsfleet serve`
process (one shard) on a free loopback port, stopped by pid when its tests end.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

pytestmark = pytest.mark.timeout(120)

DEFAULT_MAX_MESSAGE = 64 * 1024  # `wsfleet serve` without --max-message-size
LARGEST_MAX_MESSAGE = 16 * 1024 * 1024  # the most --max-message-size allows
ECHO_TIMEOUT = 20.0  # seconds for one echo of up to 16 MiB over loopback (it takes < 1 s)


@dataclass(frozen=True)
class Served:
    """A running `wsfleet serve`: its URL, the size it accepts and where it logs."""

    url: str
    max_message: int
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=[None, LARGEST_MAX_MESSAGE], ids=["default", "16MiB"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`wsfleet serve` with the default limit or --max-message-size 16 MiB, one shard."""
    limit = request.param
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "wsfleet", "serve", "--port", str(port)]
    command += ["--bind", "127.0.0.1", "--shards", "1", "--quiet"]
    if limit is not None:
        command += ["--max-message-size", str(limit)]
    with open(log, "wb") as out:
        # Its own session: should it not stop, its group (it and its shards) is killed.
        proc = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"wsfleet serve exited: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "wsfleet serve did not listen within 30 s"
                time.sleep(0.05)
        yield Served(f"ws://127.0.0.1:{port}", limit or DEFAULT_MAX_MESSAGE, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def text_of(size: int) -> str:
    """Valid UTF-8 text of exactly ``size`` bytes, multi-byte characters included."""
    unit = "echo é €; "  # 13 bytes in UTF-8
    count, rest = divmod(size, len(unit.encode()))
    text = unit * count + "a" * rest
    assert len(text.encode()) == size
    return text


def binary_of(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def echo_once(served: Served, message: str | bytes) -> str | bytes:
    async with connect(served.url, max_size=served.max_message + 1, open_timeout=10) as ws:
        await ws.send(message)
        try:
            return await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT)
        except TimeoutError:
            size = len(message.encode() if isinstance(message, str) else message)
            pytest.fail(
                f"no echo of a {size}-byte message (the limit) within {ECHO_TIMEOUT:g} s; "
                f"server log: {served.log_tail()!r}"
            )


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_a_message_of_the_largest_accepted_size_is_echoed(served: Served, kind: str) -> None:
    message = text_of(served.max_message) if kind == "text" else binary_of(served.max_message)
    reply = asyncio.run(echo_once(served, message))
    assert type(reply) is type(message), "the echo keeps the message's kind"
    assert len(reply) == len(message)
    assert reply == message


async def refused(served: Served, message: str | bytes) -> int | None:
    """The close code the server answers ``message`` with (the connection must end)."""
    ws = await connect(served.url, max_size=served.max_message + 1, open_timeout=10)
    try:
        await ws.send(message)
        await asyncio.wait_for(ws.recv(), ECHO_TIMEOUT)
    except ConnectionClosed:
        # Over: no close() (websockets may then abort a transport that has already
        # finished, while it was still sending the 16 MiB the server refused).
        return ws.close_code
    await ws.close()
    pytest.fail("a message over the limit was echoed")


async def still_echoes(served: Served) -> None:
    async with connect(served.url, open_timeout=10) as ws:
        await ws.send("still here")
        assert await asyncio.wait_for(ws.recv(), 5) == "still here"


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_one_byte_over_the_largest_accepted_size_closes_with_1009(
    served: Served, kind: str
) -> None:
    size = served.max_message + 1
    message = text_of(size) if kind == "text" else binary_of(size)
    assert asyncio.run(refused(served, message)) == 1009
    asyncio.run(still_echoes(served))
