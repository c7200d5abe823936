"""A cluster node's application for ``wsfleet serve --cluster ... --app
tests.apps.cluster_app:setup`` (tests/test_cluster.py).

Each text message from a client is a command, answered with a line that starts
with the command's name (so that a client can tell answers from what other
peers send it):

* ``whoami`` -> ``id ID NODE``
* ``send ID TEXT`` -> TEXT to peer ID (of any node) as text; ``sent ERROR``
* ``close ID CODE REASON`` -> ``disconnect_peer(ID, CODE, REASON)``; ``close``
* ``bcast TEXT`` / ``bcastex ID,ID TEXT`` -> ``broadcast(TEXT, text=True[, exclude])``;
  ``bcast ERROR``
* ``gbcast GROUP TEXT`` -> a group broadcast; ``gbcast ERROR``
* ``join GROUP`` -> ``join(me, GROUP)``; ``join ERROR``
* ``sendmany ID N`` -> ``0`` .. ``N-1`` to peer ID, in one handler (one ``poll``);
  ``sent ERROR`` (the last one's)
* ``flood ID COUNT SIZE`` -> COUNT binary packets of SIZE bytes to peer ID in one handler;
  ``sent ERROR`` (the largest error number)
* ``var ID`` -> ``put_var([1, "two", 3.5])`` to peer ID; ``sent ERROR``
* ``addr ID`` -> ``addr HOST PORT has_peer`` for peer ID, of any node
* ``peers`` -> ``peers [ids of the cluster]`` (JSON); ``status`` -> ``status {...}``
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger("wsfleet.app")


def setup(server):
    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        peer.set_write_mode(peer.WRITE_MODE_TEXT)
        while peer.get_available_packet_count():
            command, _, rest = peer.get_packet().decode().partition(" ")
            if command == "whoami":
                peer.put_packet(f"id {peer_id} {server.get_cluster_status()['node']}")
            elif command == "send":
                target, _, text = rest.partition(" ")
                other = server.get_peer(int(target))
                if other is None:
                    peer.put_packet("sent none")
                    continue
                other.set_write_mode(other.WRITE_MODE_TEXT)
                peer.put_packet(f"sent {int(other.put_packet(text))}")
            elif command == "sendmany":
                target, count = rest.split(" ")
                other = server.get_peer(int(target))
                other.set_write_mode(other.WRITE_MODE_TEXT)
                errors = [int(other.put_packet(str(i))) for i in range(int(count))]
                peer.put_packet(f"sent {max(errors)}")
            elif command == "flood":
                target, count, size = (int(x) for x in rest.split(" "))
                other = server.get_peer(target)
                other.set_write_mode(other.WRITE_MODE_BINARY)
                packet = bytes(size)
                errors = [int(other.put_packet(packet)) for _ in range(count)]
                peer.put_packet(f"sent {max(errors)}")
            elif command == "var":
                other = server.get_peer(int(rest))
                other.set_write_mode(other.WRITE_MODE_BINARY)
                peer.put_packet(f"sent {int(other.put_var([1, 'two', 3.5]))}")
            elif command == "addr":
                target = int(rest)
                host, port = server.get_peer_address(target), server.get_peer_port(target)
                peer.put_packet(f"addr {host} {port} {server.has_peer(target)}")
            elif command == "close":
                target, code, reason = rest.split(" ", 2)
                server.disconnect_peer(int(target), int(code), reason)
                peer.put_packet("close")
            elif command == "bcast":
                peer.put_packet(f"bcast {int(server.broadcast(rest, text=True))}")
            elif command == "bcastex":
                ids, _, text = rest.partition(" ")
                excluded = [int(i) for i in ids.split(",")]
                peer.put_packet(f"bcast {int(server.broadcast(text, True, excluded))}")
            elif command == "gbcast":
                group, _, text = rest.partition(" ")
                peer.put_packet(f"gbcast {int(server.broadcast(text, True, group=group))}")
            elif command == "join":
                peer.put_packet(f"join {int(server.join(peer_id, rest))}")
            elif command == "peers":
                peer.put_packet("peers " + json.dumps(sorted(server.get_peers(cluster=True))))
            elif command == "status":
                peer.put_packet("status " + json.dumps(server.get_cluster_status()))
            else:
                peer.put_packet(f"unknown {command}")

    server.connect("data_received", on_data)
    server.connect(
        "remote_peer_disconnected",
        lambda peer_id, node: log.info("app: remote peer %d of %s gone", peer_id, node),
    )
    server.connect(
        "cluster_node_left", lambda node, reason: log.info("app: node %s left: %s", node, reason)
    )
