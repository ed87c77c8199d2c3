#!/usr/bin/env python3
"""Smoke test of the benchmark harness (not a timed test: no thresholds).

Runs a suite's driver (default `rings`) with --quick, then checks the JSON it wrote: the required
shape, every required figure present with a positive finite value and a unit, the ratios the
suite promises (ratio_to naming a figure of the same run, ratio positive), one figure per listed
scenario, a placement per scenario and no failures.
usage: check_rings_json.py DRIVER [SUITE]
"""
import json
import math
import os
import subprocess
import sys
import tempfile

def latency(name):
    return [name, name + "_p99", name + "_p999"]


# Per suite: the figures a run must contain.
REQUIRED = {
    "rings": latency("floor_cacheline_rtt_ns") + latency("floor_futex_rtt_ns") +
    latency("floor_socketpair_rtt_ns") + [
        "floor_spsc_32b_msgs_per_s", "floor_spsc_1k_msgs_per_s",
        "floor_clock_read_ns", "floor_syscall_ns", "floor_coroutine_resume_ns",
        "floor_fcontext_switch_ns",
    ] + latency("shared_rtt_polled_ns") + latency("shared_rtt_polled_raw_ns") +
    latency("shared_rtt_parked_ns") + [
        "shared_oneway_32b_msgs_per_s", "shared_oneway_1k_msgs_per_s",
        "local_oneway_32b_msgs_per_s", "coawait_resume_ns", "fiber_switch_ns",
        "peer_boost_fiber_switch_ns", "floor_map_guard_paged_stack_ns",
        "fiber_start_warm_pool_ns",
    ],
    "messages": [
        "floor_memcpy_32b_ns", "floor_memcpy_1k_ns", "peer_capnp_lazy_32b_ns",
        "peer_capnp_lazy_1k_ns", "build_32b_ns", "build_1k_ns", "decode_in_place_32b_ns",
        "decode_in_place_1k_ns", "decode_copy_in_32b_ns", "decode_copy_in_1k_ns",
        "refuse_amplified_frame_ns",
    ],
    "kernel": latency("floor_cacheline_rtt_ns") + latency("floor_futex_rtt_ns") +
    latency("syscall_rtt_polled_ns") + latency("syscall_rtt_parked_ns") + [
        "syscall_batched_ops_per_s", "cap_copy_delete_ops_per_s", "bank_alloc_free_ops_per_s",
        "reclaim_10k_caps_ms",
    ],
    "rpc": latency("floor_cacheline_rtt_ns") + latency("floor_futex_rtt_ns") +
    latency("null_call_rtt_polled_ns") + latency("null_call_rtt_parked_ns") +
    ["calls_per_s_inflight"] + latency("chain10_pipelined_ns") + latency("chain10_awaited_ns") +
    latency("chain10_pipelined_parked_ns") + latency("chain10_awaited_parked_ns") +
    latency("null_call_one_thread_ns") + ["allocations_per_call"] + latency("peer_capnp_null_call_rtt_ns") +
    ["peer_capnp_calls_per_s_inflight"] + latency("peer_capnp_chain10_pipelined_ns"),
}

# Figures whose value may be zero (a count that the target wants at zero).
MAY_BE_ZERO = {"allocations_per_call"}

# Per suite: figure -> the figure it must be compared with (ratio_to) in the same run.
RATIOS = {
    "rings": {
        **{a + s: f + s for a, f in [("shared_rtt_polled_ns", "floor_cacheline_rtt_ns"),
                                      ("shared_rtt_polled_raw_ns", "floor_cacheline_rtt_ns"),
                                      ("shared_rtt_parked_ns", "floor_futex_rtt_ns")]
           for s in ("", "_p99", "_p999")},
        "shared_oneway_32b_msgs_per_s": "floor_spsc_32b_msgs_per_s",
        "shared_oneway_1k_msgs_per_s": "floor_spsc_1k_msgs_per_s",
        "local_oneway_32b_msgs_per_s": "floor_spsc_32b_msgs_per_s",
        "coawait_resume_ns": "floor_coroutine_resume_ns",
        "fiber_switch_ns": "floor_fcontext_switch_ns",
    },
    "messages": {
        "decode_copy_in_32b_ns": "decode_in_place_32b_ns",
        "decode_copy_in_1k_ns": "decode_in_place_1k_ns",
    },
    "kernel": {
        **{a + s: f + s for a, f in [("syscall_rtt_polled_ns", "floor_cacheline_rtt_ns"),
                                      ("syscall_rtt_parked_ns", "floor_futex_rtt_ns")]
           for s in ("", "_p99", "_p999")},
    },
    "rpc": {
        **{a + s: f + s for a, f in [("null_call_rtt_polled_ns", "floor_cacheline_rtt_ns"),
                                      ("null_call_rtt_parked_ns", "floor_futex_rtt_ns"),
                                      ("chain10_pipelined_ns", "null_call_rtt_polled_ns"),
                                      ("chain10_awaited_ns", "null_call_rtt_polled_ns"),
                                      ("chain10_pipelined_parked_ns", "null_call_rtt_parked_ns"),
                                      ("chain10_awaited_parked_ns", "null_call_rtt_parked_ns"),
                                      ("null_call_one_thread_ns", "floor_cacheline_rtt_ns")]
           for s in ("", "_p99", "_p999")},
    },
}


def fail(message):
    print(f"check_rings_json: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) not in (2, 3):
        fail("usage: check_rings_json.py DRIVER [SUITE]")
    driver = sys.argv[1]
    suite = sys.argv[2] if len(sys.argv) == 3 else "rings"
    if suite not in REQUIRED:
        fail(f"no checks for suite {suite!r}")
    listed = subprocess.run([driver, "--list"], capture_output=True, text=True, timeout=30)
    if listed.returncode != 0:
        fail(f"--list exited {listed.returncode}: {listed.stderr}")
    scenarios = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    if not scenarios:
        fail("--list printed no scenario")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, suite + ".json")
        run = subprocess.run([driver, "--quick", "--watchdog", "20", "--json", path],
                             capture_output=True, text=True, timeout=240)
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            fail(f"the driver exited {run.returncode}")
        with open(path) as f:
            doc = json.load(f)

    if doc.get("suite") != suite:
        fail(f"suite is {doc.get('suite')!r}, not {suite!r}")
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
        floor = 0 if fig["name"] in MAY_BE_ZERO else None
        if (not isinstance(value, (int, float)) or not math.isfinite(value) or
                (value < 0 if floor == 0 else value <= 0)):
            fail(f"figure {fig['name']} has value {value!r}, not a positive number")
        if not isinstance(fig["unit"], str) or not fig["unit"]:
            fail(f"figure {fig['name']} has no unit")
        by_name[fig["name"]] = fig
    for name in REQUIRED[suite] + scenarios:
        if name not in by_name:
            fail(f"figure {name} is missing")
    for name, floor in RATIOS[suite].items():
        fig = by_name[name]
        if fig.get("ratio_to") != floor:
            fail(f"figure {name} is compared with {fig.get('ratio_to')!r}, not {floor!r}")
        ratio = fig.get("ratio")
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            fail(f"figure {name} has ratio {ratio!r}, not a positive number")
    placed = {p["scenario"] for p in doc.get("placements", [])}
    for name in scenarios:
        if name not in placed:
            fail(f"scenario {name} has no placement")
    if doc.get("failures"):
        fail(f"failures reported: {doc['failures']}")
    print(f"check_rings_json: OK, {len(figures)} figures from {len(scenarios)} scenarios")


if __name__ == "__main__":
    main()
