#!/usr/bin/env python3
"""Draws the README's plots from the benchmarks' JSON (scripts/bench writes it) with
gnuplot (Debian's gnuplot-nox); python3's standard library only.

    scripts/plot_bench.py build/release/softmax_bench.json docs/softmax_bench.png [peak GFLOP/s]
    scripts/plot_bench.py --backward build/release/backward_bench.json docs/backward_bench.png [peak]
    scripts/plot_bench.py --caches build/release/cache_bench.json docs/cache_bench.png [read GB/s]

softmax: GFLOP/s against N for fovea and the Eigen baseline, one panel per (D, causal),
with the measured FMA peak. backward: the backward's and forward's GFLOP/s against N.
caches: decode's GB/s of cache read and time per KV cache type, 1 and 2 threads, with
the measured one-thread read figure.
"""
import json
import os
import re
import subprocess
import sys
import tempfile


def medians(src, pattern):
    """{match groups: the run} for the median (or only) runs whose name matches."""
    found = {}
    for run in json.load(open(src))["benchmarks"]:
        if run.get("aggregate_name", "median") != "median":
            continue
        m = re.match(pattern, run["name"])
        if m:
            found[m.groups()] = run
    return found


def milliseconds(run):
    """A run's real time in ms, whatever unit the benchmark reported."""
    return run["real_time"] * {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run["time_unit"]]


def series_file(tmp, name, points):
    """Writes {x: y} as a gnuplot data file; returns its path."""
    path = os.path.join(tmp, name + ".dat")
    with open(path, "w") as f:
        for x in sorted(points):
            f.write(f"{x} {points[x]}\n")
    return path


def caches(src, dst, read):
    """Decode over each KV cache type (cache_bench's JSON): GB/s of cache read and ms, one
    bar per (type, threads), with the one-thread read figure."""
    runs = medians(src, r"decode/(\w+)/Sq=1/Sk=32768/H=32/Hk=8/D=128/threads=(\d+)")
    types = [t for t in ("fp32", "bf16", "fp16", "q8_0", "int8", "e4m3") if (t, "1") in runs]
    threads = sorted({int(k[1]) for k in runs})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "caches.dat")
        with open(path, "w") as f:  # type, then GB/s and ms per thread count
            for t in types:
                cells = []
                for n in threads:
                    r = runs.get((t, str(n)))
                    cells += [r["GB/s"] / 1e9, milliseconds(r)] if r else ["NaN", "NaN"]
                f.write(" ".join([t] + [str(c) for c in cells]) + "\n")
        script = [
            'set terminal pngcairo size 1200,450 font "sans,10"',
            f'set output "{dst}"',
            "set multiplot layout 1,2",
            "set termoption noenhanced",  # q8_0 as written, not q with a subscript
            "set style data histogram",
            "set style histogram clustered gap 1",
            "set style fill solid 0.8 border -1",
            "set grid ytics",
            "set key left top",
            "set yrange [0:*]",
            "set title 'decode, fp32 q, Sk=32768, H=32, Hk=8, D=128: GB/s of cache read'",
            "set ylabel 'GB/s'",
        ]
        bars = [f'"{path}" using {2 * i + 2}:xtic(1) title "{n} thread(s)"' for i, n in enumerate(threads)]
        if read:
            bars.append(f"{read} with lines dashtype 2 lw 2 title 'one-thread read figure'")
        script.append("plot " + ", ".join(bars))
        script += ["set title 'the same decode step: time'", "set ylabel 'ms'"]
        bars = [f'"{path}" using {2 * i + 3}:xtic(1) title "{n} thread(s)"' for i, n in enumerate(threads)]
        script.append("plot " + ", ".join(bars))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)


def backward(src, dst, peak):
    """GFLOP/s of softmax attention's backward and forward against N (backward_bench's
    JSON), full and causal, one thread, with the measured FMA peak."""
    series = {}  # (pass, mode) -> {N: GFLOP/s}
    for (kind, n, mode), run in medians(src, r"(backward|forward)/N=(\d+)/D=128/(full|causal)/threads=1").items():
        series.setdefault((kind, mode), {})[int(n)] = run["GFLOP/s"] / 1e9
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
                path = series_file(tmp, f"{kind}_{mode}", points)
                plots.append(f'"{path}" with linespoints title "{kind}, 1 thread"')
            if peak:
                plots.append(f"{peak} with lines dashtype 2 title 'FMA peak, 1 core'")
            if plots:
                script.append(f"set title 'softmax attention and its backward, D=128, {mode}'")
                script.append("plot " + ", ".join(plots))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)


def main():
    for flag, draw in (("--backward", backward), ("--caches", caches)):
        if sys.argv[1] == flag:
            draw(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else None)
            return
    src, dst = sys.argv[1], sys.argv[2]
    peak = float(sys.argv[3]) if len(sys.argv) > 3 else None
    series = {}  # (kernel, D, mode, threads) -> {N: GFLOP/s}
    pattern = r"(fovea|eigen)/N=(\d+)/D=(\d+)/(full|causal)/threads=(\d+)"
    for (kernel, n, d, mode, threads), run in medians(src, pattern).items():
        series.setdefault((kernel, int(d), mode, int(threads)), {})[int(n)] = run["GFLOP/s"] / 1e9
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
                        path = series_file(tmp, f"{kernel}_{d}_{mode}_{threads}", points)
                        plots.append(f'"{path}" with linespoints title "{kernel}, {threads} thread(s)"')
                if peak:
                    plots.append(f"{peak} with lines dashtype 2 title 'FMA peak, 1 core'")
                script.append(f"set title 'softmax attention, D={d}, {mode}'")
                script.append("plot " + ", ".join(plots))
        script.append("unset multiplot")
        subprocess.run(["gnuplot"], input="\n".join(script), text=True, check=True)


if __name__ == "__main__":
    main()
