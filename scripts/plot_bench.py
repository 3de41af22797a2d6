#!/usr/bin/env python3
"""Draws bench/softmax.png from softmax_bench's JSON (scripts/bench writes it):
GFLOP/s against N for fovea and the Eigen baseline, one panel per (D, causal), with the
measured FMA peak. Uses gnuplot (Debian's gnuplot-nox); python3's standard library only.

    scripts/plot_bench.py build/release/softmax_bench.json docs/softmax_bench.png [peak GFLOP/s]
"""
import json
import os
import re
import subprocess
import sys
import tempfile


def main():
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
