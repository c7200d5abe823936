# Sourced by tests/autobahn/run.sh and tests/browser/run.sh (not run by itself): how
# they stop the `wsfleet serve` they started in its own session (setsid), whatever
# happens. Set `check` (the name in messages) and, once it runs, `server_pid`.

server_pid=
stop_server() {
  [ -n "$server_pid" ] || return 0
  if kill -TERM "$server_pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$server_pid" 2>/dev/null; then
      echo "$check: server $server_pid did not stop in 10 s: killing its group" >&2
      kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
  fi
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
trap stop_server EXIT
trap 'exit 3' INT TERM
