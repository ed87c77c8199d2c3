#!/usr/bin/env python3
"""Smoke test of the benchmark harness (not a timed test: no thresholds).

Runs the `rings` driver with --quick, then checks the JSON it wrote: the required shape, every
floor present with a positive finite value and a unit, one figure per listed scenario, a
placement per scenario and no failures.
usage: check_rings_json.py DRIVER
"""
import json
import math
import os
import subprocess
import sys
import tempfile

REQUIRED = [
    "floor_cacheline_rtt_ns", "floor_cacheline_rtt_ns_p99", "floor_cacheline_rtt_ns_p999",
    "floor_futex_rtt_ns", "floor_futex_rtt_ns_p99", "floor_futex_rtt_ns_p999",
    "floor_socketpair_rtt_ns", "floor_socketpair_rtt_ns_p99", "floor_socketpair_rtt_ns_p999",
    "floor_spsc_32b_msgs_per_s", "floor_spsc_1k_msgs_per_s",
    "floor_clock_read_ns", "floor_syscall_ns", "floor_coroutine_resume_ns",
    "floor_fcontext_switch_ns",
]


def fail(message):
    print(f"check_rings_json: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 2:
        fail("usage: check_rings_json.py DRIVER")
    driver = sys.argv[1]
    listed = subprocess.run([driver, "--list"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        fail(f"--list exited {listed.returncode}: {listed.stderr}")
    scenarios = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    if not scenarios:
        fail("--list printed no scenario")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rings.json")
        run = subprocess.run([driver, "--quick", "--watchdog", "20", "--json", path],
                             capture_output=True, text=True, timeout=240)
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            fail(f"the driver exited {run.returncode}")
        with open(path) as f:
            doc = json.load(f)

    if doc.get("suite") != "rings":
        fail(f"suite is {doc.get('suite')!r}, not 'rings'")
    if doc.get("quick") is not True:
        fail("a --quick run must say so")
    if not isinstance(doc.get("machine", {}).get("cpus"), int) or doc["machine"]["cpus"] < 1:
        fail("machine.cpus missing")
    figures = doc.get("figures")
    if not isinstance(figures, list) or not figures:
        fail("no figures")
    by_name = {}
    for fig in figures:
        for key in ("name", "value", "unit"):
            if key not in fig:
                fail(f"figure {fig} lacks {key!r}")
        if fig["name"] in by_name:
            fail(f"figure {fig['name']} appears twice")
        value = fig["value"]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            fail(f"figure {fig['name']} has value {value!r}, not a positive number")
        if not isinstance(fig["unit"], str) or not fig["unit"]:
            fail(f"figure {fig['name']} has no unit")
        by_name[fig["name"]] = fig
    for name in REQUIRED + scenarios:
        if name not in by_name:
            fail(f"figure {name} is missing")
    placed = {p["scenario"] for p in doc.get("placements", [])}
    for name in scenarios:
        if name not in placed:
            fail(f"scenario {name} has no placement")
    if doc.get("failures"):
        fail(f"failures reported: {doc['failures']}")
    print(f"check_rings_json: OK, {len(figures)} figures from {len(scenarios)} scenarios")


if __name__ == "__main__":
    main()
