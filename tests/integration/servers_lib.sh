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
# watchdog) and waits for its "NAME: serving" line. `timeout --foreground`: otherwise timeout
# follows the SIGTERM it forwards with a SIGCONT, which can land while LeakSanitizer (ASan
# builds) is stopping the exiting server to scan it: the SIGCONT discards the SIGSTOP its
# tracer waits for, and the server hangs (3 runs in 20 on a loaded machine).
start_server() {
  local name=$1
  shift
  timeout --foreground -k 30 120 "$@" --home "$home" >"$home/$name.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 500); do
    grep -q "^$name: serving" "$home/$name.out" 2>/dev/null && return 0
    sleep 0.02
  done
  echo "$test_name: $name did not start: $(cat "$home/$name.out")" >&2
  return 1
}

# stop_server PID: SIGTERM, then the exit status must be 0 (it unregistered and exited cleanly).
# A server still running 20 s later fails the test, naming it, with its threads' stacks when gdb
# can attach (rather than hanging until the test's timeout).
stop_server() {
  local pid=$1 status=0
  local server
  server=$(pgrep -P "$pid" | head -n 1)
  kill -TERM "$pid"
  for _ in $(seq 1 400); do
    [ -n "$server" ] && kill -0 "$server" 2>/dev/null || break
    sleep 0.05
  done
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null &&
    ! grep -q zombie "/proc/$server/status" 2>/dev/null; then
    echo "$test_name: $(tr '\0' ' ' <"/proc/$server/cmdline") (pid $server) did not exit" \
      "within 20 s of SIGTERM" >&2
    if command -v gdb >/dev/null; then
      timeout 30 gdb -p "$server" -batch -ex "thread apply all bt" >&2 2>&1 || true
    fi
    kill -KILL "$server" 2>/dev/null || true
    wait "$pid" || true
    return 1
  fi
  wait "$pid" || status=$?
  return "$status"
}
