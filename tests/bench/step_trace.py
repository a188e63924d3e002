#!/usr/bin/env python3
"""Sums up a step trace of uncompd (`--step-trace FILE`: one JSON line per engine step).

    python3 tests/bench/step_trace.py FILE [--layers L] [--from-line N]

Each line holds what the step carried (decode rows, prompt slices and their row-layers, new
sequences, frees) and where the scheduler's time went: `idle_ms` since the previous step's round
ended (waiting for requests, the loop), `plan_ms` (admission and the step's plan), `engine_ms`
(uc_engine_step: the sweep, sampling on the device) and `after_ms` (sampling on the host, stop
rules, the events handed to the fronts). The summary says, for the span the trace covers, how
much of the wall time each part took, the engine time of decode steps by batch size (median,
p90, max), the prefill rate of prefill-only steps (tokens through every layer per second of
engine time, with --layers), the host time that ending and starting sequences took (traces
with `free_ms`), and the slowest decode steps with what ran just before them.
"""
import argparse
import json
import sys


def pct(v, q):
    if not v:
        return float("nan")
    v = sorted(v)
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


def load(path, from_line=0):
    steps = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < from_line or not line.strip():
                continue
            try:
                steps.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a stopped daemon
    return steps


def summary(steps, layers=0):
    """The summary's lines (a list of str)."""
    out = []
    if not steps:
        return ["step trace: no steps"]
    span = steps[-1]["t"] + steps[-1]["plan_ms"] + steps[-1]["engine_ms"] + \
        steps[-1]["after_ms"] - steps[0]["t"]
    parts = {k: sum(s[k] for s in steps[1:]) for k in ("idle_ms",)}
    for k in ("plan_ms", "engine_ms", "after_ms"):
        parts[k] = sum(s[k] for s in steps)
    out.append("step trace: %d steps over %.1f s; of it engine %.1f%%, host before the step "
               "%.1f%%, host after it %.1f%%, idle between rounds %.1f%%" % (
                   len(steps), span / 1e3, 100 * parts["engine_ms"] / span,
                   100 * parts["plan_ms"] / span, 100 * parts["after_ms"] / span,
                   100 * parts["idle_ms"] / span))
    kinds = {}
    for s in steps:
        kinds.setdefault(s["kind"], []).append(s)
    for k in sorted(kinds):
        v = kinds[k]
        out.append("  %-8s %6d steps, engine %8.1f ms in all (median %.2f ms), host after "
                   "median %.3f ms" % (k, len(v), sum(s["engine_ms"] for s in v),
                                       pct([s["engine_ms"] for s in v], 0.5),
                                       pct([s["after_ms"] for s in v], 0.5)))
    dec = kinds.get("decode", [])
    by_b = {}
    for s in dec:
        by_b.setdefault(s["decode"], []).append(s)
    top = sorted(by_b, key=lambda b: -len(by_b[b]))[:6]
    for b in sorted(top):
        v = by_b[b]
        e = [s["engine_ms"] for s in v]
        rnd = [s["plan_ms"] + s["engine_ms"] + s["after_ms"] + s["idle_ms"] for s in v]
        prep = [s.get("decode_prep_ms", 0) for s in v]
        ahead = sum(1 for s in v if s.get("lookahead"))
        flight = sum(1 for s in v if s.get("overlap"))
        out.append("  decode batch %4d: %5d steps, engine median %.2f / p90 %.2f / max %.2f ms"
                   " (host before the layers median %.2f ms; %d with the lookahead, %d taken in "
                   "flight); step to step median %.2f ms" % (b, len(v), pct(e, 0.5), pct(e, 0.9),
                                                            max(e), pct(prep, 0.5), ahead, flight,
                                                            pct(rnd, 0.5)))
    pf = kinds.get("prefill", [])
    if pf and layers > 0:
        rows = sum(s["prefill_row_layers"] for s in pf)
        ms = sum(s["engine_ms"] for s in pf)
        out.append("  prefill-only steps: %.0f tokens through %d layers in %.1f ms of engine "
                   "time = %.0f tok/s" % (rows / layers, layers, ms, rows / layers / ms * 1e3))
    freeing = [s for s in steps if s["free"] > 0 and "free_ms" in s]
    if freeing:
        fm = [s["free_ms"] for s in freeing]
        new = [s["new_ms"] for s in steps if s["new"] > 0 and "new_ms" in s]
        out.append("  frees: %d sequences in %d steps, %.1f ms of host time in all (most %.2f ms "
                   "in a step); new sequences started in %.1f ms" % (
                       sum(s["free"] for s in freeing), len(freeing), sum(fm), max(fm),
                       sum(new)))
    slow = sorted((i for i in range(len(steps)) if steps[i]["kind"] == "decode"),
                  key=lambda i: -steps[i]["engine_ms"])[:8]
    for i in sorted(slow):
        s = steps[i]
        prev = steps[i - 1] if i > 0 else None
        out.append("  slow decode step at %.1f s: batch %d, engine %.2f ms (host before the "
                   "layers %.2f ms, %d blocks taken, %d table ints%s, graph %s), new %d, free %d; "
                   "before it: %s" % (s["t"] / 1e3, s["decode"], s["engine_ms"],
                                      s.get("decode_prep_ms", 0), s.get("blocks_taken", 0),
                                      s.get("table_ints", 0),
                                      " ahead" if s.get("lookahead") else "",
                                      s.get("graph", "-"), s["new"],
                                      s["free"], "%s (batch %d, %.2f ms)" % (
                                          prev["kind"], prev["decode"], prev["engine_ms"])
                                      if prev else "nothing"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--layers", type=int, default=0, help="the model's layers (prefill rate)")
    ap.add_argument("--from-line", type=int, default=0, help="skip this many lines")
    a = ap.parse_args()
    print("\n".join(summary(load(a.trace, a.from_line), a.layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
