#!/usr/bin/env bash
# Shard scaling, in one go, on a machine with at least 16 free cores (issue 5):
# echo with 1, 2, 4 and 8 shards, wsfleet-K pinned to K cores with its front (and the
# idle supervisor) inside that set, as `compare` pins every server; then 4 shards with
# the front on a core of its own; the front's echo with per-peer delivery with 4 and 8
# shards (wsfleet-K-peer) and the echo as a shard handler with 1, 4 and 8 shards
# (wsfleet-K-sh, issue 15); against Godot 3.2.3's server pinned to one core. The
# load generator runs on cores 9-15 (7 processes, 400 connections x 16 in flight), and
# opens its connections one at a time per process (Godot 3.2 listens with a backlog of 8).
#
#   loadtest/scaling.sh [RUNS]            (RUNS defaults to 3; JSON in scaling.json)
#
# The 2-core development machine cannot run it: the figures come from a lent
# 16-core machine when a session has one.
set -euo pipefail
runs=${1:-3}
py=${PYTHON:-python3}
cores=$(nproc)
if [ "$cores" -lt 16 ]; then
    echo "scaling.sh needs 16 cores (servers 0-8, load 9-15); this machine has $cores" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
godot_script="$(cd "$(dirname "$0")" && pwd)/godot_server.gd"
servers=()
for shards in 1 2 4 8; do
    servers+=(--server "wsfleet-$shards=taskset -c 0-$((shards - 1)) $py -m wsfleet serve --quiet --port {port} --shards $shards")
done
servers+=(--server "wsfleet-4+front=taskset -c 0-3,8 $py -m wsfleet serve --quiet --port {port} --shards 4")
# The front's echo with per-peer delivery (issue 15): one data_received per peer per batch.
for shards in 4 8; do
    servers+=(--server "wsfleet-$shards-peer=taskset -c 0-$((shards - 1)) $py -m wsfleet serve --quiet --port {port} --shards $shards --app wsfleet.loadtest.wsfleet_apps:batch_echo")
done
# The echo as a shard handler (issue 15): answered in the shards, the front idle.
for shards in 1 4 8; do
    servers+=(--server "wsfleet-$shards-sh=taskset -c 0-$((shards - 1)) $py -m wsfleet serve --quiet --port {port} --shards $shards --shard-handler wsfleet.loadtest.shard_echo:echo")
done
servers+=(--server "godot=taskset -c 0 env -C $work HOME=$work LANG=en_US.UTF-8 godot3-server --no-window -s $godot_script --wsfleet-port={port} --wsfleet-mode=echo --wsfleet-sleep-usec=0")
exec "$py" -m wsfleet.loadtest.echo_bench --runs "$runs" --seconds 5 --warmup 1 \
    --connections 400 --inflight 16 --client-procs 7 --client-cpus 9-15 --connect-concurrency 1 \
    --server-cpus '' "${servers[@]}" --json scaling.json
