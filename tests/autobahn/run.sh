#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzingclient) against `wsfleet serve`'s echo: without compression, or
# the permessage-deflate cases (12.*, 13.*) against `wsfleet serve --compression`.
#
# usage: tests/autobahn/run.sh [--autobahn DIR] [--outdir DIR] [--9-limit SECONDS]
#                              [--compression] [--compression-limit SECONDS] [CASES]
#   --autobahn DIR   the Autobahn wrapper, set up (its setup.sh run): the directory of its
#                    `run.sh [-q] [--no-compression] [--agent A] [--outdir D] [--timeout S]
#                    HOST PORT CASES` (default: $AUTOBAHN_DIR; one of the two is required)
#   --outdir DIR     where the reports go (default: a new temporary directory, printed)
#   --9-limit S      the 9.* run must finish within S seconds, else this fails
#                    (default: $AUTOBAHN_9_LIMIT_S or 480, issue 10's 8 minutes)
#   --compression    start the server with --compression and run the permessage-deflate
#                    cases: "12.*" then "13.*" (or CASES, one run), each within the limit below
#   --compression-limit S  each of those runs must finish within S seconds, else this fails
#                    (default: $AUTOBAHN_COMPRESSION_LIMIT_S or 480, issue 13's 8 minutes;
#                    docs/CONFORMANCE.md: the suite's own client needs ~7 min for each here)
#   CASES            one comma-separated pattern list to run instead of the two default runs
#                    "1.*,2.*,3.*,4.*,5.*,6.*,7.*,10.*" then "9.*" (messages up to 16 MiB)
# Environment: WSFLEET (the wsfleet command; default: .venv/bin/wsfleet of this checkout
# if present, else `wsfleet` on PATH), WSFLEET_SHARDS (--shards; default: wsfleet's).
#
# Starts `wsfleet serve --max-message-size 16777216` (and --compression) on a free 127.0.0.1 port, runs the
# cases, stops the server (by pid; its process group if it does not stop) whatever happens,
# and exits 0 only when no case FAILED and 9.* kept within its limit (1: a FAILED case or
# too slow; 2: usage or setup; 3: the server or the suite did not run to the end, as when
# a run is stopped at its limit: the suite writes no report then, only its wstest.log).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

autobahn=${AUTOBAHN_DIR:-} outdir= limit9=${AUTOBAHN_9_LIMIT_S:-480} cases=
compression= limit_deflate=${AUTOBAHN_COMPRESSION_LIMIT_S:-480}
while [ $# -gt 0 ]; do
  case "$1" in
    --autobahn) autobahn=$2; shift 2 ;;
    --outdir) outdir=$2; shift 2 ;;
    --9-limit) limit9=$2; shift 2 ;;
    --compression) compression=1; shift ;;
    --compression-limit) limit_deflate=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "autobahn: unknown option $1" >&2; usage ;;
    *) [ -z "$cases" ] || usage; cases=$1; shift ;;
  esac
done
[ -n "$autobahn" ] || { echo "autobahn: give --autobahn DIR or AUTOBAHN_DIR" >&2; exit 2; }
[ -x "$autobahn/run.sh" ] || { echo "autobahn: no executable $autobahn/run.sh" >&2; exit 2; }
[[ "$limit9" =~ ^[0-9]+$ ]] || { echo "autobahn: bad --9-limit '$limit9'" >&2; exit 2; }
[[ "$limit_deflate" =~ ^[0-9]+$ ]] ||
  { echo "autobahn: bad --compression-limit '$limit_deflate'" >&2; exit 2; }

if [ -z "${WSFLEET:-}" ]; then
  if [ -x "$REPO/.venv/bin/wsfleet" ]; then WSFLEET=$REPO/.venv/bin/wsfleet; else WSFLEET=wsfleet; fi
fi
command -v "$WSFLEET" >/dev/null || { echo "autobahn: no wsfleet command ($WSFLEET)" >&2; exit 2; }
outdir=${outdir:-$(mktemp -d "${TMPDIR:-/tmp}/wsfleet-autobahn.XXXXXX")}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

# A port nobody holds now (the server binds it a moment later; a clash shows as exit 3).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
shards=()
[ -z "${WSFLEET_SHARDS:-}" ] || shards=(--shards "$WSFLEET_SHARDS")
serve_compression=() suite_compression=(--no-compression)
[ -z "$compression" ] || { serve_compression=(--compression); suite_compression=(); }

check=autobahn
. "$REPO/tests/stop_server.sh"  # stop_server on exit, whatever happens

# Its own session (setsid): the group id is its pid, so a stuck server's shards go with it.
setsid "$WSFLEET" serve --port "$port" --bind 127.0.0.1 --max-message-size 16777216 \
  "${shards[@]}" "${serve_compression[@]}" --quiet >"$outdir/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 300); do
  kill -0 "$server_pid" 2>/dev/null ||
    { echo "autobahn: the server exited:" >&2; cat "$outdir/server.log" >&2; exit 3; }
  python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
    "$port" 2>/dev/null && break
  sleep 0.1
done
python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
  "$port" 2>/dev/null || { echo "autobahn: the server did not listen within 30 s" >&2; exit 3; }
echo "autobahn: wsfleet serve (pid $server_pid) on ws://127.0.0.1:$port, reports in $outdir" >&2

status=0
worse() { [ "$1" -le "$status" ] || status=$1; }  # keep the worst outcome: 3 > 1 > 0
# run_cases NAME CASES LIMIT: one fuzzingclient run into $outdir/NAME; LIMIT 0: no time limit.
run_cases() {
  local name=$1 patterns=$2 limit=$3 rc started elapsed kill_after=1800
  # A run over its limit has failed already: stop it a minute later rather than at 30 min.
  [ "$limit" -eq 0 ] || kill_after=$(( limit + 60 ))
  started=$(date +%s)
  set +e
  "$autobahn/run.sh" -q "${suite_compression[@]}" --agent wsfleet --outdir "$outdir/$name" \
    --timeout "$kill_after" 127.0.0.1 "$port" "$patterns"
  rc=$?
  set -e
  elapsed=$(( $(date +%s) - started ))
  echo "autobahn: [$patterns] took ${elapsed}s, exit $rc" >&2
  if [ "$rc" -eq 1 ]; then worse 1; elif [ "$rc" -ne 0 ]; then worse 3; fi
  if [ "$limit" -gt 0 ] && [ "$elapsed" -gt "$limit" ]; then
    echo "autobahn: FAIL: [$patterns] took ${elapsed}s, over its limit of ${limit}s" >&2
    worse 1
  fi
  kill -0 "$server_pid" 2>/dev/null ||
    { echo "autobahn: FAIL: the server died during [$patterns]" >&2; worse 3; }
}

if [ -n "$compression" ] && [ -n "$cases" ]; then
  run_cases deflate "$cases" "$limit_deflate"
elif [ -n "$compression" ]; then
  run_cases deflate12 "12.*" "$limit_deflate"
  run_cases deflate13 "13.*" "$limit_deflate"
elif [ -n "$cases" ]; then
  run_cases custom "$cases" 0
else
  run_cases core "1.*,2.*,3.*,4.*,5.*,6.*,7.*,10.*" 0
  run_cases limits "9.*" "$limit9"
fi
stop_server
if [ "$status" -eq 0 ]; then echo "autobahn: PASS (no FAILED case)" >&2
else echo "autobahn: FAIL (status $status; reports in $outdir)" >&2; fi
exit "$status"
