"""``python -m wsfleet.shards --boot-fd N``: a successor shard, started by the supervisor."""

from .successor import run

run()
