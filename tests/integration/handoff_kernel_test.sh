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
test_name=handoff_kernel_test
# shellcheck source=servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

# No kernel in the home yet: the error names the home and how to start one, and exits 1; a
# command line without a mode is refused with the usage line (64).
status=0
err=$(timeout 60 "$example" client --home "$home" 2>&1 >/dev/null) || status=$?
if [ "$status" -ne 1 ] ||
  ! grep -qF "attach to the kernel in $home: disconnected; start one with \`agate up --home $home\`" <<<"$err"; then
  echo "$test_name: without a kernel it exited $status and said: $err" >&2
  exit 1
fi
status=0
err=$(timeout 60 "$example" --home "$home" 2>&1 >/dev/null) || status=$?
if [ "$status" -ne 64 ] || ! grep -qF "agate-handoff-kernel: a mode is needed" <<<"$err" ||
  ! grep -qF "usage: agate-handoff-kernel [--home DIR] bank|auditor|client [TIMES]" <<<"$err"; then
  echo "$test_name: without a mode it exited $status and said: $err" >&2
  exit 1
fi
status=0
err=$(timeout 60 "$example" --home "$home" client 12x 2>&1 >/dev/null) || status=$?
if [ "$status" -ne 64 ] ||
  ! grep -qF 'TIMES must be a whole number from 1 to 1000000, not "12x"' <<<"$err"; then
  echo "$test_name: with a malformed TIMES it exited $status and said: $err" >&2
  exit 1
fi

timeout 30 "$agate" up --home "$home"
start_server handoff-bank "$example" bank
bankPid=${pids[-1]}
start_server handoff-auditor "$example" auditor
auditorPid=${pids[-1]}

out=$(timeout 60 "$example" client 100 --home "$home")
echo "$out"
grep -q "B's last total 110 (C's two adds came first), final total 110" <<<"$out"
grep -q '1 Provide from C to A, 1 introduction of B to A, calls through C 0' <<<"$out"

stop_server "$bankPid"
stop_server "$auditorPid"
pids=()
timeout 30 "$agate" down --home "$home"
echo "handoff_kernel_test: ok"
