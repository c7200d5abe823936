"""``/metrics`` (Prometheus' text format, through prometheus-client) and ``/healthz``.

Served by the supervisor from its master loop, like the control socket: the
front binds the TCP socket (so a port in use fails ``listen``) and hands it
over.  A scrape reads the shards' shared counters (`wsfleet.ipc.stats`)
through `FleetCollector`; nothing is counted for it on the hot path.

Each request is read with a short timeout (`REQUEST_TIMEOUT`) and answered
with ``Connection: close``: a scraper is one request every few seconds.

``/healthz``: 200 ``ok`` while every shard runs and the server is not
draining, else 503 with the reasons, one per line.

Names and meaning: docs/METRICS.md.  Imports prometheus-client, the standard
library and `wsfleet.ipc` only.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from wsfleet.ipc.stats import CLOSE_CODES, REFUSE_REASONS

from .accepting import waiting_connections

log = logging.getLogger("wsfleet.supervisor")

REQUEST_TIMEOUT = 0.5
_STATES = ("running", "down", "failed")


class FleetCollector(Collector):
    """The status document's figures as ``wsfleet_*`` metric families, labelled by ``shard``."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        doc = self._status()
        rows = doc["shards"]

        def family(kind: type, name: str, doc_: str, field: str, labels: tuple = ()) -> Any:
            metric = kind(name, doc_, labels=["shard", *(k for k, _ in labels)])
            for row in rows:
                metric.add_metric([str(row["index"]), *(v for _, v in labels)], row[field])
            return metric

        yield family(GaugeMetricFamily, "wsfleet_peers", "Connected peers.", "peers")
        yield family(
            CounterMetricFamily,
            "wsfleet_handshakes_accepted",
            "WebSocket handshakes accepted.",
            "handshakes_accepted",
        )
        refused = CounterMetricFamily(
            "wsfleet_handshakes_refused",
            "Handshakes refused, by reason (HTTP status, timeout, dropped).",
            labels=["shard", "reason"],
        )
        for row in rows:
            for reason in REFUSE_REASONS:
                refused.add_metric([str(row["index"]), reason], row[f"refused_{reason}"])
        yield refused
        for field, text in (
            ("messages_in", "Messages received from peers."),
            ("bytes_in", "Bytes read from peers' sockets (handshakes and framing included)."),
            ("messages_out", "Messages sent to peers."),
            ("bytes_out", "Bytes of the messages sent to peers."),
            ("restarts", "Times the shard process was restarted."),
            ("reloads", "Times the shard process was replaced by wsfleet reload."),
            ("handoff_dropped", "Connections cut at a reload: not settled in time."),
            ("health_checks", "Plain GETs of the health path answered on the WebSocket port."),
            ("rate_limited", "Peers closed (1008) for sending over max_message_rate."),
            (
                "deflate_reload_closes",
                "Compressing peers closed (1012) at a reload: their zlib context cannot move.",
            ),
            (
                "shard_handler_errors",
                "Exceptions raised by the shard handler (the message was dropped).",
            ),
        ):
            yield family(CounterMetricFamily, f"wsfleet_{field}", text, field)
        closes = CounterMetricFamily(
            "wsfleet_closes", "Connections ended, by close code.", labels=["shard", "code"]
        )
        for row in rows:
            for code in CLOSE_CODES:
                closes.add_metric([str(row["index"]), str(code)], row[f"closes_{code}"])
            closes.add_metric([str(row["index"]), "other"], row["closes_other"])
        yield closes
        for field, text in (
            ("ring_fill", "Bytes waiting in the shard's events ring for the front."),
            ("ring_capacity", "Size of the shard's events ring in bytes."),
            ("paused_sockets", "Sockets whose reading is paused by backpressure."),
            ("cpu_percent", "CPU use of the shard process in percent (since the last reading)."),
            ("rss", "Resident memory of the shard process in bytes."),
            ("uptime", "Seconds since the shard process started."),
        ):
            name = "wsfleet_rss_bytes" if field == "rss" else f"wsfleet_{field}"
            name = "wsfleet_uptime_seconds" if field == "uptime" else name
            name = "wsfleet_ring_fill_bytes" if field == "ring_fill" else name
            name = "wsfleet_ring_capacity_bytes" if field == "ring_capacity" else name
            yield family(GaugeMetricFamily, name, text, field)
        up = GaugeMetricFamily(
            "wsfleet_shard_state", "1 for the shard's current state.", labels=["shard", "state"]
        )
        for row in rows:
            for state in _STATES:
                up.add_metric([str(row["index"]), state], 1.0 if row["state"] == state else 0.0)
        yield up
        yield GaugeMetricFamily(
            "wsfleet_draining", "1 while the server is draining.", value=int(doc["draining"])
        )
        cluster = doc.get("cluster")
        if cluster:
            yield from _cluster_families(cluster)


