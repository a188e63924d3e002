#!/usr/bin/env python3
"""Summarises the GPU work of the last WINDOW_MS of a trace from cupti_trace.c (start,end,kind,
name), e.g. the last prefill of a bench_gpu run: per kernel name, how many ran, their total and
mean time and share of the window; then the window's busy time and its idle gaps.
Usage: trace_window.py TRACE.csv WINDOW_MS [TOP]"""
import csv
import sys
from collections import defaultdict

from trace_steps import short


def main():
    rows = []
    with open(sys.argv[1], newline="") as f:
        for r in csv.DictReader(f):
            rows.append((int(r["start"]), int(r["end"]), short(r["name"])))
    rows.sort()
    window = float(sys.argv[2]) * 1e6
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 25
    t_end = max(e for _, e, _ in rows)
    sel = [r for r in rows if r[0] >= t_end - window]
    t0 = sel[0][0]
    span = t_end - t0
    agg = defaultdict(lambda: [0, 0])
    busy, gaps, reach = 0, [], t0
    for s, e, name in sel:
        agg[name][0] += 1
        agg[name][1] += e - s
        if s > reach:
            gaps.append(s - reach)
        busy += max(0, e - max(s, reach))
        reach = max(reach, e)
    print(f"window {span / 1e6:.1f} ms: {len(sel)} kernels/copies, busy {busy / 1e6:.1f} ms, "
          f"idle {(span - busy) / 1e6:.1f} ms in {len(gaps)} gaps "
          f"(over 50 us: {sum(g for g in gaps if g > 5e4) / 1e6:.1f} ms in "
          f"{sum(1 for g in gaps if g > 5e4)})")
    print(f"{'kernel':40s} {'count':>7s} {'total ms':>9s} {'us each':>9s} {'share':>6s}")
    for name, (cnt, dur) in sorted(agg.items(), key=lambda x: -x[1][1])[:top]:
        print(f"{name:40s} {cnt:7d} {dur / 1e6:9.2f} {dur / cnt / 1e3:9.1f} {dur / span:6.3f}")


if __name__ == "__main__":
    main()
