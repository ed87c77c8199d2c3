# Sourced by the shell tests that run example servers through agate-kernel: a fresh home, the
# servers' pids, and a cleanup on any exit (the servers killed, the kernel stopped, the home gone).
# Needs $agate (the agate CLI) and $test_name set before it is sourced; sets $home and $pids.
home=$(mktemp -d "/tmp/agate-$test_name-XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  timeout 30 "$agate" down --home "$home" --force >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT

# start_server NAME COMMAND...: starts a server in the background (under `timeout`, the
# watchdog) and waits for its "NAME: serving" line.
start_server() {
  local name=$1
  shift
  timeout 120 "$@" --home "$home" >"$home/$name.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 500); do
    grep -q "^$name: serving" "$home/$name.out" 2>/dev/null && return 0
    sleep 0.02
  done
  echo "$test_name: $name did not start: $(cat "$home/$name.out")" >&2
  return 1
}

# stop_server PID: SIGTERM, then the exit status must be 0 (it unregistered and exited cleanly).
stop_server() {
  local pid=$1
  kill -TERM "$pid"
  wait "$pid"
}