def _cluster_families(cluster: dict[str, Any]) -> Iterator[Any]:
    """The front's cluster section (``cluster=``) as ``wsfleet_cluster_*`` families."""
    yield GaugeMetricFamily(
        "wsfleet_cluster_connected",
        "1 while this node is connected to NATS.",
        value=int(bool(cluster["nats_connected"])),
    )
    yield GaugeMetricFamily(
        "wsfleet_cluster_member",
        "1 while this node is in the cluster (connected, its id slot leased).",
        value=int(cluster["state"] == "member"),
    )
    yield GaugeMetricFamily(
        "wsfleet_cluster_nodes", "Other nodes this node sees.", value=len(cluster["nodes"])
    )
    yield GaugeMetricFamily(
        "wsfleet_cluster_remote_peers", "Peers of the other nodes.", value=cluster["remote_peers"]
    )
    for field, text in (
        ("messages_in", "NATS messages received from other nodes."),
        ("bytes_in", "Bytes of the NATS messages received from other nodes."),
        ("messages_out", "NATS messages sent to other nodes (one per node per poll)."),
        ("bytes_out", "Bytes of the NATS messages sent to other nodes."),
        ("refused_version", "Cluster messages refused: another wire version."),
        ("bad_messages", "Cluster messages that could not be read."),
        ("nodes_lost", "Nodes that left or went silent."),
        ("delivered", "Messages from other nodes put on this node's peers."),
    ):
        yield CounterMetricFamily(f"wsfleet_cluster_{field}", text, value=cluster[field])
    refused = CounterMetricFamily(
        "wsfleet_cluster_sends_refused",
        "Cross-node sends refused, by reason (down: NATS unreachable; too_large; backlog).",
        labels=["reason"],
    )
    refused.add_metric(["down"], cluster["sends_refused_down"])
    refused.add_metric(["too_large"], cluster["sends_refused_too_large"])
    refused.add_metric(["backlog"], cluster["sends_refused_backlog"])
    yield refused
    dropped = CounterMetricFamily(
        "wsfleet_cluster_dropped",
        "Messages from other nodes not delivered, by reason (unknown_peer, full).",
        labels=["reason"],
    )
    dropped.add_metric(["unknown_peer"], cluster["dropped_unknown_peer"])
    dropped.add_metric(["full"], cluster["dropped_full"])
    yield dropped


def health(doc: dict[str, Any]) -> tuple[int, str]:
    """``(200, "ok")`` while every shard runs and nothing drains, else 503 and the reasons."""
    reasons = []
    if doc["draining"]:
        reasons.append("draining")
    for row in doc["shards"]:
        if row["state"] != "running":
            why = f": {row['reason']}" if row.get("reason") else ""
            reasons.append(f"shard {row['index']} {row['state']}{why}")
    return (503, "\n".join(reasons)) if reasons else (200, "ok")


class MetricsServer:
    """Serves /metrics and /healthz on a listening TCP socket, one request at a time."""

    def __init__(self, sock: socket.socket, status: Callable[[], dict[str, Any]]) -> None:
        self.sock = sock
        self._status = status
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(status))
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle(self) -> None:
        for conn in waiting_connections(self.sock, "metrics socket"):
            try:
                conn.settimeout(REQUEST_TIMEOUT)
                self._serve(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        head = bytearray()
        while b"\r\n\r\n" not in head and len(head) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        parts = bytes(head).split(b"\r\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, "text/plain", b"GET only\n"
        elif path == b"/metrics":
            status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        elif path == b"/healthz":
            status, text = health(self._status())
            ctype, body = "text/plain; charset=utf-8", text.encode() + b"\n"
        else:
            status, ctype, body = 404, "text/plain", b"/metrics or /healthz\n"
        phrase = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
            status, "Service Unavailable"
        )
        head_out = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        conn.sendall(head_out if method == b"HEAD" else head_out + body)

    def close(self) -> None:
        self.sock.close()
