#!/usr/bin/env bash
# examples/handoff_kernel.cpp end to end: `agate up` on a fresh home; server A (bank) and server
# B (auditor) registered by name; the client passes A's counter to B, B calls A directly over its
# own bushel (the client checks the totals, one Provide, one introduction, no call through it);
# SIGTERM ends each server cleanly; `agate down`.
# Watchdog: every step runs under `timeout`; the servers and the kernel are stopped on any exit.
# usage: handoff_kernel_test.sh AGATE AGATE_HANDOFF_KERNEL
set -euo pipefail
agate=$1
example=$2
home=$(mktemp -d /tmp/agate-handoff-kernel-test-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  timeout 30 "$agate" down --home "$home" --force >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT

# Starts a server in the background and waits for its "NAME: serving" line.
start_server() {
  local name=$1
  shift
  timeout 90 "$@" --home "$home" >"$home/$name.out" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 500); do
    grep -q "^$name: serving" "$home/$name.out" 2>/dev/null && return 0
    sleep 0.02
  done
  echo "handoff_kernel_test: $name did not start: $(cat "$home/$name.out")" >&2
  return 1
}

timeout 30 "$agate" up --home "$home"
start_server handoff-bank "$example" bank
bankPid=${pids[-1]}
start_server handoff-auditor "$example" auditor
auditorPid=${pids[-1]}

out=$(timeout 60 "$example" client 100 --home "$home")
echo "$out"
grep -q "B's last total 110 (C's two adds came first), final total 110" <<<"$out"
grep -q '1 Provide from C to A, 1 introduction of B to A, calls through C 0' <<<"$out"

kill -TERM "$bankPid" "$auditorPid"
wait "$bankPid"
wait "$auditorPid"
pids=()
timeout 30 "$agate" down --home "$home"
echo "handoff_kernel_test: ok"
