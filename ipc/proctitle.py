"""Process titles: what ``ps`` and ``top`` show for each wsfleet process.

``wsfleet front :9080``, ``wsfleet supervisor :9080``, ``wsfleet shard 3/8 :9080``
(shards numbered from 0, as `get_shard_status` and the logs number them).
Through ``setproctitle`` (a dependency); a process whose title cannot be set
keeps its command line, which is no reason to fail.

Imports the standard library and setproctitle only.
"""

from __future__ import annotations


def set_title(role: str, port: int) -> None:
    """Title this process ``wsfleet ROLE :PORT`` (``role``: "front", "shard 3/8"...)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # a broken install: keep the command line
        return
    setproctitle(f"wsfleet {role} :{port}")
