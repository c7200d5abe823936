"""The supervisor process: forks the shards and keeps them alive.

Owns: spawning, reaping and restarting shards (back-off, crash-loop limit),
telling the front about deaths over the control channel, and tying process
lifetimes together, replacing a shard whose heartbeat stops, and serving the
operator: the control socket (`control`), ``/metrics`` and ``/healthz``
(`metrics`), both from the master loop (`ops`, `accepting`), and
``wsfleet reload`` (`reload`: each shard's process replaced by a fresh
interpreter that takes its connections over).  Started as a
fresh interpreter (``python -m wsfleet.supervisor``), never a fork of the
user's process.  Imports `wsfleet.ipc` and the shards' entry point, which it
runs in its children.
"""
