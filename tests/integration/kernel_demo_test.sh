#!/usr/bin/env bash
# README line 1's kernel part, end to end: `agate up` on a fresh home, agate-kernel-demo (a bank
# tree and a region shared READ-only with a second process), the bank tree back at its baseline
# afterwards, `agate down`. Before the kernel is up, the demo's error names the home. Watchdog: every step runs under `timeout`; the kernel is stopped on
# any exit.
# usage: kernel_demo_test.sh AGATE AGATE_KERNEL_DEMO
set -euo pipefail
agate=$1
demo=$2
home=$(mktemp -d /tmp/agate-demo-test-XXXXXX)
cleanup() {
  timeout 30 "$agate" down --home "$home" --force >/dev/null 2>&1 || true
  rm -rf "$home"
}
trap cleanup EXIT

# No kernel in the home yet: the demo says which home and how to start one, and exits 1.
status=0
err=$(timeout 60 "$demo" --home "$home" 2>&1 >/dev/null) || status=$?
if [ "$status" -ne 1 ] ||
  ! grep -qF "writer: attach to the kernel in $home failed: disconnected; start one with \`agate up --home $home\`" <<<"$err"; then
  echo "kernel_demo_test: without a kernel it exited $status and said: $err" >&2
  exit 1
fi

# --help answers on stdout with 0; anything else it does not know is a usage error (64).
timeout 10 "$demo" --help | grep -qF "usage: agate-kernel-demo [--home DIR]"
status=0
timeout 10 "$demo" --bogus 2>/dev/null || status=$?
if [ "$status" -ne 64 ]; then
  echo "kernel_demo_test: an unknown option exited $status, not 64" >&2
  exit 1
fi

timeout 30 "$agate" up --home "$home"
out=$(timeout 60 "$demo" --home "$home")
echo "$out"
grep -q 'reader: the region says: "hello from kernel pid' <<<"$out"
grep -q 'received a region cap with rights RG$' <<<"$out"  # READ|GRANT, as the writer copied it
grep -q 'reader: a writable mapping is refused: permission denied' <<<"$out"
grep -q 'refused: quota exceeded' <<<"$out"
# Both demo processes are gone and detached; only the system bank's own pages remain in use.
procs=$(timeout 30 "$agate" ps --home "$home" --json)
if grep -q '"demo-' <<<"$procs"; then
  echo "kernel_demo_test: a demo process is still attached: $procs" >&2
  exit 1
fi
timeout 30 "$agate" down --home "$home"
echo "kernel_demo_test: ok"
