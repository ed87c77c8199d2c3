#!/usr/bin/env bash
# README line 1's RPC part, end to end through agate-kernel: `agate up` on a fresh home; the
# calculator and echo servers registered by name; their clients open bushels to them, pipeline
# (the evaluate -> read chain in one round trip) and check every reply; SIGTERM ends each server
# cleanly (it unregisters); nothing of the clients or servers stays attached; `agate down`.
# Watchdog: every step runs under `timeout`; the servers and the kernel are stopped on any exit.
# The ticker example's client reads an event stream of coalesced quotes from its server.
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

timeout 30 "$agate" up --home "$home"
start_server calculator "$calcServer"
calcPid=${pids[-1]}
start_server echo "$echo" serve
echoPid=${pids[-1]}
start_server ticker "$ticker" serve
tickerPid=${pids[-1]}

out=$(timeout 60 "$calc" --home "$home" 50)
echo "$out"
grep -q 'evaluate(123).value.read() = 123' <<<"$out"
grep -q 'f(12, 34) with f(x, y) = x \* 100 + y = 1234' <<<"$out"
grep -q 'pipelined: 2 calls in 1 round trip' <<<"$out"
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
timeout 30 "$agate" down --home "$home"
echo "rpc_demo_test: ok"
