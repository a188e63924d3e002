#!/usr/bin/env python3
"""Summarises the GPU kernels of the last decode steps in a trace from cupti_trace.c
(start,end,kind,name):
for each kernel name, how many ran per step, their time, and the idle gap before them. A step
ends at the argmax kernel (greedy decode). Usage: trace_steps.py TRACE.csv [STEPS]"""
import csv
import sys
from collections import defaultdict


def short(name):
    """Kernel name without template arguments: _Z11gemv_kernelILi1EE... -> gemv_kernel."""
    if name.startswith("_Z"):
        i = 2
        while i < len(name) and not name[i].isdigit():
            i += 1
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        if j > i:
            return name[j:j + int(name[i:j])][:40]
    return name.split("(")[0].split("<")[0].replace("void ", "").strip()[:40]


def main():
    rows = []
    with open(sys.argv[1], newline="") as f:
        for r in csv.DictReader(f):
            start, end = int(r["start"]), int(r["end"])
            rows.append((start, end - start, short(r["name"]), r["kind"]))
    rows.sort()
    ends = [i for i, r in enumerate(rows) if "argmax" in r[2]]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    if len(ends) < n + 1:
        print("not enough decode steps in the trace")
        return
    agg = defaultdict(lambda: [0, 0, 0])
    spans = []
    for a, b in zip(ends[-n - 1:-1], ends[-n:]):
        step = rows[a + 1:b + 1]
        spans.append((step[-1][0] + step[-1][1] - step[0][0], sum(r[1] for r in step)))
        prev_end = rows[a][0] + rows[a][1]
        for start, dur, name, _ in step:
            g = agg[name]
            g[0] += 1
            g[1] += dur
            g[2] += max(0, start - prev_end)
            prev_end = max(prev_end, start + dur)
    period = (rows[ends[-1]][0] - rows[ends[-n - 1]][0]) / n
    print(f"{n} steps: argmax to argmax {period / 1e3:.1f} us; GPU span per step "
          f"{sum(s for s, _ in spans) / n / 1e3:.1f} us, busy {sum(b for _, b in spans) / n / 1e3:.1f} us")
    print(f"{'kernel':40s} {'per step':>8s} {'us/step':>9s} {'us each':>8s} {'gap us/step':>11s}")
    for name, (cnt, dur, gap) in sorted(agg.items(), key=lambda x: -x[1][1]):
        print(f"{name:40s} {cnt / n:8.1f} {dur / n / 1e3:9.1f} {dur / cnt / 1e3:8.2f} "
              f"{gap / n / 1e3:11.1f}")


if __name__ == "__main__":
    main()
