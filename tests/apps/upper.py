"""An application for ``wsfleet serve --app tests.apps.upper:setup``.

Echoes every text message in capitals; a tick counts polls and, once a peer
sent ``stop``, returns False (an orderly stop).  ``setup_signals_only`` returns
None (the application lives in its handlers); ``setup_raises`` and
``setup_bad_return`` are the failures the CLI must report.
"""

from __future__ import annotations

import logging

log = logging.getLogger("wsfleet.app")


def setup(server):
    state = {"ticks": 0, "stop": False}
    server.max_peers = 10  # an application may change settings before listen

    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        while peer.get_available_packet_count():
            text = peer.get_packet().decode()
            if text == "stop":
                state["stop"] = True
            elif text == "ticks":
                peer.put_packet(str(state["ticks"]).encode())
            else:
                peer.put_packet(text.upper().encode())

    server.connect("data_received", on_data)
    server.connect("client_disconnected", lambda i, clean: log.info("app: peer %d gone", i))

    def tick():
        state["ticks"] += 1
        if state["stop"]:
            log.info("app: stopping")
            return False
        return None

    log.info("app: set up, listening: %s", server.get_bound_addresses() != [])
    return tick


def setup_signals_only(server):
    def on_data(peer_id: int) -> None:
        peer = server.get_peer(peer_id)
        peer.put_packet(b"only:" + peer.get_packet())

    server.connect("data_received", on_data)


def setup_raises(server):
    raise RuntimeError("the application cannot start")


def setup_bad_return(server):
    return 42
