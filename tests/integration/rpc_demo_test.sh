#!/usr/bin/env bash
# README line 1's RPC part, end to end through agate-kernel: `agate up` on a fresh home; the
# calculator and echo servers registered by name; their clients open bushels to them, pipeline
# (the evaluate -> read chain in one round trip) and check every reply; SIGTERM ends each server
# cleanly (it unregisters); nothing of the clients or servers stays attached; `agate down`.
# Watchdog: every step runs under `timeout`; the servers and the kernel are stopped on any exit.
# The ticker example's client reads an event stream of coalesced quotes from its server.
# The programs' errors for the usual mistakes name the home and the service and say what to do:
# no kernel in the home, a second server for a registered name, a service no server provides.
# usage: rpc_demo_test.sh AGATE CALCULATOR_SERVER CALCULATOR ECHO TICKER
set -euo pipefail
agate=$1
calcServer=$2
calc=$3
echo=$4
ticker=$5
test_name=rpc_demo_test
# shellcheck source=servers_lib.sh
source "$(dirname "$0")/servers_lib.sh"

# expect_failure [-s STATUS] NEEDLE... -- COMMAND...: COMMAND must exit STATUS (default 1) with
# every NEEDLE in what it printed (stdout and stderr).
expect_failure() {
  local expected=1
  if [ "$1" = "-s" ]; then
    expected=$2
    shift 2
  fi
  local needles=()
  while [ "$1" != "--" ]; do
    needles+=("$1")
    shift
  done
  shift
  local err status=0
  err=$(timeout 60 "$@" 2>&1) || status=$?
  if [ "$status" -ne "$expected" ]; then
    echo "$test_name: '$*' exited $status, not $expected: $err" >&2
    exit 1
  fi
  for n in "${needles[@]}"; do
    if ! grep -qF -- "$n" <<<"$err"; then
      echo "$test_name: '$*' said '$err', without '$n'" >&2
      exit 1
    fi
  done
  if grep -qF 'lastErrorDetail' <<<"$err"; then
    echo "$test_name: '$*' names an API function: $err" >&2
    exit 1
  fi
}

# The command line: help, and mistakes refused before anything is attempted.
expect_failure -s 0 "usage: agate-echo [--home DIR] [serve | CALLS]" "CALLS        echo calls" \
  "--home DIR   the kernel's home" -- "$echo" --help
expect_failure -s 64 'agate-echo: CALLS must be a whole number from 1 to 1000000000, not "abc"' \
  "usage: agate-echo" -- "$echo" abc
expect_failure -s 64 "agate-echo: unexpected argument 6" -- "$echo" 5 6
expect_failure -s 64 "agate-echo: unknown option --colls" "usage: agate-echo" -- "$echo" --colls 5
expect_failure -s 64 "agate-echo: --home needs a directory" -- "$echo" --home
expect_failure -s 64 "agate-echo: unexpected argument 5 (a server takes only --home)" \
  -- "$echo" serve 5

expect_failure "agate-echo: attach to the kernel in $home: disconnected" \
  "start one with \`agate up --home $home\`" -- "$echo" --home "$home" 1

timeout 30 "$agate" up --home "$home"
start_server calculator "$calcServer"
calcPid=${pids[-1]}
start_server echo "$echo" serve
echoPid=${pids[-1]}
expect_failure 'serve "echo": already exists: refused by agate-kernel (name is registered)' \
  "another process serves \"echo\" in $home" -- "$echo" --home "$home" serve
start_server ticker "$ticker" serve
tickerPid=${pids[-1]}

out=$(timeout 60 "$calc" --home "$home" 50)
echo "$out"
grep -q 'evaluate(123).value.read() = 123' <<<"$out"
grep -q 'f(12, 34) with f(x, y) = x \* 100 + y = 1234' <<<"$out"
grep -q 'pipelined: 2 calls in 1 round trip' <<<"$out"
grep -q '(4 \* 6) + 3 = 27' <<<"$out"
grep -q '(4 \* 6) + 5 = 29' <<<"$out"
grep -q '7 calls in 1 round trip: operators and a Value passed back still pipelined' <<<"$out"
out=$(timeout 60 "$echo" --home "$home" 200)
echo "$out"
grep -q '200 typed echo calls over a bushel to "echo", all replies matched' <<<"$out"
out=$(timeout 60 "$ticker" --home "$home" 30)
echo "$out"
grep -q 'agate-ticker: 30 batches, .* every quote matched' <<<"$out"

# The clients are gone: only the two servers are attached, and each still serves.
procs=$(timeout 30 "$agate" ps --home "$home" --json)
if grep -q '"agate-calculator"' <<<"$procs"; then
  echo "rpc_demo_test: the calculator client is still attached: $procs" >&2
  exit 1
fi
stop_server "$calcPid"
stop_server "$echoPid"
stop_server "$tickerPid"
pids=()
procs=$(timeout 30 "$agate" ps --home "$home" --json)
if grep -q '"agate-' <<<"$procs"; then
  echo "rpc_demo_test: a server is still attached after SIGTERM: $procs" >&2
  exit 1
fi
# No server provides "echo" any more: the client waits its 5 s, then says what it missed.
expect_failure "agate-echo: session: timed out" \
  "no service \"echo\" is registered in $home: is its server running?" -- "$echo" --home "$home" 1
timeout 30 "$agate" down --home "$home"
echo "rpc_demo_test: ok"
