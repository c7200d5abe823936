"""A join storm in multiplayer mode: hundreds of peers at once, while others keep talking."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from websockets.asyncio.client import connect

from wsfleet import Error, WebSocketServer
from wsfleet.ipc import messages as m

from .wsserver import run_with, until

HEADER = struct.Struct("<Bii")
ID = struct.Struct("<i")
JOINERS = 300


class Peer:
    """A client that records system messages and numbered relay frames."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.id = 0
        self.known: set[int] = set()
        self.numbers: list[int] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            kind, sender, _to = HEADER.unpack_from(frame)
            if kind == m.SYS_ID:
                self.id = ID.unpack_from(frame, 9)[0]
            elif kind == m.SYS_ADD:
                self.known.add(ID.unpack_from(frame, 9)[0])
            elif kind == m.SYS_DEL:
                self.known.discard(ID.unpack_from(frame, 9)[0])
            else:
                self.numbers.append(int.from_bytes(frame[9:], "little"))


@pytest.mark.timeout(120)
def test_a_join_storm_loses_no_message_and_every_peer_learns_every_other() -> None:
    server = WebSocketServer(shards=2)
    assert server.listen(0, [], gd_mp_api=True) == Error.OK
    url = f"ws://127.0.0.1:{server.port}"

    async def body() -> dict:
        talker, listener = Peer(await connect(url)), Peer(await connect(url))
        await until(lambda: talker.id and listener.id and listener.id in talker.known)
        sent = 0
        storm_done = asyncio.Event()

        async def talk() -> None:
            nonlocal sent
            while not storm_done.is_set() or sent < 2000:
                frame = HEADER.pack(0, talker.id, listener.id) + sent.to_bytes(4, "little")
                await talker.ws.send(frame)
                sent += 1
                if sent % 50 == 0:
                    await asyncio.sleep(0.001)

        talking = asyncio.create_task(talk())
        started = time.monotonic()
        joiners = await asyncio.gather(*[connect(url, max_queue=None) for _ in range(JOINERS)])
        peers = [Peer(ws) for ws in joiners]
        everyone = [talker, listener, *peers]
        await until(lambda: all(p.id for p in peers), timeout=60)
        ids = {p.id for p in everyone}
        await until(lambda: all(p.known == (ids - {p.id}) | {1} for p in everyone), timeout=60)
        storm_seconds = time.monotonic() - started
        storm_done.set()
        await talking
        await until(lambda: len(listener.numbers) == sent, timeout=30)
        for peer in everyone:
            await peer.ws.close()
        return {"sent": sent, "numbers": listener.numbers, "storm": storm_seconds, "ids": ids}

    try:
        result = run_with(server, body, timeout=110)
        assert set(server.get_mp_stats().values()) == {0}, server.get_mp_stats()
        assert set(m.DROP_REASONS) <= set(server.get_mp_stats())
    finally:
        server.stop()
    # The talker's frames, relayed during the storm, all arrived, once, in order.
    assert result["numbers"] == list(range(result["sent"]))
    assert len(result["ids"]) == JOINERS + 2
    print(f"{JOINERS} joins settled in {result['storm']:.2f} s; {result['sent']} frames relayed")
