#!/usr/bin/env python3
"""Prints the same benchmarks built at -O3 and at -O2 side by side (Google Benchmark JSON
files, medians): one markdown row per fovea kernel present in both, with the ratio, and a
flag on any row where -O2 is more than 5% slower. The baselines the benchmarks hold for
comparison (Eigen, the hand-written token loops, a state copy) are left out: GCC
vectorises some of them at -O3 only, which says nothing about fovea. scripts/bench calls it.

    scripts/compare_opt.py O3.json O2.json [O3.json O2.json ...]
"""
import json
import sys

BASELINES = ("eigen/", "recurrence/", "titans_recurrence/", "state_copy/")


def medians(path):
    """Benchmark name -> median real time in ms (runs without aggregates count as medians)."""
    out = {}
    for run in json.load(open(path))["benchmarks"]:
        if run.get("aggregate_name", "median") != "median":
            continue
        name = run.get("run_name", run["name"])
        scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run.get("time_unit", "ns")]
        out[name] = run["real_time"] * scale
    return out


def main(files):
    if len(files) < 2 or len(files) % 2:
        sys.exit(__doc__)
    print("| benchmark (1 thread unless named) | -O3 ms | -O2 ms | -O2 / -O3 |")
    print("|---|---:|---:|---:|")
    worst = 0.0
    for o3_path, o2_path in zip(files[::2], files[1::2]):
        o3, o2 = medians(o3_path), medians(o2_path)
        for name in o3:
            if name not in o2 or o3[name] <= 0 or name.startswith(BASELINES):
                continue
            ratio = o2[name] / o3[name]
            worst = max(worst, ratio)
            flag = " (over 5%)" if ratio > 1.05 else ""
            print(f"| {name.removesuffix('/real_time')} | {o3[name]:.2f} | {o2[name]:.2f} | {ratio:.2f}{flag} |")
    print(f"\nslowest -O2 / -O3: {worst:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
