#!/usr/bin/env bash
# Headless Chromium against `wsfleet serve`'s echo: check.mjs's steps (the negotiated
# extension, 1 MiB binary, empty messages, a 200-message burst, close 4000 "bye"), each
# reported PASS or FAIL.
#
# usage: tests/browser/run.sh [--url ws://HOST:PORT] [--compression]
#   --url URL      check a server that is already running instead of starting one
#   --compression  start it with --compression (with --url: say that it has it): the
#                  browser must negotiate permessage-deflate, and every step runs compressed
# Without --url: starts `wsfleet serve --max-message-size 16777216` on a free 127.0.0.1
# port and stops it (by pid; its process group if it does not stop) whatever happens.
# Environment: WSFLEET (the wsfleet command; default: .venv/bin/wsfleet of this checkout
# if present, else `wsfleet` on PATH), CHROMIUM (default /usr/bin/chromium).
# Needs node and npm: playwright-core goes into tests/browser/node_modules on the first
# run (npm, no browser download: Debian's chromium is driven).
# Exit status: 0 every step passed, 1 a step failed, 2 usage or setup, 3 the server did
# not start or died.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

url= compression=()
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url=$2; shift 2 ;;
    --compression) compression=(--compression); shift ;;
    -h|--help) usage ;;
    *) echo "browser: unexpected argument $1" >&2; usage ;;
  esac
done
command -v node >/dev/null || { echo "browser: node is required" >&2; exit 2; }
chromium=${CHROMIUM:-/usr/bin/chromium}
[ -x "$chromium" ] || { echo "browser: no browser at $chromium (apt-get install chromium)" >&2; exit 2; }
if [ ! -f "$HERE/node_modules/playwright-core/package.json" ]; then
  command -v npm >/dev/null || { echo "browser: npm is required" >&2; exit 2; }
  (cd "$HERE" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund \
    --no-package-lock --loglevel=error) >&2 || { echo "browser: npm install failed" >&2; exit 2; }
fi

check=browser
. "$REPO/tests/stop_server.sh"  # stop_server on exit, whatever happens

if [ -z "$url" ]; then
  if [ -z "${WSFLEET:-}" ]; then
    if [ -x "$REPO/.venv/bin/wsfleet" ]; then WSFLEET=$REPO/.venv/bin/wsfleet; else WSFLEET=wsfleet; fi
  fi
  command -v "$WSFLEET" >/dev/null || { echo "browser: no wsfleet command ($WSFLEET)" >&2; exit 2; }
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log=$(mktemp "${TMPDIR:-/tmp}/wsfleet-browser.XXXXXX.log")
  # Its own session (setsid): the group id is its pid, so a stuck server's shards go with it.
  setsid "$WSFLEET" serve --port "$port" --bind 127.0.0.1 --max-message-size 16777216 \
    "${compression[@]}" --quiet >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    kill -0 "$server_pid" 2>/dev/null ||
      { echo "browser: the server exited:" >&2; cat "$log" >&2; exit 3; }
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
      "$port" 2>/dev/null && break
    sleep 0.1
  done
  python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
    "$port" 2>/dev/null || { echo "browser: the server did not listen within 30 s" >&2; exit 3; }
  url=ws://127.0.0.1:$port
  echo "browser: wsfleet serve (pid $server_pid) on $url, log $log (kept on failure)" >&2
fi

set +e
CHROMIUM=$chromium timeout -k 5 120 node "$HERE/check.mjs" "$url" "${compression[@]}"
rc=$?
set -e
[ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || { echo "browser: FAIL: the check did not end within 120 s" >&2; rc=1; }
if [ -n "$server_pid" ] && ! kill -0 "$server_pid" 2>/dev/null; then
  echo "browser: FAIL: the server died during the check" >&2
  rc=3
fi
[ "$rc" -ne 0 ] || [ -z "${log:-}" ] || rm -f "$log"  # the server's log is kept for a failure
exit "$rc"
