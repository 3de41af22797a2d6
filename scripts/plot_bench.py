#!/usr/bin/env python3
"""Draws bench/softmax.png from softmax_bench's JSON (scripts/bench writes it):
GFLOP/s against N for fovea and the Eigen baseline, one panel per (D, causal), with the
measured FMA peak. Uses gnuplot (Debian's gnuplot-nox); python3's standard library only.

    scripts/plot_bench.py build/release/softmax_bench.json docs/softmax_bench.png [peak GFLOP/s]
    scripts/plot_bench.py --backward build/release/backward_bench.json docs/backward_bench.png [peak]
"""
import json
import os
import re
import subprocess
import sys
import tempfile


def backward(src, dst, peak):
    """GFLOP/s of softmax attention's backward and forward against N (backward_bench's
    JSON), full and causal, one thread, with the measured FMA peak."""
    runs = json.load(open(src))["benchmarks"]
    series = {}  # (pass, mode) -> {N: GFLOP/s}
    for run in runs:
        if run.get("aggregate_name", "median") != "median":
            continue
        m = re.match(r"(backward|forward)/N=(\d+)/D=128/(full|causal)/threads=1", run["name"])
        if m:
            series.setdefault((m[1], m[3]), {})[int(m[2])] = run["GFLOP/s"] / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        script = [
            'set terminal pngcairo size 1200,450 font "sans,10"',
            f'set output "{dst}"',
            "set multiplot layout 1,2",
            "set logscale x 2",
            "set xlabel 'N (Sq = Sk)'",
            "set ylabel 'GFLOP/s (forward 4 N^2 D, backward 10 N^2 D; causal halved)'",
            "set key left bottom",
            "set grid",
            "set yrange [0:*]",
        ]
        for mode in ("full", "causal"):
            plots = []
            for kind in ("forward", "backward"):
                points = series.get((kind, mode))
                if not points:
                    continue
                path = os.path.join(tmp, f"{kind}_{mode}.dat")
                with open(path, "w") as f:
                    for n in sorted(points):
                        f.write(f"{n} {points[n]}\n")
                plots.append(f'"{path}" with linespoints title "{kind}, 1 thread"')
            if peak:
                plots.append(f"{peak} with lines dashtype 2 title 'FMA peak, 1 core'")
            if plots:
                script.append(f"set title 'softmax attention and its backward, D=128, {mode}'")
                script.append("plot " + ", ".join(plots))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)


def main():
    if sys.argv[1] == "--backward":
        backward(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else None)
        return
    src, dst = sys.argv[1], sys.argv[2]
    peak = float(sys.argv[3]) if len(sys.argv) > 3 else None
    runs = json.load(open(src))["benchmarks"]
    series = {}  # (kernel, D, mode, threads) -> {N: GFLOP/s}
    for run in runs:
        if run.get("aggregate_name", "median") != "median":
            continue
        m = re.match(r"(fovea|eigen)/N=(\d+)/D=(\d+)/(full|causal)/threads=(\d+)", run["name"])
        if m:
            key = (m[1], int(m[3]), m[4], int(m[5]))
            series.setdefault(key, {})[int(m[2])] = run["GFLOP/s"] / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        script = [
            'set terminal pngcairo size 1200,800 font "sans,10"',
            f'set output "{dst}"',
            "set multiplot layout 2,2",
            "set logscale x 2",
            "set xlabel 'N (Sq = Sk)'",
            "set ylabel 'GFLOP/s'",
            "set key left top",
            "set grid",
        ]
        for d in (64, 128):
            for mode in ("full", "causal"):
                plots = []
                for kernel in ("fovea", "eigen"):
                    for threads in sorted({k[3] for k in series}):
                        points = series.get((kernel, d, mode, threads))
                        if not points:
                            continue
                        path = os.path.join(tmp, f"{kernel}_{d}_{mode}_{threads}.dat")
                        with open(path, "w") as f:
                            for n in sorted(points):
                                f.write(f"{n} {points[n]}\n")
                        plots.append(f'"{path}" with linespoints title "{kernel}, {threads} thread(s)"')
                if peak:
                    plots.append(f"{peak} with lines dashtype 2 title 'FMA peak, 1 core'")
                script.append(f"set title 'softmax attention, D={d}, {mode}'")
                script.append("plot " + ", ".join(plots))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)


if __name__ == "__main__":
    main()
