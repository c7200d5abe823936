"""Groups: ``join``/``leave``/``get_groups``/``get_group_members`` and ``broadcast(group=)``
with real clients over 4 shards: every member gets a group broadcast once, nobody else
does; a peer that leaves, or whose shard dies, leaves its groups."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from wsfleet import Error, WebSocketServer

from .wsserver import Recorder, polling, until

PEERS = 1000


@pytest.mark.timeout(120)
def test_a_group_broadcast_to_1000_peers_over_4_shards_reaches_each_member_once() -> None:
    server = WebSocketServer(shards=4, ping_interval=None)
    recorder = Recorder(server)
    assert server.listen(0) == Error.OK
    try:

        async def body() -> None:
            async with polling(server):
                clients = []
                for start in range(0, PEERS, 100):  # 100 handshakes at a time
                    clients += await asyncio.gather(
                        *(
                            connect(f"ws://127.0.0.1:{server.port}", ping_interval=None)
                            for _ in range(start, min(PEERS, start + 100))
                        )
                    )
                await until(lambda: len(recorder.named("connected")) == PEERS, 30)
                ids = sorted(e[1] for e in recorder.named("connected"))
                by_shard = Counter(server.get_peer(i).shard_index() for i in ids)
                assert len(by_shard) == 4, by_shard  # spread over every shard
                red = set(ids[::2])
                for peer_id in red:
                    assert server.join(peer_id, "red") == Error.OK
                assert server.join(ids[1], "blue") == Error.OK
                assert server.get_group_members("red") == sorted(red)
                assert server.get_groups(ids[0]) == ["red"]
                assert server.broadcast(b"to red", group="red", exclude=[ids[0]]) == Error.OK
                assert server.broadcast("to blue", text=True, group="blue") == Error.OK
                received: dict[int, list] = {}

                async def read(index: int, ws) -> None:
                    try:
                        while True:
                            message = await asyncio.wait_for(ws.recv(), 1.5)
                            received.setdefault(index, []).append(message)
                    except (TimeoutError, ConnectionClosed):
                        pass

                await asyncio.gather(*(read(i, ws) for i, ws in enumerate(clients)))
                # Which client is which peer: each says its index, the server maps it.
                for index, ws in enumerate(clients):
                    await ws.send(str(index))
                await until(lambda: sum(map(len, recorder.packets.values())) == PEERS, 30)
                peer_of = {int(p[0][0]): pid for pid, p in recorder.packets.items()}
                for index in range(PEERS):
                    peer_id = peer_of[index]
                    expected = []
                    if peer_id in red and peer_id != ids[0]:
                        expected.append(b"to red")
                    if peer_id == ids[1]:
                        expected.append("to blue")
                    assert received.get(index, []) == expected, (index, peer_id)
                # A shard dies: its peers leave their groups.
                victim = server.get_peer(ids[0]).shard_index()
                pid = server.get_shard_status()[victim]["pid"]
                os.kill(pid, signal.SIGKILL)
                gone = {i for i in ids if server.get_peer(i).shard_index() == victim}
                await until(lambda: len(recorder.named("disconnected")) == len(gone), 30)
                assert server.get_group_members("red") == sorted(red - gone)
                assert all(server.get_groups(i) == [] for i in gone)
                survivor = min(red - gone)
                assert server.leave(survivor, "red") == Error.OK
                assert survivor not in server.get_group_members("red")
                assert server.get_groups(survivor) == []
                for ws in clients:
                    await ws.close()

        asyncio.run(body())
    finally:
        server.stop()


def test_group_names_and_unknown_peers_are_checked() -> None:
    server = WebSocketServer(shards=1)
    try:
        assert server.listen(0) == Error.OK
        assert server.join(123456, "red") == Error.ERR_DOES_NOT_EXIST
        for bad in ("", "x" * 256, "a\0b"):
            with pytest.raises(ValueError):
                server.join(123456, bad)
        assert server.broadcast(b"nobody", group="empty") == Error.OK
        assert server.get_group_members("empty") == []
    finally:
        server.stop()


@pytest.mark.timeout(90)
def test_groups_move_with_a_reload(tmp_path) -> None:
    import subprocess
    import sys

    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    control = str(folder / "control.sock")
    server = WebSocketServer(shards=2, ping_interval=None, control=control)
    recorder = Recorder(server)
    assert server.listen(0) == Error.OK
    try:

        async def body() -> dict[int, list]:
            async with polling(server):
                clients = [
                    await connect(f"ws://127.0.0.1:{server.port}", ping_interval=None)
                    for _ in range(8)
                ]
                await until(lambda: len(recorder.named("connected")) == 8)
                for index, ws in enumerate(clients):
                    await ws.send(str(index))
                await until(lambda: len(recorder.packets) == 8)
                peer_of = {int(p[0][0]): pid for pid, p in recorder.packets.items()}
                for index in range(0, 8, 2):
                    server.join(peer_of[index], "even")
                reload = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "wsfleet", "reload", "--control", control,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )  # fmt: skip
                out, _ = await reload.communicate()
                assert reload.returncode == 0, out
                assert server.broadcast(b"evens", group="even") == Error.OK
                received: dict[int, list] = {}

                async def read(index: int, ws) -> None:
                    try:
                        while True:
                            message = await asyncio.wait_for(ws.recv(), 1.0)
                            received.setdefault(index, []).append(message)
                    except TimeoutError:
                        pass

                await asyncio.gather(*(read(i, ws) for i, ws in enumerate(clients)))
                for ws in clients:
                    await ws.close()
                return received

        received = asyncio.run(body())
        assert received == {0: [b"evens"], 2: [b"evens"], 4: [b"evens"], 6: [b"evens"]}
        assert server.get_stats()["totals"]["reloads"] == 2
    finally:
        server.stop()
